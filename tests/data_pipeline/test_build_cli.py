"""The build's command line and output directory: unknown options, one-line errors, staging and --overwrite."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipeline import build_sample_dataset
from data_pipeline.build import main, parse_args
from data_pipeline.config import SAMPLE_DATA
from data_pipeline.errors import OutputError
from data_pipeline.formats import records

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("argv,hint", [(["--etaa", "0.3"], "did you mean --eta?"),
                                       (["--num_shard=8"], "did you mean --num-shards?"),
                                       (["--setup-file=x"], "did you mean --setup_file?")])
def test_unknown_options_are_errors_that_suggest_the_closest(argv, hint, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"unknown option {argv[0].split('=')[0]}" in err and hint in err


def test_underscore_spellings_of_the_pipelines_own_flags():
    cfg, _, _ = parse_args(["--num_shards", "8", "--max_seq_len=512", "--validation_fraction", "0.1"])
    assert (cfg.num_shards, cfg.max_seq_len, cfg.validation_fraction) == (8, 512, 0.1)


def test_only_beams_own_options_and_those_after_a_double_dash_reach_beam():
    _, beam_args, _ = parse_args(["--num_workers", "4", "--setup_file=./pyproject.toml", "--eta", "0.3",
                                  "--", "--my_runner_flag=1"])
    assert beam_args[-3:] == ["--num_workers", "4", "--setup_file=./pyproject.toml", "--my_runner_flag=1"][-3:]
    assert "--num_workers" in beam_args and "--eta" not in beam_args


# ------------------------------------------------------------------------------------------ one-line errors
def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "data_pipeline.build", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=300)


def test_user_errors_are_one_line_without_a_traceback(tmp_path):
    (tmp_path / "bad.yaml").write_text("eta: 0.2\netta: 0.3\n")
    cases = {("--config", str(tmp_path / "missing.yaml")): "missing.yaml",
             ("--config", str(tmp_path / "bad.yaml")): "etta",
             ("--tokenizer", str(tmp_path / "no-tokenizer"), "--output", str(tmp_path / "o1")): "no-tokenizer",
             ("--output", str(tmp_path / "o2"), "--system-prompt", "Stop at </s>."): "'</s>'"}
    for argv, named in cases.items():
        proc = cli(*argv)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and lines[-1].startswith("error: ") and named in lines[-1], proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
    usage = cli("--eta", "x")
    assert usage.returncode == 2 and "usage:" in usage.stderr and "Traceback" not in usage.stderr


# ------------------------------------------------------------------------------------------ the output directory
def listing(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_failed_rebuild_leaves_the_previous_dataset_and_no_staging(tmp_path, monkeypatch):
    from data_pipeline import beam_pipeline

    out = tmp_path / "data"
    build_sample_dataset(str(out))
    before = listing(out)
    with pytest.raises(OutputError, match="pass --overwrite"):
        build_sample_dataset(str(out))

    def broken_disk(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(beam_pipeline, "write_shard", broken_disk)
    with pytest.raises(Exception, match="No space left on device"):
        build_sample_dataset(str(out), overwrite=True)
    assert listing(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # the failed build's staging is gone
    monkeypatch.undo()
    (out / "stale.txt").write_text("from before")
    manifest = build_sample_dataset(str(out), overwrite=True)
    assert not (out / "stale.txt").exists() and manifest["totals"]["kept"] == 600
    assert listing(out) == before  # (the same build, byte for byte)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_output_overlapping_an_input_is_refused(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jsonl").write_text(json.dumps({"id": "1", "conversations": []}) + "\n")
    for argv, message in ((["--general", str(raw), "--output", str(raw / "out")], "is inside the input"),
                          (["--general", str(raw / "a.jsonl"), "--output", str(tmp_path), "--overwrite"],
                           "is inside --output")):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--agent", f"{SAMPLE_DATA}/agentinstruct_sample.jsonl"])
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.startswith("error: ") and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"] and not (raw / "out").exists()


def test_gcs_rebuild_swaps_in_the_new_build_manifest_last(gcs_bucket, monkeypatch):
    import fsspec

    from data_pipeline import beam_pipeline, staging

    out = f"{gcs_bucket}/swap/data"
    fs = fsspec.filesystem("gs")
    build_sample_dataset(out)
    before = {p: fs.cat(p) for p in fs.find(out)}
    monkeypatch.setattr(beam_pipeline, "write_shard", lambda *a, **k: (_ for _ in ()).throw(OSError("quota")))
    with pytest.raises(Exception, match="quota"):
        build_sample_dataset(out, overwrite=True)
    assert {p: fs.cat(p) for p in fs.find(out)} == before and fs.ls(f"{gcs_bucket}/swap", detail=False) == [out[5:]]
    monkeypatch.undo()
    copied = []
    real_copy = fs.copy  # (fsspec hands the build this same cached instance)
    monkeypatch.setattr(fs, "copy", lambda a, b, **k: (copied.append(b), real_copy(a, b, **k))[1])
    build_sample_dataset(out, overwrite=True)
    assert copied[-1].endswith(records.MANIFEST_NAME) and len(copied) == len(before)
    assert {p: fs.cat(p) for p in fs.find(out)} == before and not staging.leftover_staging_dirs(out)


def test_manifest_tokenizer_path_is_relative_and_old_absolute_paths_fall_back(tmp_path):
    from data_pipeline.formats.dataset import manifest_tokenizer_path

    entry = lambda path: {"tokenizer": {"path": path}}  # noqa: E731
    assert manifest_tokenizer_path(entry("tokenizer"), "gs://b/data/") == "gs://b/data/tokenizer"
    assert manifest_tokenizer_path(entry("tokenizer"), str(tmp_path)) == f"{tmp_path}/tokenizer"
    gone = "/built/on/another/machine/data/tokenizer"  # an older build's absolute path
    assert manifest_tokenizer_path(entry(gone), str(tmp_path)) == gone  # (no copy here to fall back to)
    (tmp_path / "tokenizer").mkdir()
    assert manifest_tokenizer_path(entry(gone), str(tmp_path)) == f"{tmp_path}/tokenizer"
    assert manifest_tokenizer_path(entry(str(tmp_path)), "/elsewhere") == str(tmp_path)  # (still there: kept)
    assert manifest_tokenizer_path({}, str(tmp_path)) is None


def test_records_travel_through_beam_as_spill_file_names(tmp_path, monkeypatch):
    """Raw batches, encoded payloads and placed payloads go to files in the staging directory; Beam carries
    their names (and the rows' keys), so the local runner does not hold the input or the output in memory."""
    from data_pipeline import beam_pipeline

    spilled, real = [], beam_pipeline.write_spill

    def recording(path, value):
        spilled.append((path.rsplit("/", 2)[-2], value))
        return real(path, value)

    monkeypatch.setattr(beam_pipeline, "write_spill", recording)
    manifest = build_sample_dataset(str(tmp_path / "data"))
    kinds = {kind: [v for k, v in spilled if k == kind] for kind in ("raw", "encoded", "placed")}
    assert sum(len(items) for _, items in kinds["raw"]) == manifest["totals"]["read"]
    assert sum(len(payloads) for payloads in kinds["placed"]) == manifest["totals"]["kept"]
    assert all(isinstance(p, bytes) for payloads in kinds["encoded"] + kinds["placed"] for p in payloads)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # (the spill files went with the staging)
