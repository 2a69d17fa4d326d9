"""Suite `dbbench`: interactive database episodes as AgentBench's DB task runs them, on SQLite.

An episode: the instruction (`INSTRUCTION`, AgentBench's wording in substance), the one-shot assistant turn
"Ok.", then the item's question and table description. Each model turn is read as AgentBench reads it:
`Action: Operation` with a ```sql block runs that SQL (one statement, newlines folded) and the database's
raw response is the next user turn; `Action: Answer` with `Final Answer: [...]` ends the episode; at most
`max_rounds` (5) statements run. Any other turn ends the episode as `invalid_format` (AgentBench's
AGENT_VALIDATION_FAILED).

Scoring follows AgentBench (dbbench `metrics`): a question's final answer is read as a Python literal list
(else the one-element list of its text); one value each: equal as numbers when both parse (here within
1e-6, as AgentBench's newer DirectTypeAnswerValidator), else as strings; several: equal as sets. An INSERT,
UPDATE or DELETE item is scored, whatever the episode's end, by the table's state: AgentBench's MySQL hash

    md5(group_concat(rowhash order by rowhash)),  rowhash = substring(md5(concat_ws(',', columns...)), 1, 5)

reproduced here (`table_hash`): concat_ws skips NULLs, group_concat joins with ',' and stops at MySQL's
default group_concat_max_len of 1,024 bytes, an empty table hashes to NULL; the result is written as the
MySQL client's row list, `[('<hex>',)]`, as AgentBench's `answer_md5` is. The table is created as AgentBench
creates it: every column TEXT (here with a collation that ignores case and accents, as MySQL's default
utf8mb4_0900_ai_ci does), one database per episode (in memory). MySQL functions SQLite lacks are registered:
md5, concat, concat_ws.

Known differences from MySQL (docs/evaluation.md): SQLite compares a TEXT column with a number literal as
text; a number stored into a TEXT column is written as SQLite prints it (`1.0`, not `1`); SQL only MySQL
parses (`UPDATE ... LIMIT` on stock builds, `IF()`, `DATE_FORMAT`...) is an error.

The headline number, as the paper's: the mean of the question (SELECT), INSERT and UPDATE accuracies.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import sqlite3
import unicodedata
from collections import defaultdict
from importlib import resources
from typing import Callable, Sequence

from agentlm_jax.errors import ConfigError, MissingInputError
from agentlm_jax.evaluation.extractors import parse_answer_list
from agentlm_jax.progress import Progress

INSTRUCTION = """
I will ask you a question, then you should help me operate a MySQL database with SQL to answer the question.
You have to explain the problem and your solution to me and write down your thoughts.
After thinking and explaining thoroughly, every round you can choose to operate or to answer.
your operation should be like this:
Action: Operation
```sql
SELECT * FROM table WHERE condition;
```
You MUST put SQL in markdown format without any other comments. Your SQL should be in one line.
Every time you can only execute one SQL statement. I will only execute the statement in the first SQL code block. Every time you write a SQL, I will execute it for you and give you the output.
If you are done operating, and you want to commit your final answer, then write down:
Action: Answer
Final Answer: ["ANSWER1", "ANSWER2", ...]
DO NOT write this pattern unless you are sure about your answer. I expect an accurate and correct answer.
Your answer should be accurate. Your answer must be exactly the same as the correct answer.
If the question is about modifying the database, then after done operation, your answer field can be anything.
If your response cannot match any pattern I mentioned earlier, you will be judged as FAIL immediately.
Your input will be raw MySQL response, you have to deal with it by yourself.
"""
ACKNOWLEDGEMENT = "Ok."
MUTATIONS = ("INSERT", "UPDATE", "DELETE")
QUESTION_TYPES = ("other", "counting", "comparison", "ranking", "aggregation-SUM", "aggregation-MIN",
                  "aggregation-MAX", "aggregation-AVG")
GROUP_CONCAT_MAX_LEN = 1024
RESPONSE_LIMIT = 800  # characters of a database response shown to the model (AgentBench truncates there too)
SAMPLE_ITEMS = "sample_data/dbbench.jsonl"

_ACTION = re.compile(r"Action: (.*?)\n")
_SQL = re.compile(r"```sql\n([\s\S]*?)\n```")
_FINAL = re.compile(r"\nFinal Answer:(.*)")


# ---------------------------------------------------------------------------------------------------- items
@dataclasses.dataclass(frozen=True)
class Item:
    index: int
    type: str
    question: str  # description + "\n" + add_description: the episode's first user turn
    table: str
    columns: tuple[str, ...]
    rows: tuple[tuple, ...]
    label: tuple
    answer_md5: str | None

    @property
    def is_mutation(self) -> bool:
        return self.type in MUTATIONS


def _item(raw, where: str, index: int) -> Item:
    def need(cond, reason):
        if not cond:
            raise ConfigError(f"{where}: {reason}")
    need(isinstance(raw, dict), "not a JSON object")
    for key in ("description", "table", "type", "label"):
        need(key in raw, f"no {key!r} field")
    types = raw["type"]
    need(isinstance(types, list) and types and isinstance(types[0], str), "'type' must be a list like [\"INSERT\"]")
    table = raw["table"]
    need(isinstance(table, dict) and isinstance(table.get("table_name"), str), "'table' needs a 'table_name'")
    info = table.get("table_info")
    need(isinstance(info, dict) and isinstance(info.get("columns"), list) and isinstance(info.get("rows"), list),
         "'table.table_info' needs 'columns' and 'rows' lists")
    columns = []
    for c in info["columns"]:
        need(isinstance(c, dict) and isinstance(c.get("name"), str), f"column {c!r} has no 'name'")
        columns.append(c["name"])
    need(columns, "the table has no columns")
    for r, row in enumerate(info["rows"]):
        need(isinstance(row, list), f"row {r} is not a list")
    label = raw["label"]
    need(isinstance(label, list), "'label' must be a list")
    mutation = types[0] in MUTATIONS
    md5 = raw.get("answer_md5")
    need(not mutation or isinstance(md5, str), f"a {types[0]} item needs 'answer_md5' (the table's hash after the "
         "gold statement)")
    question = raw["description"] + "\n" + raw.get("add_description", "")
    return Item(index, types[0], question, table["table_name"], tuple(columns),
                tuple(tuple(row) for row in info["rows"]), tuple(label), md5)


def load_items(path: str | None = None, *, limit: int | None = None) -> tuple[list[Item], str]:
    """(items, their source) of a DBBench JSONL file (AgentBench's `dev.jsonl`/`standard.jsonl` shape);
    None: the small invented sample shipped in the package. `limit`: that many items, evenly spaced over
    the file (its items are grouped by type), each keeping its index in the file."""
    if path is None:
        text = resources.files("agentlm_jax.evaluation").joinpath(SAMPLE_ITEMS).read_text(encoding="utf-8")
        source = f"agentlm_jax/evaluation/{SAMPLE_ITEMS}"
    else:
        import fsspec

        try:
            with fsspec.open(path, "rt", encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise MissingInputError(f"--db-items {path}: does not exist") from None
        source = path
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source}:{n}: not JSON ({e.msg})") from None
        items.append(_item(raw, f"{source}:{n}", len(items)))
    if not items:
        raise ConfigError(f"{source}: no items")
    if limit is not None and limit < len(items):  # evenly spaced: AgentBench's files are grouped by type
        items = [items[(k * len(items)) // limit] for k in range(limit)]
    return items, source


# ------------------------------------------------------------------------------------------------- database
def _md5(value):
    if value is None:
        return None
    return hashlib.md5(_mysql_text(value).encode("utf-8")).hexdigest()


def _mysql_text(value) -> str:
    """A value as MySQL turns it into a string in a string function."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, float):
        return repr(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    return str(value)


def _concat_ws(sep, *values):
    if sep is None:
        return None
    return _mysql_text(sep).join(_mysql_text(v) for v in values if v is not None)


def _concat(*values):
    return None if any(v is None for v in values) else "".join(_mysql_text(v) for v in values)


def _fold(text: str) -> str:
    """What MySQL's default collation (utf8mb4_0900_ai_ci) compares: accents and case ignored."""
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c)).casefold()


