"""Decides which kernel paths exist here, once, for every test.

Without a GPU the ``cuda`` path runs in Numba's CUDA simulator: NUMBA_ENABLE_CUDASIM must be set
before Numba is first imported, so it is set here, at collection time. With a GPU (CuPy sees a
device) the same tests run on it; tests marked ``gpu`` need a real one and are skipped otherwise.
"""

from __future__ import annotations

import os
import sys
import warnings

from cnnfast import backend  # cnnfast imports neither Numba nor CuPy at import

# A GPU counts only when the simulator was not asked for: NUMBA_ENABLE_CUDASIM=1 must be decided
# before Numba is first imported, so it is set here, at collection time.
GPU = not backend.cuda_simulated() and backend.gpu_present()
if not GPU:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

import numpy as np  # noqa: E402 - after the simulator switch above
import pytest  # noqa: E402

from cnnfast import dispatch  # noqa: E402


def _lock_simulator_shared_arrays() -> None:
    """Make the simulator's ``cuda.shared.array`` allocation atomic across a block's threads.

    Numba's simulator keys a block's shared arrays by the calling source line and creates one on
    first use with an unlocked get-then-set; one Python thread per CUDA thread and the short
    GIL switch interval below let two threads of the first block both miss and each get a
    private array, so a kernel's shared tile silently splits (seen as rare, load-dependent
    wrong or non-repeatable results in full-suite runs). Same keys, same arrays; only a lock."""
    import threading

    from numba.cuda.simulator import kernelapi

    shared = kernelapi.FakeCUDAShared
    if getattr(shared, "_cnnfast_locked", False):
        return
    original = shared.array
    lock = threading.Lock()

    def array(self, shape, dtype):
        if shape == 0:  # dynamic shared memory: one buffer, no race
            return original(self, shape, dtype)
        if isinstance(dtype, kernelapi.types.Type):
            dtype = kernelapi.numpy_support.as_dtype(dtype)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)  # the simulator's key: file, line
        with lock:
            res = self._allocations.get(key)
            if res is None:
                res = self._allocations[key] = np.empty(shape, dtype)
        return res

    shared.array = array
    shared._cnnfast_locked = True


if not GPU:
    _lock_simulator_shared_arrays()

# Every path-parametrised test runs on each of dispatch.KERNEL_PATHS (cuda: simulated or real).
PATH_IDS = [("cuda-gpu" if GPU else "cuda-sim") if p == "cuda" else p
            for p in dispatch.KERNEL_PATHS]


@pytest.fixture(params=dispatch.KERNEL_PATHS, ids=PATH_IDS)
def path(request):
    """The device of one kernel path, which runs it for the test (:func:`dispatch.using_path`)."""
    with dispatch.using_path(request.param) as device:
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
    with rt.launch_config(tiles=rt.SMALL_TILES, threads=32, mma_tiles=rt.SMALL_MMA_TILES):
        yield
    sys.setswitchinterval(interval)


def _thread_counts() -> dict:
    """The thread pools a test may resize in this process (only the libraries already loaded)."""
    counts = {}
    if "numba" in sys.modules:
        counts["numba"] = sys.modules["numba"].get_num_threads()
    if "torch" in sys.modules:
        counts["torch"] = sys.modules["torch"].get_num_threads()
    return counts


@pytest.fixture(autouse=True)
def thread_counts_restored(request):
    """Put Numba's and PyTorch's thread counts back after each test, with a warning naming the
    test that changed them. The CPU kernels' reductions have one partial sum per Numba thread, so
    a test that leaves this process on one thread (an in-process benchmark candidate did) changes
    the bits of every later in-process training, and the bitwise resume tests, which compare an
    in-process run with child processes, fail far from the cause."""
    before = _thread_counts()
    yield
    after = _thread_counts()
    if "numba" in after and "numba" not in before:  # loaded by this test: compare with its default
        before["numba"] = sys.modules["numba"].config.NUMBA_NUM_THREADS
    for library, n in before.items():
        if after.get(library, n) != n:
            warnings.warn(f"{request.node.nodeid} left {library} on {after[library]} threads "
                          f"(was {n}); restored", stacklevel=1)
            sys.modules[library].set_num_threads(n)


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
