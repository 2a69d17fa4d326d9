"""The loss: every implementation (full, chunked, shard_map vocab-parallel) equals the plain cross-entropy and
its gradients; the masked loss equals PyTorch's cross-entropy with -100 labels through `transformers`' Llama;
no attention or loss crosses the boundary of packed conversations; chunked / vocab-parallel never hold the
full-vocabulary logits."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from agentlm_jax import ops
from agentlm_jax.ops.cpu import cross_entropy as cpu_cross_entropy
from agentlm_jax.training import loss as loss_lib
from agentlm_jax.hf import import_hf
from agentlm_jax.model.llama import Llama, abstract_model
from agentlm_jax.config import DEFAULT_RULES, MeshConfig
from agentlm_jax.sharding import make_mesh
from tests.helpers.hf import SMALL, make_hf_model, save_hf_model

B, T, D, V = 8, 32, 16, 1000  # V appears in no other dimension, so it can be searched for in compiled HLO


def plain_nll(h, w, targets):
    return -jnp.take_along_axis(jax.nn.log_softmax(h @ w), targets[..., None], axis=-1)[..., 0]


@pytest.fixture(scope="module")
def operands():
    k = jax.random.split(jax.random.key(0), 4)
    h = jax.random.normal(k[0], (B, T, D))
    w = jax.random.normal(k[1], (D, V)) * 2.0  # peaked logits: a wrong max or sum shows
    targets = jax.random.randint(k[2], (B, T), 0, V)
    weights = jax.random.uniform(k[3], (B, T))  # a different weight per position, so gradients are specific
    return h, w, targets, weights


MESHES = {"one device": MeshConfig(data=1, fsdp=1, tensor=1), "fsdp4 x tensor2": MeshConfig(fsdp=4, tensor=2),
          "data2 x fsdp2 x tensor2": MeshConfig(data=2, fsdp=2, tensor=2)}


@pytest.mark.parametrize("impl, chunk, mesh_name", [
    ("full", None, "one device"), ("chunked", 8, "one device"), ("chunked", 8, "fsdp4 x tensor2"),
    ("vocab_parallel", None, "fsdp4 x tensor2"), ("vocab_parallel", 16, "data2 x fsdp2 x tensor2"),
])
def test_every_loss_equals_the_plain_loss_and_its_gradients(operands, impl, chunk, mesh_name):
    h, w, targets, weights = operands
    cfg = MESHES[mesh_name]
    mesh = make_mesh(cfg, jax.devices()[:cfg.data * cfg.fsdp * cfg.tensor])
    # placed as the model leaves them: rows over the batch axes, the head over (fsdp, tensor)
    h_s = jax.device_put(h, NamedSharding(mesh, P(("data", "fsdp"))))
    w_s = jax.device_put(w, NamedSharding(mesh, P("fsdp", "tensor")))
    t_s = jax.device_put(targets, NamedSharding(mesh, P(("data", "fsdp"))))

    def ours(h, w):
        return ops.token_nll(h, w, t_s, impl=impl, chunk_size=chunk, mesh=mesh, rules=DEFAULT_RULES)

    def weighted(fn):
        return lambda h, w: jnp.sum(fn(h, w) * weights)

    np.testing.assert_allclose(jax.jit(ours)(h_s, w_s), plain_nll(h, w, targets), rtol=1e-5, atol=1e-5)
    got = jax.jit(jax.grad(weighted(ours), argnums=(0, 1)))(h_s, w_s)
    want = jax.grad(weighted(lambda h, w: plain_nll(h, w, targets)), argnums=(0, 1))(h, w)
    for g, r, name in zip(got, want, ("hidden", "head")):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5, err_msg=f"gradient w.r.t. {name}")


def loss_positions(seed: int = 1) -> np.ndarray:
    """[B,T] loss mask as SFT data has it: runs of loss positions (answers) between runs without; one row with
    none, one with only loss positions, the rest different."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((B, T), np.int32)
    for r in range(2, B):
        for start in rng.integers(0, T, 3):
            mask[r, start:start + rng.integers(1, 8)] = 1
    mask[1] = 1
    return mask


