"""The run directory's guarantees (issue #11): a refused resume changes nothing and says which key differs,
another dataset or tokenizer is refused, one trainer per run dir (a crashed one leaves no stuck lock), the
tokenizer is checked at start-up and copied into the run, non-finite state is never saved, timed
checkpoints, worker logs, torn metrics lines and TensorBoard after a resume, progress in log files."""

import json
import logging
import os
import re
import subprocess
import sys
import time

import fsspec
import pytest

from agentlm_jax.config import load_config
from agentlm_jax.errors import ConfigError, MissingInputError
from agentlm_jax.training import run_dir as rd
from agentlm_jax.training.checkpointing import Checkpointer
from agentlm_jax.training.metrics import MetricsWriter
from agentlm_jax.training.trainer import Trainer, TrainingDivergedError
from tests.helpers.training import metrics, tiny_config, write_dataset


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir, compilation_cache):
    """A finished 2-step run."""
    run = str(tmp_path_factory.mktemp("run"))
    Trainer(tiny_config(data_dir, run, "steps=2", "logging.eval_every_steps=-1")).run()
    return run


def _edit_manifest(src: str, dst: str, edit) -> str:
    fs = fsspec.filesystem("file")
    fs.copy(src, dst, recursive=True)
    with open(f"{dst}/manifest.json") as f:
        manifest = json.load(f)
    edit(manifest)
    with open(f"{dst}/manifest.json", "w") as f:
        json.dump(manifest, f)
    return dst


def test_a_refused_resume_names_the_key_and_writes_nothing(finished, data_dir):
    def times():  # the lock file is the lock: taking it rewrites its holder's pid
        return {p: os.path.getmtime(os.path.join(finished, p)) for p in os.listdir(finished) if p != rd.LOCAL_LOCK}

    before = times()
    config_text = open(f"{finished}/config.yaml").read()
    with pytest.raises(ConfigError, match=r"cannot resume .* data\.global_batch is 16 but the run was trained with "
                                          r"8 \(set data\.global_batch=8 to continue it\).*Nothing was written"):
        Trainer(tiny_config(data_dir, finished, "steps=4", "data.global_batch=16"))
    assert open(f"{finished}/config.yaml").read() == config_text
    assert times() == before


def test_a_resume_on_data_tokenized_differently_is_refused(finished, data_dir, tmp_path):
    other = _edit_manifest(data_dir, str(tmp_path / "other-tokenizer"),
                           lambda m: m["tokenizer"].update(sha256="f" * 64))
    with pytest.raises(ConfigError, match="tokenized with another tokenizer"):
        Trainer(tiny_config(other, finished, "steps=4"))
    rebuilt = _edit_manifest(data_dir, str(tmp_path / "other-data"), lambda m: m.update(splits={"train": {"n": 1}}))
    with pytest.raises(ConfigError, match="is not the one the run was trained on"):
        Trainer(tiny_config(rebuilt, finished, "steps=4"))


def test_a_moved_dataset_resumes(finished, data_dir, tmp_path):
    moved = _edit_manifest(data_dir, str(tmp_path / "moved"), lambda m: None)
    trainer = Trainer(tiny_config(moved, finished, "steps=2"))  # same identity: accepted (nothing to train)
    assert trainer.identity == rd.data_identity(json.load(open(f"{data_dir}/manifest.json")))
    trainer.checkpointer.close()
    trainer._release_lock()


