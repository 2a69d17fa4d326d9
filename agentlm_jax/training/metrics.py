"""Training metrics: model FLOPs and MFU, and the writers (metrics.jsonl + TensorBoard event files).

MFU = model FLOPs per second / peak FLOPs per second of the devices. Model FLOPs per token (the convention
of bench/bench_model.py): 6 · (parameters except the embedding table, whose lookup is not a matmul)
+ 6 · L · T · (N · H) for causal attention (QKᵀ and AV, forward and backward, half of the T×T square).
Recomputation (remat) is not counted: this is model FLOPs, not hardware FLOPs. Every position of the packed
batch counts, padding included (the hardware computes it).

Peak: `logging.peak_flops_per_device` if set; else the published dense bf16 peak of the accelerator kind
(table below); on CPU a float32 matmul peak measured at start-up, for the whole process (simulated CPU
devices share the same cores, so it is not multiplied by their number).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import posixpath
import shutil
import socket
import tempfile
import time
from typing import Any, Iterator, Mapping

import fsspec
import jax
import jax.numpy as jnp
import numpy as np

from agentlm_jax.config import ModelConfig
from data_pipeline.formats import records
from agentlm_jax.model.llama import count_params

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

# Dense bf16 peak FLOP/s per device, by `jax.Device.device_kind` prefix (vendor data sheets).
PEAK_FLOPS_BY_KIND = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) model FLOPs per token of a [*, seq_len] batch (see the module doc)."""
    matmul_params = count_params(cfg) - cfg.vocab_size * cfg.hidden_size
    attention = 6 * cfg.num_layers * seq_len * cfg.num_heads * cfg.resolved_head_dim
    return 6 * matmul_params + attention


def measure_cpu_matmul_peak(n: int = 1024, repeats: int = 5) -> float:
    """Best float32 FLOP/s of an n×n matmul on this process's CPU (all its threads)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def peak_flops(configured_per_device: float | None) -> tuple[float, str]:
    """(peak FLOP/s of all devices of the job, how it was obtained)."""
    if configured_per_device:
        return configured_per_device * jax.device_count(), "configured"
    device = jax.devices()[0]
    for kind, flops in PEAK_FLOPS_BY_KIND.items():
        if device.device_kind.startswith(kind):
            return flops * jax.device_count(), f"{kind} bf16 data sheet"
    if device.platform == "cpu":
        return measure_cpu_matmul_peak() * jax.process_count(), "measured CPU float32 matmul"
    return 0.0, f"unknown for {device.device_kind}; set logging.peak_flops_per_device"


class Throughput:
    """Tokens/s and MFU over the steps between two `rate` calls."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak: float):
        self.tokens_per_step, self.flops_per_token, self.peak = tokens_per_step, flops_per_token, peak
        self._start, self._steps = time.perf_counter(), 0

    def step(self) -> None:
        self._steps += 1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leaves the time spent inside out of the window (evaluation, checkpoint saves), so the next rate
        measures training steps only."""
        begin = time.perf_counter()
        try:
            yield
        finally:
            self._start += time.perf_counter() - begin

    def rate(self) -> dict[str, float]:
        now = time.perf_counter()
        seconds, steps = now - self._start, self._steps
        self._start, self._steps = now, 0
        if not steps or seconds <= 0:
            return {}
        tokens_per_s = steps * self.tokens_per_step / seconds
        out = {"tokens_per_s": tokens_per_s, "step_s": seconds / steps}
        if self.peak:
            out["mfu"] = tokens_per_s * self.flops_per_token / self.peak
        return out


_EVENT_FILES = itertools.count()


class _TensorBoard:
    """Scalar summaries in a TensorBoard event file: TensorBoard's own protobufs, framed as TFRecords by the
    project's record module (byte-identical to TensorFlow's writer). tensorboard's `EventFileWriter` would
    import all of TensorFlow (seconds, gigabytes) whenever it is installed."""

    def __init__(self, logdir: str):
        from tensorboard.compat.proto import event_pb2

        os.makedirs(logdir, exist_ok=True)
        # TensorFlow's naming: time, host, process, and a per-process counter (unique within a second too)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_EVENT_FILES)}"
        self._file = open(os.path.join(logdir, name), "wb")
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event) -> None:
        self._file.write(records.frame_record(event.SerializeToString()))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                                             for k, v in values.items()])
        self._write(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def restart_at(self, step: int) -> None:
        """TensorBoard drops the events of earlier files from `step` on (those logged before an interruption
        and then redone), as tf.summary does on a restart."""
        from tensorboard.compat.proto import event_pb2

        self._write(event_pb2.Event(wall_time=time.time(), step=step,
                                    session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class MetricsWriter:
    """`metrics.jsonl` (one JSON object per logged step) and TensorBoard event files under the run dir.

    Only the main process writes (others get a writer that does nothing). Files are written to a local
    directory: the run dir itself, or for a remote (gs://) run dir a local staging directory whose files are
    uploaded by `sync()` (the trainer calls it at every checkpoint and at the end). On resume, records of
    steps after the restored step (logged before an interruption, then redone) are dropped.
    """

    def __init__(self, run_dir: str, *, enabled: bool, tensorboard: bool, resume_step: int = 0):
        self.enabled = enabled
        self.run_dir = run_dir
        self._remote = "://" in run_dir and not run_dir.startswith("file://")
        self._tb = None
        if not enabled:
            return
        self.local_dir = tempfile.mkdtemp(prefix="agentlm-metrics-") if self._remote else run_dir
        os.makedirs(self.local_dir, exist_ok=True)
        self._jsonl_path = os.path.join(self.local_dir, METRICS_FILE)
        self._keep_records_up_to(resume_step)
        self._jsonl = open(self._jsonl_path, "a")
        if tensorboard:
            self._tb = _TensorBoard(os.path.join(self.local_dir, TENSORBOARD_DIR))
            if resume_step:
                self._tb.restart_at(resume_step + 1)

    def _keep_records_up_to(self, step: int) -> None:
        if self._remote:
            fs, root = fsspec.core.url_to_fs(self.run_dir)
            remote = posixpath.join(root, METRICS_FILE)
            if fs.exists(remote):
                fs.get(remote, self._jsonl_path)
        if not os.path.exists(self._jsonl_path):
            return
        kept, torn = [], 0
        with open(self._jsonl_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line) if line.strip() else None
                except ValueError:  # a line cut short (disk full, a kill mid-write)
                    torn += 1
                    continue
                if isinstance(record, dict) and record.get("step", 0) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        if torn:
            log.warning("%s: dropped %d unreadable line(s) (cut short by an earlier crash?)", METRICS_FILE, torn)
        with open(self._jsonl_path, "w") as f:
            f.writelines(kept)

    def write(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.scalars(step, {k: v for k, v in values.items() if isinstance(v, (int, float))})

    def sync(self) -> None:
        """Flush; for a remote run dir, upload the local files."""
        if not self.enabled:
            return
        if self._tb is not None:
            self._tb.flush()
        if self._remote:
            fs, root = fsspec.core.url_to_fs(self.run_dir)
            for dirpath, _, files in os.walk(self.local_dir):
                for name in files:
                    local = os.path.join(dirpath, name)
                    fs.put(local, posixpath.join(root, os.path.relpath(local, self.local_dir)))

    def close(self) -> None:
        if not self.enabled:
            return
        self.sync()
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._remote:
            shutil.rmtree(self.local_dir, ignore_errors=True)
