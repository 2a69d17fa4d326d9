"""Suite `actions`: teacher-forced next-action accuracy per task on a pipeline output's split.

Every record holds `input_ids` and `loss_mask`; each maximal run of `loss_mask == 1` is one assistant turn
that carries loss. For each turn the prompt is every id before the run (the true history, whatever the
template), the gold answer is the run (its end-of-turn token dropped on decoding). The model continues the
prompt greedily; both texts are decoded, the task's extractor (evaluation/extractors.py) takes the action
out of each, and the two actions are compared after normalisation. Turns whose gold text has no action
(the "OK" and "Ok." acknowledgements some tasks open with) are counted but not scored; a generated turn
whose action cannot be parsed is wrong and counted in `unparsed_rate`.

The metric is teacher-forced (the history is always the gold one), so it is not the success rate of an
interactive episode (what the paper reports).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Callable, Iterable, Sequence

import numpy as np

from agentlm_jax.errors import ConfigError
from agentlm_jax.evaluation.extractors import extractor_for
from agentlm_jax.progress import Progress


# (prompts, max_new_tokens per prompt) -> new token ids per prompt (stop token removed)
CompleteFn = Callable[[Sequence[Sequence[int]], Sequence[int]], list[list[int]]]


@dataclasses.dataclass(frozen=True)
class Turn:
    record_id: str
    task: str
    index: int  # which loss-carrying turn of the record (0-based)
    prompt: list[int]
    gold: list[int]


def loss_runs(loss_mask: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of 1s."""
    mask = np.asarray(loss_mask, np.int8)
    if mask.size == 0:
        return []
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def record_turns(record, *, where: str = "") -> list[Turn]:
    ids = np.asarray(record.input_ids)
    mask = np.asarray(record.loss_mask)
    bad = np.setdiff1d(np.unique(mask), [0, 1])
    if bad.size:
        raise ConfigError(f"{where}record {record.id!r}: loss_mask holds {bad.tolist()}, expected only 0 and 1")
    turns = []
    for k, (a, b) in enumerate(loss_runs(mask)):
        if a == 0:
            raise ConfigError(f"{where}record {record.id!r}: its first token carries loss, so turn {k} has no "
                             f"prompt; was it built by data_pipeline?")
        turns.append(Turn(record.id, record.task, k, ids[:a].tolist(), ids[a:b].tolist()))
    return turns


def select_turns(records: Iterable, *, max_items: int | None, tasks: Sequence[str] | None = None,
                 where: str = "", max_turns: int | None = None,
                 scorable: Callable[[Turn], bool] | None = None) -> tuple[dict[str, list[Turn]], dict[str, int]]:
    """The turns per task (those of the first `max_items` records of each task that has an extractor; with
    `max_turns`, only until that many `scorable` turns (default: any) of the task are chosen, in record
    order), and how many records of tasks without an extractor were skipped."""
    chosen: dict[str, list[Turn]] = defaultdict(list)
    records_per_task: dict[str, int] = defaultdict(int)
    counted: dict[str, int] = defaultdict(int)  # scorable turns chosen per task
    skipped: dict[str, int] = defaultdict(int)
    for record in records:
        if extractor_for(record.task) is None or (tasks and record.task not in tasks):
            skipped[record.task] += 1
            continue
        if max_items is not None and records_per_task[record.task] >= max_items:
            continue
        if max_turns is not None and counted[record.task] >= max_turns:
            continue
        records_per_task[record.task] += 1
        for turn in record_turns(record, where=where):
            if max_turns is not None and counted[record.task] >= max_turns:
                break
            chosen[record.task].append(turn)
            counted[record.task] += scorable is None or scorable(turn)
    return dict(chosen), dict(skipped)


def score_turns(turns_by_task: dict[str, list[Turn]], completions: dict[tuple[str, int], list[int]],
                decode: Callable[[Sequence[int]], str], *, keep_examples: int = 3,
                gold_action: Callable[[Turn], str | None] | None = None) -> dict:
    """Per task: turns, scored turns, correct, accuracy, unparsed_rate; and a few examples. `gold_action`: the
    gold turn's action (default: extracted from its decoded text)."""
    tasks = {}
    for task, turns in sorted(turns_by_task.items()):
        extract = extractor_for(task)
        scored = correct = unparsed = 0
        examples = []
        for t in turns:
            gold = gold_action(t) if gold_action else extract(decode(t.gold))
            if gold is None:
                continue
            text = decode(completions[(t.record_id, t.index)])
            got = extract(text)
            scored += 1
            unparsed += got is None
            correct += got == gold
            if len(examples) < keep_examples:
                examples.append({"record": t.record_id, "turn": t.index, "gold_action": gold,
                                 "generated_action": got, "generated": text[:400]})
        tasks[task] = {"records": len({t.record_id for t in turns}), "turns": len(turns), "scored_turns": scored,
                       "correct": correct, "accuracy": correct / scored if scored else None,
                       "unparsed_rate": unparsed / scored if scored else None, "examples": examples}
    return tasks


