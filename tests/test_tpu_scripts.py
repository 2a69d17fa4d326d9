"""The tpu/ scripts drive gcloud; here a stand-in `gcloud` records each call so we can check what they ask for."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

TPU = Path(__file__).resolve().parents[1] / "tpu"


@pytest.fixture
def fake_gcloud(tmp_path):
    log = tmp_path / "calls.txt"
    exe = tmp_path / "gcloud"
    exe.write_text(f'#!/usr/bin/env bash\nprintf "%q " "$@" >> {log}\necho >> {log}\n')
    exe.chmod(0o755)
    return exe, log


def run(script, fake, *args, **env):
    exe, log = fake
    full_env = {**os.environ, "GCLOUD": str(exe), "PROJECT": "my-proj", "ZONE": "us-central2-b",
                "TPU_NAME": "t1", **env}
    proc = subprocess.run(["bash", str(TPU / script), *args], env=full_env, capture_output=True, text=True)
    calls = [shlex.split(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls


def test_create_picks_the_runtime_image_for_the_generation(fake_gcloud):
    proc, calls = run("create.sh", fake_gcloud, ACCELERATOR_TYPE="v5litepod-16")
    assert proc.returncode == 0, proc.stderr
    assert calls == [["compute", "tpus", "tpu-vm", "create", "t1", "--project=my-proj", "--zone=us-central2-b",
                      "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite"]]


def test_create_queued_spot(fake_gcloud):
    proc, calls = run("create.sh", fake_gcloud, "--queued", "--spot", ACCELERATOR_TYPE="v4-32")
    assert proc.returncode == 0, proc.stderr
    (call,) = calls
    assert call[:5] == ["compute", "tpus", "queued-resources", "create", "t1-qr"]
    assert "--node-id=t1" in call and "--runtime-version=tpu-ubuntu2204-base" in call and "--spot" in call


def test_unknown_accelerator_needs_an_explicit_image(fake_gcloud):
    proc, calls = run("create.sh", fake_gcloud, ACCELERATOR_TYPE="v9-8")
    assert proc.returncode != 0 and "RUNTIME_VERSION" in proc.stderr and calls == []
    proc, calls = run("create.sh", fake_gcloud, ACCELERATOR_TYPE="v9-8", RUNTIME_VERSION="custom-img")
    assert proc.returncode == 0 and "--version=custom-img" in calls[0]


def test_missing_project_is_a_clear_error(fake_gcloud):
    proc, calls = run("create.sh", fake_gcloud, PROJECT="")
    assert proc.returncode == 2 and "PROJECT" in proc.stderr
    assert all(c[:2] == ["config", "get-value"] for c in calls)  # it asked gcloud, nothing else


def test_run_starts_the_same_command_on_all_workers(fake_gcloud):
    proc, calls = run("run.sh", fake_gcloud, "python", "-m", "agentlm_jax.train", "data.path=gs://b/my data")
    assert proc.returncode == 0, proc.stderr
    (call,) = calls
    assert call[:5] == ["compute", "tpus", "tpu-vm", "ssh", "t1"] and "--worker=all" in call
    command = next(a for a in call if a.startswith("--command="))
    assert "python -m agentlm_jax.train data.path=gs://b/my\\ data" in command and "nohup" in command


def test_stop_sends_sigterm_for_a_checkpoint(fake_gcloud):
    proc, calls = run("run.sh", fake_gcloud, "--stop")
    assert proc.returncode == 0 and "--worker=all" in calls[0]
    assert any("pkill -TERM" in a for a in calls[0])


def test_delete_prefers_the_queued_resource(fake_gcloud):
    # the stand-in answers every describe successfully, so the queued resource is what gets deleted
    proc, calls = run("delete.sh", fake_gcloud)
    assert proc.returncode == 0, proc.stderr
    assert calls[-1][:5] == ["compute", "tpus", "queued-resources", "delete", "t1-qr"] and "--force" in calls[-1]


def test_setup_copies_the_committed_tree_and_installs_tpu_extras(fake_gcloud):
    proc, calls = run("setup.sh", fake_gcloud)
    assert proc.returncode == 0, proc.stderr
    scp, ssh = calls
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and scp[4].endswith(".tar.gz") and "--worker=all" in scp
    assert "--worker=all" in ssh
    assert "pip install --quiet -e '.[tpu,gcp]'" in next(a for a in ssh if a.startswith("--command="))
