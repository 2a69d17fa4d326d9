"""The export's contract with its user: bad arguments are refused before anything heavy runs, in one
`error: ...` line (exit 1) or argparse's usage line (exit 2); a non-empty output is refused unless
--overwrite, which removes an earlier export's files and nothing else; progress suits a log file."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import fsspec
import numpy as np
import pytest
import torch
import transformers

from agentlm_jax import export, hf
from agentlm_jax.errors import MissingInputError
from agentlm_jax.hf.save import ExistingExportError
from agentlm_jax.model_source import check_source
from tests.helpers.cli import error_line, refuse_loading
from tests.helpers.hf import random_tokens, torch_logits


@pytest.fixture
def no_loading(monkeypatch):
    refuse_loading(monkeypatch, export, "load_params")


def _error_line(argv) -> str:
    return error_line(export.main, argv)


def test_a_bad_shard_size_is_refused_before_loading(orbax_run, tmp_path, no_loading, capsys):
    directory, _ = orbax_run
    with pytest.raises(SystemExit) as exit_:
        export.main(["--checkpoint", directory, "--output", str(tmp_path / "out"), "--max-shard-size", "5XB"])
    assert exit_.value.code == 2
    assert "argument --max-shard-size: cannot parse size '5XB'" in capsys.readouterr().err


def test_user_errors_are_one_line_before_loading(orbax_run, hf_checkpoints, tmp_path, no_loading):
    directory, _ = orbax_run
    _, _, hf_dir = hf_checkpoints["mha"]
    out = str(tmp_path / "out")
    assert "--checkpoint /nonexistent/run: does not exist" in _error_line(
        ["--checkpoint", "/nonexistent/run", "--output", out])
    assert f"--checkpoint {tmp_path}: neither a Hugging Face model directory" in _error_line(
        ["--checkpoint", str(tmp_path), "--output", out])
    assert "--step 5: no checkpoint for that step" in _error_line(
        ["--checkpoint", directory, "--step", "5", "--output", out])
    assert "available steps: [3, 7]" in _error_line(["--checkpoint", directory, "--step", "5", "--output", out])
    assert "--step applies to orbax checkpoints" in _error_line(["--hf", hf_dir, "--step", "1", "--output", out])
    assert "use --checkpoint" in _error_line(["--hf", directory, "--output", out])
    assert "is the source --hf" in _error_line(["--hf", hf_dir, "--output", hf_dir, "--overwrite"])
    assert "--tokenizer /no/such/tokenizer: does not exist" in _error_line(
        ["--checkpoint", directory, "--output", out, "--tokenizer", "/no/such/tokenizer"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "model.safetensors").write_bytes(b"old")
    assert "not empty (model.safetensors); choose a new directory, or overwrite it (--overwrite" in _error_line(
        ["--checkpoint", directory, "--output", str(tmp_path / "full")])
    (tmp_path / "a-file").write_text("")
    assert "is a file" in _error_line(["--checkpoint", directory, "--output", str(tmp_path / "a-file")])
    assert f"cannot be created, {tmp_path / 'a-file'} is a file" in _error_line(
        ["--checkpoint", directory, "--output", str(tmp_path / "a-file" / "out")])


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_output_is_refused_before_loading(orbax_run, tmp_path, no_loading):
    directory, _ = orbax_run
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert "is not writable" in _error_line(["--checkpoint", directory, "--output", str(locked / "out")])


@pytest.mark.parametrize("argv", [["--dtype", "float8"], ["--step", "-1"], ["--step", "latest"]])
def test_bad_option_values_are_usage_errors(orbax_run, tmp_path, no_loading, argv, capsys):
    directory, _ = orbax_run
    with pytest.raises(SystemExit) as exit_:
        export.main(["--checkpoint", directory, "--output", str(tmp_path / "out"), *argv])
    assert exit_.value.code == 2 and f"argument {argv[0]}:" in capsys.readouterr().err


def test_a_missing_checkpoint_is_one_line_on_stderr_and_nothing_else(tmp_path):
    """As a user sees it: no traceback, no orbax INFO lines, exit status 1."""
    proc = subprocess.run([sys.executable, "-m", "agentlm_jax.export", "--checkpoint", "/nonexistent/run",
                           "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: --checkpoint /nonexistent/run: does not exist; give a Hugging Face model directory or a training "
        "run's checkpoint directory (local or gs://)"]


# -------------------------------------------------------------------------------------------- overwrite
def _stale_export(fs, root: str, imported_gqa, cfg) -> None:
    """An earlier export with 3+ shards, a stale single-file model, a chat_template.jinja, and a user's files."""
    _, params = imported_gqa
    hf.export_hf(params, cfg, root, dtype="float32", max_shard_size="60KB", show_progress=False)
    with fs.open(f"{root}/model.safetensors", "wb") as f:  # what from_pretrained would pick if left over
        f.write(open(__file__, "rb").read())
    fs.makedirs(f"{root}/eval", exist_ok=True)
    for name, text in (("chat_template.jinja", "{{ 'stale' }}"), ("NOTES.md", "mine"), ("eval/results.json", "{}")):
        with fs.open(f"{root}/{name}", "w") as f:
            f.write(text)


