"""The exported tokenizer as evaluation tools load it: `AutoTokenizer` in a fresh process, ids and the chat
template equal to what the pipeline trained on."""

import json
import os
import subprocess
import sys

import pytest

from agentlm_jax import hf
from data_pipeline.formats.chat_template import Pair, encode_conversation, encode_generation_prompt
from data_pipeline.formats.tokenizer import SAMPLE_TOKENIZER_DIR, load_tokenizer

TEXTS = ["Hello  world,\n\n  several   spaces\tand tabs", "ls -la /etc | wc -l", "ünïcödé 日本語 🙂",
         " leading space", "user typed </s> and [INST] literally"]
HISTORY = [{"role": "user", "content": "How many files are in /etc?"},
           {"role": "assistant", "content": "Think: I should count them.\n\nAct: bash\n\n```bash\nls /etc | wc -l\n```"},
           {"role": "user", "content": "  The output is 42.  "}]


@pytest.fixture(scope="module", params=["bundled", "llama2"])
def exported(request, tmp_path_factory):
    if request.param == "llama2":
        source = request.getfixturevalue("llama2_tokenizer_path")
    else:
        source = SAMPLE_TOKENIZER_DIR
    out = tmp_path_factory.mktemp(request.param)
    hf.save_tokenizer(source, str(out), model_max_length=4096)
    return source, str(out)


def _auto_tokenizer_in_fresh_process(directory: str, script: str) -> dict:
    """Runs `script` (with `tok` = AutoTokenizer.from_pretrained(directory)) in a new interpreter: nothing
    this test process patched or cached can help it load."""
    code = (f"import json, transformers\ntok = transformers.AutoTokenizer.from_pretrained({directory!r})\n"
            f"{script}")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_auto_tokenizer_loads_it_and_encodes_like_the_pipeline(exported):
    source, out = exported
    got = _auto_tokenizer_in_fresh_process(out, f"print(json.dumps([tok(t)['input_ids'] for t in {TEXTS!r}]))")
    reference = load_tokenizer(source)
    # Llama's tokenizer puts <s> first; the text after it is tokenized exactly as the pipeline does
    assert got == [[reference.bos_token_id] + reference(t, add_special_tokens=False)["input_ids"] for t in TEXTS]


def test_chat_template_renders_the_training_ids(exported):
    source, out = exported
    reference = load_tokenizer(source)
    script = (f"h = {HISTORY!r}\n"
              "p = tok.apply_chat_template(h, add_generation_prompt=True, tokenize=True)\n"
              "p = p['input_ids'] if isinstance(p, dict) or hasattr(p, 'keys') else p\n"
              "s = tok.apply_chat_template([{'role': 'system', 'content': 'Be brief.'}] + h[:2], tokenize=True)\n"
              "s = s['input_ids'] if isinstance(s, dict) or hasattr(s, 'keys') else s\n"
              "print(json.dumps({'prompt': list(p), 'full': list(s)}))")
    got = _auto_tokenizer_in_fresh_process(out, script)
    assert got["prompt"] == encode_generation_prompt(HISTORY, reference)
    full = encode_conversation([Pair(HISTORY[0]["content"], HISTORY[1]["content"])], reference,
                               system_prompt="Be brief.")
    assert got["full"] == full.ids


def test_an_hf_tokenizer_directory_is_copied_verbatim(exported, tmp_path):
    _, first = exported
    again = tmp_path / "again"
    names = hf.save_tokenizer(first, str(again))
    assert "tokenizer_config.json" in names
    for name in names:
        assert (again / name).read_bytes() == open(f"{first}/{name}", "rb").read()


