"""Starting Ray: `cluster=local` is always an instance of its own, at normal priority; a cluster nothing answers
at is one clear error; SIGTERM ends the start-up promptly; device=cuda without GPUs waits, then is one error.
Planning workers on the nodes (cluster.plan, cluster.Scaler), without Ray. (A local sweep beside a stale
recorded cluster is test_sweep.py's end-to-end sweep; beside a live one, and nodes joining and leaving a
sweep, test_scale_out.py, where the `ray start` fixture is.)"""

import signal
import time

import psutil
import pytest

from cram_sweep.errors import UserError
from cram_sweep.sweep import cluster, ray_session
from cram_sweep.sweep.cluster import Node

from .helpers import TINY, tiny_config
from .processes import kill_tree, seed_mlflow_db, session_pids, start_cli, wait_for


def test_private_ray_apis_are_where_ray_keeps_them():
    """Each private Ray function cluster.py calls has a fallback; this fails loudly when Ray moves one."""
    moved = [f"{module}.{name}" for key, (module, name) in ray_session.PRIVATE_RAY_APIS.items() if ray_session._private(key) is None]
    assert not moved, f"Ray moved {moved}: update ray_session.PRIVATE_RAY_APIS (the fallbacks keep working meanwhile)"


def test_joining_the_stale_recorded_cluster_is_one_error_naming_the_file(stale_ray_tmpdir, monkeypatch):
    temp, dead = stale_ray_tmpdir
    monkeypatch.setenv("RAY_TMPDIR", str(temp))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    started = time.monotonic()
    with pytest.raises(UserError) as raised:
        ray_session.connect_ray(tiny_config("cluster=ray"))
    message = str(raised.value)
    assert "nothing answers at " in message and f":{dead.split(':')[1]}" in message  # Ray resolves 127.0.0.1 to the node's IP
    assert str(temp / "ray" / "ray_current_cluster") in message
    assert "stale" in message and "ray stop" in message
    assert time.monotonic() - started < 30


@pytest.fixture(scope="module")
def local_ray():
    """This process's own local Ray instance, as `cluster=local` starts it (1 CPU)."""
    import ray

    ray_session.connect_ray(tiny_config())
    yield
    ray.shutdown()


def test_local_workers_run_at_normal_priority(local_ray):
    """Ray's default worker niceness (15) lets any busy process on the node starve the compute."""
    import ray

    (worker,) = cluster.Scaler(tiny_config()).grow([])
    placement = ray.get(worker.actor.ping.remote(), timeout=120)
    assert psutil.Process(placement.pid).nice() == 0
    assert placement.node == ray.get_runtime_context().get_node_id()
    ray.kill(worker.actor)


def test_device_cuda_without_gpus_waits_then_is_one_error_and_starts_no_cpu_worker(local_ray, tmp_path, capsys):
    import ray

    from cram_sweep import cli

    started = time.monotonic()
    args = [
        "run",
        "name=nogpu",
        f"out_dir={tmp_path}",
        *TINY,
        "device=cuda",
        "cluster.wait_for_gpus_seconds=2",
        "progress_line_seconds=0.5",
    ]
    code = cli.main(seed_mlflow_db(args))
    out, err = capsys.readouterr()
    assert code == 2, err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: device=cuda and no GPU joined the Ray cluster within cluster.wait_for_gpus_seconds=2 s (1 node, 1 CPU, 0 GPUs): "
        "add GPU nodes (ray start --num-gpus=N), raise cluster.wait_for_gpus_seconds, or run with device=auto"
    ]
    waiting = [line for line in err.splitlines() if line.startswith("waiting for GPUs")]
    assert len(waiting) >= 2 and waiting[0].startswith(
        "waiting for GPUs (device=cuda): the Ray cluster has 1 node, 1 CPU, 0 GPUs; giving up in 2 s (cluster.wait_for_gpus_seconds)"
    ), err
    assert 2 <= time.monotonic() - started < 30
    assert not [a for a in ray._private.state.actors().values() if a["ActorClassName"].endswith("CramWorker") and a["State"] == "ALIVE"]
    assert "Traceback" not in err


# ---------------------------------------------------------------- planning workers on the nodes (no Ray)

A, B, G = Node("a" * 56, 4.0, 0.0), Node("b" * 56, 2.0, 0.0), Node("g" * 56, 8.0, 2.0)


