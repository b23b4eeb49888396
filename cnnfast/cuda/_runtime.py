"""Device arrays, streams and launch settings shared by the Numba CUDA kernels.

On a GPU the kernels take and return CuPy arrays: inputs are wrapped for Numba with
``cuda.as_cuda_array`` (no synchronisation), outputs are allocated by CuPy, and every launch goes
on CuPy's current stream, so a sequence of ops queues up without a host sync. In Numba's CUDA
simulator (``NUMBA_ENABLE_CUDASIM=1``) the arrays are NumPy arrays and are passed as they are.
CuPy is imported only when a CuPy array arrives.

Kernels are built by factories cached with ``functools.lru_cache`` on (tile configuration,
dtype, ...): each factory returns one ``cuda.jit`` dispatcher whose tile sizes are closure
constants, compiled on its first launch and never again. Nothing compiles at import.

Launch settings (:class:`LaunchConfig`): the GEMM tiles of the convolution kernels and the
block size of the elementwise, pooling and reduction kernels. The defaults are chosen for a GPU;
:func:`launch_config` switches them for a block of code (tests use :data:`SMALL_TILES` in the
simulator, which runs one Python thread per CUDA thread).

Launch cost: on a GPU the host side decides small-network speed, and Numba's cost per launch
grows with every kernel parameter, so :func:`launch` passes a tuple (a geometry) as one cached
device array, and :func:`count_launches` records launches and arguments for the tests that hold
a training step to its budget (and, with ``record_only``, for ``cnnfast doctor --compile``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import numpy as np
from numba import cuda

from cnnfast.backend import array_xp, is_cupy_array


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints."""
    return -(-a // b)


def check_loader_threads(tiles) -> None:
    """The conv kernels' loaders need every thread to move the same number of elements per slice
    with a fixed row (or reduction) index: a rule on the thread count of any tile shape."""
    t, bm, bn, bk = tiles.threads, tiles.block_m, tiles.block_n, tiles.block_k
    if t % bm or t % bk or (bm * bk) % t or (bn * bk) % t or t > 1024:
        raise ValueError(
            f"tiles {tiles}: the thread count {t} must be a multiple of block_m and block_k, "
            f"divide block_m * block_k and block_n * block_k, and be at most 1024"
        )


@dataclasses.dataclass(frozen=True)
class GemmTiles:
    """Tile shape of the implicit-GEMM convolution kernels.

    A block computes a ``block_m`` x ``block_n`` tile of the GEMM output, stepping through the
    reduction in slices ``block_k`` deep staged in shared memory; each thread holds a
    ``micro_m`` x ``micro_n`` micro-tile of accumulators in registers, so a block has
    (block_m / micro_m) * (block_n / micro_n) threads. The loaders need every thread to move the
    same number of elements per slice with a fixed row (or reduction) index, hence the checks.
    """

    block_m: int = 64
    block_n: int = 64
    block_k: int = 16
    micro_m: int = 4
    micro_n: int = 4

    def __post_init__(self):
        bm, bn = self.block_m, self.block_n
        if bm % self.micro_m or bn % self.micro_n:
            raise ValueError(f"micro-tile must divide the block tile, got {self}")
        check_loader_threads(self)

    @property
    def threads_m(self) -> int:
        return self.block_m // self.micro_m

    @property
    def threads_n(self) -> int:
        return self.block_n // self.micro_n

    @property
    def threads(self) -> int:
        return self.threads_m * self.threads_n


GPU_TILES = GemmTiles()  # 64 x 64 output tile, 16-deep slices, 256 threads with 4 x 4 each
SMALL_TILES = GemmTiles(block_m=8, block_n=8, block_k=4, micro_m=2, micro_n=2)  # 16 threads


@dataclasses.dataclass(frozen=True)
class MmaTiles:
    """Tile shape of the tensor-core convolution kernels (``cnnfast.cuda._mma``).

    A block of ``warps_m * warps_n`` warps computes a ``block_m`` x ``block_n`` output tile
    from ``block_k``-deep slices staged in shared memory, as the SIMT kernels do; each warp owns
    a (block_m / warps_m) x (block_n / warps_n) part of it, made of 16 x 8 MMA tiles, and
    ``precision`` ("tf32" or "bf16") picks the MMA (k = 8 or 16 per instruction). The loaders
    are the SIMT kernels' own, hence the same thread-count rules.
    """

    block_m: int = 128
    block_n: int = 64
    block_k: int = 16
    warps_m: int = 4
    warps_n: int = 2
    precision: str = "tf32"

    def __post_init__(self):
        if self.precision not in ("tf32", "bf16"):
            raise ValueError(f"precision must be 'tf32' or 'bf16', got {self.precision!r}")
        wm, wn = self.block_m // max(self.warps_m, 1), self.block_n // max(self.warps_n, 1)
        if (self.warps_m < 1 or self.warps_n < 1 or wm * self.warps_m != self.block_m
                or wn * self.warps_n != self.block_n or wm % 16 or wn % 8 or self.block_k % 16):
            raise ValueError(f"tiles {self}: each warp needs a whole number of 16 x 8 MMA tiles "
                             f"and block_k a multiple of 16")
        check_loader_threads(self)

    @property
    def warp_m(self) -> int:
        return self.block_m // self.warps_m

    @property
    def warp_n(self) -> int:
        return self.block_n // self.warps_n

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n


# 128 x 64 output tile, 8 warps of 32 x 32 (2 x 4 MMA tiles each), 16-deep slices
GPU_MMA_TILES = MmaTiles()
SMALL_MMA_TILES = MmaTiles(block_m=32, block_n=16, block_k=16, warps_m=2, warps_n=1)  # 64 thr.


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Launch settings: conv GEMM ``tiles``, the tensor-core conv kernels' ``mma_tiles`` (their
    precision is set per call) and ``threads`` per block of the other kernels."""

    tiles: GemmTiles = GPU_TILES
    threads: int = 256
    mma_tiles: MmaTiles = GPU_MMA_TILES

    def __post_init__(self):
        t = self.threads
        if t < 1 or t > 1024 or t & (t - 1):
            raise ValueError(f"threads must be a power of two in [1, 1024], got {t}")


_config = LaunchConfig()


def current_config() -> LaunchConfig:
    return _config


@contextlib.contextmanager
def launch_config(tiles: GemmTiles | None = None, threads: int | None = None,
                  mma_tiles: MmaTiles | None = None):
    """Run the block with other launch settings (results agree to rounding, not bitwise)."""
    global _config
    previous = _config
    _config = LaunchConfig(tiles=previous.tiles if tiles is None else tiles,
                           threads=previous.threads if threads is None else threads,
                           mma_tiles=previous.mma_tiles if mma_tiles is None else mma_tiles)
    try:
        yield _config
    finally:
        _config = previous


# --- arrays ---------------------------------------------------------------------------------

def flat(a):
    """A C-contiguous 1-D view (or copy) of ``a``; kernels index flat with int64 offsets."""
    return array_xp(a).ascontiguousarray(a).reshape(-1)


def empty(shape, dtype, like):
    """An uninitialised array on the device of ``like``."""
    return array_xp(like).empty(shape, dtype=dtype)


def zeros(shape, dtype, like):
    return array_xp(like).zeros(shape, dtype=dtype)


def full(shape, value, dtype, like):
    return array_xp(like).full(shape, value, dtype=dtype)


def to_device_like(host: np.ndarray, like):
    """A host array copied to the device of ``like`` (small tables only)."""
    return array_xp(like).asarray(host)


# --- launches -------------------------------------------------------------------------------

_streams: dict[int, object] = {}


def _current_stream():
    """Numba's handle on CuPy's current stream (0, Numba's default stream, for CuPy's null one)."""
    import cupy

    ptr = cupy.cuda.get_current_stream().ptr
    if ptr == 0:
        return 0
    stream = _streams.get(ptr)
    if stream is None:
        stream = _streams[ptr] = cuda.external_stream(ptr)
    return stream


def _as_kernel_arg(a, like):
    if isinstance(a, tuple):
        # Numba passes a tuple as one kernel parameter per element, and its launch cost grows
        # with every parameter; a geometry tuple (22 ints for a convolution) travels instead
        # as one small int64 array, copied once per value and device. Kernels unpack it alike.
        if not all(isinstance(v, (int, np.integer)) for v in a):
            raise TypeError(f"a tuple kernel argument must hold ints, got {a!r}")
        # The table is a CuPy array on a GPU: it takes the conversion below like any other
        # (passed raw, Numba's launch path and count_launches' typing would each meet CuPy).
        values = tuple(int(v) for v in a)
        a = cached_table(("tuple",) + values, lambda: np.array(values, dtype=np.int64), like)
    if is_cupy_array(a):
        # CuPy's stream is the launch stream, so Numba need not synchronise on it.
        return cuda.as_cuda_array(a, sync=False)
    if isinstance(a, np.ndarray) and not a.flags.writeable:
        # The simulator copies array arguments back after the launch; a read-only input
        # must not be written (kernels never modify their inputs, so nothing is lost).
        return cuda.In(a)
    return a


@dataclasses.dataclass(frozen=True)
class LaunchRecord:
    """One kernel launch seen by :func:`count_launches`: the kernel's name, how many arguments
    Numba marshals for it, the Numba type of each argument as the launch passed it, the block
    size and dynamic shared memory, and the kernel (dispatcher) itself."""

    kernel: str
    arguments: int
    types: tuple
    block: int
    shared_bytes: int
    dispatcher: object = dataclasses.field(compare=False, repr=False)


_counters: list[list[LaunchRecord]] = []
_record_only = False


@contextlib.contextmanager
def count_launches(record_only: bool = False):
    """Record every launch made inside the block: ``with count_launches() as records: ...``.

    Launch cost on a GPU grows with the number of launches and of kernel arguments, so these
    two counts are the host-side budget of a training step; tests assert it. With
    ``record_only`` nothing runs (host arrays in, outputs left unwritten): how ``cnnfast doctor
    --compile`` finds every kernel variant and its argument types on a machine without a GPU.
    """
    global _record_only
    records: list[LaunchRecord] = []
    _counters.append(records)
    previous, _record_only = _record_only, _record_only or record_only
    try:
        yield records
    finally:
        _counters.remove(records)
        _record_only = previous


def _record(kernel, args, block, shared_bytes: int) -> None:
    from numba import typeof, types

    arg_types = []
    for a in args:
        a = getattr(a, "value", a)  # cuda.In wraps the array
        t = typeof(a)
        if isinstance(t, types.Array) and not t.mutable:  # read-only on the host, not on a GPU
            t = t.copy(readonly=False)
        arg_types.append(t)
    name = getattr(getattr(kernel, "py_func", None), "__name__", type(kernel).__name__)
    threads = block if isinstance(block, int) else int(np.prod(block))
    record = LaunchRecord(name, len(args), tuple(arg_types), threads, shared_bytes, kernel)
    for records in _counters:
        records.append(record)


def launch(kernel, grid, block, *args, shared_bytes: int = 0) -> None:
    """``kernel[grid, block](*args)`` on CuPy's current stream, or in the simulator.

    ``grid`` and ``block`` are ints or tuples; array arguments are CuPy arrays on a GPU and
    NumPy arrays in the simulator. ``shared_bytes`` sizes ``cuda.shared.array(0, ...)``.
    """
    like = next((a for a in args if is_cupy_array(a)), None)
    converted = [_as_kernel_arg(a, like) for a in args]
    if _counters:
        _record(kernel, converted, block, shared_bytes)
        if _record_only:
            return
    stream = _current_stream() if any(is_cupy_array(a) for a in args) else 0
    kernel[grid, block, stream, shared_bytes](*converted)


@functools.lru_cache(maxsize=None)
def nb_type(dtype: np.dtype):
    """The Numba type of a NumPy dtype (for ``cuda.local.array`` / ``cuda.shared.array``)."""
    from numba import from_dtype

    return from_dtype(np.dtype(dtype))


_tables: dict = {}


def cached_table(key: tuple, build, like):
    """A small read-only index table (built on the host by ``build()``) on ``like``'s device.

    Built and copied once per ``key`` and device, so the copy stays off the per-launch path.
    """
    if is_cupy_array(like):
        import cupy

        full_key = (key, cupy.cuda.Device().id)
    else:
        full_key = (key, -1)
    table = _tables.get(full_key)
    if table is None:
        if len(_tables) >= 256:
            _tables.clear()
        table = _tables[full_key] = to_device_like(build(), like)
    return table
