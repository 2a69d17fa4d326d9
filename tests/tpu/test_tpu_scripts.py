"""The tpu/ scripts drive gcloud; here a stand-in `gcloud` records each call so we can check what they ask for.
The commands they send to the workers are run here too, with bash, on a fake worker (a temporary home)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

TPU = Path(__file__).resolve().parents[2] / "tpu"
SETTINGS = ("GCLOUD", "TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "REMOTE_DIR",
            "PYTHON_VERSION", "TPU_ENV", "NODE_COUNT", "STOP_GRACE_S", "WAIT_POLL_S", "GCLOUD_TRACK")


@pytest.fixture
def fake_gcloud(tmp_path):
    """A `gcloud` that records its argv. `queued-resources describe --format=value(state.state)` answers with the
    next line of tmp_path/states ("error: ..." fails with that message); `scp` keeps a copy of what it sends in
    tmp_path/copies/."""
    log = tmp_path / "calls.txt"
    exe = tmp_path / "gcloud"
    (tmp_path / "copies").mkdir()
    # each argument NUL-terminated, each call ended by a \x01 field (arguments may hold newlines)
    exe.write_text(f"""#!/usr/bin/env bash
printf '%s\\0' "$@" $'\\x01' >> {log}
case "$3 $4 $*" in
  "queued-resources describe "*"--format=value(state.state)"*)
    if [ -s {tmp_path}/states ]; then
      line="$(head -n 1 {tmp_path}/states)"; sed -i 1d {tmp_path}/states
      case "$line" in error:*) echo "$line" >&2; exit 1 ;; esac
      echo "$line"
    fi ;;
  *" scp "*) cp "$5" {tmp_path}/copies/ ;;
