import os
import subprocess
import sys
from pathlib import Path

import pytest

from cram_sweep.config import compose_config

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "cram_sweep.cli"]

# A tiny sweep that converges within a few hundred steps on the seeded random models.
TINY = [
    "grid.models=[tiny_llama]", "grid.datasets=[pydoc]", "grid.lengths=[4,8]", "grid.n_mem=[2]", "grid.samples=3",
    "optim.lr=0.1", "optim.max_steps=150", "optim.patience=60", "precision=fp32", "batch_size=2",
    "cluster.num_cpus=2", "worker.cpus=1", "report=false", "flush_seconds=0.5",
]


def tiny_config(*overrides):
    return compose_config(TINY + list(overrides))


def run_cli(*args, check=True, timeout=300, **kwargs):
    """The real console entry point in a fresh process, as a user runs it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def assert_same_result(a, b, atol=1e-3):
    """Two results of one sample agree: same trajectory length and accuracy, CE and vectors within fp rounding."""
    import torch

    assert a["steps"] == b["steps"]
    assert a["acc"] == pytest.approx(b["acc"], abs=1e-6)
    assert a["acc_no_mem"] == pytest.approx(b["acc_no_mem"], abs=1e-6)
    assert a["ce_bits"] == pytest.approx(b["ce_bits"], rel=1e-4, abs=atol)
    assert a["ce_no_mem_bits"] == pytest.approx(b["ce_no_mem_bits"], rel=1e-5)
    assert torch.allclose(torch.tensor(a["memory"]), torch.tensor(b["memory"]), atol=atol)


@pytest.fixture(scope="session")
def tiny_llama():
    from cram_sweep.model import load_model

    cfg = tiny_config()
    return load_model("tiny_llama", cfg.models.tiny_llama, "cpu")


@pytest.fixture(scope="session")
def tiny_neox():
    from cram_sweep.model import load_model

    cfg = tiny_config("grid.models=[tiny_neox]")
    return load_model("tiny_neox", cfg.models.tiny_neox, "cpu")
