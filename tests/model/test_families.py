"""Llama 3 / 3.1 / 3.2 and Qwen 2.5 against `transformers` (PyTorch, float32) on random small configs built by
`transformers` itself: LlamaConfig with `llama3` rope scaling (untied, and tied as Llama 3.2 1B/3B), Qwen2Config
with its q/k/v biases (untied, and tied as the small Qwen 2.5 sizes), all with grouped-query attention.
Proves: logits within 1e-4, import → export bit-exact, the export loads with `from_pretrained` with no missing or
unexpected keys, greedy generation equals `transformers`' greedy; and the config.json mapping, including the
fields that are refused."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from agentlm_jax import hf
from agentlm_jax.config import ModelConfig
from agentlm_jax.config.schema import RopeScaling
from agentlm_jax.hf.config import from_hf, to_hf
from agentlm_jax.inference.generate import Generator
from agentlm_jax.model.layers import llama3_inv_freq
from agentlm_jax.model.llama import abstract_model, head_kernel, init_model
from tests.helpers.hf import (assert_bit_identical, hf_tensors, random_tokens, single_segment_inputs, torch_logits,
                              transformers_greedy)

forward = nnx.jit(lambda model, tokens, positions, segment_ids: model(tokens, positions, segment_ids))

# Scaling that bites at this size: head_dim 16 and θ 500 give wavelengths 6.3 … 2,700 positions, so with an
# original context of 32 some frequencies are kept (< 8), some interpolated and some divided by the factor (> 32).
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama3.1": ("LlamaConfig", dict(rope_theta=500.0, rms_norm_eps=1e-5, rope_scaling=LLAMA3_SCALING,
                                     tie_word_embeddings=False)),
    "llama3.2-tied": ("LlamaConfig", dict(rope_theta=500.0, rms_norm_eps=1e-5, rope_scaling=LLAMA3_SCALING,
                                          tie_word_embeddings=True)),
    "qwen2.5": ("Qwen2Config", dict(rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False)),
    "qwen2.5-tied": ("Qwen2Config", dict(rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)),
}


def hf_family_config(name: str):
    config_class, extra = FAMILIES[name]
    return getattr(transformers, config_class)(**COMMON, **copy.deepcopy(extra))  # transformers edits the dicts


def random_torch_model(config, seed: int = 0):
    """Random float32 weights everywhere, biases and norm scales included (a bias or scale left out, swapped or
    mis-shaped cannot go unnoticed)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.15 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """{name: (torch model, checkpoint dir saved by transformers)}; qwen2.5 in several shards with an index."""
    out = {}
    for i, name in enumerate(FAMILIES):
        model = random_torch_model(hf_family_config(name), seed=i)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path, max_shard_size="100KB" if name == "qwen2.5" else "50GB")
        out[name] = (model, str(path))
    return out


@pytest.fixture(scope="module")
def models(families):
    return {name: hf.load_hf_model(path, show_progress=False) for name, (_, path) in families.items()}


# --------------------------------------------------------------------------------------------- the model
def test_configs_and_parameters_are_the_familys(families, models):
    for name, (torch_model, path) in families.items():
        cfg, model = models[name]
        tied = FAMILIES[name][1]["tie_word_embeddings"]
        assert cfg.architecture == ("qwen2" if name.startswith("qwen") else "llama") and cfg.num_kv_heads == 2
        assert cfg.tie_word_embeddings is tied and cfg.qkv_bias is name.startswith("qwen")
        assert cfg.rope_scaling == (RopeScaling(**LLAMA3_SCALING) if name.startswith("llama") else RopeScaling())
        params = nnx.state(model, nnx.Param).to_pure_dict()
        assert ("lm_head" in params) is not tied
        assert ("lm_head.weight" in hf_tensors(path)) is not tied  # transformers does not save a tied head
        assert sum(x.size for x in jax.tree.leaves(params)) == sum(p.numel() for p in torch_model.parameters())


