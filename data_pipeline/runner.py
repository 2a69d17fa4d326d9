"""The local runner: Beam's FnApiRunner, started the way that suits a few cores and no network.

`--runner DirectRunner` (the default) first tries Beam's PrismRunner, which downloads its binary (fails
offline) and ignores the worker settings; `local_runner` goes straight to the FnApiRunner that DirectRunner
falls back to, with our worker tweaks.
"""

from __future__ import annotations

import contextlib
import sys

DEFAULT_RUNNER = "DirectRunner"
DEFAULT_DIRECT_MODE = "in_memory"  # with 2 workers: 2 threads in this process (the fastest on 2 cores)
DEFAULT_DIRECT_WORKERS = 2
BEAM_WORKER_MAIN = "-m apache_beam.runners.worker.sdk_worker_main"  # what multi_processing starts per worker
FAST_WORKER_MAIN = "data_pipeline.beam_worker"  # ... and what we start instead (same harness)
NO_TIMED_FLUSH_MS = 2**31 - 1  # multi_threading workers: see local_worker_environments
TOKENIZERS_PARALLELISM = "TOKENIZERS_PARALLELISM"  # the fast tokenizer's switch for its own thread pool


def local_runner(options):
    """For `--runner DirectRunner`: Beam's FnApiRunner (honouring direct_running_mode/direct_num_workers),
    which is what DirectRunner itself runs after first trying PrismRunner. Prism would download its binary
    from GitHub (fails offline) and ignores the worker settings, so we skip that attempt. None for other
    runners (Beam resolves `--runner` itself)."""
    from apache_beam.options.pipeline_options import StandardOptions

    if options.view_as(StandardOptions).runner not in (None, DEFAULT_RUNNER):
        return None
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    class LocalRunner(fn_runner.FnApiRunner):
        def run_via_runner_api(self, pipeline_proto, options):
            return super().run_via_runner_api(local_worker_environments(pipeline_proto), options)

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    provision = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
    return LocalRunner(provision_info=provision)


def local_worker_environments(pipeline_proto):
    """Adjusts the local runner's worker environments in the pipeline proto (in place; returned):

    - multi_processing: each worker runs `data_pipeline.beam_worker` (Beam's harness, faster start and exit).
    - multi_threading: the workers' time-based output flush is pushed out of reach. Beam's threaded workers
      also send their buffered output every second from a timer thread, which can cut an element in two
      while it is being encoded; the runner decodes each piece it feeds to a GroupByKey on its own and fails
      ("Invalid PaneInfoEncoding", seen with our ~100 KB batches). Size-based flushing, which happens
      between elements only, stays.
    """
    import json

    from apache_beam.portability import python_urns

    for env in pipeline_proto.components.environments.values():
        if env.urn == python_urns.SUBPROCESS_SDK and env.payload.endswith(BEAM_WORKER_MAIN.encode()):
            env.payload = f"{sys.executable} -m {FAST_WORKER_MAIN}".encode()
        elif env.urn == python_urns.EMBEDDED_PYTHON_GRPC:
            config = json.loads(env.payload or b"{}")
            env.payload = json.dumps(config | {"data_buffer_time_limit_ms": NO_TIMED_FLUSH_MS}).encode()
    return pipeline_proto


@contextlib.contextmanager
def one_tokenizer_thread_per_worker(local_options):
    """With several local workers (threads or processes), each tokenizes its own batches single-threaded.

    The fast tokenizer parallelises every batch call over all cores (Rayon) unless TOKENIZERS_PARALLELISM
    is false. That suits one caller; with a worker per core, each worker's calls would compete with the
    others' for the same cores, and in threads the tokenizer would not overlap with the other workers'
    Python work (it releases the GIL). Workers started as processes inherit the setting; the caller's own
    value is restored afterwards (and one set explicitly is left alone). `local_options` None: not local.
    """
    import os

    from apache_beam.options.pipeline_options import DirectOptions

    workers = local_options.view_as(DirectOptions).direct_num_workers if local_options else 1
    if workers == 1 or TOKENIZERS_PARALLELISM in os.environ:
        yield
        return
    os.environ[TOKENIZERS_PARALLELISM] = "false"
    try:
        yield
    finally:
        del os.environ[TOKENIZERS_PARALLELISM]
