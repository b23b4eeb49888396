"""cnnfast's own float32 GEMM: a register-blocked vector FMA microkernel in LLVM IR.

Numba compiles a register tile written as Python loops to scalar FMAs (it gives LLVM no
``noalias``), far below the machine's rate. So the innermost loop is written here as LLVM vector
IR through :func:`numba.extending.intrinsic`: ``<16 x float>`` vectors, ``llvm.fma.v16f32``,
broadcasts of A, ``MR * NR / 16`` accumulators held in registers over the whole K loop. The
vector width is written once; LLVM splits a 16-wide vector into two AVX2 registers (or four
NEON ones), so the same IR compiles for every CPU. Only the tile changes with the target:

- AVX-512 (32 vector registers): MR x NR = 8 x 32, 16 accumulators;
- otherwise (AVX2, 16 registers): 6 x 16, 12 register-sized accumulators (6 of 16 lanes).

:func:`gemm` wraps it the way BLIS does (Goto's algorithm): B is packed in K-blocks of
``KC`` rows into NR-wide panels, A in ``MC``-row blocks into MR-high panels (both zero-padded to
whole tiles), and the microkernel runs over every (MR, NR) tile; an edge tile is computed into
a small buffer and its valid part copied out. Its order of additions depends only on the shapes,
so it gives the same bits on every run. It is a plain ``@njit`` function, callable on one thread
inside a kernel's ``prange`` loop, like ``np.dot``.

:func:`fma_ceiling` measures the machine's float32 FMA rate with the same vectors (a loop of
independent FMAs, no memory traffic): the ceiling every kernel's GFLOP/s is measured against.

:func:`flush_denormals` / :func:`restore_mxcsr`: x86 flush-to-zero and denormals-are-zero for the
calling thread (MXCSR), so that products of tiny numbers do not take the microcode slow path.
"""

from __future__ import annotations

import functools
import platform
import time

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, config, types
from numba.extending import intrinsic, overload

from cnnfast import config as settings  # numba's config is 'config' here

LANES = 16
_F32 = ir.FloatType()
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_VEC = ir.VectorType(_F32, LANES)


def target_features() -> str:
    """The CPU features Numba compiles for (NUMBA_CPU_FEATURES, else the host's)."""
    if config.CPU_FEATURES is not None:
        return config.CPU_FEATURES
    import llvmlite.binding as ll

    return ll.get_host_cpu_features().flatten()


def target_name() -> str:
    """The CPU Numba compiles for (NUMBA_CPU_NAME, else the host's)."""
    if config.CPU_NAME is not None:
        return config.CPU_NAME
    import llvmlite.binding as ll

    return ll.get_host_cpu_name()


def has_avx512() -> bool:
    return "+avx512f" in target_features().split(",")


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


# The register tile and the cache blocks. KC rows of an NR panel of B (32 KiB for 8 x 32) stay
# in L1 while the MR panels of an MC block of A (MC * KC * 4 = 256 KiB) stream from L2.
if has_avx512():
    MR, NR = 8, 32
else:
    MR, NR = 6, 16
KC = 256
MC = 32 * MR  # a multiple of MR: 256 rows for MR = 8, 192 for MR = 6
NC = 4096


def _data(context, builder, aty, value):
    return context.make_array(aty)(context, builder, value).data


def _broadcast(builder, scalar):
    undef = ir.Constant(_VEC, ir.Undefined)
    one = builder.insert_element(undef, scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(_I32, LANES),
                                                          [0] * LANES))


def _load_vec(builder, base, index):
    ptr = builder.bitcast(builder.gep(base, [index]), _VEC.as_pointer())
    return builder.load(ptr, align=4)


def _store_vec(builder, value, base, index):
    ptr = builder.bitcast(builder.gep(base, [index]), _VEC.as_pointer())
    builder.store(value, ptr, align=4)


def _fma(builder):
    fnty = ir.FunctionType(_VEC, [_VEC, _VEC, _VEC])
    return cgutils.get_or_insert_function(builder.module, fnty, "llvm.fma.v16f32")