@pytest.mark.parametrize("attention", ["blockwise", "xla"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_match_transformers(families, name, attention):
    torch_model, path = families[name]
    runtime = dict(attention_impl="blockwise", attention_block_size=16) if attention == "blockwise" else \
        dict(attention_impl="xla")
    cfg, model = hf.load_hf_model(path, runtime=runtime, show_progress=False)
    for length in (1, 45):
        tokens = random_tokens(cfg, batch=2, length=length, seed=length)
        logits = forward(model, tokens, *single_segment_inputs(tokens))
        assert logits.dtype == jnp.float32 and logits.shape == (2, length, cfg.vocab_size)
        expected = torch_logits(torch_model, tokens)
        assert np.abs(expected).max() > 1.0
        np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)


def test_llama3_scaling_and_qwen_biases_change_the_logits(families, models):
    """The features under test matter here: without the rope scaling or without the biases, the logits move
    by far more than the tolerance (so the comparisons above could fail)."""
    tokens = random_tokens(models["llama3.1"][0], batch=1, length=45, seed=3)
    for name, change in (("llama3.1", lambda c: c.replace(rope_scaling=RopeScaling())),
                         ("qwen2.5", lambda c: c.replace(architecture="llama"))):
        cfg, model = models[name]
        params = nnx.state(model, nnx.Param).to_pure_dict()
        if name.startswith("qwen"):
            for p in ("q_bias", "k_bias", "v_bias"):
                del params["layers"]["attn"][p]
        other = abstract_model(change(cfg))
        state = nnx.state(other, nnx.Param)
        nnx.replace_by_pure_dict(state, params)
        other = nnx.merge(nnx.graphdef(other), state)
        gap = np.abs(np.asarray(forward(other, tokens, *single_segment_inputs(tokens)))
                     - torch_logits(families[name][0], tokens)).max()
        assert gap > 1e-2, name


@pytest.mark.parametrize("head_dim,theta,scaling", [
    (16, 500.0, LLAMA3_SCALING),
    (128, 500_000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}),  # Llama 3.1
    (64, 500_000.0, {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192}),  # Llama 3.2 1B
])
def test_llama3_frequencies_equal_transformers(head_dim, theta, scaling):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, rope_theta=theta,
                                      rope_scaling=copy.deepcopy(scaling), max_position_embeddings=131072)
    expected, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    assert attention_factor == 1.0
    base = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    ours = llama3_inv_freq(base, RopeScaling(**scaling))
    np.testing.assert_allclose(np.asarray(ours), expected.numpy(), rtol=2e-7, atol=0)
    assert not np.allclose(np.asarray(ours), np.asarray(base))


def test_the_code_other_backends_trace_matches_transformers(families, models):
    from agentlm_jax import ops

    for name in ("llama3.2-tied", "qwen2.5"):
        cfg, model = models[name]
        tokens = random_tokens(cfg, batch=2, length=33, seed=5)
        fresh_forward = nnx.jit(lambda model, *inputs: model(*inputs))
        with ops.platform("tpu"):
            logits = fresh_forward(model, tokens, *single_segment_inputs(tokens))
        np.testing.assert_allclose(np.asarray(logits), torch_logits(families[name][0], tokens), atol=1e-4, rtol=0)


def test_head_kernel_is_what_the_output_head_multiplies(models):
    """What the training loss multiplies the hidden states with: lm_head.kernel, or the tied embedding's transpose."""
    for name in ("llama3.1", "qwen2.5-tied"):
        cfg, model = models[name]
        tokens = random_tokens(cfg, batch=1, length=9, seed=2)
        h = model.hidden_states(tokens, *single_segment_inputs(tokens))
        kernel = head_kernel(nnx.state(model, nnx.Param).to_pure_dict(), cfg)
        assert kernel.shape == (cfg.hidden_size, cfg.vocab_size)
        np.testing.assert_allclose(np.asarray(h @ kernel), np.asarray(model(tokens, *single_segment_inputs(tokens))),
                                   atol=1e-5, rtol=0)


