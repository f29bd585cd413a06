"""Scale-out for real, on loopback, no mocks.

- A Ray cluster of two node processes (`ray start --head` + `ray start --address`, token auth) that
  `cram-sweep run cluster=ray` joins, by cluster.address and by RAY_ADDRESS; both nodes run a worker.
- An `mlflow server` backed by PostgreSQL (initdb + pg_ctl in a temporary directory) with its artifacts
  in an S3-compatible store (moto's server mode): a sweep logs to it, `report` uploads the report into
  the bucket, and MlflowClient reads it back.
- MLflow down at start-up: one clear error line, fast, nothing computed. MLflow killed mid-sweep: the
  sweep finishes and the store is complete; after a restart `cram-sweep report` re-syncs the runs.
- The pg19 loader on a local copy in the hub's layout (tests/fixtures/pg19), and a sweep on it.

Servers and nodes are started once per module and stopped (by the process ids this module started)
even when a test fails.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from cram_sweep.config import compose_config
from cram_sweep.data import sample_texts
from cram_sweep.results.store import SweepDir, read_results

from .helpers import ROOT, TINY
from .processes import MlflowServer, cli_env, free_port, kill_tree, port_open, run_cli, start_cli, start_session, stop_session, wait_for

FIXTURE_PG19 = ROOT / "tests" / "fixtures" / "pg19"
BIN = Path(sys.executable).parent


# --------------------------------------------------------------------------------------------- Ray


class RayNodes:
    """`ray start` node processes of one cluster on loopback, 1 CPU each, in a private temp dir: a head, then nodes
    that join (and are killed) while tests run."""

    def __init__(self, temp: Path):
        self.temp, self.port = temp, free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, *args: str, env: dict = None) -> subprocess.Popen:
        log = self.temp / f"{name}.log"
        common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--block", f"--temp-dir={self.temp}", "--disable-usage-stats"]
        command = [str(BIN / "ray"), "start", *args, f"--dashboard-agent-listen-port={free_port()}", *common, "--include-log-monitor=false"]
        with log.open("w") as sink:
            proc = start_session(command, sink, env={**os.environ, **(env or {})})
        proc.log = log
        self.procs.append(proc)
        return proc

    def start_head(self) -> None:
        head = self.start("head", "--head", f"--port={self.port}", "--include-dashboard=false", f"--ray-client-server-port={free_port()}")
        wait_for(lambda: port_open(self.port), "ray head", timeout=90, proc=head, log=head.log)

    def join(self, name: str, env: dict = None) -> subprocess.Popen:
        return self.start(name, f"--address={self.address}", env=env)

    def stop(self) -> None:
        stop_session(*self.procs)


# A Ray driver's C++ core can abort its whole process (a second ray.init in one process, to another cluster, with
# another auth token): the state is read by a driver process of its own, never by a pytest worker.
RAY_STATE = """
import json, sys, ray
from ray._private.state import actors
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(json.dumps({
    "cpu_nodes": [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")],
    "cram_workers": [
        {"actor": a["ActorID"], "node": a["Address"]["NodeID"], "job": a["JobID"], "start": a["StartTime"]}
        for a in actors().values() if a["ActorClassName"].endswith("CramWorker")
    ],
}))
"""


def ray_state(address: str) -> dict:
    """The cluster at `address` as a new driver sees it: its alive CPU nodes, and every CramWorker actor it has run
    (GCS actor table, dead or alive)."""
    proc = subprocess.run([sys.executable, "-c", RAY_STATE, address], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"reading the Ray cluster at {address} failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def ray_cluster():
    """A head node and one worker node, 1 CPU each, token authentication, in a private temp dir; tests add nodes."""
    if not (BIN / "ray").exists():
        pytest.skip(f"the ray CLI is not installed next to {sys.executable}")
    temp = Path(tempfile.mkdtemp(prefix="cram-ray-"))  # short: Ray's unix socket paths must stay < 108 chars
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0"}
    nodes = RayNodes(temp)

    def two_cpu_nodes():
        found = ray_state(nodes.address)["cpu_nodes"]
        return set(found) if len(found) == 2 else None

    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)  # the nodes, the drivers run_cli starts and ray_state's inherit the token
        try:
            nodes.start_head()
            worker = nodes.join("worker")
            node_ids = wait_for(two_cpu_nodes, "ray worker node", timeout=120, proc=worker, log=worker.log)
            yield {"address": nodes.address, "nodes": node_ids, "cluster": nodes}
        finally:
            nodes.stop()
            shutil.rmtree(temp, ignore_errors=True)


def latest_cram_workers(address: str) -> dict:
    """The CramWorker actors of the latest driver that started some: actor id -> node id."""
    actors = ray_state(address)["cram_workers"]
    if not actors:
        return {}
    job = max(actors, key=lambda a: a["start"])["job"]
    return {a["actor"]: a["node"] for a in actors if a["job"] == job}


@pytest.mark.slow
def test_ray_cluster_sweep_runs_on_both_nodes(mlflow_booting, ray_cluster, tmp_path):
    """`cram-sweep run cluster=ray cluster.address=...` on pydoc and on the pg19 fixture (second halves of its chunks)."""
    # (mlflow_booting: the MLflow server of the later tests boots meanwhile)
    from cram_sweep.engine.model import load_tokenizer

    proc = run_cli(
        "run",
        "name=onray",
        f"out_dir={tmp_path}",
        *TINY,
        "grid.datasets=[pydoc,pg19]",
        f"datasets.pg19.path={FIXTURE_PG19}",
        "grid.samples=2",
        "cluster=ray",
        f"cluster.address={ray_cluster['address']}",
    )
    assert "total: 8 done, 0 failed, 0 pending" in proc.stdout
    table = read_results(SweepDir(tmp_path / "onray"), ["length", "token_ids"])
    assert sorted(zip(table["cell"].to_pylist(), table["sample"].to_pylist())) == sorted(
        (f"tiny_llama/{d}/full/n_mem=2/L={L}", i) for d in ("pydoc", "pg19") for L in (4, 8) for i in range(2)
    )
    workers = latest_cram_workers(ray_cluster["address"])
    assert len(workers) == 2, f"one worker per node, got {workers}"
    assert set(workers.values()) == ray_cluster["nodes"], "each of the two nodes ran a worker"

    tokenizer = load_tokenizer("tiny_llama", compose_config(TINY).models["tiny_llama"])
    texts = sample_texts(pg19_config(FIXTURE_PG19), None, 2, 0)
    pg19_rows = [r for r in table.to_pylist() if "/pg19/" in r["cell"]]
    assert len(pg19_rows) == 4
    for row in pg19_rows:
        assert texts[row["sample"]].startswith(SECOND_HALF_STARTS[row["sample"]])
        assert row["token_ids"] == tokenizer(texts[row["sample"]])["input_ids"][: row["length"]]


# ---------------------------------------------------------------------------------------------- pg19

# The first sentence of each chunk's second half (the fixture's chunks have 12, 10, 12 and 10 sentences).
SECOND_HALF_STARTS = [
    "When the boat touched the far bank that evening, a stranger stepped off before the rope was even tied.",
    "By the third winter the children had learned to read the clock as a kind of weather, and they made games of its moods.",
    "At the edge of the wood she stopped, and we saw her lantern swing once, twice, as though she were signalling.",
    "On the morning of the fair in the year of the great storm, the third merchant did not arrive.",
]


def pg19_config(path):
    return compose_config(["grid.models=[tiny_llama]", "grid.datasets=[pg19]", f"datasets.pg19.path={path}"]).datasets["pg19"]


def test_pg19_loader_gives_second_half_of_each_chunk():
    chunks = pq.read_table(FIXTURE_PG19 / "data" / "train-00000-of-00001.parquet")["text"].to_pylist()
    texts = sample_texts(pg19_config(FIXTURE_PG19), None, 4, 0)
    assert len(texts) == 4
    for chunk, text, start in zip(chunks, texts, SECOND_HALF_STARTS):
        assert text.startswith(start)
        assert chunk.endswith(text) and chunk.index(start) > len(chunk) // 3, "a suffix of the chunk, from a sentence start"
    assert sample_texts(pg19_config(FIXTURE_PG19), None, 2, 0) == texts[:2], "sample i is always the same text"


def test_pg19_loader_reads_the_other_local_formats(tmp_path):
    """A single Parquet file, and the reference's CSV downloads (pandas' index column or not)."""
    import pandas as pd

    expected = sample_texts(pg19_config(FIXTURE_PG19), None, 4, 0)
    frame = pq.read_table(FIXTURE_PG19 / "data" / "train-00000-of-00001.parquet").to_pandas()
    frame.to_csv(tmp_path / "pg19_valid_1k_chunks.csv")  # the reference notebook's to_csv: with an index column
    frame.to_json(tmp_path / "chunks.jsonl", orient="records", lines=True)
    for path in (FIXTURE_PG19 / "data" / "train-00000-of-00001.parquet", tmp_path / "pg19_valid_1k_chunks.csv", tmp_path / "chunks.jsonl"):
        assert sample_texts(pg19_config(path), None, 4, 0) == expected, path.name
    csv_dir = tmp_path / "csvdir"
    csv_dir.mkdir()
    pd.DataFrame({"text": frame["text"]}).to_csv(csv_dir / "pg19_valid_1k_chunks.csv", index=False)  # the download script's
    assert sample_texts(pg19_config(csv_dir), None, 4, 0) == expected


def test_ray_cluster_unreachable_is_one_clear_error(monkeypatch):
    """ray.init alone retries an address where nothing listens for many minutes."""
    from cram_sweep.errors import UserError
    from cram_sweep.sweep.ray_session import connect_ray

    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)  # no cluster.address: RAY_ADDRESS is used
    started = time.monotonic()
    with pytest.raises(UserError, match=f"cannot join the Ray cluster at {address}: nothing answers at .*:{address.split(':')[1]} "):
        connect_ray(compose_config(["cluster=ray"]))
    assert time.monotonic() - started < 15
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(UserError, match="dashboard / Jobs API URL"):
        connect_ray(compose_config(["cluster=ray"]))


@pytest.mark.slow
def test_cluster_local_runs_its_own_instance_beside_a_live_cluster_and_RAY_ADDRESS(ray_cluster, tmp_path):
    """A live `ray start` cluster on the node, named by RAY_ADDRESS too, does not turn cluster=local into a cluster run."""
    before = len(ray_state(ray_cluster["address"])["cram_workers"])
    proc = run_cli("run", "name=own", f"out_dir={tmp_path}", *TINY, "grid.lengths=[4]", env=cli_env(RAY_ADDRESS=ray_cluster["address"]))
    assert "total: 3 done, 0 failed, 0 pending" in proc.stdout
    assert len(ray_state(ray_cluster["address"])["cram_workers"]) == before, "no worker of the local sweep ran on the live cluster"


# ------------------------------------------------------------------ the pool follows the cluster; stalls


class TimedRun:
    """`cram-sweep` in a process of its own, as a user runs it; each output line is kept with the time it arrived."""

    def __init__(self, args: list, env: dict = None):
        self.proc = start_cli(args, env=env, text=True)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def line(self, pattern: str, timeout: float = 120) -> tuple[float, re.Match]:
        """The time and match of the first line matching `pattern` (re.search), waiting for it."""
        found = lambda: next(((t, m) for t, m in ((t, re.search(pattern, line)) for t, line in self.lines) if m), None)  # noqa: E731
        try:
            return wait_for(found, f"a line matching {pattern!r}", timeout=timeout, proc=self.proc)
        except AssertionError as err:
            raise AssertionError(f"{err}\n{self.text[-3000:]}") from None

    def finish(self, timeout: float = 240) -> int:
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                stop_session(self.proc, grace=5)
        self.reader.join(10)
        return self.proc.returncode


def autoscaler_requests(address: str) -> str:
    """What `ray status -v` lists under "From request_resources:" (Ray's monitor refreshes it every ~5 s)."""
    status = subprocess.run([str(BIN / "ray"), "status", "-v", f"--address={address}"], capture_output=True, text=True, timeout=60).stdout
    return (
        status.split("From request_resources:", 1)[1].split("Pending Demands:", 1)[0].strip() if "From request_resources:" in status else ""
    )


SCALED_LENGTHS, SCALED_SAMPLES = (12, 16), 18


@pytest.fixture(scope="module")
def scaled_sweep(ray_cluster, tmp_path_factory):
    """One sweep of 36 samples on the two-node cluster (items of 3, one sample at a time: batch 1, each ~1.5 s of
    compute; at most 3 workers): once its workers are up a third node joins, then Ray's monitor is read for the
    autoscaler request; as soon as the new node has returned a sample it is killed (SIGKILL, every process of it);
    the sweep runs to its end; then the request is read again."""
    out = tmp_path_factory.mktemp("scaled")
    nodes, address = ray_cluster["cluster"], ray_cluster["address"]
    run = TimedRun(
        [
            "run",
            "name=scaled",
            f"out_dir={out}",
            *TINY,
            f"grid.lengths=[{','.join(map(str, SCALED_LENGTHS))}]",
            f"grid.samples={SCALED_SAMPLES}",
            "batch_size=1",
            "worker.samples_per_item=3",
            "worker.max_workers=3",
            "optim.lr=0.05",
            # Most samples run every step (~1.5 s each): the queue must outlast the third node's join and model load
            # (~13 s under `make test`'s load), or its first sample can come from the sweep's last item, which then
            # ends before the kill lands (seen once at 200 steps).
            "optim.max_steps=300",
            "optim.patience=300",
            "cluster=ray",
            f"cluster.address={address}",
        ]
    )
    seen: dict = {"sweep": SweepDir(out / "scaled")}
    try:
        run.line(r"^workers: 2 CPU on nodes ")
        # A machine that joins has CPUs of its own; here every node shares the same two cores, so the third node's
        # workers run at niceness 0 (as the image and jobs/README.md start nodes), the others at Ray's default 15.
        third = nodes.join("third", env={"RAY_worker_niceness": "0"})
        seen["joined"] = wait_for(lambda: "Ray runtime started" in third.log.read_text() and time.monotonic(), "the third node", proc=third)
        seen["during"] = wait_for(
            lambda: "from request_resources()" in autoscaler_requests(address) and autoscaler_requests(address), "a request"
        )
        _, added = run.line(r"^workers: 1 CPU added on node (\w{8}); 3 in all")
        seen["node"] = added.group(1)
        seen["first"], first = run.line(rf"^workers: node {seen['node']} returned its first sample ([\d.]+) s after its worker was added")
        seen["driver_seconds"] = float(first.group(1))
        kill_tree(third)  # as a preempted machine dies: every process of the node at once, its Ray workers included
        seen["killed"] = time.monotonic()
        seen["lost"] = run.line(
            r"^WARNING cram_sweep: work item of .* failed \(\w+\) on node \w{8}: retrying (\d+) samples \((\d+) had started", timeout=90
        )
        seen["code"] = run.finish()
    finally:
        if run.proc.poll() is None:
            stop_session(run.proc, grace=5)
    seen["text"] = run.text
    seen["after"] = wait_for(lambda: autoscaler_requests(address) == "(none)" and "(none)", "the request released", timeout=30)
    return seen


@pytest.mark.slow
def test_a_node_that_joins_mid_sweep_runs_samples_within_30_s(scaled_sweep, ray_cluster):
    seen = scaled_sweep
    assert not any(node.startswith(seen["node"]) for node in ray_cluster["nodes"]), "the worker was added for the new node"
    seconds = seen["first"] - seen["joined"]
    print(f"a node joined: its first sample {seconds:.1f} s later (driver: {seen['driver_seconds']:.1f} s after its worker was added)")
    assert seconds < 30


@pytest.mark.slow
def test_a_node_killed_mid_sweep_loses_nothing_and_charges_only_the_samples_that_ran_on_it(scaled_sweep):
    from cram_sweep.results.store import read_failures

    seen, sweep = scaled_sweep, scaled_sweep["sweep"]
    assert seen["code"] == 0, seen["text"][-4000:]
    total = len(SCALED_LENGTHS) * SCALED_SAMPLES
    assert f"total: {total} done, 0 failed, 0 pending" in seen["text"]
    rows = read_results(sweep, ["acc"])
    assert rows.num_rows == total == ds.dataset(sweep.results).count_rows(), "every sample stored once"
    _, lost = seen["lost"]
    retried, started = int(lost.group(1)), int(lost.group(2))
    # The kill lands after the node's first sample returned, inside an item of 3: one running (batch 1) and one queued;
    # where the machine is slow to deliver the kill, the second already returned and the third running; or, under
    # `make test`'s load (seen once), the node had finished that item and was one sample into its next (3 unreturned).
    assert started == 1 and retried in (1, 2, 3), "the killed node was into an item of 3, one sample of it running (batch 1)"
    failures = read_failures(sweep).to_pylist()
    assert len(failures) == started and failures[0]["attempt"] == 1, "only the running sample was charged, once"
    assert "Actor" in failures[0]["error"], failures
    assert seen["lost"][0] - seen["killed"] < 15, "the loss is seen at once (the connection to the worker broke)"
    print(
        f"node killed: {total - rows.num_rows} samples lost, {len(failures) - started} wrongly charged ({retried - started} queued, uncharged)"
    )


@pytest.mark.slow
def test_the_autoscaler_is_asked_for_the_work_left_and_released_at_the_end(scaled_sweep):
    assert scaled_sweep["during"] == "{'CPU': 1}: 3 from request_resources()", "one 1-CPU worker per item left, up to worker.max_workers=3"
    assert scaled_sweep["after"] == "(none)"


@pytest.mark.slow
def test_a_stalled_item_is_killed_and_retried_with_its_reason_in_failures(tmp_path):
    """A worker that hangs in a forward but stays alive (sleep_in_item): killed after worker.stall_seconds, its
    samples retried on the restarted worker; the two that had started record the reason."""
    from cram_sweep.results.store import read_failures

    args = ["run", "name=stall", f"out_dir={tmp_path}", *TINY, "grid.lengths=[4]", "worker.stall_seconds=8", "worker.progress_seconds=1"]
    run = TimedRun(args, env=cli_env(CRAM_SWEEP_FAULT="sleep_in_item:600"))
    sweep = SweepDir(tmp_path / "stall")
    warned, _ = run.line(
        r"^WARNING cram_sweep: work item of .* stalled \(no heartbeat or result for \d+ s .*: retrying 3 samples \(2 had started"
    )
    retried = wait_for(lambda: read_results(sweep, ["acc"]).num_rows and time.monotonic(), "a retried sample stored", proc=run.proc)
    print(f"stalled: killed after worker.stall_seconds=8 s of silence; the first retried sample stored {retried - warned:.1f} s later")
    assert run.finish(120) == 0, run.text[-3000:]
    assert read_results(sweep).num_rows == 3 and "total: 3 done, 0 failed, 0 pending" in run.text
    failures = read_failures(sweep).to_pylist()
    assert sorted(f["sample"] for f in failures) == [0, 1] and all(f["attempt"] == 1 for f in failures)
    assert all(f["error"].startswith("Stalled: no heartbeat or result for 8 s (worker.stall_seconds=8)") for f in failures), failures
    assert len([line for _, line in run.lines if line.startswith("WARNING cram_sweep:")]) == 1, "one warning line"


# ------------------------------------------------------------------------------ MLflow on PostgreSQL + S3


def _initdb():
    """initdb on PATH (Debian links it into /usr/local/bin here), else the newest /usr/lib/postgresql/*/bin."""
    return shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)), None)


