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
import json
import posixpath

from data_pipeline import reward_filter
from data_pipeline.formats.chat_template import Pair, ToolCall, ToolResult
from data_pipeline.sources import RawItem

USER, ASSISTANT, SYSTEM, TOOL = "user", "assistant", "system", "tool"
FUNCTION_CALL = "function_call"  # ShareGPT's (LLaMA-Factory's) assistant turn that holds tool calls as JSON text
ROLE_NAMES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT, "chatgpt": ASSISTANT,
              "bing": ASSISTANT, "bard": ASSISTANT, "model": ASSISTANT, "system": SYSTEM, "developer": SYSTEM, "tool": TOOL,
              "observation": TOOL, FUNCTION_CALL: ASSISTANT}
CANONICAL_ROLES = {"human", "gpt", "user", "assistant", "system", "tool", "observation", FUNCTION_CALL}
AUTO = "auto"  # the record format detected per record (config.RECORD_FORMATS)

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
    tools: tuple[dict, ...] = ()  # the record's tool (function) schemas, as the chat template takes them

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


def normalize(item: RawItem, source: str, kind: str, reward_thresholds,
              record_format: str = AUTO) -> tuple[Conversation | Dropped, tuple[str, ...]]:
    """(Conversation or Dropped, sorted repair kinds). `reward_thresholds(task) -> float`; `record_format`:
    one of RECORD_FORMATS, the layout the source's records must have."""
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
        system, pairs = _pairs(record, repairs, record_format)
        tools = _tools(record)
    except _Reject as r:
        return Dropped(REJECTED, r.reason, r.detail), tuple(sorted(repairs))
    if verdict is not None:
        return Dropped(FILTERED, verdict, repr(record.get("reward"))), tuple(sorted(repairs))
    if not any(p.loss for p in pairs):
        return Dropped(FILTERED, NOTHING_TO_LEARN), tuple(sorted(repairs))
    conv = Conversation(source, kind, record_id, task, system, tuple(pairs), item.file, item.number, tools)
    return conv, tuple(sorted(repairs))


def _record_id(record: dict, item: RawItem, repairs: set[str]) -> str:
    rid = record.get("id")
    if rid is None or rid == "":
        repairs.add("missing_id")
        return f"{item.rel_path or posixpath.basename(item.file)}#{item.number}"
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise _Reject("bad_id", repr(rid)[:200])
    return str(rid)


@dataclasses.dataclass
class _Turn:
    role: str  # user | assistant | tool
    text: str
    loss: bool = True
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None


def _turns(record: dict, record_format: str) -> list[tuple[int, str, str, _Turn]]:
    """(turn index, role as written, mapped role, turn) for each turn; empty texts kept as ''."""
    key = next((k for k in CONVERSATION_KEYS if k in record), None)
    raw = record.get(key) if key else None
    if not isinstance(raw, list):
        raise _Reject("missing_conversations", type(raw).__name__)
    if record_format != AUTO and (found := _detected_format(key, raw)) not in (record_format, None):
        raise _Reject("wrong_record_format", f"expected {record_format}, the record is {found} (its turns "
                                             f"are under {key!r}); set the source's record format to auto")
    turns = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, dict):
            raise _Reject("turn_not_an_object", f"turn {i}: {type(turn).__name__}")
        name = turn.get("from", turn.get("role"))
        role = ROLE_NAMES.get(name.strip().lower()) if isinstance(name, str) else None
        if role is None:
            raise _Reject("unknown_role", f"turn {i}: {name!r}")
        if "value" in turn or "content" not in turn:
            text = turn.get("value")
            if text is not None and not isinstance(text, str):
                raise _Reject("non_string_value", f"turn {i}: {type(text).__name__}")
        else:
            text = _content_text(turn["content"], i)
        loss = _loss_flag(turn, i)
        parsed = _Turn(role, text or "", loss)
        if name.strip().lower() == FUNCTION_CALL:  # ShareGPT (LLaMA-Factory): the value is the call(s) as JSON
            parsed = _Turn(ASSISTANT, "", loss, _sharegpt_calls(text or "", i))
        elif turn.get("tool_calls") is not None:
            if role != ASSISTANT:
                raise _Reject("bad_tool_call", f"turn {i}: a {name} message with tool_calls (only assistant "
                                               f"messages make calls)")
            parsed.tool_calls = _openai_calls(turn["tool_calls"], i)
        if role == TOOL:
            for field in ("tool_call_id", "name"):
                value = turn.get(field)
                if value is not None and not isinstance(value, str):
                    raise _Reject("bad_tool_call", f"turn {i}: {field} is {type(value).__name__}, not a string")
            parsed.tool_call_id, parsed.name = turn.get("tool_call_id"), turn.get("name")
        turns.append((i, name, role, parsed))
    return turns