def _mysql_collation(a: str, b: str) -> int:
    a, b = _fold(a), _fold(b)
    return (a > b) - (a < b)


COLLATION = "mysql_ai_ci"


def quote_name(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _cell(value):
    """A JSON table cell as AgentBench's MySQL connector writes it into a TEXT column."""
    if value is None:
        return None
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, (int, float)):
        return repr(value)
    return str(value)


_MYSQL_ESCAPES = {"0": "\0", "b": "\b", "n": "\n", "r": "\r", "t": "\t", "Z": "\x1a", "%": "\\%", "_": "\\_"}
_DIGIT_NAME = re.compile(r"(?<![\w.$])(\d+[A-Za-z_$][\w$]*)")
_EXPONENT = re.compile(r"\d+[eE]\d*$")


def mysql_to_sqlite(sql: str) -> str:
    """The MySQL lexical rules SQLite lacks, rewritten: backslash escapes in string literals (`'a\\nb'` holds a
    newline), double-quoted strings (strings in MySQL, identifiers in SQLite), and bare names that begin with
    a digit (`1952_British_Grand_Prix_0`). Backquoted names pass unchanged."""
    out, plain, i, n = [], [], 0, len(sql)

    def flush():
        text = "".join(plain)
        out.append(_DIGIT_NAME.sub(lambda m: m.group(1) if _EXPONENT.match(m.group(1)) else f"`{m.group(1)}`", text))
        plain.clear()

    while i < n:
        c = sql[i]
        if c == "`":
            flush()
            j = i + 1
            while j < n and not (sql[j] == "`" and (j + 1 >= n or sql[j + 1] != "`")):
                j += 2 if sql[j] == "`" else 1
            out.append(sql[i:j + 1])
            i = j + 1
        elif c in "'\"":
            flush()
            value, j = [], i + 1
            while j < n:
                d = sql[j]
                if d == "\\" and j + 1 < n:
                    value.append(_MYSQL_ESCAPES.get(sql[j + 1], sql[j + 1]))
                    j += 2
                elif d == c and j + 1 < n and sql[j + 1] == c:
                    value.append(c)
                    j += 2
                elif d == c:
                    break
                else:
                    value.append(d)
                    j += 1
            if j >= n:  # unterminated: leave it to SQLite's error
                out.append(sql[i:])
                break
            out.append("'" + "".join(value).replace("'", "''") + "'")
            i = j + 1
        else:
            plain.append(c)
            i += 1
    flush()
    return "".join(out)


