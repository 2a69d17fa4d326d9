"""`python -m agentlm_jax.train` as a user meets it: the help text, clean `error: ...` exits for runs that cannot
start, and the trainer's log lines (throughput without evaluation/checkpoint pauses, process 0 only)."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

from agentlm_jax import distributed, train
from agentlm_jax.training.checkpointing import Checkpointer
from agentlm_jax.hf.config import to_hf
from agentlm_jax.training import metrics as metrics_lib
from agentlm_jax.training.trainer import Trainer
from tests.helpers.training import TINY_MODEL, metrics, tiny_config, tiny_config_args, write_dataset


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("data")))


@pytest.fixture
def restore_logging():
    """main() configures the root logger (basicConfig(force=True)): give the next tests theirs back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)


def cli_error(argv: list[str]) -> str:
    """The message main() exits with (exit status 1 for a string), failing if it ends any other way."""
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: "), e.value.code
    return e.value.code


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("overrides, expected", [
    (["mesh.data=-1", "mesh.fsdp=-1"], r"mesh.data and mesh.fsdp are both -1 .*at most one axis may be -1"),
    (["mesh.tensor=0"], r"mesh.tensor=0: a mesh axis size must be a positive number of devices, or -1"),
    (["mesh.tensor=3"], r"8 devices cannot be split .*set mesh.data, mesh.fsdp and mesh.tensor"),
    (["data.global_batch=4"], r"cannot be split over the 8 devices .*fewer devices on the batch axes .*mesh.tensor"),
])
def test_a_mesh_that_does_not_fit_is_a_clean_error(data_dir, tmp_path, overrides, expected):
    message = cli_error([*tiny_config_args(data_dir, str(tmp_path / "run")), *overrides])
    assert re.search(expected, message), message
    assert not (tmp_path / "run").exists(), "refused before anything was written"


@pytest.mark.usefixtures("restore_logging")
def test_a_missing_dataset_is_a_clean_error(data_dir, tmp_path):
    message = cli_error([*tiny_config_args(data_dir, str(tmp_path / "run")), f"data.path={tmp_path}/nowhere"])
    assert "no dataset at" in message and "python -m data_pipeline.build" in message


@pytest.mark.usefixtures("restore_logging")
def test_existing_checkpoints_without_resume_are_a_clean_error_before_anything_is_written(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    with Checkpointer(str(run_dir / "checkpoints"), async_save=False) as ckpt:
        ckpt.save(4, SimpleNamespace(params={"w": np.zeros(2)}, opt_state={"m": np.zeros(2)}, step=np.int32(4)))
    message = cli_error([*tiny_config_args(data_dir, str(run_dir)), "checkpoint.resume=false"])
    assert "already has checkpoints (latest step 4)" in message and "checkpoint.resume=true" in message
    assert not (run_dir / "config.yaml").exists(), "the existing run's config.yaml was overwritten"


@pytest.mark.usefixtures("restore_logging")
def test_init_from_problems_are_clean_errors(data_dir, tmp_path):
    args = tiny_config_args(data_dir, str(tmp_path / "run"))
    assert "no config.json" in cli_error([*args, f"init_from={tmp_path}"])
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(to_hf(TINY_MODEL.replace(num_kv_heads=4))))
    message = cli_error([*args, f"init_from={hf_dir}"])
    assert "num_kv_heads: config.json has 4, the given config 2" in message
    assert "Set the model section of your config to the checkpoint's config.json values" in message
    assert "drop it" not in message


def test_the_command_exits_1_with_one_error_line_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "agentlm_jax.train", "mesh.fsdp=-1", "mesh.tensor=-1",
                           f"run_dir={tmp_path}/run"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: mesh.fsdp and mesh.tensor are both -1")


# ------------------------------------------------------------------------------------------- the log lines
PAUSE_S = 1000.0


def test_evaluation_and_checkpoint_time_is_not_in_the_next_steps_throughput(data_dir, tmp_path, monkeypatch,
                                                                            caplog, compilation_cache):
    """Saves (every 2 steps) and evaluations (every 3) are made slow on the throughput's clock (each moves it
    on by PAUSE_S: no real sleep, so a loaded machine cannot blur the result); every logged step after the
    first (which reports its compile time apart) must still show a training step's time, far below a pause."""
    offset = [0.0]
    monkeypatch.setattr(metrics_lib, "time", SimpleNamespace(perf_counter=lambda: time.perf_counter() + offset[0],
                                                             time=time.time))

    def slowed(method):
        def run(self, *args):
            offset[0] += PAUSE_S
            return method(self, *args)
        return run

    monkeypatch.setattr(Trainer, "save", slowed(Trainer.save))
    monkeypatch.setattr(Trainer, "evaluate", slowed(Trainer.evaluate))
    run_dir = str(tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="agentlm_jax.training.trainer"):
        Trainer(tiny_config(data_dir, run_dir)).run()
    steps = {r["step"]: r for r in metrics(run_dir) if "loss" in r}
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    assert "first_step_s" in steps[1] and "tokens_per_s" not in steps[1]
    step_s = {s: steps[s]["step_s"] for s in range(2, 7)}
    assert all(t < PAUSE_S / 2 for t in step_s.values()), f"a pause counted as training time: {step_s}"
    assert any("step 4: loss" in r.getMessage() for r in caplog.records)  # process 0 logs its steps


def test_only_process_0_logs_steps_and_validation(data_dir, tmp_path, monkeypatch, caplog, compilation_cache):
    monkeypatch.setattr(distributed, "is_main_process", lambda: False)
    with caplog.at_level(logging.INFO, logger="agentlm_jax"):
        Trainer(tiny_config(data_dir, str(tmp_path / "run"), "steps=3")).run()
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert not [line for line in lines if line.startswith(("step ", "first step", "model:"))], lines
