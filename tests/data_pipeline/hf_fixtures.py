"""Small Hugging Face tokenizers with chat-template special tokens (nothing can be downloaded): a byte-level
BPE trained on the bundled sample's text, wrapped in `transformers.PreTrainedTokenizerFast` and saved with a
chat template in `tokenizer_config.json`."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from data_pipeline.formats.hf_template import TEMPLATES_DIR
from data_pipeline.sample_data import make_sample_data as sample

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
STYLES = {  # template file → (bos, eos, pad)
    "llama3.jinja": ("<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"),
    "chatml.jinja": (None, "<|im_end|>", "<|endoftext|>"),
    "chatml_generation.jinja": (None, "<|im_end|>", "<|endoftext|>"),
}


def template_text(name: str) -> str:
    return Path(TEMPLATES_DIR, name).read_text()


@functools.cache
def _trained_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = []
    for name in (sample.AGENT_FILE, sample.GPT4_FILE):
        for line in open(sample.HERE / name):
            texts += [t.get("value") or "" for t in json.loads(line)["conversations"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok.to_str()


def make_tokenizer_dir(directory, template: str, style: str = "llama3.jinja", in_config: bool = True) -> str:
    """A tokenizer directory with `template` (text) as its chat template (tokenizer_config.json, or
    chat_template.jinja when not in_config); returns its path."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    bos, eos, pad = STYLES[style]
    tokens = {"eos_token": eos, "pad_token": pad} | ({"bos_token": bos} if bos else {})
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_trained_json()), **tokens)
    os.makedirs(directory, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    config_path = os.path.join(directory, "tokenizer_config.json")
    config = json.load(open(config_path))
    config.pop("chat_template", None)
    if in_config:
        config["chat_template"] = template
    else:
        Path(directory, "chat_template.jinja").write_text(template)
    json.dump(config, open(config_path, "w"), indent=1)
    if in_config and os.path.exists(os.path.join(directory, "chat_template.jinja")):
        os.remove(os.path.join(directory, "chat_template.jinja"))
    return str(directory)


def load(directory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


@functools.cache
def make_tokenizer_dir_cached(style: str) -> str:
    """`make_tokenizer_dir` with the shipped template `style`, made once per test session in a temp dir."""
    import tempfile

    return make_tokenizer_dir(tempfile.mkdtemp(prefix=f"tok_{style.split('.')[0]}_"), template_text(style), style)
