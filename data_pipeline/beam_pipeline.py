"""The Apache Beam graph: read → (spread) → parse, normalise, tokenize → plan → place → write shards + manifest.

    ReadTasks ─► ReadBatches ─GroupByKey─► Encode ─┬─ rows ─────► Place ◄═══════════ plan ═══╗ (side input)
                 (spreads the batches)             │              ─► GroupByKey(split, shard) ─► WriteShard ─► shard stats
                                                   └─ summaries ─► CombineGlobally ─► Plan ══╝               ║ (side input)
                                                      (keys, tally,  (writes rejected.jsonl)  ─► WriteManifest ◄╝
                                                       rejected rows)

Elements are batches of records as plain tuples of str/bytes/int, not single records or dataclasses: Beam's
cost per element (coder, gRPC between worker processes, DoFn dispatch) is then paid once per few hundred
conversations, no element is pickled, and each tokenizer call gets a whole batch. Reading is sequential per
file (streamed); everything after it runs on all workers. Only the records' keys, the tallies and the
rejected rows travel to the single step that makes the global decisions; the plan then also knows what
Place will keep, so the whole graph runs in seven fused stages.

Every decision that could depend on the runner is a function of (seed, source, id) (see mixing.py), and
each shard's records are sorted by a hash before writing, so the output bytes are the same on any runner
with any number of workers. Shards are written by us through fsspec (local or gs://).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import posixpath
import threading
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


def raw_batch(task: ReadTask, items: list[RawItem]) -> tuple:
    """(task fields, [item fields, ...]): a batch of raw records in a form Beam encodes without pickling."""
    return ((task.source, task.kind, task.path, task.format, task.split, task.rel_path),
            [(i.record, i.file, i.number, i.byte_offset, i.split, i.error, i.raw, i.line, i.rel_path) for i in items])


def batch_key(task: ReadTask, index: int) -> tuple[str, str, str, int]:
    """A key unique to each batch (the same file may be read by two sources): grouping by it spreads the batches
    over the workers (a reshuffle)."""
    return task.source, task.path, task.split or "", index


def unpack_raw_batch(batch: tuple) -> tuple[ReadTask, list[RawItem]]:
    task, items = batch
    return ReadTask(*task), [RawItem(*fields) for fields in items]


class EncodedRow(NamedTuple):
    """One encoded conversation. Only str/bytes/int fields; it travels as a plain tuple."""
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


KEY_FIELDS = 6  # EncodedRow[:6] = (source, kind, task, id, file, number): what the plan needs of a row
STAGING_DIR = ".build-staging"  # OUTPUT/.build-staging: files for the workers during a run, removed after it


class StagedTokenizer(NamedTuple):
    """The fast tokenizer as the workers get it: its JSON in a file every worker can read (under OUTPUT), so
    the workers import neither transformers nor convert tokenizer files. Not inside the Encode DoFn: Beam
    pickles (bz2) and unpickles a DoFn a dozen times per run, which for Llama 2's 1.3 MB of JSON was ~2 s."""
    path: str
    sha256: str
    bos_id: int
    eos_id: int

    @classmethod
    def write(cls, serialized: tuple[str, int, int], output: str) -> "StagedTokenizer":
        """Stages `chat_template.serialize_tokenizer(...)` in OUTPUT/.build-staging."""
        import fsspec

        text, bos_id, eos_id = serialized
        data = text.encode()
        path = posixpath.join(output, STAGING_DIR, "tokenizer.json")
        fs, local = fsspec.core.url_to_fs(path)
        fs.makedirs(posixpath.dirname(local), exist_ok=True)
        with fs.open(local, "wb") as f:
            f.write(data)
        return cls(path, hashlib.sha256(data).hexdigest(), bos_id, eos_id)

    def encoder(self, max_seq_len: int) -> ChatEncoder:
        """The ChatEncoder, built once per process (worker threads share it: the tokenizer encodes from
        several threads at once, and building Llama 2's takes 0.3 s of the GIL)."""
        import fsspec

        with _ENCODERS_LOCK:
            key = (self.sha256, self.bos_id, self.eos_id, max_seq_len)
            if key not in _ENCODERS:
                with fsspec.open(self.path, "rb") as f:
                    data = f.read()
                if hashlib.sha256(data).hexdigest() != self.sha256:
                    raise RuntimeError(f"{self.path} is not the tokenizer this run staged: is another build "
                                       "writing to the same output directory?")
                _ENCODERS.clear()  # only the current run's (a process may run many builds)
                _ENCODERS[key] = ChatEncoder.from_serialized(data.decode(), self.bos_id, self.eos_id,
                                                             max_seq_len=max_seq_len)
            return _ENCODERS[key]


