"""The Llama 2 architecture's hyperparameters. Field names follow ours; `to_hf`/`from_hf` map to LlamaConfig."""

from __future__ import annotations

import dataclasses
from typing import Any

# Fields that describe how to run the model, not the architecture: never read from or written to config.json.
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "scan_layers", "attention_impl", "attention_block_size")
# ours → Hugging Face LlamaConfig, where the names differ
_HF_NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
             "num_kv_heads": "num_key_value_heads"}

REMAT_POLICIES = ("none", "full", "save_dots")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("auto", "blockwise", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 1024
    hidden_size: int = 128  # D
    intermediate_size: int = 344  # F
    num_layers: int = 4  # L
    num_heads: int = 4  # N (query heads)
    num_kv_heads: int = 2  # K (key/value heads; K < N is grouped-query attention)
    head_dim: int | None = None  # H; None means hidden_size // num_heads
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of the (master) parameters
    remat: str = "none"  # one of REMAT_POLICIES
    scan_layers: bool = True
    # "blockwise" (model/blockwise_attention.py: skips masked tiles), or jax.nn.dot_product_attention's "xla"
    # (CPU/TPU) or "cudnn" (GPU); "auto": blockwise on CPU, else xla. Decoding with a KV cache uses xla in place of blockwise.
    attention_impl: str = "auto"
    attention_block_size: int = 128  # query/key block of the blockwise attention
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"model.{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"model.attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.attention_block_size < 1:
            raise ValueError(f"model.attention_block_size must be positive, got {self.attention_block_size}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_heads ({self.num_heads}) must be a multiple of "
                             f"model.num_kv_heads ({self.num_kv_heads})")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size ({self.hidden_size}) is not divisible by "
                             f"model.num_heads ({self.num_heads}); set model.head_dim")

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    # ------------------------------------------------------------------------- Hugging Face LlamaConfig
    @classmethod
    def from_hf(cls, hf: dict[str, Any], **runtime: Any) -> "ModelConfig":
        """Architecture from a Hugging Face Llama `config.json` dict; `runtime` sets RUNTIME_FIELDS."""
        if hf.get("model_type", "llama") != "llama":
            raise ValueError(f"config.json: model_type is {hf.get('model_type')!r}; only 'llama' is supported")
        unsupported = {
            "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
            "attention_bias": (hf.get("attention_bias", False), False),
            "mlp_bias": (hf.get("mlp_bias", False), False),
            "tie_word_embeddings": (hf.get("tie_word_embeddings", False), False),
            "rope_scaling": (_rope_scaling(hf), None),
        }
        for key, (got, want) in unsupported.items():
            if got != want:
                raise ValueError(f"config.json: {key}={got!r} is not supported (Llama 2 has {key}={want!r})")
        rope = hf.get("rope_parameters") or {}
        kwargs = {f.name: hf[_HF_NAMES.get(f.name, f.name)] for f in dataclasses.fields(cls)
                  if f.name not in RUNTIME_FIELDS and hf.get(_HF_NAMES.get(f.name, f.name)) is not None}
        kwargs.setdefault("num_kv_heads", kwargs.get("num_heads", cls.num_heads))
        if "rope_theta" in rope:  # transformers >= 5 nests it here
            kwargs["rope_theta"] = rope["rope_theta"]
        if kwargs.get("head_dim") == kwargs.get("hidden_size", 0) // kwargs.get("num_heads", 1):
            del kwargs["head_dim"]  # the default; keeps configs equal whether or not config.json spells it out
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        return cls(**kwargs, **runtime)

    def to_hf(self) -> dict[str, Any]:
        """Keyword arguments for `transformers.LlamaConfig` describing this architecture."""
        out = {_HF_NAMES.get(f.name, f.name): getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in RUNTIME_FIELDS}
        out["head_dim"] = self.resolved_head_dim
        out.update(hidden_act="silu", tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
        return out


def _rope_scaling(hf: dict[str, Any]) -> Any:
    """None unless the config asks for a non-default rotary scaling (Llama 2 uses none)."""
    scaling = hf.get("rope_scaling") or None
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        scaling = rope
    return scaling
