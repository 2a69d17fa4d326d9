"""Suite `dbbench`: interactive database episodes as AgentBench's DB task runs them, on SQLite (default) or a
real MySQL/MariaDB server (`--db mysql://user:pass@host:port`, `MySQLBackend`).

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

The MySQL backend (`MySQLBackend`, driver pymysql: `pip install 'agentlm-jax[mysql]'`) runs the model's SQL
verbatim on the server, in one fresh database per episode (created from the item's table as AgentBench creates
it, dropped after), and computes the hash in the server with AgentBench's own query.

The headline number, as the paper's: the mean of the question (SELECT), INSERT and UPDATE accuracies.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import sqlite3
import unicodedata
import urllib.parse
from collections import defaultdict
from importlib import resources
from typing import Callable, Sequence

from agentlm_jax.errors import ConfigError, MissingInputError, SetupError
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
# What AgentBench's client (mysql-connector, committing after reading one result) says to a turn of several
# statements, none of which then takes effect.
MULTI_STATEMENT_ERROR = "Commands out of sync; you can't run this command now"
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
        self.last_error: str | None = None  # the message of the last statement's error (None: it ran)
        self.conn = sqlite3.connect(":memory:", isolation_level=None)
        for name, fn in (("md5", _md5), ("concat_ws", _concat_ws), ("concat", _concat)):
            self.conn.create_function(name, -1 if name != "md5" else 1, fn, deterministic=True)
        self.conn.create_collation(COLLATION, _mysql_collation)
        self.load_error: str | None = None  # why the item's table could not be created (there is none then)
        cols = ", ".join(f"{quote_name(c)} TEXT COLLATE {COLLATION}" for c in item.columns)
        # A column MySQL refuses leaves no table, as on AgentBench's server: a name that is empty, ends in a space
        # or is longer than 64 characters (dev item 5 has one named ''), two of the same name (standard items 13,
        # 14: 'Score' twice; SQLite refuses those too). The episode then runs with no table.
        refused = next((c for c in item.columns if not c or c != c.rstrip() or len(c) > 64), None)
        try:
            if refused is not None:
                raise sqlite3.OperationalError(f"incorrect column name {refused!r}")
            self.conn.execute(f"CREATE TABLE {quote_name(item.table)} ({cols})")
        except sqlite3.Error as e:
            self.load_error = f"{type(e).__name__}: {e}"
            return
        # AgentBench fills the table with one multi-row INSERT: a row of the wrong length fails it in MySQL and
        # the table stays empty (one of AgentBench's standard items has such a row). So here.
        if item.rows and all(len(row) == len(item.columns) for row in item.rows):
            marks = ", ".join("?" for _ in item.columns)
            self.conn.executemany(f"INSERT INTO {quote_name(item.table)} VALUES ({marks})",
                                  [tuple(_cell(v) for v in row) for row in item.rows])

    def execute(self, sql: str) -> str:
        """The response the model sees: the rows as the Python list of tuples (as AgentBench's MySQL
        connector prints them), or the error's message; cut at RESPONSE_LIMIT characters."""
        self.last_error = None
        try:
            cursor = self.conn.execute(mysql_to_sqlite(sql))
            text = str(cursor.fetchall())
        except sqlite3.ProgrammingError as e:  # several statements: nothing runs, as with AgentBench's client
            text = self.last_error = (MULTI_STATEMENT_ERROR if "one statement at a time" in str(e)
                                      else f"{type(e).__name__}: {e}")
        except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError) as e:
            text = self.last_error = f"{type(e).__name__}: {e}"
        return _truncate(text)

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


def _truncate(text: str) -> str:
    return text[:RESPONSE_LIMIT] + "[TRUNCATED]" if len(text) > RESPONSE_LIMIT else text


class SQLiteBackend:
    """The default backend: each episode's database in memory (`Database`)."""

    name = "sqlite"

    def open(self, item: Item) -> Database:
        return Database(item)

    def describe(self) -> dict:
        return {"backend": "sqlite", "where": "in memory"}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------------------------------------- MySQL
DEFAULT_MYSQL_PORT = 3306
# MySQL 8.0's defaults, which AgentBench's server (the `mysql` Docker image) ran with; MariaDB's differ
# (group_concat_max_len 1 MiB: a long table's hash would not be cut at 1,024 bytes; no ONLY_FULL_GROUP_BY).
MYSQL8_SQL_MODE = ("ONLY_FULL_GROUP_BY,STRICT_TRANS_TABLES,NO_ZERO_IN_DATE,NO_ZERO_DATE,ERROR_FOR_DIVISION_BY_ZERO,"
                   "NO_ENGINE_SUBSTITUTION")
