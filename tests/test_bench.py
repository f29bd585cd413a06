"""`cram-sweep bench` end to end on a tiny model: a well-formed table and CSV (no timing assertions)."""

import csv

from cram_sweep.cli import main

COLUMNS = ["method", "precision", "batch", "sample_steps_per_s", "samples_per_hour", "x_steps_vs_paper", "peak_mem_gb", "gflop_s", "mfu"]


def test_bench_prints_and_writes_the_table(tmp_path, capsys):
    out = tmp_path / "bench.csv"
    code = main(["bench", "--model", "tiny_neox", "--length", "12", "--n-mem", "2", "--steps", "3",
                 "--batch-sizes", "1,2", "--precisions", "fp32,bf16", "--paper-samples", "1", "--rounds", "2", "--device", "cpu", "--out", str(out)])
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
        (m, p, b) for p in ("fp32", "bf16")
        for m, b in (("paper loop", "1"), ("paper loop + 2 loads/sample", "1"), ("engine", "1"), ("engine", "2"))
    ]
    for row in rows:
        assert float(row["sample_steps_per_s"]) > 0 and float(row["samples_per_hour"]) > 0 and float(row["peak_mem_gb"]) > 0
    assert float(rows[0]["x_steps_vs_paper"]) == 1.0