@pytest.fixture(scope="module")
def imported(hf_checkpoints):
    return {name: hf.import_hf(path, show_progress=False) for name, (_, _, path) in hf_checkpoints.items()}


def test_a_non_empty_output_is_refused_and_overwrite_removes_only_the_old_export(hf_checkpoints, imported, tmp_path):
    from data_pipeline.formats.tokenizer import SAMPLE_TOKENIZER_DIR

    cfg, _, _ = hf_checkpoints["gqa"]
    mha_cfg, mha_torch, _ = hf_checkpoints["mha"]
    out = tmp_path / "out"
    fs = fsspec.filesystem("file")
    _stale_export(fs, str(out), imported["gqa"], cfg)
    before = sorted(os.listdir(out))
    with pytest.raises(ExistingExportError, match="is not empty"):
        hf.export_hf(imported["mha"][1], mha_cfg, str(out), dtype="float32", show_progress=False)
    assert sorted(os.listdir(out)) == before

    hf.export_hf(imported["mha"][1], mha_cfg, str(out), dtype="float32", overwrite=True, show_progress=False,
                 tokenizer_path=SAMPLE_TOKENIZER_DIR)
    assert "model.safetensors" not in os.listdir(out) and "chat_template.jinja" not in os.listdir(out)
    shards = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    assert shards == ["model-00001-of-00001.safetensors"]
    assert (out / "NOTES.md").read_text() == "mine" and (out / "eval" / "results.json").read_text() == "{}"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tokens = random_tokens(mha_cfg, 1, 7)
    np.testing.assert_allclose(torch_logits(loaded, tokens), torch_logits(mha_torch, tokens), atol=1e-6)


def test_overwrite_on_gcs(hf_checkpoints, imported, gcs_bucket):
    cfg, _, _ = hf_checkpoints["gqa"]
    mha_cfg, _, _ = hf_checkpoints["mha"]
    url = f"{gcs_bucket}/overwrite-test"
    fs, root = fsspec.core.url_to_fs(url)
    _stale_export(fs, url, imported["gqa"], cfg)
    with pytest.raises(ExistingExportError, match="is not empty"):
        hf.export_hf(imported["mha"][1], mha_cfg, url, dtype="float32", show_progress=False)
    hf.export_hf(imported["mha"][1], mha_cfg, url, dtype="float32", overwrite=True, show_progress=False)
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    assert names == ["NOTES.md", "config.json", "eval", "generation_config.json", "model-00001-of-00001.safetensors",
                     "model.safetensors.index.json"]
    cfg2, _ = hf.import_hf(url, show_progress=False)
    assert cfg2 == mha_cfg
    assert check_source(url) == "hf"
    with pytest.raises(MissingInputError, match="does not exist"):
        check_source(f"{gcs_bucket}/no-such-model")


def test_export_cli_overwrite(hf_checkpoints, tmp_path):
    _, _, source = hf_checkpoints["mha"]
    out = tmp_path / "out"
    export.main(["--hf", source, "--output", str(out), "--dtype", "float32"])
    with pytest.raises(SystemExit, match="not empty"):
        export.main(["--hf", source, "--output", str(out), "--dtype", "bfloat16"])
    export.main(["--hf", source, "--output", str(out), "--dtype", "bfloat16", "--overwrite"])
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


# --------------------------------------------------------------------------------------------- progress
def test_progress_is_log_lines_off_a_terminal_and_nothing_when_off(hf_checkpoints, imported, tmp_path, capsys,
                                                                   caplog):
    """stderr is not a terminal under pytest, as in a log file: no tqdm redraws, a plain line instead."""
    cfg, _, source = hf_checkpoints["mha"]
    _, params = imported["mha"]
    with caplog.at_level(logging.INFO):
        hf.export_hf(params, cfg, str(tmp_path / "quiet"), dtype="float32", show_progress=False)
        hf.import_hf(source, show_progress=False)
    assert "\r" not in capsys.readouterr().err
    assert not [r for r in caplog.records if "tensor" in r.getMessage()]

    caplog.clear()
    with caplog.at_level(logging.INFO):
        hf.export_hf(params, cfg, str(tmp_path / "shown"), dtype="float32", show_progress=True)
        hf.import_hf(source, show_progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b[" not in err
    n = len(hf.mapping.tensor_entries(cfg, params.to_pure_dict()))
    lines = [r.getMessage() for r in caplog.records if "tensor" in r.getMessage()]
    assert any(line.startswith(f"export {tmp_path / 'shown'}: {n}/{n} tensor (100%)") for line in lines), lines
    assert any(line.startswith(f"import {source}: {n}/{n} tensor (100%)") for line in lines), lines