esac
""")
    exe.chmod(0o755)
    return exe, log


def run(script, fake, *args, tpu_dir=TPU, **env):
    exe, log = fake
    inherited = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    full_env = {**inherited, "GCLOUD": str(exe), "PROJECT": "my-proj", "ZONE": "us-central2-b",
                "TPU_NAME": "t1", **env}
    proc = subprocess.run(["bash", str(tpu_dir / script), *args], env=full_env, capture_output=True, text=True,
                          timeout=120)
    calls, call = [], []
    for field in (log.read_text().split("\0")[:-1] if log.exists() else []):
        if field == "\x01":
            calls.append(call)
            call = []
        else:
            call.append(field)
    return proc, calls


def _remote_command(call: list[str]) -> str:
    return next(a for a in call if a.startswith("--command="))[len("--command="):]


# ------------------------------------------------------------------------------------------------ create.sh
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
    assert "tpu/create.sh --wait" in proc.stdout


def test_unknown_accelerator_needs_an_explicit_image(fake_gcloud):
    proc, calls = run("create.sh", fake_gcloud, ACCELERATOR_TYPE="v9-8")
    assert proc.returncode != 0 and "RUNTIME_VERSION" in proc.stderr and calls == []
    proc, calls = run("create.sh", fake_gcloud, ACCELERATOR_TYPE="v9-8", RUNTIME_VERSION="custom-img")
    assert proc.returncode == 0 and "--version=custom-img" in calls[0]


def test_missing_project_is_a_clear_error(fake_gcloud):
    proc, calls = run("create.sh", fake_gcloud, PROJECT="")
    assert proc.returncode == 2 and "PROJECT" in proc.stderr
    assert all(c[:2] == ["config", "get-value"] for c in calls)  # it asked gcloud, nothing else


NETWORK_FLAGS = ["--reserved", "--network=ml-net", "--subnetwork=ml-subnet", "--internal-ips",
                 "--service-account=trainer@my-proj.iam.gserviceaccount.com", "--scopes=cloud-platform",
                 "--labels=team=ml,run=agentlm"]


def test_create_passes_gcloud_flags_through(fake_gcloud):
    proc, calls = run("create.sh", fake_gcloud, *NETWORK_FLAGS, "--", "--metadata=startup-script=echo hi",
                      "--tags=allow-ssh")
    assert proc.returncode == 0, proc.stderr
    (call,) = calls
    assert call[:9] == ["compute", "tpus", "tpu-vm", "create", "t1", "--project=my-proj",
                        "--zone=us-central2-b", "--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base"]
    assert call[9:] == [*NETWORK_FLAGS, "--metadata=startup-script=echo hi", "--tags=allow-ssh"]


def test_create_queued_passes_queued_resource_flags_through(fake_gcloud):
    proc, calls = run("create.sh", fake_gcloud, "--queued", "--spot", *NETWORK_FLAGS,
                      "--valid-until-duration=6h", "--", "--reservation=my-res")
    assert proc.returncode == 0, proc.stderr
    (call,) = calls
    assert call[:4] == ["compute", "tpus", "queued-resources", "create"]
    assert call[-len(NETWORK_FLAGS) - 3:] == ["--spot", *NETWORK_FLAGS, "--valid-until-duration=6h",
                                              "--reservation=my-res"]


@pytest.mark.parametrize("args, message", [
    (["--valid-until-duration=6h"], "add --queued"),
    (["--guaranteed"], "add --queued"),
    (["--queued", "--preemptible"], "spell it --spot"),
    (["--version=tpu-vm-base"], "RUNTIME_VERSION"),
    (["--accelerator-type=v5p-8"], "ACCELERATOR_TYPE"),
    (["--zone=us-east1-d"], "ZONE"),
    (["--queued", "--node-id=other"], "TPU_NAME"),
    (["--queued", "--node-count=2"], "NODE_COUNT=2"),
    (["spot"], "options start with --"),
    (["--queued", "--wait", "--timeout=soon"], "90s, 30m, 6h or 2d"),
    (["--wait", "--spot"], "creates nothing"),
    (["--queued", "--reservation=my-res"], "GCLOUD_TRACK=alpha"),
])
def test_create_refuses_flags_that_would_go_wrong_and_says_what_to_do(fake_gcloud, args, message):
    proc, calls = run("create.sh", fake_gcloud, *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not any("create" in c for c in calls)


def test_gcloud_track_alpha_reaches_the_alpha_commands(fake_gcloud):
    proc, calls = run("create.sh", fake_gcloud, "--queued", "--reservation=my-res", GCLOUD_TRACK="alpha")
    assert proc.returncode == 0, proc.stderr
    assert calls[-1][:5] == ["alpha", "compute", "tpus", "queued-resources", "create"]
    assert calls[-1][-1] == "--reservation=my-res"
    proc, calls = run("run.sh", fake_gcloud, "--status", GCLOUD_TRACK="alpha")
    assert calls[-1][:4] == ["alpha", "compute", "tpus", "tpu-vm"]
    proc, calls = run("create.sh", fake_gcloud, GCLOUD_TRACK="gamma")
    assert proc.returncode == 2 and "GCLOUD_TRACK" in proc.stderr


def _describes(calls):
    return [c for c in calls if c[2:4] == ["queued-resources", "describe"]]  # (no GCLOUD_TRACK in these tests)


def test_create_queued_wait_polls_until_active(fake_gcloud, tmp_path):
    (tmp_path / "states").write_text("ACCEPTED\nWAITING_FOR_RESOURCES\nWAITING_FOR_RESOURCES\nPROVISIONING\n"
                                     "ACTIVE\n")
    proc, calls = run("create.sh", fake_gcloud, "--queued", "--wait", WAIT_POLL_S="0")
    assert proc.returncode == 0, proc.stderr
    assert calls[0][2:4] == ["queued-resources", "create"]
    describes = _describes(calls)
    assert len(describes) == 5 and all(c[4] == "t1-qr" and "--format=value(state.state)" in c for c in describes)
    lines = proc.stdout.splitlines()
    states = [re.search(r"t1-qr: (\S+)", line).group(1) for line in lines if re.match(r"\d\d:\d\d:\d\d t1-qr", line)]
    assert states == ["ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"]  # one line per change
    assert "is ACTIVE. Next: tpu/setup.sh" in lines[-1]


def test_wait_alone_waits_for_the_existing_queued_resource(fake_gcloud, tmp_path):
    (tmp_path / "states").write_text("PROVISIONING\nACTIVE\n")
    proc, calls = run("create.sh", fake_gcloud, "--wait", WAIT_POLL_S="0")
    assert proc.returncode == 0, proc.stderr
    assert not any(c[3] == "create" for c in calls) and len(_describes(calls)) == 2


@pytest.mark.parametrize("state", ["FAILED", "SUSPENDED"])
def test_wait_fails_clearly_when_the_queued_resource_cannot_become_active(fake_gcloud, tmp_path, state):
    (tmp_path / "states").write_text(f"WAITING_FOR_RESOURCES\n{state}\nACTIVE\n")
    proc, calls = run("create.sh", fake_gcloud, "--wait", WAIT_POLL_S="0")
    assert proc.returncode == 1
    assert f"t1-qr is {state}: it will not become ACTIVE" in proc.stderr and "tpu/delete.sh" in proc.stderr
    assert len(_describes(calls)) == 2  # it stopped polling


def test_wait_gives_up_after_the_timeout(fake_gcloud, tmp_path):
    (tmp_path / "states").write_text("WAITING_FOR_RESOURCES\n" * 10)
    start = time.monotonic()
    proc, calls = run("create.sh", fake_gcloud, "--wait", "--timeout=2s", WAIT_POLL_S="1")
    assert proc.returncode == 3
    assert time.monotonic() - start < 10
    assert "still WAITING_FOR_RESOURCES after 2s" in proc.stderr and "--wait --timeout=" in proc.stderr
    assert 2 <= len(_describes(calls)) <= 3


def test_wait_survives_a_few_failed_polls_but_not_many(fake_gcloud, tmp_path):
    (tmp_path / "states").write_text("error: connection reset\nerror: connection reset\nACTIVE\n")
    proc, calls = run("create.sh", fake_gcloud, "--wait", WAIT_POLL_S="0")
    assert proc.returncode == 0, proc.stderr
    assert "could not read the state of t1-qr (2/5): error: connection reset" in proc.stderr
    (tmp_path / "states").write_text("error: NOT_FOUND\n" * 6)
    proc, calls = run("create.sh", fake_gcloud, "--wait", WAIT_POLL_S="0")
    assert proc.returncode == 1 and "(5/5)" in proc.stderr and "queued-resources list" in proc.stderr


# ------------------------------------------------------------------------------------------------ multislice
def test_multislice_creates_a_queued_resource_of_n_slices_and_reaches_all_of_them(fake_gcloud):
    proc, calls = run("create.sh", fake_gcloud, "--queued", NODE_COUNT="2")
    assert proc.returncode == 0, proc.stderr
    (call,) = calls
    assert "--node-count=2" in call and "--node-prefix=t1" in call and not any("--node-id" in a for a in call)
    proc, calls = run("create.sh", fake_gcloud, NODE_COUNT="2")
    assert proc.returncode == 2 and "add --queued" in proc.stderr
    proc, calls = run("run.sh", fake_gcloud, "python", "-m", "agentlm_jax.train", NODE_COUNT="2")
    assert proc.returncode == 0, proc.stderr
    assert calls[-1][:5] == ["compute", "tpus", "queued-resources", "ssh", "t1-qr"]
    assert "--node=all" in calls[-1] and "--worker=all" in calls[-1]
    assert "tpu-vm ssh t1-0 " in proc.stdout  # worker 0 of the first slice
    proc, calls = run("setup.sh", fake_gcloud, NODE_COUNT="2")
    assert proc.returncode == 0, proc.stderr
    scp, ssh = calls[-2:]
    assert scp[:4] == ["compute", "tpus", "queued-resources", "scp"] and scp[5] == "t1-qr:agentlm-jax.tar.gz"
    assert "--node=all" in scp and ssh[2:4] == ["queued-resources", "ssh"]
    before = len(calls)
    proc, calls = run("run.sh", fake_gcloud, "--status", NODE_COUNT="two")
    assert proc.returncode == 2 and "NODE_COUNT" in proc.stderr and len(calls) == before


# ------------------------------------------------------------------------------------------------ run.sh
def test_run_starts_the_same_command_on_all_workers(fake_gcloud):
    proc, calls = run("run.sh", fake_gcloud, "python", "-m", "agentlm_jax.train", "data.path=gs://b/my data")
    assert proc.returncode == 0, proc.stderr
    (call,) = calls
    assert call[:5] == ["compute", "tpus", "tpu-vm", "ssh", "t1"] and "--worker=all" in call
    command = _remote_command(call)
    assert "python -m agentlm_jax.train data.path=gs://b/my\\ data" in command and "nohup" in command


def test_run_usage_and_bad_options(fake_gcloud):
    for args in ([], ["--help"]):
        proc, calls = run("run.sh", fake_gcloud, *args)
        assert proc.returncode == 0 and "--kill-holders" in proc.stdout and calls == []
    proc, calls = run("run.sh", fake_gcloud, "--bogus", "python")
    assert proc.returncode == 2 and "unknown option: --bogus" in proc.stderr and calls == []
    proc, calls = run("run.sh", fake_gcloud, "--stop", "now")
    assert proc.returncode == 2 and calls == []
    proc, calls = run("run.sh", fake_gcloud, "--env", "HF_TOKEN=abc", "python")
    assert proc.returncode == 2 and "not an environment variable name" in proc.stderr and calls == []
    proc, calls = run("create.sh", fake_gcloud, "--help")
    assert proc.returncode == 0 and "--valid-until-duration" in proc.stdout and "shellcheck" not in proc.stdout


@pytest.fixture
def home(tmp_path):
    """A fake worker's home directory with the checkout (and its venv's bin/) installed."""
    home = tmp_path / "home"
    (home / "agentlm-jax" / ".venv" / "bin").mkdir(parents=True)
    return home


def on_worker(command: str, home: Path, **env) -> subprocess.CompletedProcess:
    """Run a command as gcloud ssh would on a worker: with bash, in the worker's home directory."""
    full_env = {"HOME": str(home), "PATH": os.environ["PATH"], **env}
    return subprocess.run(["bash", "-c", command], env=full_env, cwd=home, capture_output=True, text=True,
                          timeout=120)