def _check_f32(*arrays):
    for a in arrays:
        if not (isinstance(a, types.Array) and a.dtype == types.float32):
            raise TypeError(f"the microkernel takes float32 arrays, got {a}")


def _tile(builder, kc, a_scalar, b_vector, c_p, ldc, accumulate):
    """The register tile's IR: MR x NR/16 vector accumulators, kc rounds of NR/16 loads of B,
    MR broadcasts of A and MR * NR/16 FMAs, then the tile stored to (or added into) c_p with
    row stride ldc. ``a_scalar(p, r)`` and ``b_vector(p, j)`` give the operands' addresses."""
    nvec = NR // LANES
    fma = _fma(builder)
    zero = ir.Constant(_VEC, [0.0] * LANES)
    accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(nvec)] for _ in range(MR)]
    kc64 = builder.sext(kc, _I64) if kc.type.width < 64 else kc
    with cgutils.for_range(builder, kc64) as loop:
        p = loop.index
        bv = [builder.load(builder.bitcast(b_vector(p, j), _VEC.as_pointer()), align=4)
              for j in range(nvec)]
        for r in range(MR):
            av = _broadcast(builder, builder.load(a_scalar(p, r)))
            for j in range(nvec):
                acc = builder.load(accs[r][j])
                builder.store(builder.call(fma, [av, bv[j], acc]), accs[r][j])
    ldc64 = builder.sext(ldc, _I64) if ldc.type.width < 64 else ldc
    add = builder.icmp_signed("!=", accumulate, ir.Constant(accumulate.type, 0))
    for r in range(MR):
        row = builder.mul(ldc64, ir.Constant(_I64, r))
        for j in range(nvec):
            idx = builder.add(row, ir.Constant(_I64, j * LANES))
            total = builder.load(accs[r][j])
            with builder.if_then(add):
                old = _load_vec(builder, c_p, idx)
                _store_vec(builder, builder.fadd(old, total), c_p, idx)
            with builder.if_then(builder.not_(add)):
                _store_vec(builder, total, c_p, idx)


def _const(v):
    return ir.Constant(_I64, v)


def _i64(builder, v):
    return builder.sext(v, _I64) if v.type.width < 64 else v


def _pointers(context, builder, signature, args, *pairs):
    """``data + offset`` pointers for (array argument index, offset argument index) pairs."""
    return [builder.gep(_data(context, builder, signature.args[a], args[a]), [args[o]])
            for a, o in pairs]


def _packed(builder, base, width):
    """The address of element (p, i) of a packed panel of ``width`` (MR for A, NR for B)."""
    return lambda p, i: builder.gep(base, [builder.add(builder.mul(p, _const(width)),
                                                       _const(i))])


