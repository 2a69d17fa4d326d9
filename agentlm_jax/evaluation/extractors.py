"""The action of an assistant turn, per AgentInstruct task, normalised so that two turns compare equal when
they would do the same thing in the environment (not when their thoughts agree).

Each extractor takes a turn's text and returns a normalised action string, or None when the turn carries no
action it can parse. The formats are those of the released AgentInstruct trajectories (and of AgentBench's
prompts, which they follow):

    os        `Act: bash` + a ```bash block | `Act: answer(...)` | `Act: finish`
    db        `Action: Operation` + a ```sql block | `Action: Answer` + `Final Answer: [...]`
    alfworld  `ACTION: ...` (often after `THOUGHT: ...`)
    webshop   `Action:` then `search[...]` or `click[...]`
    kg        `Action: get_relations(...)` and the other KB tools | `Final Answer: #3`
    mind2web  `Answer: B.` + `Action: CLICK` | `TYPE`/`SELECT` with `Value: ...` (`Answer: A.` alone: none of
              the above)
"""

from __future__ import annotations

import ast
import json
import re
from typing import Callable

_WS = re.compile(r"\s+")


def _squash(text: str) -> str:
    return _WS.sub(" ", text).strip()


# ------------------------------------------------------------------------------------------------------ os
_OS_ACT = re.compile(r"Act:\s*(bash|answer|finish)\b", re.IGNORECASE)
_BASH_BLOCK = re.compile(r"```(?:bash|sh|shell)?[ \t]*\n(.*?)```", re.DOTALL)


def os_action(text: str) -> str | None:
    m = _OS_ACT.search(text)
    if not m:
        return None
    kind = m.group(1).lower()
    rest = text[m.end():]
    if kind == "bash":
        block = _BASH_BLOCK.search(rest)
        return f"bash: {_squash(block.group(1))}" if block and block.group(1).strip() else None
    if kind == "answer":
        inner = re.match(r"\s*\((.*)\)", rest, re.DOTALL)
        if not inner:
            return None
        return f"answer: {_squash(inner.group(1)).strip(chr(34) + chr(39))}"
    return "finish"


# ------------------------------------------------------------------------------------------------------ db
_DB_ACTION = re.compile(r"Action:\s*(Operation|Answer)\b", re.IGNORECASE)
_SQL_BLOCK = re.compile(r"```sql[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_FINAL_ANSWER = re.compile(r"Final Answer:\s*(.*)")


def parse_answer_list(text: str) -> list:
    """`["a", "b"]` → ['a', 'b'] as AgentBench reads a final answer (a Python literal; anything else is the
    one-element list of the text itself). Never evaluates code: `ast.literal_eval` only."""
    try:
        value = ast.literal_eval(text.strip())
        return list(value) if isinstance(value, (list, tuple, set)) else [text]
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return [text]


def _answer_key(values: list) -> str:
    return json.dumps(sorted(_squash(str(v)).lower() for v in values), ensure_ascii=False)


def db_action(text: str) -> str | None:
    m = _DB_ACTION.search(text)
    if not m:
        return None
    rest = text[m.end():]
    if m.group(1).lower() == "operation":
        block = _SQL_BLOCK.search(rest)
        if not block or not block.group(1).strip():
            return None
        return f"sql: {_squash(block.group(1)).rstrip(';').strip().lower()}"
    answer = _FINAL_ANSWER.search(rest)
    return f"answer: {_answer_key(parse_answer_list(answer.group(1)))}" if answer else None


# ------------------------------------------------------------------------------------------------ alfworld
_ALF_ACTION = re.compile(r"ACTION:\s*(.+)")


def alfworld_action(text: str) -> str | None:
    m = _ALF_ACTION.search(text)
    return _squash(m.group(1)).lower().rstrip(".") or None if m else None


# ------------------------------------------------------------------------------------------------- webshop
_WEBSHOP = re.compile(r"\b(search|click)\[(.*?)\]", re.DOTALL | re.IGNORECASE)


def webshop_action(text: str) -> str | None:
    at = text.find("Action:")
    if at < 0:
        return None
    m = _WEBSHOP.search(text, at)
    return f"{m.group(1).lower()}[{_squash(m.group(2)).lower()}]" if m else None


# ------------------------------------------------------------------------------------------------------ kg
KG_TOOLS = ("get_relations", "get_neighbors", "intersection", "get_attributes", "argmax", "argmin", "count")
_KG_CALL = re.compile(r"\b(" + "|".join(KG_TOOLS) + r")\((.*?)\)\s*$", re.MULTILINE)
_KG_FINAL = re.compile(r"Final Answer:\s*#\s*(\d+)")


def kg_action(text: str) -> str | None:
    final = _KG_FINAL.search(text)
    at = text.find("Action:")
    call = _KG_CALL.search(text, at) if at >= 0 else None
    if final and (call is None or final.start() < call.start()):
        return f"final: #{final.group(1)}"
    if call is None:
        return None
    args = [_squash(a).lower() for a in call.group(2).split(",")]
    return f"{call.group(1)}({', '.join(args)})"


# ------------------------------------------------------------------------------------------------ mind2web
_M2W_ANSWER = re.compile(r"Answer:\s*([A-Z])\b")
_M2W_ACTION = re.compile(r"Action:\s*(CLICK|TYPE|SELECT)\b", re.IGNORECASE)
_M2W_VALUE = re.compile(r"Value:\s*(.*)")


def mind2web_action(text: str) -> str | None:
    answer = _M2W_ANSWER.search(text)
    if not answer:
        return None
    letter = answer.group(1)
    action = _M2W_ACTION.search(text, answer.end())
    if not action:
        return letter if letter == "A" else None  # A: "None of the above", no operation follows
    op = action.group(1).upper()
    if op == "CLICK":
        return f"{letter} CLICK"
    value = _M2W_VALUE.search(text, action.end())
    if not value:
        return None
    return f"{letter} {op} {_squash(value.group(1)).lower()}"


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "os": os_action, "db": db_action, "alfworld": alfworld_action, "webshop": webshop_action, "kg": kg_action,
    "mind2web": mind2web_action,
}


def extractor_for(task: str) -> Callable[[str], str | None] | None:
    """The task's extractor (case-insensitive; `os_interaction`, `dbbench`, `webshop_...` match by prefix)."""
    name = task.lower()
    aliases = {"os_interaction": "os", "dbbench": "db", "knowledge_graph": "kg", "m2w": "mind2web"}
    name = aliases.get(name, name)
    if name in EXTRACTORS:
        return EXTRACTORS[name]
    return next((fn for key, fn in EXTRACTORS.items() if name.startswith(key + "_")), None)
