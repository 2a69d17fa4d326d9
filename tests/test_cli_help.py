"""Every `--help` of the export/generate CLIs and of bench/: fast (nothing runs), under the right program name,
and complete (each option says what it does and, where it has a default, which)."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import time

import pytest

MODULES = ["agentlm_jax.export", "agentlm_jax.generate", "bench.matmul_peak", "bench.bench_input",
           "bench.bench_model", "bench.bench_pipeline", "bench.bench_train", "bench.run_all",
           "bench.device.gpu_train"]


@pytest.mark.parametrize("module", MODULES)
def test_help_exits_at_once_under_the_module_name(module, capsys):
    mod = importlib.import_module(module)
    with pytest.raises(SystemExit) as exit_:
        mod.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m {module} ")


@pytest.mark.parametrize("module", MODULES)
def test_every_option_has_help_and_its_default(module):
    parser: argparse.ArgumentParser = importlib.import_module(module).build_parser()
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"{module} {name}: no help text"
        has_default = action.default not in (None, False, argparse.SUPPRESS, [])
        assert not has_default or "default" in action.help, f"{module} {name}: default {action.default!r} not shown"


def test_matmul_peak_help_runs_no_benchmark():
    """`python -m bench.matmul_peak --help` used to run the 36-second measurement and print no help."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bench.matmul_peak", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m bench.matmul_peak") and "GFLOP/s" not in proc.stdout
    assert time.perf_counter() - start < 30
