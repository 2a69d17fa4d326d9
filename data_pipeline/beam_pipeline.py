"""The Apache Beam graph: read → (spread) → parse, normalise, tokenize → plan → place → write shards + manifest.

    ReadTasks ─► ReadBatches ─Reshuffle─► Encode ─┬─► keys ─► CombineGlobally(concat) ─► make_plan ═╗ (side input)
                                                  │                                                 ║
                                                  └─► Place (drops duplicates and undrawn examples) ◄╝
                                                        ─► GroupByKey(split, shard) ─► WriteShard ─► shard stats
    tallies (every step) ─► CombineGlobally(sum) ═╗   rejected rows ─► WriteRejected (one file, sorted)
                                                  ╚═► WriteManifest (after every shard is written)

Elements are batches of records, not records: Beam's cost per element (pickling, gRPC between worker
processes, DoFn dispatch) is then paid once per few hundred conversations, and each tokenizer call
gets a whole batch. Reading is sequential per file (streamed); everything after it runs on all workers.

Every decision that could depend on the runner is a function of (seed, source, id) (see mixing.py), and
each shard's records are sorted by a hash before writing, so the output bytes are the same on any runner
with any number of workers. Shards are written by us through fsspec (local or gs://).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import posixpath
import time
from typing import Iterator, NamedTuple

import apache_beam as beam

from data_pipeline import manifest as mf
from data_pipeline import mixing, records
from data_pipeline.chat_template import ChatEncoder
from data_pipeline.config import PipelineConfig
from data_pipeline.normalize import REJECTED, Conversation, Dropped, normalize
from data_pipeline.sources import RawItem, ReadTask, read_task

log = logging.getLogger(__name__)

TRUNCATED_TRAILING_PAIRS = "dropped_trailing_pairs_over_max_seq_len"
# Live progress in the Dataflow UI (and the runner's metrics); the manifest has the exact final accounting.
RECORDS_READ = beam.metrics.Metrics.counter("data_pipeline", "records_read")
CONVERSATIONS_ENCODED = beam.metrics.Metrics.counter("data_pipeline", "conversations_encoded")
TOKENS_ENCODED = beam.metrics.Metrics.counter("data_pipeline", "tokens_encoded")
EXAMPLES_WRITTEN = beam.metrics.Metrics.counter("data_pipeline", "examples_written")


@dataclasses.dataclass(frozen=True)
class RawBatch:
    task: ReadTask
    items: list[RawItem]


class EncodedRow(NamedTuple):
    """One encoded conversation. Only str/bytes/int fields, so Beam's coder encodes it without pickling."""
    source: str
    kind: str
    task: str
    id: str
    file: str  # (file, number): the record's place in the input; decides which of duplicate ids is kept
    number: int
    payload: bytes  # the serialized tf.train.Example
    tokens: int
    loss_tokens: int

    @property
    def key(self) -> mixing.ExampleKey:
        return mixing.ExampleKey(self.source, self.kind, self.task, self.id)


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


def worker_progress_log() -> logging.Logger:
    """A logger that writes straight to the worker's stderr (the terminal, for the local runner; the worker
    log on Dataflow) instead of through Beam's log relay."""
    logger = logging.getLogger("data_pipeline.progress")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s INFO data_pipeline: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


class ReadBatches(beam.DoFn):
    """A read task → RawBatches of up to `batch_size` records (streamed, so a file is never held whole)."""

    def __init__(self, batch_size: int, progress_every_s: float = 15.0):
        self.batch_size, self.progress_every_s = batch_size, progress_every_s

    def setup(self):
        self.log = worker_progress_log()

    def process(self, task: ReadTask) -> Iterator[RawBatch]:
        name = task.path if task.split is None else f"{task.path} [{task.split}]"
        start = last = time.monotonic()
        batch, count = [], 0
        for item in read_task(task):
            batch.append(item)
            count += 1
            if len(batch) == self.batch_size:
                yield RawBatch(task, batch)
                batch = []
                if time.monotonic() - last > self.progress_every_s:
                    last = time.monotonic()
                    self.log.info("reading %s: %d records so far", name, count)
        if batch:
            yield RawBatch(task, batch)
        self.log.info("read %d records from %s in %.1f s", count, name, time.monotonic() - start)


class Encode(beam.DoFn):
    """A RawBatch → its EncodedRows (one list element): parse, validate/normalise, reward filter, then one
    batched call of the fast tokenizer for the chat template and loss mask. Rejected rows and the tally go
    to tagged outputs."""
    REJECTED_ROWS, TALLY = "rejected", "tally"

    def __init__(self, tokenizer: tuple[str, int, int], max_seq_len: int, system_prompt: str,
                 reward_thresholds: dict[str, float]):
        self.tokenizer, self.max_seq_len, self.system_prompt = tokenizer, max_seq_len, system_prompt
        self.reward_thresholds = reward_thresholds
        self.encoder = None

    def setup(self):
        self.encoder = ChatEncoder.from_serialized(*self.tokenizer, max_seq_len=self.max_seq_len)
        self.log, self.last_log, self.done = worker_progress_log(), time.monotonic(), [0, 0]

    def progress(self, conversations: int, tokens: int) -> None:
        self.done[0] += conversations
        self.done[1] += tokens
        if time.monotonic() - self.last_log > 15.0:
            self.last_log = time.monotonic()
            self.log.info("this worker encoded %d conversations (%d tokens) so far", *self.done)

    def threshold(self, task: str) -> float:
        return self.reward_thresholds.get(task, self.reward_thresholds["default"])

    def process(self, batch: RawBatch) -> Iterator:
        source, kind = batch.task.source, batch.task.kind
        tally, rejected, convs = mf.Tally(), [], []
        tally.read(source, len(batch.items))
        for item in batch.items:
            item = item.parsed()
            result, repairs = normalize(item, source, kind, self.threshold)
            tally.repairs(source, repairs)
            if isinstance(result, Conversation):
                convs.append(result)
                continue
            tally.drop(result.bucket, source, result.reason)
            if result.bucket == REJECTED:
                rejected.append(rejected_row(item, source, result))
        rows = []
        encoded = self.encoder.encode_batch([(c.pairs, c.system or self.system_prompt) for c in convs])
        for conv, enc in zip(convs, encoded):
            if isinstance(enc, str):
                tally.drop(mf.FILTERED, source, enc)
                continue
            if enc.pairs_dropped:
                tally.repairs(source, [TRUNCATED_TRAILING_PAIRS])
            payload = records.encode_fields(enc.ids, enc.mask, kind, conv.task, conv.id)
            rows.append(tuple(EncodedRow(source, kind, conv.task, conv.id, conv.file, conv.number, payload,
                                         len(enc.ids), enc.mask.count(1))))
        tokens = sum(row[EncodedRow._fields.index("tokens")] for row in rows)
        RECORDS_READ.inc(len(batch.items))
        CONVERSATIONS_ENCODED.inc(len(rows))
        TOKENS_ENCODED.inc(tokens)
        self.progress(len(rows), tokens)
        yield rows
        if rejected:
            yield beam.pvalue.TaggedOutput(self.REJECTED_ROWS, rejected)
        yield beam.pvalue.TaggedOutput(self.TALLY, tally)


class Place(beam.DoFn):
    """Applies the plan to a batch: drops duplicates and examples the mix does not draw, assigns split and
    shard; emits ((split, shard), rows) per shard the batch touches."""

    def __init__(self, shard_counts: dict[str, int]):
        self.shard_counts = shard_counts

    def process(self, rows: list[tuple], plan: dict) -> Iterator:
        seed, tally = plan["seed"], mf.Tally()
        shards = collections.defaultdict(list)
        for row in map(EncodedRow._make, rows):
            key = row.key
            if (key.source, key.id, row.file, row.number) in plan["duplicates"]:
                tally.drop(mf.FILTERED, key.source, mixing.DUPLICATE_ID)
                continue
            if not mixing.is_selected(plan["mix_threshold"], seed, key):
                tally.drop(mf.FILTERED, key.source, mixing.NOT_SAMPLED)
                continue
            tally.kept(key.source, key.task)
            split = mixing.split_of(plan, key)
            shard = mixing.shard_of(seed, key, self.shard_counts[split])
            shards[(split, shard)].append((mixing.order_key(seed, key), row.payload, row.tokens, row.loss_tokens))
        yield from shards.items()
        yield beam.pvalue.TaggedOutput("tally", tally)


class WriteShard(beam.DoFn):
    def __init__(self, output: str, shard_counts: dict[str, int]):
        self.output, self.shard_counts = output, shard_counts

    def process(self, keyed) -> Iterator[dict]:
        import fsspec

        (split, index), groups = keyed
        rows = sorted((row for group in groups for row in group), key=lambda r: r[0])
        data = b"".join(records.frame_record(payload) for _, payload, _, _ in rows)
        name = records.shard_filename(split, index, self.shard_counts[split])
        with fsspec.open(posixpath.join(self.output, name), "wb") as f:
            f.write(data)
        EXAMPLES_WRITTEN.inc(len(rows))
        yield {"split": split, "index": index, "name": name, "examples": len(rows), "bytes": len(data),
               "tokens": sum(r[2] for r in rows), "loss_tokens": sum(r[3] for r in rows)}


def write_rejected(keyed, output: str) -> int:
    import fsspec

    rows = sorted((r for group in keyed[1] for r in group), key=lambda r: (r["source"], r["file"], r["number"]))
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


class ConcatLists(beam.CombineFn):
    def create_accumulator(self):
        return []

    def add_input(self, acc, items):
        acc.extend(items)
        return acc

    def merge_accumulators(self, accs):
        return [x for acc in accs for x in acc]

    def extract_output(self, acc):
        return acc


def plan_from_keys(keys: list[tuple], cfg: PipelineConfig) -> dict:
    """The plan from every row's (source, kind, task, id, file, number)."""
    keys, duplicates = mixing.drop_duplicates((mixing.ExampleKey(*k[:4]), k[4:]) for k in keys)
    weights = dict(zip([s.name for s in cfg.general], cfg.general_weights)) if cfg.general_weights else None
    return mixing.make_plan(keys, seed=cfg.seed, eta=cfg.eta, general_weights=weights,
                            validation_fraction=cfg.validation_fraction, agent_sources=[s.name for s in cfg.agent],
                            general_sources=[s.name for s in cfg.general], duplicates=duplicates)


def shard_counts(cfg: PipelineConfig) -> dict[str, int]:
    return {"train": cfg.num_shards, "validation": cfg.num_validation_shards}


def build_graph(p: beam.Pipeline, cfg: PipelineConfig, read_tasks: list[ReadTask], *,
                tokenizer: tuple[str, int, int], tokenizer_info: dict) -> None:
    """Adds the whole pipeline to `p`; running it writes shards, rejected.jsonl and manifest.json.
    `tokenizer`: `chat_template.serialize_tokenizer(...)` (workers need neither transformers nor the files)."""
    counts = shard_counts(cfg)
    sources = {s.name: "agent" for s in cfg.agent} | {s.name: "general" for s in cfg.general}

    encoded = (p | "ReadTasks" >> beam.Create(read_tasks) | "SpreadTasks" >> beam.Reshuffle()
               | "ReadBatches" >> beam.ParDo(ReadBatches(cfg.tokenize_batch_size)) | "SpreadBatches" >> beam.Reshuffle()
               | "Encode" >> beam.ParDo(Encode(tokenizer, cfg.max_seq_len, cfg.system_prompt, cfg.reward_thresholds))
               .with_outputs(Encode.REJECTED_ROWS, Encode.TALLY, main="rows"))
    plan = (encoded.rows | "Keys" >> beam.Map(lambda rows: [r[:6] for r in rows])
            | "GatherKeys" >> beam.CombineGlobally(ConcatLists())
            | "Plan" >> beam.Map(plan_from_keys, cfg=cfg))
    placed = (encoded.rows | "Place" >> beam.ParDo(Place(counts), beam.pvalue.AsSingleton(plan))
              .with_outputs("tally", main="placed"))
    every_shard = p | "AllShards" >> beam.Create([((split, i), []) for split, n in counts.items() for i in range(n)])
    shards = ((placed.placed, every_shard) | "WithEmptyShards" >> beam.Flatten()
              | "GroupByShard" >> beam.GroupByKey()
              | "WriteShard" >> beam.ParDo(WriteShard(cfg.output, counts)))
    rejected_written = ((encoded[Encode.REJECTED_ROWS] | "KeyRejected" >> beam.Map(lambda rows: (None, rows)),
                         p | "RejectedFile" >> beam.Create([(None, [])]))  # written even when empty
                        | "FlattenRejected" >> beam.Flatten()
                        | "GatherRejected" >> beam.GroupByKey()
                        | "WriteRejected" >> beam.Map(write_rejected, output=cfg.output))
    rejected_count = rejected_written | "CountRejected" >> beam.CombineGlobally(sum)
    tally = ((encoded[Encode.TALLY], placed.tally)
             | "FlattenTallies" >> beam.Flatten() | "SumTallies" >> beam.CombineGlobally(SumTallies()))
    _ = (p | "Once" >> beam.Create([None])
         | "WriteManifest" >> beam.Map(
             write_manifest, output=cfg.output, config=manifest_config(cfg), tokenizer=tokenizer_info,
             sources=sources, shard_counts=counts, tally=beam.pvalue.AsSingleton(tally),
             plan=beam.pvalue.AsSingleton(plan), shards=beam.pvalue.AsList(shards),
             rejected_written=beam.pvalue.AsSingleton(rejected_count)))


def manifest_config(cfg: PipelineConfig) -> dict:
    return json.loads(json.dumps(cfg.to_dict()))