@dataclasses.dataclass
class Requests:
    """What the `actions` suite asks the model: the turns to generate (`flat`) with their token budgets, by task
    (every selected turn, for scoring), and what was left out."""
    by_task: dict[str, list[Turn]]
    flat: list[Turn]
    budgets: list[int]
    skipped: dict[str, int]
    too_long: int
    gold_action: Callable[[Turn], str | None]

    @property
    def prompts(self) -> list[list[int]]:
        return [t.prompt for t in self.flat]


def requests(records: Iterable, decode: Callable[[Sequence[int]], str], *, max_items: int | None = 50,
             max_new_tokens: int = 128, extra_tokens: int = 32, max_length: int | None = None,
             tasks: Sequence[str] | None = None, where: str = "", max_turns: int | None = None) -> Requests:
    """The turns `evaluate_actions` generates (see there), without generating them: what it compiles for."""
    gold_actions: dict[tuple[str, int], str | None] = {}

    def gold_action(t: Turn) -> str | None:  # each gold turn decoded once
        key = (t.record_id, t.index)
        if key not in gold_actions:
            gold_actions[key] = extractor_for(t.task)(decode(t.gold))
        return gold_actions[key]

    def scorable(t: Turn) -> bool:
        return gold_action(t) is not None

    by_task, skipped = select_turns(records, max_items=max_items, tasks=tasks, where=where, max_turns=max_turns,
                                    scorable=scorable)
    flat = [t for task in sorted(by_task) for t in by_task[task] if scorable(t)]
    too_long = 0
    if max_length is not None:
        fits = [t for t in flat if len(t.prompt) + 1 <= max_length]
        too_long = len(flat) - len(fits)
        flat = fits
        by_task = {k: [t for t in v if len(t.prompt) + 1 <= max_length] for k, v in by_task.items()}
    budgets = [max(1, min(max_new_tokens, len(t.gold) + extra_tokens)) for t in flat]
    if max_length is not None:
        budgets = [min(b, max_length - len(t.prompt)) for b, t in zip(budgets, flat)]
    return Requests(by_task, flat, budgets, skipped, too_long, gold_action)


def evaluate_actions(records: Iterable, complete: CompleteFn, decode: Callable[[Sequence[int]], str], *,
                     max_items: int | None = 50, max_new_tokens: int = 128, extra_tokens: int = 32,
                     max_length: int | None = None, tasks: Sequence[str] | None = None, where: str = "",
                     show_progress: bool = True, max_turns: int | None = None) -> dict:
    """The `actions` suite over `records` (records.Record-like: input_ids, loss_mask, task, id).

    Each turn may generate up to min(`max_new_tokens`, len(gold) + `extra_tokens`) tokens (enough to write
    the gold action and a little more); turns whose prompt leaves no room under `max_length` are skipped
    and counted (`too_long`). Only turns whose gold text holds an action are generated. `max_turns`: at most
    that many of those per task (as select_turns)."""
    req = requests(records, decode, max_items=max_items, max_new_tokens=max_new_tokens, extra_tokens=extra_tokens,
                   max_length=max_length, tasks=tasks, where=where, max_turns=max_turns)
    outs: list[list[int]] = []
    with Progress(total=len(req.flat), desc="actions", unit="turn", enabled=show_progress) as bar:
        if req.flat:
            outs = complete(req.prompts, req.budgets, on_batch=bar.update)
    completions = {(t.record_id, t.index): o for t, o in zip(req.flat, outs)}
    tasks_out = score_turns(req.by_task, completions, decode, gold_action=req.gold_action)
    scored = sum(v["scored_turns"] for v in tasks_out.values())
    correct = sum(v["correct"] for v in tasks_out.values())
    return {"tasks": tasks_out, "skipped_records": req.skipped, "too_long_turns": req.too_long,
            "overall": {"scored_turns": scored, "correct": correct,
                        "accuracy": correct / scored if scored else None,
                        "macro_accuracy": _mean([v["accuracy"] for v in tasks_out.values()])}}


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def read_split(data_dir: str, split: str = "validation"):
    """(records of a pipeline output's split, a `where` prefix for messages); errors name the directory."""
    from agentlm_jax.data.dataset import TFRecordSource, split_files
    from agentlm_jax.errors import MissingInputError

    import fsspec

    fs, root = fsspec.core.url_to_fs(data_dir)
    if not fs.isdir(root):
        raise MissingInputError(f"--data {data_dir}: not a directory; give a data_pipeline output directory "
                                f"(TFRecord shards and manifest.json)")
    try:
        paths = split_files(data_dir, split)
    except (FileNotFoundError, ValueError) as e:
        raise MissingInputError(f"--data {data_dir}: {e}") from None
    try:
        source = TFRecordSource(paths)
        return [source[i] for i in range(len(source))], f"{data_dir} ({split}): "
    except ValueError as e:  # records.CorruptRecordError and undecodable examples; the message names the file
        raise ConfigError(f"--data {data_dir}: {e}") from None