def test_slots_are_one_per_gpu_share_or_one_per_cpu_node_with_all_its_cpus():
    worker = tiny_config().worker
    assert cluster.node_slots(A, "cpu", worker) == [cluster.Slot("cpu", 4, 0.0, A.id)]
    assert cluster.node_slots(G, "gpu", worker) == [cluster.Slot("gpu", 1, 1.0, G.id)] * 2
    assert len(cluster.node_slots(G, "gpu", tiny_config("worker.gpus=0.5").worker)) == 4
    assert cluster.node_slots(B, "cpu", tiny_config("worker.cpus=4").worker) == [], "a node smaller than worker.cpus holds none"
    assert cluster.node_slots(Node("h" * 56, 0.0, 0.0), "cpu", worker) == [], "a head started with --num-cpus=0 holds none"


def test_plan_gives_each_free_slot_one_worker_counting_workers_not_placed_yet():
    worker = tiny_config().worker
    assert [s.node for s in cluster.plan([A, B], "cpu", worker, [])] == [A.id, B.id]
    assert [s.node for s in cluster.plan([A, B], "cpu", worker, [A.id])] == [B.id], "A holds its worker already"
    assert len(cluster.plan([A, B], "cpu", worker, [None])) == 1, "a worker restarting anywhere takes one of the two"
    assert len(cluster.plan([A, B], "cpu", worker, ["gone" * 14])) == 1, "so does one whose node left"
    assert cluster.plan([A, B], "cpu", worker, [A.id, B.id]) == []
    assert len(cluster.plan([A, B], "cpu", tiny_config("worker.max_workers=1").worker, [])) == 1
    assert len(cluster.plan([G], "gpu", worker, [G.id])) == 1, "the second GPU of G"


def test_device_auto_switches_to_gpu_workers_for_good_and_cuda_never_plans_cpu_workers():
    nodes = [A]
    auto = cluster.Scaler(tiny_config("device=auto"), nodes=lambda: nodes)
    assert auto.kind(nodes) == "cpu"
    nodes = [A, G]
    assert auto.kind(nodes) == "gpu" and [s.kind for s in auto.slots(nodes, [])] == ["gpu", "gpu"]
    nodes = [A]
    assert auto.kind(nodes) == "gpu" and auto.slots(nodes, []) == [], "GPU nodes that left are waited for"
    cuda = cluster.Scaler(tiny_config("device=cuda"), nodes=lambda: [A, B])
    assert cuda.slots([A, B], []) == [] and not cuda.slots_exist([A, B])
    assert cluster.Scaler(tiny_config("device=cpu"), nodes=lambda: [G]).kind([G]) == "cpu"


def test_a_fixed_worker_count_starts_once_and_never_grows():
    scaler = cluster.Scaler(tiny_config("worker.count=3", "device=cpu"), nodes=lambda: [A, B])
    assert scaler.slots([A, B], []) == [cluster.Slot("cpu", 2)] * 3, "spread, each with the smallest node's CPUs"
    assert scaler.slots([A, B, Node("c" * 56, 4.0, 0.0)], []) == []


def _commands(pids) -> list[str]:
    import psutil

    commands = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            commands.append(" ".join(process.cmdline())[:120] or process.name())
        except psutil.Error:
            pass
    return commands


@pytest.mark.slow
def test_sigterm_during_start_up_exits_within_seconds(tmp_path):
    log = tmp_path / "run.log"
    with open(log, "w") as sink:
        proc = start_cli(["run", "name=term", f"out_dir={tmp_path}", *TINY], stdout=sink)
    try:
        wait_for(lambda: "to run" in log.read_text(), "the sweep to start Ray", timeout=120, proc=proc, log=log)
        proc.send_signal(signal.SIGTERM)  # Ray is starting now: the line above is printed just before
        sent = time.monotonic()
        proc.wait(timeout=30)
        assert time.monotonic() - sent < 15, log.read_text()[-2000:]
        assert proc.returncode != 0

        # Ray's processes of this sweep (its session) share the driver's fate (seen once without interrupt's
        # _kill_children: a gcs_server left running)
        try:
            wait_for(lambda: not session_pids(proc.pid), "the sweep's Ray processes to exit with it", timeout=30)
        except AssertionError as err:
            raise AssertionError(f"{err}: still running: {_commands(session_pids(proc.pid))}") from None
    finally:
        if proc.poll() is None:
            kill_tree(proc)