def test_the_tokenizer_is_checked_at_start_up_and_copied_into_the_run(finished, data_dir, tmp_path):
    broken = _edit_manifest(data_dir, str(tmp_path / "no-tokenizer"),
                            lambda m: m["tokenizer"].update(path=str(tmp_path / "gone")))
    with pytest.raises(MissingInputError, match="tokenizer .*gone cannot be loaded"):
        Trainer(tiny_config(broken, str(tmp_path / "run"), "steps=2"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
    assert sorted(os.listdir(f"{finished}/{rd.TOKENIZER_SUBDIR}"))
    with Checkpointer(f"{finished}/checkpoints", read_only=True) as ckpt:
        info = ckpt.run_info()
    assert info["tokenizer_path"] == f"{finished}/{rd.TOKENIZER_SUBDIR}" and info["data_identity"]["data_sha256"]


def test_one_trainer_per_run_dir(data_dir, tmp_path):
    run = str(tmp_path / "run")
    first = Trainer(tiny_config(data_dir, run, "steps=2"))
    with pytest.raises(rd.RunInUseError, match=rf"in use by another trainer \(pid {os.getpid()} .*choose another "
                                               r"run_dir"):
        Trainer(tiny_config(data_dir, run, "steps=2"))
    first.checkpointer.close()
    first._release_lock()
    Trainer(tiny_config(data_dir, run, "steps=2"))._release_lock()


def test_a_killed_trainer_leaves_no_stuck_lock(tmp_path):
    code = ("import sys, time; from agentlm_jax.training.run_dir import RunLock; "
            f"RunLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(rd.RunInUseError, match=f"pid {proc.pid}"):
        rd.RunLock(str(tmp_path)).acquire()
    proc.kill()
    proc.wait()
    rd.RunLock(str(tmp_path)).acquire().release()


def test_a_remote_lease_is_exclusive_until_it_goes_stale(monkeypatch, caplog):
    monkeypatch.setattr(rd, "LEASE_HEARTBEAT_S", 0.05)
    run = f"memory://lease-test-{time.time_ns()}"
    holder = rd.RunLock(run).acquire()
    with pytest.raises(rd.RunInUseError, match="in use by another trainer"):
        rd.RunLock(run).acquire()
    holder._stop.set()  # the holder dies: no more heartbeats
    holder._thread.join()
    fs, path = rd._join(run, rd.REMOTE_LEASE)
    lease = json.loads(fs.cat_file(path))
    fs.pipe_file(path, json.dumps({**lease, "heartbeat": time.time() - rd.LEASE_STALE_S - 1}).encode())
    with caplog.at_level(logging.WARNING):
        taker = rd.RunLock(run).acquire()
    assert "taking over the lease" in caplog.text
    taker.release()
    assert not fs.exists(path)


def test_non_finite_state_is_never_saved(data_dir, tmp_path, compilation_cache, caplog):
    """float16 parameters and a huge step: the first update overflows to Inf while the step's loss (of the
    parameters before it) is finite; the save refuses it and there is no good checkpoint to name."""
    run = str(tmp_path / "run")
    cfg = tiny_config(data_dir, run, "steps=1", "model.param_dtype=float16", "model.dtype=float16",
                      "optimizer.learning_rate=1e6", "optimizer.warmup_fraction=0", "optimizer.clip_norm=0",
                      "logging.eval_every_steps=-1")
    with caplog.at_level(logging.ERROR), pytest.raises(TrainingDivergedError, match="hold NaN/Inf .* not saved"):
        Trainer(cfg).run()
    assert "no good checkpoint" in caplog.text
    with Checkpointer(f"{run}/checkpoints", read_only=True) as ckpt:
        assert ckpt.all_steps() == []


@pytest.mark.parametrize("override, key", [("optimizer.learning_rate=1e39", "optimizer.learning_rate"),
                                           ("optimizer.eps=.nan", "optimizer.eps"),
                                           ("optimizer.b2=1.0", "b2")])
def test_config_numbers_are_checked(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_timed_checkpoints_worker_logs_and_plain_progress(data_dir, tmp_path, compilation_cache, caplog):
    run = str(tmp_path / "run")
    cfg = tiny_config(data_dir, run, "steps=3", "checkpoint.every_steps=100", "checkpoint.keep=5",
                      "checkpoint.every_minutes=1e-6", "logging.progress_bar=true", "logging.eval_every_steps=-1")
    with caplog.at_level(logging.INFO):
        Trainer(cfg).run()
    with Checkpointer(f"{run}/checkpoints", read_only=True) as ckpt:
        assert ckpt.all_steps() == [1, 2, 3], "every step is more than a microsecond after the last save"
    logs = os.listdir(f"{run}/{rd.LOGS_SUBDIR}")
    assert len(logs) == 1 and logs[0].endswith("-worker0.log")
    text = open(f"{run}/{rd.LOGS_SUBDIR}/{logs[0]}").read()
    assert "step 3: loss" in text and "\r" not in text
    assert re.search(r"checkpoint of step 3 written in [\d.]+ s \([\d.]+ GB from this host: [\d.]+ GB/s\)",
                     caplog.text), "each save reports its duration and bandwidth"
    progress = [r.getMessage() for r in caplog.records if r.name == "agentlm_jax.progress"]
    assert progress and progress[-1].startswith("train: 3/3 step (100%)"), "off a terminal: plain lines"


def test_a_torn_metrics_line_does_not_block_a_resume(tmp_path, caplog):
    lines = [json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines) + '{"step": 4, "lo')
    with caplog.at_level(logging.WARNING):
        MetricsWriter(str(tmp_path), enabled=True, tensorboard=False, resume_step=2).close()
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2]
    assert "dropped 1 unreadable line" in caplog.text


def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    writer = MetricsWriter(str(tmp_path), enabled=True, tensorboard=True)
    for step in range(1, 11):
        writer.write(step, {"loss": float(step)})
    writer.close()
    time.sleep(1.1)  # event files are ordered by their names' timestamps
    writer = MetricsWriter(str(tmp_path), enabled=True, tensorboard=True, resume_step=5)
    for step in range(6, 9):
        writer.write(step, {"loss": 100.0 + step})
    writer.close()
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 106),
                                                               (7, 107), (8, 108)]


def test_a_workers_log_reaches_a_gcs_run_dir_on_each_sync(gcs):
    run = f"{gcs}/worker-log-test"
    handler = rd.WorkerLog(run, process_index=3)
    record = logging.LogRecord("agentlm_jax.training.trainer", logging.INFO, __file__, 1, "step %d: loss 1.5", (7,),
                               None)
    handler.emit(record)
    handler.sync()
    fs, root = fsspec.core.url_to_fs(f"{run}/{rd.LOGS_SUBDIR}")
    [path] = fs.ls(root, detail=False)
    assert path.endswith("-worker3.log") and b"step 7: loss 1.5" in fs.cat_file(path)
    handler.emit(record)
    handler.close()  # the last lines are uploaded too
    assert fs.cat_file(path).count(b"step 7") == 2


def test_a_wall_clock_interval_is_due_once_per_interval(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(rd.time, "monotonic", lambda: now[0])
    every = rd.Every(60.0)
    assert not every.due()
    now[0] += 61
    assert every.due() and not every.due()
    assert not rd.Every(None).due() and not rd.Every(0).due()


def test_the_sample_dataset_is_rebuilt_over_a_failed_builds_leftovers(tmp_path, monkeypatch):
    from agentlm_jax.training.trainer import prepare_dataset
    from data_pipeline.formats.dataset import SAMPLE_DATASET_DIR, has_manifest

    monkeypatch.chdir(tmp_path)
    os.makedirs(SAMPLE_DATASET_DIR)
    (tmp_path / SAMPLE_DATASET_DIR / "train-00000-of-00004.tfrecord").write_bytes(b"cut short")
    assert prepare_dataset(SAMPLE_DATASET_DIR) == SAMPLE_DATASET_DIR and has_manifest(SAMPLE_DATASET_DIR)
