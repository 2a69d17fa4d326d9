"""eval.json and eval.md: our numbers per suite and task, with the paper's published ones beside them where
the paper reports the same task (docs/paper.md), labelled as not comparable unless they are."""

from __future__ import annotations

import json
import posixpath

import fsspec

# docs/paper.md: AgentLM-7B held-in success rates (AgentBench harness of the paper).
PAPER_AGENTLM_7B = {"alfworld": 84.0, "webshop": 63.6, "mind2web": 6.4, "kg": 18.1, "os": 17.4, "db": 30.6}
# docs/paper.md: overall held-in / held-out / general scores (each a mean of task scores normalised by the
# paper's own procedure; no per-task numbers for 13B and 70B are in docs/paper.md).
PAPER_OVERALL = {"AgentLM-7B": (1.96, 0.67, 0.62), "AgentLM-13B": (2.11, 0.78, 0.69), "AgentLM-70B": (2.55, 1.40, 0.96)}
LLAMA2_7B_SHAPE = {"hidden_size": 4096, "num_layers": 32, "num_heads": 32, "vocab_size": 32000}


def model_is_7b_llama2(model_config: dict | None) -> bool:
    return bool(model_config) and all(model_config.get(k) == v for k, v in LLAMA2_7B_SHAPE.items())


def comparability(suite: str, task: str | None, meta: dict) -> str:
    """Why a number beside the paper's is (not) comparable."""
    if suite == "actions":
        return "not comparable: teacher-forced next-action accuracy, the paper reports episode success rates"
    if suite == "dbbench":
        reasons = []
        if not model_is_7b_llama2(meta.get("model_config")):
            reasons.append("the model is not a Llama-2-7B fine-tune")
        if meta.get("dbbench_items") != 300:
            reasons.append(f"{meta.get('dbbench_items')} items, not AgentBench's 300 (standard.jsonl)")
        reasons.append("SQLite, not MySQL (docs/evaluation.md)")
        return "not comparable: " + "; ".join(reasons) if len(reasons) > 1 else "close: " + reasons[0]
    return "the paper reports no per-task number in docs/paper.md"


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [f"# Evaluation of {meta['model']}", "",
             f"Suites: {', '.join(results['suites'])}. Greedy decoding, at most {meta['max_new_tokens']} new tokens; "
             f"chat template {meta['chat_template']}. Paper numbers: AgentLM-7B (docs/paper.md).", ""]
    actions = results["suites"].get("actions")
    if actions:
        lines += [f"## actions (teacher-forced next-action accuracy, {meta.get('data')}, split "
                  f"{meta.get('split')})", "",
                  "| task | records | scored turns | accuracy % | unparsed % | paper AgentLM-7B (success %) |",
                  "|---|---:|---:|---:|---:|---|"]
        for task, v in actions["tasks"].items():
            paper = PAPER_AGENTLM_7B.get(task)
            lines.append(f"| {task} | {v['records']} | {v['scored_turns']} | {_pct(v['accuracy'])} | "
                         f"{_pct(v['unparsed_rate'])} | {'' if paper is None else f'{paper} (not comparable)'} |")
        o = actions["overall"]
        lines += [f"| all | | {o['scored_turns']} | {_pct(o['accuracy'])} (macro {_pct(o['macro_accuracy'])}) | | |",
                  "", comparability("actions", None, meta) + ".", ""]
    db = results["suites"].get("dbbench")
    if db:
        backend = meta.get("dbbench_backend") or {"backend": "sqlite", "where": "in memory"}
        where = (f"MySQL {backend.get('version', '')} at {backend.get('server')}" if backend["backend"] == "mysql"
                 else "SQLite in memory")
        lines += [f"## dbbench (interactive episodes, {meta.get('dbbench_source')}, on {where})", "",
                  "| metric | ours % | paper AgentLM-7B % |", "|---|---:|---:|",
                  f"| overall (mean of SELECT, INSERT, UPDATE) | {_pct(db['overall_cat_accuracy'])} | "
                  f"{PAPER_AGENTLM_7B['db']} |"]
        for key in sorted(k for k in db if k.endswith("_accuracy") and k != "overall_cat_accuracy"):
            lines.append(f"| {key[:-len('_accuracy')]} | {_pct(db[key])} | |")
        lines += [f"| invalid format (rate of episodes) | {_pct(db['invalid_format_rate'])} | |", "",
                  f"Episodes: {db['episodes']}, ends: {db['status']}, mean SQL rounds {db['mean_rounds']:.2f}. "
                  f"{comparability('dbbench', 'db', meta)}.", ""]
    general = results["suites"].get("general")
    if general:
        lines += ["## general (zero-shot)", "", "| benchmark | items | accuracy % |", "|---|---:|---:|"]
        for name, v in general.items():
            lines.append(f"| {name} ({v['source']}) | {v['items']} | {_pct(v['accuracy'])} |")
        lines += ["", "The paper's general score (MMLU, HumanEval, GSM8K, MT-Bench together) is not per benchmark "
                  "in docs/paper.md: nothing to compare.", ""]
    lines += ["## The paper's overall scores (held-in / held-out / general)", "",
              "| model | held-in | held-out | general |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {a} | {b} | {c} |" for name, (a, b, c) in PAPER_OVERALL.items()]
    lines += ["", "These are normalised means over many tasks; this evaluation computes none of them.", ""]
    return "\n".join(lines)


def write(results: dict, output: str) -> tuple[str, str]:
    fs, root = fsspec.core.url_to_fs(output)
    fs.makedirs(root, exist_ok=True)
    json_path, md_path = posixpath.join(output, "eval.json"), posixpath.join(output, "eval.md")
    with fsspec.open(json_path, "w") as f:
        json.dump(results, f, indent=2, ensure_ascii=False, default=float)
    with fsspec.open(md_path, "w") as f:
        f.write(markdown(results))
    return json_path, md_path