def test_a_copied_tokenizer_config_gets_the_training_chat_template(exported, tmp_path):
    """A Hugging Face tokenizer directory (e.g. Meta's, whose template has no default system prompt) is copied
    with its own settings, but its chat template becomes the training one, so evaluation prompts match."""
    source, first = exported
    meta_like = tmp_path / "meta"
    meta_like.mkdir()
    for name in os.listdir(first):
        (meta_like / name).write_bytes(open(f"{first}/{name}", "rb").read())
    config = json.loads((meta_like / "tokenizer_config.json").read_text())
    config.update(chat_template="{{ messages[0]['content'] }}", legacy=False)
    (meta_like / "tokenizer_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    hf.save_tokenizer(str(meta_like), str(out))
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert saved["chat_template"] == hf.tokenizer.llama2_chat_jinja() and saved["legacy"] is False
    got = _auto_tokenizer_in_fresh_process(str(out), f"print(json.dumps(list(tok.apply_chat_template("
                                           f"{HISTORY!r}, add_generation_prompt=True, tokenize=True, "
                                           "return_dict=False))))")
    assert got == encode_generation_prompt(HISTORY, load_tokenizer(source))


# ------------------------------------------------------------------------------------------- padding
def _assert_pads_like_the_config(directory: str):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(directory)
    config = json.load(open(f"{directory}/config.json"))
    generation = json.load(open(f"{directory}/generation_config.json"))
    assert tok.pad_token == "<unk>" and tok.pad_token_id == config["pad_token_id"] == generation["pad_token_id"] == 0
    batch = tok(["Hello world, how are you?", "ls"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[0] == 2 and batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()
    return tok, batch


def test_the_export_has_the_configs_pad_token_and_pads_batches_in_transformers(tmp_path):
    """`pad_token: null` failed every batched `transformers` pipeline; the pad token is now the token of
    config.json's pad_token_id (`<unk>`, id 0, what the pipeline pads with), and a padded batch generates what
    each prompt generates alone."""
    import torch
    import transformers

    from agentlm_jax.model.llama import init_model
    from tests.helpers.hf import TINY

    out = str(tmp_path / "export")
    hf.export_hf(init_model(TINY, seed=5), TINY, out, dtype="float32", tokenizer_path=SAMPLE_TOKENIZER_DIR,
                 show_progress=False)
    tok, batch = _assert_pads_like_the_config(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    together = model.generate(**batch, max_new_tokens=5, do_sample=False)[:, batch["input_ids"].shape[1]:]
    for row, text in enumerate(["Hello world, how are you?", "ls"]):
        alone = tok(text, return_tensors="pt")
        expected = model.generate(**alone, max_new_tokens=5, do_sample=False)[0, alone["input_ids"].shape[1]:]
        assert together[row].tolist() == expected.tolist()
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tok)
    results = pipe(["Hello world, how are you?", "ls"], batch_size=2, max_new_tokens=3, do_sample=False)
    assert len(results) == 2


def test_a_copied_tokenizer_without_a_pad_token_gets_one(exported, tmp_path):
    """Meta's Llama-2 tokenizer files say `pad_token: null`; the copy names the pad token, the rest kept."""
    _, first = exported
    meta_like = tmp_path / "meta"
    meta_like.mkdir()
    for name in os.listdir(first):
        (meta_like / name).write_bytes(open(f"{first}/{name}", "rb").read())
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config = json.loads((meta_like / name).read_text())
        config["pad_token"] = None
        (meta_like / name).write_text(json.dumps(config))
    out = tmp_path / "out"
    hf.save_tokenizer(str(meta_like), str(out))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        assert json.loads((out / name).read_text())["pad_token"] == "<unk>", name
    got = _auto_tokenizer_in_fresh_process(str(out), "print(json.dumps([tok.pad_token, tok(['a b c', 'a'], "
                                           "padding=True)['input_ids']]))")
    assert got[0] == "<unk>" and len(got[1][0]) == len(got[1][1])


def test_the_export_carries_a_datasets_jinja_template(tmp_path):
    """A dataset built with --chat-template hf|PATH keeps its template in tokenizer/chat_template.jinja; the
    exported tokenizer renders with exactly that (both places transformers reads it), not Llama 2's."""
    import transformers

    from agentlm_jax.hf.tokenizer import llama2_chat_jinja, save_tokenizer
    from tests.data_pipeline.hf_fixtures import make_tokenizer_dir, template_text

    template = template_text("chatml.jinja")
    source = make_tokenizer_dir(tmp_path / "dataset-tokenizer", template, style="chatml.jinja", in_config=False)
    save_tokenizer(source, str(tmp_path / "export"))
    assert (tmp_path / "export" / "chat_template.jinja").read_text() == template
    config = json.loads((tmp_path / "export" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == template != llama2_chat_jinja()
    exported = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    reference = transformers.AutoTokenizer.from_pretrained(source)
    assert exported.apply_chat_template(messages, tokenize=False) == \
        reference.apply_chat_template(messages, tokenize=False, chat_template=template)
    assert "<|im_start|>" in exported.apply_chat_template(messages, tokenize=False)
