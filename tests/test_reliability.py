"""Faults and bad input, on real local Ray and real MLflow (SQLite): nothing finished is lost or duplicated.

docs/reliability.md lists each fault, how it is injected, what is guaranteed and which test proves it.
Real kills need a sweep in its own process (started here with Popen); everything that needs no Ray runs
in-process (cram_sweep.cli.main) to keep the suite fast.
"""

import contextlib
import errno
import io
import os
import signal
import socket
import subprocess
import threading
from pathlib import Path

import psutil
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from cram_sweep import cli
from cram_sweep.config import to_yaml
from cram_sweep.errors import UserError
from cram_sweep.results import store
from cram_sweep.results.store import SweepDir, read_failures, read_results

from .helpers import TINY, assert_bit_identical, result_row, tiny_config, uninterrupted_rows
from .processes import cli_env, descendants, kill_tree, start_cli, wait_for

# One torch thread per worker: on a loaded 2-core machine two OpenMP threads per worker crawl (spin-waits).
BASE = [*TINY, "worker.cpus=1"]
# Samples that never converge (tiny lr) run exactly max_steps: predictable durations to kill into.
SLOW = ["grid.lengths=[8]", "optim.lr=0.001", "optim.patience=1000"]
KEYS = ["cell", "sample"]


# ---------------------------------------------------------------- helpers


def start(args, log: Path, fault: str = None, preexec_fn=None) -> subprocess.Popen:
    """The console entry point in its own session; its output is copied to `log` by a thread of this process."""
    proc = start_cli(args, env=cli_env(**({"CRAM_SWEEP_FAULT": fault} if fault else {})), preexec_fn=preexec_fn)

    def copy():
        with open(log, "wb", buffering=0) as sink:
            for chunk in iter(lambda: proc.stdout.read1(65536), b""):
                sink.write(chunk)

    proc.copier = threading.Thread(target=copy, daemon=True)
    proc.copier.start()
    return proc


def finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise AssertionError(f"the sweep did not finish in {timeout} s:\n{log.read_text()[-3000:]}") from None
    proc.copier.join(timeout=30)
    return log.read_text()


def cram_workers(proc: subprocess.Popen) -> list:
    """The sweep's Ray worker processes (descendants of this sweep only, never another session's)."""
    found = []
    for child in descendants(proc):
        try:
            if child.name().startswith("ray::CramWorker"):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def stored(sweep: SweepDir, columns=None) -> dict:
    """(cell, sample) -> row of every finished sample a reader sees now."""
    return {(r["cell"], r["sample"]): r for r in read_results(sweep, columns).to_pylist()}


def raw_count(sweep: SweepDir) -> int:
    """Rows as a plain pyarrow reader sees them, before deduplication."""
    return ds.dataset(sweep.results).count_rows() if sweep.results.is_dir() else 0


def tmp_files(sweep: SweepDir) -> list:
    return [p for folder in (sweep.results, sweep.failures) if folder.is_dir() for p in folder.glob(".part-*.tmp")]


def error_lines(text: str) -> list:
    return [line for line in text.splitlines() if line.startswith("error:")]