SECRET = "hf_s3cr'et \"quoted\" $HOME `id` \\n\nsecond line"
DUMP_ENV = ("import json, os, sys; names = ['HF_TOKEN', 'XLA_FLAGS', 'LIBTPU_INIT_ARGS', 'NOT_LISTED']; "
            "open(sys.argv[1], 'w').write(json.dumps({n: os.environ.get(n) for n in names}))")


def test_run_forwards_listed_variables_without_showing_their_values(fake_gcloud, tmp_path, home):
    out = tmp_path / "env.json"
    env = {"TPU_ENV": "HF_TOKEN, XLA_FLAGS UNSET_ONE", "HF_TOKEN": SECRET,
           "XLA_FLAGS": "--xla_dump_to=/tmp/x --xla_foo='a b'", "LIBTPU_INIT_ARGS": "--xla_tpu_flag=true",
           "NOT_LISTED": "no"}
    proc, calls = run("run.sh", fake_gcloud, "--foreground", "--env", "LIBTPU_INIT_ARGS", "--", sys.executable,
                      "-c", DUMP_ENV, str(out), **env)
    assert proc.returncode == 0, proc.stderr
    assert "Forwarding to every worker: HF_TOKEN XLA_FLAGS LIBTPU_INIT_ARGS (values not shown)" in proc.stdout
    assert "not forwarding UNSET_ONE" in proc.stderr
    scp, ssh = calls
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and scp[5] == "t1:agentlm-jax/.run-env"
    assert "--worker=all" in scp
    for text in (proc.stdout, proc.stderr, *scp, *ssh):
        assert "s3cr" not in text and "xla_dump_to" not in text
    assert not Path(scp[4]).exists()  # the local copy is gone

    # on the worker: the copied file, then the command the scripts sent
    (copied,) = (tmp_path / "copies").iterdir()
    shutil.copy(copied, home / "agentlm-jax" / ".run-env")
    result = on_worker(_remote_command(ssh), home)
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text()) == {"HF_TOKEN": SECRET, "XLA_FLAGS": env["XLA_FLAGS"],
                                           "LIBTPU_INIT_ARGS": "--xla_tpu_flag=true", "NOT_LISTED": None}
    assert not (home / "agentlm-jax" / ".run-env").exists()  # read once, then deleted
    log = (home / "agentlm-jax" / "run.log").read_text()
    assert "forwarded: HF_TOKEN XLA_FLAGS LIBTPU_INIT_ARGS" in log and "s3cr" not in log


