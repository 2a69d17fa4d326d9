"""Suite `dbbench` on a real server (`--db mysql://...`): a throwaway MariaDB from Debian's packages, started
here on 127.0.0.1 for the session; AgentBench's own hash query reproduces answer_md5 there; scripted agents
score 100 % and 0 %; the server's responses are what AgentBench's client shows; `--db` on the command line.

Skipped, saying why, without the server binaries (`apt-get install mariadb-server`; .ci/run installs it as
root) or the driver (`pip install 'agentlm-jax[mysql]'`)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from agentlm_jax import evaluate
from agentlm_jax.errors import ConfigError, SetupError
from agentlm_jax.evaluation import dbbench
from agentlm_jax.evaluation.dbbench import MySQLURL, evaluate_dbbench, gold_hash, load_items, parse_db
from tests.evaluation.conftest import shared_items
from tests.evaluation.test_dbbench import _gold, _wrong
from tests.helpers.cli import error_line, refuse_loading

SERVER_BINARIES = ("mariadbd", "mysqld")
INSTALL_BINARIES = ("mariadb-install-db", "mysql_install_db")
START_SECONDS = 60


def _which(names) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/usr/bin"])
    return next((found for found in (shutil.which(n, path=path) for n in names) if found), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


@pytest.fixture(scope="session")
def mariadb_url():
    """A MariaDB server of its own for the test session, on 127.0.0.1 at a free port, without grant tables (any
    user, any password); its data directory in memory (/dev/shm) when there is one, removed at the end."""
    try:
        import pymysql
    except ImportError:
        pytest.skip("pymysql is not installed (pip install 'agentlm-jax[mysql]'; the test extra has it)")
    server, install = _which(SERVER_BINARIES), _which(INSTALL_BINARIES)
    if not server or not install:
        pytest.skip("no MariaDB server binaries (mariadbd and mariadb-install-db): apt-get install mariadb-server "
                    "(.ci/run installs it when run as root)")
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    base = tempfile.mkdtemp(prefix="agentlm-mariadb-", dir=shm)
    datadir, log = os.path.join(base, "data"), os.path.join(base, "server.log")
    as_root = ["--user=root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    proc = None
    try:
        done = subprocess.run([install, "--no-defaults", f"--datadir={datadir}", "--skip-test-db", *as_root],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            pytest.fail(f"{install} failed ({done.returncode}): {(done.stderr or done.stdout)[-1500:]}")
        port = _free_port()
        proc = subprocess.Popen(
            [server, "--no-defaults", f"--datadir={datadir}", f"--port={port}", "--bind-address=127.0.0.1",
             f"--socket={os.path.join(base, 'server.sock')}", f"--pid-file={os.path.join(base, 'server.pid')}",
             f"--log-error={log}", "--skip-grant-tables", "--skip-name-resolve", "--performance-schema=OFF",
             # a throwaway server: nothing needs to reach the disk
             "--innodb-buffer-pool-size=32M", "--innodb-flush-log-at-trx-commit=0", "--innodb-flush-method=nosync",
             "--innodb-doublewrite=0", *as_root],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_SECONDS
        while True:
            try:
                pymysql.connect(host="127.0.0.1", port=port, user="root", connect_timeout=2,
                                ssl_disabled=True).close()
                break
            except pymysql.MySQLError:
                if proc.poll() is not None:
                    pytest.fail(f"{server} exited ({proc.returncode}) before accepting connections:\n{_tail(log)}")
                if time.monotonic() > deadline:
                    pytest.fail(f"{server} did not accept connections within {START_SECONDS} s:\n{_tail(log)}")
                time.sleep(0.1)
        yield f"mysql://root:not-this-password@127.0.0.1:{port}"
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def mysql(mariadb_url):
    with dbbench.open_backend(mariadb_url) as backend:
        yield backend


def _leftover_databases(backend) -> list[str]:
    with backend.admin.cursor() as cur:
        cur.execute(f"SHOW DATABASES LIKE '{dbbench.DATABASE_PREFIX}%'")
        return [name for (name,) in cur.fetchall()]


def _mismatches(items, backend):
    out = []
    for item in items:
        if item.is_mutation:
            got, error = gold_hash(item, backend)
            if got != item.answer_md5 or error:
                out.append((item.index, got, error))
    return out


# ------------------------------------------------------------------------------------- AgentBench's items
def test_every_dev_mutation_reproduces_on_mariadb(mysql):
    items = shared_items("dev")
    assert sum(it.is_mutation for it in items) == 40
    assert _mismatches(items, mysql) == []
    assert _leftover_databases(mysql) == []  # each episode's database is dropped after it


def test_every_test_mutation_but_225_reproduces_on_mariadb(mysql):
    """Item 225 differs on MariaDB too, as on SQLite: its answer_md5 is neither the table's hash before nor
    after its gold UPDATE, which runs without error (docs/evaluation.md)."""
    items = shared_items("standard")
    assert sum(it.is_mutation for it in items) == 200
    bad = _mismatches(items, mysql)
    assert [index for index, _, _ in bad] == [225]
    assert bad[0][2] is None  # the statement ran


def test_gold_answers_score_everything_and_wrong_ones_nothing_on_mariadb(mysql):
    items = shared_items("dev")
    gold = evaluate_dbbench(items, _gold, show_progress=False, backend=mysql)
    assert gold["overall_cat_accuracy"] == 1.0
    assert gold["SELECT_accuracy"] == gold["INSERT_accuracy"] == gold["UPDATE_accuracy"] == 1.0
    assert gold["status"] == {"completed": 60}
    wrong = evaluate_dbbench(items, _wrong, show_progress=False, backend=mysql)
    assert wrong["overall_cat_accuracy"] == 0.0 and wrong["status"] == {"completed": 60}
    assert _leftover_databases(mysql) == []


def test_the_package_sample_on_mariadb(mysql):
    items, _ = load_items()
    assert _mismatches(items, mysql) == []
    result = evaluate_dbbench(items, _gold, show_progress=False, backend=mysql)
    assert result["overall_cat_accuracy"] == 1.0 and result["episodes"] == len(items)


# ------------------------------------------------------------------------------- what the model sees
def test_the_model_sees_the_servers_raw_response(mysql):
    items, _ = load_items()
    item = next(it for it in items if it.type == "counting")
    table = dbbench.quote_name(item.table)
    db = mysql.open(item)
    try:
        # the rows as AgentBench's client prints them; the collation ignores case, as MySQL 8's default
        assert db.execute(f"SELECT COUNT(*) FROM {table} WHERE Variety = 'gala'") == "[(2,)]"
        assert db.execute(f"SELECT COUNT(*) FROM {table} WHERE Variety = 'GÁLA'") == "[(2,)]"  # and accents
        assert db.execute("SELECT 1.5 * 2") == "[(Decimal('3.0'),)]"  # the server's types, not SQLite's
        assert db.execute(f"INSERT INTO {table} (Variety) VALUES ('x')") == "[]"
        assert db.execute("SELECT * FROM no_such_table") == \
            f"1146 (42S02): Table '{db.name}.no_such_table' doesn't exist"
        assert db.last_error and db.last_error.startswith("1146")
        assert db.execute("SELEC 1").startswith("1064 (42000): You have an error in your SQL syntax")
        # MySQL's own lexical rules (no rewriting): '' and \' quote, "..." is a string, \n a newline
        assert db.execute("SELECT 'it''s', \"double\", 'a\\nb', 'o\\'k'") == \
            """[("it's", 'double', 'a\\nb', "o'k")]"""
        long = db.execute(f"SELECT REPEAT('x', 2000)")
        assert long.endswith("[TRUNCATED]") and len(long) == dbbench.RESPONSE_LIMIT + len("[TRUNCATED]")
        # a fresh session for every statement, as AgentBench reconnects before each one
        assert db.execute("SET @x = 1") == "[]" and db.execute("SELECT @x") == "[(None,)]"
        # several statements in one turn: AgentBench's client says "Commands out of sync" and none takes effect
        assert db.execute(f"SELECT 7; DELETE FROM {table} WHERE Variety = 'x'") == dbbench.MULTI_STATEMENT_ERROR
        assert db.execute(f"DELETE FROM {table}; SELEC 2") == dbbench.MULTI_STATEMENT_ERROR
        assert db.execute(f"SELECT COUNT(*) FROM {table} WHERE Variety = 'x'") == "[(1,)]"
        assert db.execute("SELECT 1;") == "[(1,)]" and db.execute("") == "[]"
        assert db.execute("SELECT X'41', NULL") == "[(bytearray(b'A'), None)]"  # that client's binary values
    finally:
        db.close()


def test_the_hash_is_computed_by_the_server_with_mysql8_settings(mysql):
    def item(rows, columns=("a", "b")):
        return dbbench.Item(0, "INSERT", "q", "t", columns, tuple(map(tuple, rows)), ("",), "")

    # NULLs, an empty table, and a table whose group_concat passes 1,024 bytes: the server and the SQLite port agree
    for rows in ([["x", None], [None, None]], [], [[str(i), "v"] for i in range(200)], [["Montréal", 1.5]]):
        sqlite_db, mysql_db = dbbench.Database(item(rows)), mysql.open(item(rows))
        try:
            assert mysql_db.table_hash() == sqlite_db.table_hash()
        finally:
            mysql_db.close()
            sqlite_db.close()
    session = mysql.session("information_schema")
    try:
        with session.cursor() as cur:
            cur.execute("SELECT @@group_concat_max_len, @@sql_mode")
            assert cur.fetchone() == (1024, mysql.sql_mode)
    finally:
        session.close()
    assert "ONLY_FULL_GROUP_BY" in mysql.sql_mode and mysql.collation == "utf8mb4_uca1400_nopad_ai_ci"


def test_a_row_of_the_wrong_length_leaves_the_table_empty(mysql):
    item = dbbench.Item(0, "INSERT", "q", "t", ("a", "b"), (("1", "2"), ("3",)), ("",), "")
    db = mysql.open(item)
    try:
        assert db.load_error.startswith("1136 (21S01): Column count doesn't match value count")
        assert db.execute("SELECT COUNT(*) FROM t") == "[(0,)]" and db.table_hash() == "[(None,)]"
    finally:
        db.close()


@pytest.mark.parametrize("where", ["sqlite", "mariadb"])
def test_several_statements_in_one_turn_do_nothing(where, request):
    backend = dbbench.SQLiteBackend() if where == "sqlite" else request.getfixturevalue("mysql")
    items, _ = load_items()
    item = next(it for it in items if it.type == "counting")
    table = dbbench.quote_name(item.table)
    db = backend.open(item)
    try:
        before = db.execute(f"SELECT COUNT(*) FROM {table}")
        assert db.execute(f"DELETE FROM {table}; SELECT 1") == dbbench.MULTI_STATEMENT_ERROR == db.last_error
        assert db.execute(f"SELECT COUNT(*) FROM {table};") == before != "[(0,)]"
    finally:
        db.close()


@pytest.mark.parametrize("where", ["sqlite", "mariadb"])
def test_a_table_the_server_refuses_is_no_table(where, request):
    """Dev item 5 has a column named '', standard items 13 and 14 two named 'Score': MySQL creates no table (as
    on AgentBench's server, checked with its own client); the episode runs, every statement an error."""
    backend = dbbench.SQLiteBackend() if where == "sqlite" else request.getfixturevalue("mysql")
    items = shared_items("dev")[5:6] + shared_items("standard")[13:15]
    assert [(it.index, it.type) for it in items] == [(5, "counting"), (13, "other"), (14, "other")]
    for item in items:
        db = backend.open(item)
        try:
            assert db.load_error and ("1166 (42000): Incorrect column name ''" in db.load_error or
                                      "1060 (42S21): Duplicate column name 'Score'" in db.load_error or
                                      "incorrect column name ''" in db.load_error or
                                      "duplicate column name: Score" in db.load_error), db.load_error
            assert "able" in db.execute(f"SELECT COUNT(*) FROM {dbbench.quote_name(item.table)}")  # no such table
        finally:
            db.close()
    result = evaluate_dbbench(items, _gold, show_progress=False, backend=backend)  # answered without SQL
    assert result["status"] == {"completed": 3} and result["SELECT_accuracy"] == 1.0


# ------------------------------------------------------------------------------------------------- --db
@pytest.mark.parametrize("text, want", [
    ("sqlite", None),
    ("mysql://root@127.0.0.1:3307", MySQLURL("127.0.0.1", 3307, "root", "")),
    ("mysql://bob:s%40cret@db.example:3306", MySQLURL("db.example", 3306, "bob", "s@cret")),
    ("mysql://db.example", MySQLURL("db.example", 3306, "root", "")),
    ("mariadb://u:p@[::1]:3306/", MySQLURL("::1", 3306, "u", "p")),
])
def test_db_urls(text, want, monkeypatch):
    monkeypatch.delenv("MYSQL_PWD", raising=False)
    assert parse_db(text) == want


@pytest.mark.parametrize("text, message", [
    ("postgres://u@h", "give sqlite or mysql://"),
    ("mysql://u@h:99999", "the port is not a number"),
    ("mysql://u@h:3306/mydb", "no database, path or options"),
    ("mysql://u@:3306", "no host"),
])
def test_bad_db_urls(text, message):
    with pytest.raises(ValueError, match=message):
        parse_db(text)
    with pytest.raises(ConfigError, match=message):
        dbbench.open_backend(text)


def test_the_password_is_never_recorded(monkeypatch):
    url = parse_db("mysql://bob:hunter2@h:1")
    assert "hunter2" not in repr(url) and url.public() == "mysql://bob@h:1"
    monkeypatch.setenv("MYSQL_PWD", "from-env")
    assert parse_db("mysql://bob@h").password == "from-env"


@pytest.fixture
def no_loading(monkeypatch):
    refuse_loading(monkeypatch, evaluate, "load_model")


def test_db_errors_are_one_line_before_the_model_loads(tiny_hf_dir, no_loading, monkeypatch):
    pytest.importorskip("pymysql", reason="pymysql is not installed (pip install 'agentlm-jax[mysql]')")
    port = _free_port()  # nothing listens there
    message = error_line(evaluate.main, ["--model", tiny_hf_dir, "--suite", "dbbench", "--db",
                                         f"mysql://root:pw@127.0.0.1:{port}"])
    assert message.startswith(f"error: --db mysql://root@127.0.0.1:{port}: cannot connect (2003") and \
        "start a server there" in message and ":pw@" not in message
    monkeypatch.setitem(sys.modules, "pymysql", None)  # the driver absent
    assert error_line(evaluate.main, ["--model", tiny_hf_dir, "--suite", "dbbench", "--db",
                                      f"mysql://root@127.0.0.1:{port}"]) == (
        "error: --db mysql://...: the MySQL driver pymysql is not installed: pip install 'agentlm-jax[mysql]' "
        "(or pip install pymysql), or leave --db out for SQLite")
    with pytest.raises(SetupError):
        dbbench.open_backend("mysql://root@127.0.0.1:1")


def test_a_bad_db_url_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(["--model", "x", "--db", "postgres://u@h"])
    assert exit_.value.code == 2 and "give sqlite or mysql://" in capsys.readouterr().err


def test_evaluate_over_mariadb_records_the_backend(tiny_hf_dir, mariadb_url, mysql, tmp_path):
    out = tmp_path / "eval"
    evaluate.main(["--model", tiny_hf_dir, "--suite", "dbbench", "--db", mariadb_url, "--max-items", "2",
                   "--max-new-tokens", "4", "--output", str(out)])
    text = (out / "eval.json").read_text()
    saved = json.loads(text)
    assert saved["suites"]["dbbench"]["episodes"] == 2
    backend = saved["meta"]["dbbench_backend"]
    assert backend["backend"] == "mysql" and backend["server"] == mariadb_url.replace(":not-this-password", "")
    assert "MariaDB" in backend["version"] and "not-this-password" not in text
    md = (out / "eval.md").read_text()
    assert f"on MySQL {backend['version']} at {backend['server']})" in md and "not-this-password" not in md
    assert _leftover_databases(mysql) == []