def test_every_new_parameter_has_logical_axes():
    cfg = ModelConfig(architecture="qwen2", tie_word_embeddings=True)
    state = nnx.state(abstract_model(cfg), nnx.Param)
    axes = {"/".join(map(str, path)): tuple(v.get_metadata()["out_sharding"])
            for path, v in jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
            for path in [tuple(getattr(k, "key", k) for k in path)]}
    assert axes["layers/attn/q_bias"] == ("layers", "heads", "head_dim")
    assert axes["layers/attn/k_bias"] == axes["layers/attn/v_bias"] == ("layers", "kv_heads", "head_dim")
    assert not any(k.startswith("lm_head") for k in axes)
    from agentlm_jax.config import MeshConfig
    from agentlm_jax.sharding import make_mesh, state_shardings

    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2), devices=jax.devices()[:8])
    specs = state_shardings(state, mesh, MeshConfig().rules).to_pure_dict()
    assert tuple(specs["layers"]["attn"]["q_bias"].spec) == (None, "tensor", None)


# --------------------------------------------------------------------------------------- import / export
@pytest.mark.parametrize("name", list(FAMILIES))
def test_import_export_round_trip_is_bit_exact(families, tmp_path, name):
    torch_model, _ = families[name]
    source = tmp_path / "source"
    copy.deepcopy(torch_model).to(torch.bfloat16).save_pretrained(source, max_shard_size="100KB")  # shared: a copy
    cfg, params = hf.import_hf(str(source), show_progress=False)
    hf.export_hf(params, cfg, str(tmp_path / "out"), dtype="bfloat16", show_progress=False)
    assert_bit_identical(hf_tensors(tmp_path / "out"), hf_tensors(source))
    ours, theirs = (json.loads((d / "config.json").read_text()) for d in (tmp_path / "out", source))
    for key in ("architectures", "model_type", "tie_word_embeddings", "rope_parameters", "num_key_value_heads",
                "rms_norm_eps", "vocab_size"):
        assert ours[key] == theirs[key], key
    assert hf.import_hf(str(tmp_path / "out"), show_progress=False)[0] == cfg


@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_loads_in_transformers_without_missing_keys_and_matches(families, models, tmp_path, name):
    torch_model, source = families[name]
    cfg, model = models[name]
    out = tmp_path / "export"
    hf.export_hf(model, cfg, str(out), dtype="float32", show_progress=False)
    assert ("lm_head.weight" in hf_tensors(out)) is not cfg.tie_word_embeddings
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True,
                                                                     dtype=torch.float32)
    assert type(loaded) is type(torch_model)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tokens = random_tokens(cfg, 2, 19, seed=4)
    np.testing.assert_allclose(torch_logits(loaded.eval(), tokens), torch_logits(torch_model, tokens), atol=1e-6)
    assert_bit_identical(hf_tensors(out), hf_tensors(source))


def test_a_tied_checkpoint_that_stores_its_head_loads(families, tmp_path):
    """Some tied checkpoints also store lm_head.weight; it is skipped, as transformers does."""
    from safetensors.numpy import save_file

    _, source = families["qwen2.5-tied"]
    shutil.copytree(source, tmp_path / "with-head")
    tensors = {k: v.numpy() for k, v in hf_tensors(source).items()}
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    for f in os.listdir(tmp_path / "with-head"):
        if f.endswith(".safetensors") or f.endswith(".index.json"):
            os.remove(tmp_path / "with-head" / f)
    save_file(tensors, str(tmp_path / "with-head" / "model.safetensors"), metadata={"format": "pt"})
    _, a = hf.import_hf(str(tmp_path / "with-head"), show_progress=False)
    _, b = hf.import_hf(source, show_progress=False)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_missing_bias_is_named(families, tmp_path):
    from safetensors.numpy import save_file

    _, source = families["qwen2.5-tied"]
    (tmp_path / "bad").mkdir()
    shutil.copy(os.path.join(source, "config.json"), tmp_path / "bad")
    tensors = {k: v.numpy() for k, v in hf_tensors(source).items() if k != "model.layers.1.self_attn.k_proj.bias"}
    save_file(tensors, str(tmp_path / "bad" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(hf.CheckpointMismatchError, match=r"(?s)Qwen2ForCausalLM.*missing \(1\):\n    "
                                                         r"model.layers.1.self_attn.k_proj.bias"):
        hf.import_hf(str(tmp_path / "bad"), show_progress=False)


# ------------------------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_generation_matches_transformers(families, models, name):
    torch_model, _ = families[name]
    cfg, model = models[name]
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (5, 12, 1, 30)]
    free_run = Generator(model, stop_token_ids=[])(prompts, max_new_tokens=12).tokens
    stop_id = next(t for t in free_run[0][4:] if t not in free_run[0][:4])  # row 0 stops at step 5, others later
    result = Generator(model, stop_token_ids=[stop_id])(prompts, max_new_tokens=12)
    assert result.tokens == transformers_greedy(torch_model, prompts, 12, stop_id)
    assert result.finished[0] and not all(result.finished)


# --------------------------------------------------------------------------------------------- config.json
# The official config.json files (transformers 4.x wrote them: rope_theta and rope_scaling at the top level).
LLAMA31_8B_INSTRUCT = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.42.3", "use_cache": True, "vocab_size": 128256}
QWEN25_7B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
    "intermediate_size": 18944, "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2",
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064}
LLAMA32_1B = {**LLAMA31_8B_INSTRUCT, "hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32,
              "num_hidden_layers": 16, "head_dim": 64, "tie_word_embeddings": True, "eos_token_id": 128001,
              "rope_scaling": {**LLAMA31_8B_INSTRUCT["rope_scaling"], "factor": 32.0}}
