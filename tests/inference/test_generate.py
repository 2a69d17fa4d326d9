"""KV-cache generation: greedy tokens equal `transformers` generate (prompts sharing a prefill too); cached
decoding equals recomputation; one compilation for any number of steps; sampling filters keep exactly the tokens
they should."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from agentlm_jax.inference.generate import Generator, left_pad, nest_prefixes
from agentlm_jax.hf import load_hf_model
from agentlm_jax.model.kv_cache import KVCache
from agentlm_jax.config import SamplingConfig
from agentlm_jax.inference.sampling import filter_logits, sample
from tests.helpers.hf import TINY, model_from_params, transformers_greedy

PROMPT_LENGTHS = (5, 12, 1, 30)
forward = nnx.jit(lambda model, tokens, positions, segment_ids: model(tokens, positions, segment_ids))
decode = nnx.jit(lambda model, tokens, positions, segment_ids, cache: model.decode(tokens, positions, segment_ids,
                                                                                   cache))


@pytest.fixture(scope="module")
def models(hf_checkpoints):
    return {name: load_hf_model(path, show_progress=False)[1] for name, (_, _, path) in hf_checkpoints.items()}


def _prompts(vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab_size, n).tolist() for n in PROMPT_LENGTHS]


@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_greedy_matches_transformers_generate(hf_checkpoints, models, name):
    cfg, torch_model, _ = hf_checkpoints[name]
    prompts = _prompts(cfg.vocab_size, seed=1)
    free_run = Generator(models[name], stop_token_ids=[]).__call__(prompts, max_new_tokens=12).tokens
    # Stop token: a token row 0 produces at step 4 (and not before), so rows stop at different steps.
    stop_id = next(t for t in free_run[0][4:] if t not in free_run[0][:4])
    result = Generator(models[name], stop_token_ids=[stop_id])(prompts, max_new_tokens=12)
    expected = transformers_greedy(torch_model, prompts, 12, stop_id)
    assert result.tokens == expected
    assert result.finished[0] and result.tokens[0][-1] == stop_id
    assert not all(result.finished)  # other rows ran to max_new_tokens
    assert all(len(t) <= 12 for t in result.tokens)


def test_cached_decoding_equals_full_recomputation(models):
    """Prefill + one-token steps through the cache give the logits of a full forward pass, left padding included."""
    model = models["gqa"]
    cfg = model.config
    prompts = _prompts(cfg.vocab_size, seed=2)[:3]
    full_tokens = [p + list(np.random.default_rng(len(p)).integers(3, cfg.vocab_size, 4)) for p in prompts]
    P = 16
    tokens, positions, segment_ids = left_pad(full_tokens, P + 4, pad_id=0)
    expected = np.asarray(forward(model, tokens, positions, segment_ids))

    cache = KVCache.create(cfg, len(prompts), 32)
    logits, cache = decode(model, tokens[:, :P], positions[:, :P], segment_ids[:, :P], cache)
    steps = [logits]
    for t in range(P, P + 4):
        logits, cache = decode(model, tokens[:, t:t + 1], positions[:, t:t + 1], segment_ids[:, t:t + 1], cache)
        steps.append(logits)
    got = np.concatenate([np.asarray(s) for s in steps], axis=1)
    real = segment_ids.astype(bool)
    np.testing.assert_allclose(got[real], expected[real], atol=1e-5)
    assert int(cache.length) == P + 4

    # and end to end: greedy generation = argmax of a full recomputation at every step
    generated = Generator(model, stop_token_ids=[])(prompts, max_new_tokens=6).tokens
    rows = [list(p) for p in prompts]
    for _ in range(6):  # left-padded to one fixed length: one compilation
        t, pos, seg = left_pad(rows, max(map(len, prompts)) + 6, pad_id=0)
        nxt = np.asarray(forward(model, t, pos, seg))[:, -1].argmax(-1)
        rows = [r + [int(n)] for r, n in zip(rows, nxt)]
    assert generated == [r[len(p):] for r, p in zip(rows, prompts)]


def test_nest_prefixes_finds_each_prompts_longest_extension():
    prompts = [[1, 2, 3], [1, 2], [4], [1, 2, 3, 4], [1, 2], [4, 5], [2], [1, 2, 3, 4]]
    sources, source_of = nest_prefixes(prompts)
    assert sources == [3, 5, 6]  # a repeated prompt is one source (its first index)
    assert source_of == [3, 3, 5, 3, 3, 5, 6, 3]


def test_prompts_sharing_a_prefill_generate_what_transformers_generates(hf_checkpoints, models):
    """The turns of one conversation (prompts that are prefixes of a longer one) are prefilled once, as their
    longest prompt; each row decodes from its own cut of that cache. The tokens are transformers' greedy ones."""
    cfg, torch_model, _ = hf_checkpoints["gqa"]
    rng = np.random.default_rng(7)
    a, b = rng.integers(3, cfg.vocab_size, 30).tolist(), rng.integers(3, cfg.vocab_size, 17).tolist()
    prompts = [a[:9], b, a, a[:21], b[:4], [5, 6], a[:21]]
    assert len(nest_prefixes(prompts)[0]) == 3  # a, b, [5, 6]: the shared path runs
    free_run = Generator(models["gqa"], stop_token_ids=[])(prompts, max_new_tokens=10).tokens
    stop_id = next(t for t in free_run[0][3:] if t not in free_run[0][:3])  # row 0 stops early, others may not
    expected = transformers_greedy(torch_model, prompts, 10, stop_id)
    generator = Generator(models["gqa"], stop_token_ids=[stop_id])
    shared = generator(prompts, max_new_tokens=10, share_prefixes=True)
    assert shared.tokens == expected
    assert shared.finished[0] and not all(shared.finished)
    assert generator(prompts, max_new_tokens=10).tokens == expected  # and the plain path, same generator


