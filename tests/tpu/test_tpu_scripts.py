"""The tpu/ scripts drive gcloud; here a stand-in `gcloud` records each call so we can check what they ask for."""

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

TPU = Path(__file__).resolve().parents[2] / "tpu"
SETTINGS = ("GCLOUD", "TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "REMOTE_DIR",
            "PYTHON_VERSION")


@pytest.fixture
def fake_gcloud(tmp_path):
    log = tmp_path / "calls.txt"
    exe = tmp_path / "gcloud"
    # each argument NUL-terminated, each call ended by a \x01 field (arguments may hold newlines)
    exe.write_text(f"#!/usr/bin/env bash\nprintf '%s\\0' \"$@\" $'\\x01' >> {log}\n")
    exe.chmod(0o755)
    return exe, log


def run(script, fake, *args, tpu_dir=TPU, **env):
    exe, log = fake
    inherited = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    full_env = {**inherited, "GCLOUD": str(exe), "PROJECT": "my-proj", "ZONE": "us-central2-b",
                "TPU_NAME": "t1", **env}
    proc = subprocess.run(["bash", str(tpu_dir / script), *args], env=full_env, capture_output=True, text=True)
    calls, call = [], []
    for field in (log.read_text().split("\0")[:-1] if log.exists() else []):
        if field == "\x01":
            calls.append(call)
            call = []
        else:
            call.append(field)
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


def _remote_command(call: list[str]) -> str:
    return next(a for a in call if a.startswith("--command="))[len("--command="):]


def test_stop_pattern_matches_only_the_trainer(fake_gcloud):
    proc, calls = run("run.sh", fake_gcloud, "--stop")
    assert proc.returncode == 0, proc.stderr
    command = _remote_command(calls[0])
    words = shlex.split(command)
    pattern = words[words.index("-f") + 1]
    matches = lambda cmdline: re.search(pattern, cmdline) is not None  # noqa: E731 (pkill -f: ERE on the cmdline)
    assert matches("/home/u/agentlm-jax/.venv/bin/python -m agentlm_jax.train --config configs/llama2-7b.yaml")
    assert matches("python -m agentlm_jax.train")
    assert not matches(f"bash -c {command}")  # the remote shell that runs pkill
    assert not matches("python -m agentlm_jax.export --checkpoint gs://b/run/checkpoints --output gs://b/hf")
    assert not matches("python -m agentlm_jax.generate --model gs://b/hf --prompt hi")
    assert not matches("tail -f /home/u/agentlm-jax/run.log")


def test_stop_leaves_the_remote_shell_and_other_commands_alone(fake_gcloud, tmp_path):
    """The remote command run by bash, with `pkill` swapped for `pgrep` (which signals nothing): the real procps
    matching finds a trainer-like process, and neither the shell running the command nor an export."""
    proc, calls = run("run.sh", fake_gcloud, "--stop")
    command = _remote_command(calls[0])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pkill").write_text('#!/usr/bin/env bash\necho "shell $PPID"\n'
                                   'shift 2; pgrep -f -- "$1" | sed "s/^/match /"\n')
    (bin_dir / "pkill").chmod(0o755)
    sleeper = [shutil.which("python3") or "python3", "-c", "import time; time.sleep(120)", "-m"]
    trainer = subprocess.Popen([*sleeper, "agentlm_jax.train", "--config", "configs/tiny.yaml"])
    export = subprocess.Popen([*sleeper, "agentlm_jax.export", "--output", "out"])
    try:
        out = subprocess.run(["bash", "-c", command], env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
                             capture_output=True, text=True, check=True).stdout.split()
    finally:
        trainer.kill()
        export.kill()
        trainer.wait()
        export.wait()
    shell = int(out[out.index("shell") + 1])
    matched = {int(pid) for tag, pid in zip(out[::2], out[1::2]) if tag == "match"}
    assert trainer.pid in matched
    assert shell not in matched and export.pid not in matched


def test_environment_beats_config_env_beats_defaults(fake_gcloud, tmp_path):
    tpu_dir = tmp_path / "tpu"
    tpu_dir.mkdir()
    for script in TPU.glob("*.sh"):
        shutil.copy(script, tpu_dir)
    (tpu_dir / "config.env").write_text("TPU_NAME=from-config\nZONE=europe-west4-a\n"
                                        "export ACCELERATOR_TYPE=v5p-8\n")
    proc, calls = run("create.sh", fake_gcloud, tpu_dir=tpu_dir, TPU_NAME="t1", ZONE="us-east5-a")
    assert proc.returncode == 0, proc.stderr
    # TPU_NAME and ZONE from the environment, ACCELERATOR_TYPE from config.env, the image from its default
    assert calls[-1] == ["compute", "tpus", "tpu-vm", "create", "t1", "--project=my-proj", "--zone=us-east5-a",
                         "--accelerator-type=v5p-8", "--version=v2-alpha-tpuv5"]
    proc, calls = run("create.sh", fake_gcloud, tpu_dir=tpu_dir, TPU_NAME="t1", ZONE="")  # empty = not given
    assert "--zone=europe-west4-a" in calls[-1]
    (tpu_dir / "config.env").unlink()
    proc, calls = run("create.sh", fake_gcloud, tpu_dir=tpu_dir)
    assert calls[-1][4:] == ["t1", "--project=my-proj", "--zone=us-central2-b", "--accelerator-type=v4-8",
                             "--version=tpu-ubuntu2204-base"]


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


