"""LoRA against Hugging Face: the merged export equals the adapter model, and `peft` (PyTorch) on our PEFT
adapter directory over the HF base gives our logits; an adapter written by `peft` imports and gives peft's.

Tolerances (float32): the merged export against the adapter model ≤ 1e-5 (W + s·A·B rounds once more than
x·W + s·(x·A)·B); against PyTorch/peft ≤ 1e-4 (another matmul library, as tests/model/test_model.py).
"""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from agentlm_jax.config import ModelConfig
from agentlm_jax.config.schema import LoraConfig
from agentlm_jax.errors import ConfigError
from agentlm_jax.hf import export_hf, hf_config, import_hf
from agentlm_jax.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_adapter_config, export_peft, import_peft,
                              merged_export_params, peft_tensors, read_adapter_config)
from agentlm_jax.model import lora as lora_lib
from agentlm_jax.model.llama import Llama
from tests.helpers.hf import SMALL, hf_tensors, random_tokens, save_hf_model, single_segment_inputs, torch_logits

LORA = LoraConfig(enabled=True, rank=4, alpha=8.0, base_dtype="float32")
QWEN = ModelConfig(architecture="qwen2", vocab_size=256, hidden_size=64, intermediate_size=160, num_layers=2,
                   num_heads=4, num_kv_heads=2, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6,
                   tie_word_embeddings=True)
FAMILIES = {"llama-gqa": SMALL["gqa"], "qwen2-tied": QWEN}