def test_decoding_compiles_once(models):
    compiles = []

    def on_event(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    generator = Generator(models["mha"], stop_token_ids=[])
    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        generator(_prompts(256, seed=3)[1:], max_new_tokens=3)  # batch of 3: a shape no other test compiles
        assert compiles  # the listener sees compilations
        before = len(compiles)
        for max_new in (5, 20):  # more steps, other prompts of the same length bucket: nothing new to compile
            result = generator(_prompts(256, seed=max_new)[1:], max_new_tokens=max_new)
            assert result.steps == max_new and all(len(t) == max_new for t in result.tokens)
        assert len(compiles) == before
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)


def test_top_k_and_top_p_keep_exactly_the_right_tokens():
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.07, 0.03]]))
    kept = lambda cfg: np.isfinite(np.asarray(filter_logits(logits, cfg)))[0].tolist()  # noqa: E731
    assert kept(SamplingConfig(greedy=False, top_k=2)) == [True, True, False, False, False]
    assert kept(SamplingConfig(greedy=False, top_p=0.5)) == [True, False, False, False, False]
    assert kept(SamplingConfig(greedy=False, top_p=0.7)) == [True, True, False, False, False]
    assert kept(SamplingConfig(greedy=False, top_p=0.76)) == [True, True, True, False, False]
    assert kept(SamplingConfig(greedy=False, top_k=3, top_p=0.95)) == [True, True, True, False, False]


def test_sampling_frequencies_follow_the_tempered_distribution():
    n = 20000
    logits = jnp.tile(jnp.log(jnp.array([0.5, 0.25, 0.15, 0.07, 0.03])), (n, 1))
    for temperature in (1.0, 0.5):
        tokens = np.asarray(sample(logits, jax.random.key(0), SamplingConfig(greedy=False, temperature=temperature)))
        want = np.asarray(jax.nn.softmax(logits[0] / temperature))
        np.testing.assert_allclose(np.bincount(tokens, minlength=5) / n, want, atol=0.015)
    top_p = np.asarray(sample(logits, jax.random.key(1), SamplingConfig(greedy=False, top_p=0.7)))
    np.testing.assert_allclose(np.bincount(top_p, minlength=5) / n, [2 / 3, 1 / 3, 0, 0, 0], atol=0.015)


def test_sampled_generation_is_seeded(models):
    generator = Generator(models["gqa"], stop_token_ids=[])
    prompts = _prompts(256, seed=4)
    hot = SamplingConfig(greedy=False, temperature=1.5, top_k=50)
    a = generator(prompts, max_new_tokens=8, sampling=hot, seed=0).tokens
    assert a == generator(prompts, max_new_tokens=8, sampling=hot, seed=0).tokens
    assert a != generator(prompts, max_new_tokens=8, sampling=hot, seed=1).tokens
    top1 = generator(prompts, max_new_tokens=8, sampling=SamplingConfig(greedy=False, top_k=1), seed=0).tokens
    assert top1 == generator(prompts, max_new_tokens=8).tokens


# ------------------------------------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def exported_tiny(tmp_path_factory):
    """A random model with the bundled tokenizer's vocabulary, exported (with tokenizer) as an HF directory."""
    from data_pipeline.formats.tokenizer import SAMPLE_TOKENIZER_DIR

    from agentlm_jax.hf import export_hf
    from agentlm_jax.model.llama import init_model

    path = tmp_path_factory.mktemp("tiny-hf")
    export_hf(init_model(TINY, seed=3), TINY, str(path), dtype="float32", tokenizer_path=SAMPLE_TOKENIZER_DIR,
              show_progress=False)
    return str(path)


