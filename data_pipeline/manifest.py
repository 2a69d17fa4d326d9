"""The accounting of a run and `manifest.json` (docs/design.md: "manifest.json").

Every input record ends in exactly one bucket per source: `kept` (in a train or validation shard),
`filtered` (a valid record not used, by reason) or `rejected` (bad input, by reason, written to
rejected.jsonl). `read = kept + filtered + rejected` is checked before the manifest is written.
Repairs are counted per kind as the number of records that needed that repair.
"""

from __future__ import annotations

import collections
import json
from typing import Iterable

READ, KEPT, FILTERED, REJECTED, REPAIR, TASK = "read", "kept", "filtered", "rejected", "repair", "task"
MANIFEST_VERSION = 1

# TensorFlow Datasets metadata, so `tfds.builder_from_directory(OUTPUT)` reads the shards as they are
# (SplitInfo's `filepathTemplate` matches our file names). Plain JSON: no TensorFlow at runtime.
TFDS_DATASET_INFO, TFDS_FEATURES = "dataset_info.json", "features.json"
TFDS_NAME, TFDS_VERSION = "agentlm_data", "1.0.0"
TFDS_FILEPATH_TEMPLATE = "{SPLIT}-{SHARD_X_OF_Y}.tfrecord"
_TFDS_TEXT = {"pythonClassName": "tensorflow_datasets.core.features.text_feature.Text", "text": {}}
_TFDS_INT64_SEQUENCE = {"pythonClassName": "tensorflow_datasets.core.features.tensor_feature.Tensor",
                        "tensor": {"dtype": "int64", "encoding": "none", "shape": {"dimensions": ["-1"]}}}


class Tally(collections.Counter):
    """Event counts keyed by tuples: (READ|KEPT, source), (FILTERED|REJECTED|REPAIR, source, reason),
    (TASK, task)."""

    def read(self, source: str, n: int = 1):
        self[(READ, source)] += n

    def kept(self, source: str, task: str):
        self[(KEPT, source)] += 1
        self[(TASK, task)] += 1

    def drop(self, bucket: str, source: str, reason: str):
        self[(bucket, source, reason)] += 1

    def repairs(self, source: str, kinds: Iterable[str]):
        for kind in kinds:
            self[(REPAIR, source, kind)] += 1


def source_accounting(tally: Tally, sources: dict[str, str]) -> dict:
    """Per source: kind, read, kept, filtered/rejected/repairs by reason; raises if a record went missing."""
    out = {}
    for name, kind in sources.items():
        by = {FILTERED: {}, REJECTED: {}, REPAIR: {}}
        for key, n in tally.items():
            if len(key) == 3 and key[1] == name and key[0] in by:
                by[key[0]][key[2]] = n
        entry = {"kind": kind, "read": tally[(READ, name)], "kept": tally[(KEPT, name)],
                 "filtered": sum(by[FILTERED].values()), "rejected": sum(by[REJECTED].values()),
                 "filtered_by_reason": dict(sorted(by[FILTERED].items())),
                 "rejected_by_reason": dict(sorted(by[REJECTED].items())),
                 "repairs": dict(sorted(by[REPAIR].items()))}
        if entry["read"] != entry["kept"] + entry["filtered"] + entry["rejected"]:
            raise AssertionError(f"accounting broken for source {name}: read {entry['read']} != kept "
                                 f"{entry['kept']} + filtered {entry['filtered']} + rejected {entry['rejected']}")
        out[name] = entry
    return out


def split_stats(shards: Iterable[dict], shard_counts: dict[str, int]) -> dict:
    out = {split: {"examples": 0, "shards": count, "tokens": 0, "loss_tokens": 0, "files": []}
           for split, count in shard_counts.items()}
    for s in sorted(shards, key=lambda s: (s["split"], s["index"])):
        entry = out[s["split"]]
        entry["examples"] += s["examples"]
        entry["tokens"] += s["tokens"]
        entry["loss_tokens"] += s["loss_tokens"]
        entry["files"].append({"name": s["name"], "examples": s["examples"], "bytes": s["bytes"]})
    return out


def build_manifest(*, config: dict, tokenizer: dict, tally: Tally, sources: dict[str, str], plan: dict,
                   shards: Iterable[dict], shard_counts: dict[str, int], rejected_written: int,
                   chat_template: dict | None = None) -> dict:
    accounting = source_accounting(tally, sources)
    rejected_total = sum(a["rejected"] for a in accounting.values())
    if rejected_written != rejected_total:
        raise AssertionError(f"rejected.jsonl has {rejected_written} rows, accounting says {rejected_total}")
    shards = list(shards)
    kept, written = sum(a["kept"] for a in accounting.values()), sum(s["examples"] for s in shards)
    if kept != written:
        raise AssertionError(f"the shards have {written} examples, accounting says {kept} were kept")
    tasks = sorted(key[1] for key in tally if key[0] == TASK)
    return {
        "version": MANIFEST_VERSION,
        "config": config,
        "seed": config["seed"],
        "tokenizer": tokenizer,
        # name, source, sha256 of the Jinja text, mask derivation ("generation"|"prefix"|"llama2_blocks"), text
        "chat_template": chat_template,
        "tasks": tasks,
        "kept_per_task": {t: tally[(TASK, t)] for t in tasks},
        "sources": accounting,
        "totals": {k: sum(a[k] for a in accounting.values()) for k in ("read", "kept", "filtered", "rejected")},
        "mix": plan["mix"],
        "splits": split_stats(shards, shard_counts),
    }


def tfds_features() -> dict:
    return {"pythonClassName": "tensorflow_datasets.core.features.features_dict.FeaturesDict",
            "featuresDict": {"features": {"input_ids": _TFDS_INT64_SEQUENCE, "loss_mask": _TFDS_INT64_SEQUENCE,
                                          "source": _TFDS_TEXT, "task": _TFDS_TEXT, "id": _TFDS_TEXT}}}


def tfds_dataset_info(manifest: dict) -> dict:
    splits = [{"name": split, "filepathTemplate": TFDS_FILEPATH_TEMPLATE,
               "shardLengths": [str(f["examples"]) for f in entry["files"]],
               "numBytes": str(sum(f["bytes"] for f in entry["files"]))}
              for split, entry in manifest["splits"].items()]
    return {"name": TFDS_NAME, "version": TFDS_VERSION, "fileFormat": "tfrecord", "splits": splits,
            "description": "agentlm-jax training data: one tokenized, loss-masked conversation per example "
                           "(see manifest.json)."}


def dumps(manifest: dict) -> str:
    return json.dumps(manifest, indent=2, sort_keys=False, ensure_ascii=False) + "\n"
