"""The Llama 2 architecture's hyperparameters. Field names follow ours; `to_hf`/`from_hf` map to LlamaConfig."""

from __future__ import annotations

import dataclasses

REMAT_POLICIES = ("none", "full", "save_dots")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("xla", "cudnn")


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
    attention_impl: str = "xla"  # jax.nn.dot_product_attention implementation: "xla" (CPU/TPU) or "cudnn"
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
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_heads ({self.num_heads}) must be a multiple of "
                             f"model.num_kv_heads ({self.num_kv_heads})")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size ({self.hidden_size}) is not divisible by "
                             f"model.num_heads ({self.num_heads}); set model.head_dim")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads
