"""The Apache Beam graph: read → normalise → de-duplicate → tokenize → mix → split → write shards + manifest.

    ReadTasks ─Reshuffle─► ReadAndNormalize ─► GroupByKey(source, id) ─► KeepFirst ─► BatchElements ─► Encode
                                 │ rejected rows                │ duplicates            │ too long
    Encode ─► keys ─► CombineGlobally(list) ─► make_plan ══════(side input)══╗
    Encode ─────────────────────────────────────────────────────────────► Place ─► GroupByKey(split, shard)
                                                                                  ─► WriteShard ─► stats
    all accounting tallies ─► CombineGlobally(sum) ═╗   rejected rows ─► WriteRejected
                                                    ╚═► WriteManifest (after every shard is written)

Every decision that could depend on the runner is a function of (seed, source, id) (see mixing.py), and
each shard's records are sorted by a hash before writing, so the output bytes are the same on any runner
with any number of workers. Shards are written by us through fsspec (local or gs://).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
from typing import Iterator

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindows

from data_pipeline import manifest as mf
from data_pipeline import mixing, records
from data_pipeline.chat_template import ChatEncoder
from data_pipeline.config import PipelineConfig
from data_pipeline.normalize import REJECTED, Conversation, Dropped, normalize
from data_pipeline.sources import ReadTask, RawItem, read_task

log = logging.getLogger(__name__)

DUPLICATE_ID = "duplicate_id"
TRUNCATED_TRAILING_PAIRS = "dropped_trailing_pairs_over_max_seq_len"
SPLIT_SHARDS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class EncodedExample:
    key: mixing.ExampleKey
    payload: bytes  # the serialized tf.train.Example
    tokens: int
    loss_tokens: int


def rejected_row(item: RawItem, source: str, dropped: Dropped) -> dict:
    row = {"source": source, "file": item.file, "number": item.number, "byte_offset": item.byte_offset,
           "reason": dropped.reason}
    if dropped.detail:
        row["detail"] = dropped.detail
    if item.split:
        row["split"] = item.split
    if item.error:
        row["raw"] = item.raw
    else:
        row["record"] = item.record
    return row


class ReadAndNormalize(beam.DoFn):
    """One read task → ((source, id), Conversation); rejected rows and the tally on tagged outputs."""
    REJECTED_ROWS, TALLY = "rejected", "tally"

    def __init__(self, reward_thresholds: dict[str, float]):
        self.reward_thresholds = reward_thresholds

    def threshold(self, task: str) -> float:
        return self.reward_thresholds.get(task, self.reward_thresholds["default"])

    def process(self, task: ReadTask) -> Iterator:
        tally = mf.Tally()
        for item in read_task(task):
            tally.read(task.source)
            result, repairs = normalize(item, task.source, task.kind, self.threshold)
            tally.repairs(task.source, repairs)
            if isinstance(result, Conversation):
                yield (result.source, result.id), result
                continue
            tally.drop(result.bucket, task.source, result.reason)
            if result.bucket == REJECTED:
                yield beam.pvalue.TaggedOutput(self.REJECTED_ROWS, rejected_row(item, task.source, result))
        yield beam.pvalue.TaggedOutput(self.TALLY, tally)


class KeepFirstOfDuplicates(beam.DoFn):
    """Of records sharing (source, id), keeps the first in input order (file, record number)."""

    def process(self, keyed) -> Iterator:
        _, convs = keyed
        convs = sorted(convs, key=lambda c: c.location)
        yield convs[0]
        if len(convs) > 1:
            tally = mf.Tally()
            for dup in convs[1:]:
                tally.drop(mf.FILTERED, dup.source, DUPLICATE_ID)
            yield beam.pvalue.TaggedOutput("tally", tally)


class Encode(beam.DoFn):
    """A batch of conversations → EncodedExamples, one batched call of the fast tokenizer."""

    def __init__(self, tokenizer: tuple[str, int, int], max_seq_len: int, system_prompt: str):
        self.tokenizer, self.max_seq_len, self.system_prompt = tokenizer, max_seq_len, system_prompt
        self.encoder = None

    def setup(self):
        self.encoder = ChatEncoder.from_serialized(*self.tokenizer, max_seq_len=self.max_seq_len)

    def process(self, batch: list[Conversation]) -> Iterator:
        tally = mf.Tally()
        encoded = self.encoder.encode_batch([(c.pairs, c.system or self.system_prompt) for c in batch])
        for conv, enc in zip(batch, encoded):
            if isinstance(enc, str):
                tally.drop(mf.FILTERED, conv.source, enc)
                continue
            if enc.pairs_dropped:
                tally.repairs(conv.source, [TRUNCATED_TRAILING_PAIRS])
            record = records.Record(enc.input_ids, enc.loss_mask, conv.kind, conv.task, conv.id)
            key = mixing.ExampleKey(conv.source, conv.kind, conv.task, conv.id)
            yield EncodedExample(key, records.encode_example(record), len(enc.input_ids), int(enc.loss_mask.sum()))
        yield beam.pvalue.TaggedOutput("tally", tally)


class Place(beam.DoFn):
    """Applies the plan: drops examples the mix does not draw, assigns split and shard, orders by hash."""

    def __init__(self, seed: int, shard_counts: dict[str, int]):
        self.seed, self.shard_counts = seed, shard_counts

    def start_bundle(self):
        self.tally = mf.Tally()

    def process(self, example: EncodedExample, plan: dict) -> Iterator:
        key = example.key
        if not mixing.is_selected(plan["mix_threshold"], self.seed, key):
            self.tally.drop(mf.FILTERED, key.source, mixing.NOT_SAMPLED)
            return
        self.tally.kept(key.source, key.task)
        split = mixing.split_of(plan, key)
        shard = mixing.shard_of(self.seed, key, self.shard_counts[split])
        yield (split, shard), (mixing.order_key(self.seed, key), example.payload, example.tokens, example.loss_tokens)

    def finish_bundle(self):
        yield beam.pvalue.TaggedOutput("tally", GlobalWindows.windowed_value(self.tally))


class WriteShard(beam.DoFn):
    def __init__(self, output: str, shard_counts: dict[str, int]):
        self.output, self.shard_counts = output, shard_counts

    def process(self, keyed) -> Iterator[dict]:
        import fsspec

        (split, index), values = keyed
        rows = sorted((v for v in values if v is not None), key=lambda v: v[0])
        data = b"".join(records.frame_record(payload) for _, payload, _, _ in rows)
        name = records.shard_filename(split, index, self.shard_counts[split])
        with fsspec.open(posixpath.join(self.output, name), "wb") as f:
            f.write(data)
        yield {"split": split, "index": index, "name": name, "examples": len(rows), "bytes": len(data),
               "tokens": sum(r[2] for r in rows), "loss_tokens": sum(r[3] for r in rows)}


def write_rejected(keyed, output: str) -> int:
    import fsspec

    rows = sorted((r for r in keyed[1] if r is not None), key=lambda r: (r["source"], r["file"], r["number"]))
    with fsspec.open(posixpath.join(output, records.REJECTED_NAME), "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=repr) + "\n")
    return len(rows)


def write_manifest(_, *, output: str, config: dict, tokenizer: dict, sources: dict[str, str],
                   shard_counts: dict[str, int], tally, plan, shards, rejected_written) -> dict:
    import fsspec

    manifest = mf.build_manifest(config=config, tokenizer=tokenizer, tally=tally, sources=sources, plan=plan,
                                 shards=shards, shard_counts=shard_counts, rejected_written=rejected_written)
    for name, content in ((mf.TFDS_FEATURES, mf.tfds_features()),
                          (mf.TFDS_DATASET_INFO, mf.tfds_dataset_info(manifest))):
        with fsspec.open(posixpath.join(output, name), "w") as f:
            f.write(mf.dumps(content))
    with fsspec.open(posixpath.join(output, records.MANIFEST_NAME), "w") as f:  # last: marks a complete build
        f.write(mf.dumps(manifest))
    return manifest


class SumTallies(beam.CombineFn):
    def create_accumulator(self):
        return mf.Tally()

    def add_input(self, acc, tally):
        acc.update(tally)
        return acc

    def merge_accumulators(self, accs):
        out = mf.Tally()
        for acc in accs:
            out.update(acc)
        return out

    def extract_output(self, acc):
        return acc


def shard_counts(cfg: PipelineConfig) -> dict[str, int]:
    return {"train": cfg.num_shards, "validation": cfg.num_validation_shards}


def build_graph(p: beam.Pipeline, cfg: PipelineConfig, read_tasks: list[ReadTask], *,
                tokenizer: tuple[str, int, int], tokenizer_info: dict) -> None:
    """Adds the whole pipeline to `p`; running it writes shards, rejected.jsonl and manifest.json.
    `tokenizer`: `chat_template.serialize_tokenizer(...)` (workers need neither transformers nor the files)."""
    counts = shard_counts(cfg)
    sources = {s.name: "agent" for s in cfg.agent} | {s.name: "general" for s in cfg.general}
    weights = dict(zip([s.name for s in cfg.general], cfg.general_weights)) if cfg.general_weights else None

    read = (p | "ReadTasks" >> beam.Create(read_tasks) | "SpreadTasks" >> beam.Reshuffle()
            | "ReadAndNormalize" >> beam.ParDo(ReadAndNormalize(cfg.reward_thresholds)).with_outputs(
                ReadAndNormalize.REJECTED_ROWS, ReadAndNormalize.TALLY, main="conversations"))
    unique = (read.conversations | "GroupById" >> beam.GroupByKey()
              | "KeepFirst" >> beam.ParDo(KeepFirstOfDuplicates()).with_outputs("tally", main="conversations"))
    encoded = (unique.conversations
               | "Batch" >> beam.BatchElements(min_batch_size=8, max_batch_size=cfg.tokenize_batch_size)
               | "Encode" >> beam.ParDo(Encode(tokenizer, cfg.max_seq_len, cfg.system_prompt))
               .with_outputs("tally", main="examples"))
    plan = (encoded.examples | "Keys" >> beam.Map(lambda e: e.key)
            | "GatherKeys" >> beam.combiners.ToList()
            | "Plan" >> beam.Map(lambda keys: mixing.make_plan(
                keys, seed=cfg.seed, eta=cfg.eta, general_weights=weights,
                validation_fraction=cfg.validation_fraction, agent_sources=[s.name for s in cfg.agent],
                general_sources=[s.name for s in cfg.general])))
    placed = (encoded.examples | "Place" >> beam.ParDo(Place(cfg.seed, counts), beam.pvalue.AsSingleton(plan))
              .with_outputs("tally", main="placed"))
    every_shard = p | "AllShards" >> beam.Create([((split, i), None) for split, n in counts.items() for i in range(n)])
    shards = ((placed.placed, every_shard) | "WithEmptyShards" >> beam.Flatten()
              | "GroupByShard" >> beam.GroupByKey()
              | "WriteShard" >> beam.ParDo(WriteShard(cfg.output, counts)))
    rejected_written = ((read[ReadAndNormalize.REJECTED_ROWS] | "KeyRejected" >> beam.Map(lambda r: (None, r)),
                         p | "RejectedFile" >> beam.Create([(None, None)]))  # written even when empty
                        | "FlattenRejected" >> beam.Flatten()
                        | "GatherRejected" >> beam.GroupByKey()
                        | "WriteRejected" >> beam.Map(write_rejected, output=cfg.output))
    rejected_count = rejected_written | "CountRejected" >> beam.CombineGlobally(sum)
    tally = ((read[ReadAndNormalize.TALLY], unique.tally, encoded.tally, placed.tally)
             | "FlattenTallies" >> beam.Flatten() | "SumTallies" >> beam.CombineGlobally(SumTallies()))
    _ = (p | "Once" >> beam.Create([None])
         | "WriteManifest" >> beam.Map(
             write_manifest, output=cfg.output, config=manifest_config(cfg), tokenizer=tokenizer_info,
             sources=sources, shard_counts=counts, tally=beam.pvalue.AsSingleton(tally),
             plan=beam.pvalue.AsSingleton(plan), shards=beam.pvalue.AsList(shards),
             rejected_written=beam.pvalue.AsSingleton(rejected_count)))


def manifest_config(cfg: PipelineConfig) -> dict:
    return json.loads(json.dumps(cfg.to_dict()))

