"""LoRA runs of the trainer end to end (8 simulated devices, fsdp): checkpoints hold the adapters, optimizer state
and the base's reference and content hash; an interrupted run resumes to the identical result; a resume over
another base is refused; the run ends with a merged HF export and a PEFT adapter, which `agentlm_jax.export`
reproduces from the checkpoint bit for bit."""

import jax
import numpy as np
import pytest

from agentlm_jax import distributed, export
from agentlm_jax.errors import ConfigError
from agentlm_jax.training.checkpointing import Checkpointer
from agentlm_jax.training.trainer import Trainer
from data_pipeline.formats.tokenizer import SAMPLE_TOKENIZER_DIR
from tests.helpers.hf import assert_bit_identical, hf_tensors, make_hf_model, save_hf_model
from tests.helpers.training import TINY_MODEL, metrics, tiny_config, write_dataset

LORA_ARGS = ("lora.enabled=true", "lora.rank=4", "lora.alpha=8", "lora.base_dtype=float32",
             "lora.targets=[q,v,o,down]", "optimizer.learning_rate=3e-2")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("data")), train=120, validation=12,
                         tokenizer_path=SAMPLE_TOKENIZER_DIR)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Two HF base checkpoints of the tiny architecture with different weights."""
    out = []
    for seed in (0, 1):
        out.append(save_hf_model(make_hf_model(TINY_MODEL, seed=seed), tmp_path_factory.mktemp(f"base{seed}")))
    return out


def lora_config(data_dir, run_dir, base, *extra):
    return tiny_config(data_dir, run_dir, *LORA_ARGS, f"init_from={base}", *extra)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir, bases, compilation_cache):
    run_dir = str(tmp_path_factory.mktemp("lora-reference"))
    result = Trainer(lora_config(data_dir, run_dir, bases[0], "export.enabled=true", "export.dtype=float32")).run()
    return run_dir, result


def checkpoint_params(run_dir, step=None):
    with Checkpointer(f"{run_dir}/checkpoints", read_only=True) as ckpt:
        step = step or ckpt.latest_step()
        info = ckpt.run_info(step)
        import orbax.checkpoint as ocp

        restored = ckpt.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(),
                                                                      optimizer=ocp.args.StandardRestore()))
    return info, jax.device_get(restored["params"]), jax.device_get(restored["optimizer"])


def test_a_lora_run_checkpoints_adapters_and_exports_merged_and_peft(reference, bases, tmp_path):
    run_dir, result = reference
    losses = [r["loss"] for r in metrics(run_dir) if "loss" in r]
    assert result.status == "finished" and losses[-1] < losses[0] - 0.02, losses
    info, params, opt = checkpoint_params(run_dir)
    # the checkpoint: adapters and their optimizer state only, plus the base's reference and content hash
    assert set(params["layers"]) == {"attn", "mlp"}
    assert set(params["layers"]["attn"]) == {"q_proj_lora", "v_proj_lora", "o_proj_lora"}
    assert set(params["layers"]["mlp"]) == {"down_proj_lora"}
    adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(opt) if hasattr(x, "nbytes"))
    assert opt_bytes < 2 * adapter_bytes + 1024
    base = info["lora_base"]
    assert base["init_from"] == bases[0] and base["base_dtype"] == "float32" and len(base["sha256"]) == 64
    # the run's exports, and the same from the checkpoint with `python -m agentlm_jax.export`
    merged, adapter = hf_tensors(result.export_path), hf_tensors(f"{run_dir}/adapter")
    assert "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight" in adapter
    export.main(["--checkpoint", run_dir, "--output", str(tmp_path / "merged"), "--dtype", "float32"])
    assert_bit_identical(hf_tensors(tmp_path / "merged"), merged)
    export.main(["--checkpoint", run_dir, "--output", str(tmp_path / "peft"), "--peft"])
    assert_bit_identical(hf_tensors(tmp_path / "peft"), adapter)
    # the merged export is not the base: the adapters were merged in
    original = hf_tensors(bases[0])
    delta = (merged["model.layers.0.self_attn.v_proj.weight"] - original["model.layers.0.self_attn.v_proj.weight"])
    assert float(delta.abs().max()) > 1e-4
    assert float((merged["model.layers.0.mlp.up_proj.weight"] - original["model.layers.0.mlp.up_proj.weight"]
                  ).abs().max()) == 0.0, "up is not a target: unchanged"


def test_an_interrupted_lora_run_resumes_to_the_identical_result(reference, data_dir, bases, tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")
    monkeypatch.setattr(distributed.PreemptionWatch, "stop_requested", lambda self, s: s == 3)
    first = Trainer(lora_config(data_dir, run_dir, bases[0])).run()
    assert (first.status, first.step) == ("preempted", 3)
    monkeypatch.undo()
    second = Trainer(lora_config(data_dir, run_dir, bases[0])).run()
    assert (second.status, second.step) == ("finished", 6)
    losses = lambda d: {r["step"]: r["loss"] for r in metrics(d) if "loss" in r}  # noqa: E731
    assert losses(run_dir) == losses(reference[0])
    for a, b in zip(jax.tree.leaves(checkpoint_params(run_dir)[1:]), jax.tree.leaves(checkpoint_params(reference[0])[1:])):
        np.testing.assert_array_equal(a, b)
    # over another base the adapters mean nothing: refused, naming the base
    with pytest.raises(ConfigError, match="trained over the base"):
        Trainer(lora_config(data_dir, run_dir, bases[1], "steps=8")).run()
    # and other LoRA settings are refused before anything is loaded
    with pytest.raises(ConfigError, match="lora.rank"):
        Trainer(lora_config(data_dir, run_dir, bases[0], "steps=8", "lora.rank=8"))


def test_an_interrupted_run_with_dropout_resumes_to_the_identical_result(reference, data_dir, bases, tmp_path,
                                                                         monkeypatch):
    """lora.dropout > 0 through the trainer: the masks come from (seed, step), so an interrupted and resumed run
    equals an uninterrupted one bit for bit, and differs from the run without dropout."""
    drop = ("lora.dropout=0.2",)
    whole = str(tmp_path / "whole")
    assert Trainer(lora_config(data_dir, whole, bases[0], *drop)).run().status == "finished"
    run_dir = str(tmp_path / "run")
    monkeypatch.setattr(distributed.PreemptionWatch, "stop_requested", lambda self, s: s == 3)
    assert Trainer(lora_config(data_dir, run_dir, bases[0], *drop)).run().step == 3
    monkeypatch.undo()
    assert Trainer(lora_config(data_dir, run_dir, bases[0], *drop)).run().step == 6
    losses = lambda d: {r["step"]: r["loss"] for r in metrics(d) if "loss" in r}  # noqa: E731
    assert losses(run_dir) == losses(whole)
    for a, b in zip(jax.tree.leaves(checkpoint_params(run_dir)[1:]), jax.tree.leaves(checkpoint_params(whole)[1:])):
        np.testing.assert_array_equal(a, b)
    assert losses(reference[0]) != losses(whole), "dropout changed the training"
