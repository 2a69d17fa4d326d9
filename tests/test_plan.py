"""`python -m agentlm_jax.plan`: the per-chip report of a compiled step, its verdict against the HBM, clear
errors, and the search order (cheapest first)."""

import pytest

pytest.importorskip("libtpu", reason="libtpu (the test extra's jax[tpu]) is not installed")

from agentlm_jax import plan  # noqa: E402
from agentlm_jax.config import load_config  # noqa: E402

MODEL = ["model.vocab_size=1152", "model.hidden_size=512", "model.intermediate_size=1024", "model.num_layers=2",
         "model.num_heads=4", "model.num_kv_heads=2", "model.max_position_embeddings=512", "model.dtype=bfloat16",
         "data.max_seq_len=512", "data.global_batch=8", "loss.chunk_size=128"]


def exit_of(argv) -> object:
    with pytest.raises(SystemExit) as e:
        plan.main(argv)
    return e.value.code


def test_the_report_and_a_chip_too_small(capsys):
    assert exit_of(["--topology", "v5e-4", "--hbm-gib", "0.01", *MODEL]) == plan.EXIT_DOES_NOT_FIT
    out = capsys.readouterr().out
    assert "v5e-4: 4 chips, 0 GiB HBM each; mesh data=1 fsdp=4 tensor=1; loss chunked" in out
    assert "DOES NOT FIT" in out and "parameters 0.01 GiB" in out and "all-gather" in out
    assert "model FLOPs per step" in out and "compile" in out


@pytest.mark.parametrize("argv, message", [
    (["--topology", "v7-4"], "unknown TPU slice 'v7-4'"),
    (["--topology", "v5e-6"], "v5e slices of [4, 8, 16"),
    (["--topology", "v5e-4", "mesh.tensor=3"], "4 devices cannot be split"),
    (["--topology", "v5e-4", "data.global_batch=2"], "cannot be split over the 4 devices"),
])
def test_what_cannot_be_planned_is_one_error_line(argv, message):
    code = exit_of([*argv[:2], *MODEL, *argv[2:]])
    assert isinstance(code, str) and code.startswith("error: ") and message in code, code


def test_the_search_tries_the_cheapest_first():
    cfg = load_config(None, [*MODEL, "data.global_batch=16"])
    order = plan.candidates(cfg, 8, tensors=(1, 2, 4), micro_batches=(1, 2), remats=("full", "none"))
    assert order[0] == plan.Candidate(1, 1, "none") and order[-1] == plan.Candidate(2, 2, "full")
    assert [c.micro_batches for c in order] == sorted(c.micro_batches for c in order)
    assert plan.Candidate(4, 1, "none") not in order  # 4 does not divide the 2 KV heads
    assert plan.Candidate(1, 2, "none") in order and plan.Candidate(1, 4, "none") not in order  # 16/2 rows = 8 chips
    assert plan.Candidate(1, 1, "none").overrides(8) == ["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1",
                                                          "data.micro_batches=1", "model.remat=none"]


def test_on_several_slices_the_search_puts_the_data_axis_across_them():
    cfg = load_config(None, [*MODEL, "data.global_batch=16"])
    order = plan.candidates(cfg, 16, tensors=(1, 2), micro_batches=(1, 2), remats=("none",), slices=2)
    assert plan.Candidate(1, 1, "none", 2) in order and plan.Candidate(2, 2, "none", 2) in order
    assert plan.Candidate(1, 2, "none", 2) not in order  # 8 rows cannot be split over data 2 x fsdp 8
    assert plan.Candidate(2, 1, "none", 2).overrides(16) == ["mesh.data=2", "mesh.fsdp=4", "mesh.tensor=2",
                                                              "data.micro_batches=1", "model.remat=none"]
    assert plan.candidates(cfg, 16, tensors=(1,), micro_batches=(4,), remats=("none",), slices=2) == []


@pytest.mark.slow
def test_the_search_skips_what_does_not_fit_and_recommends_the_next(capsys):
    """With activations that dominate, 4 micro-batches need less HBM than 1: on a chip between the two, the
    search must reject the single batch and recommend the 4 micro-batches."""
    activations = [*MODEL, "data.global_batch=32", "model.num_layers=4"]
    totals = {mb: plan.plan(load_config(None, [*activations, "mesh.fsdp=4", f"data.micro_batches={mb}"]), "v5e-4",
                            headroom=0)[0].total_bytes for mb in (1, 4)}
    assert totals[4] < totals[1], totals
    hbm_gib = (totals[1] + totals[4]) / 2 / plan.GIB
    assert plan.main(["--topology", "v5e-4", "--search", "--headroom", "0", "--hbm-gib", str(hbm_gib),
                      "--tensor-options", "1", "--micro-batch-options", "1,4", "--remat-options", "none",
                      *activations]) == 0
    out = capsys.readouterr().out
    assert out.count("DOES NOT FIT") == 1 and "recommended overrides: mesh.data=1 mesh.fsdp=4 mesh.tensor=1 " \
                                                "data.micro_batches=4 model.remat=none" in out
