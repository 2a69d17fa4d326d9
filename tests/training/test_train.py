"""The training loop end to end (8 simulated devices, fsdp): outputs of a run, exact resume after an
interruption (in process, and a real SIGTERM to `python -m agentlm_jax.train`), NaN stop, gs:// data and run
dirs, HF init and export, multi-host detection.

Exactness: an interrupted and resumed run ends bit-identical to an uninterrupted one (same parameters, same
per-step losses, hence the same data order): the same compiled step runs on the same batches, and
checkpoints restore float32 state exactly.
"""

import os
import signal
import subprocess
import sys

import fsspec
import jax
import numpy as np
import pytest

from agentlm_jax import distributed
from agentlm_jax.training import trainer
from agentlm_jax.training.checkpointing import Checkpointer, load_model_params
from agentlm_jax.config import load_config, to_dict
from agentlm_jax.training.metrics import MetricsWriter
from agentlm_jax.training.trainer import EXIT_PREEMPTED, Trainer, TrainingDivergedError
from data_pipeline.formats import records
from data_pipeline.formats.tokenizer import SAMPLE_TOKENIZER_DIR
from tests.helpers.training import TASKS, TINY_MODEL, metrics, tiny_config, tiny_config_args, write_dataset
STEPS = 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("data")), tokenizer_path=SAMPLE_TOKENIZER_DIR)


def step_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def final_params(run_dir):
    return jax.device_get(load_model_params(run_dir)[1].to_pure_dict())


def assert_identical_runs(run_dir, reference_dir):
    assert step_losses(run_dir) == step_losses(reference_dir), "per-step losses (and so the data order) differ"
    for a, b in zip(jax.tree.leaves(final_params(run_dir)), jax.tree.leaves(final_params(reference_dir))):
        np.testing.assert_array_equal(a, b)


def stop_at(monkeypatch, step):
    """Make the run behave as if SIGTERM arrived during `step` (the real signal is tested in a subprocess)."""
    monkeypatch.setattr(distributed.PreemptionWatch, "stop_requested", lambda self, s: s == step)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir, compilation_cache):
    """An uninterrupted run, exported (float32, so the export can be compared exactly)."""
    run_dir = str(tmp_path_factory.mktemp("reference"))
    result = Trainer(tiny_config(data_dir, run_dir, "export.enabled=true", "export.dtype=float32")).run()
    return run_dir, result


def test_a_run_logs_evaluates_checkpoints_and_exports(reference, data_dir):
    run_dir, result = reference
    assert result.status == "finished" and result.step == STEPS
    assert load_config(f"{run_dir}/config.yaml") == tiny_config(data_dir, run_dir, "export.enabled=true",
                                                                 "export.dtype=float32")
    records_ = metrics(run_dir)
    train = [r for r in records_ if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for key in ("agent_loss", "general_loss", "learning_rate", "grad_norm", "loss_tokens"):
        assert all(key in r for r in train), key
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] for r in train[1:]) and "first_step_s" in train[0]
    assert train[-1]["loss"] < train[0]["loss"] - 0.05, "the loss should fall"
    evals = [r for r in records_ if "val/loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert all(f"val/loss/{task}" in evals[-1] for task in TASKS) and evals[-1]["val/loss"] < evals[0]["val/loss"]
    assert result.validation == {k: v for k, v in evals[-1].items() if k.startswith("val/")}

    with Checkpointer(f"{run_dir}/checkpoints", read_only=True) as ckpt:
        assert ckpt.all_steps() == [4, 6], "every 2 steps, the last 2 kept"
        assert ckpt.run_info()["config"] == to_dict(load_config(f"{run_dir}/config.yaml"))

    tensorboard_scalars = {}
    for path in fsspec.open_files(f"{run_dir}/tensorboard/events.out.tfevents.*"):
        from tensorboard.compat.proto import event_pb2

        with path as f:
            for raw in records.iter_tfrecord(f, path.path):
                event = event_pb2.Event.FromString(raw)
                for v in event.summary.value:
                    tensorboard_scalars[(v.tag, event.step)] = v.simple_value
    assert tensorboard_scalars[("loss", STEPS)] == pytest.approx(train[-1]["loss"])
    assert ("val/loss/db", 6) in tensorboard_scalars

    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(result.export_path)
    kernel = final_params(run_dir)["lm_head"]["kernel"]
    np.testing.assert_array_equal(hf.lm_head.weight.detach().numpy().T, kernel)
    assert transformers.AutoTokenizer.from_pretrained(result.export_path).vocab_size == TINY_MODEL.vocab_size


def test_an_interrupted_run_resumes_to_the_identical_result(reference, data_dir, tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")
    stop_at(monkeypatch, 3)
    first = Trainer(tiny_config(data_dir, run_dir)).run()
    assert (first.status, first.step) == ("preempted", 3)
    monkeypatch.undo()
    second = Trainer(tiny_config(data_dir, run_dir)).run()
    assert (second.status, second.step) == ("finished", STEPS)
    assert_identical_runs(run_dir, reference[0])


def test_sigterm_saves_a_checkpoint_and_the_rerun_finishes_identically(reference, data_dir, tmp_path,
                                                                        compilation_cache):
    run_dir = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-m", "agentlm_jax.train", *tiny_config_args(data_dir, run_dir)],
                            env=compilation_cache, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = []
    for line in proc.stderr:  # SIGTERM once the handler is in place (the loop is about to start)
        log.append(line)
        if "agentlm_jax.training.trainer: model:" in line:
            proc.send_signal(signal.SIGTERM)
            break
    log.extend(proc.stderr)
    assert proc.wait(timeout=120) == EXIT_PREEMPTED, "".join(log[-30:])
    stopped_at = max(step_losses(run_dir))
    assert stopped_at < STEPS and Checkpointer(f"{run_dir}/checkpoints", read_only=True).latest_step() == stopped_at
    assert any("stopped at step" in line for line in log)

    Trainer(tiny_config(data_dir, run_dir)).run()  # rerunning the same command resumes
    assert_identical_runs(run_dir, reference[0])


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, compilation_cache):
    run_dir = str(tmp_path / "run")
    cfg = tiny_config(data_dir, run_dir, "optimizer.learning_rate=1e30", "optimizer.clip_norm=0",
                      "checkpoint.every_steps=1", "optimizer.warmup_fraction=0")
    with pytest.raises(TrainingDivergedError, match=r"step 2: loss .*(nan|inf).*diverged. Nothing from this step was saved"):
        Trainer(cfg).run()
    with Checkpointer(f"{run_dir}/checkpoints", read_only=True) as ckpt:
        assert ckpt.all_steps() == [1]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(final_params(run_dir)))


