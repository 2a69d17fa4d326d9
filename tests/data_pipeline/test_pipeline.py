"""End-to-end runs of the Beam pipeline (data_pipeline.build): records, loss masks, accounting, η, determinism,
gs:// input and output. Built datasets are shared through module-scoped fixtures (a Beam run takes seconds), which
is why these tests stay in one module of about 450 lines rather than several that would each build their own."""

import json
import os
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

from data_pipeline.formats import records
from data_pipeline import build_sample_dataset
from data_pipeline.build import main, run
from data_pipeline.formats.chat_template import DEFAULT_SYSTEM_PROMPT
from data_pipeline.config import PipelineConfig, SourceConfig
from data_pipeline.sample_data import make_sample_data as sample
from data_pipeline.formats.tokenizer import SAMPLE_TOKENIZER_DIR

IN_MEMORY = ["--runner=DirectRunner", "--direct_running_mode=in_memory"]
SP = spm.SentencePieceProcessor(model_file=os.path.join(SAMPLE_TOKENIZER_DIR, "tokenizer.model"))


def shard_files(out, split=None) -> list[str]:
    fs, root = fsspec.core.url_to_fs(str(out))
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False) if records.parse_shard_filename(p))
    return [f"{out}/{n}" for n in names if split is None or n.startswith(split + "-")]


def read_records(out, split=None) -> list[records.Record]:
    result = []
    for path in shard_files(out, split):
        with fsspec.open(path, "rb") as f:
            result += [records.decode_example(p) for p in records.iter_tfrecord(f, path)]
    return result


def raw_sample_rows() -> dict[str, list]:
    from data_pipeline.json_stream import iter_json_array

    with open(sample.HERE / sample.GPT35_FILE, "rb") as f:
        gpt35 = [i.record for i in iter_json_array(f, "x")]
    return {"agentinstruct": [json.loads(l) for l in open(sample.HERE / sample.AGENT_FILE)],
            "sharegpt_gpt4": [json.loads(l) for l in open(sample.HERE / sample.GPT4_FILE)],
            "sharegpt_gpt35": gpt35}


@pytest.fixture(scope="module")
def sample_build(tmp_path_factory):
    """The embedded default, built with the default runner (DirectRunner, in_memory, 2 worker threads)."""
    out = tmp_path_factory.mktemp("sample") / "data"
    manifest = build_sample_dataset(str(out))
    return out, manifest


# ------------------------------------------------------------------------------------------ records
def test_every_record_parses_with_tensorflow(sample_build):
    tf = pytest.importorskip("tensorflow")
    out, manifest = sample_build
    spec = {"input_ids": tf.io.VarLenFeature(tf.int64), "loss_mask": tf.io.VarLenFeature(tf.int64),
            "source": tf.io.FixedLenFeature([], tf.string), "task": tf.io.FixedLenFeature([], tf.string),
            "id": tf.io.FixedLenFeature([], tf.string)}
    for split in ("train", "validation"):
        files = shard_files(out, split)
        assert len(files) == manifest["splits"][split]["shards"]
        ours = read_records(out, split)
        theirs = [tf.io.parse_single_example(x, spec) for x in tf.data.TFRecordDataset(files)]
        assert len(theirs) == len(ours) == manifest["splits"][split]["examples"] > 0
        tokens = 0
        for rec, ex in zip(ours, theirs):
            np.testing.assert_array_equal(tf.sparse.to_dense(ex["input_ids"]).numpy(), rec.input_ids)
            np.testing.assert_array_equal(tf.sparse.to_dense(ex["loss_mask"]).numpy(), rec.loss_mask)
            assert (ex["source"].numpy().decode(), ex["task"].numpy().decode(), ex["id"].numpy().decode()) == \
                   (rec.source, rec.task, rec.id)
            tokens += len(rec.input_ids)
        assert tokens == manifest["splits"][split]["tokens"]


