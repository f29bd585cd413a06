"""The sweep directory and its Parquet stores: one row per finished sample, one per failed attempt.

Every file (store parts, sweep.yaml, tracking.json) is written by `write_atomically`: to a hidden
temporary name, fsynced and renamed into place (then the directory is fsynced), so a reader
(pyarrow.dataset skips names starting with '.') never sees half a file. A process killed mid-write
leaves only a hidden `.tmp`, removed by the next process that takes the sweep's lock. Rows are
deduplicated by their identity (cell, sample, restart) on read, so a crash between writing a merged file and
deleting its parts loses and duplicates nothing. A column added later reads, in parts written before it, as what
those parts held (ADDED_LATER: restart 0, packed batches).

The Parquet schemas are derived from the row dataclasses of columns.py (`ResultRow`, `StageRow`,
`FailureRow`): a column is added in one place.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import socket
import time
import typing
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from ..errors import StoreError, UserError, one_line
from ..sweep import faults
from .columns import FailureRow, ResultRow, StageRow

SCHEMA_VERSION = "2"
_VERSION_KEY = b"cram_sweep_schema"


_ARROW_TYPES = {
    str: pa.string(),
    int: pa.int64(),
    float: pa.float64(),
    bool: pa.bool_(),
    list[int]: pa.list_(pa.int64()),
    list[float]: pa.list_(pa.float32()),
    list[str]: pa.list_(pa.string()),
}
IDENTITY = ("cell", "sample", "restart")  # what makes a result row (and a failure's sample) one of its own


def arrow_schema(row_type) -> pa.Schema:
    """The Parquet schema of a row dataclass: one column per field, in field order."""
    hints = typing.get_type_hints(row_type)
    columns = [(field.name, _ARROW_TYPES[hints[field.name]]) for field in dataclasses.fields(row_type)]
    return pa.schema(columns, metadata={_VERSION_KEY: SCHEMA_VERSION.encode()})


RESULTS_SCHEMA = arrow_schema(ResultRow)
FAILURES_SCHEMA = arrow_schema(FailureRow)
STAGES_SCHEMA = arrow_schema(StageRow)


class SweepDir:
    def __init__(self, path):
        self.path = Path(path)

    config = property(lambda self: self.path / "sweep.yaml")
    results = property(lambda self: self.path / "results")
    failures = property(lambda self: self.path / "failures")
    stages = property(lambda self: self.path / "stages")
    tracking = property(lambda self: self.path / "tracking.json")
    report = property(lambda self: self.path / "report")
    lock_file = property(lambda self: self.path / ".lock")

    def require(self) -> SweepDir:
        if not self.config.is_file():
            raise UserError(f"{self.path} is not a sweep directory (no sweep.yaml): give the directory `cram-sweep run` printed")
        return self

    @contextmanager
    def lock(self):
        """Exclusive for one run/resume at a time; the kernel drops it if the process dies.

        An `flock` on `.lock`, which records its holder (`lock_holder`). It excludes processes on other hosts only
        where the filesystem forwards flock to a lock manager (docs/reliability.md); one that has no locks at all
        (ENOLCK: NFS without its lock manager) is one UserError line."""
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.lock_file, "a+")  # noqa: SIM115 - held open for the whole context: closing it releases the lock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "holder unknown"
            handle.close()
            raise UserError(f"another cram-sweep process ({holder}) is working on {self.path}: wait for it or stop it") from None
        except OSError as err:
            handle.close()
            if err.errno not in _NO_LOCKS:
                raise
            raise UserError(
                f"cannot lock {self.lock_file} ({errno.errorcode[err.errno]}: {err.strerror}): its filesystem offers no file locks "
                "(NFS without a reachable lock manager?): put out_dir on a local disk or on a filesystem with "
                "locking (NFSv4, Lustre mounted with -o flock; see docs/reliability.md)"
            ) from None
        try:  # who holds the lock, for the message above; a full disk must not stop the lock itself
            handle.seek(0)
            handle.truncate()
            handle.write(lock_holder(os.getpid()))
            handle.flush()
        except OSError:
            pass
        remove_partial(self)
        try:
            yield
        finally:
            handle.close()


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# flock on a filesystem without locks: NFS without a lock manager (ENOLCK), FUSE or Lustre without -o flock.
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


def lock_holder(pid: int) -> str:
    """The holder of a sweep's lock as `.lock` records it and a refused process shows it: `pid N on host H`."""
    return f"pid {pid} on host {socket.gethostname()}"


