"""The dataset directory a build writes (local or gs://) and what its readers need to know of it.

    OUTPUT/
      train-00000-of-0000N.tfrecord ...  validation-00000-of-0000M.tfrecord ...   (records.py)
      manifest.json        config, tokenizer, accounting, mix, splits; written last, so it marks a complete build
      rejected.jsonl       every rejected input record with its reason
      tokenizer/           a copy of the tokenizer the records were tokenized with
      dataset_info.json, features.json   TensorFlow Datasets metadata
"""

from __future__ import annotations

import json
import posixpath

import fsspec

from data_pipeline.formats.records import MANIFEST_NAME

SAMPLE_DATASET_DIR = "data/sample"  # where the bundled sample is built (the trainer's default data.path)
TOKENIZER_SUBDIR = "tokenizer"


def load_manifest(data_dir: str) -> dict:
    """The manifest of a dataset directory; FileNotFoundError (saying how to build one) when there is none."""
    path = f"{data_dir.rstrip('/')}/{MANIFEST_NAME}"
    try:
        with fsspec.open(path, "rt") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} not found: point the trainer at a directory written by "
            f"`python -m data_pipeline.build` (it holds the TFRecord shards and {MANIFEST_NAME})"
        ) from None
    if not isinstance(manifest.get("tasks"), list):
        raise ValueError(f"{path}: no 'tasks' list; was it written by data_pipeline.build?")
    return manifest


def has_manifest(data_dir: str) -> bool:
    fs, root = fsspec.core.url_to_fs(data_dir)
    return fs.exists(posixpath.join(root, MANIFEST_NAME))


def manifest_tokenizer_path(manifest: dict, data_dir: str) -> str | None:
    """The dataset's tokenizer directory from its manifest. The build records it relative to the dataset
    (`tokenizer`), so a dataset that was copied or uploaded elsewhere (another machine, gs://) still finds
    its own copy. Manifests of older builds hold an absolute path: when that no longer exists, the
    `tokenizer/` copy inside the dataset is used. None when the manifest names no tokenizer."""
    path = (manifest.get("tokenizer") or {}).get("path")
    if not path:
        return None
    if "://" not in path and not path.startswith("/"):
        return join(data_dir, path)
    own_copy = join(data_dir, TOKENIZER_SUBDIR)
    if not _exists(path) and _exists(own_copy):
        return own_copy
    return path


def join(base: str, *parts: str) -> str:
    """A path under `base`, local or URL (`gs://b/x` + `y` → `gs://b/x/y`)."""
    return posixpath.join(base.rstrip("/") or base, *parts)


def _exists(path: str) -> bool:
    fs, root = fsspec.core.url_to_fs(path)
    return fs.exists(root)