_ENCODERS: dict[tuple, ChatEncoder] = {}
_ENCODERS_LOCK = threading.Lock()


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
    """A read task → raw batches of up to `batch_size` records (streamed, so a file is never held whole).
    A task without records still gives one (empty) batch, so that every task is accounted for."""

    def __init__(self, batch_size: int, progress_every_s: float = 15.0):
        self.batch_size, self.progress_every_s = batch_size, progress_every_s

    def setup(self):
        self.log = worker_progress_log()

    def process(self, task: ReadTask) -> Iterator[tuple]:
        """Yields (batch_key, raw_batch)."""
        name = task.path if task.split is None else f"{task.path} [{task.split}]"
        start = last = time.monotonic()
        batch, count = [], 0
        for item in read_task(task):
            batch.append(item)
            count += 1
            if len(batch) == self.batch_size:
                yield batch_key(task, count), raw_batch(task, batch)
                batch = []
                if time.monotonic() - last > self.progress_every_s:
                    last = time.monotonic()
                    self.log.info("reading %s: %d records so far", name, count)
        if batch or not count:
            yield batch_key(task, count), raw_batch(task, batch)
        self.log.info("read %d records from %s in %.1f s", count, name, time.monotonic() - start)


class Encode(beam.DoFn):
    """A raw batch → its encoded rows (one list element): parse, validate/normalise, reward filter, then one
    batched call of the fast tokenizer for the chat template and loss mask. Also a summary of the batch
    for the plan: (the rows' keys, the tally, the rejected rows)."""
    SUMMARY = "summary"

    def __init__(self, tokenizer: StagedTokenizer, max_seq_len: int, system_prompt: str,
                 reward_thresholds: dict[str, float]):
        self.tokenizer, self.max_seq_len, self.system_prompt = tokenizer, max_seq_len, system_prompt
        self.reward_thresholds = reward_thresholds
        self.encoder = None

    def setup(self):
        self.encoder = self.tokenizer.encoder(self.max_seq_len)
        self.log, self.last_log, self.done = worker_progress_log(), time.monotonic(), [0, 0]

    def progress(self, conversations: int, tokens: int) -> None:
        self.done[0] += conversations
        self.done[1] += tokens
        if time.monotonic() - self.last_log > 15.0:
            self.last_log = time.monotonic()
            self.log.info("this worker encoded %d conversations (%d tokens) so far", *self.done)

    def threshold(self, task: str) -> float:
        return self.reward_thresholds.get(task, self.reward_thresholds["default"])

    def process(self, keyed_batch: tuple) -> Iterator:
        _, (batch,) = keyed_batch  # (batch_key, [raw_batch]): from the GroupByKey that spreads batches
        task, items = unpack_raw_batch(batch)
        source, kind = task.source, task.kind
        tally, rejected, convs = mf.Tally(), [], []
        tally.read(source, len(items))
        for item in items:
            item = item.parsed()
            result, repairs = normalize(item, source, kind, self.threshold)
            tally.repairs(source, repairs)
            if isinstance(result, Conversation):
                convs.append(result)
                continue
            tally.drop(result.bucket, source, result.reason)
            if result.bucket == REJECTED:
                rejected.append(rejected_row(item, source, result))
        rows, tokens = [], 0
        encoded = self.encoder.encode_batch([(c.pairs, c.system or self.system_prompt) for c in convs])
        for conv, enc in zip(convs, encoded):
            if isinstance(enc, str):
                tally.drop(mf.FILTERED, source, enc)
                continue
            if enc.pairs_dropped:
                tally.repairs(source, [TRUNCATED_TRAILING_PAIRS])
            payload = records.encode_fields(enc.ids, enc.mask, kind, conv.task, conv.id)
            rows.append((source, kind, conv.task, conv.id, conv.file, conv.number, payload,
                         len(enc.ids), enc.mask.count(1)))
            tokens += len(enc.ids)
        RECORDS_READ.inc(len(items))
        CONVERSATIONS_ENCODED.inc(len(rows))
        TOKENS_ENCODED.inc(tokens)
        self.progress(len(rows), tokens)
        if rows:
            yield rows
        yield beam.pvalue.TaggedOutput(self.SUMMARY, ([row[:KEY_FIELDS] for row in rows], tally, rejected))