@contextlib.contextmanager
def postgres_server():
    """A PostgreSQL server on a free loopback port in a temporary directory, with a database `mlflow`."""
    initdb = _initdb()
    if initdb is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed: apt-get install postgresql")
    psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2 is missing: pip install -e '.[test]'")
    pg_ctl = str(Path(initdb).resolve().with_name("pg_ctl"))
    as_user = {}
    base = Path(tempfile.mkdtemp(prefix="cram-pg-"))
    if os.geteuid() == 0:  # initdb refuses root: run the server as an unprivileged user
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            account = pwd.getpwnam("nobody")
        os.chown(base, account.pw_uid, account.pw_gid)
        as_user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    data, port = base / "data", free_port()
    try:
        init = subprocess.run(
            [initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"], capture_output=True, text=True, **as_user
        )
        assert init.returncode == 0, init.stderr[-2000:]
        start = subprocess.run(
            [
                pg_ctl,
                "start",
                "-w",
                "-t",
                "60",
                "-D",
                str(data),
                "-l",
                str(base / "postgres.log"),
                "-o",
                f"-p {port} -h 127.0.0.1 -k {base} -F",
            ],
            capture_output=True,
            text=True,
            **as_user,
        )
        assert start.returncode == 0, start.stderr[-2000:] + (base / "postgres.log").read_text()[-2000:]
        conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE mlflow")
        conn.close()
        yield {"port": port, "url": f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"}
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([pg_ctl, "stop", "-D", str(data), "-m", "immediate"], capture_output=True, **as_user)
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def s3_server():
    """An S3-compatible store on loopback (moto's server mode) with the bucket `mlflow`."""
    boto3 = pytest.importorskip("boto3", reason="boto3 is missing: pip install -e '.[test]'")
    server_mod = pytest.importorskip("moto.server", reason="moto[server] is missing: pip install -e '.[test]'")
    port = free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        keys = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"],
            region_name=keys["AWS_DEFAULT_REGION"],
        )
        client.create_bucket(Bucket="mlflow")
        yield {"endpoint": endpoint, "env": {**keys, "MLFLOW_S3_ENDPOINT_URL": endpoint}, "client": client}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mlflow_booting(tmp_path_factory):
    """PostgreSQL, the S3 store and `mlflow server`, started without waiting for the server, which
    takes ~20 s to boot: it boots while the Ray and pg19 tests run. Never skips or fails by itself
    (that would take the tests that request it early down too): `mlflow_server` does."""
    stack = contextlib.ExitStack()
    try:
        postgres = stack.enter_context(postgres_server())
        s3 = stack.enter_context(s3_server())
        server = MlflowServer(postgres["url"], "s3://mlflow/", tmp_path_factory.mktemp("mlflow"), env=s3["env"])
        stack.callback(server.stop)
        server.start()
        state = {"server": server, "postgres": postgres, "s3": s3}
    except pytest.skip.Exception as skip:
        state = {"skip": skip.msg}
    except Exception as err:  # noqa: BLE001 - re-raised by mlflow_server in the tests that need it
        state = {"error": err}
    try:
        yield state
    finally:
        stack.close()


@pytest.fixture(scope="module")
def mlflow_server(mlflow_booting):
    if "skip" in mlflow_booting:
        pytest.skip(mlflow_booting["skip"])
    if "error" in mlflow_booting:
        raise mlflow_booting["error"]
    server = mlflow_booting["server"]
    server.wait()
    return server


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def children_of(client, parent_id: str) -> list:
    experiment = client.get_run(parent_id).info.experiment_id
    return client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=1000)


