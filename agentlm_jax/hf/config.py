"""Our ModelConfig ↔ a Hugging Face Llama `config.json` (transformers.LlamaConfig).

Field names follow ours (`num_layers`, `num_kv_heads`, ...); `_HF_NAMES` maps those that differ. Fields that
describe how to run the model (config.RUNTIME_FIELDS) are never read from or written to config.json. A field
Llama 2 does not have (another activation, biases, tied embeddings, rope scaling) is an error naming it.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
from typing import Any

import fsspec

from agentlm_jax.config import RUNTIME_FIELDS, ModelConfig
from agentlm_jax.errors import ConfigError, MissingInputError, SetupError

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
# Llama-2-chat's own generation defaults (sampling, temperature 0.6, top-p 0.9); evaluators set their own.
CHAT_GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.6, "top_p": 0.9}
# ours → Hugging Face LlamaConfig, where the names differ
_HF_NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
             "num_kv_heads": "num_key_value_heads"}


class ArchitectureMismatchError(ConfigError):
    """The checkpoint's config.json describes another architecture than the configured model (import_hf's base)."""


class UnsupportedConfigError(SetupError, ValueError):
    """A config.json describes a model this project cannot run (not Llama, or a feature Llama 2 does not have)."""


def from_hf(hf: dict[str, Any], **runtime: Any) -> ModelConfig:
    """The architecture of a Hugging Face Llama `config.json` dict; `runtime` sets RUNTIME_FIELDS."""
    if hf.get("model_type", "llama") != "llama":
        raise UnsupportedConfigError(f"config.json: model_type is {hf.get('model_type')!r}; only 'llama' is supported")
    unsupported = {
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "attention_bias": (hf.get("attention_bias", False), False),
        "mlp_bias": (hf.get("mlp_bias", False), False),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", False), False),
        "rope_scaling": (_rope_scaling(hf), None),
    }
    for key, (got, want) in unsupported.items():
        if got != want:
            raise UnsupportedConfigError(f"config.json: {key}={got!r} is not supported (Llama 2 has {key}={want!r})")
    rope = hf.get("rope_parameters") or {}
    kwargs = {f.name: hf[_HF_NAMES.get(f.name, f.name)] for f in dataclasses.fields(ModelConfig)
              if f.name not in RUNTIME_FIELDS and hf.get(_HF_NAMES.get(f.name, f.name)) is not None}
    kwargs.setdefault("num_kv_heads", kwargs.get("num_heads", ModelConfig.num_heads))
    if "rope_theta" in rope:  # transformers >= 5 nests it here
        kwargs["rope_theta"] = rope["rope_theta"]
    if kwargs.get("head_dim") == kwargs.get("hidden_size", 0) // kwargs.get("num_heads", 1):
        del kwargs["head_dim"]  # the default; keeps configs equal whether or not config.json spells it out
    if isinstance(kwargs.get("eos_token_id"), list):
        kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
    return ModelConfig(**kwargs, **runtime)


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for `transformers.LlamaConfig` describing this architecture."""
    out = {_HF_NAMES.get(f.name, f.name): getattr(cfg, f.name) for f in dataclasses.fields(cfg)
           if f.name not in RUNTIME_FIELDS}
    out["head_dim"] = cfg.resolved_head_dim
    out.update(hidden_act="silu", tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    return out


def _rope_scaling(hf: dict[str, Any]) -> Any:
    """None unless the config asks for a non-default rotary scaling (Llama 2 uses none)."""
    scaling = hf.get("rope_scaling") or None
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        scaling = rope
    return scaling


def load_hf_config(model_dir: str, **runtime: Any) -> ModelConfig:
    """ModelConfig from `{model_dir}/config.json`; `runtime` sets RUNTIME_FIELDS (dtype, param_dtype, ...)."""
    fs, root = fsspec.core.url_to_fs(model_dir)
    path = posixpath.join(root, CONFIG_NAME)
    if not fs.exists(path):
        raise MissingInputError(f"{model_dir}: no {CONFIG_NAME}; not a Hugging Face model directory")
    try:
        with fs.open(path, "r") as f:
            return from_hf(json.load(f), **runtime)
    except ValueError as e:  # not JSON, an unsupported feature, or a value ModelConfig refuses
        raise UnsupportedConfigError(f"{model_dir}/{CONFIG_NAME}: {e}") from None


def check_architecture(cfg: ModelConfig, base: ModelConfig, model_dir: str) -> None:
    """ArchitectureMismatchError naming every field where the checkpoint's architecture differs from `base`."""
    diffs = [f"{f.name}: config.json has {getattr(cfg, f.name)!r}, the given config {getattr(base, f.name)!r}"
             for f in dataclasses.fields(cfg)
             if f.name not in RUNTIME_FIELDS + ("initializer_range",) and getattr(cfg, f.name) != getattr(base, f.name)]
    if diffs:
        raise ArchitectureMismatchError(
            f"{model_dir}: the checkpoint's architecture differs from the configured model:\n  " + "\n  ".join(diffs)
            + f"\nSet the model section of your config to the checkpoint's {CONFIG_NAME} values (configs/"
            "llama2-7b.yaml, llama2-13b.yaml and llama2-70b.yaml carry the official Llama 2 ones), or point "
            "init_from at a checkpoint of the configured model.")


def hf_config(cfg: ModelConfig, dtype: str):
    """The `transformers.LlamaConfig` of an architecture, for weights stored in `dtype`."""
    import transformers

    return transformers.LlamaConfig(**to_hf(cfg), architectures=["LlamaForCausalLM"], dtype=dtype)


def generation_config(config, defaults: dict | None = None):
    """`generation_config.json` for a LlamaConfig: Llama-2-chat's sampling defaults unless `defaults` are given."""
    import transformers

    gen = transformers.GenerationConfig.from_model_config(config)
    for key, value in (CHAT_GENERATION_DEFAULTS if defaults is None else defaults).items():
        setattr(gen, key, value)
    return gen
