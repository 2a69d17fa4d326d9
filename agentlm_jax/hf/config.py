"""Our ModelConfig ↔ a Hugging Face `config.json`: `LlamaForCausalLM` (transformers.LlamaConfig: Llama 2, 3, 3.1,
3.2) and `Qwen2ForCausalLM` (transformers.Qwen2Config: Qwen 2.5).

Field names follow ours (`num_layers`, `num_kv_heads`, ...); `_HF_NAMES` maps those that differ. Fields that
describe how to run the model (config.RUNTIME_FIELDS) are never read from or written to config.json. A feature
the model does not have (another activation, Llama's attention or MLP biases, sliding-window attention, a rope
type other than default and llama3, quantization, ...) is an error naming the field, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
from typing import Any

import fsspec

from agentlm_jax.config import RUNTIME_FIELDS, ModelConfig
from agentlm_jax.config.schema import ROPE_TYPES, RopeScaling
from agentlm_jax.errors import ConfigError, MissingInputError, SetupError

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
# Llama-2-chat's own generation defaults (sampling, temperature 0.6, top-p 0.9); evaluators set their own.
CHAT_GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.6, "top_p": 0.9}
# ours → Hugging Face, where the names differ
_HF_NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
             "num_kv_heads": "num_key_value_heads"}
# ModelConfig.architecture → (config.json model_type, its transformers config class, its model class)
FAMILIES = {"llama": ("llama", "LlamaConfig", "LlamaForCausalLM"),
            "qwen2": ("qwen2", "Qwen2Config", "Qwen2ForCausalLM")}
# ModelConfig fields that are not plain config.json keys (written and read by to_hf / from_hf themselves)
_OWN_FIELDS = ("architecture", "rope_scaling", "tie_word_embeddings", "extra_eos_token_ids")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


class ArchitectureMismatchError(ConfigError):
    """The checkpoint's config.json describes another architecture than the configured model (import_hf's base)."""


class UnsupportedConfigError(SetupError, ValueError):
    """A config.json describes a model this project cannot run (another family, or a feature ours lacks)."""


def _refuse(key: str, got: Any, want: Any, architecture: str) -> None:
    raise UnsupportedConfigError(f"config.json: {key}={got!r} is not supported ({FAMILIES[architecture][2]} "
                                 f"here needs {key}={want!r})")


def from_hf(hf: dict[str, Any], **runtime: Any) -> ModelConfig:
    """The architecture of a Hugging Face Llama or Qwen2 `config.json` dict; `runtime` sets RUNTIME_FIELDS."""
    model_type = hf.get("model_type", "llama")
    architecture = next((a for a, (mt, _, _) in FAMILIES.items() if mt == model_type), None)
    if architecture is None:
        raise UnsupportedConfigError(f"config.json: model_type is {model_type!r}; supported: "
                                     f"{', '.join(repr(mt) for mt, _, _ in FAMILIES.values())}")
    _check_supported(hf, architecture)
    rope = hf.get("rope_parameters") or {}
    kwargs = {f.name: hf[_HF_NAMES.get(f.name, f.name)] for f in dataclasses.fields(ModelConfig)
              if f.name not in RUNTIME_FIELDS + _OWN_FIELDS and hf.get(_HF_NAMES.get(f.name, f.name)) is not None}
    kwargs.setdefault("num_kv_heads", kwargs.get("num_heads", ModelConfig.num_heads))
    if "rope_theta" in rope:  # transformers >= 5 nests it here
        kwargs["rope_theta"] = rope["rope_theta"]
    if kwargs.get("head_dim") == kwargs.get("hidden_size", 0) // kwargs.get("num_heads", 1):
        del kwargs["head_dim"]  # the default; keeps configs equal whether or not config.json spells it out
    if isinstance(kwargs.get("eos_token_id"), list):  # Llama 3.1: [<|end_of_text|>, <|eom_id|>, <|eot_id|>]
        kwargs["eos_token_id"], *extra = kwargs["eos_token_id"]
        kwargs["extra_eos_token_ids"] = tuple(extra)
    kwargs.update(architecture=architecture, rope_scaling=_rope_scaling(hf),
                  tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))
    return ModelConfig(**kwargs, **runtime)


def _check_supported(hf: dict[str, Any], architecture: str) -> None:
    """UnsupportedConfigError naming the first field that asks for something the model does not compute."""
    expected_class = FAMILIES[architecture][2]
    if any(not str(a).endswith("ForCausalLM") for a in hf.get("architectures") or ()):  # e.g. a classifier's head
        _refuse("architectures", hf["architectures"], [expected_class], architecture)
    required = {"hidden_act": "silu", "partial_rotary_factor": 1.0, "attention_dropout": 0.0,
                "quantization_config": None}
    if architecture == "llama":  # attention_bias would add biases to q, k, v *and* o
        required.update(attention_bias=False, mlp_bias=False)
    else:
        required.update(use_sliding_window=False)
    for key, want in required.items():
        got = hf.get(key)
        if got is not None and got != want:
            _refuse(key, got, want, architecture)
    if architecture == "qwen2" and any(t != "full_attention" for t in hf.get("layer_types") or ()):
        _refuse("layer_types", hf["layer_types"], ["full_attention"] * len(hf["layer_types"]), architecture)


def _rope_scaling(hf: dict[str, Any]) -> RopeScaling:
    """The rotary scaling of `rope_scaling` (transformers < 5) or `rope_parameters` (>= 5): default or llama3."""
    sources = {k: {n: v for n, v in hf[k].items() if n != "rope_theta"}
               for k in ("rope_parameters", "rope_scaling") if hf.get(k)}
    scaled = {k: d for k, d in sources.items() if d.get("rope_type", d.get("type", "default")) != "default"}
    if len(scaled) == 2 and scaled["rope_parameters"] != scaled["rope_scaling"]:
        raise UnsupportedConfigError(f"config.json: rope_parameters={hf['rope_parameters']!r} and rope_scaling="
                                     f"{hf['rope_scaling']!r} disagree; keep one")
    key = next(iter(scaled), next(iter(sources), "rope_parameters"))
    scaling = dict(sources.get(key, {}))
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    if scaling.pop("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedConfigError(f"config.json: {key}={hf[key]!r}: partial_rotary_factor must be 1.0 (rotary "
                                     f"on the whole head)")
    if rope_type not in ROPE_TYPES:
        raise UnsupportedConfigError(f"config.json: {key}={hf[key]!r} is not supported (rope types: "
                                     f"{', '.join(ROPE_TYPES)})")
    if rope_type == "default":
        if scaling:
            raise UnsupportedConfigError(f"config.json: {key} has {sorted(scaling)} with the default rope type; "
                                         f"only llama3 scaling is supported")
        return RopeScaling()
    unknown = sorted(set(scaling) - set(_LLAMA3_KEYS))
    missing = [k for k in _LLAMA3_KEYS[:3] if k not in scaling]
    if unknown or missing:
        raise UnsupportedConfigError(f"config.json: {key}={hf[key]!r}: llama3 scaling takes {', '.join(_LLAMA3_KEYS)}"
                                     + (f"; unknown: {', '.join(unknown)}" if unknown else "")
                                     + (f"; missing: {', '.join(missing)}" if missing else ""))
    # transformers falls back to max_position_embeddings when original_max_position_embeddings is absent
    original = scaling.get("original_max_position_embeddings", hf.get("original_max_position_embeddings",
                                                                      hf.get("max_position_embeddings")))
    try:
        return RopeScaling(rope_type="llama3", factor=float(scaling["factor"]),
                           low_freq_factor=float(scaling["low_freq_factor"]),
                           high_freq_factor=float(scaling["high_freq_factor"]),
                           original_max_position_embeddings=int(original))
    except ConfigError as e:
        raise UnsupportedConfigError(f"config.json: {key}: {e}") from None


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for the family's transformers config class (LlamaConfig, Qwen2Config)."""
    out = {_HF_NAMES.get(f.name, f.name): getattr(cfg, f.name) for f in dataclasses.fields(cfg)
           if f.name not in RUNTIME_FIELDS + _OWN_FIELDS}
    out["head_dim"] = cfg.resolved_head_dim
    if cfg.extra_eos_token_ids:
        out["eos_token_id"] = list(cfg.stop_token_ids)
    out.update(hidden_act="silu", tie_word_embeddings=cfg.tie_word_embeddings)
    if cfg.architecture == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    else:
        out.update(use_sliding_window=False)
    if cfg.rope_scaling.rope_type != "default":
        s = cfg.rope_scaling
        out["rope_scaling"] = {"rope_type": s.rope_type, "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                               "high_freq_factor": s.high_freq_factor,
                               "original_max_position_embeddings": s.original_max_position_embeddings}
    return out


