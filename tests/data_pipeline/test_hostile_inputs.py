"""Hostile records and files (found in scraped dumps and by fault injection): each is one rejection naming its file,
record and reason, the rest of the build goes on, the accounting holds, and rejected.jsonl is strict JSON."""

import gzip
import json

import pytest

from data_pipeline.build import main
from data_pipeline.formats import records
from data_pipeline.json_stream import iter_json_array
from data_pipeline.sources import ReadTask, read_task

IN_MEMORY = ["--runner=DirectRunner", "--direct_running_mode=in_memory"]
DEEP = "[" * 2000 + "]" * 2000


def chat(i, answer="fine", **extra):
    return {"id": f"c{i}", "conversations": [{"from": "human", "value": f"question {i}"},
                                             {"from": "gpt", "value": f"{answer} {i}"}], **extra}


def line(record) -> bytes:
    return json.dumps(record).encode()


@pytest.fixture(scope="module")
def hostile_build(tmp_path_factory):
    raw = tmp_path_factory.mktemp("hostile_raw")
    jsonl = [line(chat(0)),
             line(chat(1)).replace(b"fine 1", b"x \\ud800"),  # a lone surrogate escape: valid JSON
             line(chat(2)).replace(b"fine 2", b"caf\xe9"),  # Latin-1, not UTF-8
             b'{"id": "c3", "deep": ' + DEEP.encode() + b"}",  # RecursionError in json.loads
             line(chat(4, reward=float("nan"))),  # bare NaN in the input; rejected, written back as strict JSON
             line(chat(5, answer="the end </s> then more")),  # special-token text
             line(chat(6, answer="<s> again")),
             line(chat(7))]
    (raw / "chat.jsonl").write_bytes(b"\n".join(jsonl) + b"\n")
    elements = [line(chat(10)), line(chat(11)).replace(b"fine 11", b"x \\udc00 y"),
                line(chat(12)).replace(b"fine 12", b"caf\xe9"), DEEP.encode(), line(chat(14))]
    (raw / "array.json").write_bytes(b"[" + b",\n".join(elements) + b"]")
    (raw / "corrupt.parquet").write_bytes(b"PAR1" + b"\x00garbage" * 100)
    gz = gzip.compress(b"\n".join(line(chat(20 + i)) for i in range(200)) + b"\n")
    (raw / "cut.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    out = tmp_path_factory.mktemp("hostile_out")
    manifest = main([f"--general=all={raw}", "--eta=0", "--validation-fraction=0", "--num-shards=1",
                     f"--output={out}", *IN_MEMORY])
    return raw, out, manifest


def rejected_rows(out) -> list[dict]:
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    text = (out / records.REJECTED_NAME).read_bytes().decode("utf-8")  # (strict UTF-8 too)
    return [json.loads(row, parse_constant=refuse) for row in text.splitlines()]


def test_every_hostile_record_and_file_is_one_rejection_and_the_rest_is_kept(hostile_build):
    raw, out, manifest = hostile_build
    src = manifest["sources"]["all"]
    assert src["read"] == src["kept"] + src["filtered"] + src["rejected"]
    assert src["rejected_by_reason"] == {"lone_surrogate": 2, "invalid_utf8": 2, "nested_too_deeply": 2,
                                         "non_numeric_reward": 1, "special_token_text": 2, "unreadable_file": 2}
    gz_kept = src["read"] - 8 - 5 - 1 - 1  # what came out of the cut .gz before it broke
    assert 0 < gz_kept < 200
    assert src["kept"] == 2 + 2 + gz_kept  # c0, c7, c10, c14 and the readable part of the .gz


def test_rejections_name_file_record_and_reason_in_strict_json(hostile_build):
    raw, out, manifest = hostile_build
    rows = rejected_rows(out)
    assert len(rows) == manifest["totals"]["rejected"]
    where = {(r["file"].rsplit("/", 1)[-1], r["number"]): r for r in rows}
    assert where[("chat.jsonl", 2)]["reason"] == "lone_surrogate" and "U+D800" in where[("chat.jsonl", 2)]["raw"]
    assert where[("chat.jsonl", 3)]["reason"] == "invalid_utf8"
    jsonl = (raw / "chat.jsonl").read_bytes()
    assert f"byte {jsonl.index(b'caf') + 3} is not UTF-8" in where[("chat.jsonl", 3)]["raw"]
    assert where[("chat.jsonl", 4)]["reason"] == "nested_too_deeply"
    assert where[("chat.jsonl", 5)]["reason"] == "non_numeric_reward"
    assert where[("chat.jsonl", 5)]["record"]["reward"] == "NaN"  # strict JSON has no NaN
    assert where[("chat.jsonl", 6)]["reason"] == "special_token_text" and "'</s>'" in where[("chat.jsonl", 6)]["detail"]
    assert where[("chat.jsonl", 7)]["detail"] == "pair 1, assistant: '<s>'"
    array = (raw / "array.json").read_bytes()
    assert where[("array.json", 2)]["reason"] == "lone_surrogate"
    assert where[("array.json", 3)]["reason"] == "invalid_utf8"  # the same policy as JSONL (no silent U+FFFD)
    assert where[("array.json", 3)]["byte_offset"] == array.index(b'{"id": "c12"')
    assert f"byte {array.index(b'caf') + 3} is not UTF-8" in where[("array.json", 3)]["raw"]
    assert where[("array.json", 4)]["reason"] == "nested_too_deeply"
    parquet = where[("corrupt.parquet", 1)]
    assert parquet["reason"] == "unreadable_file" and "corrupt.parquet" in parquet["raw"]
    gz = next(r for r in rows if r["file"].endswith("cut.jsonl.gz"))
    assert gz["reason"] == "unreadable_file" and gz["byte_offset"] > 0 and "EOFError" in gz["raw"]
    assert gz["number"] == manifest["sources"]["all"]["read"] - 14  # the line after the last one read


def test_readers_report_without_raising(tmp_path):
    (tmp_path / "a.json").write_bytes(b'[{"a": "\\ud800"}, {"b": "\xff"}, ' + DEEP.encode() + b', {"ok": 1}]')
    with open(tmp_path / "a.json", "rb") as f:
        got = [(e.error, e.record) for e in iter_json_array(f, "a.json", chunk_size=7)]
    assert got == [("lone_surrogate", None), ("invalid_utf8", None), ("nested_too_deeply", None), (None, {"ok": 1})]
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(b"".join(line({"x": i * 7919 % 10007}) + b"\n" for i in range(1000)))[:1000])
    items = list(read_task(ReadTask("s", "general", str(tmp_path / "b.jsonl.gz"), "jsonl")))
    assert items[-1].error == "unreadable_file" and all(i.error is None for i in items[:-1])