# On MariaDB, without strict mode: strict MariaDB fails an UPDATE whose WHERE compares a TEXT column holding a
# non-number with a number (`WHERE No = 16` over a row 'Replay': error 1292, Truncated incorrect DECIMAL value),
# and AgentBench's answer_md5 of standard items 278 and 295 are the tables after such an UPDATE (MySQL 8.0 is
# reported to raise that error for VARCHAR, not TEXT columns).
MARIADB_SQL_MODE = MYSQL8_SQL_MODE.replace("STRICT_TRANS_TABLES,", "")
# MySQL 8's default collation, else the closest MariaDB has (UCA, accent- and case-insensitive, NO PAD).
COLLATIONS = ("utf8mb4_0900_ai_ci", "utf8mb4_uca1400_nopad_ai_ci", "utf8mb4_unicode_520_ci", "utf8mb4_unicode_ci")
STATEMENT_SECONDS = 60  # a model's statement is stopped after this long (AgentBench's newer client waits 30 s)
DATABASE_PREFIX = "agentlm_dbbench_"


@dataclasses.dataclass(frozen=True)
class MySQLURL:
    host: str
    port: int
    user: str
    password: str = dataclasses.field(default="", repr=False)

    def public(self) -> str:
        """The URL without the password (what eval.json records)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mysql://{urllib.parse.quote(self.user, safe='')}@{host}:{self.port}"


def parse_db(text: str) -> MySQLURL | None:
    """`--db`: None for "sqlite"; a MySQLURL for mysql://USER[:PASSWORD]@HOST[:PORT] (user root, port 3306 when
    left out; a user name or password with @ : / % written %-encoded). ValueError with the reason."""
    if text.strip().lower() in ("sqlite", "sqlite://", ""):
        return None
    parts = urllib.parse.urlsplit(text.strip())
    if parts.scheme.lower() not in ("mysql", "mariadb"):
        raise ValueError(f"{text!r}: give sqlite or mysql://USER[:PASSWORD]@HOST[:PORT]")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{parts.scheme}://...{parts.path}{'?' if parts.query else ''}{parts.query}: no database, "
                         "path or options after HOST:PORT (each episode gets its own database)")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"mysql://...: the port is not a number from 1 to 65535") from None
    if not parts.hostname:
        raise ValueError("mysql://...: no host (mysql://USER[:PASSWORD]@HOST[:PORT], e.g. mysql://root@127.0.0.1:3306)")
    password = urllib.parse.unquote(parts.password) if parts.password is not None else os.environ.get("MYSQL_PWD", "")
    return MySQLURL(parts.hostname, port or DEFAULT_MYSQL_PORT,
                    urllib.parse.unquote(parts.username) if parts.username else "root", password)


def _pymysql():
    try:
        import pymysql
    except ImportError:
        raise SetupError("--db mysql://...: the MySQL driver pymysql is not installed: pip install "
                         "'agentlm-jax[mysql]' (or pip install pymysql), or leave --db out for SQLite") from None
    return pymysql


def _mysql_error(e: Exception) -> str:
    """An error as AgentBench's client (mysql-connector) prints it: `1146 (42S02): Table 't.x' doesn't exist`."""
    if len(e.args) == 2 and isinstance(e.args[0], int):
        state = getattr(e, "sqlstate", None)
        return f"{e.args[0]} ({state}): {e.args[1]}" if state else f"{e.args[0]}: {e.args[1]}"
    return str(e)


class MySQLBackend:
    """Episodes on a MySQL or MariaDB server (`url`, a MySQLURL). Connecting happens here, so an unreachable
    server is reported before a model loads. Every session runs with MySQL 8's defaults (`MYSQL8_SQL_MODE`, on
    MariaDB `MARIADB_SQL_MODE`; group_concat_max_len 1,024) and utf8mb4; each episode's database gets MySQL 8's
    default collation or the server's nearest (`COLLATIONS`)."""

    name = "mysql"

    def __init__(self, url: MySQLURL, *, connect_timeout: float = 10):
        self.url = url
        self.pymysql = _pymysql()
        self.connect_timeout = connect_timeout
        self._names = itertools.count()
        try:
            self.admin = self._connect(session=False)
        except self.pymysql.MySQLError as e:
            todo = ("check the user and password (the URL's, else MYSQL_PWD)" if e.args and e.args[0] == 1045
                    else "start a server there (docs/evaluation.md, `--db mysql://`) or fix the URL")
            raise SetupError(f"--db {url.public()}: cannot connect ({_mysql_error(e)}): {todo}") from None
        with self.admin.cursor() as cur:
            cur.execute("SELECT VERSION()")
            (self.version,) = cur.fetchone()
            self.mariadb = "mariadb" in self.version.lower()
        self.collation = next((c for c in COLLATIONS if self._has_collation(c)), "utf8mb4_general_ci")
        timeout = (f"max_statement_time = {STATEMENT_SECONDS}" if self.mariadb
                   else f"max_execution_time = {STATEMENT_SECONDS * 1000}")
        self.sql_mode = MARIADB_SQL_MODE if self.mariadb else MYSQL8_SQL_MODE
        self.init_command = (f"SET SESSION sql_mode = '{self.sql_mode}', group_concat_max_len = "
                             f"{GROUP_CONCAT_MAX_LEN}, {timeout}")
        try:  # the session settings, once, so that a server refusing them says so here
            self._connect(session=True).close()
        except self.pymysql.MySQLError as e:
            self.close()
            raise SetupError(f"--db {url.public()}: the server refuses the session settings ({_mysql_error(e)})") \
                from None

    def _connect(self, *, session: bool, database: str | None = None):
        """The admin connection (autocommit), or a session as AgentBench's: MySQL 8's settings, no autocommit."""
        # TLS when the server offers it (pymysql's default), but not over loopback, where it is no use and where
        # its context (50 ms to build) would be most of a statement's time.
        loopback = self.url.host in ("127.0.0.1", "localhost", "::1")
        return self.pymysql.connect(
            host=self.url.host, port=self.url.port, user=self.url.user, password=self.url.password,
            database=database, charset="utf8mb4", autocommit=not session, connect_timeout=self.connect_timeout,
            client_flag=self.pymysql.constants.CLIENT.MULTI_STATEMENTS, ssl_disabled=True if loopback else None,
            init_command=self.init_command if session else None)

    def _has_collation(self, name: str) -> bool:
        try:
            self.admin_execute(f"SELECT _utf8mb4'a' COLLATE {name}")
        except self.pymysql.MySQLError:
            return False
        return True

    def session(self, database: str):
        """A fresh session in `database`, not in autocommit mode (AgentBench reconnects before every statement it
        runs, and commits after it)."""
        return self._connect(session=True, database=database)

    def new_database_name(self) -> str:
        return f"{DATABASE_PREFIX}{os.getpid()}_{next(self._names)}"

    def admin_execute(self, sql: str) -> None:
        self.admin.ping(reconnect=True)
        with self.admin.cursor() as cur:
            cur.execute(sql)

    def open(self, item: Item) -> "MySQLDatabase":
        return MySQLDatabase(self, item)

    def describe(self) -> dict:
        return {"backend": "mysql", "server": self.url.public(), "version": self.version,
                "collation": self.collation, "sql_mode": self.sql_mode, "group_concat_max_len": GROUP_CONCAT_MAX_LEN}

    def close(self) -> None:
        try:
            self.admin.close()
        except self.pymysql.MySQLError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class MySQLDatabase:
    """One episode's database on a MySQL server (named `agentlm_dbbench_<pid>_<n>`): the item's table created
    and filled as AgentBench does it (every column TEXT, one multi-row INSERT), the model's SQL run verbatim,
    the hash computed by the server; dropped by `close`."""

    def __init__(self, backend: MySQLBackend, item: Item):
        self.backend, self.item = backend, item
        self.name = backend.new_database_name()
        self.last_error: str | None = None
        self.load_error: str | None = None  # the server's error creating or filling the table
        table = f"{quote_name(self.name)}.{quote_name(item.table)}"
        backend.admin_execute(f"CREATE DATABASE {quote_name(self.name)} CHARACTER SET utf8mb4 COLLATE "
                              f"{backend.collation}")
        cols = ", ".join(f"{quote_name(c)} TEXT" for c in item.columns)
        names = ", ".join(quote_name(c) for c in item.columns)
        literal = backend.admin.literal  # the driver's quoting (AgentBench passes the values as parameters)
        values = ", ".join("(" + ", ".join(literal(_cell(v)) for v in row) + ")" for row in item.rows)
        try:
            # The server's errors are the episode's, as in AgentBench: a row of the wrong length leaves the table
            # empty; a column MySQL refuses (dev item 5 has one named '') leaves no table at all.
            backend.admin_execute(f"CREATE TABLE {table} ({cols})")
            if item.rows:
                backend.admin_execute(f"INSERT INTO {table} ({names}) VALUES {values}")
        except backend.pymysql.MySQLError as e:
            self.load_error = _mysql_error(e)

    def _run(self, sql: str) -> str:
        """`sql` as AgentBench's client (mysql-connector 8.0.33, C extension) runs it, in a fresh session in the
        episode's database, in a transaction committed after the statement: the rows as a Python list of tuples
        (`[]` for a statement without rows; binary values as bytearray), or the error's message. Several
        statements in one turn: the client's "Commands out of sync" (MULTI_STATEMENT_ERROR) and nothing done,
        as that client, which commits after reading one result, reports it and drops the session."""
        pymysql = self.backend.pymysql
        self.last_error = None
        if not sql.strip():  # that client sends nothing
            return "[]"
        try:
            conn = self.backend.session(self.name)
        except pymysql.MySQLError as e:
            raise SetupError(f"--db {self.backend.url.public()}: lost the server ({_mysql_error(e)})") from None
        try:
            with conn.cursor() as cur:
                cur.execute(sql)  # no arguments: pymysql leaves the text as it is (no %-formatting)
                rows = [tuple(bytearray(v) if isinstance(v, bytes) else v for v in row) for row in cur.fetchall()]
                try:
                    more = cur.nextset()
                except pymysql.MySQLError:  # an error in a later statement
                    more = True
                if more:
                    conn.rollback()
                    self.last_error = MULTI_STATEMENT_ERROR
                    return MULTI_STATEMENT_ERROR
            conn.commit()
            return str(rows)
        except (pymysql.MySQLError, ValueError, OverflowError, UnicodeError) as e:
            self.last_error = _mysql_error(e)
            return self.last_error
        finally:
            conn.close()

    def execute(self, sql: str) -> str:
        """The response the model sees (as the SQLite backend's): cut at RESPONSE_LIMIT characters."""
        return _truncate(self._run(sql))

    def table_hash(self) -> str:
        """AgentBench's own hash query, run by the server; its result as the client prints it (`[('<hex>',)]`)."""
        cols = ",".join(quote_name(c) for c in self.item.columns)
        return self._run(f"select md5(group_concat(rowhash order by rowhash)) as hash from( SELECT "
                         f"substring(MD5(CONCAT_WS(',', {cols})), 1, 5) AS rowhash FROM {quote_name(self.item.table)}"
                         ") as sub;")

    def close(self) -> None:
        try:
            self.backend.admin_execute(f"DROP DATABASE IF EXISTS {quote_name(self.name)}")
        except self.backend.pymysql.MySQLError:
            pass