# ------------------------------------------------------------------ setup.sh's remote command, run on a fake worker
def _python_stub(label: str, new_enough: bool, templates: Path, log: Path) -> str:
    return f"""#!/usr/bin/env bash
echo "{label} $*" >> {log}
case "$*" in
  *version_info*) exit {0 if new_enough else 1} ;;
  "-m venv "*) mkdir -p "$3/bin" && cp {templates}/{label} "$3/bin/python" && cp {templates}/pip "$3/bin/pip" ;;
  "-m pip install --user --quiet uv") mkdir -p "$HOME/.local/bin" && cp {templates}/uv "$HOME/.local/bin/uv" ;;
esac
"""


@pytest.fixture
def worker(tmp_path):
    """A fake TPU worker: a home directory holding the copied archive, stand-ins for python3 (3.10 or 3.12),
    uv and pip that record their calls. Returns run(command, system_python) -> list of calls."""
    home, templates, bin_dir, log = tmp_path / "home", tmp_path / "templates", tmp_path / "bin", tmp_path / "log"
    for d in (home, templates, bin_dir):
        d.mkdir()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "pyproject.toml").write_text("[project]\n")
    subprocess.run(["tar", "-czf", str(home / "agentlm-jax.tar.gz"), "-C", str(tmp_path / "src"), "."], check=True)
    stubs = {"python-3.10": _python_stub("python-3.10", False, templates, log),
             "python-3.12": _python_stub("python-3.12", True, templates, log),
             "pip": f'#!/usr/bin/env bash\necho "pip $*" >> {log}\n',
             "uv": f"""#!/usr/bin/env bash
echo "uv $*" >> {log}
if [ "$1" = venv ]; then d="${{@: -1}}"; mkdir -p "$d/bin" && cp {templates}/python-3.12 "$d/bin/python" \\
  && cp {templates}/pip "$d/bin/pip"; fi
"""}
    for name, text in stubs.items():
        (templates / name).write_text(text)
        (templates / name).chmod(0o755)

    def run_remote(command: str, system_python: str) -> list[str]:
        shutil.copy(templates / f"python-{system_python}", bin_dir / "python3")
        log.write_text("")
        env = {"HOME": str(home), "PATH": f"{bin_dir}:/usr/bin:/bin"}
        proc = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return log.read_text().splitlines()

    run_remote.venv_python = home / "agentlm-jax" / ".venv" / "bin" / "python"
    run_remote.templates = templates
    return run_remote


def _setup_command(fake_gcloud, **env) -> str:
    proc, calls = run("setup.sh", fake_gcloud, **env)
    assert proc.returncode == 0, proc.stderr
    return _remote_command(calls[-1])


def test_setup_checks_the_python_version_and_falls_back_to_uv(fake_gcloud):
    command = _setup_command(fake_gcloud)
    assert "sys.version_info < (3, 11)" in command
    assert "pip install --user --quiet uv" in command and "uv venv --python 3.11 --seed .venv" in command
    assert "uv venv --python 3.12 --seed .venv" in _setup_command(fake_gcloud, PYTHON_VERSION="3.12")


def test_setup_on_an_old_system_python_builds_the_venv_with_uv_once(fake_gcloud, worker):
    command = _setup_command(fake_gcloud)
    calls = worker(command, "3.10")
    assert "python-3.10 -m pip install --user --quiet uv" in calls
    assert "uv venv --python 3.11 --seed .venv" in calls
    assert not any(" -m venv" in c for c in calls)
    assert "pip install --quiet -e .[tpu,gcp]" in calls
    assert calls[-1].startswith("python-3.12 -c import jax")  # the venv's Python ran the check
    again = worker(command, "3.10")  # idempotent: the venv is good, nothing is rebuilt
    assert not any(c.startswith("uv") or "install --user" in c for c in again)
    assert "pip install --quiet -e .[tpu,gcp]" in again


def test_setup_uses_a_new_enough_system_python_and_rebuilds_a_stale_venv(fake_gcloud, worker):
    command = _setup_command(fake_gcloud)
    calls = worker(command, "3.12")
    assert "python-3.12 -m venv .venv" in calls and not any(c.startswith("uv") for c in calls)
    assert calls[-1].startswith("python-3.12 -c import jax")
    assert "python-3.12 -m venv .venv" not in worker(command, "3.12")  # a good venv is kept
    # a venv on Python 3.10 (left by the old setup, whose install then failed there) is rebuilt
    shutil.copy(worker.templates / "python-3.10", worker.venv_python)
    calls = worker(command, "3.12")
    assert "python-3.12 -m venv .venv" in calls and calls[-1].startswith("python-3.12 -c import jax")
