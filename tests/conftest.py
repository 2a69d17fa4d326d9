"""Test setup shared by every test module.

JAX sees 8 CPU devices (set before JAX is imported anywhere) so sharded code runs on a simulated mesh.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

pytest_plugins = ["tests.helpers.hf", "tests.helpers.training"]  # their fixtures, for every test module

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
SHAREGPT_SAMPLE = SHARED / "data" / "sharegpt_v3_first2000.jsonl"


@pytest.fixture(scope="session")
def gcs_bucket():
    """`gs://agentlm-test` on a local gcp-storage-emulator (127.0.0.1), for the whole session."""
    from tests.helpers.gcs_emulator import running_emulator

    with running_emulator() as url:
        yield url


@pytest.fixture(scope="session")
def llama2_tokenizer_path():
    """The real Llama 2 tokenizer directory when AGENTLM_LLAMA2_TOKENIZER names one, else skip."""
    path = os.environ.get("AGENTLM_LLAMA2_TOKENIZER")
    if not path:
        pytest.skip("AGENTLM_LLAMA2_TOKENIZER is not set (CI sets it to ../shared/fixtures/llama2-tokenizer)")
    if not Path(path).exists():
        pytest.fail(f"AGENTLM_LLAMA2_TOKENIZER={path} does not exist")
    return path


@pytest.fixture(scope="session")
def sharegpt_sample_path():
    """2,000 real ShareGPT conversations from ../shared when present (CI has it; a user's clone may not)."""
    if not SHAREGPT_SAMPLE.exists():
        pytest.skip(f"{SHAREGPT_SAMPLE} not present")
    return SHAREGPT_SAMPLE
