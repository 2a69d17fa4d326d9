"""The Flax NNX Llama against `transformers.LlamaForCausalLM` (PyTorch, float32) on random small configs, with
both attention implementations (blockwise in blocks of 16 positions, so several blocks and ragged ends are
exercised; and XLA's dot_product_attention)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from agentlm_jax import ops
from agentlm_jax.hf import load_hf_model
from tests.helpers.hf import random_tokens, single_segment_inputs, torch_logits

forward = nnx.jit(lambda model, tokens, positions, segment_ids: model(tokens, positions, segment_ids))


ATTENTION = {"blockwise": dict(attention_impl="blockwise", attention_block_size=16),
             "xla": dict(attention_impl="xla"), "auto": dict(attention_impl="auto")}


@pytest.fixture(scope="module")
def jax_models(hf_checkpoints):
    """{(name, attention): model} loaded from the Hugging Face checkpoints."""
    return {(name, attention): load_hf_model(path, base=cfg.replace(**runtime), show_progress=False)[1]
            for name, (cfg, _, path) in hf_checkpoints.items() for attention, runtime in ATTENTION.items()}


@pytest.mark.parametrize("attention", list(ATTENTION))
@pytest.mark.parametrize("name", ["mha", "gqa"])
@pytest.mark.parametrize("length", [1, 17, 64])
def test_logits_match_transformers(hf_checkpoints, jax_models, name, length, attention):
    cfg, torch_model, _ = hf_checkpoints[name]
    tokens = random_tokens(cfg, batch=2, length=length, seed=length)
    logits = forward(jax_models[name, attention], tokens, *single_segment_inputs(tokens))
    assert logits.dtype == jnp.float32 and logits.shape == (2, length, cfg.vocab_size)
    expected = torch_logits(torch_model, tokens)
    assert np.abs(expected).max() > 1.0  # the comparison is not trivially satisfied by tiny logits
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_the_code_other_backends_trace_matches_transformers(hf_checkpoints, jax_models, platform):
    """What ops picks for GPU and TPU (plain einsums, JAX's own attention), run here on the CPU. (A fresh jit:
    the compilation cache does not know the platform override.)"""
    cfg, torch_model, _ = hf_checkpoints["gqa"]
    tokens = random_tokens(cfg, batch=2, length=33, seed=5)
    fresh_forward = nnx.jit(lambda model, *inputs: model(*inputs))
    with ops.platform(platform):
        logits = fresh_forward(jax_models["gqa", "auto"], tokens, *single_segment_inputs(tokens))
    np.testing.assert_allclose(np.asarray(logits), torch_logits(torch_model, tokens), atol=1e-4, rtol=0)


def test_unscanned_layers_match_transformers(hf_checkpoints):
    cfg, torch_model, path = hf_checkpoints["gqa"]
    _, model = load_hf_model(path, base=cfg.replace(scan_layers=False), show_progress=False)
    assert isinstance(model.layers, nnx.List)
    tokens = random_tokens(cfg, batch=2, length=17, seed=3)
    np.testing.assert_allclose(np.asarray(forward(model, tokens, *single_segment_inputs(tokens))),
                               torch_logits(torch_model, tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("attention", list(ATTENTION))
def test_packed_segments_equal_separate_runs(hf_checkpoints, jax_models, attention):
    """Two conversations packed in one row (+ padding) give each the logits it gets alone; padding is finite."""
    cfg, torch_model, _ = hf_checkpoints["gqa"]
    model = jax_models["gqa", attention]
    a, b = random_tokens(cfg, 1, 20, seed=1)[0], random_tokens(cfg, 1, 25, seed=2)[0]
    pad = 3
    tokens = np.concatenate([a, b, np.zeros(pad, np.int32)])[None]
    positions = np.concatenate([np.arange(20), np.arange(25), np.zeros(pad)]).astype(np.int32)[None]
    segment_ids = np.concatenate([np.full(20, 1), np.full(25, 2), np.zeros(pad)]).astype(np.int32)[None]
    packed = np.asarray(forward(model, tokens, positions, segment_ids))[0]
    for seg, start in ((a, 0), (b, 20)):
        alone = np.asarray(forward(model, seg[None], *single_segment_inputs(seg[None])))[0]
        np.testing.assert_allclose(packed[start:start + len(seg)], alone, atol=1e-5, rtol=0)
        np.testing.assert_allclose(alone, torch_logits(torch_model, seg[None])[0], atol=1e-4, rtol=0)
    assert np.isfinite(packed[45:]).all()


def _loss_and_grads(path, cfg, tokens):
    _, model = load_hf_model(path, base=cfg, show_progress=False)
    positions, segment_ids = single_segment_inputs(tokens)

    def loss_fn(model):
        logits = model(tokens[:, :-1], positions[:, :-1], segment_ids[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()

    loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
    return float(loss), grads


def test_remat_policies_and_unscanned_layers_give_the_same_gradients(hf_checkpoints):
    base, _, path = hf_checkpoints["gqa"]
    tokens = random_tokens(base, 2, 17, seed=5)
    ref_loss, ref = _loss_and_grads(path, base, tokens)
    ref_flat = jax.tree.leaves(ref)
    for variant in (base.replace(remat="full"), base.replace(remat="save_dots"), base.replace(scan_layers=False)):
        loss, grads = _loss_and_grads(path, variant, tokens)
        assert loss == pytest.approx(ref_loss, abs=1e-6)
        if variant.scan_layers:
            for g, r in zip(jax.tree.leaves(grads), ref_flat):
                np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-6)
        else:  # per-layer parameters of the unrolled model = slices of the stacked ones
            stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[grads["layers"][i] for i in range(base.num_layers)])
            for g, r in zip(jax.tree.leaves(stacked), jax.tree.leaves(ref["layers"])):
                np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-6)


def test_blockwise_and_xla_attention_give_the_same_gradients(hf_checkpoints):
    """Every parameter's gradient through packed rows (three conversations and padding, several blocks)."""
    base, _, path = hf_checkpoints["gqa"]
    tokens = random_tokens(base, 2, 41, seed=9)
    segment_ids = np.repeat(np.asarray([[1] * 14 + [2] * 20 + [3] * 4 + [0] * 3]), 2, axis=0).astype(np.int32)
    positions = np.concatenate([np.arange(14), np.arange(20), np.arange(4), np.zeros(3)])[None].repeat(2, 0)

    def grads(runtime):
        _, model = load_hf_model(path, base=base.replace(**runtime), show_progress=False)
        loss = lambda m: jnp.sum(m(tokens, positions.astype(np.int32), segment_ids)[:, :-1, :7])  # noqa: E731
        return jax.tree.leaves(nnx.jit(nnx.grad(loss))(model))

    for g, r in zip(grads(ATTENTION["blockwise"]), grads(ATTENTION["xla"])):
        g, r = np.asarray(g), np.asarray(r)
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=2e-6 * np.abs(r).max())  # float32 rounding of the sums


def test_compute_dtype_is_separate_from_parameter_dtype(hf_checkpoints):
    cfg, torch_model, path = hf_checkpoints["mha"]
    _, model = load_hf_model(path, base=cfg.replace(dtype="bfloat16"), show_progress=False)
    assert model.layers.attn.q_proj[...].dtype == jnp.float32  # master weights stay float32
    tokens = random_tokens(cfg, 2, 17, seed=7)
    positions, segment_ids = single_segment_inputs(tokens)
    assert model.hidden_states(tokens, positions, segment_ids).dtype == jnp.bfloat16
    logits = forward(model, tokens, positions, segment_ids)
    assert logits.dtype == jnp.float32
    expected = torch_logits(torch_model, tokens)
    error = np.abs(np.asarray(logits) - expected).max()
    assert 1e-4 < error < 0.1 * np.abs(expected).max()  # bfloat16 arithmetic: visibly rounded, still right