def _hf_greedy(path: str, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([prompt_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=0)[0, len(prompt_ids):].tolist()
    return out[: out.index(2) + 1] if 2 in out else out


def test_cli_generates_what_transformers_generates_from_the_export(exported_tiny, capsys):
    import transformers

    from agentlm_jax.generate import main

    records = main(["--model", exported_tiny, "--prompt", "Hello world", "--prompt", "ls -la /tmp",
                    "--max-new-tokens", "10", "--greedy", "--json"])
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(exported_tiny)
    for record in records:
        assert record["prompt_tokens"] == hf_tokenizer(record["prompt"])["input_ids"]  # BOS + text
        assert record["tokens"] == _hf_greedy(exported_tiny, record["prompt_tokens"], 10)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["completion"] for r in map(__import__("json").loads, printed)] == [r["completion"] for r in records]


def test_cli_chat_mode_uses_the_pipeline_template(exported_tiny):
    from data_pipeline.formats import chat_template
    from data_pipeline.formats.tokenizer import load_tokenizer

    from agentlm_jax.generate import main

    records = main(["--model", exported_tiny, "--chat", "--prompt", "List the files.", "--max-new-tokens", "6",
                    "--greedy"])
    expected_prompt = chat_template.encode_generation_prompt([{"role": "user", "content": "List the files."}],
                                                             load_tokenizer(exported_tiny))
    assert records[0]["prompt_tokens"] == expected_prompt
    assert records[0]["tokens"] == _hf_greedy(exported_tiny, expected_prompt, 6)


def test_cli_generates_from_a_training_checkpoint(orbax_run):
    from data_pipeline.formats.tokenizer import SAMPLE_TOKENIZER_DIR, load_tokenizer

    from agentlm_jax.generate import main

    directory, saved = orbax_run
    prompt_ids = [1, *load_tokenizer(SAMPLE_TOKENIZER_DIR)("Hello world", add_special_tokens=False)["input_ids"]]
    outputs = {}
    for step, args in ((7, []), (3, ["--step", "3"])):  # tokenizer: the one the run recorded
        records = main(["--model", directory, "--prompt", "Hello world", "--max-new-tokens", "8", "--greedy", *args])
        assert records[0]["prompt_tokens"] == prompt_ids
        expected = Generator(model_from_params(TINY, saved[step]))([prompt_ids], max_new_tokens=8).tokens[0]
        assert records[0]["tokens"] == expected
        outputs[step] = expected
    assert outputs[3] != outputs[7]


def test_cli_tokenizer_help_names_the_default_for_checkpoints(capsys):
    from agentlm_jax.generate import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "the tokenizer the training run recorded" in help_text


# ------------------------------------------------------------------------------------------- several hosts
_TWO_HOSTS = """
import os, sys
from agentlm_jax import export, generate
checkpoint, output = sys.argv[1], sys.argv[2] + os.environ["SLURM_PROCID"]  # each host names its own output
export.main(["--checkpoint", checkpoint, "--output", output, "--dtype", "float32"])
generate.main(["--model", checkpoint, "--prompt", "Hello world", "--prompt", "ls", "--max-new-tokens", "6",
               "--greedy", "--json", "--fsdp", "-1"])
"""


def test_cli_export_and_generate_join_the_other_hosts(orbax_run, tmp_path):
    """Two processes (2 CPU devices each) in a SLURM-like environment, as the workers of a pod slice: they join
    up, the parameters are sharded over all 4 devices, only process 0 writes the export and prints; the export
    holds the checkpoint's parameters and the generation equals a single-host one."""
    import json
    import os
    import socket
    import subprocess
    import sys

    from agentlm_jax.generate import main
    from agentlm_jax.hf import import_hf
    from tests.conftest import REPO_ROOT

    directory, saved = orbax_run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
           "JAX_COORDINATOR_PORT": str(port)}
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_HOSTS, directory, str(tmp_path / "hf")], cwd=REPO_ROOT,
                              env={**env, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]

    assert not (tmp_path / "hf1").exists()  # process 1 took part, wrote nothing
    _, params = import_hf(str(tmp_path / "hf0"), show_progress=False)
    jax.tree.map(np.testing.assert_array_equal, params.to_pure_dict(), saved[7])

    records = [[json.loads(line) for line in out.splitlines() if line.startswith("{")] for out, _ in outputs]
    assert records[1] == []
    single_host = main(["--model", directory, "--prompt", "Hello world", "--prompt", "ls", "--max-new-tokens", "6",
                        "--greedy", "--json"])
    assert records[0] == single_host


def test_cli_refuses_a_mesh_that_leaves_hosts_out(orbax_run, monkeypatch):
    from agentlm_jax import export, generate

    monkeypatch.setattr(jax, "process_count", lambda: 2)  # as if a second host had joined
    directory, _ = orbax_run
    with pytest.raises(SystemExit, match="on several hosts shard over all devices"):
        generate.main(["--model", directory, "--prompt", "hi", "--fsdp", "1"])
    with pytest.raises(SystemExit, match="on several hosts shard over all devices"):
        export.main(["--checkpoint", directory, "--output", "unused", "--fsdp", "2"])