def cli_main(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def same_rows(before: dict, after: dict) -> None:
    """Rows stored earlier are kept as they were (a recomputed sample would differ in `seconds`)."""
    for key, row in before.items():
        assert after[key]["seconds"] == row["seconds"] and after[key]["memory"] == row["memory"], f"{key} changed"


# ---------------------------------------------------------------- NaN + OOM in one faulted sweep; a second process on it

FAULTED = [
    "worker.cpus=1",
    "grid.lengths=[4,8]",
    "grid.samples=3",
    "batch_size=3",
    "analysis.bits=false",
]  # the bits forward has a row per rounding: it would trip the batch fault
NAN_CELL = "tiny_llama/pydoc/full/n_mem=2/L=8"


@pytest.fixture(scope="module")
def faulted(tmp_path_factory):
    """One sweep with an injected OOM (any forward with more than 1 sample) and a NaN sample (sample 1 of L=8).

    While it runs, a second `resume` and a second `run` on the same directory are tried in this process.
    """
    out = tmp_path_factory.mktemp("faulted")
    args = ["name=faulted", f"out_dir={out}", *TINY, *FAULTED]
    log = out / "run.log"
    sweep = SweepDir(out / "faulted")
    proc = start(["run", *args], log, fault="oom_above_batch:1,nan_sample:L=8:1")
    second = {}
    try:
        wait_for(
            lambda: sweep.config.is_file() and sweep.lock_file.read_text() == store.lock_holder(proc.pid), "the lock", proc=proc, log=log
        )
        for name, argv in (("resume", ["resume", str(sweep.path)]), ("run", ["run", *args])):
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = cli.main(argv)
            second[name] = (code, err.getvalue())
        still_running = proc.poll() is None
        text = finish(proc, log)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    # The un-faulted baseline: the engine on the same samples at the batch size the OOM halved to (1), in this process.
    baseline = uninterrupted_rows(tiny_config(*FAULTED), batch_size=1)
    return {"proc": proc, "text": text, "sweep": sweep, "second": second, "still_running": still_running, "baseline": baseline}


@pytest.mark.slow
def test_oom_in_a_batch_halves_it_and_results_are_identical(faulted):
    text, sweep = faulted["text"], faulted["sweep"]
    # the worker's own warning, forwarded by Ray: one work item holds both cells (same model and n_mem)
    assert "out of memory on tiny_llama/full/n_mem=2 (2 cells): retrying 6 samples with batch_size=1" in text
    rows = stored(sweep)
    assert len(rows) == 5 and raw_count(sweep) == 5
    for key, row in rows.items():  # batch 1 after the OOM, as the baseline at batch 1: the same rows
        assert_bit_identical(row, faulted["baseline"][key])
        assert row["forward_rows"] == 1
    assert not any("oom" in r["error"].lower() or "memory" in r["error"].lower() for r in read_failures(sweep).to_pylist())


@pytest.mark.slow
def test_nan_sample_fails_alone_with_its_reason_and_sweep_exits_1(faulted, capsys):
    proc, text, sweep = faulted["proc"], faulted["text"], faulted["sweep"]
    assert proc.returncode == 1
    assert f"{NAN_CELL}  done    2  failed   1  pending    0" in text
    assert "total: 5 done, 1 failed, 0 pending" in text
    assert f"some samples failed: see `cram-sweep status {sweep.path}`" in text
    failures = read_failures(sweep).to_pylist()
    assert [(f["cell"], f["sample"], f["attempt"]) for f in failures] == [(NAN_CELL, 1, 1)]
    assert failures[0]["error"].startswith("loss became non-finite at step 1")
    rows = stored(sweep)
    assert (NAN_CELL, 1) not in rows
    for sample in (0, 2):  # its batch-mates: stored, and exactly what they are without the NaN neighbour
        assert_bit_identical(rows[NAN_CELL, sample], faulted["baseline"][NAN_CELL, sample])
    code, out, err = cli_main(capsys, "status", str(sweep.path))
    assert code == 0 and err == ""
    assert f"failed: {NAN_CELL} sample 1 (attempt 1): loss became non-finite at step 1" in out
    assert "total: 5 done, 1 failed, 0 pending" in out


@pytest.mark.slow
def test_second_process_on_the_same_sweep_refuses(faulted):
    sweep = faulted["sweep"]
    assert faulted["still_running"], "the first sweep must still hold the lock while the others try"
    for name in ("resume", "run"):
        code, err = faulted["second"][name]
        assert code == 2, err
        lines = error_lines(err)
        assert len(lines) == 1 and "another cram-sweep process" in lines[0] and str(sweep.path) in lines[0], err
        assert f"pid {faulted['proc'].pid}" in lines[0]
        assert "Traceback" not in err
    # The refused processes wrote nothing: every sample once, in the first process's files only.
    assert raw_count(sweep) == len(stored(sweep)) == 5
    assert faulted["proc"].returncode == 1  # the first one finished normally (1: the injected NaN sample)


# ---------------------------------------------------------------- a Ray worker killed mid-batch, twice


@pytest.mark.slow
def test_worker_killed_mid_batch_retries_then_records_failures(tmp_path, capsys):
    """worker.max_retries=1, an item of 10 samples run 2 at a time: a kill charges an attempt to the 2 samples in the
    batch only; the 8 queued behind them run on the restarted worker uncharged. A second kill while those 2 run
    again (they lead the retried item) uses their last try: they are recorded failed, the other 8 stored."""
    args = [
        "run",
        "name=wkill",
        f"out_dir={tmp_path}",
        *BASE,
        *SLOW,
        "grid.samples=10",
        "optim.max_steps=400",
        "batch_size=2",
        "worker.samples_per_item=10",
        "worker.max_retries=1",
        "worker.progress_seconds=0.5",
        "progress_line_seconds=0.5",
    ]
    log = tmp_path / "run.log"
    sweep = SweepDir(tmp_path / "wkill")
    proc = start(args, log)
    try:
        wait_for(lambda: read_results(sweep, KEYS).num_rows >= 1, "the first stored rows", proc=proc, log=log)
        first = wait_for(lambda: cram_workers(proc), "the worker process", proc=proc, log=log)[0]
        first.kill()
        done_at_kill, seen = set(stored(sweep, KEYS)), len(log.read_text())

        def rerunning():  # the restarted worker's heartbeat: the retried item's batch (the charged samples) is running
            workers = [w for w in cram_workers(proc) if w.pid != first.pid]
            return workers and "running, step" in log.read_text()[seen:] and workers

        for worker in wait_for(rerunning, "the retried batch running on the restarted worker", proc=proc, log=log):
            worker.kill()
        text = finish(proc, log)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert proc.returncode == 1, text
    failures = read_failures(sweep).to_pylist()
    rows = stored(sweep)
    first_try = {(f["cell"], f["sample"]) for f in failures if f["attempt"] == 1}
    final = {(f["cell"], f["sample"]) for f in failures if f["attempt"] == 2}
    assert len(first_try) == 2, "only the batch of 2 was charged; the queued samples were not"
    assert not first_try & done_at_kill, "a sample stored before the kill was not redone"
    assert final == first_try and not final & set(rows), "the second loss used their last try: recorded failed"
    assert all("Actor" in f["error"] for f in failures), failures
    assert set(rows) | final == {("tiny_llama/pydoc/full/n_mem=2/L=8", i) for i in range(10)}, "the queued samples ran, uncharged"
    assert raw_count(sweep) == len(rows), "no duplicates"
    assert f"total: {len(rows)} done, {len(final)} failed, 0 pending" in text
    code, out, _ = cli_main(capsys, "status", str(sweep.path))
    assert code == 0
    for cell, sample in final:
        assert f"failed: {cell} sample {sample} (attempt 2): Actor" in out
    assert f"total: {len(rows)} done, {len(final)} failed, 0 pending" in out


# ---------------------------------------------------------------- the driver killed during a store write; the disk fills


def _mount_tmpfs(path: Path) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(path)], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _fill(path: Path) -> Path:
    """Write a file until the filesystem is full."""
    filler = path / "filler.bin"
    chunk = b"\0" * (1 << 20)
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(chunk)
        except OSError as err:
            assert err.errno == errno.ENOSPC
    with open(filler, "ab", buffering=0) as handle:  # the last pages too
        try:
            while True:
                handle.write(b"\0" * 512)
        except OSError:
            pass
    return filler


