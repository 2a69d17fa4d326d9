"""The η sweep: one build, training run and evaluation per η with the same overrides; sweep.csv and sweep.png;
an interrupted sweep resumes without redoing finished points. The steps are stood in for (the real ones
are tested where they live; a real tiny sweep takes ~40 s per point: docs/evaluation.md)."""

from __future__ import annotations

import csv
import json
import os

import pytest

from agentlm_jax import sweep
from agentlm_jax.errors import SetupError


class FakeSteps:
    def __init__(self, fail_on: str | None = None):
        self.calls, self.fail_on = [], fail_on

    def __call__(self, cmd, log_path, what):
        module = cmd[2]
        self.calls.append((module, cmd))
        if self.fail_on and self.fail_on in what:
            raise SetupError(f"{what} failed (exit 1); see {log_path}: boom")
        value = lambda flag: cmd[cmd.index(flag) + 1]
        if module == "data_pipeline.build":
            os.makedirs(value("--output"), exist_ok=True)
            eta = float(value("--eta"))
            with open(os.path.join(value("--output"), "manifest.json"), "w") as f:
                json.dump({"mix": {"eta_achieved": eta}, "splits": {"train": {"examples": 100}}}, f)
        elif module == "agentlm_jax.train":
            run_dir = next(a.split("=", 1)[1] for a in cmd if a.startswith("run_dir="))
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
                f.write(json.dumps({"step": 2, "loss": 3.5}) + "\n")
        else:
            out = value("--output")
            os.makedirs(out, exist_ok=True)
            eta = float(os.path.basename(os.path.dirname(out)).split("=")[1])
            suites = {"actions": {"overall": {"accuracy": eta / 2, "macro_accuracy": eta / 2},
                                  "tasks": {"os": {"accuracy": eta}}},
                      "dbbench": {"overall_cat_accuracy": 0.1, "invalid_format_rate": 0.5},
                      "general": {"mmlu": {"accuracy": 0.25}, "gsm8k": {"accuracy": 0.0}}}
            with open(os.path.join(out, "eval.json"), "w") as f:
                json.dump({"suites": suites}, f)


def test_every_point_then_resume(tmp_path, monkeypatch):
    out = str(tmp_path / "sweep")
    argv = ["--eta", "0,0.5,1", "--output", out, "steps=2", "seed=3"]
    failing = FakeSteps(fail_on="training η = 0.5")
    monkeypatch.setattr(sweep, "_run", failing)
    with pytest.raises(SystemExit) as exit_:
        sweep.main(argv)
    assert "training η = 0.5 failed" in exit_.value.code
    assert [m for m, _ in failing.calls] == ["data_pipeline.build", "data_pipeline.build", "agentlm_jax.train",
                                             "agentlm_jax.evaluate", "data_pipeline.build", "agentlm_jax.train"]

    steps = FakeSteps()
    monkeypatch.setattr(sweep, "_run", steps)
    rows = sweep.main(argv)
    # η = 0 was finished: not redone; η = 0.5's mix was built: kept; its training and η = 1 run now.
    assert [m for m, _ in steps.calls] == ["agentlm_jax.train", "agentlm_jax.evaluate", "data_pipeline.build",
                                           "agentlm_jax.train", "agentlm_jax.evaluate"]
    trains = [cmd for m, cmd in failing.calls + steps.calls if m == "agentlm_jax.train"]
    assert all(cmd[3:5] == ["steps=2", "seed=3"] for cmd in trains)  # the same budget and seed at every η
    assert [r["eta"] for r in rows] == [0.0, 0.5, 1.0]
    with open(os.path.join(out, "sweep.csv")) as f:
        table = list(csv.DictReader(f))
    assert [float(r["actions_accuracy"]) for r in table] == [0.0, 0.25, 0.5]
    assert table[1]["final_loss"] == "3.5" and table[2]["actions_os"] == "1.0"
    with open(os.path.join(out, "sweep.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    again = FakeSteps()
    monkeypatch.setattr(sweep, "_run", again)
    sweep.main(argv)
    assert again.calls == []


def test_the_sweep_owns_the_data_path_and_run_dir(tmp_path):
    with pytest.raises(SystemExit) as exit_:
        sweep.main(["--output", str(tmp_path), "run_dir=/x"])
    assert "the sweep sets run_dir for every point" in exit_.value.code
    with pytest.raises(SystemExit) as exit_:
        sweep.main(["--eta", "0,2"])
    assert exit_.value.code == 2
