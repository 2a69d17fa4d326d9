"""Input sources: streaming JSON arrays (truncated tails), JSONL, Parquet, Hugging Face datasets, expansion."""

import gzip
import io
import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.config import SourceConfig
from data_pipeline.json_stream import (INVALID_JSON, JSON_ELEMENT_TOO_LARGE, NOT_A_JSON_ARRAY, TEXT_AFTER_JSON_ARRAY,
                                       TRUNCATED_JSON_ARRAY, iter_json_array)
from data_pipeline.sources import ReadTask, expand_source, list_source_files, read_task

ROWS = [{"id": f"r{i}", "conversations": [{"from": "human", "value": f"q{i} ünï 漢 {'x' * i}"},
                                          {"from": "gpt", "value": f"a{i}"}]} for i in range(40)]


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1 << 20])
def test_json_array_streams_every_element_with_exact_byte_offsets(chunk_size):
    data = json.dumps(ROWS, indent=1, ensure_ascii=False).encode()
    items = list(iter_json_array(io.BytesIO(data), "x.json", chunk_size=chunk_size))
    assert [i.record for i in items] == ROWS and all(i.error is None for i in items)
    assert [i.number for i in items] == list(range(1, 41))
    decoder = json.JSONDecoder()
    for item in items:
        assert decoder.raw_decode(data[item.byte_offset:].decode())[0] == item.record


@pytest.mark.parametrize("chunk_size", [3, 1 << 20])
def test_truncated_json_array_keeps_complete_records_and_reports_the_tail(chunk_size):
    data = json.dumps(ROWS, ensure_ascii=False).encode()
    cut_at = data.index(b'{"id": "r30"') + 25  # in the middle of element 31
    items = list(iter_json_array(io.BytesIO(data[:cut_at]), "x.json", chunk_size=chunk_size))
    good, tail = items[:-1], items[-1]
    assert [i.record for i in good] == ROWS[:30]
    assert (tail.error, tail.number, tail.byte_offset) == (TRUNCATED_JSON_ARRAY, 31, data.index(b'{"id": "r30"'))
    assert tail.raw.startswith('{"id": "r30"') and f"byte {tail.byte_offset}" in tail.raw


def test_json_array_edge_cases():
    def read(data: bytes, **kw):
        return [(i.number, i.byte_offset, i.record, i.error)
                for i in iter_json_array(io.BytesIO(data), "x.json", chunk_size=4, **kw)]
    assert read(b"[]") == [] and read(b"  [ ]  \n") == []
    assert read(b'\xef\xbb\xbf[{"a": 1}]') == [(1, 4, {"a": 1}, None)]  # UTF-8 BOM (3 bytes)
    assert read(b'[{"a": 1},') == [(1, 1, {"a": 1}, None)]  # cut after a comma: nothing lost
    assert read(b'[{"a": 1}, {"a": tru}, {"a": 3}]') == [(1, 1, {"a": 1}, None), (2, 11, None, INVALID_JSON),
                                                        (3, 23, {"a": 3}, None)]
    assert read(b'{"a": 1}')[0][3] == NOT_A_JSON_ARRAY
    # a missing comma: the text after element 1 is rejected as element 2, reading goes on
    assert read(b'[{"a": 1} {"a": 2}, 3]') == [(1, 1, {"a": 1}, None), (2, 10, None, INVALID_JSON), (3, 20, 3, None)]
    assert read(b'[1,,2]') == [(1, 1, 1, None), (2, 3, None, INVALID_JSON), (3, 4, 2, None)]  # an empty element
    # a mismatched bracket closes what it skips: resynchronised at the next element
    assert read(b'[{"a": [1, 2}, {"b": 3}]') == [(1, 1, None, INVALID_JSON), (2, 15, {"b": 3}, None)]
    assert read(b'[1, 2] x') == [(1, 1, 1, None), (2, 4, 2, None), (3, 7, None, TEXT_AFTER_JSON_ARRAY)]
    huge = list(iter_json_array(io.BytesIO(b'[{"a": "' + b"x" * 5000), "x.json", chunk_size=64,
                                max_record_bytes=1000))
    assert huge[0].error == TRUNCATED_JSON_ARRAY and len(huge[0].raw) < 25_000
    big = b'[{"a": "' + b"x" * 5000 + b'"}, {"b": 2}]'  # too large to keep: reported, then reading goes on
    assert read(big, max_record_bytes=1000) == [(1, 1, None, JSON_ELEMENT_TOO_LARGE), (2, 5012, {"b": 2}, None)]


