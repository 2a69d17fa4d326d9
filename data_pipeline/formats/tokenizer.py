"""Loading the tokenizer: a fast (Rust `tokenizers`) tokenizer whose ids equal SentencePiece's own.

`load_tokenizer` accepts a local directory (holding `tokenizer.model` and/or `tokenizer.json`), a path to a
`tokenizer.model` file, a `gs://` (any fsspec URL) directory, or a Hugging Face hub id.

Where a SentencePiece `tokenizer.model` exists it is the source of truth: the fast tokenizer is converted
from it alone, ignoring any `tokenizer_config.json` next to it. (transformers 5 rebuilds a Llama tokenizer
from its class definition when the config names `LlamaTokenizer`; that pipeline splits runs of spaces
differently from SentencePiece. The generic conversion from the model file matches SentencePiece exactly;
tests check this on the bundled tokenizer and on the real Llama 2 one.)
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SAMPLE_TOKENIZER_DIR = str(Path(__file__).resolve().parents[1] / "sample_data" / "tiny_tokenizer")
SPM_FILE = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_FILES = (SPM_FILE, TOKENIZER_JSON, "tokenizer_config.json", "special_tokens_map.json")


@functools.cache
def _use_compatible_sentencepiece_proto() -> None:
    """sentencepiece ≥ 0.2.1 ships a model proto module generated for protobuf 7; with protobuf 6 (which
    apache-beam requires) importing it fails and transformers cannot read `tokenizer.model`. The proto is
    the same, so fall back to the copy transformers bundles for protobuf ≥ 4."""
    try:
        from sentencepiece import sentencepiece_model_pb2  # noqa: F401
    except Exception:  # google.protobuf.runtime_version.VersionError
        import sentencepiece
        from transformers.utils import sentencepiece_model_pb2_new

        sys.modules["sentencepiece.sentencepiece_model_pb2"] = sentencepiece_model_pb2_new
        sentencepiece.sentencepiece_model_pb2 = sentencepiece_model_pb2_new


def load_tokenizer(path_or_hf_id: str, require_bos_eos: bool = True):
    """A fast transformers tokenizer (a `TokenizersBackend`) for a tokenizer dir, model file, URL or hub id.
    `require_bos_eos`: the Llama 2 template needs both (a Jinja template, e.g. ChatML, may use neither)."""
    local_dir = resolve_tokenizer_dir(path_or_hf_id)
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    _use_compatible_sentencepiece_proto()
    if os.path.exists(os.path.join(local_dir, SPM_FILE)):
        with tempfile.TemporaryDirectory(prefix="agentlm-spm-") as clean:
            shutil.copyfile(os.path.join(local_dir, SPM_FILE), os.path.join(clean, SPM_FILE))
            tokenizer = TokenizersBackend.from_pretrained(clean)
    elif os.path.exists(os.path.join(local_dir, TOKENIZER_JSON)):
        tokenizer = TokenizersBackend.from_pretrained(local_dir)
    else:
        raise FileNotFoundError(f"{path_or_hf_id}: no {SPM_FILE} or {TOKENIZER_JSON} in {local_dir}")
    if require_bos_eos and (tokenizer.bos_token_id is None or tokenizer.eos_token_id is None):
        raise ValueError(f"tokenizer {path_or_hf_id} has no BOS/EOS token; the Llama 2 chat template needs both")
    tokenizer.name_or_path = path_or_hf_id
    return tokenizer


def resolve_tokenizer_dir(path_or_hf_id: str) -> str:
    """A local directory holding the tokenizer files: the path itself, a download cache, or an error."""
    if "://" in path_or_hf_id:
        return _copy_remote_dir(path_or_hf_id)
    if os.path.isfile(path_or_hf_id):
        if os.path.basename(path_or_hf_id) != SPM_FILE:
            raise ValueError(f"{path_or_hf_id}: give a tokenizer directory or a file named {SPM_FILE}")
        return os.path.dirname(os.path.abspath(path_or_hf_id))
    if os.path.isdir(path_or_hf_id):
        return path_or_hf_id
    if path_or_hf_id.startswith((".", "/", "~")) or path_or_hf_id.count("/") != 1:
        raise FileNotFoundError(f"tokenizer {path_or_hf_id!r}: no such directory (and not a hub id owner/name)")
    return _download_from_hub(path_or_hf_id)


def _cache_dir(key: str) -> str:
    root = os.environ.get("AGENTLM_CACHE", os.path.join(tempfile.gettempdir(), "agentlm-cache"))
    return os.path.join(root, "tokenizers", hashlib.sha256(key.encode()).hexdigest()[:16])


def _copy_remote_dir(url: str) -> str:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    target = _cache_dir(url)
    os.makedirs(target, exist_ok=True)
    found = False
    for name in TOKENIZER_FILES:
        remote = f"{root.rstrip('/')}/{name}"
        if fs.exists(remote):
            fs.get(remote, os.path.join(target, name))
            found = True
    if not found:
        raise FileNotFoundError(f"{url}: none of {TOKENIZER_FILES} found there")
    return target


def _download_from_hub(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=list(TOKENIZER_FILES))
    except Exception as e:
        raise RuntimeError(
            f"cannot fetch tokenizer {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            f"Offline or gated? Download it where you have access (`hf download {repo_id} {SPM_FILE}`) and "
            "pass the local directory to --tokenizer.") from e


def tokenizer_files_sha256(path_or_hf_id: str) -> str:
    """Content hash of the tokenizer's defining file (`tokenizer.model`, else `tokenizer.json`)."""
    local_dir = resolve_tokenizer_dir(path_or_hf_id)
    for name in (SPM_FILE, TOKENIZER_JSON):
        path = os.path.join(local_dir, name)
        if os.path.exists(path):
            with open(path, "rb") as f:
                return hashlib.sha256(f.read()).hexdigest()
    raise FileNotFoundError(f"{path_or_hf_id}: no {SPM_FILE} or {TOKENIZER_JSON}")


def tokenizer_info(path_or_hf_id: str, tokenizer=None) -> dict:
    """The manifest's `tokenizer` entry (name, a local path the trainer can load, content hash, special ids)."""
    tokenizer = tokenizer or load_tokenizer(path_or_hf_id)
    local_dir = resolve_tokenizer_dir(path_or_hf_id)
    return {
        "name": path_or_hf_id,
        "path": os.path.abspath(local_dir) if "://" not in path_or_hf_id else path_or_hf_id,
        "sha256": tokenizer_files_sha256(path_or_hf_id),
        "vocab_size": len(tokenizer),
        "bos_id": tokenizer.bos_token_id,
        "eos_id": tokenizer.eos_token_id,
        "pad_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id,
        "unk_id": tokenizer.unk_token_id,
    }
