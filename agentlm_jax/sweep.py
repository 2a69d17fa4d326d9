"""η sweep: `python -m agentlm_jax.sweep --eta 0,0.1,0.2,0.5,1 [--config TRAIN.yaml] [--data-config DATA.yaml] [key=value ...]`.

For each η (the agent share of the training examples, data_pipeline's --eta): build the mix
(`python -m data_pipeline.build --eta η`), train with the same budget and seed (`python -m agentlm_jax.train
data.path=... run_dir=... key=value...`), evaluate (`python -m agentlm_jax.evaluate`); then write
OUTPUT/sweep.csv and OUTPUT/sweep.png. Every point is evaluated on the same held-out agent records: the
validation split of an η = 1 build (the pipeline draws the validation split per task before it mixes, so
no point trains on them); dbbench and general use their own items.

    python -m agentlm_jax.sweep                                    # the tiny model on the bundled sample (minutes on CPU)
    python -m agentlm_jax.sweep --eta 0,0.2,1 --config configs/llama2-7b.yaml --data-config configs/data/agenttuning.yaml \\
        --output gs://B/sweep init_from=gs://B/Llama-2-7b-chat-hf steps=500

Rerunning the same command resumes: a point whose evaluation is written is not redone, a built mix is not
rebuilt, a training run resumes from its latest checkpoint. Logs: OUTPUT/eta=η/{build,train,evaluate}.log.
Exit status: 0 when every point is done; 1 with one `error: ...` line (the failing step and its log's last
lines); 2 for bad command-line syntax.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from typing import Sequence

from agentlm_jax import cli
from agentlm_jax.errors import ConfigError, SetupError
from agentlm_jax.progress import format_duration

log = logging.getLogger("agentlm_jax.sweep")
DEFAULT_ETAS = (0.0, 0.1, 0.2, 0.5, 1.0)
OWN_KEYS = ("data.path", "run_dir")
VALIDATION_KEYS = ("val/loss", "val/agent_loss", "val/general_loss")  # the trainer's metrics.jsonl keys


def eta_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not values or any(not 0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"every η must be in [0, 1], got {text!r}")
    return sorted(set(values))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m agentlm_jax.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eta", type=eta_list, default=list(DEFAULT_ETAS), help="comma-separated η values in [0, 1] "
                   "(default 0,0.1,0.2,0.5,1)")
    p.add_argument("--config", default=None, help="training YAML (default: the built-in tiny CPU demo)")
    p.add_argument("--data-config", default=None, help="data_pipeline YAML (default: the bundled sample)")
    p.add_argument("--output", default="runs/sweep", help="sweep directory (default %(default)s)")
    p.add_argument("--suite", default="actions,dbbench,general", help="evaluation suites (default %(default)s)")
    p.add_argument("--max-items", type=int, default=20, help="evaluation items per task/benchmark (default "
                   "%(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="evaluation tokens per turn (default %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides, the same for "
                   "every point (not data.path or run_dir: the sweep sets them)")
    return p


def point_name(eta: float) -> str:
    return f"eta={eta:g}"


def _run(cmd: list[str], log_path: str, what: str) -> None:
    """Run a step, its output appended to `log_path`; SetupError with the log's tail when it fails."""
    with open(log_path, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        with open(log_path) as f:
            tail = [line.strip() for line in f.read().splitlines() if line.strip()][-3:]
        raise SetupError(f"{what} failed (exit {code}); see {log_path}: {' | '.join(tail)}")


def _build(out: str, eta: float, data_config: str | None, log_path: str) -> None:
    if os.path.exists(os.path.join(out, "manifest.json")):
        return
    cmd = [sys.executable, "-m", "data_pipeline.build", "--eta", repr(eta), "--output", out, "--overwrite"]
    if data_config:
        cmd += ["--config", data_config]
    _run(cmd, log_path, f"building the η = {eta:g} mix")


def _last_metrics(run_dir: str) -> dict:
    path = os.path.join(run_dir, "metrics.jsonl")
    out = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                for key in ("step", "loss", *VALIDATION_KEYS):
                    if key in record:
                        out[key] = record[key]
    return out


def row_of(eta: float, point_dir: str) -> dict:
    with open(os.path.join(point_dir, "data", "manifest.json")) as f:
        manifest = json.load(f)
    with open(os.path.join(point_dir, "eval", "eval.json")) as f:
        results = json.load(f)["suites"]
    train = _last_metrics(os.path.join(point_dir, "run"))
    row = {"eta": eta, "eta_achieved": manifest["mix"].get("eta_achieved"),
           "train_examples": manifest["splits"]["train"]["examples"], "steps": train.get("step"),
           "final_loss": train.get("loss")}
    # Validation losses on the point's own validation split (its mix: not comparable across η; the
    # suites below are on one common set).
    row.update({key.replace("/", "_"): train.get(key) for key in VALIDATION_KEYS})
    if "actions" in results:
        row["actions_accuracy"] = results["actions"]["overall"]["accuracy"]
        row["actions_macro_accuracy"] = results["actions"]["overall"]["macro_accuracy"]
        for task, v in results["actions"]["tasks"].items():
            row[f"actions_{task}"] = v["accuracy"]
    if "dbbench" in results:
        row["dbbench_overall"] = results["dbbench"]["overall_cat_accuracy"]
        row["dbbench_invalid_format"] = results["dbbench"]["invalid_format_rate"]
    if "general" in results:
        row["mmlu"] = results["general"]["mmlu"]["accuracy"]
        row["gsm8k"] = results["general"]["gsm8k"]["accuracy"]
    return row


def write_csv(rows: list[dict], path: str) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


PLOTTED = ("actions_accuracy", "dbbench_overall", "mmlu", "gsm8k")


def write_plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in PLOTTED:
        points = [(r["eta"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=key)
    ax.set_xlabel("η (agent share of the training examples)")
    ax.set_ylabel("score")
    ax.set_ylim(-0.02, 1.02)
    losses = [(r["eta"], r["final_loss"]) for r in rows if r.get("final_loss") is not None]
    if losses:
        twin = ax.twinx()
        twin.plot(*zip(*losses), color="grey", linestyle="--", marker="x", label="final training loss")
        twin.set_ylabel("loss")
        twin.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep(args: argparse.Namespace) -> list[dict]:
    for o in args.overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r}: expected key=value")
        if o.split("=", 1)[0] in OWN_KEYS:
            raise ConfigError(f"override {o}: the sweep sets {o.split('=', 1)[0]} for every point; leave it out")
    for flag, path in (("--config", args.config), ("--data-config", args.data_config)):
        if path and not os.path.isfile(path):
            raise ConfigError(f"{flag} {path}: does not exist")
    os.makedirs(args.output, exist_ok=True)
    suites = args.suite
    eval_data = os.path.join(args.output, "eval-data")
    if "actions" in suites:
        _build(eval_data, 1.0, args.data_config, os.path.join(args.output, "eval-data.log"))
    rows = []
    for n, eta in enumerate(args.eta, 1):
        point = os.path.join(args.output, point_name(eta))
        os.makedirs(point, exist_ok=True)
        label = f"sweep: η = {eta:g} ({n}/{len(args.eta)})"
        if os.path.exists(os.path.join(point, "eval", "eval.json")):
            log.info("%s: done before, kept", label)
        else:
            start = time.monotonic()
            data = os.path.join(point, "data")
            log.info("%s: building the mix", label)
            _build(data, eta, args.data_config, os.path.join(point, "build.log"))
            run_dir = os.path.join(point, "run")
            if not os.path.exists(os.path.join(point, "trained")):
                log.info("%s: training (log: %s)", label, os.path.join(point, "train.log"))
                cmd = [sys.executable, "-m", "agentlm_jax.train", *(["--config", args.config] if args.config else []),
                       *args.overrides, f"data.path={data}", f"run_dir={run_dir}"]
                _run(cmd, os.path.join(point, "train.log"), f"training η = {eta:g}")
                open(os.path.join(point, "trained"), "w").close()
            log.info("%s: evaluating", label)
            cmd = [sys.executable, "-m", "agentlm_jax.evaluate", "--model", run_dir, "--suite", suites,
                   "--max-items", str(args.max_items), "--max-new-tokens", str(args.max_new_tokens),
                   "--output", os.path.join(point, "eval.tmp")]
            if "actions" in suites:
                cmd += ["--data", eval_data]
            _run(cmd, os.path.join(point, "evaluate.log"), f"evaluating η = {eta:g}")
            shutil.rmtree(os.path.join(point, "eval"), ignore_errors=True)
            os.replace(os.path.join(point, "eval.tmp"), os.path.join(point, "eval"))  # the point is done
            log.info("%s: done in %s", label, format_duration(time.monotonic() - start))
        rows.append(row_of(eta, point))
        write_csv(rows, os.path.join(args.output, "sweep.csv"))
    write_plot(rows, os.path.join(args.output, "sweep.png"))
    log.info("wrote %s and %s", os.path.join(args.output, "sweep.csv"), os.path.join(args.output, "sweep.png"))
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    cli.configure_logging()
    args = build_parser().parse_args(argv)
    return cli.run_reporting_errors(lambda: sweep(args))


if __name__ == "__main__":
    main()