def _broken(row: dict, how: str) -> bytes:
    """A JSON array element with one syntax error that leaves its strings and brackets balanced."""
    text = json.dumps(row, ensure_ascii=False)
    return {"bad_literal": text.replace('"id": ', '"ok": tru, "id": ', 1),
            "bad_escape": text.replace('"q', '"\\q', 1),
            "control_char": text.replace(" ", "\t", 1).replace('"q', '"q\nq', 1),
            "missing_colon": text.replace('"id": ', '"id" ', 1),
            "missing_comma": text.replace('"}, {"from"', '"} {"from"', 1),
            "mismatched_bracket": text.replace("}]}", "]}", 1),
            "unquoted_key": text.replace('"id"', "id", 1)}[how].encode()


@pytest.mark.parametrize("how", ["bad_literal", "bad_escape", "control_char", "missing_colon", "missing_comma",
                                 "mismatched_bracket", "unquoted_key"])
@pytest.mark.parametrize("chunk_size", [1, 7, 1 << 20])
def test_json_array_bad_element_is_rejected_and_reading_goes_on(how, chunk_size):
    """One malformed element mid-array: it alone is rejected (number, byte offset, its text); every later
    element is still read, so the accounting counts each element once."""
    parts = [json.dumps(r, ensure_ascii=False).encode() for r in ROWS]
    parts[12] = _broken(ROWS[12], how)
    data = b"[" + b",\n ".join(parts) + b"]\n"
    items = list(iter_json_array(io.BytesIO(data), "x.json", chunk_size=chunk_size))
    assert len(items) == len(ROWS) and [i.number for i in items] == list(range(1, 41))
    bad = items[12]
    assert (bad.record, bad.error, bad.byte_offset) == (None, INVALID_JSON, data.index(parts[12]))
    assert bad.raw.startswith(parts[12].decode()) and f"element 13 at byte {bad.byte_offset}" in bad.raw
    assert [i.record for i in items if i.error is None] == ROWS[:12] + ROWS[13:]
    decoder = json.JSONDecoder()
    for item in items[13:]:
        assert decoder.raw_decode(data[item.byte_offset:].decode())[0] == item.record


@pytest.mark.parametrize("chunk_size", [3, 1 << 20])
def test_bad_element_then_truncated_tail(chunk_size):
    data = json.dumps(ROWS, ensure_ascii=False).encode().replace(b'{"id": "r5"', b'{"id": "r5" "x"', 1)
    start = data.index(b'{"id": "r30"')
    items = list(iter_json_array(io.BytesIO(data[:start + 25]), "x.json", chunk_size=chunk_size))
    assert [(i.number, i.error) for i in items if i.error] == [(6, INVALID_JSON), (31, TRUNCATED_JSON_ARRAY)]
    assert [i.record for i in items if not i.error] == ROWS[:5] + ROWS[6:30]
    assert items[-1].byte_offset == start and f"byte {start}" in items[-1].raw


