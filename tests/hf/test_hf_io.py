"""Hugging Face import/export: loads in `transformers` with no missing keys, round-trips bit-exactly, refuses bad
checkpoints with errors that name the problem, works on gs://."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file as save_numpy

from agentlm_jax import hf
from agentlm_jax.export import main as export_main
from tests.helpers.hf import (TINY, assert_bit_identical, hf_tensors, model_from_params, random_tokens, save_hf_model,
                              single_segment_inputs, torch_logits)
@pytest.fixture(scope="module")
def imported(hf_checkpoints):
    return {name: hf.import_hf(path, show_progress=False) for name, (_, _, path) in hf_checkpoints.items()}


def test_export_loads_in_transformers_without_missing_keys_and_matches(hf_checkpoints, imported, tmp_path):
    cfg, torch_model, source = hf_checkpoints["gqa"]
    _, params = imported["gqa"]
    out = tmp_path / "export"
    index = hf.export_hf(params, cfg, str(out), dtype="float32", max_shard_size="60KB", show_progress=False)

    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    for f in files:  # every shard within the limit unless it is a single larger tensor
        size = os.path.getsize(out / f)
        assert size <= 60_000 + 10_000 or len([n for n, g in index["weight_map"].items() if g == f]) == 1
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"] == index["weight_map"]
    modes = {f: os.stat(out / f).st_mode & 0o777 for f in files}  # readable by a server running as another user
    assert modes == {f: os.stat(out / "config.json").st_mode & 0o777 for f in files} and all(m & 0o044 for m in modes.values())
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == cfg.eos_token_id

    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True,
                                                                     dtype=torch.float32)
    assert isinstance(loaded, transformers.LlamaForCausalLM)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    tokens = random_tokens(cfg, 2, 19, seed=4)
    np.testing.assert_allclose(torch_logits(loaded.eval(), tokens), torch_logits(torch_model, tokens), atol=1e-6)
    assert_bit_identical(hf_tensors(out), hf_tensors(source))  # float32 → float32 is lossless


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_import_export_round_trip_is_bit_exact(hf_checkpoints, tmp_path, dtype):
    cfg, torch_model, _ = hf_checkpoints["mha"]
    source = save_hf_model(torch_model, tmp_path / "source", dtype=dtype, max_shard_size="100KB")
    cfg_in, params = hf.import_hf(source, show_progress=False)
    assert cfg_in == cfg
    hf.export_hf(params, cfg_in, str(tmp_path / "out"), dtype=dtype, show_progress=False)
    assert_bit_identical(hf_tensors(tmp_path / "out"), hf_tensors(source))


def _write_checkpoint(path, cfg, tensors: dict[str, np.ndarray]):
    os.makedirs(path, exist_ok=True)
    save_numpy(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(hf.hf_config(cfg, "float32").to_json_string())


def test_mismatched_tensors_are_named(hf_checkpoints, tmp_path):
    cfg, _, source = hf_checkpoints["mha"]
    tensors = {k: v.numpy() for k, v in hf_tensors(source).items()}
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:32]
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(8, np.float32)  # derived: ignored
    _write_checkpoint(tmp_path / "bad", cfg, tensors)
    with pytest.raises(hf.CheckpointMismatchError) as err:
        hf.import_hf(str(tmp_path / "bad"), show_progress=False)
    message = str(err.value)
    assert "missing (1):\n    model.layers.1.mlp.up_proj.weight" in message
    assert "unexpected (1):\n    model.layers.0.self_attn.q_proj.bias" in message
    assert "model.layers.0.self_attn.k_proj.weight: expected (64, 64), found (32, 64)" in message
    assert "inv_freq" not in message


def test_derived_rotary_buffers_are_skipped(hf_checkpoints, imported, tmp_path):
    cfg, _, source = hf_checkpoints["mha"]
    tensors = {k: v.numpy() for k, v in hf_tensors(source).items()}
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(8, np.float32)
    _write_checkpoint(tmp_path / "old", cfg, tensors)
    _, params = hf.import_hf(str(tmp_path / "old"), show_progress=False)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(imported["mha"][1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unsupported_config_is_refused(hf_checkpoints, tmp_path):
    _, _, source = hf_checkpoints["mha"]
    shutil.copytree(source, tmp_path / "scaled")
    config = json.loads((tmp_path / "scaled" / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    (tmp_path / "scaled" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: rope_scaling=.*linear.* is not supported"):
        hf.import_hf(str(tmp_path / "scaled"), show_progress=False)


def test_pickle_weights_refused_unless_allowed(hf_checkpoints, tmp_path):
    cfg, torch_model, _ = hf_checkpoints["mha"]
    path = tmp_path / "pickled"
    path.mkdir()
    torch.save({k: v.to(torch.bfloat16) for k, v in torch_model.state_dict().items()}, path / "pytorch_model.bin")
    (path / "config.json").write_text(hf.hf_config(cfg, "bfloat16").to_json_string())
    with pytest.raises(hf.PickleCheckpointError, match="pytorch_model.bin.*--allow-pickle"):
        hf.import_hf(str(path), show_progress=False)
    _, from_pickle = hf.import_hf(str(path), allow_pickle=True, show_progress=False)
    safetensors_dir = save_hf_model(torch_model, tmp_path / "safetensors", dtype="bfloat16")
    _, from_safetensors = hf.import_hf(safetensors_dir, show_progress=False)
    for a, b in zip(jax.tree.leaves(from_pickle), jax.tree.leaves(from_safetensors)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_architecture_mismatch_with_configured_model_is_refused(hf_checkpoints):
    cfg, _, source = hf_checkpoints["mha"]
    with pytest.raises(ValueError, match="num_kv_heads: config.json has 4, the given config 2"):
        hf.import_hf(source, base=cfg.replace(num_kv_heads=2), show_progress=False)


def test_export_and_import_on_gcs(hf_checkpoints, imported, gcs_bucket):
    cfg, _, _ = hf_checkpoints["gqa"]
    _, params = imported["gqa"]
    url = f"{gcs_bucket}/export-test"
    hf.export_hf(params, cfg, url, dtype="float32", max_shard_size="100KB", show_progress=False)
    cfg2, params2 = hf.import_hf(url, show_progress=False)
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_cli_reexports_hf_dir_with_new_dtype(hf_checkpoints, tmp_path):
    cfg, torch_model, source = hf_checkpoints["gqa"]
    index = export_main(["--hf", source, "--output", str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    assert len(set(index["weight_map"].values())) == 1  # everything fits the default 5GB
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"))
    assert loaded.dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for t in hf_tensors(tmp_path / "bf16").values())


def test_parse_size():
    assert hf.save.parse_size("5GB") == 5 * 10**9
    assert hf.save.parse_size("2GiB") == 2 * 2**30
    assert hf.save.parse_size("500 MB") == 5 * 10**8
    assert hf.save.parse_size(123) == 123
    with pytest.raises(ValueError, match="cannot parse size '5 gigs'"):
        hf.save.parse_size("5 gigs")


def test_export_cli_from_training_checkpoint(orbax_run, tmp_path):
    """Latest step by default, --step picks another; the tokenizer comes from the run; transformers loads it."""
    from data_pipeline.formats.tokenizer import SAMPLE_TOKENIZER_DIR, load_tokenizer

    directory, saved = orbax_run
    tokens = random_tokens(TINY, 2, 9, seed=8)
    for step, args in ((7, []), (3, ["--step", "3"])):
        out = tmp_path / f"step{step}"
        export_main(["--checkpoint", directory, "--output", str(out), "--dtype", "float32", *args])
        loaded, info = transformers.AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        expected = model_from_params(TINY, saved[step])(tokens, *single_segment_inputs(tokens))
        np.testing.assert_allclose(torch_logits(loaded.eval(), tokens), np.asarray(expected), atol=1e-4)
        exported = transformers.AutoTokenizer.from_pretrained(str(out))
        assert exported("ls -la")["input_ids"] == [1] + load_tokenizer(SAMPLE_TOKENIZER_DIR)("ls -la")["input_ids"]
