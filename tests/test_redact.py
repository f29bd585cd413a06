"""A password in a URI is never printed or stored: stdout, error lines, tracking.json, sweep.yaml, MLflow params and
artifacts hold it masked (cram_sweep.redact), and `resume` still reaches the server.

The sweep tests run the console entry point against a real `mlflow server` on loopback (SQLite, local artifacts),
which ignores the basic-auth credentials of `http://cram:SECRET@127.0.0.1:PORT`.
"""

import json
import logging
import secrets
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cram_sweep import cli
from cram_sweep.errors import UserError
from cram_sweep.redact import MASK, is_redacted, redact, redact_record
from cram_sweep.results.store import SweepDir
from cram_sweep.tracking import connection as tracking
from cram_sweep.tracking.runs import flat_params

from .helpers import TINY, tiny_config
from .processes import MlflowServer, cli_env, free_port, run_cli, seed_mlflow_db

SECRET = f"s3cr3t-{secrets.token_hex(6)}"


@pytest.mark.parametrize(
    "text,shown",
    [
        ("https://user:SECRET@host:5000/path?x=1", "https://user:***@host:5000/path?x=1"),
        ("postgresql+psycopg2://mlflow:p@ss@postgres:5432/mlflow", "postgresql+psycopg2://mlflow:***@postgres:5432/mlflow"),
        ("http://:SECRET@host", "http://:***@host"),
        ("mssql://host/db?driver=x&password=SECRET&api_key=SECRET", "mssql://host/db?driver=x&password=***&api_key=***"),
        ("MLflow at http://u:SECRET@h:1/api failed (see http://a:SECRET@b)", "MLflow at http://u:***@h:1/api failed (see http://a:***@b)"),
        ("uri: 'https://u:SECRET@h'\nexperiment: x\n", "uri: 'https://u:***@h'\nexperiment: x\n"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("https://user@host/x", "https://user@host/x"),
        ("sqlite:////tmp/out/mlflow.db", "sqlite:////tmp/out/mlflow.db"),
        ("a plain line: no URI, key=value", "a plain line: no URI, key=value"),
    ],
)
def test_redact_masks_the_password_and_secret_parameters_only(text, shown):
    assert redact(text) == shown
    assert redact(shown) == shown, "idempotent"
    assert is_redacted(shown) == (shown != text)
    assert not is_redacted(text)


def test_log_lines_are_redacted():
    record = logging.LogRecord("cram_sweep", logging.WARNING, __file__, 1, "MLflow at %s failed", ("http://u:SECRET@h",), None)
    assert redact_record(record) and record.getMessage() == "MLflow at http://u:***@h failed"


def _server_config(uri: str):
    return tiny_config("tracking=server", f"tracking.uri={uri}")


def test_params_carry_the_uri_masked():
    params = flat_params(_server_config(f"http://cram:{SECRET}@127.0.0.1:5000"))
    assert params["tracking.uri"] == "http://cram:***@127.0.0.1:5000"
    assert not [key for key, value in params.items() if SECRET in value]


def test_printed_config_carries_the_uri_masked(capsys):
    assert cli.main(["run", "--cfg", "job", "name=x", "tracking=server", f"tracking.uri=http://cram:{SECRET}@127.0.0.1:5000"]) == 0
    out = capsys.readouterr().out
    assert "uri: http://cram:***@127.0.0.1:5000" in out and SECRET not in out


def test_a_redacted_stored_uri_takes_the_real_one_from_the_environment(tmp_path, monkeypatch):
    real, shown = f"https://cram:{SECRET}@mlflow.example:443", f"https://cram:{MASK}@mlflow.example:443"
    sweep = SweepDir(tmp_path / "s")
    stored = _server_config(shown)  # what `resume` reads from sweep.yaml
    monkeypatch.setenv("MLFLOW_TRACKING_URI", real)
    assert tracking.tracking_uri(stored, sweep) == real
    assert tracking.tracking_uri(_server_config(real), sweep) == real, "a tracking.uri= override replaces it"
    for other in (f"https://cram:{SECRET}@elsewhere:443", ""):  # another server, or none: one line saying what to give
        monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
        with pytest.raises(UserError) as missing:
            tracking.tracking_uri(stored, sweep)
        assert str(missing.value) == (
            f"{sweep.config} stores tracking.uri={shown} without its secret: set MLFLOW_TRACKING_URI to the full URI, "
            f"or give it with `cram-sweep resume {sweep.path} tracking.uri=URI`"
        )


# ---------------------------------------------------------------- the CLI against a real MLflow server


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free loopback port, its database (SQLite), artifacts and log under one directory (workdir)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    seed_mlflow_db([f"out_dir={root}"])
    server = MlflowServer(f"sqlite:///{root}/mlflow.db", str(root / "artifacts"), root)
    server.start()
    try:
        server.wait()
        yield server
    finally:
        server.stop()


def _no_secret_env() -> dict:
    env = cli_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _files_holding(secret: str, *folders: Path) -> list:
    return [path for folder in folders for path in folder.rglob("*") if path.is_file() and secret.encode() in path.read_bytes()]


@pytest.mark.slow
def test_a_password_in_the_tracking_uri_is_never_printed_or_stored_and_resume_still_reaches_the_server(
    mlflow_server, tmp_path, monkeypatch, capsys
):
    port = mlflow_server.port
    real, shown = f"http://cram:{SECRET}@127.0.0.1:{port}", f"http://cram:{MASK}@127.0.0.1:{port}"
    env = _no_secret_env()
    sweep = SweepDir(tmp_path / "secret")

    ran = run_cli("run", "name=secret", f"out_dir={tmp_path}", *TINY, "tracking=server", f"tracking.uri={real}", env=env)
    ids = json.loads(sweep.tracking.read_text())
    assert ids["uri"] == shown
    assert f"MLflow parent run: {ids['parent']} ({shown})" in ran.stdout
    assert f"uri: {shown}" in sweep.config.read_text()

    # sweep.yaml holds the URI masked: resume takes the real one from MLFLOW_TRACKING_URI or a tracking.uri= override
    refused = run_cli("resume", str(sweep.path), env=env, check=False)
    assert refused.returncode == 2 and [line for line in refused.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {sweep.config} stores tracking.uri={shown} without its secret: set MLFLOW_TRACKING_URI to the full URI, "
        f"or give it with `cram-sweep resume {sweep.path} tracking.uri=URI`"
    ], refused.stderr[-2000:]
    from_env = run_cli("resume", str(sweep.path), env={**env, "MLFLOW_TRACKING_URI": real})
    # the override, in this process (nothing is left to run: no Ray), without MLFLOW_TRACKING_URI
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli.main(["resume", str(sweep.path), f"tracking.uri={real}", "report=true"]) == 0
    overridden = capsys.readouterr()
    for stdout in (from_env.stdout, overridden.out):
        assert f"MLflow parent run: {ids['parent']} ({shown})" in stdout, "the same parent run, on the same server"
    assert json.loads(sweep.tracking.read_text())["parent"] == ids["parent"]

    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
    parent = client.get_run(ids["parent"])
    assert parent.data.params["tracking.uri"] == shown
    assert "report/capacity.md" in [a.path for a in client.list_artifacts(ids["parent"], "report")], "the report reached the run"
    artifact = Path(client.download_artifacts(ids["parent"], "sweep.yaml", str(tmp_path / "downloaded")))
    assert f"uri: {shown}" in artifact.read_text()

    for proc in (ran, refused, from_env):
        assert SECRET not in proc.stdout + proc.stderr
    assert SECRET not in overridden.out + overridden.err
    # every file of the sweep (sweep.yaml, tracking.json, store, report) and of the server (database, artifacts)
    assert _files_holding(SECRET, sweep.path, mlflow_server.workdir) == []


@pytest.mark.slow
def test_a_password_in_the_uri_of_a_server_that_is_down_stays_out_of_the_error_line(tmp_path):
    port = free_port()
    proc = run_cli(
        "run", "name=down", f"out_dir={tmp_path}", *TINY, "tracking=server", f"tracking.uri=http://cram:{SECRET}@127.0.0.1:{port}",
        env=_no_secret_env(), check=False, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        f"error: cannot reach MLflow at http://cram:***@127.0.0.1:{port} (connection refused): start the server or fix tracking.uri / MLFLOW_TRACKING_URI"
    ], proc.stderr[-2000:]
    assert SECRET not in proc.stdout + proc.stderr
    assert _files_holding(SECRET, tmp_path / "down") == []