def test_unpaired_quote_never_loses_records_silently():
    """An unpaired '"' can't be resynchronised in general; what can't be read is still reported."""
    data = json.dumps(ROWS, ensure_ascii=False).encode().replace(b'"id": "r5"', b'"id": "r5""', 1)
    items = list(iter_json_array(io.BytesIO(data), "x.json", chunk_size=16))
    assert [i.record for i in items[:5]] == ROWS[:5] and items[5].error is not None
    assert items[-1].error in (TRUNCATED_JSON_ARRAY, TEXT_AFTER_JSON_ARRAY)
    assert items[-1].byte_offset < data.index(b'{"id": "r39"')  # the rest is in some report
    for text in (b"[1, 2]  ]", b'["x"", "]", 5, 6]'):  # after an unpaired '"', a ']' looks like the end
        assert list(iter_json_array(io.BytesIO(text), "x.json"))[-1].error == TEXT_AFTER_JSON_ARRAY


def test_jsonl_reports_bad_lines_with_numbers(tmp_path):
    path = tmp_path / "a.jsonl"
    lines = [json.dumps(ROWS[0]), "", "{not json", json.dumps(ROWS[1])]
    path.write_text("\n".join(lines) + "\n")
    items = [i.parsed() for i in read_task(ReadTask("s", "general", str(path), "jsonl"))]
    assert [(i.number, i.error) for i in items] == [(1, None), (3, INVALID_JSON), (4, None)]
    assert items[1].raw.startswith("{not json") and items[1].byte_offset == len(lines[0]) + 2
    assert items[2].record == ROWS[1]


def test_compressed_and_parquet_files(tmp_path):
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in ROWS[:5])
    pq.write_table(pa.Table.from_pylist(ROWS[5:9]), tmp_path / "b.parquet", row_group_size=2)
    tasks = expand_source(SourceConfig(str(tmp_path)), "agent")
    assert [(t.format, t.path.rsplit("/", 1)[-1]) for t in tasks] == [("jsonl", "a.jsonl.gz"), ("parquet", "b.parquet")]
    got = [i.parsed().record for t in tasks for i in read_task(t)]
    assert got == ROWS[:9]
    glob_tasks = expand_source(SourceConfig(str(tmp_path / "*.parquet")), "agent")
    assert [t.format for t in glob_tasks] == ["parquet"]


