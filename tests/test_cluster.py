"""Starting Ray: `cluster=local` is always an instance of its own, at normal priority; a cluster nothing answers
at is one clear error; SIGTERM ends the start-up promptly. (A local sweep beside a stale recorded cluster is
test_sweep.py's end-to-end sweep; beside a live one, test_scale_out.py, where the `ray start` fixture is.)"""

import os
import signal
import subprocess
import time

import psutil
import pytest

from cram_sweep import cluster
from cram_sweep.errors import UserError

from .helpers import CLI, ROOT, TINY, cli_env, seed_mlflow_db, tiny_config, wait_for


def test_private_ray_apis_are_where_ray_keeps_them():
    """Each private Ray function cluster.py calls has a fallback; this fails loudly when Ray moves one."""
    moved = [f"{module}.{name}" for key, (module, name) in cluster.PRIVATE_RAY_APIS.items() if cluster._private(key) is None]
    assert not moved, f"Ray moved {moved}: update cluster.PRIVATE_RAY_APIS (the fallbacks keep working meanwhile)"


def test_joining_the_stale_recorded_cluster_is_one_error_naming_the_file(stale_ray_tmpdir, monkeypatch):
    temp, dead = stale_ray_tmpdir
    monkeypatch.setenv("RAY_TMPDIR", str(temp))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    started = time.monotonic()
    with pytest.raises(UserError) as raised:
        cluster.connect_ray(tiny_config("cluster=ray"))
    message = str(raised.value)
    assert "nothing answers at " in message and f":{dead.split(':')[1]}" in message  # Ray resolves 127.0.0.1 to the node's IP
    assert str(temp / "ray" / "ray_current_cluster") in message
    assert "stale" in message and "ray stop" in message
    assert time.monotonic() - started < 30


def test_local_workers_run_at_normal_priority():
    """Ray's default worker niceness (15) lets any busy process on the node starve the compute."""
    import ray

    cfg = tiny_config("cluster.num_cpus=1")
    try:
        cluster.connect_ray(cfg)
        worker = cluster.start_workers(cfg)[0]
        pid = ray.get(worker.ping.remote(), timeout=120)
        assert psutil.Process(pid).nice() == 0
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_sigterm_during_start_up_exits_within_seconds(tmp_path):
    log = tmp_path / "run.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            CLI + seed_mlflow_db(["run", "name=term", f"out_dir={tmp_path}", *TINY]),
            cwd=ROOT,
            env=cli_env(),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(lambda: "to run" in log.read_text(), "the sweep to start Ray", timeout=120, proc=proc, log=log)
        proc.send_signal(signal.SIGTERM)  # Ray is starting now: the line above is printed just before
        sent = time.monotonic()
        proc.wait(timeout=30)
        assert time.monotonic() - sent < 15, log.read_text()[-2000:]
        assert proc.returncode != 0

        def session_left():  # Ray's processes of this sweep (its session) share the driver's fate
            left = []
            for pid in psutil.pids():
                try:
                    left += [pid] if os.getsid(pid) == proc.pid else []
                except OSError:
                    pass
            return left

        wait_for(lambda: not session_left(), "the sweep's Ray processes to exit with it", timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
