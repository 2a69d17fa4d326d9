"""Jinja chat templates (data_pipeline/formats/hf_template.py) against transformers' own apply_chat_template.

Fixture tokenizers (hf_fixtures.py) are byte-level BPEs with Llama 3 / ChatML special tokens; the templates
are the ones shipped in data_pipeline/templates, plus a deliberately not prefix-stable one.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline.formats import hf_template as ht
from data_pipeline.formats.chat_template import FIRST_PAIR_TOO_LONG, Encoded, Pair
from tests.data_pipeline import hf_fixtures as fx

STYLES = ["llama3.jinja", "chatml.jinja", "chatml_generation.jinja"]
EOT = {"llama3.jinja": "<|eot_id|>", "chatml.jinja": "<|im_end|>", "chatml_generation.jinja": "<|im_end|>"}
GEN_PROMPT = {"llama3.jinja": "<|start_header_id|>assistant<|end_header_id|>\n\n",
              "chatml.jinja": "<|im_start|>assistant\n", "chatml_generation.jinja": "<|im_start|>assistant\n"}

# Renders the last assistant message differently from the same message followed by more turns: the rendering
# through turn k is then not a prefix of the rendering through turn k+1.
NOT_PREFIX_STABLE = (
    "{%- for message in messages %}"
    "{%- if loop.last and message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant (final)\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

CONVERSATIONS = [
    ([Pair("Hi there", "Hello! How can I help?")], "Be brief."),
    ([Pair(" What is 2+2? ", " It is 4.\n"), Pair("demo question", "demo answer", loss=False),
      Pair("and 3+3?", "6, of course.")], "You are a calculator."),
    ([Pair("no system prompt here", "fine"), Pair("next", "```python\nprint('hi')\n```")], None),
    ([Pair("unicode: é ü ß 漢字 🙂", "ok: 漢字 🙂"), Pair("  spaces   and\n\n\nnewlines ", "\tindented\n  code  ")],
     "sys"),
]


@pytest.fixture(scope="module", params=STYLES)
def style(request):
    return request.param


@pytest.fixture(scope="module")
def tok_dir(style, tmp_path_factory):
    return fx.make_tokenizer_dir(tmp_path_factory.mktemp(style.split(".")[0]), fx.template_text(style), style)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return fx.load(tok_dir)  # transformers' own AutoTokenizer, with the template from tokenizer_config.json


@pytest.fixture(scope="module")
def encoder(tok_dir, tok):
    return ht.TemplateEncoder(tok, ht.resolve_template("hf", tok_dir))


def messages_of(pairs, system):
    msgs = [{"role": "system", "content": system}] if system else []
    for p in pairs:
        msgs += [{"role": "user", "content": p.user}, {"role": "assistant", "content": p.assistant}]
    return msgs


def test_the_mask_derivation_follows_the_generation_markers(style, tok_dir):
    spec = ht.resolve_template("hf", tok_dir)
    assert spec.mask == ("generation" if style == "chatml_generation.jinja" else "prefix")
    assert spec.text == fx.template_text(style) and len(spec.sha256) == 64


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_ids_equal_apply_chat_template(tok, encoder, conv):
    pairs, system = CONVERSATIONS[conv]
    enc = encoder.encode(pairs, system)
    assert isinstance(enc, Encoded), enc
    # the tokenizer's own template (tokenizer.chat_template), rendered and tokenized by transformers
    assert enc.ids == tok.apply_chat_template(messages_of(pairs, system), tokenize=True, return_dict=False)


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_mask_is_exactly_the_trained_answers_and_their_end_of_turn(style, tok, encoder, conv):
    pairs, system = CONVERSATIONS[conv]
    enc = encoder.encode(pairs, system)
    ids, mask = np.array(enc.ids), np.array(enc.mask)
    eot = tok.convert_tokens_to_ids(EOT[style])
    runs = ht._runs(mask.tolist())
    trained = [p for p in pairs if p.loss]
    assert len(runs) == len(trained)
    for (a, b), pair in zip(runs, trained):
        assert ids[b - 1] == eot and (ids[a:b] == eot).sum() == 1  # the end-of-turn token, once, last
        assert tok.decode(ids[a:b - 1].tolist()).strip() == pair.assistant.strip()
    # everything else is context: the full rendering minus the masked text is the prompts and headers
    assert mask.sum() == sum(b - a for a, b in runs)


def test_generation_prompt_is_not_in_the_loss(style, tok, encoder):
    pairs, system = CONVERSATIONS[1]
    enc = encoder.encode(pairs, system)
    prompt_ids = tok(GEN_PROMPT[style], add_special_tokens=False)["input_ids"]
    ids, mask = enc.ids, enc.mask
    starts = [i for i in range(len(ids)) if ids[i:i + len(prompt_ids)] == prompt_ids]
    assert len(starts) == len(pairs)
    for s in starts:
        assert not any(mask[s:s + len(prompt_ids)])
        assert mask[s + len(prompt_ids)] == (1 if pairs[starts.index(s)].loss else 0)


def test_loss_off_turns_are_not_in_the_loss(tok, encoder):
    pairs = [Pair("q1", "context answer", loss=False), Pair("q2", "trained answer")]
    enc = encoder.encode(pairs, "sys")
    decoded = tok.decode([i for i, m in zip(enc.ids, enc.mask) if m])
    assert "context answer" not in decoded and "trained answer" in decoded


def test_both_derivations_give_the_same_mask(tmp_path):
    """ChatML with and without {% generation %} markers renders the same text: the same ids and mask."""
    plain = fx.load(fx.make_tokenizer_dir(tmp_path / "p", fx.template_text("chatml.jinja"), "chatml.jinja"))
    marked_dir = fx.make_tokenizer_dir(tmp_path / "g", fx.template_text("chatml_generation.jinja"),
                                       "chatml_generation.jinja", in_config=False)
    marked = fx.load(marked_dir)
    a = ht.TemplateEncoder(plain, ht.TemplateSpec("chatml", "", fx.template_text("chatml.jinja")))
    b = ht.TemplateEncoder(marked, ht.resolve_template("hf", marked_dir))  # (from chat_template.jinja)
    assert b.template.source.endswith("chat_template.jinja") and b.uses_generation and not a.uses_generation
    for pairs, system in CONVERSATIONS:
        ea, eb = a.encode(pairs, system), b.encode(pairs, system)
        assert (ea.ids, ea.mask) == (eb.ids, eb.mask)
        # and transformers' own assistant mask, with loss-off turns zeroed, is that mask
        out = marked.apply_chat_template(messages_of(pairs, system), tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)
        hf_mask = list(out["assistant_masks"])
        for (s, e), pair in zip(ht._runs(hf_mask), pairs):
            if not pair.loss:
                hf_mask[s:e] = [0] * (e - s)
        assert eb.mask == hf_mask


def test_not_prefix_stable_template_is_rejected_naming_the_template_and_turn(tmp_path):
    tok = fx.load(fx.make_tokenizer_dir(tmp_path, NOT_PREFIX_STABLE, "chatml.jinja"))
    encoder = ht.TemplateEncoder(tok, ht.TemplateSpec("unstable.jinja", "", NOT_PREFIX_STABLE))
    out = encoder.encode([Pair("q1", "a1"), Pair("q2", "a2")], "sys")
    assert isinstance(out, ht.Rejection) and out.reason == ht.TEMPLATE_NOT_PREFIX_STABLE
    assert out.detail == ("template unstable.jinja: at assistant message 3 (turn 1), the rendering of messages "
                          "1-2 with the generation prompt is not a prefix of the rendering of messages 1-3")
    # rendered the same whether last or not, the same template would be accepted
    stable = NOT_PREFIX_STABLE.replace(" (final)", "")
    fixed = ht.TemplateEncoder(tok, ht.TemplateSpec("stable.jinja", "", stable)).encode([Pair("q1", "a1")], "sys")
    assert isinstance(fixed, Encoded)


def test_a_template_without_end_of_turn_in_its_markers_is_a_mismatch(tmp_path):
    text = fx.template_text("chatml_generation.jinja").replace(
        "{{- message['content'] + '<|im_end|>' }}\n{%- endgeneration %}", "{{- message['content'] }}\n"
        "{%- endgeneration %}{{- '<|im_end|>' }}")
    assert text != fx.template_text("chatml_generation.jinja")
    tok = fx.load(fx.make_tokenizer_dir(tmp_path, text, "chatml_generation.jinja"))
    out = ht.TemplateEncoder(tok, ht.TemplateSpec("no-eot", "", text)).encode([Pair("q", "a")], None)
    assert isinstance(out, ht.Rejection) and out.reason == ht.TEMPLATE_MISMATCH and "end-of-turn" in out.detail


def test_overlong_conversations_keep_leading_whole_pairs(tok, encoder, tok_dir):
    pairs = [Pair(f"question {i}", f"answer number {i} " * 5) for i in range(6)]
    lengths = [len(tok.apply_chat_template(messages_of(pairs[:k], "sys"), tokenize=True, return_dict=False))
               for k in range(1, 7)]
    limit = lengths[2] + 3  # three pairs and a bit of the fourth
    short = ht.TemplateEncoder(tok, ht.resolve_template("hf", tok_dir), max_seq_len=limit)
    enc = short.encode(pairs, "sys")
    assert (enc.pairs_kept, enc.pairs_dropped) == (3, 3) and len(enc.ids) == lengths[2]
    assert enc.ids == tok.apply_chat_template(messages_of(pairs[:3], "sys"), tokenize=True, return_dict=False)
    tiny = ht.TemplateEncoder(tok, ht.resolve_template("hf", tok_dir), max_seq_len=lengths[0] - 1)
    assert tiny.encode(pairs, "sys") == FIRST_PAIR_TOO_LONG


def test_template_sources(tmp_path):
    with pytest.raises(ValueError, match="no chat template"):
        ht.resolve_template("hf", str(tmp_path))
    with pytest.raises(ValueError, match="not llama2, hf or a Jinja file"):
        ht.resolve_template(str(tmp_path / "missing.jinja"), "")
    assert ht.resolve_template("llama2", "") is None
    path = os.path.join(ht.TEMPLATES_DIR, "llama3.jinja")
    spec = ht.resolve_template(path, "")
    assert spec.name == path and spec.mask == "prefix"


# --------------------------------------------------------------------------- the whole build
def _shard_examples(out):
    from data_pipeline.formats import records

    examples = []
    for name in sorted(os.listdir(out)):
        if name.endswith(".tfrecord"):
            with open(os.path.join(out, name), "rb") as f:
                examples += [records.decode_example(p) for p in records.iter_tfrecord(f)]
    return examples


@pytest.fixture(scope="module")
def hf_build(tmp_path_factory):
    tok_dir = fx.make_tokenizer_dir(tmp_path_factory.mktemp("llama3tok"), fx.template_text("llama3.jinja"))
    out = str(tmp_path_factory.mktemp("hfbuild") / "out")
    subprocess.run([sys.executable, "-m", "data_pipeline.build", "--tokenizer", tok_dir, "--chat-template", "hf",
                    "--output", out], check=True, capture_output=True, timeout=600)
    return tok_dir, out


def test_build_with_the_tokenizers_template(hf_build):
    from data_pipeline.sample_data import make_sample_data as sample

    tok_dir, out = hf_build
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    entry = manifest["chat_template"]
    assert entry["name"] == "hf" and entry["mask"] == "prefix" and entry["text"] == fx.template_text("llama3.jinja")
    assert entry["sha256"] == ht.TemplateSpec("", "", fx.template_text("llama3.jinja")).sha256
    assert open(os.path.join(out, "tokenizer", "chat_template.jinja")).read() == entry["text"]
    assert manifest["config"]["chat_template"] == "hf"
    t = manifest["totals"]
    assert t["read"] == t["kept"] + t["filtered"] + t["rejected"] and t["kept"] > 0
    for s in manifest["sources"].values():
        assert not set(s["rejected_by_reason"]) & set(ht.TEMPLATE_REASONS)
    # every example is the tokenizer's own apply_chat_template of its record, and its loss tokens are answers
    tok = fx.load(tok_dir)
    records = {}
    for name in (sample.AGENT_FILE, sample.GPT4_FILE):
        for line in open(sample.HERE / name):
            row = json.loads(line)
            records[str(row.get("id"))] = row
    examples = _shard_examples(out)
    assert len(examples) == t["kept"]
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    checked = 0
    for ex in examples:
        ids, mask = ex.input_ids.tolist(), ex.loss_mask.tolist()
        assert len(ids) <= manifest["config"]["max_seq_len"]
        for a, b in ht._runs(mask):
            assert ids[b - 1] == eot
            assert "<|start_header_id|>" not in tok.decode(ids[a:b])
        row = records.get(ex.id)
        if row is None or any(not isinstance(tn.get("value"), str) or not tn["value"].strip()
                              for tn in row["conversations"]):
            continue
        turns = row["conversations"]
        system = manifest["config"]["system_prompt"]
        assert system is None  # (a Jinja template gets no default system prompt from us: its own applies)
        msgs = []
        for u, a in zip(turns[::2], turns[1::2]):
            msgs += [{"role": "user", "content": u["value"]}, {"role": "assistant", "content": a["value"]}]
        full = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
        if len(full) <= manifest["config"]["max_seq_len"]:
            assert ids == full, ex.id
            checked += 1
    assert checked > 50


def test_build_fails_on_a_not_prefix_stable_template(tmp_path):
    tok_dir = fx.make_tokenizer_dir(tmp_path / "tok", NOT_PREFIX_STABLE, "chatml.jinja")
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "data_pipeline.build", "--tokenizer", tok_dir, "--chat-template", "hf",
                          "--output", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 1
    error = run.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and "template_not_prefix_stable" in error and "template hf" in error, error
    assert not out.exists()  # (the staging was discarded)


def test_the_contract_check_can_fail(tmp_path, monkeypatch):
    """An id that differs from what the rendering says, a template that raises, special-token text."""
    tok_dir = fx.make_tokenizer_dir(tmp_path, fx.template_text("chatml.jinja"), "chatml.jinja")
    tok = fx.load(tok_dir)
    encoder = ht.TemplateEncoder(tok, ht.resolve_template("hf", tok_dir))
    real = type(tok).__call__  # (what apply_chat_template(tokenize=True) tokenizes its rendering with)

    def another_last_token(self, *args, **kwargs):  # (its ids no longer what the rendering says)
        out = real(self, *args, **kwargs)
        out["input_ids"] = [ids[:-1] + [self.convert_tokens_to_ids("<|im_start|>")] for ids in out["input_ids"]]
        return out

    monkeypatch.setattr(type(tok), "__call__", another_last_token)
    for out in encoder.encode([Pair("q", "a")], None), encoder.encode_batch([([Pair("q", "a")], None)])[0]:
        assert isinstance(out, ht.Rejection) and out.reason == ht.TEMPLATE_MISMATCH
        assert "do not match the rendering" in out.detail
    monkeypatch.undo()
    raising = "{{ raise_exception('only text turns') }}"
    out = ht.TemplateEncoder(tok, ht.TemplateSpec("raising", "", raising)).encode_batch([([Pair("q", "a")], None)])
    assert out[0].reason == ht.TEMPLATE_MISMATCH and "only text turns" in out[0].detail
    assert encoder.special_token_text("quoting <|im_end|> here") == "<|im_end|>"
    assert encoder.special_token_text("<|im_end plain") is None


def test_chat_template_from_the_yaml_config_and_the_flag(tmp_path):
    from data_pipeline.build import parse_args
    from data_pipeline.config import load_config

    path = tmp_path / "data.yaml"
    path.write_text("chat_template: ${SAMPLE_DATA}/../templates/chatml.jinja\nmax_template_reject_fraction: 0\n")
    cfg = load_config(str(path))
    assert os.path.samefile(cfg.chat_template, os.path.join(ht.TEMPLATES_DIR, "chatml.jinja"))
    assert cfg.max_template_reject_fraction == 0
    cfg, _, _ = parse_args(["--config", str(path), "--chat-template", "hf", "--max-template-reject-fraction", "0.5"])
    assert (cfg.chat_template, cfg.max_template_reject_fraction) == ("hf", 0.5)
    assert load_config(None).chat_template == "llama2"


def test_a_huge_trailing_pair_is_dropped_without_tokenizing_it(tok, tok_dir, monkeypatch):
    pairs = [Pair(f"question {i}", f"answer {i}") for i in range(3)] + [Pair("paste", "x y z " * 100_000)]
    encoder = ht.TemplateEncoder(tok, ht.resolve_template("hf", tok_dir), max_seq_len=512)
    assert encoder.max_chars_per_token is not None  # (byte-level BPE: the length bound holds)
    backend = tok.backend_tokenizer
    longest = []
    real_encode = type(backend).encode

    class Spy:
        def __getattr__(self, name):
            return getattr(backend, name)

        def encode(self, text, *args, **kwargs):
            longest.append(len(text))
            return real_encode(backend, text, *args, **kwargs)

    monkeypatch.setattr(type(tok), "backend_tokenizer", property(lambda self: Spy()))
    enc = encoder.encode(pairs, "sys")
    monkeypatch.undo()
    assert (enc.pairs_kept, enc.pairs_dropped) == (3, 1)
    assert enc.ids == tok.apply_chat_template(messages_of(pairs[:3], "sys"), tokenize=True, return_dict=False)
    assert max(longest) <= 513 * encoder.max_chars_per_token < 600_000


def test_encoding_offsets_read_the_tokenizers_offsets(tok):
    """EncodingOffsets (the contract check's offsets, read from the encoding one token at a time) is the same
    sequence as the encoding's own offsets list, with Python's indexing rules."""
    encoding = tok("Hello <|im_end|> wörld 漢字\n  x", add_special_tokens=False).encodings[0]
    offsets = ht.EncodingOffsets(encoding)
    assert len(offsets) == len(encoding.offsets) > 5
    assert list(offsets) == encoding.offsets and offsets[-1] == encoding.offsets[-1]
    assert offsets[1:4] == encoding.offsets[1:4] and offsets[::-2] == encoding.offsets[::-2]
    for bad in (len(offsets), -len(offsets) - 1):
        with pytest.raises(IndexError):
            offsets[bad]


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_reference_offsets_are_apply_chat_templates_offset_mapping(tok, encoder, conv):
    pairs, system = CONVERSATIONS[conv]
    messages = encoder.messages(pairs, system)
    text = encoder._contract_texts([messages], ())[0]
    reference = encoder._references([messages], (), [text])[0]
    want = tok.apply_chat_template([messages], tokenize=True, return_dict=True,
                                   tokenizer_kwargs={"return_offsets_mapping": True})
    assert text == tok.apply_chat_template(messages, tokenize=False)
    assert reference.ids == want["input_ids"][0]
    assert [tuple(o) for o in reference.offsets] == [tuple(o) for o in want["offset_mapping"][0]]


def test_the_contract_is_apply_chat_template_with_tools(tok, encoder):
    """The rendering and ids of conversations with tools and tool calls (prefix templates tokenize
    apply_chat_template(tokenize=False)'s rendering themselves) are apply_chat_template(tokenize=True)'s."""
    from data_pipeline.formats.chat_template import ToolCall, ToolResult

    tools = ({"type": "function", "function": {"name": "get_weather", "description": "the weather",
                                               "parameters": {"type": "object", "properties": {}}}},)
    pairs = [Pair("weather in Paris?", "", tool_calls=(ToolCall("get_weather", {"city": "Paris"}, "c1"),)),
             Pair("", "It is sunny.", tool_results=(ToolResult('{"sky": "sunny"}', "c1", "get_weather"),))]
    conversations = [encoder.messages(pairs, "sys"), encoder.messages(pairs[:1], None)]
    texts = encoder._contract_texts(conversations, tools)
    references = encoder._references(conversations, tools, texts)
    assert texts == tok.apply_chat_template(conversations, tools=list(tools), tokenize=False)
    assert [r.ids for r in references] == tok.apply_chat_template(conversations, tools=list(tools), tokenize=True,
                                                                  return_dict=False)


def test_renderings_are_the_compiled_templates_own(tok, encoder):
    """render_many builds the template's context itself: the same text as `Template.render` with the same
    arguments, for each conversation alone (top-level `set`s and namespaces do not carry over), and the same
    error where the template raises."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    text = ("{%- set ns = namespace(n=0) %}{%- set head = bos_token ~ '##' %}{{- head }}"
            "{%- for m in messages %}{%- set ns.n = ns.n + 1 %}{{- ns.n ~ m['role'] ~ ':' ~ m['content'] ~ '\n' }}"
            "{%- endfor %}{{- (tools | tojson) if tools else '' }}{{- 'GEN' if add_generation_prompt else '' }}"
            "{%- if messages[0]['content'] == 'boom' %}{{- raise_exception('no boom') }}{%- endif %}")
    compiled = _compile_jinja_template(text)
    encoder = ht.TemplateEncoder(tok, ht.TemplateSpec("t", "", text))
    conversations = [messages_of(pairs, system) for pairs, system in CONVERSATIONS]
    tools = [{"name": "f"}]
    for generation_prompt in (False, True):
        want = [compiled.render(messages=m, tools=tools, documents=None, add_generation_prompt=generation_prompt,
                                **tok.special_tokens_map) for m in conversations]
        assert encoder.render_many(conversations, generation_prompt, tools) == want
        assert all(w.split("##", 1)[1].startswith("1") for w in want)  # (each count starts again at 1)
    with pytest.raises(Exception) as want:
        compiled.render(messages=[{"role": "user", "content": "boom"}], **tok.special_tokens_map)
    with pytest.raises(type(want.value), match="no boom"):
        encoder.render([{"role": "user", "content": "boom"}])


def test_references_without_encodings_have_the_offsets_converted(tok, encoder, monkeypatch):
    """A tokenizer output without its encodings (nothing to read offsets from): the offsets are then asked
    for as `return_offsets_mapping`, and the encoding is the same."""
    pairs, system = CONVERSATIONS[1]
    want = encoder.encode(pairs, system)
    # (ids and masks come from apply_chat_template for {% generation %} templates, from the tokenizer otherwise)
    name = "apply_chat_template" if encoder.uses_generation else "__call__"
    real = getattr(type(tok), name)

    def without_encodings(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        asked = kwargs.get("tokenizer_kwargs", {}) if encoder.uses_generation else kwargs
        if not asked.get("return_offsets_mapping"):
            out._encodings = None
        return out

    monkeypatch.setattr(type(tok), name, without_encodings)
    messages = encoder.messages(pairs, system)
    reference = encoder._references([messages], (), encoder._contract_texts([messages], ()))[0]
    assert not isinstance(reference.offsets, ht.EncodingOffsets)
    assert encoder.encode(pairs, system) == want


def test_the_special_run_at_the_end_is_found_as_the_regular_expression_finds_it(encoder):
    """`_special_run_start` (the end-of-turn tokens that close an answer span) against the regular expression it
    replaces, on texts made of special tokens (some suffixes of others), newlines and plain characters."""
    import re

    from hypothesis import given, settings
    from hypothesis import strategies as st

    specials = sorted(encoder._special_set, key=len, reverse=True)
    pattern = re.compile(f"(?:{'|'.join(map(re.escape, specials))})+$")
    pieces = st.sampled_from(specials + ["\n", "x", " ", "<", "|>", "end_id|>", specials[0][:-1], specials[-1][1:]])

    @settings(max_examples=400, deadline=None)
    @given(st.lists(pieces, max_size=8))
    def check(parts):
        text = "".join(parts)
        found = pattern.search(text)
        assert encoder._special_run_start(text) == (found.start() if found else None), text

    check()

    class Overlapping:  # special tokens that are suffixes and concatenations of one another
        _special_set = frozenset(["<a>", "a>", "<b><a>", "b>", "\n<c>"])
        _special_lengths = sorted({len(t) for t in _special_set})

    overlapping = re.compile("(?:" + "|".join(map(re.escape, sorted(Overlapping._special_set))) + ")+$")

    @settings(max_examples=400, deadline=None)
    @given(st.lists(st.sampled_from(["<a>", "a>", "<b>", "b>", "<", ">", "\n", "<c>", "x"]), max_size=10))
    def check_overlapping(parts):
        text = "".join(parts)
        found = overlapping.search(text)
        assert ht.TemplateEncoder._special_run_start(Overlapping, text) == (found.start() if found else None), text

    check_overlapping()
    eot = specials[0]
    assert encoder._special_run_start(f"answer{eot}\n") == len("answer")
    assert encoder._special_run_start(f"answer{eot}\n\n") is None
    assert encoder._special_run_start("") is None


def test_special_token_positions_by_lookup_table(encoder):
    """`_special_tokens_at` (a lookup table indexed by id) finds exactly the special ids, also for ids past the
    last special id, beyond the vocabulary and negative ones."""
    rng = np.random.default_rng(0)
    top = max(encoder._special_ids)
    for n in range(300):
        ids = rng.integers(-3 if n % 5 == 0 else 0, top + 900, int(rng.integers(0, 60))).tolist()
        want = [(i, encoder._special_ids[t]) for i, t in enumerate(ids) if t in encoder._special_ids]
        assert encoder._special_tokens_at(ids) == want
    assert encoder._special_tokens_at([]) == []
