"""A local Google Cloud Storage for tests: `gcp-storage-emulator` on 127.0.0.1 in a subprocess.

Sets the environment that points gcsfs, google-cloud-storage, tensorstore (orbax) and etils.epath at it
(see DESIGN.md, "GCS in tests"). Subprocesses started by a test inherit that environment.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
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
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
         "--port", str(port), "--in-memory", "--default-bucket", bucket, "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/storage/v1/b/{bucket}", timeout=1).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"gcp-storage-emulator did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.1)
    saved = {k: os.environ.get(k) for k in emulator_env(port)}
    os.environ.update(emulator_env(port))
    try:
        import gcsfs  # gcsfs caches filesystem instances; a fresh emulator needs a fresh one
        gcsfs.GCSFileSystem.clear_instance_cache()
    except ImportError:
        pass
    try:
        yield f"gs://{bucket}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
