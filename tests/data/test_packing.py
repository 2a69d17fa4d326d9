"""Next-token shifting and first-fit packing (agentlm_jax/data/packing.py), on in-memory records.

Every conversation is built so that each token says where it came from: token = 1000 * (conversation
number + 1) + position. A target, a loss position or a segment that mixes two conversations is then
visible as a change of the thousands digit.
"""

import logging

import grain
import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from agentlm_jax.data import packing
from data_pipeline.formats.records import Record

TASKS = ["alfworld", "db", "os", "sharegpt"]


def traceable_record(n: int, length: int, rng: np.random.Generator, *, mask_first: bool = True) -> Record:
    ids = 1000 * (n + 1) + np.arange(length, dtype=np.int32)
    mask = (rng.random(length) < 0.6).astype(np.int32)
    mask[0] = int(mask_first)  # a mask on the first token must be dropped by the shift, not leak anywhere
    mask[-1] = 1  # the closing </s> is a target, so the last target of every conversation counts
    task = TASKS[n % len(TASKS)]
    return Record(ids, mask, "general" if task == "sharegpt" else "agent", task, f"conv-{n}")


def conversation_of(tokens: np.ndarray) -> np.ndarray:
    return tokens // 1000 - 1


def pack_all(recs, max_seq_len, bins, rows_per_batch=4, overlong="truncate"):
    features = packing.NextTokenFeatures(max_seq_len, TASKS, overlong=overlong)
    ds = grain.MapDataset.source(recs).map(features).to_iter_dataset()
    rows = packing.first_fit_pack(ds, max_seq_len, bins)
    batches = list(rows.batch(rows_per_batch, batch_fn=lambda r: packing.stack_packed_rows(r, rows_per_batch)))
    return {k: np.concatenate([b[k] for b in batches]) for k in packing.BATCH_KEYS}, features.counts.as_dict()


def test_one_conversation_is_shifted_for_next_token_prediction():
    rec = Record(np.array([1, 5, 6, 7, 2], np.int32), np.array([1, 0, 1, 1, 1], np.int32), "agent", "os", "a")
    out = packing.NextTokenFeatures(8, TASKS)(rec)["columns"]
    tokens, targets, loss_mask, is_agent, task_ids = out.T
    np.testing.assert_array_equal(tokens, [1, 5, 6, 7])
    np.testing.assert_array_equal(targets, [5, 6, 7, 2])
    np.testing.assert_array_equal(loss_mask, [0, 1, 1, 1])
    np.testing.assert_array_equal(is_agent, [1, 1, 1, 1])
    np.testing.assert_array_equal(task_ids, [TASKS.index("os")] * 4)


def assert_packed_exactly(b, recs, max_seq_len):
    """Every record appears once, whole (n <= max_seq_len + 1 tokens), shifted, in its own segment."""
    seg, pos, tok, tgt, loss = b["segment_ids"], b["positions"], b["tokens"], b["targets"], b["loss_mask"]
    assert seg.shape[1] == max_seq_len
    real = seg > 0
    # padding: no loss, no task, nothing but zeros
    assert not loss[~real].any() and (b["task_ids"][~real] == -1).all()
    assert not tok[~real].any() and not tgt[~real].any() and not pos[~real].any()
    # every target is the next token of the same conversation, so no loss can cross a boundary
    np.testing.assert_array_equal(conversation_of(tgt[real]), conversation_of(tok[real]))
    np.testing.assert_array_equal(tgt[real], tok[real] + 1)
    seen = []
    for r in range(len(seg)):
        k = seg[r].max()
        # segments are 1..k in order, contiguous, followed only by padding
        np.testing.assert_array_equal(np.unique(seg[r][seg[r] > 0]), np.arange(1, k + 1))
        assert (np.diff(seg[r][real[r]]) >= 0).all() and not real[r][real[r].sum():].any()
        for s in range(1, k + 1):
            where = seg[r] == s
            convs = np.unique(conversation_of(tok[r][where]))
            assert len(convs) == 1, f"row {r} segment {s} mixes conversations {convs}"
            np.testing.assert_array_equal(pos[r][where], np.arange(where.sum()))  # positions restart
            rec = recs[convs[0]]
            np.testing.assert_array_equal(tok[r][where], rec.input_ids[:-1])
            np.testing.assert_array_equal(loss[r][where], rec.loss_mask[1:])
            assert (b["task_ids"][r][where] == TASKS.index(rec.task)).all()
            assert (b["is_agent"][r][where] == (rec.source == "agent")).all()
            seen.append(convs[0])
    assert sorted(seen) == list(range(len(recs))), "a conversation was lost or packed twice"
    # the loss tokens are exactly the records' target tokens, less a mask on the first token
    assert loss.sum() == sum(int(r.loss_mask.sum() - r.loss_mask[0]) for r in recs)


