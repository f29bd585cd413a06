"""The sweep directory and its Parquet stores: one row per finished sample, one per failed attempt.

Files are written to a hidden temporary name (`.part-*.parquet.tmp`), fsynced and renamed into place
(then the directory is fsynced), so a reader (pyarrow.dataset skips names starting with '.') never
sees half a file. A process killed mid-write leaves only a hidden `.tmp`, removed by the next process
that takes the sweep's lock. Rows are deduplicated by (cell, sample) on read, so a crash between
writing a merged file and deleting its parts loses and duplicates nothing.

Fault injection for the reliability tests (docs/reliability.md): CRAM_SWEEP_FAULT holds
comma-separated `kind:arg[:arg]` entries; see `faults()`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, List, Set, Tuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from .config import UserError

SCHEMA_VERSION = "1"
_VERSION_KEY = b"cram_sweep_schema"

RESULTS_SCHEMA = pa.schema([
    ("cell", pa.string()), ("model", pa.string()), ("dataset", pa.string()), ("precision", pa.string()),
    ("length", pa.int64()), ("n_mem", pa.int64()), ("sample", pa.int64()), ("seed", pa.int64()),
    ("token_ids", pa.list_(pa.int64())),
    ("acc_no_mem", pa.float64()), ("acc", pa.float64()), ("ce_no_mem_bits", pa.float64()), ("ce_bits", pa.float64()),
    ("info_gain_bits", pa.float64()), ("gain_tokens", pa.float64()), ("seconds", pa.float64()),
    ("steps", pa.int64()), ("converged", pa.bool_()), ("greedy_prefix", pa.int64()), ("greedy_exact", pa.bool_()),
    ("memory", pa.list_(pa.float32())), ("hidden", pa.int64()), ("vocab_size", pa.int64()),
], metadata={_VERSION_KEY: SCHEMA_VERSION.encode()})

FAILURES_SCHEMA = pa.schema([
    ("cell", pa.string()), ("sample", pa.int64()), ("attempt", pa.int64()), ("error", pa.string()), ("time", pa.float64()),
], metadata={_VERSION_KEY: SCHEMA_VERSION.encode()})


def faults() -> dict:
    """CRAM_SWEEP_FAULT=kind:arg[:arg],... parsed to {kind: [args]}; empty (no fault) in normal use.

    store_write_sleep:SECONDS        sleep between writing a store file's .tmp and renaming it
    nan_sample:CELL_SUBSTRING:SAMPLE (worker) that sample's text embedding turns NaN
    oom_above_batch:N                (worker) a forward with more than N samples raises torch.OutOfMemoryError
    """
    spec = os.environ.get("CRAM_SWEEP_FAULT", "")
    parsed = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        kind, _, args = entry.partition(":")
        parsed[kind] = args.split(":") if args else []
    return parsed


class StoreError(Exception):
    """Writing the store failed (disk full, permissions); what was written before is intact."""


class SweepDir:
    def __init__(self, path):
        self.path = Path(path)

    config = property(lambda self: self.path / "sweep.yaml")
    results = property(lambda self: self.path / "results")
    failures = property(lambda self: self.path / "failures")
    tracking = property(lambda self: self.path / "tracking.json")
    report = property(lambda self: self.path / "report")
    lock_file = property(lambda self: self.path / ".lock")

    def require(self) -> "SweepDir":
        if not self.config.is_file():
            raise UserError(f"{self.path} is not a sweep directory (no sweep.yaml): give the directory `cram-sweep run` printed")
        return self

    @contextmanager
    def lock(self):
        """Exclusive for one run/resume at a time; the kernel drops it if the process dies."""
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.lock_file, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise UserError(f"another cram-sweep process (pid {holder}) is working on {self.path}: wait for it or stop it") from None
        try:  # who holds the lock, for the message above; a full disk must not stop the lock itself
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
        except OSError:
            pass
        remove_partial(self)
        try:
            yield
        finally:
            handle.close()


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def remove_partial(sweep: "SweepDir") -> List[Path]:
    """Delete the hidden `.part-*.tmp` files a killed writer left; call only while holding the lock."""
    removed = []
    for folder in (sweep.results, sweep.failures):
        if folder.is_dir():
            for tmp in folder.glob(".part-*.tmp"):
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_table(folder: Path, table: pa.Table) -> Path:
    """Write-then-rename: the file appears whole under its final name, or not at all."""
    name = f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
    tmp = folder / f".{name}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        pause = faults().get("store_write_sleep")
        if pause:
            time.sleep(float(pause[0]))
        os.replace(tmp, folder / name)
        _fsync_dir(folder)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        then = f"then run `cram-sweep resume {folder.parent}`; what was stored before is intact"
        if err.errno in _NO_SPACE:
            raise StoreError(f"no space left to write {folder} ({err.strerror}): free space, {then}") from None
        raise StoreError(f"cannot write {folder} ({' '.join(str(err).split())[:200]}): fix it, {then}") from None
    return folder / name


def write_results(sweep: SweepDir, rows: List[dict]) -> None:
    if rows:
        _write_table(sweep.results, pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA))


def write_failures(sweep: SweepDir, rows: List[dict]) -> None:
    if rows:
        _write_table(sweep.failures, pa.Table.from_pylist(rows, schema=FAILURES_SCHEMA))


def _read(folder: Path, schema: pa.Schema, columns=None) -> pa.Table:
    if not folder.is_dir():
        return schema.empty_table() if columns is None else schema.empty_table().select(columns)
    dataset = ds.dataset(folder, format="parquet", schema=schema)  # skips hidden names: .part-*.tmp
    for fragment in dataset.get_fragments():
        try:
            meta = pq.read_metadata(fragment.path).metadata or {}
        except (OSError, pa.ArrowException) as err:
            raise UserError(f"{fragment.path} is not a readable Parquet file ({' '.join(str(err).split())[:120]}): "
                            f"move it out of {folder} (cram-sweep never leaves half files under a visible name)") from None
        if meta.get(_VERSION_KEY) != SCHEMA_VERSION.encode():
            found = meta.get(_VERSION_KEY, b"none").decode()
            raise UserError(f"{fragment.path} has store schema version {found}, this cram-sweep reads {SCHEMA_VERSION}: "
                            f"use a matching cram-sweep version or move the file out of {folder}")
    return dataset.to_table(columns=columns)


def _dedup(table: pa.Table) -> pa.Table:
    if table.num_rows == 0:
        return table
    keys = pc.binary_join_element_wise(table["cell"], pc.cast(table["sample"], pa.string()), "#")
    first = pc.unique(keys)
    index = pc.index_in(first, keys)
    return table.take(index)


def read_results(sweep: SweepDir, columns=None) -> pa.Table:
    """Every finished sample once (the first copy where a crash left two)."""
    if columns is not None:
        columns = ["cell", "sample", *(c for c in columns if c not in ("cell", "sample"))]
    return _dedup(_read(sweep.results, RESULTS_SCHEMA, columns))


def read_failures(sweep: SweepDir) -> pa.Table:
    return _read(sweep.failures, FAILURES_SCHEMA)


def done_keys(sweep: SweepDir) -> Set[Tuple[str, int]]:
    table = read_results(sweep, ["cell", "sample"])
    return set(zip(table["cell"].to_pylist(), table["sample"].to_pylist()))


def compact(sweep: SweepDir) -> None:
    """Merge the results' part files into one (many small files slow every later read)."""
    parts = sorted(sweep.results.glob("part-*.parquet")) if sweep.results.is_dir() else []
    if len(parts) < 2:
        return
    merged = _write_table(sweep.results, read_results(sweep))
    for part in parts:
        if part != merged:
            part.unlink()


def results_frame(sweep: SweepDir, columns: Iterable[str] = None):
    return read_results(sweep, list(columns) if columns else None).to_pandas()
