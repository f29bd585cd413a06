"""The tracker's small types, Backoff and RunIds, and the tracker's flushes through them on a fake MLflow client."""

import json
import logging
from types import SimpleNamespace

import pytest

from cram_sweep.config import compose_config
from cram_sweep.results.columns import Cell
from cram_sweep.results.store import SweepDir
from cram_sweep.tracking.connection import MAX_BACKOFF_SECONDS, MIN_BACKOFF_SECONDS, Backoff
from cram_sweep.tracking.runs import RunIds
from cram_sweep.tracking.tracker import Tracker

NOW = 1000.0  # a time.monotonic() value


def failed_attempts(backoff: Backoff, count: int, start: float = NOW, duration: float = 0.5) -> list[float]:
    """Run `count` attempts that fail, each when it is due and lasting `duration`; the delays they set."""
    delays = []
    at = start
    for _ in range(count):
        assert backoff.due(at)
        backoff.attempt(at)
        backoff.fail(at + duration)
        delays.append(backoff.delay)
        at = backoff.retry_at
    return delays


def test_a_healthy_backoff_waits_the_interval_between_attempts():
    backoff = Backoff(interval=2.0)
    assert not backoff.failing and backoff.due(NOW)
    backoff.attempt(NOW)
    assert not backoff.due(NOW + 1.9) and backoff.due(NOW + 2.0)
    assert backoff.succeed() is None, "no outage to report"
    assert (backoff.failed_since, backoff.delay, backoff.retry_at) == (None, 0.0, 0.0)


def test_failures_double_the_delay_from_the_floor_up_to_the_cap():
    assert MIN_BACKOFF_SECONDS == 5.0 and MAX_BACKOFF_SECONDS == 60.0
    assert failed_attempts(Backoff(interval=1.0), 6) == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]
    assert failed_attempts(Backoff(interval=8.0), 4) == [8.0, 16.0, 32.0, 60.0], "the interval is the floor when above 5 s"


def test_an_outage_starts_at_its_first_failed_attempt_and_waits_from_each_attempts_end():
    backoff = Backoff(interval=1.0)
    backoff.attempt(NOW)
    assert backoff.fail(NOW + 4.0) is True, "the first failed attempt of an outage"
    assert backoff.failing and backoff.failed_since == NOW
    assert backoff.retry_at == NOW + 4.0 + 5.0
    assert not backoff.due(NOW + 8.9), "past the interval, before retry_at"
    assert backoff.due(NOW + 9.0)
    backoff.attempt(NOW + 9.0)
    assert backoff.fail(NOW + 9.5) is False and backoff.failed_since == NOW
    backoff.attempt(NOW + 30.0)
    assert backoff.succeed() == 30.0, "from the first failed attempt to the one that succeeded"
    assert not backoff.failing and (backoff.delay, backoff.retry_at) == (0.0, 0.0)
    assert failed_attempts(backoff, 1, start=NOW + 31.0) == [5.0], "a new outage starts from the floor"


def test_run_ids_round_trip_through_tracking_json(tmp_path):
    path = tmp_path / "tracking.json"
    assert RunIds.load(path) is None
    ids = RunIds(uri="http://user:***@host:5000", experiment="3", parent="p1", cells={"m/pydoc/full/n_mem=1/L=8": "c1"})
    ids.save(path)
    assert json.loads(path.read_text()) == {
        "uri": "http://user:***@host:5000",
        "experiment": "3",
        "parent": "p1",
        "cells": {"m/pydoc/full/n_mem=1/L=8": "c1"},
    }
    assert path.read_text() == json.dumps(json.loads(path.read_text()), indent=1), "the format earlier versions wrote and read"
    assert RunIds.load(path) == ids
    assert [p.name for p in tmp_path.iterdir()] == ["tracking.json"], "written atomically, no temporary file left"


def test_a_tracking_file_without_cells_or_uri_loads_with_none_and_each_its_own(tmp_path):
    """tracking.json from before child runs and URIs were kept: no cells yet, and two loads never share the cells they
    will add (a mutable default would)."""
    path = tmp_path / "tracking.json"
    path.write_text(json.dumps({"experiment": "1", "parent": "p"}))
    first, second = RunIds.load(path), RunIds.load(path)
    assert (first.uri, first.experiment, first.parent, first.cells) == ("", "1", "p", {})
    first.cells["m/pydoc/full/n_mem=1/L=8"] = "c1"
    assert second.cells == {} and RunIds(uri="u", experiment="1", parent="p").cells == {}
    assert RunIds.load(tmp_path / "missing.json") is None


class FakeClient:
    """MLflow's client as the tracker's flush and finish use it; `down` makes every call fail as a dead server does."""

    def __init__(self):
        self.down = False
        self.batches: list[tuple[str, dict[str, float]]] = []
        self.terminated: list[tuple[str, str]] = []

    def _call(self):
        if self.down:
            raise ConnectionError("Connection refused")

    def create_run(self, experiment_id, run_name, tags):
        self._call()
        return SimpleNamespace(info=SimpleNamespace(run_id=f"run-{run_name}"))

    def log_batch(self, run_id, metrics=()):
        self._call()
        self.batches.append((run_id, {m.key: m.value for m in metrics}))

    def set_terminated(self, run_id, status):
        self._call()
        self.terminated.append((run_id, status))


@pytest.fixture
def tracker(tmp_path):
    cfg = compose_config([f"out_dir={tmp_path}", "flush_seconds=0"])
    sweep = SweepDir(tmp_path / "sweep")
    sweep.path.mkdir()
    tracker = Tracker(cfg, sweep)
    tracker.client = FakeClient()
    tracker.ids = RunIds(uri=tracker.shown_uri, experiment="1", parent="parent")
    return tracker


def test_flush_backs_off_while_mlflow_fails_and_resyncs_when_it_answers(tracker, caplog):
    cell = Cell("tiny_llama", "pydoc", 1, 8)
    tracker.record(cell, {"done": 2, "acc_mean": 0.5})
    tracker.client.down = True
    with caplog.at_level(logging.WARNING, logger="cram_sweep"):
        assert tracker.flush() is False
        assert tracker.backoff.failing and tracker.backoff.delay == MIN_BACKOFF_SECONDS
        assert tracker.flush() is False, "within the back-off: no attempt"
        assert tracker.pending, "kept for later"
        tracker.client.down = False
        assert tracker.flush() is False, "still within the back-off, though the server is back"
        assert tracker.flush(force=True) is True
    assert not tracker.backoff.failing and not tracker.pending
    assert tracker.client.batches == [(f"run-{cell.id}", {"done": 2.0, "acc_mean": 0.5})]
    assert json.loads(tracker.sweep.tracking.read_text())["cells"] == {cell.id: f"run-{cell.id}"}, "the child's id is saved"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and "MLflow logging failed (connection refused)" in warnings[0]
    assert warnings[1].startswith("MLflow reachable again after ")
    tracker.finish(ok=True)
    assert tracker.client.terminated == [("parent", "FINISHED"), (f"run-{cell.id}", "FINISHED")]