@pytest.mark.parametrize("impl, chunk, mesh_name", [
    ("chunked", 8, "one device"), ("chunked", None, "one device"), ("chunked", 4, "fsdp4 x tensor2"),
    ("vocab_parallel", 8, "fsdp4 x tensor2"), ("vocab_parallel", 16, "data2 x fsdp2 x tensor2"),
])
@pytest.mark.parametrize("reduction", ["random weight per position", "mean over the loss positions"])
def test_masked_losses_compute_exactly_the_loss_positions(operands, impl, chunk, mesh_name, reduction):
    """Given the loss mask, the chunked losses gather the loss positions to the front and skip the chunks
    after them: the nll at every loss position and the gradients equal the plain loss's; 0 elsewhere.
    Both kinds of reduction: the train step's mean (the chunk loop's gradients computed in the forward pass,
    scaled) and any other weighting (the general backward pass)."""
    h, w, targets, weights = operands
    mask = jnp.asarray(loss_positions())
    if reduction != "random weight per position":
        weights = mask / mask.sum()
    cfg = MESHES[mesh_name]
    mesh = make_mesh(cfg, jax.devices()[:cfg.data * cfg.fsdp * cfg.tensor])
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    h_s, t_s, m_s = (jax.device_put(x, rows) for x in (h, targets, mask))
    w_s = jax.device_put(w, NamedSharding(mesh, P("fsdp", "tensor")))

    def ours(h, w):
        return ops.token_nll(h, w, t_s, impl=impl, chunk_size=chunk, mesh=mesh, rules=DEFAULT_RULES, mask=m_s)

    def plain(h, w):
        return jnp.where(mask > 0, plain_nll(h, w, targets), 0.0)

    np.testing.assert_allclose(jax.jit(ours)(h_s, w_s), plain(h, w), rtol=1e-5, atol=1e-5)
    got = jax.jit(jax.grad(lambda h, w: jnp.sum(ours(h, w) * weights), argnums=(0, 1)))(h_s, w_s)
    want = jax.grad(lambda h, w: jnp.sum(plain(h, w) * weights), argnums=(0, 1))(h, w)
    for g, r, name in zip(got, want, ("hidden", "head")):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5, err_msg=f"gradient w.r.t. {name}")


def test_fused_head_gradient_is_used_when_the_cotangent_is_proportional_to_the_loss_positions(operands):
    """The chunk loop's backward pass scales the gradients its forward pass computed, without recomputing the
    logits, whenever the cotangent is c·weights: poisoning the saved log-sum-exp (which only recomputation
    reads) leaves that gradient exact, while any other cotangent does recompute (and so turns NaN)."""
    h, w, targets, _ = operands
    n, G, W = 4, 2, 32  # chunks × groups × positions per chunk: the [n,G,W] layout of the chunk loop
    h_c, t_c = h.reshape(n, G, W, D), targets.reshape(n, G, W)
    position = jnp.arange(n)[:, None, None] * W + jnp.arange(W)  # a position's index within its group
    weights = position < jnp.array([70, 20])[None, :, None]  # the groups' first 70 and 20 positions
    count = jnp.int32(3)  # chunks holding weighted positions: ceil(70 / 32)
    _, residuals = cpu_cross_entropy._first_chunks_fwd(h_c, w, t_c, weights, count)
    poisoned = residuals[:5] + (jnp.full_like(residuals[5], jnp.nan),) + residuals[6:]

    def reference(g):
        nll = lambda h, w: plain_nll(h.reshape(-1, D), w, t_c.reshape(-1)).reshape(n, G, W)  # noqa: E731
        return jax.grad(lambda h, w: jnp.sum(nll(h, w) * g), argnums=(0, 1))(h_c, w)

    proportional = jnp.where(weights, 0.25, 0.0)
    want_h, want_w = reference(proportional)
    got_h, got_w, *_ = cpu_cross_entropy._first_chunks_bwd(poisoned, proportional)
    np.testing.assert_allclose(got_h, want_h, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got_w, want_w, rtol=1e-4, atol=1e-6)
    other = proportional.at[0, 0, 0].set(0.5)
    assert np.isnan(np.asarray(cpu_cross_entropy._first_chunks_bwd(poisoned, other)[1])).all()
    want_h, want_w = reference(other)
    got_h, got_w, *_ = cpu_cross_entropy._first_chunks_bwd(residuals, other)
    np.testing.assert_allclose(got_h, want_h, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got_w, want_w, rtol=1e-4, atol=1e-6)


def test_masked_loss_without_loss_positions_is_zero_with_zero_gradients(operands):
    h, w, targets, _ = operands
    none = jnp.zeros((B, T), jnp.int32)
    fn = lambda h, w: ops.token_nll(h, w, targets, impl="chunked", chunk_size=8, mask=none)  # noqa: E731
    assert not np.asarray(jax.jit(fn)(h, w)).any()
    for g in jax.jit(jax.grad(lambda h, w: fn(h, w).sum(), argnums=(0, 1)))(h, w):
        assert not np.asarray(g).any()