def _detected_format(key: str, raw: list) -> str | None:
    """openai (role/content messages) or sharegpt (from/value turns; AgentInstruct's too); None if unknown."""
    first = next((t for t in raw if isinstance(t, dict)), None)
    if first is None:
        return None
    return "openai" if "role" in first else "sharegpt" if "from" in first else None


def _content_text(content, i: int) -> str:
    """OpenAI `content`: a string, null, or a list of parts of which only text parts (joined) are supported."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise _Reject("non_string_value", f"turn {i}: {type(content).__name__}")
    texts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise _Reject("unsupported_content_part", f"turn {i}, part {k}: {kind!r} (only text parts are "
                                                      f"supported)")
        texts.append(part["text"])
    return "".join(texts)


def _loss_flag(turn: dict, i: int) -> bool:
    """AgentInstruct's `loss` (true/null: trained) or OpenAI-style `weight` (1: trained, 0: context only)."""
    loss, weight = turn.get("loss"), turn.get("weight")
    if loss is not None and not isinstance(loss, bool):
        raise _Reject("bad_loss_flag", f"turn {i}: loss {loss!r}")
    if weight is not None and (isinstance(weight, bool) or weight not in (0, 1)):
        raise _Reject("bad_loss_flag", f"turn {i}: weight {weight!r} (0 or 1)")
    return loss is not False and weight != 0


def _arguments(arguments, where: str) -> dict:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError as e:
            raise _Reject("invalid_tool_arguments", f"{where}: arguments are not valid JSON ({e}): "
                                                    f"{arguments[:120]!r}") from None
    if not isinstance(arguments, dict):
        raise _Reject("invalid_tool_arguments", f"{where}: arguments are a {type(arguments).__name__}, not a JSON "
                                                f"object")
    return arguments


def _openai_calls(calls, i: int) -> tuple[ToolCall, ...]:
    if not isinstance(calls, list):
        raise _Reject("bad_tool_call", f"turn {i}: tool_calls is a {type(calls).__name__}, not a list")
    out = []
    for k, call in enumerate(calls):
        where = f"turn {i}, tool call {k}"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise _Reject("bad_tool_call", f"{where}: needs {{\"function\": {{\"name\": ..., \"arguments\": ...}}}}")
        if call.get("type", "function") != "function":
            raise _Reject("bad_tool_call", f"{where}: type {call.get('type')!r} (only function calls)")
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise _Reject("bad_tool_call", f"{where}: id is {type(call_id).__name__}, not a string")
        out.append(ToolCall(function["name"], _arguments(function.get("arguments", {}), where), call_id))
    return tuple(out)


def _sharegpt_calls(text: str, i: int) -> tuple[ToolCall, ...]:
    """A ShareGPT `function_call` value: `{"name", "arguments"}` or a list of them, as JSON text."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise _Reject("invalid_tool_arguments", f"turn {i}: the function_call is not valid JSON ({e}): "
                                                f"{text[:120]!r}") from None
    out = []
    for k, call in enumerate(value if isinstance(value, list) else [value]):
        where = f"turn {i}, tool call {k}"
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
            raise _Reject("bad_tool_call", f"{where}: needs {{\"name\": ..., \"arguments\": ...}}")
        out.append(ToolCall(call["name"], _arguments(call.get("arguments", {}), where)))
    return tuple(out)


def _tools(record: dict) -> tuple[dict, ...]:
    """The record's tool schemas: a list (OpenAI) or its JSON text (ShareGPT, LLaMA-Factory), of objects."""
    tools = record.get("tools")
    if tools is None or tools == "":
        return ()
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError as e:
            raise _Reject("bad_tools", f"tools are not valid JSON ({e})") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise _Reject("bad_tools", "tools must be a list of JSON objects (function schemas)")
    return tuple(tools)


