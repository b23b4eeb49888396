"""How the fast CPU kernels use the cores: Numba ``prange`` loops, and BLAS held to one thread.

float32 kernels run in parallel and float64 kernels on one thread (:class:`ParallelKernel`).

Every kernel of :mod:`cnnfast.cpu` is one ``@njit(parallel=True)`` loop over independent tasks
(output planes, channels, chunks of a convolution's column matrix). A convolution chunk runs its
gather, its matrix product and its write-back on one thread: the product is ``np.dot`` inside
the Numba loop, which calls SciPy's BLAS (``scipy.linalg.cython_blas``) directly, one thread per
chunk. So all parallel work runs on Numba's one pool, whose workers spin briefly between loops
and start the next one in microseconds (a pool of blocking threads takes a wake-up of ~0.1 ms per
loop on a VM, too slow for the small layers), and no second pool (BLAS's own threads) competes
with it for the cores: BLAS is held to one thread while a kernel runs (restored afterwards).

Determinism: each output element is computed by one task in a fixed order; partial sums of the
weight gradient are one per block of chunks and added in block order; so the same inputs give
the same bits on the same machine (and thread count).
"""

from __future__ import annotations

import contextlib
import os
import threading
import types

import numba
import numpy as np
from numba import njit

_lock = threading.Lock()
# Below this many elements in every array argument a float32 kernel runs serially (see
# ParallelKernel).
PARALLEL_MIN_ELEMENTS = 1 << 16
_local = threading.local()


class ParallelKernel:
    """A kernel compiled twice from one Python function: ``@njit(parallel=True)`` for float32
    arrays (the training dtype, where speed matters) and a serial ``@njit`` for float64 (the
    checking dtype). A parallel compile costs 2-3 times a serial one, and CI compiles every
    kernel in both dtypes; ``prange`` runs as ``range`` in the serial build. The dtype is that
    of the first floating-point array argument. A float32 call whose arrays are all smaller than
    :data:`PARALLEL_MIN_ELEMENTS` runs the serial build too: its work (tens of microseconds)
    is less than waking the pool, and on a busy machine a parallel loop waits for a worker
    thread to be scheduled (a batch-1 ResNet-18's ReLUs took 6.5 ms each with Numba's OpenMP
    layer, 0.1 ms serially).
    """

    def __init__(self, fn):
        self.__doc__ = fn.__doc__
        self.__name__ = fn.__name__
        self.parallel = njit(parallel=True, cache=True)(fn)
        # A separate function object (own qualified name), so each build has its own cache file.
        serial = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                                    fn.__defaults__, fn.__closure__)
        serial.__qualname__ = fn.__qualname__ + "_serial"
        serial.__module__ = fn.__module__
        self.serial = njit(cache=True, nogil=True)(serial)

    def __call__(self, *args):
        for a in args:
            if isinstance(a, np.ndarray) and a.dtype.kind == "f":
                if a.dtype == np.float32 and max(
                        b.size for b in args if isinstance(b, np.ndarray)) >= \
                        PARALLEL_MIN_ELEMENTS:
                    return self.parallel(*args)
                break
        return self.serial(*args)


def parallel_kernel(fn) -> ParallelKernel:
    """Decorator: see :class:`ParallelKernel`."""
    return ParallelKernel(fn)


def num_threads() -> int:
    """Threads of Numba's pool that a kernel may use (numba.set_num_threads, NUMBA_NUM_THREADS)."""
    return int(numba.get_num_threads())


def scratch(role: str, threads: int, size: int, dtype) -> np.ndarray:
    """A (threads, size) C-contiguous work array, row t for the kernel thread t, reused across
    calls on this Python thread. One buffer per (role, dtype) grows to the largest size asked
    for; the array returned is only valid until the next call with the same role. Never hand
    one to a caller."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    dtype = np.dtype(dtype)
    key = (role, dtype)
    total = max(1, threads * size)
    buf = buffers.get(key)
    if buf is None or buf.size < total:
        buf = buffers[key] = np.empty(total, dtype=dtype)
    return buf[:threads * size].reshape(threads, size)


# --- BLAS threads ---------------------------------------------------------------------------------

_blas_controllers: list | None = None
_blas_depth = 0
_blas_saved: list[int] = []


def _controllers() -> list:
    """threadpoolctl's handles on the BLAS that Numba's ``np.dot`` calls: SciPy's (loaded by
    ``scipy.linalg.cython_blas``); every BLAS found when SciPy's cannot be told apart."""
    global _blas_controllers
    if _blas_controllers is None:
        try:
            import scipy
            import scipy.linalg.cython_blas  # noqa: F401 - loads the BLAS that np.dot calls
            from threadpoolctl import ThreadpoolController

            found = [c for c in ThreadpoolController().select(user_api="blas").lib_controllers
                     if hasattr(c, "set_num_threads")]
            scipy_dir = os.path.dirname(os.path.dirname(os.path.abspath(scipy.__file__)))
            own = [c for c in found if "scipy" in os.path.relpath(c.filepath, scipy_dir)
                   .split(os.sep)[0]]
            _blas_controllers = own or found
        except (ImportError, OSError, AttributeError, ValueError, RuntimeError):
            # threadpoolctl missing, or unable to inspect this BLAS: leave its threads alone
            _blas_controllers = []
    return _blas_controllers


@contextlib.contextmanager
def single_threaded_blas():
    """Hold every loaded BLAS to one thread inside the block (nestable, thread-safe); the
    previous thread counts come back when the outermost block exits. Inside a Numba parallel
    loop each thread's product must stay on that thread: a BLAS using its own threads there
    would serialise the callers and oversubscribe the cores."""
    global _blas_depth, _blas_saved
    with _lock:
        if _blas_depth == 0:
            _blas_saved = []
            for c in _controllers():
                _blas_saved.append(c.get_num_threads())
                if _blas_saved[-1] != 1:
                    c.set_num_threads(1)
        _blas_depth += 1
    try:
        yield
    finally:
        with _lock:
            _blas_depth -= 1
            if _blas_depth == 0:
                for c, n in zip(_controllers(), _blas_saved):
                    if n != 1:
                        c.set_num_threads(n)
