"""The bits analysis (analysis.bits): the rounding, the scan, the engine's re-scoring of finished samples, bad input
and the report's bits columns."""

import dataclasses

import pandas as pd
import pytest
import torch

from cram_sweep import cli
from cram_sweep.config import AnalysisConfig
from cram_sweep.engine.bits import BitsColumns, Scored, analyse, round_vectors, uniform
from cram_sweep.engine.cram import cram
from cram_sweep.engine.roundings import FULL_WIDTH, bits_needed, rounding_names
from cram_sweep.engine.scores import reduce_scores, token_scores
from cram_sweep.methods.base import horizon_of
from cram_sweep.report.build import build_report
from cram_sweep.results.columns import Cell, SampleColumns
from cram_sweep.tracking.curves import report_curves

from .helpers import TINY, TINY_PROGRESSIVE, result_row, specs_for, tiny_config
from .test_report import make_sweep

BITS = [f.name for f in dataclasses.fields(BitsColumns)]
ANALYSIS = AnalysisConfig()


def test_uniform_rounding_by_hand():
    """q = round(x / s * L) / L * s, L = 2^(k-1) - 1, s = the vector's largest |x|: the largest entry is kept, each vector
    has its own scale, a zero vector stays zero (torch rounds halves to even)."""
    vectors = torch.tensor([[1.0, -0.5, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0], [-2.0, 1.0, 0.2, 0.7]])
    expected = torch.tensor([[1.0, -2 / 3, 1 / 3, 0.0], [0.0, 0.0, 0.0, 0.0], [-2.0, 4 / 3, 0.0, 2 / 3]])
    assert torch.allclose(uniform(vectors, 3), expected)
    assert torch.equal(round_vectors(vectors, "int3"), uniform(vectors, 3))
    assert torch.equal(uniform(vectors, 2), torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [-2.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(round_vectors(vectors, "bf16"), vectors.bfloat16().float())
    assert torch.equal(round_vectors(vectors, "fp8_e4m3"), vectors.to(torch.float8_e4m3fn).float())


def test_the_scan_stops_at_the_first_rounding_that_loses_the_sample():
    names = rounding_names([2, 8, 12, 3, 10, 4, 6, 5])
    assert names == ["bf16", "fp8_e4m3", "int12", "int10", "int8", "int6", "int5", "int4", "int3", "int2"]
    keeps = dict.fromkeys(names, True)
    assert bits_needed(names, list(keeps.values())) == 2
    # int6 loses it, int4 keeps it again: monotone by construction, int4 does not count; fp8 is not in the scan
    kept = {**keeps, "fp8_e4m3": False, "int6": False, "int5": False}
    assert bits_needed(names, list(kept.values())) == 8
    assert bits_needed(names, list({**keeps, "bf16": False}.values())) == FULL_WIDTH


def test_a_vector_built_to_break_below_6_bits():
    """One vector [1, a], a = 0.45 / 15: below 6 bits (15 levels or fewer) a rounds to 0, an error of 0.03; from 6 bits on
    (31 levels) the error is at most 1/62. A scorer whose horizon drops once the error exceeds 1/62 gives bits_needed 6."""
    memory = torch.tensor([[1.0, 0.45 / 15]])
    tolerance = 1 / 62

    def score(rounded):
        errors = (rounded - memory).abs().amax(dim=(1, 2))
        return Scored([10 if e <= tolerance else 3 for e in errors.tolist()], [1.0 if e <= tolerance else 0.5 for e in errors.tolist()])

    columns = analyse(memory, ANALYSIS.uniform_bits, score, lambda horizon, acc: horizon >= 10)
    assert columns.roundings == rounding_names(ANALYSIS.uniform_bits)
    assert dict(zip(columns.roundings, columns.horizon_at_bits)) == {
        "bf16": 10,
        "fp8_e4m3": 10,
        "int12": 10,
        "int10": 10,
        "int8": 10,
        "int6": 10,
        "int5": 3,
        "int4": 3,
        "int3": 3,
        "int2": 3,
    }
    assert (columns.bits_needed, columns.stored_bits) == (6, 2 * 6)


def unrounded_horizon(lm, row, length, offset):
    """A row's greedy horizon over its text's first `length` tokens from its stored vectors, scored here (not by the engine)."""
    ids = torch.tensor(row.token_ids[:length])[None]
    memory = torch.tensor(row.memory).view(1, 2, -1)
    ce_tok, correct, _ = token_scores(lm.model, memory, lm.model.get_input_embeddings()(ids), ids[:, offset:], "fp32")
    return horizon_of(int(reduce_scores(ce_tok, correct)[2][0]), offset, 0)


@pytest.mark.parametrize("method", [[], TINY_PROGRESSIVE], ids=["full", "progressive"])
def test_the_analysis_changes_no_other_column_and_bf16_keeps_the_horizon(tiny_llama, method):
    """Full cramming scores the whole text, progressive the horizon prefix (a sample of horizon 0 keeps nothing: no
    analysis); bf16 reproduces there what the stored vectors reproduce; bits_needed is the scan of what each rounding kept."""
    cfg = tiny_config(*method)
    specs = specs_for(tiny_llama, 8, 4)
    run = {
        name: sorted(
            cram(tiny_llama.model, specs, 2, cfg.optim, "fp32", batch_size=3, method=cfg.method, analysis=analysis), key=lambda r: r.sample
        )
        for name, analysis in (("on", ANALYSIS), ("none", None), ("off", AnalysisConfig(bits=False)))
    }
    others = [f.name for f in dataclasses.fields(SampleColumns) if f.name not in BITS + ["seconds"]]
    off = vars(BitsColumns.off(2 * 64))
    for on, none, no in zip(run["on"], run["none"], run["off"]):
        assert {k: getattr(on, k) for k in others} == {k: getattr(none, k) for k in others}, "analysis on changes no other column"
        assert {k: getattr(none, k) for k in BITS} == {k: getattr(no, k) for k in BITS} == off
    analysed = [row for row in run["on"] if row.horizon or cfg.method.name != "progressive"]
    assert analysed and all({k: getattr(row, k) for k in BITS} == off for row in run["on"] if row not in analysed)
    for row in analysed:
        scored = row.horizon if (cfg.method.name == "progressive") else len(row.token_ids)
        at = dict(zip(row.roundings, zip(row.horizon_at_bits, row.acc_at_bits)))
        assert row.roundings == rounding_names(ANALYSIS.uniform_bits)
        assert at["bf16"][0] == unrounded_horizon(tiny_llama, row, scored, cfg.method.given) >= row.horizon, "bf16 keeps the horizon"
        if cfg.method.name == "progressive":
            assert at["bf16"] == (row.horizon, 1.0) and max(row.horizon_at_bits) == row.horizon, "scored up to the horizon"
            kept = [h >= row.horizon for h in row.horizon_at_bits]
        else:
            assert at["bf16"][1] == pytest.approx(row.acc), "and the accuracy"
            kept = [a >= row.acc - 1e-6 for a in row.acc_at_bits]
        assert row.bits_needed == bits_needed(row.roundings, kept) <= 16
        assert row.stored_bits == 2 * 64 * row.bits_needed and row.bits_seconds > 0


@pytest.mark.parametrize("bits", ["[8,1]", "[17]"])
def test_a_width_outside_2_to_16_is_one_line_and_exit_2(tmp_path, capsys, bits):
    assert cli.main(["run", "name=bad", f"out_dir={tmp_path}", *TINY, f"analysis.uniform_bits={bits}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: analysis.uniform_bits contains ") and "2..16" in err and err.count("\n") == 1


def test_report_bits_columns_and_plots(tmp_path):
    """Two progressive samples of m1 (hidden 8, vocab 256: log2 8) analysed: bits needed 6 and 8."""
    names = rounding_names(ANALYSIS.uniform_bits)
    cell = Cell("m1", "pydoc", 1, 16, "progressive").id

    def analysed(sample, horizon, needed, info):
        at = [horizon if i <= names.index(f"int{needed}") else horizon // 2 for i in range(len(names))]
        return result_row(
            "m1",
            1,
            16,
            sample,
            hidden=8,
            vocab_size=256,
            cell=cell,
            method="progressive",
            horizon=horizon,
            info_gain_bits=info,
            roundings=names,
            horizon_at_bits=at,
            acc_at_bits=[1.0] * len(names),
            bits_needed=needed,
            stored_bits=8 * needed,
        )

    rows = [analysed(0, 10, 6, 24.0), analysed(1, 14, 8, 32.0)]
    sweep = make_sweep(tmp_path, ["m1"], [16], [1], 2, rows)
    report = build_report(sweep.path)
    (row,) = report.capacity.to_dict("records")
    theoretical = 8 * 7 / 8  # n_mem * hidden * mean bits needed / log2 vocab
    assert row["bits_needed_mean"] == 7 and row["bits_needed_std"] == pytest.approx(2**0.5)
    assert (row["bits_needed_min"], row["bits_needed_max"]) == (6, 8)
    assert row["info_gain_per_stored_bit"] == pytest.approx((24 / 48 + 32 / 64) / 2)
    assert row["theoretical_tokens_at_bits"] == pytest.approx(theoretical)
    assert row["utilization_at_bits"] == pytest.approx(12 / theoretical) and row["utilization"] == pytest.approx(12 / 16)
    assert {"horizon_vs_bits.png", "bits_needed.png"} <= {p.name for p in report.files}
    md = (sweep.report / "capacity.md").read_text()
    assert "## Bits used per number of the vectors" in md and "| 7.0 ± 1.4 [6–8] | 0.5000 | 16.0 | 7.0 |" in md
    curves = {key: (value, step) for key, value, step in report_curves(report)}
    assert curves["bits_needed_mean/m1/pydoc/progressive"] == (7, 1) and "utilization_at_bits/m1/pydoc/progressive" in curves
    assert pd.read_csv(sweep.report / "capacity.csv")["bits_needed_mean"].tolist() == [7]