@pytest.fixture(scope="module")
def store_faults(tmp_path_factory):
    """One sweep of 6 samples on a small filesystem of its own:
    1. `run`, SIGKILLed while a results file is being written (.tmp written, not yet renamed);
    2. `resume`, during which the disk fills up (a tmpfs, or where mounting is not allowed, the
       driver's file-size limit: RLIMIT_FSIZE set on the running driver, SIGXFSZ ignored);
    3. `resume` after space is freed, to the end."""
    base = tmp_path_factory.mktemp("store")
    disk = base / "disk"
    tmpfs = not os.environ.get("CRAM_TEST_NO_TMPFS") and _mount_tmpfs(disk)  # CRAM_TEST_NO_TMPFS=1: test the fallback
    sweep = SweepDir(disk / "st")
    args = [f"out_dir={disk}", *BASE, *SLOW, "grid.samples=6", "optim.max_steps=150", "batch_size=2"]
    seen = {"tmpfs": tmpfs}
    try:
        # 1. killed in the middle of a store write
        log1 = base / "1.log"
        proc = start(["run", "name=st", *args], log1, fault="store_write_sleep:2")
        try:
            wait_for(
                lambda: list(sweep.results.glob("part-*.parquet")) and tmp_files(sweep),
                "a results write in progress after one stored part",
                proc=proc,
                log=log1,
            )
            kill_tree(proc)
        finally:
            if proc.poll() is None:
                kill_tree(proc)
        seen["tmp_after_kill"] = tmp_files(sweep)
        seen["tmp_rows"] = sum(pq.read_metadata(p).num_rows for p in seen["tmp_after_kill"] if p.parent == sweep.results)
        seen["after_kill"] = stored(sweep)
        seen["raw_after_kill"] = raw_count(sweep)

        # 2. resume; the disk fills while it writes
        log2 = base / "2.log"
        preexec = None if tmpfs else (lambda: signal.signal(signal.SIGXFSZ, signal.SIG_IGN))
        proc = start(["resume", str(sweep.path)], log2, fault="store_write_sleep:2", preexec_fn=preexec)
        try:
            # the disk fills while the first new part waits to be renamed: the rename needs no space, every later write fails
            new_tmp = lambda: [t for t in tmp_files(sweep) if t.parent == sweep.results and t not in seen["tmp_after_kill"]]  # noqa: E731
            wait_for(new_tmp, "a results write in progress", proc=proc, log=log2)
            seen["stale_left"] = [t for t in seen["tmp_after_kill"] if t.exists()]
            if tmpfs:
                filler = _fill(disk)
            else:
                psutil.Process(proc.pid).rlimit(psutil.RLIMIT_FSIZE, (4096, 4096))
            seen["log2"] = finish(proc, log2)
            seen["code2"] = proc.returncode
        finally:
            if proc.poll() is None:
                kill_tree(proc)
        seen["after_full"] = stored(sweep)
        seen["tmp_after_full"] = tmp_files(sweep)

        # 3. space freed: resume to the end
        if tmpfs:
            filler.unlink()
        log3 = base / "3.log"
        proc = start(["resume", str(sweep.path)], log3)
        seen["log3"] = finish(proc, log3)
        seen["code3"] = proc.returncode
        seen["final"] = stored(sweep)
        seen["raw_final"] = raw_count(sweep)
        seen["tmp_final"] = tmp_files(sweep)
        seen["files_final"] = sorted(p.name for p in sweep.results.iterdir())
        yield seen
    finally:
        if tmpfs:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.slow