class Database:
    """One episode's database: the item's table in an in-memory SQLite database."""

    def __init__(self, item: Item):
        self.item = item
        self.conn = sqlite3.connect(":memory:", isolation_level=None)
        for name, fn in (("md5", _md5), ("concat_ws", _concat_ws), ("concat", _concat)):
            self.conn.create_function(name, -1 if name != "md5" else 1, fn, deterministic=True)
        self.conn.create_collation(COLLATION, _mysql_collation)
        cols = ", ".join(f"{quote_name(c)} TEXT COLLATE {COLLATION}" for c in item.columns)
        self.conn.execute(f"CREATE TABLE {quote_name(item.table)} ({cols})")
        # AgentBench fills the table with one multi-row INSERT: a row of the wrong length fails it in MySQL and
        # the table stays empty (one of AgentBench's standard items has such a row). So here.
        if item.rows and all(len(row) == len(item.columns) for row in item.rows):
            marks = ", ".join("?" for _ in item.columns)
            self.conn.executemany(f"INSERT INTO {quote_name(item.table)} VALUES ({marks})",
                                  [tuple(_cell(v) for v in row) for row in item.rows])

    def execute(self, sql: str) -> str:
        """The response the model sees: the rows as the Python list of tuples (as AgentBench's MySQL
        connector prints them), or the error's message; cut at RESPONSE_LIMIT characters."""
        try:
            cursor = self.conn.execute(mysql_to_sqlite(sql))
            text = str(cursor.fetchall())
        except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError) as e:
            text = f"{type(e).__name__}: {e}"
        if len(text) > RESPONSE_LIMIT:
            text = text[:RESPONSE_LIMIT] + "[TRUNCATED]"
        return text

    def table_hash(self) -> str:
        """AgentBench's table hash (module docstring), as the MySQL client prints it: `[('<hex>',)]`."""
        cols = ", ".join(quote_name(c) for c in self.item.columns)
        hashes = sorted(h for (h,) in self.conn.execute(
            f"SELECT substr(md5(concat_ws(',', {cols})), 1, 5) FROM {quote_name(self.item.table)}"))
        if not hashes:
            return "[(None,)]"
        joined = ",".join(hashes).encode("utf-8")[:GROUP_CONCAT_MAX_LEN]
        return str([(hashlib.md5(joined).hexdigest(),)])

    def close(self) -> None:
        self.conn.close()