@pytest.mark.slow
def test_mlflow_down_at_start_is_one_clear_error(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    proc = run_cli("run", "name=nomlflow", f"out_dir={tmp_path}", *TINY, "tracking=server", f"tracking.uri={uri}", check=False, timeout=120)
    took = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: cannot reach MLflow at {uri} (connection refused): start the server or fix tracking.uri / MLFLOW_TRACKING_URI"
    ], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert took < 45, f"{took:.0f} s: no minutes of retries"
    sweep = SweepDir(tmp_path / "nomlflow")
    assert read_results(sweep).num_rows == 0 and not sweep.results.exists(), "nothing computed"
    assert "sweep directory:" not in proc.stdout


def test_mlflow_refusing_at_start_is_one_clear_error(tmp_path):
    """A server that answers 403, as `mlflow server` does for a Host header it does not allow."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from cram_sweep.errors import UserError
    from cram_sweep.tracking.tracker import Tracker

    class Refuse(BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"Invalid Host header - possible DNS rebinding attack detected"
            self.send_response(403)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        cfg = compose_config(["name=refused", f"out_dir={tmp_path}", "tracking=server", f"tracking.uri={uri}"])
        with pytest.raises(UserError) as refused:
            Tracker(cfg, SweepDir(tmp_path / "refused")).start()
        assert str(refused.value) == (
            f"MLflow at {uri} refused the request (HTTP 403: Invalid Host header - possible DNS rebinding "
            "attack detected): allow this client on the server (mlflow server --allowed-hosts, credentials) "
            "or fix tracking.uri"
        )
    finally:
        server.shutdown()
        thread.join(5)


@pytest.mark.slow
def test_sweep_logs_to_mlflow_server_on_postgres_and_s3(ray_cluster, mlflow_server, mlflow_booting, tmp_path, monkeypatch):
    # The whole scale-out setup: the driver joins the cluster through RAY_ADDRESS, tracks to the server.
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster["address"])
    monkeypatch.delenv("RAY_AUTH_MODE")  # as `ray start` leaves it: the token alone (RAY_AUTH_TOKEN) must do
    # report=true: the run ends with what `cram-sweep report` does (the outage test runs that command).
    run = run_cli(
        "run",
        "name=served",
        f"out_dir={tmp_path}",
        *TINY,
        "cluster=ray",
        "tracking=server",
        f"tracking.uri={mlflow_server.uri}",
        "report=true",
    )
    assert "total: 6 done, 0 failed, 0 pending" in run.stdout and "report not logged" not in run.stderr
    sweep = SweepDir(tmp_path / "served")
    ids = json.loads(sweep.tracking.read_text())
    assert ids["uri"] == mlflow_server.uri and ids["parent"] in run.stdout
    client = client_for(mlflow_server.uri)
    parent = client.get_run(ids["parent"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["grid.samples"] == "3" and parent.data.params["cluster.kind"] == "ray"
    assert any(k.startswith("max_tokens/tiny_llama/pydoc/full") for k in parent.data.metrics)
    listed = {Path(a.path).name for a in client.list_artifacts(ids["parent"], "report")}
    assert {"capacity.csv", "capacity.md", "accuracy_vs_length.png"} <= listed
    downloaded = client.download_artifacts(ids["parent"], "report/capacity.csv", str(tmp_path / "dl"))
    assert Path(downloaded).read_bytes() == (sweep.report / "capacity.csv").read_bytes()

    children = children_of(client, ids["parent"])
    assert sorted(c.data.tags["cram_sweep.cell"] for c in children) == [
        "tiny_llama/pydoc/full/n_mem=2/L=4",
        "tiny_llama/pydoc/full/n_mem=2/L=8",
    ]
    assert all(c.data.metrics["done"] == 3 and c.info.status == "FINISHED" for c in children)

    # The artifacts really are in the S3 bucket, and the runs really are in PostgreSQL.
    keys = [o["Key"] for o in mlflow_booting["s3"]["client"].list_objects_v2(Bucket="mlflow").get("Contents", [])]
    assert any(k.endswith(f"{ids['parent']}/artifacts/report/capacity.csv") for k in keys), keys
    assert any(k.endswith(f"{ids['parent']}/artifacts/sweep.yaml") for k in keys), keys
    import psycopg2

    with psycopg2.connect(host="127.0.0.1", port=mlflow_booting["postgres"]["port"], user="postgres", dbname="mlflow") as conn:
        cur = conn.cursor()
        cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (ids["parent"],))
        assert cur.fetchone() == ("FINISHED",)
        cur.execute("SELECT count(*) FROM metrics WHERE run_uuid = ANY(%s) AND key = 'done'", ([c.info.run_id for c in children],))
        assert cur.fetchone()[0] >= 2


@pytest.mark.slow
def test_mlflow_killed_mid_sweep_then_report_resyncs(ray_cluster, mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # this test's own polling: fail fast
    samples, lengths = 3, (4, 8, 12)
    total = samples * len(lengths)
    args = [
        "run",
        "name=outage",
        f"out_dir={tmp_path}",
        *TINY,
        f"grid.samples={samples}",
        f"grid.lengths=[{','.join(map(str, lengths))}]",
        "batch_size=1",
        "optim.patience=150",
        "optim.max_steps=300",
        "cluster=ray",
        f"cluster.address={ray_cluster['address']}",
        "tracking=server",
        f"tracking.uri={mlflow_server.uri}",
    ]
    env = cli_env()
    env.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES")  # the sweep runs with cram-sweep's own settings
    log = tmp_path / "sweep.log"
    proc = start_cli(args, stdout=log.open("w"), env=env)
    sweep = SweepDir(tmp_path / "outage")
    client = client_for(mlflow_server.uri)
    try:

        def some_cell_logged():
            ids = json.loads(sweep.tracking.read_text())
            return any(client.get_run(r).data.metrics.get("done", 0) >= 1 for r in ids["cells"].values())

        wait_for(some_cell_logged, "first metrics in MLflow", timeout=240, proc=proc, log=log)
        mlflow_server.kill()
        at_kill = read_results(sweep, ["acc"]).num_rows
        assert at_kill < total, "the server must die mid-sweep"
        proc.wait(300)
    finally:
        if proc.poll() is None:
            stop_session(proc, grace=5)
        if mlflow_server.proc.poll() is not None:
            mlflow_server.start()  # the module's later tests (and teardown) expect a server
    output = log.read_text()
    assert proc.returncode == 0, output[-4000:]
    assert f"total: {total} done, 0 failed, 0 pending" in output
    assert output.count("MLflow logging failed (") == 1, "one warning per outage, not one per flush\n" + output[-4000:]
    table = read_results(sweep, ["acc"])
    assert table.num_rows == total > at_kill

    mlflow_server.wait()
    ids = json.loads(sweep.tracking.read_text())
    stale = {c.data.tags["cram_sweep.cell"]: c.data.metrics.get("done") for c in children_of(client, ids["parent"])}
    assert len(stale) < len(lengths) or min(stale.values()) < samples, f"MLflow missed the end of the sweep: {stale}"
    report = run_cli("report", str(sweep.path))
    assert "report not logged" not in report.stderr, report.stderr[-2000:]
    ids = json.loads(sweep.tracking.read_text())
    assert client.get_run(ids["parent"]).info.status == "FINISHED"
    children = children_of(client, ids["parent"])
    assert sorted(c.data.tags["cram_sweep.cell"] for c in children) == sorted(f"tiny_llama/pydoc/full/n_mem=2/L={L}" for L in lengths)
    for child in children:
        assert child.data.metrics["done"] == samples, child.data.tags["cram_sweep.cell"]
        assert child.info.status == "FINISHED"
    assert "capacity.csv" in {Path(a.path).name for a in client.list_artifacts(ids["parent"], "report")}
