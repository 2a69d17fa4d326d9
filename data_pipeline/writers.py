"""The files a build writes besides the graph's own work: the shards, rejected.jsonl, the TFDS metadata and,
last, manifest.json (through fsspec: local or gs://)."""

from __future__ import annotations

import json
import math
import posixpath

import fsspec

from data_pipeline import manifest as mf
from data_pipeline.formats import records


def write_shard(output: str, split: str, index: int, count: int, rows: list) -> dict:
    """Writes one shard of rows (with .payload, .tokens, .loss_tokens), in order; returns its stats for the
    manifest."""
    data = b"".join(records.frame_record(r.payload) for r in rows)
    name = records.shard_filename(split, index, count)
    with fsspec.open(posixpath.join(output, name), "wb") as f:
        f.write(data)
    return {"split": split, "index": index, "name": name, "examples": len(rows), "bytes": len(data),
            "tokens": sum(r.tokens for r in rows), "loss_tokens": sum(r.loss_tokens for r in rows)}


def write_rejected(rows: list[dict], output: str) -> int:
    rows = sorted(rows, key=lambda r: (r["source"], r["file"], r["number"]))
    with fsspec.open(posixpath.join(output, records.REJECTED_NAME), "wb") as f:
        for row in rows:
            f.write(strict_json_line(row))
    return len(rows)


def strict_json_line(row: dict) -> bytes:
    """One line of strict JSON (RFC 8259) in UTF-8: what any JSON reader accepts. A NaN or infinite number
    becomes the string "NaN"/"Infinity"/"-Infinity"; a lone surrogate is written as its `\\udXXX` escape."""
    try:
        text = json.dumps(row, ensure_ascii=False, allow_nan=False, default=repr)
    except ValueError:  # NaN or infinity somewhere in the record
        row = _finite(row)
        text = json.dumps(row, ensure_ascii=False, allow_nan=False, default=repr)
    try:
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (the record was rejected for it)
        return (json.dumps(row, ensure_ascii=True, allow_nan=False, default=repr) + "\n").encode("ascii")


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_manifest(plan: dict, *, output: str, config: dict, tokenizer: dict, sources: dict[str, str],
                   shard_counts: dict[str, int], shards: list[dict], chat_template: dict | None = None) -> dict:
    """Writes the shards no example went to (empty files: every shard exists), the TFDS metadata and, last,
    manifest.json."""
    written = {(s["split"], s["index"]) for s in shards}
    shards = list(shards) + [write_shard(output, split, i, n, []) for split, n in shard_counts.items()
                             for i in range(n) if (split, i) not in written]
    manifest = mf.build_manifest(config=config, tokenizer=tokenizer, tally=plan["tally"], sources=sources,
                                 plan=plan, shards=shards, shard_counts=shard_counts,
                                 rejected_written=plan["rejected_written"], chat_template=chat_template)
    for name, content in ((mf.TFDS_FEATURES, mf.tfds_features()),
                          (mf.TFDS_DATASET_INFO, mf.tfds_dataset_info(manifest))):
        with fsspec.open(posixpath.join(output, name), "w") as f:
            f.write(mf.dumps(content))
    with fsspec.open(posixpath.join(output, records.MANIFEST_NAME), "w") as f:  # last: marks a complete build
        f.write(mf.dumps(manifest))
    return manifest
