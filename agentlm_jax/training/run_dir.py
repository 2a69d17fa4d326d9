"""The run directory around the checkpoints: the resolved config, the tokenizer copy, the lock that keeps a
second trainer out, the workers' logs, and the checks a resume must pass before anything is written.

    config.yaml     the resolved config, written once the run is known to start or resume cleanly
    tokenizer/      a copy of the dataset's tokenizer, so export and generate never depend on where the
                    dataset was when training started
    logs/           each worker's log of each start: {start time}-worker{i}.log (local or gs://)
    .lock           (local) held with flock while a trainer runs; the kernel drops it when the process dies
    lock.json       (gs://) a lease with a heartbeat; one older than LEASE_STALE_S is taken over
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import socket
import tempfile
import threading
import time
import uuid
from typing import Any, Callable

import fsspec

from agentlm_jax.config import RUNTIME_FIELDS, TrainConfig, to_dict
from agentlm_jax.errors import ConfigError, SetupError

log = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"
TOKENIZER_SUBDIR = "tokenizer"
LOGS_SUBDIR = "logs"
LOCAL_LOCK = ".lock"
REMOTE_LEASE = "lock.json"
LEASE_HEARTBEAT_S = 60.0
LEASE_STALE_S = 300.0

# Settings a resumed run must share with its checkpoint: they decide the data order (the input iterator's
# state only makes sense for them) or the meaning of the saved step.
RESUME_KEYS = ("seed", "data.global_batch", "data.max_seq_len", "data.packing_bins", "data.overlong",
               "lora.enabled", "lora.rank", "lora.alpha", "lora.targets", "lora.base_dtype")


class RunInUseError(SetupError):
    """Another trainer holds the run directory."""


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _join(run_dir: str, *parts: str) -> tuple[Any, str]:
    fs, root = fsspec.core.url_to_fs(run_dir)
    return fs, posixpath.join(root, *parts)


# --------------------------------------------------------------------------------------------- identity
def data_identity(manifest: dict) -> dict[str, str]:
    """What identifies a dataset wherever it is stored: its tokenizer's files and its splits (shard names,
    example, token and byte counts). A rebuild from the same inputs and settings has the same identity."""
    canonical = json.dumps({"tasks": manifest.get("tasks"), "splits": manifest.get("splits")}, sort_keys=True)
    return {"tokenizer_sha256": str((manifest.get("tokenizer") or {}).get("sha256", "")),
            "data_sha256": hashlib.sha256(canonical.encode()).hexdigest()}


def _get(config: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        config = config.get(part, {}) if isinstance(config, dict) else {}
    return None if config == {} else config


def resume_conflicts(saved: dict[str, Any], cfg: TrainConfig, identity: dict[str, str]) -> list[str]:
    """Why the checkpoint's run (its saved run info) cannot continue as `cfg` on the dataset of `identity`."""
    saved_config, now = saved.get("config") or {}, to_dict(cfg)
    problems = []
    for key in RESUME_KEYS:
        before, after = _get(saved_config, key), _get(now, key)
        if before is not None and before != after:
            problems.append(f"{key} is {after!r} but the run was trained with {before!r} (set {key}={before!r} "
                            f"to continue it)")
    saved_model = saved_config.get("model") or {}
    for key, after in now["model"].items():
        if key not in RUNTIME_FIELDS and key in saved_model and saved_model[key] != after:
            problems.append(f"model.{key} is {after!r} but the checkpoint holds a model with {saved_model[key]!r}")
    saved_identity = saved.get("data_identity") or {}
    if saved_identity.get("tokenizer_sha256") and saved_identity["tokenizer_sha256"] != identity["tokenizer_sha256"]:
        problems.append(f"the dataset at data.path={cfg.data.path} was tokenized with another tokenizer "
                        f"(sha256 {identity['tokenizer_sha256'][:12]}, the run's: "
                        f"{saved_identity['tokenizer_sha256'][:12]})")
    elif saved_identity.get("data_sha256") and saved_identity["data_sha256"] != identity["data_sha256"]:
        problems.append(f"the dataset at data.path={cfg.data.path} is not the one the run was trained on (its "
                        f"shards differ; was it rebuilt with other inputs or settings?)")
    return problems


def check_resume(saved: dict[str, Any], cfg: TrainConfig, identity: dict[str, str], step: int) -> None:
    problems = resume_conflicts(saved, cfg, identity)
    if problems:
        raise ConfigError(
            f"cannot resume {cfg.run_dir} from its checkpoint of step {step}: " + "; ".join(problems)
            + ". Nothing was written. To train on other data or settings, start a new run_dir (init_from= the "
              "run's export, e.g. {}/hf, carries the weights over)".format(cfg.run_dir.rstrip("/")))


# --------------------------------------------------------------------------------------------- files
def write_config(run_dir: str, text: str) -> None:
    fs, path = _join(run_dir, CONFIG_NAME)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(text)


def run_tokenizer_dir(run_dir: str) -> str:
    """RUN/tokenizer: where a run keeps its copy of the dataset's tokenizer (checkpoints and exports name it)."""
    return posixpath.join(run_dir.rstrip("/"), TOKENIZER_SUBDIR)


