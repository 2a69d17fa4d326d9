"""The worker process of the local multi-process runner: Beam's own SDK harness, started and ended faster.

`--direct_running_mode multi_processing` starts each worker as `python -m apache_beam.runners.worker.sdk_worker_main`;
`build.local_runner` starts this module instead, which runs that same `main` and differs only around it:

- imports run with the garbage collector paused (~15% less start-up: importing Beam allocates a lot and
  frees nothing), and the imported objects are then frozen out of later collections;
- when the harness returns (the runner closed the control channel: all work is done and reported), the
  process ends with `os._exit`. Python's normal teardown would garbage-collect every module Beam imported,
  0.3-0.5 s per worker, and the runner waits for its workers one after another.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import traceback


def main() -> None:
    code = 0
    try:
        gc.disable()
        from apache_beam.runners.worker import sdk_worker_main

        import data_pipeline.beam_pipeline  # noqa: F401  (what the pickled DoFns import anyway)
        gc.freeze()
        gc.enable()
        sdk_worker_main.main(sys.argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001  (reported like an uncaught exception, then the same fast exit)
        traceback.print_exc()
        code = 1
    finally:
        gc.enable()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main()
