"""LoRA adapters (Hu et al., 2021) on the attention and MLP projections, and the trainable / frozen split.

A target projection `y = x · W` (W is one of the model's kernels, e.g. q_proj [D, N, H]) becomes

    y = x · W + (alpha / r) · (x · A) · B        A [in..., R] random, B [R, out...] zero at the start

so at step 0 the model is the base model exactly. A and B are `nnx.LoRAParam`s (a subclass of `nnx.Param`)
with logical axis names: the rank axis is `lora_rank` (replicated by the rules), A's input axes and B's output
axes are those of the base kernel (so FSDP and tensor parallelism shard them as the kernel). With scanned
layers they are stacked [L, ...] like every block parameter. Einsum letters as everywhere in the model, R the
rank: `BTD,DR->BTR`, then `BTR,RNH->BTNH`.

In the parameter tree an adapter sits beside its kernel: `layers/attn/q_proj_lora/{a,b}` next to
`layers/attn/q_proj`. `split` gives (frozen base, adapters); the train step differentiates the adapters only.

Dropout (`lora.dropout` p > 0, PEFT's `lora_dropout`): the adapter's input is dropped before A,
`(alpha / r) · (dropout(x) · A) · B` with dropout(x) = x · mask / (1 - p), only when the forward pass is given a
key (the train step's; generation, evaluation and export pass none). The key is a pure function of the run's
seed, the optimizer step, the micro-batch, the layer and the target (`step_key`, `layer_keys`, `target_key`), so
a resumed run draws the same masks as an uninterrupted one, and the masks do not depend on the mesh (JAX's
threefry random bits are a function of the key and the element's index, whatever the sharding).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from agentlm_jax import ops
from agentlm_jax.config.schema import LoraConfig, ModelConfig

RANK_AXIS = "lora_rank"
ADAPTER_SUFFIX = "_lora"  # q_proj → q_proj_lora
# target → (module, kernel name): the kernel an adapter of that target adds to.
TARGET_KERNELS = {"q": ("attn", "q_proj"), "k": ("attn", "k_proj"), "v": ("attn", "v_proj"),
                  "o": ("attn", "o_proj"), "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"),
                  "down": ("mlp", "down_proj")}
TARGET_INDEX = {t: i for i, t in enumerate(TARGET_KERNELS)}  # a target's dropout key: fold_in(layer key, index)


def enabled(lora: LoraConfig | None) -> bool:
    return lora is not None and lora.enabled


class LoRA(nnx.Module):
    """The adapter of one projection: `delta(x) = scaling · (x · A) · B`.

    `down`/`up` are the two einsums (e.g. "BTD,DR->BTR", "BTR,RNH->BTNH"); `in_shape`/`in_axes` are the base
    kernel's contracted dimensions and their logical names, `out_shape`/`out_axes` its output ones."""

    def __init__(self, down: str, up: str, in_shape: tuple[int, ...], in_axes: tuple[str, ...],
                 out_shape: tuple[int, ...], out_axes: tuple[str, ...], lora: LoraConfig, *, dtype,
                 param_dtype, rngs: nnx.Rngs):
        R, fan_in = lora.rank, math.prod(in_shape)
        bound = 1.0 / math.sqrt(fan_in)  # PEFT's kaiming_uniform_(a=√5) on lora_A: U(-1/√in, 1/√in)
        a = jax.random.uniform(rngs.params(), (*in_shape, R), jnp.float32, -bound, bound).astype(param_dtype)
        self.a = nnx.LoRAParam(a, out_sharding=(*in_axes, RANK_AXIS), eager_sharding=False)
        self.b = nnx.LoRAParam(jnp.zeros((R, *out_shape), param_dtype), out_sharding=(RANK_AXIS, *out_axes),
                               eager_sharding=False)
        self.down, self.up = down, up
        self.scaling = float(lora.scaling)
        self.dropout = float(lora.dropout)
        self.dtype = dtype

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """The delta of input x; with a `key` (training) and dropout > 0, of dropout(x)."""
        dt = self.dtype
        if key is not None and self.dropout > 0:
            x = dropout(x, self.dropout, key)
        h = ops.project(self.down, x, self.a[...].astype(dt))
        return ops.project(self.up, h, self.b[...].astype(dt)) * jnp.asarray(self.scaling, dt)