def test_run_without_forwarded_variables_deletes_a_stale_env_file(fake_gcloud, home):
    proc, calls = run("run.sh", fake_gcloud, "--foreground", "true")
    assert proc.returncode == 0, proc.stderr
    (ssh,) = calls  # no scp
    (home / "agentlm-jax" / ".run-env").write_text("export HF_TOKEN='old'\n")
    assert on_worker(_remote_command(ssh), home).returncode == 0
    assert not (home / "agentlm-jax" / ".run-env").exists()


def test_each_start_keeps_its_own_log_and_run_log_links_to_the_latest(fake_gcloud, home):
    checkout = home / "agentlm-jax"
    (checkout / "logs").mkdir()
    old = checkout / "logs" / "run-20260101T000000Z.log"
    old.write_text("the previous start's output\n")
    (checkout / "run.log").symlink_to("logs/run-20260101T000000Z.log")
    proc, calls = run("run.sh", fake_gcloud, sys.executable, "-c",
                      "import os; print('step 1'); print(os.readlink('/proc/self/fd/0')); print('step 2')")
    assert proc.returncode == 0, proc.stderr
    result = on_worker(_remote_command(calls[-1]), home)
    assert result.returncode == 0, result.stderr
    assert re.search(r"started on \S+, log ~/agentlm-jax/logs/run-\d{8}T\d{6}Z\.log", result.stdout)
    new = checkout / os.readlink(checkout / "run.log")
    assert new != old and new.parent == checkout / "logs"
    for _ in range(100):  # the command runs in the background
        if "step 2" in new.read_text():
            break
        time.sleep(0.1)
    assert new.read_text().splitlines()[1:] == ["step 1", "/dev/null", "step 2"]  # detached from the ssh input
    assert new.read_text().startswith("# ") and old.read_text() == "the previous start's output\n"

    (checkout / "run.log").unlink()
    (checkout / "run.log").write_text("a log from before per-start logs\n")  # a plain file is replaced
    assert on_worker(_remote_command(calls[-1]), home).returncode == 0
    assert (checkout / "run.log").is_symlink()


