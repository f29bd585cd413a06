"""Real local Ray sweeps through the console entry point: store rows, MLflow runs, kill -9 and resume, bad input."""

from pathlib import Path

import pyarrow.dataset as ds
import pytest
from mlflow.tracking import MlflowClient

from cram_sweep.config import load_sweep_config, to_yaml
from cram_sweep.report.build import cell_table as report_cells
from cram_sweep.results.store import SweepDir, read_results, read_stages

from .helpers import TINY, TINY_PROGRESSIVE, assert_bit_identical, tiny_config, uninterrupted_rows
from .processes import cli_env, kill_mid_sweep, run_cli

pytestmark = pytest.mark.slow  # sweeps in processes of their own


def mlflow_runs(out_dir: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{out_dir.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name("cram-sweep")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory, stale_ray_tmpdir):
    """One real sweep (two models, two lengths, report on) shared by the tests that only read it. Ray's temp dir
    records a dead cluster, as a `ray start` killed without `ray stop` leaves it: cluster=local must not care."""
    out = tmp_path_factory.mktemp("sweep")
    proc = run_cli(
        "run",
        "name=e2e",
        f"out_dir={out}",
        *TINY,
        "grid.models=[tiny_llama,tiny_neox]",
        "report=true",
        "worker.progress_seconds=0",
        "progress_line_seconds=0",
        env=cli_env(RAY_TMPDIR=str(stale_ray_tmpdir[0])),
    )
    return out, proc


def test_local_ray_sweep_end_to_end(tiny_sweep):
    out, proc = tiny_sweep
    assert "sweep directory:" in proc.stdout and "MLflow parent run:" in proc.stdout
    assert "total: 12 done, 0 failed, 0 pending" in proc.stdout
    assert "Failed to connect to GCS" not in proc.stderr, "the stale recorded cluster was not tried"
    assert "Token authentication" not in proc.stderr, "a local instance says nothing about cluster authentication"
    assert "running, step " in proc.stderr, "the progress lines show the steps of running samples"
    assert "\r" not in proc.stderr and "progress: 12/12 samples" in proc.stderr, "no terminal: plain lines, no bar frames"
    table = ds.dataset(out / "e2e" / "results").to_table()
    keys = set(zip(table["cell"].to_pylist(), table["sample"].to_pylist()))
    expected = {(f"{m}/pydoc/full/n_mem=2/L={L}", i) for m in ("tiny_llama", "tiny_neox") for L in (4, 8) for i in range(3)}
    assert keys == expected and table.num_rows == 12
    assert set(table["precision"].to_pylist()) == {"fp32"}
    assert all(len(m) == 2 * 64 for m in table["memory"].to_pylist())
    parents, children = mlflow_runs(out)
    assert len(parents) == 1 and parents[0].info.run_id in proc.stdout
    experiment = MlflowClient(tracking_uri=f"sqlite:///{out.resolve()}/mlflow.db").get_experiment_by_name("cram-sweep")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development", "the UI opens on the runs, not GenAI traces"
    assert sorted(c.data.tags["cram_sweep.cell"] for c in children) == sorted({k[0] for k in expected})
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert child.data.metrics["done"] == 3
        for key in ("acc_mean", "gain_tokens_mean", "info_gain_bits_mean", "greedy_prefix_max"):
            assert key in child.data.metrics
    status = run_cli("status", str(out / "e2e"))
    assert status.stdout.count("done    3  failed   0  pending    0") == 4


def test_report_is_logged_to_mlflow(tiny_sweep):
    out, _ = tiny_sweep
    report = out / "e2e" / "report"
    assert {p.name for p in report.iterdir()} >= {
        "capacity.csv",
        "capacity.md",
        "accuracy_vs_length.png",
        "ce_with_vs_without.png",
        "info_gain_vs_n_mem.png",
    }
    parents, _ = mlflow_runs(out)
    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve()}/mlflow.db")
    logged = {a.path for a in client.list_artifacts(parents[0].info.run_id, "report")}
    assert logged == {f"report/{p.name}" for p in report.iterdir()}
    local = client.download_artifacts(parents[0].info.run_id, "report/capacity.csv", str(out / "download"))
    assert Path(local).read_text() == (report / "capacity.csv").read_text()
    metrics = parents[0].data.metrics
    for key in ("max_tokens", "gain_tokens_mean", "info_gain_bits_mean", "utilization"):
        assert f"{key}/tiny_llama/pydoc/full" in metrics
    curve = client.get_metric_history(parents[0].info.run_id, "acc_mean/tiny_llama/pydoc/full/n_mem_2")
    cells = report_cells(out / "e2e")
    assert sorted((m.step, m.value) for m in curve) == sorted(
        (r.length, pytest.approx(r.acc_mean)) for r in cells.itertuples() if r.model == "tiny_llama"
    ), "accuracy against length, one point per length"
    (max_tokens,) = client.get_metric_history(parents[0].info.run_id, "max_tokens/tiny_llama/pydoc/full")
    assert max_tokens.step == 2, "capacity against the number of vectors: step = n_mem"