def test_driver_killed_during_store_write_then_resume_completes_exactly_the_rest(store_faults):
    seen = store_faults
    assert seen["tmp_after_kill"], "the kill must land while a store file is being written"
    assert seen["tmp_rows"] >= 1, "the write in flight held finished samples"
    done = len(seen["after_kill"])
    assert 0 < done < 6
    assert seen["raw_after_kill"] == done, "a reader never sees the half-written file"
    assert seen["stale_left"] == [], "the next run removed the leftover .tmp under the lock"
    assert f"6 samples in 1 cells: {done} done, {6 - done} to run" in seen["log2"]
    refilled = len(seen["after_full"])
    assert f"6 samples in 1 cells: {refilled} done, {6 - refilled} to run" in seen["log3"]
    assert seen["code3"] == 0, seen["log3"]
    assert len(seen["final"]) == 6 and seen["raw_final"] == 6, "every sample exactly once"
    assert set(seen["final"]) == {("tiny_llama/pydoc/full/n_mem=2/L=8", i) for i in range(6)}
    same_rows(seen["after_kill"], seen["final"])
    assert seen["tmp_final"] == [] and len(seen["files_final"]) == 1, "compacted to one file, no leftovers"


@pytest.mark.slow
def test_disk_full_is_one_clear_error_and_store_stays_intact(store_faults):
    seen = store_faults
    assert seen["code2"] == 3, seen["log2"][-3000:]
    lines = error_lines(seen["log2"])
    assert len(lines) == 1, seen["log2"][-3000:]
    assert "no space left" in lines[0] and "free space" in lines[0] and "cram-sweep resume" in lines[0]
    assert "Traceback" not in seen["log2"]
    assert len(seen["after_full"]) > len(seen["after_kill"]), "what was stored before the disk filled is there"
    same_rows(seen["after_kill"], seen["after_full"])
    assert seen["tmp_after_full"] == [], "the failed write left no file behind"
    same_rows(seen["after_full"], seen["final"])