def test_foreground_streams_the_output_and_keeps_the_log_and_the_exit_status(fake_gcloud, home):
    proc, calls = run("run.sh", fake_gcloud, "--foreground", sys.executable, "-c",
                      "import sys; print('hello'); sys.exit(3)")
    result = on_worker(_remote_command(calls[-1]), home)
    assert result.returncode == 3 and "hello" in result.stdout
    assert "hello" in (home / "agentlm-jax" / "run.log").read_text()


# ------------------------------------------------------------------------------- stopping and freeing the TPU
def test_stop_pattern_matches_only_the_trainer(fake_gcloud):
    proc, calls = run("run.sh", fake_gcloud, "--stop")
    assert proc.returncode == 0, proc.stderr
    command = _remote_command(calls[-1])
    assert "pkill -TERM -f" in command and "--worker=all" in calls[-1]
    pattern = re.search(r"pkill -TERM -f '([^']+)'", command).group(1)
    matches = lambda cmdline: re.search(pattern, cmdline) is not None  # noqa: E731 (pkill -f: ERE on the cmdline)
    assert matches("/home/u/agentlm-jax/.venv/bin/python -m agentlm_jax.train --config configs/llama2-7b.yaml")
    assert matches("python -m agentlm_jax.train")
    assert not matches(f"bash -c {command}")  # the remote shell that runs pkill
    assert not matches("python -m agentlm_jax.export --checkpoint gs://b/run/checkpoints --output gs://b/hf")
    assert not matches("python -m agentlm_jax.generate --model gs://b/hf --prompt hi")
    assert not matches("tail -f /home/u/agentlm-jax/run.log")


TRAINER_STUB = """import signal, sys, time
def save_and_exit(*_):
    time.sleep({save_s}); open(sys.argv[1], 'w').write('saved'); sys.exit(0)
signal.signal(signal.SIGTERM, {handler})
print('ready', flush=True)
time.sleep(120)
"""