def test_decode_agrees_with_stored_greedy_check(tiny_sweep, capsys):
    from cram_sweep.cli import main

    out, _ = tiny_sweep
    rows = read_results(SweepDir(out / "e2e")).to_pylist()
    exact = next(r for r in rows if r["greedy_exact"])
    inexact = next(r for r in rows if not r["greedy_exact"])
    assert main(["decode", str(out / "e2e"), "--cell", exact["cell"], "--sample", str(exact["sample"])]) == 0
    text = capsys.readouterr().out
    assert f"matched prefix: {exact['length'] - 1} of {exact['length'] - 1}" in text and "exact match: yes" in text
    model, _, _, n_mem, length = inexact["cell"].split("/")
    assert (
        main(
            ["decode", str(out / "e2e"), "--model", model, "--length", length[2:], "--n-mem", n_mem[6:], "--sample", str(inexact["sample"])]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert f"matched prefix: {inexact['greedy_prefix']} of" in text and "exact match: no" in text and "[[" in text
    assert main(["decode", str(out / "e2e"), "--cell", exact["cell"], "--sample", "99"]) == 2
    assert "finished samples are [0, 1, 2]" in capsys.readouterr().err


def test_kill_driver_then_resume_runs_only_missing_samples(tmp_path, capsys):
    """kill -9 mid-sweep, then resume with runtime overrides: each sample once, the same MLflow parent (progressive
    and restarts: test_restarts), and every row bit-identical to an uninterrupted run's at the batch size it ran with (1
    before the kill, 3 after), though it ran beside other samples than there. Then `run` as it started: nothing is
    left to run (in this process: Ray never starts); the same name with another config is refused."""
    from cram_sweep.cli import main

    args = [
        "run",
        "name=killed",
        f"out_dir={tmp_path}",
        *TINY,
        "grid.samples=4",
        "grid.lengths=[4,8]",
        "batch_size=1",
    ]
    sweep = SweepDir(tmp_path / "killed")
    kill_mid_sweep(args, sweep)
    before = read_results(sweep, ["cell", "sample"])
    assert 0 < before.num_rows < 8, "the kill must land mid-sweep"
    parent_before, _ = mlflow_runs(tmp_path)

    resumed = run_cli("resume", str(sweep.path), "batch_size=3", "attention=eager")
    assert load_sweep_config(sweep.config).batch_size == 3, "runtime overrides are kept for the next resume"
    assert f"{before.num_rows} done, {8 - before.num_rows} to run" in resumed.stdout
    after = read_results(sweep, ["cell", "sample"])
    raw = ds.dataset(sweep.results).to_table(columns=["cell", "sample"])
    assert after.num_rows == raw.num_rows == 8, "every sample exactly once"
    parents, _ = mlflow_runs(tmp_path)
    assert [p.info.run_id for p in parents] == [p.info.run_id for p in parent_before]
    cfg = load_sweep_config(sweep.config)
    stored = read_results(sweep).to_pylist()
    ran_elsewhere = {rows: {(r["cell"], r["sample"], r["restart"]) for r in stored if r["forward_rows"] != rows} for rows in (1, 3)}
    uninterrupted = {rows: uninterrupted_rows(cfg, batch_size=rows, skip=skip) for rows, skip in ran_elsewhere.items()}
    assert sorted(r["forward_rows"] for r in stored) == sorted([1] * before.num_rows + [3] * (8 - before.num_rows))
    for row in stored:
        assert_bit_identical(row, uninterrupted[row["forward_rows"]][row["cell"], row["sample"]])

    assert main(args) == 0
    assert "8 done, 0 to run" in capsys.readouterr().out
    assert main([*args, "seed=1"]) == 2
    err = capsys.readouterr().err
    assert "holds a different sweep" in err and "resume" in err


@pytest.mark.parametrize(
    "override, message",
    [
        ("seed=1", "resume cannot change seed"),
        ("grid.samples=9", "resume cannot change grid.samples"),
        ("cluster=ray", "set the keys themselves"),
        ("worker.nope=1", "resume overrides worker.nope=1"),
        ("batch_size", "write key=value"),
    ],
)
def test_resume_refuses_overrides_that_change_results(tmp_path, capsys, override, message):
    from cram_sweep.cli import main

    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sweep.yaml").write_text(to_yaml(tiny_config("name=s", f"out_dir={tmp_path}")))
    assert main(["resume", str(tmp_path / "s"), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_print_config():
    """`--cfg job` prints the composed config as YAML, overrides applied, the models' files composed in, and runs nothing."""
    import dataclasses

    import yaml

    from cram_sweep.config import SweepConfig

    proc = run_cli("run", "--cfg", "job", "grid.samples=3", "grid.models=[tiny_neox]")
    printed = yaml.safe_load(proc.stdout)
    assert printed["grid"]["samples"] == 3 and printed["grid"]["models"] == ["tiny_neox"]
    assert printed["models"]["tiny_neox"]["architecture"] == "gpt_neox" and printed["models"]["tiny_neox"]["source"] == "random"
    assert {f.name for f in dataclasses.fields(SweepConfig)} <= set(printed), "every key of the sweep config"
    assert "sweep directory" not in proc.stdout


def test_three_methods_in_one_sweep_end_to_end(tmp_path, capsys):
    """grid.methods=[full,progressive,onestep]: one sweep, one MLflow parent and one report compare the protocols, each
    method with its own optimizer (its conf/method file's, then methods.<name>.optim.* on top). Progressive's side:
    horizons in the results, every stage in stages/, the report's horizon table and plots, horizon metrics on the
    MLflow child and parent runs, status and decode of the horizon. One-step's: its capacity line and curve, and decode's
    one forward giving the stored greedy prefix."""
    from cram_sweep.cli import main

    progressive = [f"methods.progressive.{arg}" for arg in TINY_PROGRESSIVE if not arg.startswith("method=")]
    proc = run_cli(
        "run",
        "name=both",
        f"out_dir={tmp_path}",
        *TINY,
        "grid.methods=[full,progressive,onestep]",
        "grid.lengths=[6,12]",
        *progressive,
        "report=true",
        "worker.progress_seconds=0",
        "progress_line_seconds=0",
    )
    sweep = SweepDir(tmp_path / "both")
    assert "total: 18 done, 0 failed, 0 pending" in proc.stdout
    assert "stages up to length" in proc.stderr, "progress shows the stage lengths reached"
    rows = read_results(sweep).to_pylist()
    assert {(r["cell"], r["method"]) for r in rows} == {
        (f"tiny_llama/pydoc/{method}/n_mem=2/L={length}", method) for method in ("full", "progressive", "onestep") for length in (6, 12)
    }
    cfg = load_sweep_config(sweep.config)
    assert (cfg.methods["full"].optim.schedule, cfg.methods["progressive"].optim.schedule) == ("constant", "cosine")
    assert cfg.methods["progressive"].optim.lr == 0.1 and cfg.methods["full"].optim.lr == 0.1, "TINY's optim.lr=0.1 applies to both"
    assert cfg.methods["progressive"].optim.max_steps == 300 and cfg.methods["full"].optim.max_steps == 150
    capacity = (sweep.report / "capacity.csv").read_text().splitlines()
    column = capacity[0].split(",").index("method")
    assert sorted(line.split(",")[column] for line in capacity[1:]) == ["full", "onestep", "progressive"]
    assert all(line in proc.stdout for line in ("full cramming fits", "progressive horizon", "one-step generation fits")), (
        "one line says what each number means"
    )
    assert {"horizon_vs_ce.png", "growth.png", "capacity.md"} <= {p.name for p in sweep.report.iterdir()}

    progressive_rows = [r for r in rows if r["method"] == "progressive"]
    assert not any(r["predict_first"] for r in progressive_rows), "the shipped default gives the first token"
    assert max(r["horizon"] for r in progressive_rows) >= 3
    stages = read_stages(sweep).to_pylist()
    for row in progressive_rows:
        mine = sorted((s for s in stages if (s["cell"], s["sample"]) == (row["cell"], row["sample"])), key=lambda s: s["stage"])
        assert len(mine) == row["stages"] and mine[-1]["total_steps"] == row["steps"]
        assert row["horizon"] == max((s["length"] for s in mine if s["converged"]), default=0)

    parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1 and sorted(c.data.tags["method"] for c in children) == sorted(["full", "onestep", "progressive"] * 2)
    assert all("horizon_mean" in c.data.metrics for c in children if c.data.tags["method"] == "progressive")
    assert {"max_tokens/tiny_llama/pydoc/full", "max_tokens/tiny_llama/pydoc/onestep", "horizon_mean/tiny_llama/pydoc/progressive"} <= set(
        parents[0].data.metrics
    )
    status = run_cli("status", str(sweep.path)).stdout
    assert status.count("horizon") == 6 and status.count("mean acc     –") == 2, "progressive has no accuracy"
    best = max(progressive_rows, key=lambda r: r["horizon"])
    assert main(["decode", str(sweep.path), "--cell", best["cell"], "--sample", str(best["sample"])]) == 0
    assert f"horizon {best['horizon']} of {best['length']} tokens: the horizon prefix decodes exactly: yes" in capsys.readouterr().out
    one_step = next(r for r in rows if r["method"] == "onestep")
    assert main(["decode", str(sweep.path), "--cell", one_step["cell"], "--sample", str(one_step["sample"])]) == 0
    decoded = capsys.readouterr().out
    assert f"matched prefix: {one_step['greedy_prefix']} of {one_step['length']} predicted tokens" in decoded, decoded
