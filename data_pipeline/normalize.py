"""Validation and normalisation of one raw record into a `Conversation` of (user, assistant) pairs.

Each irregularity has one policy: repair it when that is safe (counted per kind in the manifest's
`repairs`), otherwise reject the record (counted and written to rejected.jsonl) or filter it (a valid
record that is not used, counted by reason).

  role names       human/user → user; gpt/assistant/chatgpt/bing/bard/model → assistant (case-insensitive);
                   other names (canonical ones are `human`/`gpt` and `user`/`assistant`) → repair `role_alias`
  system turns     leading ones become the conversation's system prompt → repair `system_prompt_from_record`;
                   a system turn after the conversation started → reject `system_turn_mid_conversation`
  unknown roles    (tool, function, missing, ...) → reject `unknown_role`
  empty values     whitespace-only or null text → the turn is dropped → repair `dropped_empty_turn`
  non-string text  (numbers, lists, objects) → reject `non_string_value`
  same-role runs   consecutive user (or assistant) turns are joined with a blank line →
                   repair `merged_consecutive_turns` (a merged answer carries loss only if all parts did)
  leading answers  assistant turns before the first user turn are dropped → repair `dropped_leading_assistant`
  trailing prompt  a final user turn without an answer is dropped → repair `dropped_trailing_user`
  nothing to learn no pair left, or no answer with loss → filter `nothing_to_learn`
  loss flags       AgentInstruct's per-turn `loss`: true/null → trained, false → context only;
                   any other value → reject `bad_loss_flag`
  ids              a missing id becomes `{file's path within its source}#{record number}` (e.g. `a/d.jsonl#7`
                   for DIR/a/d.jsonl of source DIR; for a single file, its name) → repair `missing_id`; so
                   it is unique within the source and the same wherever the data lives (local or gs://);
                   a non-string, non-integer id → reject `bad_id`
  structure        not an object → reject `not_an_object`; no `conversations` (or `messages`, `items`) list →
                   reject `missing_conversations`; a turn that is not an object → reject `turn_not_an_object`
"""

from __future__ import annotations

import dataclasses
import posixpath

from data_pipeline import reward_filter
from data_pipeline.formats.chat_template import Pair
from data_pipeline.sources import RawItem

USER, ASSISTANT, SYSTEM = "user", "assistant", "system"
ROLE_NAMES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT, "chatgpt": ASSISTANT,
              "bing": ASSISTANT, "bard": ASSISTANT, "model": ASSISTANT, "system": SYSTEM}
CANONICAL_ROLES = {"human", "gpt", "user", "assistant", "system"}

# The turn list's key: ShareGPT dumps, OpenAI-style records, and OpenChat's ShareGPT files (sharegpt_gpt4.json).
CONVERSATION_KEYS = ("conversations", "messages", "items")

FILTERED, REJECTED = "filtered", "rejected"
NOTHING_TO_LEARN = "nothing_to_learn"


@dataclasses.dataclass(frozen=True)
class Conversation:
    source: str
    kind: str  # agent | general
    id: str
    task: str
    system: str | None  # the record's own system prompt, None = the configured default
    pairs: tuple[Pair, ...]
    file: str
    number: int

    @property
    def location(self) -> tuple[str, int]:
        return self.file, self.number


@dataclasses.dataclass(frozen=True)
class Dropped:
    bucket: str  # filtered | rejected
    reason: str
    detail: str = ""