def _grad_fn(impl, chunk, mesh, targets):
    return jax.jit(jax.grad(lambda h, w: ops.token_nll(h, w, targets, impl=impl, chunk_size=chunk,
                                                            mesh=mesh, rules=DEFAULT_RULES).sum(), argnums=(0, 1)))


def test_chunked_loss_never_holds_the_whole_logits(operands):
    h, w, targets, _ = operands
    logits_bytes = B * T * V * 4
    temp = {impl: _grad_fn(impl, 4, None, targets).lower(h, w).compile().memory_analysis().temp_size_in_bytes
            for impl in ("full", "chunked")}
    assert temp["full"] >= logits_bytes, temp
    assert temp["chunked"] < logits_bytes / 2, f"chunked loss used {temp['chunked']} temp bytes"


def test_vocab_parallel_loss_never_gathers_the_full_vocabulary(operands):
    h, w, targets, _ = operands
    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
    h = jax.device_put(h, NamedSharding(mesh, P(("data", "fsdp"))))
    w = jax.device_put(w, NamedSharding(mesh, P("fsdp", "tensor")))
    hlo = _grad_fn("vocab_parallel", None, mesh, targets).lower(h, w).compile().as_text()
    full_vocab = re.findall(rf"f32\[[0-9,]*\b{V}\b[0-9,]*\]", hlo)
    assert not full_vocab, f"per-device arrays with the whole vocabulary: {sorted(set(full_vocab))}"
    assert re.search(rf"f32\[[0-9,]*\b{V // 2}\]", hlo), "expected the per-shard logits [.., V/2]"


def test_loss_sums_split_agent_general_and_tasks_and_skip_masked_positions():
    rng = np.random.default_rng(0)
    nll = rng.random((4, 6)).astype(np.float32)
    mask = rng.random((4, 6)) < 0.6
    nll[~mask] = np.nan  # whatever sits at a masked position must not reach any sum
    nll[0, ~mask[0]] = np.inf
    batch = {"loss_mask": mask.astype(np.int32), "is_agent": (rng.random((4, 6)) < 0.5).astype(np.int32),
             "task_ids": rng.integers(-1, 3, (4, 6)).astype(np.int32)}
    sums = jax.device_get(loss_lib.loss_sums(jnp.asarray(nll), batch, num_tasks=3))
    agent = mask & (batch["is_agent"] > 0)
    np.testing.assert_allclose(sums["loss_sum"], nll[mask].sum(), rtol=1e-6)
    assert sums["count"] == mask.sum() and sums["agent_count"] == agent.sum()
    np.testing.assert_allclose(sums["agent_loss_sum"], nll[agent].sum(), rtol=1e-6)
    np.testing.assert_allclose(sums["general_loss_sum"], nll[mask & ~agent].sum(), rtol=1e-5)
    for k in range(3):
        in_task = mask & (batch["task_ids"] == k)
        np.testing.assert_allclose(sums["task_loss_sum"][k], nll[in_task].sum(), rtol=1e-6)
        assert sums["task_count"][k] == in_task.sum()


# ------------------------------------------------------------------------------ against PyTorch / transformers
@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """The same random weights as a transformers LlamaForCausalLM and as our Llama (through HF import); the
    blockwise attention in blocks of 4 positions, so its backward pass crosses many tiles."""
    cfg = SMALL["gqa"]
    torch_model = make_hf_model(cfg, seed=3)
    path = save_hf_model(torch_model, tmp_path_factory.mktemp("hf-loss"))
    cfg, params = import_hf(path, show_progress=False)
    return cfg.replace(attention_impl="blockwise", attention_block_size=4), torch_model, params.to_pure_dict()


def padded_batch(vocab: int, lengths=(16, 11, 5), seed: int = 0) -> dict[str, np.ndarray]:
    """One conversation per row, padded at the end; next-token targets; a random loss mask on real tokens."""
    rng = np.random.default_rng(seed)
    rows, width = len(lengths), max(lengths)
    ids = rng.integers(3, vocab, (rows, width + 1)).astype(np.int32)
    real = np.arange(width)[None, :] < np.asarray(lengths)[:, None]
    return {"tokens": np.where(real, ids[:, :-1], 0), "targets": np.where(real, ids[:, 1:], 0),
            "loss_mask": (real & (rng.random((rows, width)) < 0.7)).astype(np.int32),
            "positions": np.broadcast_to(np.arange(width, dtype=np.int32), (rows, width)).copy(),
            "segment_ids": real.astype(np.int32), "is_agent": np.zeros((rows, width), np.int32)}