class GatherSummaries(beam.CombineFn):
    """All batch summaries → one: keys and rejected rows concatenated, tallies summed."""

    def create_accumulator(self):
        return [], mf.Tally(), []

    def add_input(self, acc, summary):
        acc[0].extend(summary[0])
        acc[1].update(summary[1])
        acc[2].extend(summary[2])
        return acc

    def merge_accumulators(self, accs):
        out = self.create_accumulator()
        for acc in accs:
            self.add_input(out, acc)
        return out

    def extract_output(self, acc):
        return acc


def dropped_by_plan(plan: dict, key: mixing.ExampleKey, location: tuple[str, int]) -> str | None:
    """Why the plan leaves an encoded example out (a duplicate id, not drawn for the mix); None = kept."""
    if (key.source, key.id, *location) in plan["duplicates"]:
        return mixing.DUPLICATE_ID
    if not mixing.is_selected(plan["mix_threshold"], plan["seed"], key):
        return mixing.NOT_SAMPLED
    return None


def make_plan(summary: tuple, cfg: PipelineConfig) -> dict:
    """The single global step: the plan from every row's key, with the run's full tally (the encoders'
    plus what Place will keep or drop) and rejected.jsonl written (`rejected_written` rows)."""
    keys, tally, rejected = summary
    plan = plan_from_keys(keys, cfg)
    tally = mf.Tally(tally)
    for k in keys:
        key = mixing.ExampleKey(*k[:4])
        reason = dropped_by_plan(plan, key, k[4:KEY_FIELDS])
        if reason:
            tally.drop(mf.FILTERED, key.source, reason)
        else:
            tally.kept(key.source, key.task)
    plan["tally"] = tally
    plan["rejected_written"] = write_rejected(rejected, cfg.output)
    return plan


class Place(beam.DoFn):
    """Applies the plan to a batch: drops duplicates and examples the mix does not draw, assigns split and
    shard; emits ((split, shard), rows) per shard the batch touches."""

    def __init__(self, shard_counts: dict[str, int]):
        self.shard_counts = shard_counts

    def process(self, rows: list[tuple], plan: dict) -> Iterator:
        seed = plan["seed"]
        shards = collections.defaultdict(list)
        for row in map(EncodedRow._make, rows):
            key = row.key
            if dropped_by_plan(plan, key, (row.file, row.number)):
                continue
            split = mixing.split_of(plan, key)
            shard = mixing.shard_of(seed, key, self.shard_counts[split])
            shards[(split, shard)].append((mixing.order_key(seed, key), row.payload, row.tokens, row.loss_tokens))
        yield from shards.items()


class WriteShard(beam.DoFn):
    def __init__(self, output: str, shard_counts: dict[str, int]):
        self.output, self.shard_counts = output, shard_counts

    def process(self, keyed) -> Iterator[dict]:
        (split, index), groups = keyed
        rows = sorted((row for group in groups for row in group), key=lambda r: r[0])
        stats = write_shard(self.output, split, index, self.shard_counts[split], [r[1:] for r in rows])
        EXAMPLES_WRITTEN.inc(len(rows))
        yield stats