class _Reject(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def normalize(item: RawItem, source: str, kind: str, reward_thresholds) -> tuple[Conversation | Dropped, tuple[str, ...]]:
    """(Conversation or Dropped, sorted repair kinds). `reward_thresholds(task) -> float`."""
    item = item.parsed()
    if item.error:
        return Dropped(REJECTED, item.error), ()
    repairs: set[str] = set()
    try:
        record = item.record
        if not isinstance(record, dict):
            raise _Reject("not_an_object", type(record).__name__)
        record_id = _record_id(record, item, repairs)
        if kind == "agent":
            task, note = reward_filter.agent_task(record, record_id, item.split, source)
            if task is None:
                raise _Reject(note, repr(record.get("task")))
            if note:
                repairs.add(note)
        else:
            task = source
        verdict = reward_filter.reward_verdict(record, reward_thresholds(task))
        if verdict == reward_filter.NON_NUMERIC_REWARD:
            raise _Reject(verdict, repr(record.get("reward")))
        system, pairs = _pairs(record, repairs)
    except _Reject as r:
        return Dropped(REJECTED, r.reason, r.detail), tuple(sorted(repairs))
    if verdict is not None:
        return Dropped(FILTERED, verdict, repr(record.get("reward"))), tuple(sorted(repairs))
    if not any(p.loss for p in pairs):
        return Dropped(FILTERED, NOTHING_TO_LEARN), tuple(sorted(repairs))
    conv = Conversation(source, kind, record_id, task, system, tuple(pairs), item.file, item.number)
    return conv, tuple(sorted(repairs))


def _record_id(record: dict, item: RawItem, repairs: set[str]) -> str:
    rid = record.get("id")
    if rid is None or rid == "":
        repairs.add("missing_id")
        return f"{item.rel_path or posixpath.basename(item.file)}#{item.number}"
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise _Reject("bad_id", repr(rid)[:200])
    return str(rid)


def _turns(record: dict) -> list[tuple[str, str, bool]]:
    """(role, text, loss) for each turn, roles mapped, empty turns kept as ''."""
    raw = next((record[k] for k in CONVERSATION_KEYS if k in record), None)
    if not isinstance(raw, list):
        raise _Reject("missing_conversations", type(raw).__name__)
    turns = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, dict):
            raise _Reject("turn_not_an_object", f"turn {i}: {type(turn).__name__}")
        name = turn.get("from", turn.get("role"))
        role = ROLE_NAMES.get(name.strip().lower()) if isinstance(name, str) else None
        if role is None:
            raise _Reject("unknown_role", f"turn {i}: {name!r}")
        text = turn.get("value", turn.get("content"))
        if text is not None and not isinstance(text, str):
            raise _Reject("non_string_value", f"turn {i}: {type(text).__name__}")
        loss = turn.get("loss")
        if loss is not None and not isinstance(loss, bool):
            raise _Reject("bad_loss_flag", f"turn {i}: {loss!r}")
        turns.append((role, name, text or "", loss is not False))
    return turns


def _pairs(record: dict, repairs: set[str]) -> tuple[str | None, list[Pair]]:
    system_parts, turns, started = [], [], False
    for i, (role, name, text, loss) in enumerate(_turns(record)):
        if name.strip().lower() not in CANONICAL_ROLES:
            repairs.add("role_alias")
        if not text.strip():
            repairs.add("dropped_empty_turn")
            continue
        if role == SYSTEM:
            if started:
                raise _Reject("system_turn_mid_conversation", f"turn {i}")
            system_parts.append(text.strip())
            repairs.add("system_prompt_from_record")
            continue
        started = True
        if turns and turns[-1][0] == role:
            repairs.add("merged_consecutive_turns")
            prev_role, prev_text, prev_loss = turns[-1]
            turns[-1] = (role, f"{prev_text.rstrip()}\n\n{text.strip()}", prev_loss and loss)
        else:
            turns.append((role, text, loss))
    while turns and turns[0][0] == ASSISTANT:
        turns.pop(0)
        repairs.add("dropped_leading_assistant")
    if turns and turns[-1][0] == USER:
        turns.pop()
        repairs.add("dropped_trailing_user")
    pairs = [Pair(u[1], a[1], a[2]) for u, a in zip(turns[::2], turns[1::2])]
    return ("\n\n".join(system_parts) or None), pairs