# -------------------------------------------------------------------------------------------------- scoring
def _float(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def answer_correct(answer: str, label: Sequence) -> bool:
    """AgentBench's comparison of a final answer's text with an item's label list."""
    got = parse_answer_list(answer)
    if len(got) == 1 and len(label) == 1:
        a, b = _float(got[0]), _float(label[0])
        if a is not None and b is not None:
            return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)
        return str(got[0]).strip() == str(label[0]).strip() if isinstance(got[0], str) else got[0] == label[0]
    try:
        return {str(v) for v in got} == {str(v) for v in label}
    except TypeError:
        return False


# -------------------------------------------------------------------------------------------------- episodes
@dataclasses.dataclass
class Episode:
    item: Item
    messages: list[dict]
    db: Database
    rounds: int = 0
    status: str = "running"  # completed | invalid_format | round_limit | context_limit
    answer: str = ""
    result: str | None = None  # the final answer (questions) or the table hash (mutations)
    correct: bool = False

    @property
    def done(self) -> bool:
        return self.status != "running"


def start_episode(item: Item) -> Episode:
    return Episode(item, [{"role": "user", "content": INSTRUCTION}, {"role": "assistant", "content": ACKNOWLEDGEMENT},
                          {"role": "user", "content": item.question}], Database(item))


def step(episode: Episode, response: str, *, max_rounds: int) -> None:
    """Apply one model turn to a running episode (AgentBench's loop, one iteration)."""
    episode.messages.append({"role": "assistant", "content": response})
    action = _ACTION.search(response)
    if action and action.group(1) == "Operation" and episode.rounds < max_rounds:
        sql = _SQL.search(response)
        if not sql:
            episode.status = "invalid_format"
            return
        output = episode.db.execute(sql.group(1).strip().replace("\n", " "))
        episode.messages.append({"role": "user", "content": output})
        episode.rounds += 1
        return
    final = _FINAL.search(response)
    if final:
        episode.answer, episode.status = final.group(1), "completed"
    elif episode.rounds >= max_rounds:
        episode.status = "round_limit"
    else:
        episode.status = "invalid_format"


def finish(episode: Episode) -> None:
    item = episode.item
    if item.is_mutation:
        episode.result = episode.db.table_hash()
        episode.correct = episode.result == item.answer_md5
    else:
        episode.result = episode.answer
        episode.correct = episode.status == "completed" and answer_correct(episode.answer, item.label)
    episode.db.close()


# (episodes still running) -> one response per episode; None for an episode whose prompt no longer fits
RespondFn = Callable[[Sequence[Episode]], list[str | None]]


def run_episodes(items: Sequence[Item], respond: RespondFn, *, max_rounds: int = 5,
                 show_progress: bool = True) -> list[Episode]:
    """Every item's episode, the running ones advanced together (one batched `respond` per round)."""
    episodes = [start_episode(item) for item in items]
    with Progress(total=len(episodes), desc="dbbench", unit="episode", enabled=show_progress) as bar:
        while True:
            running = [e for e in episodes if not e.done]
            if not running:
                break
            for episode, response in zip(running, respond(running)):
                if response is None:
                    episode.status = "context_limit"
                else:
                    step(episode, response, max_rounds=max_rounds)
                if episode.done:
                    finish(episode)
                    bar.update(1)
    return episodes