# ---------------------------------------------------------------- the store, in-process: atomic files, leftovers, compaction


def _rows(cell, samples):
    return [result_row(cell=cell, sample=i, seconds=0.1 * i, memory=[0.5, -0.5]) for i in samples]


def test_store_ignores_and_cleans_half_files_and_survives_a_crashed_compaction(tmp_path):
    sweep = SweepDir(tmp_path / "s")
    store.write_results(sweep, _rows("c", [0, 1]))
    store.write_results(sweep, _rows("c", [2]))
    # A writer killed mid-write leaves a hidden, truncated .tmp: readers skip it.
    whole = next(iter(sweep.results.glob("part-*.parquet"))).read_bytes()
    (sweep.results / ".part-1-dead.parquet.tmp").write_bytes(whole[: len(whole) // 2])
    (sweep.failures).mkdir()
    (sweep.failures / ".part-2-dead.parquet.tmp").write_bytes(b"PAR1 half")
    assert sorted(read_results(sweep)["sample"].to_pylist()) == [0, 1, 2]
    assert ds.dataset(sweep.results).count_rows() == 3 and read_failures(sweep).num_rows == 0
    # A compaction killed after its merged file was renamed in but before the parts were deleted: duplicates on disk only.
    store._write_table(sweep.results, read_results(sweep))
    assert ds.dataset(sweep.results).count_rows() == 6 and read_results(sweep).num_rows == 3
    # The next process to take the lock removes the leftovers; its compaction leaves one file, each sample once.
    with sweep.lock():
        assert tmp_files(sweep) == []
        store.compact(sweep)
    assert len(list(sweep.results.glob("part-*.parquet"))) == 1 and ds.dataset(sweep.results).count_rows() == 3


def test_store_write_failure_is_a_store_error_and_leaves_nothing(tmp_path, monkeypatch):
    sweep = SweepDir(tmp_path / "s")
    store.write_results(sweep, _rows("c", [0]))

    def no_space(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.pq, "write_table", no_space)
    with pytest.raises(store.StoreError, match="no space left to write .*: free space, then run `cram-sweep resume"):
        store.write_results(sweep, _rows("c", [1]))
    monkeypatch.undo()
    assert tmp_files(sweep) == [] and read_results(sweep)["sample"].to_pylist() == [0]


def test_lock_records_pid_and_host_and_refuses_a_second_holder_with_them(tmp_path):
    sweep = SweepDir(tmp_path / "s")
    holder = f"pid {os.getpid()} on host {socket.gethostname()}"
    with sweep.lock():
        assert sweep.lock_file.read_text() == holder
        with pytest.raises(UserError) as refused, sweep.lock():  # flock: a second open file conflicts, even in one process
            pass
    assert str(refused.value) == f"another cram-sweep process ({holder}) is working on {sweep.path}: wait for it or stop it"


def test_filesystem_without_locks_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    """NFS without a reachable lock manager: flock fails with ENOLCK."""

    def no_locks(*_args):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(store.fcntl, "flock", no_locks)
    code, out, err = cli_main(capsys, "run", "name=nolock", f"out_dir={tmp_path}", *TINY)
    assert code == 2 and "Traceback" not in err, err
    assert error_lines(err) == err.strip().splitlines(), err
    [line] = error_lines(err)
    lock_file = SweepDir(tmp_path / "nolock").lock_file
    assert line.startswith(f"error: cannot lock {lock_file} (ENOLCK: "), line
    assert "put out_dir on a local disk or on a filesystem with locking" in line and "docs/reliability.md" in line, line
    assert not SweepDir(tmp_path / "nolock").config.exists(), "nothing written without the lock"


# ---------------------------------------------------------------- bad input: one `error:` line naming the key, exit 2, no work


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "short.txt").write_text("Too short to cram.")
    (root / "gguf").mkdir()
    (root / "gguf" / "garbage.gguf").write_bytes(b"GGUF" + os.urandom(60))
    (root / "empty").mkdir()
    return root


RUN_CASES = [
    # (id, overrides, the key or words the one error line must name)
    ("unknown-key", ["grid.bogus=1"], "unknown config key grid.bogus"),
    ("appended-unknown-key", ["+optim.bogus=1"], "unknown config key optim.bogus"),
    ("unknown-group-option", ["cluster=nope"], "unknown option cluster=nope: choose from local, ray"),
    ("unknown-model", ["grid.models=[nope]"], "grid.models"),
    ("unknown-dataset", ["grid.datasets=[nope]"], "grid.datasets"),
    ("wrong-type", ["grid.samples=abc"], "grid.samples=abc"),
    ("wrong-type-list", ["grid.lengths=[a]"], "grid.lengths"),
    ("zero-samples", ["grid.samples=0"], "grid.samples=0"),
    ("zero-n-mem", ["grid.n_mem=[0]"], "grid.n_mem"),
    ("negative-steps", ["optim.max_steps=-1"], "optim.max_steps=-1"),
    ("negative-lr", ["optim.lr=-1"], "optim.lr"),
    ("zero-batch", ["batch_size=0"], "batch_size=0"),
    ("length-below-2", ["grid.lengths=[1]"], "grid.lengths"),
    ("length-above-context", ["grid.lengths=[2000]"], "grid.lengths max 2000"),
    ("n-mem-above-context", ["grid.lengths=[8]", "grid.n_mem=[1020]"], "grid.n_mem max 1020"),
    ("empty-grid", ["grid.lengths=[]"], "grid is empty"),
    ("unreadable-files-glob", ["grid.datasets=[files]", "datasets.files.path=/nonexistent/*.txt"], "datasets.files.path"),
    (
        "text-too-short",
        ["grid.datasets=[files]", "datasets.files.path={root}/short.txt", "grid.samples=1", "grid.lengths=[64]"],
        "grid.lengths",
    ),
    ("too-many-samples", ["grid.samples=100000"], "grid.samples"),
    ("unknown-model-source", ["models.tiny_llama.source=bogus"], "models.tiny_llama.source"),
    ("model-path-missing", ["models.tiny_llama.source=hf", "models.tiny_llama.path=/nonexistent"], "models.tiny_llama.path"),
    (
        "gguf-not-a-model",
        ["models.tiny_llama.source=hf", "models.tiny_llama.path={root}/gguf", "models.tiny_llama.gguf_file=garbage.gguf"],
        "models.tiny_llama",
    ),
    ("bad-precision", ["precision=fp8"], "precision=fp8"),
    ("progressive-min-length-0", ["method=progressive", "method.min_length=0"], "method.min_length=0"),
    ("progressive-step-0", ["method=progressive", "method.step=0"], "method.step=0"),
    ("progressive-steps-per-stage-0", ["method=progressive", "method.steps_per_stage=0"], "method.steps_per_stage=0"),
    ("progressive-threshold-0", ["method=progressive", "method.threshold=0"], "method.threshold=0"),
    ("progressive-threshold-above-1", ["method=progressive", "method.threshold=1.5"], "method.threshold=1.5"),
    ("progressive-unknown-growth", ["method=progressive", "method.growth=cubic"], "method.growth=cubic"),
    ("progressive-unknown-backoff", ["method=progressive", "method.backoff=ternary"], "method.backoff=ternary"),
    ("progressive-min-length-above-cap", ["method=progressive", "method.min_length=16", "grid.lengths=[8]"], "method.min_length=16"),
    ("progressive-no-first-target", ["method=progressive", "method.predict_first=false", "method.min_length=1"], "method.min_length=1"),
    ("unknown-method", ["method=partial"], "unknown option method=partial"),
    ("unknown-schedule", ["optim.schedule=linear"], "optim.schedule=linear"),
]


@pytest.mark.parametrize("overrides,names", [c[1:] for c in RUN_CASES], ids=[c[0] for c in RUN_CASES])
def test_bad_run_input_is_one_line_exit_2_before_any_work(overrides, names, bad_files, tmp_path, capsys):
    out_dir = tmp_path / "out"
    argv = ["run", "name=bad", f"out_dir={out_dir}", *BASE, *(o.format(root=bad_files) for o in overrides)]
    code, out, err = cli_main(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert names in lines[0], lines[0]
    assert not (out_dir / "bad").exists(), "no sweep directory, no results: nothing ran"


def _sweep_dir(root: Path) -> SweepDir:
    sweep = SweepDir(root / "sw")
    sweep.path.mkdir(parents=True)
    sweep.config.write_text(to_yaml(tiny_config("name=sw", f"out_dir={root}")))
    return sweep


def _old_schema_part(root: Path) -> Path:
    sweep = _sweep_dir(root)
    table = store._table(_rows("tiny_llama/pydoc/full/n_mem=2/L=4", [0]), store.RESULTS_SCHEMA)
    sweep.results.mkdir()
    pq.write_table(table.replace_schema_metadata({b"cram_sweep_schema": b"0"}), sweep.results / "part-0.parquet")
    return sweep.path


def _junk_part(root: Path) -> Path:
    sweep = _sweep_dir(root)
    sweep.results.mkdir()
    (sweep.results / "part-0.parquet").write_bytes(b"not parquet at all")
    return sweep.path


def _bad_yaml(root: Path) -> Path:
    sweep = _sweep_dir(root)
    sweep.config.write_text(sweep.config.read_text() + "\nbogus_key: 1\n")
    return sweep.path


DIR_CASES = [
    ("not-a-sweep", "resume", lambda root: root, "is not a sweep directory"),
    ("status-not-a-sweep", "status", lambda root: root / "missing", "is not a sweep directory"),
    ("incompatible-schema", "status", _old_schema_part, "store schema version 0"),
    ("unreadable-store-file", "status", _junk_part, "is not a readable Parquet file"),
    ("edited-sweep-yaml", "resume", _bad_yaml, "is not a valid cram-sweep config"),
]


@pytest.mark.parametrize("command,make,names", [c[1:] for c in DIR_CASES], ids=[c[0] for c in DIR_CASES])
def test_bad_sweep_dir_is_one_line_exit_2(command, make, names, tmp_path, capsys):
    path = make(tmp_path)
    before = sorted(p.name for p in Path(path).rglob("*")) if Path(path).exists() else None
    code, out, err = cli_main(capsys, command, str(path))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert names in lines[0] and str(path) in lines[0], lines[0]
    after = sorted(p.name for p in Path(path).rglob("*")) if Path(path).exists() else None
    assert after == before, "nothing written"
