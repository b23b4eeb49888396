"""Decides which kernel paths exist here, once, for every test.

Without a GPU the ``cuda`` path runs in Numba's CUDA simulator: NUMBA_ENABLE_CUDASIM must be set
before Numba is first imported, so it is set here, at collection time. With a GPU (CuPy sees a
device) the same tests run on it; tests marked ``gpu`` need a real one and are skipped otherwise.
"""

from __future__ import annotations

import os
import sys

from cnnfast import backend  # cnnfast imports neither Numba nor CuPy at import

# A GPU counts only when the simulator was not asked for: NUMBA_ENABLE_CUDASIM=1 must be decided
# before Numba is first imported, so it is set here, at collection time.
GPU = not backend.cuda_simulated() and backend.gpu_present()
if not GPU:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

import numpy as np  # noqa: E402 - after the simulator switch above
import pytest  # noqa: E402

from cnnfast import dispatch  # noqa: E402

# (device, cpu path) pairs every path-parametrised test runs on.
PATHS = [("cpu", "reference"), ("cpu", "fast"), ("cuda", "fast")]
PATH_IDS = ["reference", "cpu", "cuda-gpu" if GPU else "cuda-sim"]


@pytest.fixture(params=PATHS, ids=PATH_IDS)
def path(request):
    """(device, cpu-path) for one kernel path; the cpu path choice is set for the test."""
    device, cpu = request.param
    with dispatch.cpu_path(cpu):
        yield device


@pytest.fixture(autouse=True)
def small_simulator_launches():
    """In the simulator: small GEMM tiles and blocks, and a short GIL switch interval (the
    simulator runs one Python thread per CUDA thread and polls them at barriers; this makes it
    several times faster). Tests of the GPU's default configuration open their own
    ``launch_config``. On a real GPU the defaults stay."""
    if GPU:
        yield
        return
    from cnnfast.cuda import _runtime as rt

    interval = sys.getswitchinterval()
    sys.setswitchinterval(5e-4)
    with rt.launch_config(tiles=rt.SMALL_TILES, threads=32):
        yield
    sys.setswitchinterval(interval)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a real GPU (CuPy with a CUDA device)")
    for item in items:
        if "gpu" in item.keywords and not GPU:
            item.add_marker(skip_gpu)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def pytest_report_header(config):
    return (f"cnnfast paths: reference, cpu, cuda ({'GPU' if GPU else 'Numba CUDA simulator'})")


@pytest.fixture(params=["reference", "fast"], ids=["reference", "cpu"])
def cpu_path(request):
    """Each CPU path in turn (for float64 finite-difference checks, which run on the host)."""
    with dispatch.cpu_path(request.param):
        yield request.param