def test_files_know_their_path_within_the_source(tmp_path):
    """Same file name in two subdirectories: distinct paths within the source (record ids use them), the
    same for a local directory, a glob and another filesystem; a single file: its name."""
    for sub, fmt in (("a", "jsonl"), ("b", "jsonl"), ("b/c", "json"), ("d", "parquet")):
        (tmp_path / "src" / sub).mkdir(parents=True, exist_ok=True)
    (tmp_path / "src/a/d.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    (tmp_path / "src/b/d.jsonl").write_text(json.dumps(ROWS[1]) + "\n")
    (tmp_path / "src/b/c/d.json").write_text(json.dumps(ROWS[2:4]))
    pq.write_table(pa.Table.from_pylist(ROWS[4:5]), tmp_path / "src/d/d.parquet")
    tasks = expand_source(SourceConfig(str(tmp_path / "src")), "general")
    expected = ["a/d.jsonl", "b/c/d.json", "b/d.jsonl", "d/d.parquet"]
    assert [t.rel_path for t in tasks] == expected
    items = [i.parsed() for t in tasks for i in read_task(t)]
    assert [i.rel_path for i in items] == ["a/d.jsonl", "b/c/d.json", "b/c/d.json", "b/d.jsonl", "d/d.parquet"]
    assert [t.rel_path for t in expand_source(SourceConfig(str(tmp_path / "src/*/d.jsonl")), "general")] == \
        ["a/d.jsonl", "b/d.jsonl"]
    assert [t.rel_path for t in expand_source(SourceConfig(str(tmp_path / "src/b/d.jsonl")), "general")] == ["d.jsonl"]
    fs = fsspec.filesystem("memory")
    for rel in expected:
        fs.pipe(f"/rel_path_test/{rel}", (tmp_path / "src" / rel).read_bytes())
    assert [r for _, r in list_source_files("memory://rel_path_test")] == expected
    assert [r for _, r in list_source_files("memory://rel_path_test/b/*.jsonl")] == ["d.jsonl"]


def test_source_specs_and_missing_inputs(tmp_path):
    assert SourceConfig.parse("gpt4=gs://b/x=1/s.json") == SourceConfig("gs://b/x=1/s.json", "gpt4")
    assert SourceConfig.parse("THUDM/AgentInstruct:os,db") == SourceConfig("THUDM/AgentInstruct", "THUDM_AgentInstruct",
                                                                           "hf", ("os", "db"))
    assert SourceConfig.parse("data/raw/sharegpt.json").name == "sharegpt"
    with pytest.raises(FileNotFoundError, match="no such file"):
        expand_source(SourceConfig(str(tmp_path / "missing.jsonl")), "agent")
    with pytest.raises(ValueError, match="SHAREGPT_UNSET_VAR is not set"):
        expand_source(SourceConfig("${SHAREGPT_UNSET_VAR}/x.json"), "general")


def test_hub_dataset_offline_is_a_clear_error():
    # tests run with HF_HUB_OFFLINE=1: the hub is unreachable
    with pytest.raises(RuntimeError, match="cannot list the splits.*THUDM/AgentInstruct.*hf download"):
        expand_source(SourceConfig("THUDM/AgentInstruct"), "agent")


def test_build_reports_every_source_problem_at_once(tmp_path):
    from data_pipeline.build import SourceError, read_tasks
    from data_pipeline.config import PipelineConfig

    cfg = PipelineConfig(agent=(SourceConfig("THUDM/AgentInstruct", "ai", "hf"),),
                         general=(SourceConfig("${SHAREGPT_UNSET_VAR}", "g4"),
                                  SourceConfig("${SHAREGPT_UNSET_VAR2}", "g35"),
                                  SourceConfig(str(tmp_path / "missing.json"), "g0")), general_weights=(1, 1, 1))
    with pytest.raises(RuntimeError, match="4 sources cannot be read") as e:  # (tests run offline)
        read_tasks(cfg)
    assert all(text in str(e.value) for text in ("cannot list the splits", "SHAREGPT_UNSET_VAR is not set",
                                                 "SHAREGPT_UNSET_VAR2 is not set", "no such file"))
    with pytest.raises(SourceError, match="no such file") as e:  # a single problem: its own message
        read_tasks(PipelineConfig(general=(SourceConfig(str(tmp_path / "missing.json"), "g0"),), general_weights=()))
    assert isinstance(e.value.__cause__, FileNotFoundError)


def test_build_cli_reports_unreadable_sources_in_one_error_line(tmp_path, capsys):
    from data_pipeline.build import main

    with pytest.raises(SystemExit) as e:
        main([f"--general={tmp_path / 'missing.json'}", "--eta=0", f"--output={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: ") and "missing.json" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_hub_style_dataset_all_or_chosen_splits(tmp_path):
    """A dataset in the hub's layout (data/{split}-*.parquet, as THUDM/AgentInstruct), read by `datasets`."""
    (tmp_path / "data").mkdir()
    for split in ("os", "db", "mind2web"):
        rows = [{"id": f"{split}_{i}", "conversations": [{"from": "human", "loss": None, "value": "q"},
                                                         {"from": "gpt", "loss": True, "value": "a"}]}
                for i in range(3)]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / f"{split}-00000-of-00001.parquet")
    every = expand_source(SourceConfig.parse(f"hf:{tmp_path}"), "agent")
    assert sorted(t.split for t in every) == ["db", "mind2web", "os"]
    chosen = expand_source(SourceConfig.parse(f"ai=hf:{tmp_path}:os,db"), "agent")
    assert [(t.source, t.split, t.format) for t in chosen] == [("ai", "os", "hf"), ("ai", "db", "hf")]
    items = list(read_task(chosen[1]))
    assert [i.record["id"] for i in items] == ["db_0", "db_1", "db_2"] and {i.split for i in items} == {"db"}
