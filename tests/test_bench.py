"""`cram-sweep bench` end to end on a tiny model: a well-formed table and CSV whose columns agree with each other
and with the measurements it printed (no assertion on the timings themselves)."""

import csv
import re
from dataclasses import replace

import pytest

from cram_sweep.bench.measure import BenchRow, peak_flops
from cram_sweep.cli import main
from cram_sweep.config import compose_config
from cram_sweep.engine.model import load_model

COLUMNS = [
    "method",
    "precision",
    "batch",
    "sample_steps_per_s",
    "samples_per_hour",
    "x_steps_vs_paper",
    "peak_mem_gb",
    "gflop_s",
    "mfu",
    "compile_s",
]
# One progress line per measurement: `  round 1/2: engine, fp32, batch 2: 123.456 sample-steps/s, 7890.1 samples/hour`.
MEASUREMENT = re.compile(
    r"^  (?:with reloads|round \d+/\d+): (.+), (\w+), batch (\d+): ([\d.]+) sample-steps/s, ([\d.]+) samples/hour$", re.M
)
LENGTH, N_MEM, STEPS = 12, 2, 3


def measurements(stderr: str) -> dict[tuple[str, str, str], list[tuple[float, float]]]:
    """(sample-steps/s, samples/hour) of each measurement, by row key (method, precision, batch)."""
    found: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for method, precision, batch, steps_per_s, per_hour in MEASUREMENT.findall(stderr):
        found.setdefault((method, precision, batch), []).append((float(steps_per_s), float(per_hour)))
    return found


def harmonic_mean(values: list[float]) -> float:
    """The rate of a row that sums rounds of equal work (same samples, same steps): total work / total time."""
    return len(values) / sum(1 / v for v in values)


def test_bench_prints_and_writes_the_table(tmp_path, capsys):
    out = tmp_path / "bench.csv"
    code = main(
        [
            "bench",
            "--model",
            "tiny_neox",
            "--length",
            str(LENGTH),
            "--n-mem",
            str(N_MEM),
            "--steps",
            str(STEPS),
            "--batch-sizes",
            "1,2",
            "--precisions",
            "fp32,bf16",
            "--paper-samples",
            "1",
            "--rounds",
            "2",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    text = captured.out
    assert captured.err.count("sample-steps/s") == 2 + 2 * 2 * 3, "one progress line per measurement: reloads, then 2 rounds"
    assert captured.err.count("round 2/2: engine, bf16, batch 2") == 1
    assert "model tiny_neox" in text and "length 12, n_mem 2, 3 steps/sample, 2 rounds" in text
    header = text.splitlines()[1].split()
    assert header == COLUMNS
    with open(out) as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["method"], r["precision"], r["batch"]) for r in rows] == [
        (m, p, b)
        for p in ("fp32", "bf16")
        for m, b in (("paper loop", "1"), ("paper loop + 2 loads/sample", "1"), ("engine", "1"), ("engine", "2"))
    ]
    measured = measurements(captured.err)
    baseline = float(rows[0]["sample_steps_per_s"])  # the paper's loop in fp32
    lm = load_model("tiny_neox", compose_config(["grid.models=[tiny_neox]"]).models["tiny_neox"], "cpu")
    flops_per_step = 4 * lm.n_params * (LENGTH + N_MEM)
    for row in rows:
        steps_per_s, per_hour = float(row["sample_steps_per_s"]), float(row["samples_per_hour"])
        rounds = measured[(row["method"], row["precision"], row["batch"])]
        assert len(rounds) == (1 if "loads" in row["method"] else 2), row
        # the row sums its rounds: its rates are the rounds' total work over their total time
        assert steps_per_s == pytest.approx(harmonic_mean([r[0] for r in rounds]), rel=1e-3), row
        assert per_hour == pytest.approx(harmonic_mean([r[1] for r in rounds]), rel=1e-3), row
        assert float(row["x_steps_vs_paper"]) == pytest.approx(steps_per_s / baseline, abs=0.006), row
        assert float(row["gflop_s"]) == pytest.approx(steps_per_s * flops_per_step / 1e9, abs=0.051), row
        assert float(row["peak_mem_gb"]) > 0 and row["mfu"] == "", row  # no peak FLOP/s known for a CPU
        assert row["compile_s"] == "0.0", row  # compile=auto: eager on a CPU
        # (no relation between a row's wall and step time is asserted: it depends on the machine's load, a timed test)


def test_mfu_is_against_the_peak_of_the_rows_precision():
    assert peak_flops("NVIDIA A100-SXM4-80GB")["bf16"] == 312e12
    assert peak_flops("NVIDIA A10")["bf16"] == 125e12
    assert peak_flops("Intel Data Center GPU Max") is None
    peaks = peak_flops("NVIDIA H100 80GB HBM3")
    paper = BenchRow(
        "paper loop", "fp32", 1, seconds=10.0, step_seconds=10.0, samples=1, sample_steps=10, peak_mem_gb=1.0, flops=10 * 49.5e12
    )
    engine = BenchRow("engine", "bf16", 8, seconds=10.0, step_seconds=5.0, samples=8, sample_steps=80, peak_mem_gb=2.0, flops=80 * 49.45e12)
    assert paper.as_dict(paper, peaks)["mfu"] == 0.1  # 49.5 TFLOP/s of the H100's 495 TF32
    row = engine.as_dict(paper, peaks)
    assert row["mfu"] == 0.8 and row["x_steps_vs_paper"] == 16.0 and row["gflop_s"] == 791200.0  # of 989 bf16
    assert engine.as_dict(paper, None)["mfu"] == ""
    weights = replace(engine, precision="bf16-weights", compile_seconds=42.0).as_dict(paper, peaks)
    assert weights["mfu"] == 0.8 and weights["compile_s"] == 42.0  # bf16 weights: the bf16 peak