@pytest.mark.parametrize("max_seq_len,bins", [(64, 4), (256, 16)])
def test_packed_rows_keep_conversations_apart(max_seq_len, bins):
    rng = np.random.default_rng(0)
    recs = [traceable_record(n, int(rng.integers(2, max_seq_len + 2)), rng) for n in range(200)]
    b, counts = pack_all(recs, max_seq_len, bins)
    assert counts == {"read": 200, "kept": 200, "truncated": 0, "dropped_overlong": 0, "dropped_too_short": 0}
    assert_packed_exactly(b, recs, max_seq_len)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(max_seq_len=st.integers(1, 24), bins=st.integers(1, 5), rows_per_batch=st.integers(1, 3),
                  lengths=st.lists(st.integers(2, 25), min_size=1, max_size=30), seed=st.integers(0, 99))
def test_packing_invariants_hold_for_any_lengths(max_seq_len, bins, rows_per_batch, lengths, seed):
    rng = np.random.default_rng(seed)
    lengths = [min(n, max_seq_len + 1) for n in lengths]
    recs = [traceable_record(n, length, rng, mask_first=bool(n % 2)) for n, length in enumerate(lengths)]
    b, _ = pack_all(recs, max_seq_len, bins, rows_per_batch)
    assert len(b["tokens"]) % rows_per_batch == 0
    assert_packed_exactly(b, recs, max_seq_len)


def test_at_every_boundary_the_target_is_the_conversations_own_last_token():
    """Where one packed conversation ends and the next begins, the last position predicts its own `</s>` (with
    its loss) and the next position starts the next conversation at position 0: what shifting the packed row
    instead of each conversation (e.g. np.roll over the row) would get wrong."""
    rng = np.random.default_rng(1)
    recs = [traceable_record(n, 10, rng) for n in range(8)]
    b, _ = pack_all(recs, 64, 2)
    boundaries = 0
    for r in range(len(b["tokens"])):
        seg = b["segment_ids"][r]
        for t in np.flatnonzero((seg[:-1] > 0) & (seg[1:] > 0) & (seg[:-1] != seg[1:])):
            rec = recs[conversation_of(b["tokens"][r, t])]
            assert b["targets"][r, t] == rec.input_ids[-1] and b["loss_mask"][r, t] == rec.loss_mask[-1] == 1
            assert b["positions"][r, t + 1] == 0 and b["tokens"][r, t + 1] == recs[conversation_of(
                b["tokens"][r, t + 1])].input_ids[0]
            boundaries += 1
    assert boundaries >= 4, "the rows should hold several conversations each"


def test_overlong_conversations_are_truncated_and_counted(caplog):
    rng = np.random.default_rng(2)
    recs = [traceable_record(n, length, rng) for n, length in enumerate([5, 40, 33, 34, 12])]
    with caplog.at_level(logging.WARNING):
        b, counts = pack_all(recs, 32, 2)
    assert counts == {"read": 5, "kept": 5, "truncated": 2, "dropped_overlong": 0, "dropped_too_short": 0}
    assert "conv-1" in caplog.text and "truncating" in caplog.text
    for n in (1, 3):
        where = conversation_of(b["tokens"]) == n
        assert where.sum() == 32  # max_seq_len + 1 tokens kept, shifted into 32 positions
        np.testing.assert_array_equal(np.sort(b["tokens"][where]), recs[n].input_ids[:32])
        np.testing.assert_array_equal(np.sort(b["targets"][where]), recs[n].input_ids[1:33])
    assert (conversation_of(b["tokens"][b["segment_ids"] > 0]) == 2).sum() == 32  # 33 tokens fit exactly


def test_overlong_conversations_can_be_dropped_instead():
    rng = np.random.default_rng(3)
    recs = [traceable_record(n, length, rng) for n, length in enumerate([5, 40, 33, 34, 1])]
    b, counts = pack_all(recs, 32, 2, overlong="drop")
    assert counts == {"read": 5, "kept": 2, "truncated": 0, "dropped_overlong": 2, "dropped_too_short": 1}
    assert set(np.unique(conversation_of(b["tokens"][b["segment_ids"] > 0]))) == {0, 2}


def test_unknown_task_is_a_clear_error():
    rec = Record(np.array([1, 2], np.int32), np.array([0, 1], np.int32), "agent", "kg", "x1")
    with pytest.raises(ValueError, match=r"'x1' has task 'kg'"):
        packing.NextTokenFeatures(8, TASKS)(rec)
