"""generate's contract with its user: bad arguments are refused before any model loads, in one `error: ...`
line (exit 1) or argparse's usage line (exit 2) for an invalid option value."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from agentlm_jax import generate
from tests.helpers.cli import error_line, refuse_loading


@pytest.fixture
def no_loading(monkeypatch):
    refuse_loading(monkeypatch, generate, "load_model")


def _error_line(argv) -> str:
    return error_line(generate.main, argv)


def test_a_missing_model_is_one_line_on_stderr_and_nothing_else():
    """It used to print ~15 orbax INFO lines, then a misleading 'no tokenizer found'."""
    proc = subprocess.run([sys.executable, "-m", "agentlm_jax.generate", "--model", "/nonexistent", "--prompt", "hi"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: --model /nonexistent: does not exist; give a Hugging Face model directory or a training run's "
        "checkpoint directory (local or gs://)"]


def test_user_errors_are_one_line_before_loading(orbax_run, hf_checkpoints, tmp_path, no_loading):
    directory, _ = orbax_run
    _, _, hf_dir = hf_checkpoints["mha"]  # weights and config, no tokenizer files
    assert f"--model {tmp_path}: neither a Hugging Face model directory" in _error_line(
        ["--model", str(tmp_path), "--prompt", "hi"])
    assert f"--model {hf_dir} has no tokenizer files and records no tokenizer; pass --tokenizer DIR" in _error_line(
        ["--model", hf_dir, "--prompt", "hi"])
    assert "--tokenizer /no/such/dir: does not exist" in _error_line(
        ["--model", directory, "--prompt", "hi", "--tokenizer", "/no/such/dir"])
    assert "--step 4: no checkpoint for that step" in _error_line(["--model", directory, "--step", "4", "--prompt", "hi"])
    assert "--step applies to orbax checkpoints" in _error_line(["--model", hf_dir, "--step", "4", "--prompt", "hi"])
    no_tokenizer = tmp_path / "tok"
    no_tokenizer.mkdir()
    assert "no tokenizer.model or tokenizer.json in it" in _error_line(
        ["--model", directory, "--prompt", "hi", "--tokenizer", str(no_tokenizer)])


def test_a_run_whose_recorded_tokenizer_is_gone_says_so(orbax_run, tmp_path, no_loading, monkeypatch):
    directory, _ = orbax_run
    monkeypatch.setattr(generate, "default_tokenizer", lambda *a, **k: str(tmp_path / "moved-dataset/tokenizer"))
    assert "the tokenizer of --model" in _error_line(["--model", directory, "--prompt", "hi"])


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "0"], "argument --temperature: must be > 0 (for always the most likely token, use --greedy)"),
    (["--temperature", "nan"], "argument --temperature: must be > 0"),
    (["--top-p", "0"], "argument --top-p: must be in (0, 1], got 0"),
    (["--top-p", "1.5"], "argument --top-p: must be in (0, 1], got 1.5"),
    (["--top-k", "-1"], "argument --top-k: must be >= 0, got -1"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1, got 0"),
    (["--seed", "-3"], "argument --seed: must be >= 0, got -3"),
    (["--step", "x"], "argument --step: not a step number: 'x'"),
    (["--dtype", "float16"], "argument --dtype: invalid choice"),
    (["--system-prompt", "Be brief."], "--system-prompt applies to --chat prompts only"),
])
def test_bad_option_values_are_usage_errors(argv, message, no_loading, capsys):
    with pytest.raises(SystemExit) as exit_:
        generate.main(["--model", "/whatever", "--prompt", "hi", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_a_step_orbax_cannot_restore_is_one_line(orbax_run, monkeypatch):
    """On gs:// an unfinished save's step directory exists (orbax marks completion with a file), so the listing
    accepts the step and orbax then refuses it: still one error line, not a traceback."""
    from agentlm_jax import model_source

    directory, _ = orbax_run

    def unfinished(path, step=None, shardings=None):
        raise FileNotFoundError(f"no checkpoint for step {step} in {path}; available steps: [3]")

    monkeypatch.setattr(model_source, "load_model_params", unfinished)
    assert "no checkpoint for step 7" in _error_line(["--model", directory, "--step", "7", "--prompt", "hi"])


def test_chat_prompts_use_the_template_the_data_was_built_with(tmp_path):
    """A tokenizer directory with the dataset's chat_template.jinja (a Jinja build): the prompt is that template's
    rendering with the generation prompt, no system message unless one is given; without one: Llama 2's."""
    from agentlm_jax.generate import encode_prompts
    from tests.data_pipeline import hf_fixtures as fx

    tok_dir = fx.make_tokenizer_dir(tmp_path / "tok", fx.template_text("llama3.jinja"), in_config=False)
    tok = fx.load(tok_dir)
    got = encode_prompts(tok, ["hi there"], chat=True, system_prompt=None, tokenizer_dir=tok_dir)[0]
    want = tok.apply_chat_template([{"role": "user", "content": "hi there"}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False)
    assert got == list(want)
    assert tok.decode(got).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    with_system = encode_prompts(tok, ["hi there"], chat=True, system_prompt="Be brief.", tokenizer_dir=tok_dir)[0]
    assert "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>" in tok.decode(with_system)
    os.remove(os.path.join(tok_dir, "chat_template.jinja"))
    llama2 = encode_prompts(tok, ["hi there"], chat=True, system_prompt=None, tokenizer_dir=tok_dir)[0]
    assert "[INST]" in tok.decode(llama2) and "<<SYS>>" in tok.decode(llama2)