Backend = SQLiteBackend | MySQLBackend


def open_backend(db: str | MySQLURL | None = None):
    """The backend `--db` names (a string, or parse_db's result): SQLiteBackend for sqlite/None, else a connected
    MySQLBackend (SetupError, one line, when the driver is missing or the server cannot be reached)."""
    if isinstance(db, str):
        try:
            db = parse_db(db)
        except ValueError as e:
            raise ConfigError(f"--db {e}") from None
    return SQLiteBackend() if db is None else MySQLBackend(db)


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
    db: Database | MySQLDatabase
    rounds: int = 0
    status: str = "running"  # completed | invalid_format | round_limit | context_limit
    answer: str = ""
    result: str | None = None  # the final answer (questions) or the table hash (mutations)
    correct: bool = False

    @property
    def done(self) -> bool:
        return self.status != "running"


def start_episode(item: Item, backend: Backend | None = None) -> Episode:
    db = backend.open(item) if backend is not None else Database(item)
    return Episode(item, [{"role": "user", "content": INSTRUCTION}, {"role": "assistant", "content": ACKNOWLEDGEMENT},
                          {"role": "user", "content": item.question}], db)


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
                 show_progress: bool = True, backend: Backend | None = None) -> list[Episode]:
    """Every item's episode, the running ones advanced together (one batched `respond` per round), on
    `backend` (default: SQLite in memory)."""
    episodes: list[Episode] = []
    try:
        for item in items:
            episodes.append(start_episode(item, backend))
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
    finally:  # an interrupted run leaves no episode databases behind on a server
        for episode in episodes:
            if not episode.done:
                episode.db.close()
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
                     show_progress: bool = True, backend: Backend | None = None) -> dict:
    return summarize(run_episodes(items, respond, max_rounds=max_rounds, show_progress=show_progress,
                                  backend=backend))


def gold_hash(item: Item, backend: Backend | None = None) -> tuple[str, str | None]:
    """(hash after applying the item's gold statement(s), the first error if one failed): the check that a
    backend (default: the SQLite port) reproduces AgentBench's answer_md5."""
    db = backend.open(item) if backend is not None else Database(item)
    error = None
    try:
        for statement in item.label:
            db.execute(str(statement).replace("\n", " "))
            error = error or db.last_error
        return db.table_hash(), error
    finally:
        db.close()
