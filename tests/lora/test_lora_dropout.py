"""LoRA dropout (`lora.dropout`, PEFT's `lora_dropout`): the adapters' inputs are dropped in the train step only,
with masks drawn from (seed, step, micro-batch, layer, target) alone: dropout 0 is the step without dropout,
dropout > 0 changes the gradients and is the same for the same step, a resumed run is bit-exact, a sharded run
equals one device, and evaluation, generation and the PEFT export never drop.

Tolerances as tests/lora/test_lora_step.py.
"""

import dataclasses
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from agentlm_jax.config import MeshConfig, load_config
from agentlm_jax.data.packing import BATCH_KEYS
from agentlm_jax.lora import ADAPTER_CONFIG, export_peft, import_peft, read_adapter_config
from agentlm_jax.model import lora as lora_lib
from agentlm_jax.sharding import make_mesh
from agentlm_jax.training.state import init_train_state
from tests.helpers.training import TINY_MODEL
from tests.lora.test_lora_step import (LORA, LOSS_RTOL, PARAM_ATOL, adapters, base, batches,  # noqa: F401
                                       inputs, lora_model, make_step, train)

RATE = 0.3
DROP = dataclasses.replace(LORA, dropout=RATE)
ONE = MeshConfig(data=1, fsdp=1, tensor=1)


@pytest.fixture(autouse=True)
def _cache(compilation_cache):
    """Several tests compile the same steps (a resumed run builds its step again)."""


@pytest.fixture(scope="module")
def moved(adapters):
    """Adapters with B ≠ 0 (as after some training), so the adapters' output, and its dropout, shows in the loss."""
    rng = np.random.default_rng(3)
    return jax.tree.map(lambda x: x + 0.2 * rng.standard_normal(x.shape).astype(x.dtype), adapters)


def grads_at(step_fn, adapters, base, batch, step):
    fn = jax.jit(step_fn._grads_and_sums)
    grads, sums = fn(adapters, {k: batch[k] for k in BATCH_KEYS}, base, jnp.asarray(step, jnp.int32))
    return jax.device_get(grads), float(sums["loss_sum"] / sums["count"])


def max_diff(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_the_config_accepts_a_rate_in_0_1():
    assert load_config(None, ["lora.enabled=true", "lora.dropout=0.05"]).lora.dropout == 0.05
    from agentlm_jax.errors import ConfigError

    with pytest.raises(ConfigError, match=r"lora.dropout must be in \[0, 1\)"):
        load_config(None, ["lora.enabled=true", "lora.dropout=1.0"])


def test_the_mask_is_inverted_dropout_and_independent_of_the_mesh():
    x = jnp.ones((8, 64, 32), jnp.float32)
    key = lora_lib.step_key(0, 5)
    y = np.asarray(jax.jit(lambda x: lora_lib.dropout(x, RATE, key))(x))
    assert set(np.unique(y).tolist()) == {0.0, np.float32(1 / (1 - RATE))}
    assert abs((y == 0).mean() - RATE) < 0.01
    # the same bits when x and the result are sharded over 8 devices (threefry: a function of key and index)
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2), jax.devices()[:8])
    s = NamedSharding(mesh, P("fsdp", None, "tensor"))
    sharded = jax.jit(lambda x: lora_lib.dropout(x, RATE, key), in_shardings=s, out_shardings=s)(jax.device_put(x, s))
    assert sharded.sharding.spec == P("fsdp", None, "tensor")
    np.testing.assert_array_equal(np.asarray(sharded), y)
    # keys: one per step, micro-batch, layer and target
    keys = [lora_lib.step_key(0, 5), lora_lib.step_key(0, 6), lora_lib.step_key(1, 5), lora_lib.step_key(0, 5, 1)]
    layer = lora_lib.layer_keys(keys[0], 2)
    keys += [layer[0], layer[1], lora_lib.target_key(layer[0], "q"), lora_lib.target_key(layer[0], "k")]
    data = {tuple(np.asarray(jax.random.key_data(k)).tolist()) for k in keys}
    assert len(data) == len(keys)


def test_dropout_zero_is_the_step_without_dropout(base, moved, batches):
    """dropout 0 draws nothing: no random numbers in the compiled step, and the seed changes no bit."""
    abstract_batch = {k: jax.ShapeDtypeStruct(batches[0][k].shape, batches[0][k].dtype) for k in BATCH_KEYS}

    def step_hlo(lora, seed=0):
        step, optimizer, _, _ = make_step(ONE, lora=lora)
        step.seed = seed
        state = jax.eval_shape(lambda p: init_train_state(p, optimizer), moved)
        return step.lower(state, abstract_batch, base).as_text()

    assert "threefry" not in step_hlo(LORA)
    assert step_hlo(LORA, seed=0) == step_hlo(LORA, seed=7)
    assert "threefry" in step_hlo(DROP), "the dropout step draws its masks"
    # and the micro-batch path too
    step, optimizer, _, _ = make_step(ONE, lora=LORA, micro_batches=2)
    state = jax.eval_shape(lambda p: init_train_state(p, optimizer), moved)
    assert "threefry" not in step.lower(state, abstract_batch, base).as_text()