class Processes:
    """Processes started by a test, whose command lines hold a name unique to the test (so that the real pkill and
    pgrep the scripts' remote commands use, once given the unique pattern, reach them and nothing else)."""

    def __init__(self, tmp_path):
        self.tag = f"agentlm_jax_t{uuid.uuid4().hex[:12]}"
        self.tmp_path = tmp_path
        self.procs = []

    def start(self, module: str, code: str, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", code, *args, "-m", f"{self.tag}.{module}", "--config", "x"],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        self.procs.append(proc)
        return proc

    def command(self, command: str) -> str:
        """The remote command, aimed at this test's processes instead of every agentlm_jax trainer."""
        assert "[a]gentlm_jax[.]train" in command
        return command.replace("[a]gentlm_jax[.]train", f"[a]{self.tag[1:]}[.]train")

    def close(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def processes(tmp_path):
    procs = Processes(tmp_path)
    yield procs
    procs.close()


def test_stop_sends_sigterm_and_waits_for_the_checkpoint(fake_gcloud, home, processes, tmp_path):
    saved = tmp_path / "saved"
    trainer = processes.start("train", TRAINER_STUB.format(save_s=1, handler="save_and_exit"), str(saved))
    export = processes.start("export", TRAINER_STUB.format(save_s=0, handler="save_and_exit"), str(tmp_path / "e"))
    proc, calls = run("run.sh", fake_gcloud, "--stop", STOP_GRACE_S="30")
    assert proc.returncode == 0, proc.stderr
    result = on_worker(processes.command(_remote_command(calls[-1])), home)
    assert result.returncode == 0, result.stderr
    assert "SIGTERM sent; waiting up to 30s" in result.stdout and "the trainer has exited" in result.stdout
    assert trainer.wait(5) == 0 and saved.read_text() == "saved"  # it had the time to save
    assert export.poll() is None  # an export is left alone
    result = on_worker(processes.command(_remote_command(calls[-1])), home)
    assert result.returncode == 0 and "no trainer running" in result.stdout


def test_stop_says_when_the_trainer_outlasts_the_grace_period_and_kill_ends_it(fake_gcloud, home, processes,
                                                                                tmp_path):
    trainer = processes.start("train", TRAINER_STUB.format(save_s=0, handler="signal.SIG_IGN"), "unused")
    proc, calls = run("run.sh", fake_gcloud, "--stop", STOP_GRACE_S="1")
    result = on_worker(processes.command(_remote_command(calls[-1])), home)
    assert result.returncode == 1
    assert "still running after 1s" in result.stdout and "tpu/run.sh --kill" in result.stdout
    assert trainer.poll() is None
    proc, calls = run("run.sh", fake_gcloud, "--kill")
    assert proc.returncode == 0, proc.stderr
    command = processes.command(_remote_command(calls[-1]))
    result = on_worker(command, home, TPU_DEVICE_FILES=str(tmp_path / "no-such-device"))
    assert result.returncode == 0, result.stderr
    assert "SIGKILL sent to the trainer" in result.stdout
    assert trainer.wait(5) == -signal.SIGKILL


HOLDER_STUB = """import sys, time
f = open(sys.argv[1])
print('ready', flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not (shutil.which("lsof") or shutil.which("fuser")), reason="needs lsof or fuser")
def test_holders_lists_and_kill_holders_ends_the_processes_holding_the_tpu(fake_gcloud, home, processes, tmp_path):
    device = tmp_path / "accel0"  # a stand-in for /dev/accel0
    device.write_text("")
    holder = processes.start("generate", HOLDER_STUB, str(device))
    devices = {"TPU_DEVICE_FILES": f"{device} {tmp_path}/vfio-missing-*"}
    proc, calls = run("run.sh", fake_gcloud, "--holders")
    assert proc.returncode == 0, proc.stderr
    listing = on_worker(_remote_command(calls[-1]), home, **devices)
    assert listing.returncode == 0, listing.stderr
    assert "the TPU is held by:" in listing.stdout
    assert re.search(rf"^\S+:\s+{holder.pid} .*{processes.tag}\.generate", listing.stdout, re.M)

    proc, calls = run("run.sh", fake_gcloud, "--status")
    status = on_worker(processes.command(_remote_command(calls[-1])), home, **devices)
    assert "no trainer running" in status.stdout and str(holder.pid) in status.stdout

    proc, calls = run("run.sh", fake_gcloud, "--kill-holders")
    result = on_worker(_remote_command(calls[-1]), home, **devices)
    assert result.returncode == 0, result.stderr
    assert holder.wait(5) == -signal.SIGTERM and result.stdout.rstrip().endswith("the TPU is free")
    listing = on_worker(_remote_command(calls[-1]), home, **devices)
    assert "the TPU is free" in listing.stdout


def test_a_stale_libtpu_lockfile_is_reported_and_removed_once_nothing_holds_the_tpu(fake_gcloud, home, tmp_path):
    lock = tmp_path / "libtpu_lockfile"
    lock.write_text("")
    env = {"TPU_DEVICE_FILES": str(tmp_path / "no-device-*"), "TPU_LOCKFILE": str(lock)}
    proc, calls = run("run.sh", fake_gcloud, "--holders")
    listing = on_worker(_remote_command(calls[-1]), home, **env)
    assert "the TPU is free" in listing.stdout and "libtpu_lockfile is left" in listing.stdout and lock.exists()
    proc, calls = run("run.sh", fake_gcloud, "--kill-holders")
    result = on_worker(_remote_command(calls[-1]), home, **env)
    assert result.returncode == 0 and "removed the stale" in result.stdout and not lock.exists()


def test_the_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    scripts = sorted(str(p) for p in TPU.glob("*.sh"))
    proc = subprocess.run(["shellcheck", "-x", *scripts], capture_output=True, text=True, cwd=TPU)
    assert proc.returncode == 0, proc.stdout


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
