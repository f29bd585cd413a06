"""The sweep directory and its Parquet stores: one row per finished sample, one per failed attempt.

Files are written to a hidden temporary name and renamed into place, so a reader (pyarrow.dataset
skips names starting with '.') never sees half a file. Rows are deduplicated by (cell, sample) on
read, so a crash between writing a merged file and deleting its parts loses and duplicates nothing.
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
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            handle.close()


def _write_table(folder: Path, table: pa.Table) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    name = f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
    tmp = folder / f".{name}.tmp"
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, folder / name)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        hint = "the disk is full: free space" if err.errno == errno.ENOSPC else f"{err.strerror}: fix it"
        raise StoreError(f"cannot write {folder} ({hint}), then run `cram-sweep resume {folder.parent}`") from None
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
    dataset = ds.dataset(folder, format="parquet", schema=schema)
    for fragment in dataset.get_fragments():
        meta = pq.read_metadata(fragment.path).metadata or {}
        if meta.get(_VERSION_KEY) != SCHEMA_VERSION.encode():
            found = meta.get(_VERSION_KEY, b"none").decode()
            raise UserError(f"{fragment.path} has store schema version {found}, this cram-sweep reads {SCHEMA_VERSION}: use a matching cram-sweep version")
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
    if columns is not None and ("cell" not in columns or "sample" not in columns):
        columns = ["cell", "sample", *columns]
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