def write_shard(output: str, split: str, index: int, count: int, rows: list[tuple[bytes, int, int]]) -> dict:
    """Writes one shard of (payload, tokens, loss_tokens) rows; returns its stats for the manifest."""
    import fsspec

    data = b"".join(records.frame_record(payload) for payload, _, _ in rows)
    name = records.shard_filename(split, index, count)
    with fsspec.open(posixpath.join(output, name), "wb") as f:
        f.write(data)
    return {"split": split, "index": index, "name": name, "examples": len(rows), "bytes": len(data),
            "tokens": sum(r[1] for r in rows), "loss_tokens": sum(r[2] for r in rows)}


def write_rejected(rows: list[dict], output: str) -> int:
    import fsspec

    rows = sorted(rows, key=lambda r: (r["source"], r["file"], r["number"]))
    with fsspec.open(posixpath.join(output, records.REJECTED_NAME), "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=repr) + "\n")
    return len(rows)


def write_manifest(plan: dict, *, output: str, config: dict, tokenizer: dict, sources: dict[str, str],
                   shard_counts: dict[str, int], shards: list[dict]) -> dict:
    """Writes the shards no example went to (empty files: every shard exists), the TFDS metadata and, last,
    manifest.json."""
    import fsspec

    written = {(s["split"], s["index"]) for s in shards}
    shards = list(shards) + [write_shard(output, split, i, n, []) for split, n in shard_counts.items()
                             for i in range(n) if (split, i) not in written]
    manifest = mf.build_manifest(config=config, tokenizer=tokenizer, tally=plan["tally"], sources=sources,
                                 plan=plan, shards=shards, shard_counts=shard_counts,
                                 rejected_written=plan["rejected_written"])
    for name, content in ((mf.TFDS_FEATURES, mf.tfds_features()),
                          (mf.TFDS_DATASET_INFO, mf.tfds_dataset_info(manifest))):
        with fsspec.open(posixpath.join(output, name), "w") as f:
            f.write(mf.dumps(content))
    with fsspec.open(posixpath.join(output, records.MANIFEST_NAME), "w") as f:  # last: marks a complete build
        f.write(mf.dumps(manifest))
    return manifest


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
                tokenizer: StagedTokenizer, tokenizer_info: dict) -> None:
    """Adds the whole pipeline to `p`; running it writes shards, rejected.jsonl and manifest.json."""
    if not read_tasks:
        raise ValueError("no input: configure at least one agent or general source")
    counts = shard_counts(cfg)
    sources = {s.name: "agent" for s in cfg.agent} | {s.name: "general" for s in cfg.general}

    encoded = (p | "ReadTasks" >> beam.Create(read_tasks)  # (Create spreads several tasks over the workers)
               | "ReadBatches" >> beam.ParDo(ReadBatches(cfg.tokenize_batch_size))
               | "SpreadBatches" >> beam.GroupByKey()
               | "Encode" >> beam.ParDo(Encode(tokenizer, cfg.max_seq_len, cfg.system_prompt, cfg.reward_thresholds))
               .with_outputs(Encode.SUMMARY, main="rows"))
    plan = (encoded[Encode.SUMMARY] | "GatherSummaries" >> beam.CombineGlobally(GatherSummaries()).without_defaults()
            | "Plan" >> beam.Map(make_plan, cfg=cfg))
    shards = (encoded.rows | "Place" >> beam.ParDo(Place(counts), beam.pvalue.AsSingleton(plan))
              | "GroupByShard" >> beam.GroupByKey()
              | "WriteShard" >> beam.ParDo(WriteShard(cfg.output, counts)))
    _ = plan | "WriteManifest" >> beam.Map(
        write_manifest, output=cfg.output, config=manifest_config(cfg), tokenizer=tokenizer_info,
        sources=sources, shard_counts=counts, shards=beam.pvalue.AsList(shards))


def manifest_config(cfg: PipelineConfig) -> dict:
    return json.loads(json.dumps(cfg.to_dict()))