@intrinsic
def microkernel(typingctx, kc, a, aoff, b, boff, c, coff, ldc, accumulate):
    """c[coff + r * ldc + j] (+)= sum over p < kc of a[aoff + p * MR + r] * b[boff + p * NR + j]
    for r < MR, j < NR: one register tile. a, b: packed panels; c: a tile with row stride ldc;
    the sum replaces c's values, or is added to them when ``accumulate`` is non-zero."""
    _check_f32(a, b, c)
    sig = types.void(kc, a, aoff, b, boff, c, coff, ldc, accumulate)

    def codegen(context, builder, signature, args):
        a_p, b_p, c_p = _pointers(context, builder, signature, args, (1, 2), (3, 4), (5, 6))
        b_vec = _packed(builder, b_p, NR)
        _tile(builder, args[0], _packed(builder, a_p, MR),
              lambda p, j: b_vec(p, j * LANES), c_p, args[7], args[8])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def microkernel_b_rows(typingctx, kc, a, aoff, b, boff, rows, roff, c, coff, ldc, accumulate):
    """As :func:`microkernel` with B read in place: B[p, j] = b[boff + rows[roff + p] + j] (row
    p of B is a contiguous run of b at offset rows[roff + p]: a window of a padded image)."""
    _check_f32(a, b, c)
    sig = types.void(kc, a, aoff, b, boff, rows, roff, c, coff, ldc, accumulate)

    def codegen(context, builder, signature, args):
        a_p, b_p, rows_p, c_p = _pointers(context, builder, signature, args, (1, 2), (3, 4),
                                          (5, 6), (7, 8))

        def b_vector(p, j):
            start = _i64(builder, builder.load(builder.gep(rows_p, [p])))
            return builder.gep(b_p, [builder.add(start, _const(j * LANES))])

        _tile(builder, args[0], _packed(builder, a_p, MR), b_vector, c_p, args[9], args[10])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def microkernel_a_rows(typingctx, kc, a, aoff, rows, roff, b, boff, c, coff, ldc, accumulate):
    """As :func:`microkernel` with A read in place: A[r, p] = a[aoff + rows[roff + r] + p] (row
    r of A, over the reduction index p, is a contiguous run of a)."""
    _check_f32(a, b, c)
    sig = types.void(kc, a, aoff, rows, roff, b, boff, c, coff, ldc, accumulate)

    def codegen(context, builder, signature, args):
        a_p, rows_p, b_p, c_p = _pointers(context, builder, signature, args, (1, 2), (3, 4),
                                          (5, 6), (7, 8))
        starts = [builder.gep(a_p, [_i64(builder, builder.load(builder.gep(rows_p,
                                                                          [_const(r)])))])
                  for r in range(MR)]
        b_vec = _packed(builder, b_p, NR)
        _tile(builder, args[0], lambda p, r: builder.gep(starts[r], [p]),
              lambda p, j: b_vec(p, j * LANES), c_p, args[9], args[10])
        return context.get_dummy_value()

    return sig, codegen


# --- packing and the blocked product --------------------------------------------------------------

