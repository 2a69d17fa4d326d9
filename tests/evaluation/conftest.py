"""Shared fixtures of the evaluation tests: a tiny random Llama on the bundled tokenizer's vocabulary, the
bundled sample built by data_pipeline, and AgentBench's DBBench items from ../shared when it is there."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from agentlm_jax.config import ModelConfig

TINY_EVAL = ModelConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, max_position_embeddings=2048, initializer_range=0.2)
SHARED_DBBENCH = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "dbbench")


@pytest.fixture(scope="session")
def tokenizer():
    from data_pipeline.formats.tokenizer import SAMPLE_TOKENIZER_DIR, load_tokenizer

    return load_tokenizer(SAMPLE_TOKENIZER_DIR)


@pytest.fixture(scope="session")
def tiny_model():
    from agentlm_jax.model.llama import init_model

    return init_model(TINY_EVAL, seed=0)


@pytest.fixture(scope="session")
def tiny_lm(tiny_model, tokenizer):
    from agentlm_jax.evaluation.lm import LM

    return LM(tiny_model, tokenizer, batch_size=4)


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    """The bundled sample, built by data_pipeline with its defaults (the sample tokenizer)."""
    out = str(tmp_path_factory.mktemp("eval-data") / "sample")
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.build", "--output", out], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def tiny_hf_dir(tiny_model, tmp_path_factory):
    from agentlm_jax.hf.save import export_hf
    from data_pipeline.formats.tokenizer import SAMPLE_TOKENIZER_DIR

    path = str(tmp_path_factory.mktemp("tiny-hf"))
    export_hf(tiny_model, TINY_EVAL, path, tokenizer_path=SAMPLE_TOKENIZER_DIR, show_progress=False, overwrite=True)
    return path


def shared_items(name: str):
    """AgentBench's dbbench items (../shared/data/dbbench), or skip: a user's clone has no ../shared."""
    path = os.path.abspath(os.path.join(SHARED_DBBENCH, f"{name}.jsonl"))
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent (AgentBench's DBBench items live outside the repository, in ../shared)")
    from agentlm_jax.evaluation.dbbench import load_items

    return load_items(path)[0]
