"""The training config: YAML + dotted overrides, type checks with errors that name the key, the shipped configs."""

import pytest

from agentlm_jax import train
from agentlm_jax.config import ConfigError, TrainConfig, load_config, parse_overrides, to_yaml
from agentlm_jax.config import ModelConfig
from agentlm_jax.model.llama import count_params
from agentlm_jax.training.optimizer import warmup_and_decay_steps

# The official Hugging Face config.json values of Llama-2-{7,13,70}b-chat.
HF_LLAMA2 = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64, num_kv_heads=8),
}
PAPER_LR = {"7b": 5e-5, "13b": 5e-5, "70b": 1e-5}
PARAMS_B = {"7b": 6.74, "13b": 13.02, "70b": 68.98}


def test_tiny_yaml_resolves_to_the_defaults_the_no_argument_run_uses():
    assert load_config("configs/tiny.yaml") == TrainConfig()
    assert TrainConfig().model == ModelConfig(max_position_embeddings=1024)


@pytest.mark.parametrize("size", ["7b", "13b", "70b"])
def test_llama2_configs_carry_the_paper_recipe(size):
    cfg = load_config(f"configs/llama2-{size}.yaml")
    m = cfg.model
    assert {k: getattr(m, k) for k in HF_LLAMA2[size]} == HF_LLAMA2[size]
    assert (m.vocab_size, m.max_position_embeddings, m.rms_norm_eps, m.rope_theta) == (32000, 4096, 1e-5, 1e4)
    assert count_params(m) / 1e9 == pytest.approx(PARAMS_B[size], abs=0.01)
    assert (m.dtype, m.param_dtype) == ("bfloat16", "float32") and m.remat != "none"
    o = cfg.optimizer
    assert o.learning_rate == PAPER_LR[size]
    assert (o.b1, o.b2, o.eps, o.weight_decay, o.clip_norm) == (0.9, 0.95, 1e-8, 0.1, 1.0)
    assert warmup_and_decay_steps(o, cfg.steps) == (40, 1800) and cfg.steps == 2000
    assert (cfg.data.global_batch, cfg.data.max_seq_len) == (64, 4096)
    assert cfg.init_from and "chat" in cfg.init_from
    assert m.num_kv_heads % cfg.mesh.tensor == 0


def test_overrides_are_parsed_as_yaml_and_coerced_to_the_field_types():
    cfg = load_config("configs/llama2-7b.yaml", [
        "optimizer.learning_rate=2e-5",  # YAML 1.1 reads this as a string
        "mesh.tensor=2", "checkpoint.async_save=false", "init_from=null", "loss.chunk_size=512",
        "logging.peak_flops_per_device=1e12", "mesh.rules=[[batch, [data, fsdp]], [vocab, tensor]]",
    ])
    assert cfg.optimizer.learning_rate == 2e-5 and isinstance(cfg.optimizer.learning_rate, float)
    assert cfg.mesh.tensor == 2 and cfg.checkpoint.async_save is False and cfg.init_from is None
    assert cfg.loss.chunk_size == 512 and cfg.logging.peak_flops_per_device == 1e12
    assert cfg.mesh.rules == (("batch", ("data", "fsdp")), ("vocab", "tensor"))
    assert cfg.model.hidden_size == 4096, "keys not overridden keep the file's values"
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=1e-5", "unknown config key(s) optimizer.lr; optimizer has: b1, b2"),
    ("data.global_batch=many", "data.global_batch: expected int, got 'many'"),
    ("steps=2.5", "steps: expected int, got 2.5"),
    ("model.remat=sometimes", "model.remat must be one of"),
    ("loss.chunk_size=100", "loss.chunk_size (100) must divide data.max_seq_len (1024)"),
    ("data.micro_batches=3", "data.global_batch (2) must be a multiple of data.micro_batches (3)"),
    ("data.max_seq_len=4096", "data.max_seq_len (4096) exceeds model.max_position_embeddings (1024)"),
    ("optimizer=3", "optimizer: expected a mapping"),
    ("mesh.fsdp=-1", None),  # valid
    ("no_equals_sign", "is not of the form key=value"),
])
def test_bad_values_are_errors_that_name_the_key(override, message):
    if message is None:
        load_config(None, [override])
        return
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_missing_or_invalid_yaml_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="config file .*nope.yaml not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {global_batch: [1, 2]}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: data.global_batch: expected int"):
        load_config(str(bad))


def test_resolved_yaml_loads_back_to_the_same_config(tmp_path):
    cfg = load_config("configs/llama2-70b.yaml", ["data.micro_batches=4", "mesh.rules=[[batch, fsdp]]"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(str(path)) == cfg


def test_cli_exits_with_the_config_error(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--config", "configs/tiny.yaml", "optimizer.learning_rate=fast"])
    assert "optimizer.learning_rate: expected float, got 'fast'" in str(e.value.code)
