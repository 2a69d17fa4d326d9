"""The tokenizer files of an export: what `transformers.AutoTokenizer` (vLLM, TGI, lm-eval, AgentBench clients) needs
to tokenize and render prompts exactly as the model was trained, chat template included, and a pad token (the
one `config.json`'s `pad_token_id` names), so batched `transformers` pipelines can pad."""

from __future__ import annotations

import json
import os
import posixpath

from agentlm_jax.errors import ConfigError
from agentlm_jax.hf import files

SPECIAL_TOKENS_MAP = "special_tokens_map.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# Every tokenizer file a Hugging Face model directory may hold (chat_template.jinja, written by newer
# `transformers`, takes precedence over tokenizer_config.json's template, so a stale one must not survive).
OWNED_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP,
                         "added_tokens.json", "chat_template.jinja", "chat_template.json")


def llama2_chat_jinja() -> str:
    """The training chat template (`data_pipeline.formats.chat_template`) as a Hugging Face Jinja `chat_template`, so
    `tokenizer.apply_chat_template` (vLLM, lm-eval, AgentBench clients) renders prompts exactly as AgentLM
    was trained: the AgentTuning system prompt unless the messages bring their own, each user/assistant pair
    its own `<s>[INST] ... [/INST] {answer} </s>` block."""
    from data_pipeline.formats.chat_template import B_INST, B_SYS, DEFAULT_SYSTEM_PROMPT, E_INST, E_SYS

    def q(text: str) -> str:  # a Jinja string literal
        return json.dumps(text)

    return (
        "{% if messages[0]['role'] == 'system' %}"
        "{% set system_message = messages[0]['content'] | trim %}{% set loop_messages = messages[1:] %}"
        f"{{% else %}}{{% set system_message = {q(DEFAULT_SYSTEM_PROMPT)} %}}{{% set loop_messages = messages %}}"
        "{% endif %}"
        "{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{% if loop.index0 == 0 and system_message %}"
        f"{{% set content = {q(B_SYS)} + system_message + {q(E_SYS)} + (message['content'] | trim) %}}"
        "{% else %}{% set content = message['content'] | trim %}{% endif %}"
        f"{{{{ bos_token + {q(B_INST + ' ')} + content + {q(' ' + E_INST)} }}}}"
        "{% else %}{{ ' ' + (message['content'] | trim) + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    )


CHAT_TEMPLATE_FILE = "chat_template.jinja"


def training_chat_template(tokenizer_dir: str) -> tuple[str, bool]:
    """(the chat template the data was rendered with, whether it is Llama 2's): a dataset built with a Jinja
    template (`data_pipeline.build --chat-template hf|PATH`) keeps its text in its tokenizer directory's
    chat_template.jinja; without one it was the paper's Llama 2 template."""
    path = os.path.join(tokenizer_dir, CHAT_TEMPLATE_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read(), False
    return llama2_chat_jinja(), True


def _token_content(token) -> str | None:
    """A special token as tokenizer_config.json / special_tokens_map.json spell it: a string or an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


def _declared_pad_token(source: str) -> str | None:
    """The pad token a Hugging Face tokenizer directory's own files declare, if any."""
    for name in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP):
        path = os.path.join(source, name)
        if os.path.exists(path):
            with open(path) as f:
                token = _token_content(json.load(f).get("pad_token"))
            if token:
                return token
    return None


def export_pad_token(tokenizer_path: str, default_id: int) -> tuple[str, int]:
    """(pad token, its id) for an export with this tokenizer: the pad token its files declare, else the token
    with id `default_id` (the model config's pad_token_id; Llama 2's `<unk>`, id 0, what the pipeline pads with)."""
    from data_pipeline.formats.tokenizer import load_tokenizer, resolve_tokenizer_dir

    tokenizer = load_tokenizer(tokenizer_path)
    declared = _declared_pad_token(resolve_tokenizer_dir(tokenizer_path)) or tokenizer.pad_token
    if declared is not None:
        return declared, tokenizer.convert_tokens_to_ids(declared)
    if not 0 <= default_id < len(tokenizer):
        raise ConfigError(f"pad_token_id {default_id} is not in the tokenizer {tokenizer_path} "
                         f"({len(tokenizer)} tokens)")
    return tokenizer.convert_ids_to_tokens(default_id), default_id


def hf_tokenizer_files(tokenizer, model_max_length: int | None = None,
                       pad_token: str | None = None) -> dict[str, str]:
    """`tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` for a pipeline tokenizer.

    `tokenizer.json` is the exact fast tokenizer the data was tokenized with, plus a post-processor that adds
    `<s>` as Llama's tokenizer does; the config names the generic `PreTrainedTokenizerFast`, which every
    `transformers` version loads from `tokenizer.json` as it is (no SentencePiece conversion, whose result
    differs between versions), and carries the training chat template."""
    from tokenizers import Tokenizer, processors

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    bos = tokenizer.bos_token
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_token_id)])
    special = {"bos_token": bos, "eos_token": tokenizer.eos_token, "unk_token": tokenizer.unk_token,
               "pad_token": pad_token or tokenizer.pad_token or tokenizer.unk_token}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
              "clean_up_tokenization_spaces": False, "padding_side": "left",
              "model_max_length": model_max_length or 4096, "chat_template": llama2_chat_jinja()}
    return {"tokenizer.json": backend.to_str(pretty=True),
            "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
            "special_tokens_map.json": json.dumps(special, indent=2) + "\n"}


