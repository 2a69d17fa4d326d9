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

On the local runner the data itself does not travel through Beam: each raw batch, each batch's encoded payloads and each
batch's payloads for one shard are written to a file under STAGING/.build-staging/spill, and the elements
carry the file's name (with the rows' keys and sort keys). Beam's local runner keeps every stage's output
in memory, so memory then holds the keys of all records plus one shard per writing worker, not the input
and the output (docs/data_pipeline.md, "Memory"). On Dataflow, whose shuffle keeps data on disk, the
batches travel as they are (no small files on gs://).

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
import time
from typing import Iterator, NamedTuple

import apache_beam as beam
import fsspec

from data_pipeline import manifest as mf
from data_pipeline import mixing
from data_pipeline import progress as pg
from data_pipeline.formats import records
from data_pipeline.formats.hf_template import LLAMA2_MANIFEST_ENTRY, Rejection, TemplateSpec, staged_encoder
from data_pipeline.staging import STAGING_DIR, StagedTokenizer
from data_pipeline.config import PipelineConfig
from data_pipeline.normalize import AUTO, REJECTED, Conversation, Dropped, normalize
from data_pipeline.sources import RawItem, ReadPosition, ReadTask, read_task
from data_pipeline.writers import write_manifest, write_rejected, write_shard

log = logging.getLogger(__name__)

TRUNCATED_TRAILING_PAIRS = "dropped_trailing_pairs_over_max_seq_len"
# Text of a special token (`</s>`, `<s>`, `<unk>`) in a message: training encodes it as plain text, but a Hugging
# Face client (apply_chat_template + the tokenizer) reads it as the token itself, e.g. an early end of sequence.
SPECIAL_TOKEN_TEXT = "special_token_text"
# Live progress in the Dataflow UI (and the runner's metrics); the manifest has the exact final accounting.
RECORDS_READ = beam.metrics.Metrics.counter("data_pipeline", "records_read")
CONVERSATIONS_ENCODED = beam.metrics.Metrics.counter("data_pipeline", "conversations_encoded")
TOKENS_ENCODED = beam.metrics.Metrics.counter("data_pipeline", "tokens_encoded")
EXAMPLES_WRITTEN = beam.metrics.Metrics.counter("data_pipeline", "examples_written")


def raw_batch(task: ReadTask, items: list[RawItem]) -> tuple:
    """(task fields, [item fields, ...]): a batch of raw records in a form Beam encodes without pickling."""
    return ((task.source, task.kind, task.path, task.format, task.split, task.rel_path),
            [(i.record, i.file, i.number, i.byte_offset, i.split, i.error, i.raw, i.line, i.rel_path) for i in items])


SPILL_CODER = beam.coders.FastPrimitivesCoder()  # (what Beam itself encodes these plain tuples with)


def spill_path(spill_dir: str, key: tuple, kind: str) -> str:
    """The file of one batch's spilled data: named by the batch key, so a retried bundle rewrites the same."""
    name = hashlib.blake2b(json.dumps(key).encode(), digest_size=16).hexdigest()
    return posixpath.join(spill_dir, kind, f"{name}.bin")


def write_spill(path: str, value) -> str:
    """Writes `value` (plain tuples/lists/dicts of str/bytes/numbers) to `path`; returns the path."""
    fs, local = fsspec.core.url_to_fs(path)
    fs.makedirs(posixpath.dirname(local), exist_ok=True)
    with fs.open(local, "wb") as f:
        f.write(SPILL_CODER.encode(value))
    return path


def read_spill(path: str):
    with fsspec.open(path, "rb") as f:
        return SPILL_CODER.decode(f.read())


def spill(spill_dir: str | None, key: tuple, kind: str, value):
    """What an element carries for `value`: the name of the file it is spilled to, or (spill_dir None) the
    value itself."""
    return value if spill_dir is None else write_spill(spill_path(spill_dir, key, kind), value)


def unspill(spill_dir: str | None, carried):
    return carried if spill_dir is None else read_spill(carried)


def batch_key(task: ReadTask, index: int) -> tuple[str, str, str, int]:
    """A key unique to each batch (the same file may be read by two sources): grouping by it spreads the batches
    over the workers (a reshuffle)."""
    return task.source, task.path, task.split or "", index


def unpack_raw_batch(batch: tuple) -> tuple[ReadTask, list[RawItem]]:
    task, items = batch
    return ReadTask(*task), [RawItem(*fields) for fields in items]


class RowKey(NamedTuple):
    """What the plan needs of an encoded conversation: its example key and its place in the input."""
    source: str
    kind: str
    task: str
    id: str
    file: str  # (file, number): the record's place in the input; decides which of duplicate ids is kept
    number: int

    @property
    def example(self) -> mixing.ExampleKey:
        return mixing.ExampleKey(self.source, self.kind, self.task, self.id)

    @property
    def location(self) -> tuple[str, int]:
        return self.file, self.number


class EncodedRow(NamedTuple):
    """One encoded conversation. Beam would pickle a NamedTuple, so it travels as a plain tuple (`plain()`,
    without its payload, which is spilled to a file) and is rebuilt with `EncodedRow.of`."""
    key: RowKey
    payload: bytes  # the serialized tf.train.Example
    tokens: int
    loss_tokens: int

    @classmethod
    def of(cls, fields: tuple, payload: bytes) -> "EncodedRow":
        key, tokens, loss_tokens = fields
        return cls(RowKey(*key), payload, tokens, loss_tokens)

    def plain(self) -> tuple:
        return tuple(self.key), self.tokens, self.loss_tokens


class ShardRow(NamedTuple):
    """An example placed in a shard: sorted by `order` before writing (plain tuple on the wire, as above)."""
    order: tuple
    payload: bytes
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
    A task without records still gives one (empty) batch, so that every task is accounted for. Also the
    task's record count (the COUNTS output: the encoders' total for their progress lines)."""
    COUNTS = "counts"

    def __init__(self, batch_size: int, spill_dir: str | None, progress_every_s: float = 15.0):
        self.batch_size, self.spill_dir, self.progress_every_s = batch_size, spill_dir, progress_every_s

    def spilled(self, task: ReadTask, count: int, batch: list[RawItem]) -> tuple:
        """(batch key, the raw batch or the file it was spilled to)."""
        key = batch_key(task, count)
        return key, spill(self.spill_dir, key, "raw", raw_batch(task, batch))

    def setup(self):
        self.log = worker_progress_log()

    def process(self, task: ReadTask) -> Iterator[tuple]:
        """Yields (batch_key, spill file of the raw_batch)."""
        name = task.path if task.split is None else f"{task.path} [{task.split}]"
        position = ReadPosition()
        progress = pg.Progress(self.log, f"reading {name}", every_s=self.progress_every_s)
        batch, count = [], 0
        for item in read_task(task, position):
            batch.append(item)
            count += 1
            if len(batch) == self.batch_size:
                yield self.spilled(task, count, batch)
                batch = []
                progress.what, progress.unit = f"reading {name} ({count:,} records so far)", position.unit
                progress.set(position.done, position.total)
        if batch or not count:
            yield self.spilled(task, count, batch)
        self.log.info("read %d records from %s in %.1f s", count, name, time.monotonic() - progress.start)
        yield beam.pvalue.TaggedOutput(self.COUNTS, count)


class Encode(beam.DoFn):
    """A raw batch → its encoded rows (one list element): parse, validate/normalise, reward filter, then one
    batched call of the fast tokenizer for the chat template and loss mask. Also a summary of the batch
    for the plan: (the rows' keys, the tally, the rejected rows)."""
    SUMMARY = "summary"

    def __init__(self, tokenizer: StagedTokenizer, max_seq_len: int, system_prompt: str | None,
                 reward_thresholds: dict[str, float], spill_dir: str | None,
                 template: TemplateSpec | None = None, special_tokens: dict[str, str] | None = None,
                 record_formats: dict[str, str] | None = None):
        """`template`: a Jinja chat template (hf_template.py, with the tokenizer's `special_tokens`); None =
        the Llama 2 template (chat_template.py). `record_formats`: source name → its record_format."""
        self.tokenizer, self.max_seq_len, self.system_prompt = tokenizer, max_seq_len, system_prompt
        self.record_formats = record_formats or {}
        self.reward_thresholds, self.spill_dir = reward_thresholds, spill_dir
        self.template, self.special_tokens = template, special_tokens or {}
        self.encoder = None

    def setup(self):
        if self.template is None:
            self.encoder = self.tokenizer.encoder(self.max_seq_len)
        else:
            self.encoder = staged_encoder(self.tokenizer.read().decode(), self.tokenizer.sha256, self.special_tokens,
                                          self.template, self.max_seq_len)
        self.log = worker_progress_log()

    def special_token_text(self, conv: Conversation) -> str | None:
        """Where the conversation's text holds special-token text (a detail for rejected.jsonl), or None."""
        if found := self.encoder.special_token_text(conv.system):
            return f"system prompt: {found!r}"
        if conv.tools and (found := self.encoder.special_token_text(json.dumps(conv.tools, ensure_ascii=False))):
            return f"tools: {found!r}"
        for i, pair in enumerate(conv.pairs):
            texts = [("tool result", r.content) for r in pair.tool_results] + [("user", pair.user),
                                                                                ("assistant", pair.assistant)]
            texts += [("tool call", c.text()) for c in pair.tool_calls]
            for role, text in texts:
                if found := self.encoder.special_token_text(text):
                    return f"pair {i + 1}, {role}: {found!r}"
        return None

    def threshold(self, task: str) -> float:
        return self.reward_thresholds.get(task, self.reward_thresholds["default"])

    def process(self, keyed_batch: tuple, records_read: int) -> Iterator:
        key, (carried,) = keyed_batch  # (batch_key, [raw_batch]): from the GroupByKey that spreads batches
        task, items = unpack_raw_batch(unspill(self.spill_dir, carried))
        source, kind = task.source, task.kind
        tally, rejected, convs = mf.Tally(), [], []
        tally.read(source, len(items))
        for item in items:
            item = item.parsed()
            result, repairs = normalize(item, source, kind, self.threshold, self.record_formats.get(source, AUTO))
            tally.repairs(source, repairs)
            if isinstance(result, Conversation):
                if not (found := self.special_token_text(result)):
                    convs.append((result, item))
                    continue
                result = Dropped(REJECTED, SPECIAL_TOKEN_TEXT, found)
            tally.drop(result.bucket, source, result.reason)
            if result.bucket == REJECTED:
                rejected.append(rejected_row(item, source, result))
        rows, tokens = [], 0
        encoded = self.encoder.encode_batch([(c.pairs, c.system or self.system_prompt, c.tools) for c, _ in convs])
        for (conv, item), enc in zip(convs, encoded):
            if isinstance(enc, str):
                tally.drop(mf.FILTERED, source, enc)
                continue
            if isinstance(enc, Rejection):  # (a Jinja template's contract check: hf_template.py)
                tally.drop(REJECTED, source, enc.reason)
                rejected.append(rejected_row(item, source, Dropped(REJECTED, enc.reason, enc.detail)))
                continue
            if enc.pairs_dropped:
                tally.repairs(source, [TRUNCATED_TRAILING_PAIRS])
            payload = records.encode_fields(enc.ids, enc.mask, kind, conv.task, conv.id)
            key = RowKey(source, kind, conv.task, conv.id, conv.file, conv.number)
            rows.append(EncodedRow(key, payload, len(enc.ids), enc.mask.count(1)))
            tokens += len(enc.ids)
        RECORDS_READ.inc(len(items))
        CONVERSATIONS_ENCODED.inc(len(rows))
        TOKENS_ENCODED.inc(tokens)
        # (the run's staged tokenizer path is unique to the run: a fresh count per run)
        pg.shared(("encode", self.tokenizer.path), self.log, "encoding (records of all read, this process)",
                  records_read).add(len(items))
        if rows:  # (the payloads to a file: until the plan is made, only the rows' keys are held)
            payloads = spill(self.spill_dir, tuple(key), "encoded", [row.payload for row in rows])
            yield tuple(key), payloads, [row.plain() for row in rows]
        yield beam.pvalue.TaggedOutput(self.SUMMARY, ([tuple(row.key) for row in rows], tally, rejected))


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


def make_plan(summary: tuple, cfg: PipelineConfig, output: str) -> dict:
    """The single global step: the plan from every row's key, with the run's full tally (the encoders'
    plus what Place will keep or drop) and rejected.jsonl written (`rejected_written` rows)."""
    keys, tally, rejected = summary
    keys = [RowKey(*k) for k in keys]
    plan = plan_from_keys(keys, cfg)
    tally = mf.Tally(tally)
    for key in keys:
        reason = dropped_by_plan(plan, key.example, key.location)
        if reason:
            tally.drop(mf.FILTERED, key.source, reason)
        else:
            tally.kept(key.source, key.task)
    plan["tally"] = tally
    plan["rejected_written"] = write_rejected(rejected, output)
    return plan


class Place(beam.DoFn):
    """Applies the plan to a batch: drops duplicates and examples the mix does not draw, assigns split and
    shard; per shard the batch touches, spills the payloads to a file and emits ((split, shard), (that
    file, [(order, tokens, loss_tokens)])), so the shuffle to the shards carries no payloads."""

    def __init__(self, shard_counts: dict[str, int], spill_dir: str | None):
        self.shard_counts, self.spill_dir = shard_counts, spill_dir

    def process(self, encoded: tuple, plan: dict) -> Iterator:
        seed = plan["seed"]
        batch, payloads, rows = encoded
        keys = [RowKey(*fields[0]) for fields in rows]
        kept = [i for i, k in enumerate(keys) if not dropped_by_plan(plan, k.example, k.location)]
        if not kept:
            return
        payloads = unspill(self.spill_dir, payloads)
        shards = collections.defaultdict(list)
        for i in kept:
            row = EncodedRow.of(rows[i], payloads[i])
            key = row.key.example
            split = mixing.split_of(plan, key)
            shard = mixing.shard_of(seed, key, self.shard_counts[split])
            shards[(split, shard)].append(ShardRow(mixing.order_key(seed, key), row.payload, row.tokens,
                                                   row.loss_tokens))
        for (split, shard), placed in shards.items():
            spilled = spill(self.spill_dir, (*batch, split, shard), "placed", [r.payload for r in placed])
            yield (split, shard), (spilled, [(r.order, r.tokens, r.loss_tokens) for r in placed])


class WriteShard(beam.DoFn):
    def __init__(self, output: str, shard_counts: dict[str, int], spill_dir: str | None):
        self.output, self.shard_counts, self.spill_dir = output, shard_counts, spill_dir

    def setup(self):
        self.log = worker_progress_log()

    def process(self, keyed) -> Iterator[dict]:
        """One shard at a time: its payloads are read back from the files Place spilled them to."""
        (split, index), groups = keyed
        rows = []
        for payloads, placed in groups:
            rows += [ShardRow(order, payload, tokens, loss) for (order, tokens, loss), payload
                     in zip(placed, unspill(self.spill_dir, payloads))]
        rows.sort(key=lambda r: r.order)
        stats = write_shard(self.output, split, index, self.shard_counts[split], rows)
        EXAMPLES_WRITTEN.inc(len(rows))
        # (shards no example went to are written with the manifest: the total is an upper bound)
        pg.shared(("write", self.output), self.log, "writing shards (this process)",
                  sum(self.shard_counts.values()), "shards").add(1)
        yield stats


def plan_from_keys(keys: list[RowKey], cfg: PipelineConfig) -> dict:
    """The plan from every encoded row's key."""
    keys, duplicates = mixing.drop_duplicates((k.example, k.location) for k in keys)
    weights = dict(zip([s.name for s in cfg.general], cfg.general_weights)) if cfg.general_weights else None
    return mixing.make_plan(keys, seed=cfg.seed, eta=cfg.eta, general_weights=weights,
                            validation_fraction=cfg.validation_fraction, agent_sources=[s.name for s in cfg.agent],
                            general_sources=[s.name for s in cfg.general], duplicates=duplicates)


def shard_counts(cfg: PipelineConfig) -> dict[str, int]:
    return {"train": cfg.num_shards, "validation": cfg.num_validation_shards}


def build_graph(p: beam.Pipeline, cfg: PipelineConfig, read_tasks: list[ReadTask], *,
                tokenizer: StagedTokenizer, tokenizer_info: dict, output: str | None = None,
                spill: bool = True, template: TemplateSpec | None = None,
                special_tokens: dict[str, str] | None = None) -> None:
    """Adds the whole pipeline to `p`; running it writes shards, rejected.jsonl and manifest.json into
    `output` (default cfg.output; the build's staging directory); the manifest records cfg. `spill`: the
    records travel as spill files (for the local runner, which keeps each stage's output in memory;
    Dataflow's shuffle keeps them on disk itself)."""
    output = output or cfg.output
    spill_dir = posixpath.join(output, STAGING_DIR, "spill") if spill else None  # (removed with the staging)
    if not read_tasks:
        raise ValueError("no input: configure at least one agent or general source")
    counts = shard_counts(cfg)
    sources = {s.name: "agent" for s in cfg.agent} | {s.name: "general" for s in cfg.general}

    read = (p | "ReadTasks" >> beam.Create(read_tasks)  # (Create spreads several tasks over the workers)
            | "ReadBatches" >> beam.ParDo(ReadBatches(cfg.tokenize_batch_size, spill_dir))
            .with_outputs(ReadBatches.COUNTS, main="batches"))
    records_read = read[ReadBatches.COUNTS] | "CountRecords" >> beam.CombineGlobally(sum)
    encoded = (read.batches
               | "SpreadBatches" >> beam.GroupByKey()
               | "Encode" >> beam.ParDo(Encode(tokenizer, cfg.max_seq_len, cfg.effective_system_prompt, cfg.reward_thresholds,
                                               spill_dir, template, special_tokens,
                                               {s.name: s.record_format for s in cfg.agent + cfg.general}),
                                        beam.pvalue.AsSingleton(records_read))
               .with_outputs(Encode.SUMMARY, main="rows"))
    plan = (encoded[Encode.SUMMARY] | "GatherSummaries" >> beam.CombineGlobally(GatherSummaries()).without_defaults()
            | "Plan" >> beam.Map(make_plan, cfg=cfg, output=output))
    shards = (encoded.rows | "Place" >> beam.ParDo(Place(counts, spill_dir), beam.pvalue.AsSingleton(plan))
              | "GroupByShard" >> beam.GroupByKey()
              | "WriteShard" >> beam.ParDo(WriteShard(output, counts, spill_dir)))
    _ = plan | "WriteManifest" >> beam.Map(
        write_manifest, output=output, config=manifest_config(cfg), tokenizer=tokenizer_info,
        chat_template=template.manifest_entry() if template else LLAMA2_MANIFEST_ENTRY,
        sources=sources, shard_counts=counts, shards=beam.pvalue.AsList(shards))


def manifest_config(cfg: PipelineConfig) -> dict:
    """The config as the manifest records it: `system_prompt` is the one records without their own got."""
    return json.loads(json.dumps(cfg.to_dict() | {"system_prompt": cfg.effective_system_prompt}))
