"""Every registered method through one contract (issue 33): its rows keep to themselves (batch-mates, place, a run
split in two as a resume splits it), decoding a stored row reproduces its greedy prefix, and the report, the cell
state and the MLflow curves take its rows. A toy method (tests/toy_method.py) runs beside the built-in ones: a new
method is one module plus its YAML.

Each method's engine against its independent naive loop (NAIVE; more cases: tests/test_cram.py, tests/test_progressive.py).
"""

import dataclasses
import importlib
import math
import shutil

import pandas as pd
import pytest

from cram_sweep.engine.cram import cram
from cram_sweep.errors import UserError
from cram_sweep.methods import method, register, registered
from cram_sweep.report.capacity import capacity_table, cell_frame, curve_columns
from cram_sweep.report.markdown import report_markdown, summary_lines
from cram_sweep.results.cellstate import cell_state
from cram_sweep.results.columns import Cell, CellColumns, ResultRow

from .helpers import TINY, TINY_PROGRESSIVE, assert_bit_identical, assert_same_result, naive_cram, specs_for
from .test_progressive import compare, naive_progressive
from .toy_method import METHOD as TOY
from .toy_method import TOY_YAML

compose_module = importlib.import_module("cram_sweep.config.compose")  # the package exports a function of that name
METHODS = [*registered(), TOY.name]
SHORT = ["optim.max_steps=40", "optim.patience=40", "method.steps_per_stage=20"]
OWN = {"progressive": TINY_PROGRESSIVE}  # the settings a method's tiny runs need beyond `method=<name>`
# Each method's naive loop, one sample at a time and written independently of the engine, held against a result.
NAIVE = {
    "full": lambda lm, cfg, spec, row: assert_same_result(row, naive_cram(lm.model, spec.token_ids, 2, spec.init_seed, cfg.optim)),
    "progressive": lambda lm, cfg, spec, row: compare(
        row, naive_progressive(lm.model, spec.token_ids, 2, spec.init_seed, cfg.optim, cfg.method)
    ),
    "onestep": lambda lm, cfg, spec, row: assert_same_result(
        row, naive_cram(lm.model, spec.token_ids, 2, spec.init_seed, cfg.optim, one_step=True)
    ),
    "toy": lambda lm, cfg, spec, row: assert_same_result(
        row, naive_cram(lm.model, spec.token_ids, 2, spec.init_seed, cfg.optim, keep_last=True), ce_rel=1e-3
    ),
}


@pytest.fixture(scope="module")
def conf_with_toy(tmp_path_factory):
    """conf/ with conf/method/toy.yaml added, and the toy registered: what a new method's module and YAML give."""
    conf = tmp_path_factory.mktemp("conf") / "conf"
    shutil.copytree(compose_module.CONF_DIR, conf)
    (conf / "method" / "toy.yaml").write_text(TOY_YAML)
    register(TOY)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compose_module, "CONF_DIR", conf)
        yield conf
    registered().pop(TOY.name)


def config(name: str, *overrides):
    return compose_module.compose_config([*TINY, f"method={name}", *OWN.get(name, []), *SHORT, *overrides])


def run(lm, cfg, specs, batch_size=4):
    return {(r.cell, r.sample): r for r in cram(lm.model, specs, 2, cfg.optim, "fp32", batch_size=batch_size, method=cfg.method)}


def test_the_methods_are_the_modules_of_the_methods_folder_and_the_yaml_names_them():
    assert {"full", "progressive"} <= set(registered()), "each module of cram_sweep/methods/ defining METHOD registers itself"
    for name in compose_module.available("method"):
        assert compose_module.compose_config([f"method={name}", "grid.n_mem=[2]"]).method.name in registered(), name


def test_an_unknown_method_is_one_line_naming_the_registered_ones():
    with pytest.raises(UserError, match=r"method.name=nope: choose method=full or method=onestep or method=progressive"):
        compose_module.compose_config(["method.name=nope"])


@pytest.mark.parametrize("name", METHODS)
def test_the_engine_is_the_methods_naive_loop(tiny_llama, conf_with_toy, name):
    assert set(NAIVE) == set(METHODS), "every registered method has its naive loop here"
    cfg = config(name, "optim.max_steps=60", "optim.patience=60")
    specs = specs_for(tiny_llama, 8, 3)
    rows = run(tiny_llama, cfg, specs, batch_size=3)
    for spec in specs:
        NAIVE[name](tiny_llama, cfg, spec, rows[spec.cell, spec.sample])


@pytest.mark.parametrize("name", METHODS)
def test_a_row_keeps_to_itself_beside_other_cells_and_split_as_a_resume_splits_it(tiny_llama, conf_with_toy, name):
    cfg = config(name)
    cell, other = specs_for(tiny_llama, 8, 3, cell="a"), specs_for(tiny_llama, 12, 2, cell="b")
    alone = run(tiny_llama, cfg, cell)
    mixed = run(tiny_llama, cfg, [other[0], *cell[::-1], other[1]])
    resumed = {**run(tiny_llama, cfg, cell[:1]), **run(tiny_llama, cfg, cell[1:])}
    assert all(row.method == name for row in alone.values())
    for key, row in alone.items():
        assert_bit_identical(mixed[key], row)
        assert_bit_identical(resumed[key], row)


@pytest.mark.parametrize("name", METHODS)
def test_decoding_a_stored_row_reproduces_its_greedy_prefix(tiny_llama, conf_with_toy, name):
    cfg = config(name, "optim.max_steps=80")
    given = cfg.method.given
    for row in run(tiny_llama, cfg, specs_for(tiny_llama, 10, 2)).values():
        decoded, prefix = method(name).decode(tiny_llama, {**dataclasses.asdict(row), "n_mem": 2, "precision": "fp32"}, given)
        assert prefix >= row.greedy_prefix and decoded[: row.greedy_prefix] == row.token_ids[given : given + row.greedy_prefix]


@pytest.mark.parametrize("name", METHODS)
def test_the_report_and_the_cell_state_take_the_methods_rows(tiny_llama, conf_with_toy, name):
    cfg, one = config(name), method(name)
    stored = []
    for length in (4, 8):
        cell = Cell("tiny_llama", "pydoc", 2, length, name)
        columns = CellColumns(cell.id, "tiny_llama", "pydoc", "fp32", length, 2, 0, tiny_llama.hidden, tiny_llama.vocab_size, 0)
        rows = run(tiny_llama, cfg, specs_for(tiny_llama, length, 3, cell=cell.id)).values()
        stored += [ResultRow.of(columns, row) for row in rows]
        state = cell_state(cell, 3, [dataclasses.asdict(row) for row in rows], [])
        assert state["done"] == 3 and math.isnan(state["acc_mean"]) != one.has_mean_accuracy
    results = pd.DataFrame([dataclasses.asdict(row) for row in stored])
    capacity = capacity_table(results)
    assert capacity["method"].tolist() == [name] and set(curve_columns(name)) <= set(capacity.columns)
    assert summary_lines(capacity)[0] == one.summary_line("tiny_llama / pydoc / n_mem=2", next(capacity.itertuples()))
    cells = cell_frame([(Cell("tiny_llama", "pydoc", 2, 4, name), cell_state(Cell("tiny_llama", "pydoc", 2, 4, name), 3, [], []))])
    text = report_markdown("contract", capacity, cells, 3, pd.DataFrame())
    assert one.definition and one.definition in text
    reached = one.reached(one.scored_rows(results), results.groupby(["sample", "restart"])["horizon"].max())
    assert capacity["utilization"].iloc[0] == pytest.approx(reached / capacity["theoretical_tokens"].iloc[0], nan_ok=True)