QWEN25_05B = {**QWEN25_7B_INSTRUCT, "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
              "num_hidden_layers": 24, "num_key_value_heads": 2, "tie_word_embeddings": True, "vocab_size": 151936,
              "max_window_layers": 21}


@pytest.mark.parametrize("official,published,shipped", [
    (LLAMA31_8B_INSTRUCT, 8_030_261_248, "llama3.1-8b"),  # meta-llama/Llama-3.1-8B(-Instruct): 8.03B
    (QWEN25_7B_INSTRUCT, 7_615_616_512, "qwen2.5-7b"),  # Qwen/Qwen2.5-7B(-Instruct): 7.62B
    (LLAMA32_1B, 1_235_814_400, None),  # meta-llama/Llama-3.2-1B: 1.24B (tied)
    (QWEN25_05B, 494_032_768, None),  # Qwen/Qwen2.5-0.5B: 0.49B (tied)
])
def test_official_configs_are_read_and_shipped_configs_match_them(official, published, shipped):
    from agentlm_jax.config import RUNTIME_FIELDS, load_config
    from agentlm_jax.model.llama import count_params

    cfg = from_hf(official)
    assert count_params(cfg) == published
    assert from_hf(to_hf(cfg) | {"model_type": official["model_type"]}) == cfg
    if shipped:
        model = load_config(f"configs/{shipped}.yaml").model
        assert model.replace(**{f: getattr(cfg, f) for f in RUNTIME_FIELDS}) == cfg
        assert count_params(model) == published


def test_every_end_of_turn_id_stops_generation(tmp_path):
    """Llama 3.1 lists three ids that end a turn; all are kept (config.json or generation_config.json), written
    back as the list, and the Generator stops at any of them."""
    from agentlm_jax.hf.config import load_hf_config

    cfg = from_hf(LLAMA31_8B_INSTRUCT)
    assert (cfg.eos_token_id, cfg.stop_token_ids) == (128001, (128001, 128008, 128009))
    assert to_hf(cfg)["eos_token_id"] == [128001, 128008, 128009]
    base = {**LLAMA31_8B_INSTRUCT, "eos_token_id": 128001}  # Llama-3.1-8B (base): the list is in generation_config
    (tmp_path / "config.json").write_text(json.dumps(base))
    assert load_hf_config(str(tmp_path)).stop_token_ids == (128001,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128008, 128009]}))
    assert load_hf_config(str(tmp_path)).stop_token_ids == (128001, 128008, 128009)
    assert load_hf_config(str(tmp_path)).replace(extra_eos_token_ids=()) == from_hf(base)

    small = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                        num_kv_heads=1, max_position_embeddings=64)
    model = init_model(small, seed=0)
    prompts = [[1, 5, 9], [1, 7]]
    free = Generator(model, stop_token_ids=[])(prompts, max_new_tokens=8).tokens
    assert free[0][0] not in (free[0][1], free[1][0])  # (the premise: row 0 runs past its first token)
    model.config = small.replace(eos_token_id=free[0][1], extra_eos_token_ids=(free[1][0],))
    result = Generator(model)(prompts, max_new_tokens=8)  # stops at the extra id in row 1, at eos in row 0
    assert result.finished == [True, True] and result.tokens == [free[0][:2], free[1][:1]]