def our_mean_loss(cfg, params, batch):
    graphdef, _ = nnx.split(abstract_model(cfg))
    model = nnx.merge(graphdef, params)
    h = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
    sums = loss_lib.loss_sums(ops.token_nll(h, params["lm_head"]["kernel"], batch["targets"]), batch)
    return sums["loss_sum"] / sums["count"]


def test_masked_loss_and_gradients_equal_pytorch_cross_entropy_with_ignore_index(hf_pair):
    cfg, torch_model, params = hf_pair
    batch = padded_batch(cfg.vocab_size)
    loss, grads = jax.jit(jax.value_and_grad(lambda p: our_mean_loss(cfg, p, batch)))(params)

    labels = np.where(batch["loss_mask"] > 0, batch["targets"], -100)
    torch_model.zero_grad()
    logits = torch_model(torch.as_tensor(batch["tokens"], dtype=torch.long),
                         attention_mask=torch.as_tensor(batch["segment_ids"])).logits
    torch_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size).float(),
                                                   torch.as_tensor(labels, dtype=torch.long).reshape(-1),
                                                   ignore_index=-100)
    torch_loss.backward()
    np.testing.assert_allclose(float(loss), torch_loss.item(), rtol=1e-5)
    # gradients too: the output head ([V,D] in PyTorch) and the token embedding
    np.testing.assert_allclose(grads["lm_head"]["kernel"], torch_model.lm_head.weight.grad.numpy().T,
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads["embedder"]["embedding"],
                               torch_model.model.embed_tokens.weight.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_packed_conversations_neither_attend_nor_lose_across_their_boundary(hf_pair):
    """One row holding conversations A and B gives each exactly the per-token losses it has alone, and
    changing one conversation's tokens changes nothing of the other's."""
    cfg, _, params = hf_pair
    graphdef, _ = nnx.split(abstract_model(cfg))

    @jax.jit
    def nll(params, b):
        model: Llama = nnx.merge(graphdef, params)
        hidden = model.hidden_states(b["tokens"], b["positions"], b["segment_ids"])
        return ops.token_nll(hidden, params["lm_head"]["kernel"], b["targets"])

    def nll_fn(b):
        return nll(params, b)
    rng = np.random.default_rng(1)
    a, b = rng.integers(3, cfg.vocab_size, 11), rng.integers(3, cfg.vocab_size, 14)  # 10 and 13 positions
    width = 28

    def packed(a, b):
        n_a, n_b = len(a) - 1, len(b) - 1
        row = {k: np.zeros((1, width), np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
        row["tokens"][0, :n_a + n_b] = np.concatenate([a[:-1], b[:-1]])
        row["targets"][0, :n_a + n_b] = np.concatenate([a[1:], b[1:]])
        row["positions"][0, :n_a + n_b] = np.concatenate([np.arange(n_a), np.arange(n_b)])
        row["segment_ids"][0, :n_a + n_b] = [1] * n_a + [2] * n_b
        return row

    def alone(x):
        n = len(x) - 1
        row = {k: np.zeros((1, width), np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
        row["tokens"][0, :n], row["targets"][0, :n] = x[:-1], x[1:]
        row["positions"][0, :n], row["segment_ids"][0, :n] = np.arange(n), 1
        return np.asarray(nll_fn(row))[0, :n]

    both = np.asarray(nll_fn(packed(a, b)))[0]
    np.testing.assert_allclose(both[:10], alone(a), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(both[10:23], alone(b), rtol=1e-5, atol=1e-6)

    b_changed = np.asarray(nll_fn(packed(a, rng.integers(3, cfg.vocab_size, 14))))[0]
    np.testing.assert_array_equal(b_changed[:10], both[:10])  # A is untouched by B (bit for bit)
    a_changed = np.asarray(nll_fn(packed(rng.integers(3, cfg.vocab_size, 11), b)))[0]
    np.testing.assert_allclose(a_changed[10:23], both[10:23], rtol=1e-5, atol=1e-6)  # B is untouched by A
    assert not np.allclose(a_changed[:10], both[:10]), "changing A must change A's own losses"