def test_output_loads_with_tensorflow_datasets(sample_build, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setenv("EPATH_USE_TF", "false")
    out, manifest = sample_build
    builder = tfds.builder_from_directory(str(out))
    for split in ("train", "validation"):
        assert builder.info.splits[split].num_examples == manifest["splits"][split]["examples"]
        assert builder.info.splits[split].num_shards == manifest["splits"][split]["shards"]
    ours = {r.id: r for r in read_records(out, "validation")}
    theirs = list(tfds.as_numpy(builder.as_dataset(split="validation")))
    assert len(theirs) == len(ours)
    for ex in theirs:
        rec = ours[ex["id"].decode()]
        np.testing.assert_array_equal(ex["input_ids"], rec.input_ids)
        np.testing.assert_array_equal(ex["loss_mask"], rec.loss_mask)
        assert (ex["source"].decode(), ex["task"].decode()) == (rec.source, rec.task)


def expected_answers(row: dict) -> list[tuple[str, bool]] | None:
    """(answer, trained) per pair of a clean raw record (strict human/gpt alternation), else None."""
    turns = row["conversations"]
    if not turns or len(turns) % 2 or any(t["from"] != ("human" if i % 2 == 0 else "gpt") or
                                         not isinstance(t["value"], str) or not t["value"].strip()
                                         for i, t in enumerate(turns)):
        return None
    return [(t["value"].strip(), t.get("loss") is not False) for t in turns[1::2]]


def test_loss_tokens_decode_to_exactly_the_trained_answers(sample_build):
    out, manifest = sample_build
    rows = {r["id"]: r for rs in raw_sample_rows().values() for r in rs if isinstance(r, dict) and "id" in r}
    checked = demo_blocks = truncated = 0
    for rec in read_records(out):
        answers = expected_answers(rows[rec.id])
        if answers is None:
            continue
        ids, mask = rec.input_ids, rec.loss_mask
        starts = np.flatnonzero(ids == SP.bos_id())
        assert len(starts) <= len(answers) and len(ids) <= 1024, rec.id
        truncated += len(starts) < len(answers)
        answers = answers[:len(starts)]  # whole trailing pairs beyond max_seq_len are dropped
        for (answer, trained), block, block_mask in zip(answers, np.split(ids, starts[1:]), np.split(mask, starts[1:])):
            if not trained:
                assert not block_mask.any()  # a loss: false demonstration turn: context only
                demo_blocks += 1
                continue
            run_ = np.flatnonzero(block_mask)
            assert np.all(np.diff(run_) == 1) and run_[-1] == len(block) - 1 and block[-1] == SP.eos_id()
            assert SP.decode(block[run_[:-1]].tolist()).strip() == answer
            assert answer not in SP.decode(block[:run_[0]].tolist())  # nothing of the answer left out
        first_prompt = SP.decode(ids[:np.flatnonzero(mask)[0]].tolist())
        assert DEFAULT_SYSTEM_PROMPT in first_prompt
        checked += 1
    assert checked > 500 and demo_blocks > 50
    assert 0 < truncated == manifest["sources"]["agentinstruct"]["repairs"]["dropped_trailing_pairs_over_max_seq_len"]


def test_record_system_prompt_replaces_the_default(sample_build):
    out, _ = sample_build
    pirate = [r for r in read_records(out) if r.id == "g35_messy5"]
    if not pirate:
        pytest.skip("the messy system-prompt row was not drawn into the mix")
    text = SP.decode(pirate[0].input_ids.tolist())
    assert "You are a pirate" in text and DEFAULT_SYSTEM_PROMPT not in text


# ------------------------------------------------------------------------------------------ accounting and mix
def test_accounting_invariant_on_the_sample(sample_build):
    out, manifest = sample_build
    raw = raw_sample_rows()
    thresholds = PipelineConfig().reward_threshold
    low_reward = sum(1 for r in raw["agentinstruct"] if r.get("reward") is not None and
                     r["reward"] < thresholds(r.get("task") or r["id"].rsplit("_", 1)[0]) - 1e-6)
    output = read_records(out)
    for name, rows in raw.items():
        acc = manifest["sources"][name]
        assert acc["read"] == len(rows)
        assert acc["read"] == acc["kept"] + acc["filtered"] + acc["rejected"]
        assert acc["filtered"] == sum(acc["filtered_by_reason"].values())
        kept_in_output = sum(1 for r in output if (r.task == name if r.source == "general" else name == "agentinstruct"))
        assert acc["kept"] == kept_in_output
    agent = manifest["sources"]["agentinstruct"]
    assert agent["filtered_by_reason"] == {"reward_below_threshold": low_reward} and low_reward > 0
    messy = manifest["sources"]["sharegpt_gpt35"]
    assert messy["rejected_by_reason"] == {"non_string_value": 1, "not_an_object": 1, "tool_result_without_call": 1}
    assert messy["filtered_by_reason"]["nothing_to_learn"] == 3
    assert {"role_alias", "dropped_leading_assistant", "merged_consecutive_turns", "system_prompt_from_record",
            "missing_id", "dropped_empty_turn", "dropped_trailing_user"} <= set(messy["repairs"])
    rejected = [json.loads(l) for l in open(out / records.REJECTED_NAME)]
    assert len(rejected) == manifest["totals"]["rejected"] == 3
    assert {r["reason"] for r in rejected} == {"non_string_value", "not_an_object", "tool_result_without_call"}
    assert all(r["file"].endswith(sample.GPT35_FILE) and r["number"] > 0 and "record" in r for r in rejected)
    assert len({(r.source, r.id) for r in output}) == len(output)  # no conversation twice


def test_eta_and_general_sub_mix_in_the_output(sample_build):
    out, manifest = sample_build
    output = read_records(out)
    agent = sum(r.source == "agent" for r in output)
    general = len(output) - agent
    assert abs(agent - 0.2 * (agent + general)) <= 1
    assert manifest["mix"]["eta_achieved"] == pytest.approx(agent / len(output))
    gpt4 = sum(r.task == "sharegpt_gpt4" for r in output)
    assert abs(gpt4 - 0.2 * general) <= 1 and sum(r.task == "sharegpt_gpt35" for r in output) == general - gpt4
    assert manifest["mix"]["examples_per_source"] == {"agentinstruct": agent, "sharegpt_gpt4": gpt4,
                                                      "sharegpt_gpt35": general - gpt4}


def test_validation_split_has_every_task(sample_build):
    out, manifest = sample_build
    val, train = read_records(out, "validation"), read_records(out, "train")
    assert {r.task for r in val} == set(manifest["tasks"]) == {r.task for r in train}
    assert not {r.id for r in val} & {r.id for r in train}
    assert manifest["tasks"] == sorted(["os", "db", "alfworld", "webshop", "kg", "mind2web", "sharegpt_gpt4",
                                        "sharegpt_gpt35"])
    assert sum(manifest["kept_per_task"].values()) == len(val) + len(train)


def test_manifest_tokenizer_entry_loads_after_the_dataset_moved(sample_build, tmp_path):
    import shutil

    from data_pipeline.formats.dataset import manifest_tokenizer_path
    from data_pipeline.formats.tokenizer import load_tokenizer

    out, manifest = sample_build
    tok = manifest["tokenizer"]
    assert (tok["vocab_size"], tok["bos_id"], tok["eos_id"]) == (1024, 1, 2) and len(tok["sha256"]) == 64
    assert tok["path"] == "tokenizer"  # relative to the dataset, not where it was built
    moved = shutil.copytree(out, tmp_path / "elsewhere")
    assert manifest_tokenizer_path(manifest, str(moved)) == f"{moved}/tokenizer"
    assert len(load_tokenizer(manifest_tokenizer_path(manifest, str(moved)))) == 1024


def assert_same_build(out, manifest, other, other_manifest):
    from data_pipeline.staging import STAGING_DIR

    listing = sorted(p.name for p in Path(out).iterdir())
    assert listing == sorted(p.name for p in Path(other).iterdir()) and STAGING_DIR not in listing  # (removed)
    names = [Path(p).name for p in shard_files(out)]
    assert names == [Path(p).name for p in shard_files(other)] and len(names) == 5
    for name in names + [records.REJECTED_NAME]:
        assert (Path(out) / name).read_bytes() == (Path(other) / name).read_bytes(), name
    strip = lambda m: {**m, "tokenizer": {**m["tokenizer"], "path": None},
                       "config": {**m["config"], "output": None, "tokenize_batch_size": None}}
    assert strip(other_manifest) == strip(manifest)


def test_same_output_bytes_with_another_worker_count(sample_build, tmp_path):
    out, manifest = sample_build
    # threads through Beam's gRPC data plane, another worker count, other batch boundaries between reader and encoder
    again = run(PipelineConfig(output=str(tmp_path), tokenize_batch_size=7),
                ["--runner=DirectRunner", "--direct_num_workers=3", "--direct_running_mode=multi_threading"])
    assert_same_build(out, manifest, tmp_path, again)


def test_same_output_bytes_without_spill_files(sample_build, tmp_path, monkeypatch):
    """Non-local runners (Dataflow) carry the batches through Beam instead of spill files: the same output."""
    from data_pipeline import beam_pipeline

    real = beam_pipeline.build_graph
    monkeypatch.setattr(beam_pipeline, "build_graph", lambda *a, **k: real(*a, **{**k, "spill": False}))
    monkeypatch.setattr(beam_pipeline, "write_spill", None)  # (never called)
    out, manifest = sample_build
    assert_same_build(out, manifest, tmp_path, run(PipelineConfig(output=str(tmp_path))))


# ------------------------------------------------------------------------------------------ bad inputs
def agent_row(i, task="os", turns=1, answer="ok", **extra):
    conv = []
    for t in range(turns):
        conv += [{"from": "human", "loss": None, "value": f"question {t}"},
                 {"from": "gpt", "loss": True, "value": f"{answer} {t}"}]
    return {"id": f"{task}_{i}", "conversations": conv, **extra}


@pytest.fixture(scope="module")
def bad_build(tmp_path_factory):
    raw = tmp_path_factory.mktemp("bad_raw")
    long_text = " ".join(f"word{i}" for i in range(400))
    lines = [json.dumps(agent_row(0)), json.dumps(agent_row(1, reward=1.0)), "{this is not json",
             json.dumps(agent_row(2, reward="high")), json.dumps(agent_row(3, reward=0.0)),
             json.dumps(agent_row(0, answer="duplicate")),  # same id as line 1: dropped as a duplicate
             json.dumps(agent_row(4, answer=long_text)),  # the first pair alone is over max_seq_len
             json.dumps(agent_row(5, turns=30)),  # trailing pairs dropped to fit
             json.dumps({"id": "os_6", "conversations": [
                 {"from": "human", "value": "demo q"}, {"from": "gpt", "loss": False, "value": "demo a"},
                 {"from": "human", "value": long_text}, {"from": "gpt", "loss": True, "value": "real answer"}]}),
             json.dumps(agent_row(7, task="mind2web", reward=2 / 3)), ""]
    (raw / "agent.jsonl").write_text("\n".join(lines))
    rows = [{"id": f"g{i}", "conversations": [{"from": "human", "value": f"hi {i}"}, {"from": "gpt", "value": f"yo {i}"}]}
            for i in range(12)]
    text = json.dumps(rows)
    cut = text.index('{"id": "g10"') + 30
    (raw / "chat.json").write_text(text[:cut])  # a truncated JSON array
    pq.write_table(pa.Table.from_pylist([{"id": f"p{i}", "conversations": [
        {"from": "user", "value": f"q{i}"}, {"from": "assistant", "value": f"a{i}"}]} for i in range(5)]),
        raw / "more.parquet")
    out = tmp_path_factory.mktemp("bad_out")
    (out / "train-00007-of-00009.tfrecord").write_bytes(b"stale")  # from an earlier build: must go
    manifest = main([f"--agent=agents={raw / 'agent.jsonl'}", f"--general={raw / 'chat.json'}",
                     f"--general=pq={raw / 'more.parquet'}", "--general-weights=1,1", "--eta=0.5",
                     "--max-seq-len=300", "--num-shards=2", "--validation-fraction=0", f"--output={out}",
                     "--reward-threshold=default=1.0", "--overwrite", *IN_MEMORY])
    assert not (out / "train-00007-of-00009.tfrecord").exists()
    return raw, out, manifest, cut


def test_bad_inputs_land_in_the_right_buckets(bad_build):
    raw, out, manifest, cut = bad_build
    agents = manifest["sources"]["agents"]
    assert agents["read"] == 10 == agents["kept"] + agents["filtered"] + agents["rejected"]
    assert agents["rejected_by_reason"] == {"invalid_json": 1, "non_numeric_reward": 1}
    assert agents["filtered_by_reason"] == {"reward_below_threshold": 1, "duplicate_id": 1,
                                            "first_pair_too_long": 1, "no_loss_after_truncation": 1}
    assert agents["kept"] == 4 and agents["repairs"] == {"dropped_trailing_pairs_over_max_seq_len": 1}
    chat = manifest["sources"]["chat"]
    assert chat["read"] == 11 and chat["rejected_by_reason"] == {"truncated_json_array": 1}
    pq_ = manifest["sources"]["pq"]
    assert pq_["read"] == 5 and pq_["rejected"] == 0
    assert chat["kept"] + pq_["kept"] == 4 == manifest["mix"]["general_examples"]  # eta 0.5, weights 1:1
    assert (chat["kept"], pq_["kept"]) == (2, 2)
    assert chat["filtered_by_reason"] == {"not_sampled_for_mix": 8} and pq_["filtered_by_reason"] == {"not_sampled_for_mix": 3}


def test_rejected_jsonl_names_file_record_and_reason(bad_build):
    raw, out, manifest, cut = bad_build
    rows = [json.loads(l) for l in open(out / records.REJECTED_NAME)]
    by_reason = {r["reason"]: r for r in rows}
    assert len(rows) == manifest["totals"]["rejected"] == 3
    assert by_reason["invalid_json"]["number"] == 3 and by_reason["invalid_json"]["raw"].startswith("{this is not json")
    assert by_reason["non_numeric_reward"]["record"]["id"] == "os_2" and by_reason["non_numeric_reward"]["number"] == 4
    tail = by_reason["truncated_json_array"]
    text = (raw / "chat.json").read_text()
    assert tail["number"] == 11 and tail["byte_offset"] == text.index('{"id": "g10"') and tail["file"].endswith("chat.json")


def test_records_without_ids_in_same_named_files_of_a_directory_are_all_kept(tmp_path):
    """Fallback ids are {path within the source}#{number}: a/d.jsonl#1 and b/d.jsonl#1 are two records, not a
    duplicate, through the whole Beam run (the batches that carry them between stages keep the path). The
    general source reads one of the same files: batches of two sources never share a key."""
    raw = tmp_path / "raw"
    for sub, answer in (("a", "first"), ("b", "second")):
        (raw / sub).mkdir(parents=True)
        row = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": answer}]}
        (raw / sub / "d.jsonl").write_text(json.dumps(row) + "\n")
    manifest = main([f"--agent=agents={raw}", "--general=none=" + str(raw / "a"), "--eta=1",
                     "--validation-fraction=0", "--num-shards=1", f"--output={tmp_path / 'out'}", *IN_MEMORY])
    agents = manifest["sources"]["agents"]
    assert agents["read"] == 2 and agents["kept"] == 2, agents
    assert sorted(r.id for r in read_records(tmp_path / "out")) == ["a/d.jsonl#1", "b/d.jsonl#1"]


def test_raw_batches_round_trip_every_field():
    from data_pipeline.beam_pipeline import raw_batch, unpack_raw_batch
    from data_pipeline.sources import RawItem, ReadTask

    task = ReadTask("s", "agent", "gs://b/dir", "jsonl", "train", rel_path="a/d.jsonl")
    items = [RawItem({"x": 1}, "gs://b/dir/a/d.jsonl", 3, 17, "train", "invalid_json", "raw", b"line", "a/d.jsonl")]
    assert unpack_raw_batch(raw_batch(task, items)) == (task, items)


def test_kept_conversations_are_the_first_of_duplicates_and_fit(bad_build):
    _, out, _, _ = bad_build
    recs = {r.id: r for r in read_records(out)}
    assert set(recs) >= {"os_0", "os_1", "os_5", "mind2web_7"} and "os_4" not in recs and "os_6" not in recs
    assert "duplicate" not in SP.decode(recs["os_0"].input_ids.tolist())
    assert all(len(r.input_ids) <= 300 for r in recs.values())
    os5 = recs["os_5"]
    assert os5.input_ids[-1] == SP.eos_id() and os5.loss_mask[-1] == 1  # whole pairs only
    assert not (out / "train-00007-of-00009.tfrecord").exists()
    assert [Path(p).name for p in shard_files(out)] == ["train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord",
                                                        "validation-00000-of-00001.tfrecord"]


# ------------------------------------------------------------------------------------------ real data, gs://
def test_accounting_on_real_sharegpt(sharegpt_sample_path, tmp_path):
    cfg = PipelineConfig(general=(SourceConfig(str(sharegpt_sample_path), name="sharegpt"),), general_weights=(),
                         output=str(tmp_path))
    manifest = run(cfg, IN_MEMORY)
    acc = manifest["sources"]["sharegpt"]
    lines = sum(1 for line in open(sharegpt_sample_path) if line.strip())
    assert acc["read"] == lines == acc["kept"] + acc["filtered"] + acc["rejected"]
    rejected = [json.loads(l) for l in open(tmp_path / records.REJECTED_NAME)]
    assert len(rejected) == manifest["totals"]["rejected"]
    assert manifest["mix"]["general_examples"] == round(manifest["mix"]["agent_examples"] * 4) or \
        manifest["mix"]["eta_achieved"] > 0.2
    known = {"nothing_to_learn", "not_sampled_for_mix", "first_pair_too_long", "no_loss_after_truncation",
             "duplicate_id"}
    assert set(acc["filtered_by_reason"]) <= known
    assert sum(r.task == "sharegpt" for r in read_records(tmp_path)) == acc["kept"]


def test_gcs_input_and_output_match_the_local_build(gcs_bucket, sample_build):
    out, manifest = sample_build
    fs = fsspec.filesystem("gs")
    raw = f"{gcs_bucket}/raw"
    for name in (sample.AGENT_FILE, sample.GPT4_FILE, sample.GPT35_FILE):
        fs.put(str(sample.HERE / name), f"{raw}/{name}")
    fs.put(os.path.join(SAMPLE_TOKENIZER_DIR, "tokenizer.model"), f"{raw}/tok/tokenizer.model")
    default = PipelineConfig()
    cfg = default.replace(
        agent=(SourceConfig(f"{raw}/{sample.AGENT_FILE}", "agentinstruct"),),
        general=(SourceConfig(f"{raw}/{sample.GPT4_FILE}", "sharegpt_gpt4"),
                 SourceConfig(f"{raw}/{sample.GPT35_FILE}", "sharegpt_gpt35")),
        tokenizer=f"{raw}/tok", output=f"{gcs_bucket}/out")
    remote = run(cfg)  # the default runner: workers read and write gs:// themselves
    for name in [Path(p).name for p in shard_files(out)]:
        assert fs.cat(f"{gcs_bucket}/out/{name}") == (out / name).read_bytes(), name
    without_file = lambda text: [{**json.loads(l), "file": Path(json.loads(l)["file"]).name} for l in text.splitlines()]
    assert without_file(fs.cat(f"{gcs_bucket}/out/{records.REJECTED_NAME}").decode()) == \
        without_file((out / records.REJECTED_NAME).read_text())
    assert remote["sources"] == manifest["sources"] and remote["tokenizer"]["path"] == "tokenizer"
    assert json.loads(fs.cat(f"{gcs_bucket}/out/{records.MANIFEST_NAME}")) == remote


# ------------------------------------------------------------------------------------------ local runner
def test_multi_process_workers_are_ours_and_gone_after_the_run(sample_build, tmp_path, monkeypatch):
    import subprocess

    started = []

    class RecordingPopen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append((args[0], kwargs.get("env") or {}, self))

    monkeypatch.setattr(subprocess, "Popen", RecordingPopen)
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    manifest = run(PipelineConfig(output=str(tmp_path)),
                   ["--runner=DirectRunner", "--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    assert_same_build(*sample_build, tmp_path, manifest)
    workers = [(cmd, env, p) for cmd, env, p in started if "beam_worker" in str(cmd)]
    assert len(workers) == 2 and all(str(cmd).endswith("-m data_pipeline.beam_worker") for cmd, _, _ in workers)
    assert all(p.poll() == 0 for _, _, p in workers)  # exited, successfully
    assert all(env["TOKENIZERS_PARALLELISM"] == "false" for _, env, _ in workers)  # one tokenizer thread each
    assert "TOKENIZERS_PARALLELISM" not in os.environ  # the caller's environment is as it was


def test_tokenizer_threads_follow_the_worker_count(monkeypatch):
    from apache_beam.options.pipeline_options import PipelineOptions

    from data_pipeline.runner import one_tokenizer_thread_per_worker

    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    for workers, inside in ((1, None), (2, "false")):
        with one_tokenizer_thread_per_worker(PipelineOptions([f"--direct_num_workers={workers}"])):
            assert os.environ.get("TOKENIZERS_PARALLELISM") == inside
        assert "TOKENIZERS_PARALLELISM" not in os.environ
    with one_tokenizer_thread_per_worker(None):  # not a local runner
        assert "TOKENIZERS_PARALLELISM" not in os.environ
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")  # the user's explicit choice stands
    with one_tokenizer_thread_per_worker(PipelineOptions(["--direct_num_workers=2"])):
        assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"


@pytest.mark.parametrize("error, code", [(RuntimeError("boom"), 1), (SystemExit(3), 3), (None, 0)])
def test_worker_exits_at_once_with_the_harness_result(monkeypatch, error, code):
    from apache_beam.runners.worker import sdk_worker_main

    from data_pipeline import beam_worker

    def harness(argv):
        if error is not None:
            raise error

    exits = []
    monkeypatch.setattr(sdk_worker_main, "main", harness)
    monkeypatch.setattr(beam_worker.os, "_exit", exits.append)
    monkeypatch.setattr(beam_worker.gc, "freeze", lambda: None)  # (this is the test process, not a worker)
    beam_worker.main()
    assert exits == [code]


def test_local_worker_environments_start_our_workers_and_never_flush_on_a_timer():
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.portability import python_urns
    from apache_beam.transforms import environments

    from data_pipeline.runner import NO_TIMED_FLUSH_MS, local_worker_environments

    p = beam.Pipeline(options=PipelineOptions([]))
    _ = p | beam.Create([1, 2]) | beam.Map(lambda x: x)
    for env, urn in ((environments.SubprocessSDKEnvironment.from_command_string(
            "python -m apache_beam.runners.worker.sdk_worker_main"), python_urns.SUBPROCESS_SDK),
                     (environments.EmbeddedPythonGrpcEnvironment.default(), python_urns.EMBEDDED_PYTHON_GRPC)):
        proto = local_worker_environments(p.to_runner_api(default_environment=env))
        (adjusted,) = [e for e in proto.components.environments.values() if e.urn == urn]
        if urn == python_urns.SUBPROCESS_SDK:
            assert adjusted.payload.decode().endswith("-m data_pipeline.beam_worker")
        else:
            assert json.loads(adjusted.payload)["data_buffer_time_limit_ms"] == NO_TIMED_FLUSH_MS
            config = environments.EmbeddedPythonGrpcEnvironment.parse_config(adjusted.payload.decode())
            assert config["data_buffer_time_limit_ms"] > 10 ** 9  # ms: longer than any run


# The Llama 2 path's shards as built before the tool-calling formats and Jinja templates existed (issue #12:
# the paper's path stays byte-identical); a change to the template, the mask or the mix shows up here.
SAMPLE_SHARDS_SHA256 = {
    "train-00000-of-00004.tfrecord": "208d0a98a2847046e282654a3cda01139c77356d8dcaebfd1ea7308ba4f8f2e9",
    "train-00001-of-00004.tfrecord": "bea4c6a8fda9e75bca13cc175e671d3237610efaf874ed3138503d4f8870a313",
    "train-00002-of-00004.tfrecord": "1d1c0de522c1dbfadeb8de829b32898ebf61914eccada85122a7e3aba6fa8e27",
    "train-00003-of-00004.tfrecord": "92b9f044d705064dbbaafe178ac1e566148781c4a92dec184896894b7b8775cc",
    "validation-00000-of-00001.tfrecord": "32877b0d3df6ccf8148a024b7867dcbe94aaeac0494e1eb0da018db9f9d07d12",
}


def test_llama2_shards_are_byte_identical_to_the_reference_build(sample_build):
    import hashlib

    out, _ = sample_build
    got = {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in SAMPLE_SHARDS_SHA256}
    assert got == SAMPLE_SHARDS_SHA256