def attention_adapters(module: nnx.Module, cfg: ModelConfig, lora: LoraConfig | None, rngs: nnx.Rngs) -> None:
    """Attach the q/k/v/o adapters that `lora.targets` names to an Attention module."""
    if not enabled(lora):
        return
    D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    specs = {
        "q": ("BTD,DR->BTR", "BTR,RNH->BTNH", (D,), ("embed",), (N, H), ("heads", "head_dim")),
        "k": ("BSD,DR->BSR", "BSR,RKH->BSKH", (D,), ("embed",), (K, H), ("kv_heads", "head_dim")),
        "v": ("BSD,DR->BSR", "BSR,RKH->BSKH", (D,), ("embed",), (K, H), ("kv_heads", "head_dim")),
        "o": ("BTNH,NHR->BTR", "BTR,RD->BTD", (N, H), ("heads", "head_dim"), (D,), ("embed",)),
    }
    _attach(module, specs, lora, cfg, rngs)


def mlp_adapters(module: nnx.Module, cfg: ModelConfig, lora: LoraConfig | None, rngs: nnx.Rngs) -> None:
    """Attach the gate/up/down adapters that `lora.targets` names to an MLP module."""
    if not enabled(lora):
        return
    D, F = cfg.hidden_size, cfg.intermediate_size
    specs = {
        "gate": ("BTD,DR->BTR", "BTR,RF->BTF", (D,), ("embed",), (F,), ("mlp",)),
        "up": ("BTD,DR->BTR", "BTR,RF->BTF", (D,), ("embed",), (F,), ("mlp",)),
        "down": ("BTF,FR->BTR", "BTR,RD->BTD", (F,), ("mlp",), (D,), ("embed",)),
    }
    _attach(module, specs, lora, cfg, rngs)


def _attach(module, specs, lora: LoraConfig, cfg: ModelConfig, rngs) -> None:
    for target, spec in specs.items():
        if target in lora.targets:
            setattr(module, adapter_name(target), LoRA(*spec, lora, dtype=jnp.dtype(cfg.dtype),
                                                       param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs))


def adapter_name(target: str) -> str:
    return TARGET_KERNELS[target][1] + ADAPTER_SUFFIX


def add_delta(module: nnx.Module, target: str, x: jax.Array, y: jax.Array,
              layer_key: jax.Array | None = None) -> jax.Array:
    """y + the adapter's delta of x, when `module` has an adapter for `target`; y itself otherwise.
    `layer_key`: the layer's dropout key in training (None: no dropout)."""
    adapter = getattr(module, adapter_name(target), None)
    if adapter is None:
        return y
    return y + adapter(x, None if layer_key is None else target_key(layer_key, target))


# ------------------------------------------------------------------------------------------------ dropout
def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Inverted dropout, as torch.nn.Dropout in training: each element kept with probability 1 - rate and
    scaled by 1 / (1 - rate), zero otherwise."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - rate), x.dtype), jnp.zeros((), x.dtype))


def uses_dropout(lora: LoraConfig | None) -> bool:
    return enabled(lora) and lora.dropout > 0


def step_key(seed: int, step: jax.Array | int, micro_batch: jax.Array | int = 0) -> jax.Array:
    """The dropout key of one optimizer step's micro-batch: a function of the seed and the step alone (not of
    any state), so a resumed run is bit-exact with an uninterrupted one."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), micro_batch)


def layer_keys(key: jax.Array, num_layers: int) -> jax.Array:
    """[L] keys, one per layer (fold_in(key, i)): the same for scanned and unscanned layers."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num_layers, dtype=jnp.uint32))


def target_key(layer_key: jax.Array, target: str) -> jax.Array:
    """One target's key in a layer: every adapter draws its own mask, as PEFT's per-module lora_dropout."""
    return jax.random.fold_in(layer_key, TARGET_INDEX[target])


# ------------------------------------------------------------------------------ trainable / frozen split
ADAPTERS = nnx.LoRAParam
FROZEN = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def split(model: nnx.Module) -> tuple[nnx.State, nnx.State]:
    """(frozen base parameters, adapters) of a LoRA model, as nnx.States."""
    return nnx.state(model, FROZEN), nnx.state(model, ADAPTERS)


