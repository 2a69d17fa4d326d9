"""Shared by the model, HF import/export and generation tests: small random reference models built with
`transformers` + PyTorch, saved as Hugging Face checkpoints, helpers to run them, and the fixtures
`hf_checkpoints` and `orbax_run` (registered by tests/conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest

from agentlm_jax.config import ModelConfig

# Small enough for 2 CPU cores, big enough to exercise every path (several heads, GQA, 2 layers).
SMALL = {
    "mha": ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                       num_kv_heads=4, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5),
    "gqa": ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                       num_kv_heads=2, max_position_embeddings=256, rope_theta=500.0, rms_norm_eps=1e-6),
}


def make_hf_model(cfg: ModelConfig, seed: int = 0):
    """A float32 `transformers.LlamaForCausalLM` with random weights, norm scales included (so a swapped or
    untransposed tensor cannot go unnoticed), large enough that logits differ clearly between tokens."""
    import torch
    import transformers

    from agentlm_jax.hf import hf_config

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_config(cfg, "float32")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


def save_hf_model(model, path, *, dtype: str = "float32", max_shard_size: str = "50GB") -> str:
    """Save a copy cast to `dtype` (the model itself, shared by tests, stays float32 and unrounded)."""
    import copy

    import torch

    copy.deepcopy(model).to(getattr(torch, dtype)).save_pretrained(path, max_shard_size=max_shard_size)
    return str(path)


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def random_tokens(cfg: ModelConfig, batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, cfg.vocab_size, (batch, length)).astype(np.int32)


def single_segment_inputs(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """positions and segment ids of unpadded rows (one conversation per row)."""
    B, T = tokens.shape
    return np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(), np.ones((B, T), np.int32)


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """{'mha'|'gqa': (ModelConfig, torch model, checkpoint dir)}; gqa saved in 3 shards with an index."""
    out = {}
    for name, cfg in SMALL.items():
        model = make_hf_model(cfg, seed=len(out))
        path = tmp_path_factory.mktemp(f"hf-{name}")
        save_hf_model(model, path, max_shard_size="100KB" if name == "gqa" else "50GB")
        out[name] = (cfg, model, str(path))
    return out


def model_from_params(cfg: ModelConfig, params: dict):
    """A Llama holding the given parameters (pure dict)."""
    from flax import nnx

    from agentlm_jax.model.llama import Llama

    model = Llama(cfg, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


TINY = ModelConfig(vocab_size=1024, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                   num_kv_heads=2, initializer_range=0.2)  # the bundled tokenizer's vocabulary


@pytest.fixture(scope="session")
def orbax_run(tmp_path_factory):
    """A training run's checkpoint directory written by the trainer's Checkpointer: steps 3 and 7 with
    different random parameters. Returns (dir, {step: params pure dict})."""
    import optax
    from data_pipeline.formats.tokenizer import SAMPLE_TOKENIZER_DIR
    from flax import nnx

    from agentlm_jax.training.checkpointing import Checkpointer
    from agentlm_jax.config import to_dict
    from agentlm_jax.model.llama import init_model
    from agentlm_jax.training.state import init_train_state

    directory = tmp_path_factory.mktemp("run") / "checkpoints"
    saved = {}
    with Checkpointer(str(directory), async_save=False) as ckpt:
        for step, seed in ((3, 1), (7, 2)):
            params = nnx.state(init_model(TINY, seed=seed), nnx.Param).to_pure_dict()
            state = init_train_state(params, optax.adamw(1e-3))
            ckpt.save(step, state, run_info={"config": {"model": to_dict(TINY)},
                                             "tokenizer_path": SAMPLE_TOKENIZER_DIR})
            saved[step] = params
        ckpt.wait_until_finished()
    return str(directory), saved


# ------------------------------------------------------------------------ checkpoints and generation
def hf_tensors(path) -> dict:
    """Every tensor of the safetensors shards in an HF directory, by name (torch tensors)."""
    import os

    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


def assert_bit_identical(a: dict, b: dict) -> None:
    """Same names, dtypes, shapes and bits (compared as integers, so NaN payloads and -0.0 count)."""
    import torch

    def bits(t):
        return t.view({1: torch.uint8, 2: torch.int16}.get(t.element_size(), torch.int32))

    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(bits(a[name]), bits(b[name])), name


def transformers_greedy(torch_model, prompts, max_new_tokens: int, stop_id: int, pad_id: int = 0) -> list[list[int]]:
    """transformers' greedy continuation of each prompt (left-padded into one batch), cut after `stop_id`."""
    import torch

    P = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    out = torch_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                               eos_token_id=stop_id, pad_token_id=pad_id)[:, P:].tolist()
    return [row[: row.index(stop_id) + 1] if stop_id in row else row for row in out]
