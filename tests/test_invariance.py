"""The promise (layout.py, docs/determinism.md): at a sweep's batch size, a sample's row is bit-identical whatever its
batch-mates and its place in the batch: full and progressive, direct and lowdim, fp32 and bf16, with and without the hybrid loss.

Bit for bit, not within a tolerance: every forward a row runs in has shapes of the row's own (its text's length and
the batch size's rows), and every reduction over its positions runs at its own width. A kill and resume against an
uninterrupted run: tests/test_sweep.py and tests/test_restarts.py. Another batch size is another row count for every
product, which some kernels round differently (test_cram.test_batch_does_not_change_a_sample: within rounding).
"""

import pytest

from cram_sweep.config import ParamConfig
from cram_sweep.engine.cram import cram
from cram_sweep.engine.param import parametrization

from .helpers import TINY_PROGRESSIVE, assert_bit_identical, specs_for, tiny_config

# Short runs: a difference shows from the first step (the packed layout's do, test_packed_batches_give_the_promise_up).
SHORT = ["optim.max_steps=60", "optim.patience=60", "method.steps_per_stage=20"]
HYBRID = ("optim.hybrid_alpha=0.5",)  # the hybrid loss over every hidden state
CASES = [
    (method, param, precision) for method in ("full", "progressive") for param in ("direct", "lowdim") for precision in ("fp32", "bf16")
]


def run(lm, specs, batch_size, method, param, precision, overrides=(), **options):
    cfg = tiny_config(*(TINY_PROGRESSIVE if method == "progressive" else []), *SHORT, *overrides)
    param_cfg = ParamConfig(name=param, k=8)
    rows = cram(
        lm.model,
        specs,
        2,
        cfg.optim,
        precision,
        batch_size=batch_size,
        method=cfg.method,
        parametrization=parametrization(param_cfg),
        **options,
    )
    return {(r.cell, r.sample): r for r in rows}


@pytest.mark.parametrize(
    "method,param,precision,overrides",
    [
        *((*case, ()) for case in CASES),
        ("progressive", "lowdim", "bf16", HYBRID),  # the alignment masked to each stage, at the cap's width
    ],
)
def test_a_row_does_not_feel_its_batch_mates_nor_its_place(tiny_llama, method, param, precision, overrides):
    """A cell's samples alone, against the same samples beside another cell's (another length), in another order, at
    the same batch size: at any thread count."""
    cell = specs_for(tiny_llama, 8, 3, cell="a")
    other = specs_for(tiny_llama, 12, 3, cell="b")
    alone = run(tiny_llama, cell, 4, method, param, precision, overrides)
    mixed = run(tiny_llama, [other[0], *cell[::-1], *other[1:]], 4, method, param, precision, overrides)
    assert sorted(mixed) == sorted([*alone, *((s.cell, s.sample) for s in other)])
    for key, row in alone.items():
        assert_bit_identical(mixed[key], row)


def test_packed_batches_give_the_promise_up_and_say_so(tiny_llama):
    """batch_invariant=false packs rows of several lengths into one forward padded to the longest: a row's shapes, hence
    its rounding, follow its batch-mates (the reason for the default), and its row says it ran so. Fixed shapes run a
    forward per length."""
    mixed = [*specs_for(tiny_llama, 8, 3, cell="a"), *specs_for(tiny_llama, 12, 3, cell="b")]
    shapes = []  # (rows, positions) of each optimization forward
    hook = tiny_llama.model.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(kwargs["inputs_embeds"].shape[:2]) if kwargs["inputs_embeds"].requires_grad else None,
        with_kwargs=True,
    )
    try:
        packed = run(tiny_llama, mixed, 6, "full", "direct", "fp32", batch_invariant=False)
        packed_shapes, shapes[:] = list(shapes), []
        fixed = run(tiny_llama, mixed, 6, "full", "direct", "fp32")
    finally:
        hook.remove()
    assert packed_shapes[0] == (6, 12 + 2), "packed: the short rows run at the long rows' width"
    assert shapes[:2] == [(6, 8 + 2), (6, 12 + 2)] and {width for _, width in shapes} == {8 + 2, 12 + 2}, "fixed: a forward per length"
    assert all(not row.batch_invariant for row in packed.values()) and all(row.batch_invariant for row in fixed.values())


def test_a_worker_runs_no_more_rows_than_a_work_item_holds_at_one_length():
    """Rows are grouped by length: past what the grid puts at one length in a work item, every forward would carry
    inert rows. Packed batches keep the batch size."""
    from cram_sweep.engine.layout import batch_rows
    from cram_sweep.sweep.grid import rows_per_length

    cfg = tiny_config("grid.samples=3", "grid.restarts=2", "grid.datasets=[pydoc,random]", "batch_size=16")
    assert rows_per_length(cfg) == 12
    assert (batch_rows(16, 12, True), batch_rows(16, 12, False), batch_rows(4, 12, True)) == (12, 16, 4)