@pytest.mark.slow  # ~1 min: the emulator serves one request at a time (~30 ms); a run makes ~1,500
def test_data_and_run_dir_on_gcs(reference, gcs, monkeypatch):
    """The whole loop on gs:// (data, checkpoints, metrics), preempted and resumed, ending identical to the
    local run. (The default run covers gs:// data + checkpoints in test_checkpoint.py and the metrics upload
    below.) ocdbt=false: orbax's OCDBT format needs object generations on reads; the emulator has none."""
    data = write_dataset(f"{gcs}/train-test-data")
    cfg = tiny_config(data, f"{gcs}/train-test-run", "checkpoint.ocdbt=false", "checkpoint.every_steps=3",
                      "checkpoint.keep=3", "logging.eval_every_steps=0")
    stop_at(monkeypatch, 3)
    assert Trainer(cfg).run().status == "preempted"
    monkeypatch.undo()
    assert Trainer(cfg).run().status == "finished"
    assert_identical_runs(cfg.run_dir, reference[0])
    fs, root = fsspec.core.url_to_fs(cfg.run_dir)
    assert fs.exists(f"{root}/config.yaml") and fs.ls(f"{root}/tensorboard")


def test_metrics_of_a_gcs_run_dir_are_uploaded_and_trimmed_on_resume(gcs):
    run_dir = f"{gcs}/metrics-test"
    writer = MetricsWriter(run_dir, enabled=True, tensorboard=True)
    for step in (1, 2, 3):
        writer.write(step, {"loss": float(step)})
    writer.sync()
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3]
    writer.close()
    resumed = MetricsWriter(run_dir, enabled=True, tensorboard=True, resume_step=2)  # steps after 2 are redone
    resumed.write(3, {"loss": 30.0})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in metrics(run_dir)] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    fs, root = fsspec.core.url_to_fs(run_dir)
    assert len(fs.ls(f"{root}/tensorboard")) == 2, "one event file per attempt"


def test_init_from_a_hugging_face_directory(reference, data_dir, tmp_path):
    run_dir, result = reference
    t = Trainer(tiny_config(data_dir, str(tmp_path / "run"), f"init_from={result.export_path}"))
    state = t.initial_state()
    t.train_data.close()
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(final_params(run_dir))):
        np.testing.assert_array_equal(a, b)
    assert int(state.step) == 0
    with pytest.raises(FileNotFoundError, match="init_from=.*no config.json"):
        Trainer(tiny_config(data_dir, str(tmp_path / "run2"), f"init_from={tmp_path}")).initial_state()


def test_a_finished_run_refuses_to_start_over_unless_resuming(reference, data_dir):
    with pytest.raises(FileExistsError, match="already has checkpoints .* checkpoint.resume=true"):
        Trainer(tiny_config(data_dir, reference[0], "checkpoint.resume=false")).run()


@pytest.mark.parametrize("env, mode, expected", [
    ({}, "auto", False), ({}, "on", True), ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"}, "auto", True),
    ({"SLURM_NTASKS": "4"}, "auto", True), ({"SLURM_NTASKS": "1"}, "auto", False),
    ({"TPU_WORKER_HOSTNAMES": "a,b"}, "off", False), ({"TPU_ACCELERATOR_TYPE": "v4-32"}, "auto", True),
])
def test_multi_host_initialisation_is_detected_from_the_environment(monkeypatch, env, mode, expected):
    for key in (*distributed._CLUSTER_ENV, *distributed._COUNT_ENV, "TPU_ACCELERATOR_TYPE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(distributed.os.path, "exists", lambda p: False)  # not a TPU VM
    assert distributed.should_initialize(mode) is expected


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no dataset at .*python -m data_pipeline.build"):
        trainer.prepare_dataset(str(tmp_path / "nowhere"))


@pytest.mark.slow  # ~1 min: builds the sample dataset and trains the demo for 30 steps on one CPU device
def test_the_default_run_builds_the_sample_data_trains_and_exports(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a user has
    proc = subprocess.run([sys.executable, "-m", "agentlm_jax.train", "steps=30", "logging.progress_bar=false"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "data" / "sample" / "manifest.json").exists()
    losses = step_losses(tmp_path / "runs" / "tiny")
    assert losses[30] < losses[1] - 1.0
    assert (tmp_path / "runs" / "tiny" / "hf" / "tokenizer.json").exists()
