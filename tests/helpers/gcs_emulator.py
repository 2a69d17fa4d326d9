"""A local Google Cloud Storage for tests: `gcp-storage-emulator` on 127.0.0.1 in a subprocess.

Sets the environment that points gcsfs, google-cloud-storage, tensorstore (orbax) and etils.epath at it
(docs/design.md, "GCS in tests"). Subprocesses started by a test inherit that environment. The emulator's
output goes to a file, never a pipe: it prints a traceback for every connection a client drops early (gcsfs
does, often), and a pipe nobody reads would fill up and hang every later request.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def emulator_env(port: int) -> dict[str, str]:
    url = f"http://127.0.0.1:{port}"
    return {
        "STORAGE_EMULATOR_HOST": url,
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # else gcsfs probes the bucket over gRPC, 60 s each
        "TENSORSTORE_GCS_HTTP_URL": url,  # orbax writes arrays through tensorstore
        "EPATH_USE_TF": "false",  # else etils.epath sends gs:// through tf.io.gfile
        "GOOGLE_CLOUD_PROJECT": "test-project",
    }


@contextlib.contextmanager
def running_emulator(bucket: str = "agentlm-test", timeout_s: float = 30.0):
    """Starts the emulator with `bucket` created, sets os.environ for it, yields `gs://bucket`."""
    import gcsfs
    from etils.epath import gpath

    port = _free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
         "--port", str(port), "--in-memory", "--default-bucket", bucket, "--quiet"],
        stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/storage/v1/b/{bucket}", timeout=1).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                log.seek(0)
                raise RuntimeError(f"gcp-storage-emulator did not start: {log.read().decode()[-2000:]}")
            time.sleep(0.1)
    saved = {k: os.environ.get(k) for k in emulator_env(port)}
    os.environ.update(emulator_env(port))
    # gcsfs caches filesystem instances, and etils.epath (orbax's paths) whether to send gs:// through
    # TensorFlow, possibly decided before these settings existed: a fresh emulator needs both cleared.
    gcsfs.GCSFileSystem.clear_instance_cache()
    gpath._is_tf_installed.cache_clear()
    try:
        yield f"gs://{bucket}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
        gcsfs.GCSFileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