def test_written_config_json_is_what_transformers_reads(tmp_path):
    """hf_config → config.json → transformers → our from_hf: every family field survives, scaling included."""
    for cfg in (from_hf(LLAMA31_8B_INSTRUCT), from_hf(QWEN25_05B)):
        small = cfg.replace(num_layers=1, hidden_size=64, intermediate_size=32, num_heads=4, num_kv_heads=2,
                            head_dim=None, vocab_size=64)
        config = hf.hf_config(small, "float32")
        config.save_pretrained(tmp_path)
        reloaded = transformers.AutoConfig.from_pretrained(tmp_path)
        assert type(reloaded) is type(config)
        assert from_hf(json.loads((tmp_path / "config.json").read_text())) == small


def _small(official: dict) -> dict:
    return official | {"hidden_size": 64, "intermediate_size": 32, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": 64}


@pytest.mark.parametrize("official,change,named", [
    (QWEN25_7B_INSTRUCT, {"use_sliding_window": True}, "use_sliding_window=True"),
    (QWEN25_7B_INSTRUCT, {"layer_types": ["sliding_attention"]}, "layer_types="),
    (QWEN25_7B_INSTRUCT, {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
     "rope_scaling=.*yarn.* is not supported"),
    (LLAMA31_8B_INSTRUCT, {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling=.*dynamic"),
    (LLAMA31_8B_INSTRUCT, {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
     "rope_parameters=.*linear"),
    (LLAMA31_8B_INSTRUCT, {"rope_scaling": {**LLAMA31_8B_INSTRUCT["rope_scaling"], "beta_fast": 32}},
     "llama3 scaling takes .*unknown: beta_fast"),
    (LLAMA31_8B_INSTRUCT, {"mlp_bias": True}, "mlp_bias=True"),
    (LLAMA31_8B_INSTRUCT, {"attention_bias": True}, "attention_bias=True"),
    (LLAMA31_8B_INSTRUCT, {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    (LLAMA31_8B_INSTRUCT, {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    (LLAMA31_8B_INSTRUCT, {"quantization_config": {"quant_method": "awq"}}, "quantization_config="),
    (LLAMA31_8B_INSTRUCT, {"architectures": ["LlamaForSequenceClassification"]}, "architectures="),
    (LLAMA31_8B_INSTRUCT, {"model_type": "mistral"}, "model_type is 'mistral'"),
])
def test_unsupported_fields_are_refused_by_name(official, change, named):
    with pytest.raises(ValueError, match=f"config.json: .*{named}"):
        from_hf(_small(official) | change)


def test_an_unsupported_checkpoint_is_refused_before_loading(families, tmp_path):
    _, source = families["qwen2.5"]
    shutil.copytree(source, tmp_path / "sliding")
    config = json.loads((tmp_path / "sliding" / "config.json").read_text())
    config.update(use_sliding_window=True, sliding_window=16)
    (tmp_path / "sliding" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"sliding/config.json: config.json: use_sliding_window=True is not supported"):
        hf.import_hf(str(tmp_path / "sliding"), show_progress=False)


def test_llama2_config_json_is_unchanged():
    """A Llama 2 architecture writes the same config.json keys as before the families (no rope_scaling, untied,
    no biases) and reads back equal."""
    cfg = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                      num_kv_heads=32)
    out = to_hf(cfg)
    assert "rope_scaling" not in out and "architecture" not in out and "use_sliding_window" not in out
    assert (out["tie_word_embeddings"], out["attention_bias"], out["mlp_bias"]) == (False, False, False)
    assert from_hf(json.loads(hf.hf_config(cfg, "float32").to_json_string())) == cfg
    assert math.prod(abstract_model(cfg.replace(num_layers=1)).lm_head.kernel.shape) == 4096 * 32000