def summarize(episodes: Sequence[Episode], *, keep: int = 3) -> dict:
    """Accuracy per item type, AgentBench's SELECT (every question type) / INSERT / UPDATE, the headline
    (their mean, as the paper's DB number), and the episode ends."""
    per_type: dict[str, list[bool]] = defaultdict(list)
    status: dict[str, int] = defaultdict(int)
    for e in episodes:
        per_type[e.item.type].append(e.correct)
        status[e.status] += 1

    def acc(values):
        return sum(values) / len(values) if values else None

    out = {f"{t}_accuracy": acc(v) for t, v in sorted(per_type.items())}
    questions = [e.correct for e in episodes if not e.item.is_mutation]
    groups = {"SELECT": acc(questions), "INSERT": acc(per_type.get("INSERT", [])),
              "UPDATE": acc(per_type.get("UPDATE", []))}
    out.update({f"{k}_accuracy": v for k, v in groups.items()})
    present = [v for v in groups.values() if v is not None]
    out["overall_cat_accuracy"] = sum(present) / len(present) if present else None
    out["episodes"] = len(episodes)
    out["status"] = dict(sorted(status.items()))
    out["invalid_format_rate"] = status.get("invalid_format", 0) / len(episodes) if episodes else None
    out["mean_rounds"] = sum(e.rounds for e in episodes) / len(episodes) if episodes else None
    out["examples"] = [{"item": e.item.index, "type": e.item.type, "status": e.status, "correct": e.correct,
                        "result": e.result, "last_turn": e.messages[-1]["content"][:400]} for e in episodes[:keep]]
    return out


def model_respond(lm, *, max_new_tokens: int = 128) -> RespondFn:
    """Responses of `lm` (evaluation.lm.LM): each history rendered in the training chat template and cut as
    the original harness cut it (the first instruction kept, then the latest turns that fit, with a note of
    how many messages were left out), greedy, at most `max_new_tokens`."""
    budget = lm.max_length - max_new_tokens

    def prompt_of(messages: list[dict]) -> list[int] | None:
        ids = lm.chat_prompt(messages)
        head, tail = messages[:2], messages[2:]
        dropped = 0
        while len(ids) > budget and len(tail) > 1:
            tail = tail[2:]
            dropped += 2
            note = {"role": "user", "content": f"[{dropped} earlier messages are omitted]\n" + tail[0]["content"]}
            ids = lm.chat_prompt(head + [note] + tail[1:])
        return ids if len(ids) <= budget else None

    def respond(episodes: Sequence[Episode]) -> list[str | None]:
        prompts = [prompt_of(e.messages) for e in episodes]
        fits = [i for i, p in enumerate(prompts) if p is not None]
        outs = lm.complete([prompts[i] for i in fits], max_new_tokens=max_new_tokens) if fits else []
        responses: list[str | None] = [None] * len(episodes)
        for i, ids in zip(fits, outs):
            responses[i] = lm.decode(ids).strip()
        return responses

    return respond


def evaluate_dbbench(items: Sequence[Item], respond: RespondFn, *, max_rounds: int = 5,
                     show_progress: bool = True) -> dict:
    return summarize(run_episodes(items, respond, max_rounds=max_rounds, show_progress=show_progress))


def gold_hash(item: Item) -> tuple[str, str | None]:
    """(hash after applying the item's gold statement(s), the first error if one failed): the check that the
    SQLite port reproduces AgentBench's answer_md5."""
    db = Database(item)
    error = None
    for statement in item.label:
        out = db.execute(str(statement).replace("\n", " "))
        if out.startswith(("OperationalError", "IntegrityError", "ProgrammingError", "DatabaseError",
                           "Warning", "ValueError", "OverflowError")) and error is None:
            error = out
    h = db.table_hash()
    db.close()
    return h, error
