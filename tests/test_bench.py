"""`cram-sweep bench` end to end on a tiny model: a well-formed table and CSV (no timing assertions)."""

import csv

from cram_sweep.bench import BenchRow, peak_flops
from cram_sweep.cli import main

COLUMNS = ["method", "precision", "batch", "sample_steps_per_s", "samples_per_hour", "x_steps_vs_paper", "peak_mem_gb", "gflop_s", "mfu"]


def test_bench_prints_and_writes_the_table(tmp_path, capsys):
    out = tmp_path / "bench.csv"
    code = main(
        [
            "bench",
            "--model",
            "tiny_neox",
            "--length",
            "12",
            "--n-mem",
            "2",
            "--steps",
            "3",
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
    for row in rows:
        assert float(row["sample_steps_per_s"]) > 0 and float(row["samples_per_hour"]) > 0 and float(row["peak_mem_gb"]) > 0
    assert float(rows[0]["x_steps_vs_paper"]) == 1.0


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
