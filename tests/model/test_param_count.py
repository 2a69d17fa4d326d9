"""configs/llama2-*.yaml describe the official models: parameter counts from shapes alone (nothing allocated)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agentlm_jax.config import ModelConfig
from agentlm_jax.model.llama import count_params

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# Totals of meta-llama/Llama-2-{7,13,70}b-hf (sum of the tensors in their safetensors files).
KNOWN_TOTALS = {"llama2-7b": 6_738_415_616, "llama2-13b": 13_015_864_320, "llama2-70b": 68_976_648_192}
# Their config.json values that shape the architecture.
OFFICIAL = {
    "llama2-7b": dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, intermediate_size=11008),
    "llama2-13b": dict(hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40, intermediate_size=13824),
    "llama2-70b": dict(hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8, intermediate_size=28672),
}


def model_config(name: str) -> ModelConfig:
    return ModelConfig(**yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["model"])


@pytest.mark.parametrize("name", sorted(KNOWN_TOTALS))
def test_config_matches_official_and_parameter_count(name):
    cfg = model_config(name)
    for key, value in OFFICIAL[name].items():
        assert getattr(cfg, key) == value, key
    assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.rope_theta, cfg.rms_norm_eps) == (32000, 4096, 1e4, 1e-5)
    assert count_params(cfg) == KNOWN_TOTALS[name]


# Published sizes of meta-llama/Llama-3.1-8B (8.03B) and Qwen/Qwen2.5-7B (7.62B): the sums of their tensors.
# (tests/model/test_families.py checks that the configs equal the official config.json values.)
FAMILY_TOTALS = {"llama3.1-8b": 8_030_261_248, "qwen2.5-7b": 7_615_616_512}


@pytest.mark.parametrize("name", sorted(FAMILY_TOTALS))
def test_family_configs_load_and_match_the_published_size(name):
    from agentlm_jax.config import load_config

    cfg = load_config(str(CONFIGS / f"{name}.yaml"))  # the whole training config loads and passes its checks
    assert count_params(cfg.model) == FAMILY_TOTALS[name]
    assert round(count_params(cfg.model) / 1e9, 2) == {"llama3.1-8b": 8.03, "qwen2.5-7b": 7.62}[name]
