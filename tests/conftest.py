import os

import pytest
import torch


def pytest_configure(config):
    # Under pytest-xdist (``-n auto``) each worker is its own process. Share the cores out among
    # them, and pass the count on to the subprocesses tests start (two workers of two threads
    # each on two cores would oversubscribe them, and OpenMP's waiting threads slow every op).
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        threads = max(1, (cores or 1) // int(workers))
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


@pytest.fixture(autouse=True)
def _fixed_global_seed():
    # Model initialisation in tests uses the global RNG; fix it so every test is reproducible.
    torch.manual_seed(1234)


@pytest.fixture(autouse=True)
def _fresh_warn_once():
    # fqtorch warns each fallback once per process; a test that expects the warning must not
    # depend on whether an earlier test in its worker said it first.
    from fqtorch.backends.notes import warn_once

    warn_once.cache_clear()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