def copy_tokenizer(source_dir: str, run_dir: str) -> str:
    """RUN/tokenizer: the dataset's tokenizer files (replacing an older copy); returns its path."""
    src_fs, src = fsspec.core.url_to_fs(source_dir)
    dst_fs, dst = _join(run_dir, TOKENIZER_SUBDIR)
    dst_fs.makedirs(dst, exist_ok=True)
    for path in src_fs.ls(src, detail=False):
        if src_fs.isfile(path):
            with src_fs.open(path, "rb") as f:
                data = f.read()
            with dst_fs.open(posixpath.join(dst, posixpath.basename(path)), "wb") as f:
                f.write(data)
    return run_tokenizer_dir(run_dir)


# --------------------------------------------------------------------------------------------- the lock
class RunLock:
    """One trainer per run directory. Local: an flock on RUN/.lock (gone with the process, however it ends).
    gs://: a lease object RUN/lock.json refreshed every LEASE_HEARTBEAT_S by a thread; a lease not refreshed
    for LEASE_STALE_S (its trainer died) is taken over with a warning."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex,
                      "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _in_use(self, holder: dict) -> RunInUseError:
        who = f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}"
        return RunInUseError(f"{self.run_dir} is in use by another trainer ({who}): wait for it to end, stop it "
                             "(tpu/run.sh --stop on a TPU VM; `kill <pid>` saves a checkpoint first), or choose "
                             "another run_dir")

    def acquire(self) -> "RunLock":
        if is_remote(self.run_dir):
            self._acquire_lease()
        else:
            os.makedirs(self.run_dir, exist_ok=True)
            fd = os.open(os.path.join(self.run_dir, LOCAL_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_json(lambda: os.pread(fd, 4096, 0).decode())
                os.close(fd)
                raise self._in_use(holder) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(self.owner).encode(), 0)
            self._fd = fd
        return self

    def _acquire_lease(self) -> None:
        fs, path = _join(self.run_dir, REMOTE_LEASE)
        if fs.exists(path):
            holder = _read_json(lambda: fs.cat_file(path).decode())
            age = time.time() - float(holder.get("heartbeat", 0))
            if age < LEASE_STALE_S:
                raise self._in_use(holder)
            log.warning("taking over the lease of %s: its holder (pid %s on %s) has not renewed it for %.0f s",
                        self.run_dir, holder.get("pid"), holder.get("host"), age)
        self._renew(fs, path)
        time.sleep(0.5)  # two trainers starting at once: the later write wins, the other sees it and stops
        holder = _read_json(lambda: fs.cat_file(path).decode())
        if holder.get("id") != self.owner["id"]:
            raise self._in_use(holder)
        self._thread = threading.Thread(target=self._heartbeat, args=(fs, path), daemon=True, name="run-lease")
        self._thread.start()

    def _renew(self, fs, path: str) -> None:
        fs.pipe_file(path, json.dumps({**self.owner, "heartbeat": time.time()}).encode())

    def _heartbeat(self, fs, path: str) -> None:
        while not self._stop.wait(LEASE_HEARTBEAT_S):
            try:
                self._renew(fs, path)
            except Exception as e:  # a transient storage error; the next beat retries
                log.warning("could not renew the lease %s: %s", path, e)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the flock
            self._fd = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            fs, path = _join(self.run_dir, REMOTE_LEASE)
            try:
                if _read_json(lambda: fs.cat_file(path).decode()).get("id") == self.owner["id"]:
                    fs.rm(path)
            except FileNotFoundError:
                pass


def _read_json(read: Callable[[], str]) -> dict:
    try:
        value = json.loads(read())
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------------------------- logs
class WorkerLog(logging.Handler):
    """This worker's log lines in RUN/logs/{start}-worker{i}.log: written directly for a local run dir,
    through a local file uploaded by `sync()` for gs:// (object stores cannot append)."""

    def __init__(self, run_dir: str, process_index: int):
        super().__init__(logging.INFO)
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-worker{process_index}.log"
        self.remote = is_remote(run_dir)
        self.fs, self.target = _join(run_dir, LOGS_SUBDIR, name)
        if self.remote:
            self.local = os.path.join(tempfile.mkdtemp(prefix="agentlm-log-"), name)
        else:
            os.makedirs(os.path.dirname(self.target), exist_ok=True)
            self.local = self.target
        self._file = open(self.local, "a", encoding="utf-8")
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._file.write(self.format(record) + "\n")
            self._file.flush()
        except Exception:
            self.handleError(record)

    def sync(self) -> None:
        if self.remote:
            self._file.flush()
            self.fs.put(self.local, self.target)

    def close(self) -> None:
        try:
            self.sync()
        finally:
            self._file.close()
            super().close()


@dataclasses.dataclass
class Every:
    """True once every `seconds` of wall-clock time (never when seconds is None or <= 0)."""

    seconds: float | None
    last: float = dataclasses.field(default_factory=lambda: time.monotonic())

    def due(self) -> bool:
        if not self.seconds or self.seconds <= 0 or time.monotonic() - self.last < self.seconds:
            return False
        self.last = time.monotonic()
        return True

    def reset(self) -> None:
        self.last = time.monotonic()