def make_torch_model(cfg: ModelConfig, seed: int = 0):
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(cfg, "float32")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.15 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(cfg, torch model, HF dir, base params, trained-looking adapters) per model family."""
    cfg = FAMILIES[request.param]
    torch_model = make_torch_model(cfg)
    path = save_hf_model(torch_model, tmp_path_factory.mktemp(f"hf-{request.param}"))
    cfg, base = import_hf(path, show_progress=False)
    adapters = lora_lib.init_adapters(cfg, LORA, seed=1).to_pure_dict()
    rng = np.random.default_rng(0)  # B ≠ 0, as after training
    adapters = jax.tree.map(lambda x: np.asarray(x) + 0.1 * rng.standard_normal(x.shape).astype(np.float32), adapters)
    return cfg, torch_model, path, base.to_pure_dict(), adapters


def lora_logits(cfg, base, adapters, tokens, lora=LORA):
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), lora=lora)))
    model = nnx.merge(graphdef, lora_lib.merge_trees(base, adapters))
    return np.asarray(model(tokens, *single_segment_inputs(tokens)))


def plain_logits(cfg, params, tokens):
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
    return np.asarray(nnx.merge(graphdef, params)(tokens, *single_segment_inputs(tokens)))


def test_merged_export_equals_the_adapter_model(family, tmp_path):
    cfg, torch_model, _, base, adapters = family
    tokens = random_tokens(cfg, 2, 12)
    want = lora_logits(cfg, base, adapters, tokens)
    assert np.abs(want - plain_logits(cfg, base, tokens)).max() > 1e-2, "the adapters must change the logits"
    merged = merged_export_params(base, adapters, cfg, LORA, "float32")
    export_hf(merged, cfg, str(tmp_path / "merged"), dtype="float32", show_progress=False)
    cfg2, reloaded = import_hf(str(tmp_path / "merged"), show_progress=False)
    np.testing.assert_allclose(plain_logits(cfg2, reloaded.to_pure_dict(), tokens), want, atol=1e-5, rtol=0)
    import transformers

    hf_merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    np.testing.assert_allclose(torch_logits(hf_merged, tokens), want, atol=1e-4, rtol=0)


def test_peft_loads_our_adapter_and_gives_our_logits(family, tmp_path):
    import peft
    import torch

    cfg, torch_model, hf_dir, base, adapters = family
    out = str(tmp_path / "adapter")
    export_peft(adapters, cfg, LORA, out, base_model_name_or_path=hf_dir)
    assert sorted(os.listdir(out)) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    config = json.load(open(os.path.join(out, ADAPTER_CONFIG)))
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == ("LORA", "CAUSAL_LM", 4, 8.0)
    ours = hf_tensors(out)
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in ours
    assert tuple(ours["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape) == (cfg.hidden_size, 4)

    import copy

    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), out).eval()
    loaded = peft.get_peft_model_state_dict(peft_model)
    assert sorted(loaded) == sorted(ours), "no missing or unexpected adapter keys"
    assert all(torch.equal(loaded[k], ours[k]) for k in ours)
    tokens = random_tokens(cfg, 2, 12, seed=1)
    np.testing.assert_allclose(torch_logits(peft_model, tokens), lora_logits(cfg, base, adapters, tokens),
                               atol=1e-4, rtol=0)


def test_an_adapter_written_by_peft_imports_and_gives_peft_logits(family, tmp_path):
    import copy

    import peft
    import torch

    cfg, torch_model, _, base, _ = family
    lora = LoraConfig(enabled=True, rank=2, alpha=6.0, targets=("q", "v", "down"), base_dtype="float32")
    peft_model = peft.get_peft_model(copy.deepcopy(torch_model), peft.LoraConfig(
        r=2, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn_like(p))
    peft_model.save_pretrained(str(tmp_path / "theirs"))
    adapters = import_peft(str(tmp_path / "theirs"), cfg, lora).to_pure_dict()
    tokens = random_tokens(cfg, 2, 12, seed=2)
    np.testing.assert_allclose(lora_logits(cfg, base, adapters, tokens, lora), torch_logits(peft_model.eval(), tokens),
                               atol=1e-4, rtol=0)
    # and back out: the same tensors, bit for bit
    theirs = hf_tensors(tmp_path / "theirs")
    ours = peft_tensors(adapters, cfg, lora)
    assert sorted(theirs) == sorted(ours) and all(np.array_equal(theirs[k].numpy(), ours[k]) for k in ours)


def test_an_adapter_of_other_settings_is_refused_with_the_setting_to_use(family, tmp_path):
    cfg, _, _, _, adapters = family
    export_peft(adapters, cfg, LORA, str(tmp_path / "a"))
    config = read_adapter_config(str(tmp_path / "a"))
    with pytest.raises(ConfigError, match=r"r is 4 \(set lora.rank=4\).*set lora.alpha=8.0"):
        check_adapter_config(config, LoraConfig(enabled=True, rank=8, alpha=16.0), "here")
    with pytest.raises(ConfigError, match=r"set lora.targets=\[down,gate,k,o,q,up,v\]"):
        check_adapter_config(config, LoraConfig(enabled=True, rank=4, alpha=8.0, targets=("q",)), "here")


def test_unscanned_layers_merge_export_and_import_too(tmp_path):
    cfg = SMALL["gqa"].replace(scan_layers=False)
    from agentlm_jax.model.llama import init_model

    base = nnx.state(init_model(cfg, seed=0), nnx.Param).to_pure_dict()
    rng = np.random.default_rng(1)
    adapters = jax.tree.map(lambda x: np.asarray(x) + 0.1 * rng.standard_normal(x.shape).astype(np.float32),
                            lora_lib.init_adapters(cfg, LORA, seed=1).to_pure_dict())
    assert sorted(adapters["layers"]) == [0, 1]
    tokens = random_tokens(cfg, 2, 10)
    want = lora_logits(cfg, base, adapters, tokens)
    merged = jax.device_get(lora_lib.merged_params(base, adapters, cfg, LORA))
    np.testing.assert_allclose(plain_logits(cfg, merged, tokens), want, atol=1e-5, rtol=0)
    export_peft(adapters, cfg, LORA, str(tmp_path / "a"))
    back = import_peft(str(tmp_path / "a"), cfg, LORA).to_pure_dict()
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(adapters)))