def remove_partial(sweep: SweepDir) -> list[Path]:
    """Delete the hidden `.part-*.tmp` files a killed writer left; call only while holding the lock."""
    removed = []
    for folder in (sweep.results, sweep.failures, sweep.stages):
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


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write-then-rename: `write(tmp)` fills a hidden temporary beside `path`, which is fsynced and
    renamed into place, then the directory is fsynced: `path` holds all of the new content or none."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        faults.pause_before_rename()
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_table(folder: Path, table: pa.Table) -> Path:
    path = folder / f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda tmp: pq.write_table(table, tmp))
    except OSError as err:
        then = f"then run `cram-sweep resume {folder.parent}`; what was stored before is intact"
        if err.errno in _NO_SPACE:
            raise StoreError(f"no space left to write {folder} ({err.strerror}): free space, {then}") from None
        raise StoreError(f"cannot write {folder} ({one_line(err, 200)}): fix it, {then}") from None
    return path


def _table(rows: list, schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist([dataclasses.asdict(row) for row in rows], schema=schema)


def write_results(sweep: SweepDir, rows: list[ResultRow]) -> None:
    if rows:
        _write_table(sweep.results, _table(rows, RESULTS_SCHEMA))


def write_failures(sweep: SweepDir, rows: list[FailureRow]) -> None:
    if rows:
        _write_table(sweep.failures, _table(rows, FAILURES_SCHEMA))


def write_stages(sweep: SweepDir, rows: list[StageRow]) -> None:
    if rows:
        _write_table(sweep.stages, _table(rows, STAGES_SCHEMA))


def _read(folder: Path, schema: pa.Schema, columns=None) -> pa.Table:
    if not folder.is_dir():
        return schema.empty_table() if columns is None else schema.empty_table().select(columns)
    dataset = ds.dataset(folder, format="parquet", schema=schema)  # skips hidden names: .part-*.tmp
    for fragment in dataset.get_fragments():
        try:
            meta = pq.read_metadata(fragment.path).metadata or {}
        except (OSError, pa.ArrowException) as err:
            raise UserError(
                f"{fragment.path} is not a readable Parquet file ({one_line(err, 120)}): "
                f"move it out of {folder} (cram-sweep never leaves half files under a visible name)"
            ) from None
        if meta.get(_VERSION_KEY) != SCHEMA_VERSION.encode():
            found = meta.get(_VERSION_KEY, b"none").decode()
            raise UserError(
                f"{fragment.path} has store schema version {found}, this cram-sweep reads {SCHEMA_VERSION}: "
                f"use a matching cram-sweep version or move the file out of {folder}"
            )
    return _fill_columns_added_later(dataset.to_table(columns=columns))


# Columns added after schema version 2, and what a part written before them held.
ADDED_LATER = {
    "restart": 0,  # before restarts: every row was restart 0
    "batch_invariant": False,  # before layout.py: every batch was packed
    "forward_rows": 0,  # ... at row counts that varied
    "layers": 0,  # before grid.layers: every model kept all its layers
}


def _fill_columns_added_later(table: pa.Table) -> pa.Table:
    """Parts written before a column of ADDED_LATER existed read it as null: they held its value there."""
    for name, value in ADDED_LATER.items():
        if name in table.column_names and table[name].null_count:
            index = table.column_names.index(name)
            table = table.set_column(index, name, pc.fill_null(table[name], value))
    return table


def _dedup(table: pa.Table, key_columns=IDENTITY) -> pa.Table:
    if table.num_rows == 0:
        return table
    keys = pc.binary_join_element_wise(*(pc.cast(table[c], pa.string()) for c in key_columns), "#")
    first = pc.unique(keys)
    index = pc.index_in(first, keys)
    return table.take(index)


def read_results(sweep: SweepDir, columns=None) -> pa.Table:
    """Every finished (sample, restart) once (the first copy where a crash left two); `columns` come after IDENTITY."""
    if columns is not None:
        columns = [*IDENTITY, *(c for c in columns if c not in IDENTITY)]
    return _dedup(_read(sweep.results, RESULTS_SCHEMA, columns))


def read_failures(sweep: SweepDir) -> pa.Table:
    return _read(sweep.failures, FAILURES_SCHEMA)


def read_stages(sweep: SweepDir) -> pa.Table:
    """Every stage of every finished progressive sample once. Stages are written before their sample's result
    row: a sample rerun after a crash between the two writes its stages again, and the first copy is kept."""
    return _dedup(_read(sweep.stages, STAGES_SCHEMA), (*IDENTITY, "stage"))


def compact(sweep: SweepDir) -> None:
    """Merge the results' and stages' part files, each into one (many small files slow every later read)."""
    for folder, read in ((sweep.results, read_results), (sweep.stages, read_stages)):
        parts = sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []
        if len(parts) < 2:
            continue
        merged = _write_table(folder, read(sweep))
        for part in parts:
            if part != merged:
                part.unlink()