def load_hf_config(model_dir: str, **runtime: Any) -> ModelConfig:
    """ModelConfig from `{model_dir}/config.json`; `runtime` sets RUNTIME_FIELDS (dtype, param_dtype, ...)."""
    fs, root = fsspec.core.url_to_fs(model_dir)
    path = posixpath.join(root, CONFIG_NAME)
    if not fs.exists(path):
        raise MissingInputError(f"{model_dir}: no {CONFIG_NAME}; not a Hugging Face model directory")
    try:
        with fs.open(path, "r") as f:
            hf = json.load(f)
        generation = posixpath.join(root, GENERATION_CONFIG_NAME)
        if not isinstance(hf.get("eos_token_id"), list) and fs.exists(generation):
            with fs.open(generation, "r") as f:  # Llama 3.1 base: the turn-ending ids are listed only here
                eos = json.load(f).get("eos_token_id")
            if isinstance(eos, list) and eos and hf.get("eos_token_id") in (None, eos[0]):
                hf = {**hf, "eos_token_id": eos}
        return from_hf(hf, **runtime)
    except ValueError as e:  # not JSON, an unsupported feature, or a value ModelConfig refuses
        raise UnsupportedConfigError(f"{model_dir}/{CONFIG_NAME}: {e}") from None


def check_architecture(cfg: ModelConfig, base: ModelConfig, model_dir: str) -> None:
    """ArchitectureMismatchError naming every field where the checkpoint's architecture differs from `base`."""
    diffs = [f"{f.name}: config.json has {getattr(cfg, f.name)!r}, the given config {getattr(base, f.name)!r}"
             for f in dataclasses.fields(cfg)
             if f.name not in RUNTIME_FIELDS + ("initializer_range", "extra_eos_token_ids") and getattr(cfg, f.name) != getattr(base, f.name)]
    if diffs:
        raise ArchitectureMismatchError(
            f"{model_dir}: the checkpoint's architecture differs from the configured model:\n  " + "\n  ".join(diffs)
            + f"\nSet the model section of your config to the checkpoint's {CONFIG_NAME} values (configs/"
            "llama2-7b.yaml, llama2-13b.yaml and llama2-70b.yaml carry the official Llama 2 ones, "
            "llama3.1-8b.yaml and qwen2.5-7b.yaml those of Llama 3.1 8B and Qwen 2.5 7B), or point init_from at "
            "a checkpoint of the configured model.")


def hf_config(cfg: ModelConfig, dtype: str):
    """The transformers config (LlamaConfig, Qwen2Config) of an architecture, for weights stored in `dtype`."""
    import transformers

    _, config_class, model_class = FAMILIES[cfg.architecture]
    return getattr(transformers, config_class)(**to_hf(cfg), architectures=[model_class], dtype=dtype)


def generation_config(config, defaults: dict | None = None):
    """`generation_config.json` for a model config: Llama-2-chat's sampling defaults unless `defaults` are given."""
    import transformers

    gen = transformers.GenerationConfig.from_model_config(config)
    for key, value in (CHAT_GENERATION_DEFAULTS if defaults is None else defaults).items():
        setattr(gen, key, value)
    return gen