def _pairs(record: dict, repairs: set[str], record_format: str = AUTO) -> tuple[str | None, list[Pair]]:
    system_parts, turns, started = [], [], False
    for i, name, role, turn in _turns(record, record_format):
        if name.strip().lower() not in CANONICAL_ROLES:
            repairs.add("role_alias")
        if not turn.text.strip() and not turn.tool_calls and role != TOOL:  # (a tool result may be empty)
            repairs.add("dropped_empty_turn")
            continue
        if role == SYSTEM:
            if started:
                raise _Reject("system_turn_mid_conversation", f"turn {i}")
            system_parts.append(turn.text.strip())
            repairs.add("system_prompt_from_record")
            continue
        started = True
        if role == TOOL:
            _check_tool_result(turns, turn, i)
            turns.append((i, turn))
        elif turns and turns[-1][1].role == role == USER:
            repairs.add("merged_consecutive_turns")
            prev = turns[-1][1]
            prev.text = f"{prev.text.rstrip()}\n\n{turn.text.strip()}"
        elif turns and turns[-1][1].role == role == ASSISTANT:
            repairs.add("merged_consecutive_turns")
            prev = turns[-1][1]
            prev.text = (f"{prev.text.rstrip()}\n\n{turn.text.strip()}" if prev.text.strip() and turn.text.strip()
                         else prev.text or turn.text)
            prev.loss, prev.tool_calls = prev.loss and turn.loss, prev.tool_calls + turn.tool_calls
        else:
            turns.append((i, turn))
    while turns and turns[0][1].role != USER:
        dropped = turns.pop(0)[1]
        repairs.add("dropped_leading_assistant" if dropped.role == ASSISTANT else "dropped_orphan_tool_results")
    if turns and turns[-1][1].role != ASSISTANT:
        while turns and turns[-1][1].role != ASSISTANT:
            repairs.add("dropped_trailing_user" if turns.pop()[1].role == USER else "dropped_trailing_tool_results")
    pairs, user, results = [], "", []
    for _, turn in turns:
        if turn.role == USER:
            user = turn.text
        elif turn.role == TOOL:
            results.append(ToolResult(turn.text, turn.tool_call_id, turn.name))
        else:
            pairs.append(Pair(user, turn.text, turn.loss, turn.tool_calls, tuple(results)))
            user, results = "", []
    return ("\n\n".join(system_parts) or None), pairs


def _check_tool_result(turns: list, turn: _Turn, i: int) -> None:
    """A tool message answers a call of the assistant message before it (after that message's other results)."""
    k = len(turns)
    while k and turns[k - 1][1].role == TOOL:
        k -= 1
    caller = turns[k - 1][1] if k else None
    if caller is None or caller.role != ASSISTANT or not caller.tool_calls:
        raise _Reject("tool_result_without_call", f"turn {i}: a tool message that does not follow an assistant "
                                                  f"message with tool calls")
    answered = [t.tool_call_id for _, t in turns[k:]]
    ids = [c.id for c in caller.tool_calls]
    if turn.tool_call_id is not None and any(ids):
        if turn.tool_call_id not in ids:
            raise _Reject("tool_result_without_call", f"turn {i}: tool_call_id {turn.tool_call_id!r} matches no "
                                                      f"call of turn {turns[k - 1][0]} ({', '.join(map(str, ids))})")
        if turn.tool_call_id in answered:
            raise _Reject("tool_result_without_call", f"turn {i}: call {turn.tool_call_id!r} already has a result")
    elif len(turns) - k >= len(caller.tool_calls):
        raise _Reject("tool_result_without_call", f"turn {i}: more tool results than the {len(caller.tool_calls)} "
                                                  f"call(s) of turn {turns[k - 1][0]}")