def test_dropout_changes_the_gradients_and_is_the_same_for_the_same_step(base, moved, batches):
    plain = make_step(ONE, lora=LORA)[0]
    drop = make_step(ONE, lora=DROP)[0]
    g0, loss0 = grads_at(plain, moved, base, batches[0], 0)
    g_a, loss_a = grads_at(drop, moved, base, batches[0], 4)
    g_b, loss_b = grads_at(drop, moved, base, batches[0], 4)
    g_c, loss_c = grads_at(drop, moved, base, batches[0], 5)
    assert loss_a == loss_b and max_diff(g_a, g_b) == 0.0, "the same step: the same masks, bit for bit"
    assert abs(loss_a - loss0) > 1e-4 and max_diff(g_a, g0) > 1e-3, "dropout acts on the loss and gradients"
    assert abs(loss_c - loss_a) > 1e-5 and max_diff(g_c, g_a) > 1e-3, "another step: other masks"
    drop.seed = 1
    _, loss_seed = grads_at(drop, moved, base, batches[0], 4)
    assert loss_seed != loss_a, "another seed: other masks"
    # dropout 0 with a step given is still the step without dropout
    g0_again, loss0_again = grads_at(plain, moved, base, batches[0], 4)
    assert loss0_again == loss0 and max_diff(g0_again, g0) == 0.0


def test_evaluation_and_generation_do_not_drop(base, moved, batches):
    plain, drop = make_step(ONE, lora=LORA)[0], make_step(ONE, lora=DROP)[0]
    plain.base = drop.base = base
    batch = {k: batches[0][k] for k in BATCH_KEYS}
    want, got = jax.device_get(plain.eval_sums(moved, batch)), jax.device_get(drop.eval_sums(moved, batch))
    assert all(np.array_equal(want[k], got[k]) for k in want)
    # the forward pass without a key (generation, the HF/PEFT exports' checks): no dropout
    logits = np.asarray(lora_model(base, moved, lora=DROP)(*inputs(batches[0])))
    np.testing.assert_array_equal(logits, np.asarray(lora_model(base, moved, lora=LORA)(*inputs(batches[0]))))
    # while the train step's loss on the same batch is another one
    _, train_loss = grads_at(drop, moved, base, batches[0], 0)
    assert abs(train_loss - float(want["loss_sum"] / want["count"])) > 1e-4


def test_a_resumed_run_with_dropout_is_bit_exact(base, adapters, batches):
    """3 steps in one go = 1 step, the state through the host (as a checkpoint), then 2 steps of a new step
    function: the masks depend on the step number only. With micro-batches, so each has its own masks."""
    kw = dict(lora=DROP, micro_batches=2)
    losses, params, state, _ = train(base, adapters, batches, ONE, **kw)
    first_losses, _, first_state, _ = train(base, adapters, batches[:1], ONE, **kw)
    saved = jax.device_get(first_state)
    step, _, shardings, base_s = make_step(ONE, **kw)
    step.base = jax.device_put(base, base_s)
    resumed = jax.device_put(saved, shardings)
    rest = []
    for batch in batches[1:]:
        resumed, metrics = step(resumed, {k: batch[k] for k in BATCH_KEYS})
        rest.append(float(metrics["loss"]))
    np.testing.assert_array_equal(np.array([*first_losses, *rest]), losses)
    assert max_diff(jax.device_get(resumed.params), params) == 0.0
    assert max_diff(jax.device_get(resumed.opt_state), jax.device_get(state.opt_state)) == 0.0
    no_drop = train(base, adapters, batches, ONE, lora=LORA, micro_batches=2)
    assert max_diff(no_drop[1], params) > 1e-3, "dropout changed the training"


def test_sharded_training_with_dropout_equals_one_device(base, adapters, batches):
    single = train(base, adapters, batches, ONE, lora=DROP)
    sharded = train(base, adapters, batches, MeshConfig(data=1, fsdp=4, tensor=2), lora=DROP,
                    loss_impl="vocab_parallel")
    np.testing.assert_allclose(sharded[0], single[0], rtol=LOSS_RTOL)
    moved = max_diff(sharded[1], single[1])
    assert moved < PARAM_ATOL, f"adapters differ by up to {moved:.2e}"
    assert max_diff(single[1], adapters) > 1e-3, "the adapters should have moved"


def test_the_peft_export_writes_lora_dropout_and_the_import_reads_it(base, moved, tmp_path, caplog):
    import peft

    out = str(tmp_path / "adapter")
    export_peft(moved, TINY_MODEL, DROP, out)
    assert json.load(open(os.path.join(out, ADAPTER_CONFIG)))["lora_dropout"] == RATE
    assert peft.LoraConfig.from_pretrained(out).lora_dropout == RATE
    assert read_adapter_config(out)["lora_dropout"] == RATE
    with caplog.at_level(logging.WARNING, logger="agentlm_jax.lora"):
        same = import_peft(out, TINY_MODEL, DROP).to_pure_dict()
    assert not caplog.records
    assert max_diff(jax.device_get(same), moved) == 0.0, "dropout changes no tensor"
    with caplog.at_level(logging.WARNING, logger="agentlm_jax.lora"):
        import_peft(out, TINY_MODEL, LORA)
    assert "trained with lora_dropout=0.3" in caplog.text and "set lora.dropout=0.3" in caplog.text


def unstack(tree, layers):
    return {**tree, "layers": {i: jax.tree.map(lambda x: x[i], tree["layers"]) for i in range(layers)}}


def test_scanned_and_unscanned_layers_draw_the_same_masks(base, moved, batches):
    cfg = TINY_MODEL.replace(scan_layers=False)
    scanned = grads_at(make_step(ONE, lora=DROP)[0], moved, base, batches[0], 2)[1]
    unscanned = grads_at(make_step(ONE, lora=DROP, model_cfg=cfg)[0], unstack(moved, cfg.num_layers),
                         unstack(base, cfg.num_layers), batches[0], 2)[1]
    np.testing.assert_allclose(unscanned, scanned, rtol=LOSS_RTOL)
    assert abs(scanned - grads_at(make_step(ONE, lora=LORA)[0], moved, base, batches[0], 2)[1]) > 1e-4