@njit(nogil=True, cache=True)
def pack_a(a):
    """a (M, K), any strides, as MR-row panels, panel-major: out[(q * K + p) * MR + r] =
    a[q * MR + r, p], zero rows past the edge. A K block p0..p0+kc of panel q is then the
    contiguous run from (q * K + p0) * MR that the microkernel reads."""
    M, K = a.shape
    panels = -(-M // MR)
    out = np.zeros(panels * K * MR, dtype=np.float32)
    for q in range(panels):
        rows = min(MR, M - q * MR)
        for r in range(rows):
            src = a[q * MR + r]
            base = q * K * MR + r
            for p in range(K):
                out[base + p * MR] = src[p]
    return out


@njit(nogil=True, cache=True)
def _pack_b(b, p0, kc, j0, nc, buf):
    """b[p0:p0+kc, j0:j0+nc] into NR-wide panels: buf[(panel * kc + p) * NR + j], zero columns
    past the edge."""
    panels = -(-nc // NR)
    for q in range(panels):
        base = q * kc * NR
        cols = min(NR, nc - q * NR)
        for p in range(kc):
            o = base + p * NR
            src = b[p0 + p, j0 + q * NR:j0 + q * NR + cols]
            for j in range(cols):
                buf[o + j] = src[j]
            for j in range(cols, NR):
                buf[o + j] = 0.0


@njit(nogil=True, cache=True)
def gemm(a, b, c, accumulate):
    """c (M, N) = a (M, K) @ b (K, N), or c += a @ b when ``accumulate``; float32, any strides
    for a and b, c with contiguous rows (any row stride). One thread."""
    gemm_packed(pack_a(a), a.shape[0], b, c, accumulate)


@njit(nogil=True, cache=True)
def gemm_packed(apack, M, b, c, accumulate):
    """:func:`gemm` with A already packed by :func:`pack_a` (M rows, K = b's rows): for a
    weight matrix multiplied into many column blocks, packed once."""
    K, N = b.shape
    if c.strides[1] != 4 and N > 1:
        raise ValueError("gemm: c's rows must be contiguous")
    ldc = c.strides[0] // 4
    if K == 0:
        if not accumulate:
            for i in range(M):
                for j in range(N):
                    c[i, j] = 0.0
        return
    nc_max = min(NC, -(-N // NR) * NR)
    bbuf = np.empty(KC * nc_max, dtype=np.float32)
    edge = np.empty(MR * NR, dtype=np.float32)
    for j0 in range(0, N, NC):
        nc = min(NC, N - j0)
        for p0 in range(0, K, KC):
            kc = min(KC, K - p0)
            acc = 1 if (accumulate or p0 > 0) else 0
            _pack_b(b, p0, kc, j0, nc, bbuf)
            for i0 in range(0, M, MC):
                mc = min(MC, M - i0)
                for jq in range(-(-nc // NR)):
                    cols = min(NR, nc - jq * NR)
                    for iq in range(-(-mc // MR)):
                        rows = min(MR, mc - iq * MR)
                        ri = i0 + iq * MR
                        cj = j0 + jq * NR
                        ci = ri * ldc + cj
                        aoff = ((i0 // MR + iq) * K + p0) * MR
                        if rows == MR and cols == NR:
                            microkernel(kc, apack, aoff, bbuf, jq * kc * NR, c, ci, ldc, acc)
                        else:
                            microkernel(kc, apack, aoff, bbuf, jq * kc * NR, edge, 0, NR, 0)
                            for r in range(rows):
                                for j in range(cols):
                                    if acc:
                                        c[ri + r, cj + j] += edge[r * NR + j]
                                    else:
                                        c[ri + r, cj + j] = edge[r * NR + j]


# --- the product the convolution kernels call -----------------------------------------------------

GEMM_CHOICES = ("auto", "own", "blas")


def set_gemm(choice: str) -> None:
    """Which matrix product the float32 CPU convolution runs: ``"own"`` (the microkernel, and
    the direct convolution that reads the input in place), ``"blas"`` (NumPy's BLAS on column
    matrices only) or ``"auto"`` (the default: the direct convolution where it applies; for the
    products on column matrices the microkernel, unless the BLAS runs AVX-512 kernels on an
    AVX-512 target (:func:`blas_has_avx512`): OpenBLAS's SkylakeX kernels reached 77-96% of
    the FMA ceiling on those shapes where the microkernel reached 56-91%, while with AVX2
    kernels (OPENBLAS_CORETYPE=Haswell) OpenBLAS stays under half of it; measured with
    benchmarks/cpu_engine.py). float64 always runs BLAS. The environment variable
    ``CNNFAST_CPU_GEMM`` sets the starting choice."""
    if choice not in GEMM_CHOICES:
        raise ValueError(f"gemm must be one of {GEMM_CHOICES}, got {choice!r}")
    settings.set_option("cpu_gemm", choice)


def get_gemm() -> str:
    return settings.get("cpu_gemm")


# OpenBLAS's kernel families with AVX-512 code (threadpoolctl's 'architecture'); MKL's too.
_AVX512_BLAS = ("skylakex", "cooperlake", "sapphirerapids")


@functools.lru_cache(maxsize=1)
def blas_has_avx512() -> bool:
    """Whether the BLAS that NumPy and Numba's np.dot call runs AVX-512 kernels here."""
    if not has_avx512():
        return False
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return False
    for info in threadpool_info():
        if info.get("user_api") == "blas":
            arch = str(info.get("architecture") or "").lower()
            if info.get("internal_api") == "mkl" or arch in _AVX512_BLAS:
                return True
    return False


def use_direct(dtype) -> bool:
    """Whether a float32 convolution may run the direct path (the microkernel on the input in
    place) where its shape suits it."""
    return np.dtype(dtype) == np.float32 and get_gemm() != "blas"


def use_own(dtype) -> bool:
    """Whether a product on column matrices of ``dtype`` runs :func:`gemm` (else BLAS)."""
    if np.dtype(dtype) != np.float32:
        return False
    choice = get_gemm()
    return choice == "own" or (choice == "auto" and not blas_has_avx512())


def matmul(a, b, out, own):
    """out = a @ b inside a Numba kernel: :func:`gemm` when ``own`` and the arrays are float32,
    else ``np.dot`` (BLAS). Callable from jitted code only."""
    raise NotImplementedError("matmul is called from Numba-compiled kernels")


@overload(matmul, jit_options={"nogil": True})
def _matmul_impl(a, b, out, own):
    if all(isinstance(t, types.Array) and t.dtype == types.float32 for t in (a, b, out)):
        def impl(a, b, out, own):
            if own:
                gemm(a, b, out, False)
            else:
                np.dot(a, b, out)
        return impl

    def impl_blas(a, b, out, own):
        np.dot(a, b, out)
    return impl_blas


def matmul_packed(a, apack, b, out, own):
    """out = a @ b inside a Numba kernel, as :func:`matmul`, with ``apack`` = :func:`pack_a`
    of a (used when the microkernel runs; a float64 call, or ``own`` false, runs BLAS on a)."""
    raise NotImplementedError("matmul_packed is called from Numba-compiled kernels")


@overload(matmul_packed, jit_options={"nogil": True})
def _matmul_packed_impl(a, apack, b, out, own):
    if all(isinstance(t, types.Array) and t.dtype == types.float32 for t in (a, b, out)):
        def impl(a, apack, b, out, own):
            if own:
                gemm_packed(apack, a.shape[0], b, out, False)
            else:
                np.dot(a, b, out)
        return impl

    def impl_blas(a, apack, b, out, own):
        np.dot(a, b, out)
    return impl_blas


def pack_groups(w2: np.ndarray, groups: int, own: bool, transposed: bool = False) -> np.ndarray:
    """Each group's rows of w2 (K, taps), or their transpose, packed by :func:`pack_a`, one row
    per group, for the kernels' :func:`matmul_packed` (a placeholder when the microkernel does
    not run)."""
    if not own:
        return np.zeros((groups, 1), dtype=np.float32)
    rows = w2.shape[0] // groups
    blocks = [w2[g * rows:(g + 1) * rows] for g in range(groups)]
    return np.stack([pack_a(b.T if transposed else b) for b in blocks])


# --- flush-to-zero / denormals-are-zero -----------------------------------------------------------

_FTZ_DAZ = 0x8040  # MXCSR bits 15 (flush to zero) and 6 (denormals are zero)


def _mxcsr_fn(builder, name):
    fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer()])
    return cgutils.get_or_insert_function(builder.module, fnty, name)


@intrinsic
def flush_denormals(typingctx):
    """Turns on flush-to-zero and denormals-are-zero for the calling thread and returns the
    previous MXCSR (0 and nothing done off x86), to be handed to :func:`restore_mxcsr`."""
    sig = types.int64()

    def codegen(context, builder, signature, args):
        if not is_x86():
            return ir.Constant(_I64, 0)
        slot = cgutils.alloca_once(builder, _I32)
        raw = builder.bitcast(slot, ir.IntType(8).as_pointer())
        builder.call(_mxcsr_fn(builder, "llvm.x86.sse.stmxcsr"), [raw])
        old = builder.load(slot)
        builder.store(builder.or_(old, ir.Constant(_I32, _FTZ_DAZ)), slot)
        builder.call(_mxcsr_fn(builder, "llvm.x86.sse.ldmxcsr"), [raw])
        return builder.zext(old, _I64)

    return sig, codegen


@intrinsic
def restore_mxcsr(typingctx, old):
    """Puts back the MXCSR that :func:`flush_denormals` returned."""
    sig = types.void(old)

    def codegen(context, builder, signature, args):
        if is_x86():
            slot = cgutils.alloca_once(builder, _I32)
            builder.store(builder.trunc(args[0], _I32), slot)
            raw = builder.bitcast(slot, ir.IntType(8).as_pointer())
            builder.call(_mxcsr_fn(builder, "llvm.x86.sse.ldmxcsr"), [raw])
        return context.get_dummy_value()

    return sig, codegen




def set_flush_denormals(on: bool) -> None:
    """Whether the CPU convolution kernels run with flush-to-zero and denormals-are-zero (the
    default; ``CNNFAST_CPU_FLUSH_DENORMALS=0`` turns it off): numbers below float32's smallest
    normal (1.2e-38) count as 0, so a layer fed tiny values runs at its usual speed."""
    settings.set_option("cpu_flush_denormals", bool(on))


def get_flush_denormals() -> bool:
    return settings.get("cpu_flush_denormals")


@njit(nogil=True, cache=True, inline="always")
def enter_flush(flush):
    """At the start of a kernel's task: flush-to-zero on when ``flush``; the state to restore."""
    if flush:
        return flush_denormals()
    return -1


@njit(nogil=True, cache=True, inline="always")
def leave_flush(state):
    """At the end of the task: the thread's MXCSR as it was before :func:`enter_flush`."""
    if state >= 0:
        restore_mxcsr(state)


# --- the machine's FMA ceiling --------------------------------------------------------------------

# Independent accumulators of 16 lanes in the ceiling loop: enough to cover the FMA latency
# times the pipes on current CPUs (4 cycles x 2 pipes), few enough to stay in registers.
_CEILING_ACCS = 12 if has_avx512() else 6


@intrinsic
def _fma_loop(typingctx, iterations, seed):
    """Runs ``iterations`` rounds of _CEILING_ACCS independent vector FMAs (acc = acc * m + s)
    and returns the lanes' sum (so nothing is optimised away)."""
    sig = types.float32(iterations, seed)

    def codegen(context, builder, signature, args):
        n, s = args
        fma = _fma(builder)
        sv = _broadcast(builder, s)
        mv = _broadcast(builder, ir.Constant(_F32, 0.999999))
        accs = [cgutils.alloca_once_value(builder, _broadcast(builder, builder.fadd(
            s, ir.Constant(_F32, float(i))))) for i in range(_CEILING_ACCS)]
        with cgutils.for_range(builder, n):
            for acc in accs:
                builder.store(builder.call(fma, [builder.load(acc), mv, sv]), acc)
        total = builder.load(accs[0])
        for acc in accs[1:]:
            total = builder.fadd(total, builder.load(acc))
        out = builder.extract_element(total, ir.Constant(_I32, 0))
        for i in range(1, LANES):
            out = builder.fadd(out, builder.extract_element(total, ir.Constant(_I32, i)))
        return out

    return sig, codegen


@njit(nogil=True, cache=True)
def _fma_serial(iterations, seed):
    return _fma_loop(iterations, seed)


@njit(parallel=True, cache=True)
def _fma_parallel(threads, iterations, seed):
    out = np.zeros(threads, dtype=np.float32)
    for t in prange(threads):
        out[t] = _fma_loop(iterations, seed + np.float32(t))
    return out


def fma_flops(iterations: int) -> int:
    """Floating-point operations of one :func:`_fma_loop` run."""
    return 2 * LANES * _CEILING_ACCS * iterations


@functools.lru_cache(maxsize=4)
def fma_ceiling(threads: int = 1, seconds: float = 0.2, repeats: int = 5) -> float:
    """The float32 FMA rate in GFLOP/s on ``threads`` threads (one loop per thread, Numba's
    pool), best of ``repeats`` runs of about ``seconds`` each."""
    seed = np.float32(1.0)
    _fma_serial(np.int64(1000), seed)
    if threads > 1:
        _fma_parallel(threads, np.int64(1000), seed)
    iterations = 1 << 16
    while True:
        t0 = time.perf_counter()
        _run(threads, iterations, seed)
        dt = time.perf_counter() - t0
        if dt >= seconds / 4 or iterations >= 1 << 34:
            break
        iterations *= 4
    iterations = max(1, int(iterations * seconds / max(dt, 1e-9)))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        _run(threads, iterations, seed)
        best = min(best, time.perf_counter() - t0)
    return threads * fma_flops(iterations) / best / 1e9


def _run(threads: int, iterations: int, seed) -> None:
    if threads > 1:
        _fma_parallel(threads, np.int64(iterations), seed)
    else:
        _fma_serial(np.int64(iterations), seed)