def _update_json(fs, path: str, updates: dict) -> None:
    """Sets `updates` in a copied JSON file, keeping every other key (and the file's bytes when nothing changes)."""
    with fs.open(path, "r") as f:
        config = json.load(f)
    if any(_token_content(config.get(k)) != v for k, v in updates.items()):
        config.update(updates)
        files.write_text(fs, path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def save_tokenizer(tokenizer_path: str, output_dir: str, model_max_length: int | None = None,
                   pad_token: str | None = None) -> list[str]:
    """Write the tokenizer at `tokenizer_path` (a directory, gs:// URL or hub id, as the pipeline resolves it)
    into `output_dir` so `transformers.AutoTokenizer` loads it anywhere; returns the file names.

    A Hugging Face tokenizer directory (with `tokenizer_config.json`) is copied as its authors made it, except
    that its `chat_template` becomes the training one (`training_chat_template`: the dataset's Jinja template, or
    `llama2_chat_jinja`, since Meta's Llama-2-chat template has no default system prompt, so
    `apply_chat_template` would not render what the model was trained on). A bare
    SentencePiece `tokenizer.model` (the bundled tokenizer, a Llama 2 download) is copied too, and
    `hf_tokenizer_files` adds what `AutoTokenizer` needs beside it. `pad_token` (default: the one the files
    declare, else `<unk>`, what the pipeline pads with) is set where the files declare none (Meta's have
    `pad_token: null`, which fails batched `transformers` pipelines)."""
    from data_pipeline.formats.tokenizer import TOKENIZER_FILES, load_tokenizer, resolve_tokenizer_dir

    source = resolve_tokenizer_dir(tokenizer_path)
    template, is_llama2 = training_chat_template(source)
    # fails early on something that is not a usable tokenizer (a Jinja template, e.g. ChatML, may need no BOS)
    tokenizer = load_tokenizer(tokenizer_path, require_bos_eos=is_llama2)
    fs, root = files.fs_and_path(output_dir)
    fs.makedirs(root, exist_ok=True)
    copied = [name for name in TOKENIZER_FILES if os.path.exists(os.path.join(source, name))]
    for name in copied:
        fs.put(os.path.join(source, name), posixpath.join(root, name))
    pad_token = pad_token or _declared_pad_token(source) or tokenizer.pad_token or tokenizer.unk_token
    if not is_llama2:  # transformers 5 reads this file first; older versions tokenizer_config.json's key
        files.write_text(fs, posixpath.join(root, CHAT_TEMPLATE_FILE), template)
        copied.append(CHAT_TEMPLATE_FILE)
    if TOKENIZER_CONFIG in copied:
        _update_json(fs, posixpath.join(root, TOKENIZER_CONFIG), {"chat_template": template, "pad_token": pad_token})
        if SPECIAL_TOKENS_MAP in copied:
            _update_json(fs, posixpath.join(root, SPECIAL_TOKENS_MAP), {"pad_token": pad_token})
        return copied
    written = hf_tokenizer_files(tokenizer, model_max_length, pad_token)
    for name, text in written.items():
        files.write_text(fs, posixpath.join(root, name), text)
    return sorted(set(copied) | set(written))
