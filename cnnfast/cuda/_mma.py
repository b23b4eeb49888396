"""Tensor-core MMA for the convolution kernels: the CUDA C wrappers of ``kernels/mma.cu``, their
fragment layouts, a fragment-exact emulation for Numba's simulator, and the warp-tiled slice
multiply the kernels of :mod:`cnnfast.cuda.conv` run with :class:`~._runtime.MmaTiles`.

Numba CUDA has no tensor-core API, but it links CUDA C device functions into a kernel
(``cuda.declare_device(..., link=[...])``: NVRTC compiles the ``.cu``, nvJitLink links it with
link-time optimisation, so each wrapper is inlined). Each wrapper is one warp-wide
``mma.sync``: TF32 m16n8k8 or BF16 m16n8k16 with float32 accumulation, the float32 operands
rounded inside (TF32 ``cvt.rna``: nearest, ties away from zero; BF16 ``cvt.rn``: nearest even).

The simulator cannot run linked CUDA C (its ``declare_device`` does nothing), so there the
kernels call :func:`emulate_tf32` / :func:`emulate_bf16` instead, with the same arguments: the 32
lanes of a warp (Python threads) put their fragments into one per-warp exchange at the positions
:func:`fragment_layout` gives (the PTX ISA's tables), meet at a barrier, and each lane forms its
result fragment from the whole A, B and C, with the same operand rounding. Products of rounded
operands are exact in float64; the emulation sums them with C in float64 and rounds to float32
once, where the hardware accumulates in its own order with float32 rounding (truncation on some
parts): the difference is within the accumulation term of :func:`error_bound`.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from pathlib import Path

import numpy as np

from cnnfast.backend import cuda_simulated

WARP = 32
PRECISIONS = ("tf32", "bf16")


# --- the CUDA C sources ---------------------------------------------------------------------

def kernels_dir() -> Path:
    """The folder holding the CUDA C sources: ``cnnfast/kernels`` in an installed wheel (the
    build maps the repository's top-level ``kernels/`` there), else ``kernels/`` beside the
    ``cnnfast`` package of a source checkout."""
    package = Path(__file__).resolve().parents[1]
    for folder in (package / "kernels", package.parent / "kernels"):
        if (folder / "mma.cu").is_file():
            return folder
    raise FileNotFoundError(f"CUDA C sources (mma.cu) found neither in {package / 'kernels'} "
                            f"(an installed wheel) nor in {package.parent / 'kernels'} (a "
                            f"source checkout): reinstall cnnfast")


def source(name: str = "mma.cu") -> Path:
    """The path of one CUDA C source in :func:`kernels_dir`."""
    path = kernels_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"no CUDA C source {name} in {kernels_dir()}")
    return path


# --- shapes, fragments, rounding ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MmaShape:
    """One wrapper: D (m x n) = A (m x k) * B (k x n) + C; ``a``, ``b``: elements a lane holds."""

    precision: str
    m: int
    n: int
    k: int
    symbol: str

    @property
    def a(self) -> int:
        return self.m * self.k // WARP

    @property
    def b(self) -> int:
        return self.k * self.n // WARP


SHAPES = {"tf32": MmaShape("tf32", 16, 8, 8, "cnnfast_mma_tf32_m16n8k8"),
          "bf16": MmaShape("bf16", 16, 8, 16, "cnnfast_mma_bf16_m16n8k16")}


@functools.lru_cache(maxsize=None)
def fragment_layout(precision: str) -> dict[str, np.ndarray]:
    """{"a", "b", "c"}: int arrays (32, elements, 2) giving the (row, col) of each fragment
    element each lane holds, from the PTX ISA's "Matrix fragments for mma.m16n8k8" (.tf32)
    and "mma.m16n8k16" (.bf16) tables; lane l has groupID g = l // 4, t = l % 4. C and D share
    the "c" layout."""
    shape = SHAPES[precision]
    a = np.zeros((WARP, shape.a, 2), np.int64)
    b = np.zeros((WARP, shape.b, 2), np.int64)
    c = np.zeros((WARP, 4, 2), np.int64)
    for lane in range(WARP):
        g, t = lane // 4, lane % 4
        for i in range(4):
            c[lane, i] = (g + 8 * (i // 2), 2 * t + i % 2)
        if precision == "tf32":
            for i in range(4):  # a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4)
                a[lane, i] = (g + 8 * (i % 2), t + 4 * (i // 2))
            for i in range(2):  # b0 (t, g), b1 (t+4, g)
                b[lane, i] = (t + 4 * i, g)
        else:
            for i in range(8):  # a0,a1 (g, 2t+e); a2,a3 (g+8, .); a4..a7 the same, cols + 8
                a[lane, i] = (g + 8 * ((i // 2) % 2), 2 * t + i % 2 + 8 * (i // 4))
            for i in range(4):  # b0,b1 (2t+e, g); b2,b3 (2t+8+e, g)
                b[lane, i] = (2 * t + i % 2 + 8 * (i // 2), g)
    for array in (a, b, c):
        array.setflags(write=False)
    return {"a": a, "b": b, "c": c}


def round_operand(x, precision: str) -> np.ndarray:
    """float32 ``x`` rounded as the wrapper rounds an operand, returned as float32: TF32 keeps
    10 mantissa bits, nearest with ties away from zero (``cvt.rna.tf32.f32``); BF16 keeps 7,
    nearest with ties to even (``cvt.rn.bf16x2.f32``). NaN and infinity stay what they are."""
    x = np.array(x, dtype=np.float32)  # a C-contiguous copy, 0-d for a scalar
    bits = x.view(np.uint32).astype(np.uint64)
    if precision == "tf32":
        rounded = (bits + 0x1000) & 0xFFFFE000
    elif precision == "bf16":
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    else:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    out = rounded.astype(np.uint32).view(np.float32)
    return np.where(np.isfinite(x), out, x)


def unit_roundoff(precision: str) -> float:
    """Largest relative error of one operand rounding: 2^-11 (TF32), 2^-8 (BF16), 0 ("fp32":
    float32 operands used as they are)."""
    return {"tf32": 2.0 ** -11, "bf16": 2.0 ** -8, "fp32": 0.0}[precision]


# float32 accumulation, rounding toward zero at worst (the tensor cores' adder on some parts)
ACCUMULATE_ROUNDOFF = 2.0 ** -23


def error_bound(abs_sum, reduction: int, precision: str, rounded_inputs: bool = False):
    """Elementwise bound on |kernel - exact| of a sum of ``reduction`` products on tensor cores.

    ``abs_sum`` is the exact sum of |a| * |b| over the reduction (the same convolution of |x| and
    |w|). Each rounded product is within (2u + u^2) |a b| of the exact one (u =
    :func:`unit_roundoff`; 0 when the inputs are already representable, ``rounded_inputs``).
    Summing n terms in float32 adds at most gamma_n = n v / (1 - n v) times the sum of their
    magnitudes (v = :data:`ACCUMULATE_ROUNDOFF`), whatever the order (Higham, Accuracy and
    Stability of Numerical Algorithms, 3.1 and 3.5). On tensor cores each MMA sums its k
    products with the running C at once (gamma_k on at most the whole sum, one block per k
    terms: gamma_(n + k) overall), and backward weight adds its per-split partials, at most one
    split per 32 terms (8 slices of >= 4, conv's split rule): n = reduction + reduction / 32 + 16.
    """
    u = 0.0 if rounded_inputs else unit_roundoff(precision)
    n = int(reduction) + int(reduction) // 32 + 16
    gamma = n * ACCUMULATE_ROUNDOFF / (1 - n * ACCUMULATE_ROUNDOFF)
    return (2 * u + u * u + gamma * (1 + u) ** 2) * np.asarray(abs_sum, dtype=np.float64)


# --- the simulator's emulation ----------------------------------------------------------------

class _WarpExchange:
    """One warp's meeting place: the whole A, B, C of one MMA and a barrier for its lanes."""

    def __init__(self, shape: MmaShape):
        self.a = np.zeros((shape.m, shape.k))
        self.b = np.zeros((shape.k, shape.n))
        self.c = np.zeros((shape.m, shape.n))
        # A lane that never arrives (divergent control flow: undefined on hardware) breaks the
        # barrier after the timeout instead of hanging the simulator.
        self.barrier = threading.Barrier(WARP, timeout=300)


_exchanges: dict[tuple, _WarpExchange] = {}
_exchanges_lock = threading.Lock()


def _lane_and_exchange(shape: MmaShape) -> tuple[int, _WarpExchange]:
    thread = threading.current_thread()
    tid = getattr(thread, "thread_id", None)
    if tid is None:
        raise RuntimeError("the MMA emulation runs inside a kernel launched in Numba's CUDA "
                           "simulator (NUMBA_ENABLE_CUDASIM=1)")
    key = (shape.precision, tuple(thread.blockIdx), tid // WARP)
    with _exchanges_lock:
        exchange = _exchanges.get(key)
        if exchange is None or exchange.barrier.broken:
            exchange = _exchanges[key] = _WarpExchange(shape)
    return tid % WARP, exchange


def _emulate(shape: MmaShape, a, b, c) -> tuple:
    lane, ex = _lane_and_exchange(shape)
    layout = fragment_layout(shape.precision)
    (ar, ac), (br, bc), (cr, cc) = (layout[f][lane].T for f in "abc")
    ex.a[ar, ac] = round_operand(np.array(a, np.float32), shape.precision)
    ex.b[br, bc] = round_operand(np.array(b, np.float32), shape.precision)
    ex.c[cr, cc] = np.array(c, np.float32)
    ex.barrier.wait()  # every lane's fragments are in
    d = np.einsum("ik,ki->i", ex.a[cr], ex.b[:, cc]) + ex.c[cr, cc]
    ex.barrier.wait()  # every lane has read them: the next MMA may write
    return tuple(np.float32(v) for v in d)


def emulate_tf32(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
    """``cnnfast_mma_tf32_m16n8k8`` of kernels/mma.cu, for one lane of a simulated warp."""
    return _emulate(SHAPES["tf32"], (a0, a1, a2, a3), (b0, b1), (c0, c1, c2, c3))


def emulate_bf16(a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, c0, c1, c2, c3):
    """``cnnfast_mma_bf16_m16n8k16`` of kernels/mma.cu, for one lane of a simulated warp."""
    return _emulate(SHAPES["bf16"], (a0, a1, a2, a3, a4, a5, a6, a7), (b0, b1, b2, b3),
                    (c0, c1, c2, c3))


@functools.lru_cache(maxsize=None)
def wrapper(precision: str):
    """What a kernel calls for one MMA: the linked CUDA C function on a GPU (declared once),
    its emulation in the simulator. Both return a 4-tuple of float32 (the lane's D)."""
    if cuda_simulated():
        return {"tf32": emulate_tf32, "bf16": emulate_bf16}[precision]
    from numba import cuda, types

    shape = SHAPES[precision]
    f32 = types.float32
    signature = types.UniTuple(f32, 4)(*([f32] * (shape.a + shape.b + 4)))
    return cuda.declare_device(shape.symbol, signature, link=[str(source("mma.cu"))])


# --- the warp-tiled slice multiply ---------------------------------------------------------------

def _noop() -> None:
    """The simulator's warp reconvergence: the emulation's barrier already gathers the lanes
    (and Numba's simulator has no ``syncwarp``)."""


def _converge():
    """``cuda.syncwarp()`` as an inlined device function on a GPU, a no-op in the simulator."""
    if cuda_simulated():
        return _noop
    from numba import cuda

    @cuda.jit(device=True, inline="always")
    def converge():
        cuda.syncwarp()

    return converge


# Shared-memory row pitch (mod 32 banks) that makes a warp's fragment reads conflict-free: the 32
# lanes read rows k0 + t (TF32) or k0 + 2t (BF16) at column base + g, so the pitch must spread
# t * pitch + g (2t * pitch + g) over the 32 banks.
_PAD = {"tf32": 8, "bf16": 4}


@functools.lru_cache(maxsize=None)
def warp_steps(tiles):
    """The tensor-core half of ``conv._gemm_steps``: (tile pad, accumulator shape, A and B
    fragment shapes, ``coords``, ``row_of``, ``col_of``, ``multiply_slice``).

    A thread's accumulators ``acc[i, j]`` hold output row ``row_of(u, i)`` and column
    ``col_of(v, j)`` of the block tile, where ``(u, v) = coords(t)``: the C fragment of MMA tile
    (i // 2, j // 2) of its warp, element (i % 2, j % 2) of the lane's 2 x 2.
    """
    from numba import cuda

    precision = tiles.precision
    mma = wrapper(precision)
    shape = SHAPES[precision]
    WM, WTM, WTN, BK = tiles.warps_m, tiles.warp_m, tiles.warp_n, tiles.block_k
    MI, NI = WTM // 16, WTN // 8  # MMA tiles per warp along M and N
    KSTEPS = BK // shape.k
    ACC = (2 * MI, 2 * NI)
    A_FRAG, B_FRAG = (MI, shape.a), (NI, shape.b)

    converge = _converge()

    @cuda.jit(device=True, inline="always")
    def coords(t):
        warp = t // WARP
        lane = t % WARP
        u = (warp % WM) * WTM + lane // 4  # this lane's first row: g of its warp's rows
        v = (warp // WM) * WTN + 2 * (lane % 4)  # and first column: 2t of its warp's columns
        return u, v

    @cuda.jit(device=True, inline="always")
    def row_of(u, i):
        return u + (i // 2) * 16 + (i % 2) * 8

    @cuda.jit(device=True, inline="always")
    def col_of(v, j):
        return v + (j // 2) * 8 + j % 2

    if precision == "tf32":
        @cuda.jit(device=True, inline="always")
        def multiply_slice(a_tile, b_tile, a_frag, b_frag, acc, u, v):
            # Lane (g, t): A rows u (= base + g) and u + 8 at k0 + t, k0 + t + 4; B column
            # base + g at k0 + t, k0 + t + 4 (the tables in fragment_layout).
            t = (v % 8) // 2
            bcol = v - 2 * t + u % 8
            converge()  # the gathers before may have diverged: mma.sync.aligned needs all 32
            for ks in range(KSTEPS):
                k0 = ks * 8 + t
                for mi in range(MI):
                    r = u + mi * 16
                    a_frag[mi, 0] = a_tile[k0, r]
                    a_frag[mi, 1] = a_tile[k0, r + 8]
                    a_frag[mi, 2] = a_tile[k0 + 4, r]
                    a_frag[mi, 3] = a_tile[k0 + 4, r + 8]
                for ni in range(NI):
                    b_frag[ni, 0] = b_tile[k0, bcol + ni * 8]
                    b_frag[ni, 1] = b_tile[k0 + 4, bcol + ni * 8]
                for mi in range(MI):
                    for ni in range(NI):
                        i, j = 2 * mi, 2 * ni
                        d = mma(a_frag[mi, 0], a_frag[mi, 1], a_frag[mi, 2], a_frag[mi, 3],
                                b_frag[ni, 0], b_frag[ni, 1],
                                acc[i, j], acc[i, j + 1], acc[i + 1, j], acc[i + 1, j + 1])
                        acc[i, j] = d[0]
                        acc[i, j + 1] = d[1]
                        acc[i + 1, j] = d[2]
                        acc[i + 1, j + 1] = d[3]
    else:
        @cuda.jit(device=True, inline="always")
        def multiply_slice(a_tile, b_tile, a_frag, b_frag, acc, u, v):
            # Lane (g, t): A rows u, u + 8 at k0 + 2t + e and k0 + 2t + 8 + e; B column
            # base + g at the same k (the tables in fragment_layout).
            t = (v % 8) // 2
            bcol = v - 2 * t + u % 8
            converge()
            for ks in range(KSTEPS):
                k0 = ks * 16 + 2 * t
                for mi in range(MI):
                    r = u + mi * 16
                    for e in range(2):
                        a_frag[mi, e] = a_tile[k0 + e, r]
                        a_frag[mi, 2 + e] = a_tile[k0 + e, r + 8]
                        a_frag[mi, 4 + e] = a_tile[k0 + 8 + e, r]
                        a_frag[mi, 6 + e] = a_tile[k0 + 8 + e, r + 8]
                for ni in range(NI):
                    for e in range(2):
                        b_frag[ni, e] = b_tile[k0 + e, bcol + ni * 8]
                        b_frag[ni, 2 + e] = b_tile[k0 + 8 + e, bcol + ni * 8]
                for mi in range(MI):
                    for ni in range(NI):
                        i, j = 2 * mi, 2 * ni
                        d = mma(a_frag[mi, 0], a_frag[mi, 1], a_frag[mi, 2], a_frag[mi, 3],
                                a_frag[mi, 4], a_frag[mi, 5], a_frag[mi, 6], a_frag[mi, 7],
                                b_frag[ni, 0], b_frag[ni, 1], b_frag[ni, 2], b_frag[ni, 3],
                                acc[i, j], acc[i, j + 1], acc[i + 1, j], acc[i + 1, j + 1])
                        acc[i, j] = d[0]
                        acc[i, j + 1] = d[1]
                        acc[i + 1, j] = d[2]
                        acc[i + 1, j + 1] = d[3]

    return _PAD[precision], ACC, A_FRAG, B_FRAG, coords, row_of, col_of, multiply_slice