def merge_trees(base: dict, adapters: dict) -> dict:
    """One pure-dict parameter tree of the base and the adapters (disjoint keys below shared modules)."""
    out = dict(base)
    for k, v in adapters.items():
        out[k] = merge_trees(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _blocks(params: dict, cfg: ModelConfig):
    """(block dict, has a leading layer axis) for each block in pure-dict params: one stacked dict when scanned."""
    layers = params["layers"]
    return [(layers, True)] if cfg.scan_layers else [(layers[i], False) for i in sorted(layers)]


def delta_weight(a: jax.Array, b: jax.Array, scaling: float, stacked: bool) -> jax.Array:
    """scaling · A · B in the base kernel's layout ([L,] in..., out...), float32."""
    lead = a.shape[:1] if stacked else ()
    in_shape, R, out_shape = a.shape[len(lead):-1], a.shape[-1], b.shape[len(lead) + 1:]
    a2 = a.astype(jnp.float32).reshape(*lead, math.prod(in_shape), R)
    b2 = b.astype(jnp.float32).reshape(*lead, R, math.prod(out_shape))
    w = jnp.einsum("...IR,...RO->...IO", a2, b2) * scaling
    return w.reshape(*lead, *in_shape, *out_shape)


def merged_params(base: dict, adapters: dict, cfg: ModelConfig, lora: LoraConfig, dtype=None) -> dict:
    """The base parameters with every adapter merged in: W + (alpha / r) · A · B, computed in float32 and
    stored in `dtype` (default: the base's). A pure dict of the plain model (no adapters), e.g. to export."""
    out = jax.tree.map(lambda x: x, base)  # a new tree of the same arrays
    for (block, stacked), (ablock, _) in zip(_blocks(out, cfg), _blocks(adapters, cfg)):
        for target in lora.targets:
            module, kernel = TARGET_KERNELS[target]
            ad = ablock[module][adapter_name(target)]
            w = block[module][kernel]
            merged = w.astype(jnp.float32) + delta_weight(ad["a"], ad["b"], lora.scaling, stacked)
            block[module][kernel] = merged.astype(dtype or w.dtype)
    return out


def count_adapter_params(cfg: ModelConfig, lora: LoraConfig) -> int:
    from agentlm_jax.model.llama import abstract_model

    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract_model(cfg, lora=lora), ADAPTERS)))


# ------------------------------------------------------------------------------------------ base identity
@jax.jit
def _leaf_fingerprints(leaves: list[jax.Array]) -> jax.Array:
    """Per array: Σ bits(x_i) · (2i + 1) mod 2^32 over its elements (bits: the raw integer of each element) and
    Σ bits(x_i) mod 2^32. Integer sums wrap exactly, so the value is the same for any sharding or order."""
    out = []
    for x in leaves:
        bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize])
        bits = bits.reshape(-1).astype(jnp.uint32)
        weights = jax.lax.iota(jnp.uint32, bits.shape[0]) * jnp.uint32(2) + jnp.uint32(1)
        out.append(jnp.stack([jnp.sum(bits * weights, dtype=jnp.uint32), jnp.sum(bits, dtype=jnp.uint32)]))
    return jnp.stack(out)


def base_fingerprint(base: dict) -> str:
    """A content hash of the frozen base parameters (names, shapes, dtypes and every bit), computed on the devices
    where they live: what a LoRA checkpoint records of its base, so a resume or an export with another base
    is refused."""
    from agentlm_jax import distributed

    flat = jax.tree_util.tree_leaves_with_path(base)
    sums = np.asarray(distributed.to_host(_leaf_fingerprints([x for _, x in flat])))
    h = hashlib.sha256()
    for (path, x), s in zip(flat, sums):
        h.update(f"{jax.tree_util.keystr(path)}:{x.shape}:{x.dtype}:{int(s[0])}:{int(s[1])};".encode())
    return h.hexdigest()


def tree_bytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


# ----------------------------------------------------------------------------------------------- creation
def abstract_adapters(cfg: ModelConfig, lora: LoraConfig) -> nnx.State:
    """The adapters' ShapeDtypeStructs (with their logical axes), nothing allocated."""
    from agentlm_jax.model.llama import abstract_model

    return nnx.state(abstract_model(cfg, lora=lora), ADAPTERS)


def init_adapters(cfg: ModelConfig, lora: LoraConfig, *, seed: int = 0, mesh: jax.sharding.Mesh | None = None,
                  rules=None) -> nnx.State:
    """Fresh adapters (A random, B zero), each created directly on its sharding when a mesh is given. The base
    weights of the model they are built with are never materialised (the compiler drops them)."""
    from agentlm_jax.config.schema import DEFAULT_RULES
    from agentlm_jax.model.llama import Llama
    from agentlm_jax.sharding import state_shardings

    def make():
        return nnx.state(Llama(cfg, rngs=nnx.Rngs(seed), lora=lora), ADAPTERS)

    shardings = None
    if mesh is not None:
        shardings = state_shardings(abstract_adapters(cfg, lora), mesh, rules or DEFAULT_RULES)
    return jax.jit(make, out_shardings=shardings)()
