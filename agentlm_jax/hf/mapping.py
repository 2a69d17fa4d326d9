"""Hugging Face Llama / Qwen2 tensor names ↔ paths in our parameters, and the layout change between them.

Hugging Face `nn.Linear` weights are [out, in]; our kernels are [in..., out...] einsum operands (e.g. q_proj
[D,N,H] ↔ HF [N·H, D]), so conversion is a transpose and a reshape; biases are [N·H] ↔ our [N, H]. Rotary
embeddings use the Hugging Face ("rotate_half") layout, so q/k need no permutation in either direction. Qwen2
adds `q_proj.bias`, `k_proj.bias`, `v_proj.bias`; with tied embeddings there is no `lm_head.weight` (the head
is the embedding table), and one found in a checkpoint is skipped, as transformers does.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np

from agentlm_jax.config import ModelConfig
from agentlm_jax.errors import SetupError

# Buffers some older checkpoints saved; they are recomputed from the config, so they are skipped on import.
DERIVED_BUFFERS = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


class CheckpointMismatchError(SetupError, ValueError):
    """The checkpoint's tensors do not match the architecture in its config."""


@dataclasses.dataclass(frozen=True)
class TensorMap:
    hf: str  # Hugging Face name; "{i}" stands for the layer index
    ours: tuple[str, ...]  # path in our parameters (inside one decoder block for per-layer tensors)
    in_dims: int  # how many leading dims of our array are the HF Linear's input dims; 0 = same layout
    flat: bool = False  # a Linear's bias: HF [N·H] ↔ our [N, H]

    def shape_in_hf(self, our_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.flat:
            return (math.prod(our_shape),)
        if not self.in_dims:
            return tuple(our_shape)
        return math.prod(our_shape[self.in_dims:]), math.prod(our_shape[:self.in_dims])

    def to_ours(self, x: np.ndarray, our_shape: tuple[int, ...]) -> np.ndarray:
        return (x.T if self.in_dims else x).reshape(our_shape)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        if self.flat:
            return x.reshape(-1)
        if not self.in_dims:
            return x
        return x.reshape(math.prod(x.shape[:self.in_dims]), -1).T


GLOBAL_TENSORS = (
    TensorMap("model.embed_tokens.weight", ("embedder", "embedding"), 0),
    TensorMap("model.norm.weight", ("final_norm", "scale"), 0),
    TensorMap("lm_head.weight", ("lm_head", "kernel"), 1),
)
LAYER_TENSORS = (
    TensorMap("model.layers.{i}.self_attn.q_proj.weight", ("attn", "q_proj"), 1),
    TensorMap("model.layers.{i}.self_attn.k_proj.weight", ("attn", "k_proj"), 1),
    TensorMap("model.layers.{i}.self_attn.v_proj.weight", ("attn", "v_proj"), 1),
    TensorMap("model.layers.{i}.self_attn.o_proj.weight", ("attn", "o_proj"), 2),
    TensorMap("model.layers.{i}.mlp.gate_proj.weight", ("mlp", "gate_proj"), 1),
    TensorMap("model.layers.{i}.mlp.up_proj.weight", ("mlp", "up_proj"), 1),
    TensorMap("model.layers.{i}.mlp.down_proj.weight", ("mlp", "down_proj"), 1),
    TensorMap("model.layers.{i}.input_layernorm.weight", ("attn_norm", "scale"), 0),
    TensorMap("model.layers.{i}.post_attention_layernorm.weight", ("mlp_norm", "scale"), 0),
)
QKV_BIAS_TENSORS = {  # Qwen2's, each following its weight (Hugging Face's order)
    f"{p}_proj": TensorMap(f"model.layers.{{i}}.self_attn.{p}_proj.bias", ("attn", f"{p}_bias"), 0, flat=True)
    for p in "qkv"}
LM_HEAD = "lm_head.weight"


def global_tensors(cfg: ModelConfig) -> tuple[TensorMap, ...]:
    """Embedding, final norm and (unless tied) output head."""
    return tuple(t for t in GLOBAL_TENSORS if not (cfg.tie_word_embeddings and t.hf == LM_HEAD))


def layer_tensors(cfg: ModelConfig) -> tuple[TensorMap, ...]:
    """One decoder block's tensors (`{i}` = the layer), with the q/k/v biases where the architecture has them."""
    out = []
    for t in LAYER_TENSORS:
        out.append(t)
        if cfg.qkv_bias and t.ours[-1] in QKV_BIAS_TENSORS:
            out.append(QKV_BIAS_TENSORS[t.ours[-1]])
    return tuple(out)


def ignored_tensors(cfg: ModelConfig) -> frozenset[str]:
    """Tensors a checkpoint may hold that are not read: a tied model's `lm_head.weight` (transformers ties it to
    the embedding and ignores the stored copy too)."""
    return frozenset({LM_HEAD} if cfg.tie_word_embeddings else ())


@dataclasses.dataclass(frozen=True)
class Entry:
    """One Hugging Face tensor and where it lives in our parameters."""

    name: str  # Hugging Face name
    path: tuple  # path of our parameter array in the pure-dict params
    layer: int | None  # index along the stacked `layers` axis, or None if the array is this tensor alone
    shape: tuple[int, ...]  # our shape of this tensor (one layer's slice for stacked arrays)
    tmap: TensorMap

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return self.tmap.shape_in_hf(self.shape)


def get_path(tree: dict, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def tensor_entries(cfg: ModelConfig, params: dict) -> list[Entry]:
    """All Hugging Face tensors of the architecture, in Hugging Face order, mapped onto `params` (pure dict)."""
    entries = []

    def add(tmap: TensorMap, hf_name: str, path: tuple, layer: int | None):
        shape = tuple(get_path(params, path).shape)
        entries.append(Entry(hf_name, path, layer, shape[1:] if layer is not None else shape, tmap))

    first, *rest = global_tensors(cfg)
    add(first, first.hf, first.ours, None)
    for i in range(cfg.num_layers):
        for t in layer_tensors(cfg):
            if cfg.scan_layers:
                add(t, t.hf.format(i=i), ("layers",) + t.ours, i)
            else:
                add(t, t.hf.format(i=i), ("layers", i) + t.ours, None)
    for t in rest:
        add(t, t.hf, t.ours, None)
    return entries


def check_tensors(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], where: str, *,
                  ignored: frozenset[str] = frozenset(), architecture: str = "Llama") -> None:
    """Raise CheckpointMismatchError naming every missing, unexpected and mis-shaped tensor (`ignored` names,
    and derived buffers, may be present without being expected)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(n for n in set(found) - set(expected) if not DERIVED_BUFFERS.match(n) and n not in ignored)
    misshaped = sorted(f"{n}: expected {expected[n]}, found {found[n]}"
                       for n in set(expected) & set(found) if tuple(found[n]) != tuple(expected[n]))
    problems = [f"{title} ({len(items)}):\n    " + "\n    ".join(items)
                for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
                if items]
    if problems:
        raise CheckpointMismatchError(f"{where}: the tensors do not match the {architecture} architecture of its "
                                      f"config.json:\n  " + "\n  ".join(problems))
