"""Evaluation inside the training loop (eval.*): results in metrics.jsonl and TensorBoard at the due steps,
the training itself unchanged by it (same losses, same parameters), a failure logged and retried, never fatal."""

import fsspec
import jax
import numpy as np
import pytest

from agentlm_jax.evaluation.in_loop import InLoopEvaluator
from agentlm_jax.training.checkpointing import load_model_params
from agentlm_jax.training.trainer import Trainer
from data_pipeline.formats import records
from data_pipeline.formats.tokenizer import SAMPLE_TOKENIZER_DIR
from tests.helpers.training import metrics, tiny_config, write_dataset

# dbbench's prompts (the instruction and the table) need more positions than the trainer tests' tiny model has.
EVAL = ("model.max_position_embeddings=2048", "eval.suites=[actions,dbbench]", "eval.max_items=2",
        "eval.max_new_tokens=6")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("data")), tokenizer_path=SAMPLE_TOKENIZER_DIR)


@pytest.fixture(scope="module")
def without_eval(tmp_path_factory, data_dir, compilation_cache):
    run_dir = str(tmp_path_factory.mktemp("no-eval"))
    Trainer(tiny_config(data_dir, run_dir, *EVAL, "eval.every_steps=-1")).run()
    return run_dir


def losses(run_dir):
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def params(run_dir):
    return jax.tree.leaves(jax.device_get(load_model_params(run_dir)[1].to_pure_dict()))


def test_in_loop_evaluation_is_logged_and_does_not_change_training(without_eval, data_dir, tmp_path):
    run_dir = str(tmp_path / "eval")
    result = Trainer(tiny_config(data_dir, run_dir, *EVAL, "eval.every_steps=4")).run()
    evals = [r for r in metrics(run_dir) if "eval/seconds" in r]
    assert [r["step"] for r in evals] == [4, 6]  # every 4 steps, and at the end
    for r in evals:
        assert r["eval/dbbench/episodes"] == 2 and 0 <= r["eval/dbbench/success"] <= 1
        assert r["eval/dbbench/seconds"] > 0
        assert r["eval/dbbench/invalid_format_rate"] == 1.0  # generated (a random model writes no valid action)
    assert result.agent_eval == {k: v for k, v in evals[-1].items() if k.startswith("eval/")}
    assert not any(k.startswith("eval/") for r in metrics(run_dir) if "loss" in r for k in r)

    assert losses(run_dir) == losses(without_eval)
    for a, b in zip(params(run_dir), params(without_eval)):
        np.testing.assert_array_equal(a, b)

    tags = set()
    for path in fsspec.open_files(f"{run_dir}/tensorboard/events.out.tfevents.*"):
        from tensorboard.compat.proto import event_pb2

        with path as f:
            for raw in records.iter_tfrecord(f, path.path):
                tags |= {(v.tag, event.step) for event in [event_pb2.Event.FromString(raw)] for v in event.summary.value}
    assert ("eval/dbbench/success", 4) in tags and ("eval/dbbench/success", 6) in tags


def test_a_failing_evaluation_is_logged_and_retried_and_training_goes_on(without_eval, data_dir, tmp_path,
                                                                         monkeypatch, caplog):
    calls = []
    real = InLoopEvaluator.__call__

    def flaky(self, model, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("decode exploded")
        return real(self, model, **kw)

    monkeypatch.setattr(InLoopEvaluator, "__call__", flaky)
    run_dir = str(tmp_path / "flaky")
    result = Trainer(tiny_config(data_dir, run_dir, *EVAL, "eval.every_steps=2", "eval.suites=[dbbench]")).run()
    assert result.status == "finished" and result.step == 6
    assert len(calls) == 3 and result.eval_failures == 1
    assert "the in-loop evaluation failed (RuntimeError: decode exploded)" in caplog.text
    rows = metrics(run_dir)
    assert [r["step"] for r in rows if "eval/failures" in r] == [2]
    assert [r["step"] for r in rows if "eval/seconds" in r] == [4, 6]
    assert losses(run_dir) == losses(without_eval)


def test_eval_config_is_checked():
    from agentlm_jax.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"eval.suites: unknown suite\(s\) \['mmlu'\]"):
        load_config(None, ["eval.suites=[actions,mmlu]"])
    with pytest.raises(ConfigError, match="eval.every_steps must be >= -1"):
        load_config(None, ["eval.every_steps=-2"])


def test_in_loop_evaluation_of_a_lora_run_generates_with_base_and_adapters(data_dir, tmp_path, monkeypatch):
    seen = []
    real = InLoopEvaluator.__call__

    def spy(self, model, **kw):
        seen.append(model)
        return real(self, model, **kw)

    monkeypatch.setattr(InLoopEvaluator, "__call__", spy)
    run_dir = str(tmp_path / "lora")
    result = Trainer(tiny_config(data_dir, run_dir, *EVAL, "eval.suites=[dbbench]", "eval.every_steps=0",
                                 "lora.enabled=true", "lora.rank=4", "lora.base_dtype=float32")).run()
    assert result.eval_failures == 0 and result.agent_eval["eval/dbbench/episodes"] == 2
    from flax import nnx

    from agentlm_jax.model.lora import TARGET_KERNELS, adapter_name

    layers = nnx.state(seen[0]).to_pure_dict()["layers"]
    module, kernel = TARGET_KERNELS["q"]
    assert adapter_name("q") in layers[module] and kernel in layers[module]  # the base and its adapter
    assert [r["step"] for r in metrics(run_dir) if "eval/seconds" in r] == [6]  # every_steps=0: only at the end
