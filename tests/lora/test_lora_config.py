"""lora.* keys: defaults, checks whose errors name the valid values, the shipped LoRA config."""

import pytest

from agentlm_jax.config import load_config
from agentlm_jax.config.schema import LORA_TARGETS
from agentlm_jax.errors import ConfigError
from tests.conftest import REPO_ROOT


def test_defaults_are_off_and_target_every_projection():
    cfg = load_config(None, [])
    assert not cfg.lora.enabled and cfg.lora.targets == LORA_TARGETS == ("q", "k", "v", "o", "gate", "up", "down")
    assert cfg.lora.scaling == 2.0 and cfg.adapter_path == "runs/tiny/adapter"
    assert load_config(None, ["lora.targets=[q, v]"]).lora.targets == ("q", "v")


@pytest.mark.parametrize("override, message", [
    ("lora.targets=[q, query]", r"unknown target\(s\) \['query'\]; the valid ones are \['q', 'k', 'v', 'o', 'gate', 'up', 'down'\]"),
    ("lora.targets=[]", "at least one projection"),
    ("lora.rank=0", "lora.rank must be > 0"),
    ("lora.base_dtype=int8", "lora.base_dtype must be one of"),
    ("lora.dropout=1.0", r"lora.dropout must be in \[0, 1\)"),
])
def test_bad_values_name_the_key_and_what_to_use(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["lora.enabled=true", override])


def test_the_shipped_70b_lora_config():
    cfg = load_config(str(REPO_ROOT / "configs" / "llama2-70b-lora.yaml"))
    assert cfg.lora.enabled and cfg.lora.rank == 16 and cfg.lora.base_dtype == "bfloat16"
    from agentlm_jax.model.lora import count_adapter_params

    assert count_adapter_params(cfg.model, cfg.lora) == 207_093_760
