import os
import shutil
import tempfile
from pathlib import Path

import pytest

from .helpers import tiny_config
from .processes import free_port

if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    # `make test` runs two test modules at once on a 2-core machine: one compute thread per process, as the tiny
    # sweeps' Ray workers get (cluster.num_cpus=1), else spinning OpenMP threads halve everyone's speed.
    torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """One compute thread, as the tests' Ray workers run (cluster.num_cpus=1): an in-process run compared bit for bit
    with a worker's rows runs at the worker's thread count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_llama():
    from cram_sweep.engine.model import load_model

    return load_model("tiny_llama", tiny_config().models["tiny_llama"], "cpu")


@pytest.fixture(scope="session")
def tiny_neox():
    from cram_sweep.engine.model import load_model

    return load_model("tiny_neox", tiny_config("grid.models=[tiny_neox]").models["tiny_neox"], "cpu")


@pytest.fixture(scope="module")
def stale_ray_tmpdir():
    """A private Ray temp dir (RAY_TMPDIR) whose recorded cluster (`ray/ray_current_cluster`) is an address nothing
    answers at: what a `ray start --head` killed without `ray stop` leaves behind. Yields (dir, dead address)."""
    temp = Path(tempfile.mkdtemp(prefix="cr-", dir="/tmp"))  # short: Ray's unix socket paths must stay < 108 chars
    (temp / "ray").mkdir()
    dead = f"127.0.0.1:{free_port()}"
    (temp / "ray" / "ray_current_cluster").write_text(dead)
    yield temp, dead
    shutil.rmtree(temp, ignore_errors=True)
