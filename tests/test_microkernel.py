"""cnnfast's own float32 GEMM (cnnfast.cpu._microkernel) against float64 NumPy products, the
convolution on either product (own microkernel, BLAS) against the reference, flush-to-zero,
and the same IR compiled for an AVX2 target."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from cases import ConvCase, conv_all, make_array

from cnnfast import config as settings
from cnnfast.cpu import _microkernel as mk
from cnnfast.cpu import conv
from cnnfast.reference import conv as ref_conv
from cnnfast.testing import assert_close

# Edges of every blocking level: 1, a register tile +-1, a K block +-1, an A block + 1.
SHAPES = [(1, 1, 1), (mk.MR - 1, 3, mk.NR + 1), (mk.MR + 1, mk.KC + 1, mk.NR - 1),
          (2 * mk.MR, mk.KC - 1, 2 * mk.NR), (mk.MC + 3, 17, 5), (3, 2 * mk.KC + 5, 70),
          (17, 0, 9)]


def _check_product(a, b, accumulate, rng):
    m, n = a.shape[0], b.shape[1]
    c = rng.standard_normal((m, n)).astype(np.float32)
    expected = a.astype(np.float64) @ b.astype(np.float64)
    if accumulate:
        expected += c
    mk.gemm(a, b, c, accumulate)
    scale = np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64) + 1.0
    assert np.all(np.abs(c - expected) <= 1e-5 * scale), np.abs(c - expected).max()


@pytest.mark.parametrize("accumulate", [False, True], ids=["store", "accumulate"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n in SHAPES])
def test_gemm_matches_float64_product(shape, accumulate, rng):
    m, k, n = shape
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    _check_product(a, b, accumulate, rng)


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_gemm_strided_operands(layout, rng):
    a = make_array(rng, (13, 40), np.float32, layout)
    b = make_array(rng, (40, 37), np.float32, layout)
    _check_product(a, b, False, rng)
    c_rows = np.zeros((13, 64), dtype=np.float32)
    mk.gemm(a, b, c_rows[:, :37], False)  # a C whose rows are spaced
    assert_close(c_rows[:, :37], a.astype(np.float64) @ b, rtol=1e-5, atol=1e-4)
    assert not c_rows[:, 37:].any()


def test_gemm_same_bits_every_run(rng):
    a = rng.standard_normal((50, 600)).astype(np.float32)
    b = rng.standard_normal((600, 90)).astype(np.float32)
    c1, c2 = np.empty((50, 90), np.float32), np.empty((50, 90), np.float32)
    mk.gemm(a, b, c1, False)
    mk.gemm(a, b, c2, False)
    assert np.array_equal(c1, c2)


def test_gemm_and_flush_choices_are_checked(monkeypatch):
    with pytest.raises(ValueError, match="gemm must be one of"):
        mk.set_gemm("mkl")
    monkeypatch.setenv("CNNFAST_CPU_GEMM", "fast")
    with pytest.raises(ValueError, match="CNNFAST_CPU_GEMM"):
        mk.use_own(np.float32)
    monkeypatch.setenv("CNNFAST_CPU_FLUSH_DENORMALS", "maybe")
    with pytest.raises(ValueError, match="CNNFAST_CPU_FLUSH_DENORMALS"):
        mk.get_flush_denormals()
    monkeypatch.setenv("CNNFAST_CPU_FLUSH_DENORMALS", "0")
    assert not mk.get_flush_denormals()
    assert not mk.use_own(np.float64)


@pytest.fixture(params=["own", "blas"])
def gemm_choice(request):
    with settings.using_config(cpu_gemm=request.param):
        yield request.param


CASES = {
    "2d-17ch-stride2-pad": ConvCase((2, 17, 9, 8), (19, 17, 3, 3), (2, 2), (1, 1), (1, 1), 1),
    "2d-3ch-winograd": ConvCase((2, 3, 12, 11), (9, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1),
    "2d-1x1-pointwise": ConvCase((2, 6, 16, 17), (5, 6, 1, 1), (1, 1), (0, 0), (1, 1), 1),
    "2d-one-pixel-kernel-larger": ConvCase((3, 5, 1, 1), (7, 5, 3, 3), (1, 1), (1, 1), (1, 1), 1),
    "2d-groups-dilation": ConvCase((2, 8, 9, 7), (6, 4, 3, 3), (1, 1), (2, 2), (2, 2), 2),
    "3d-stride2": ConvCase((1, 4, 5, 6, 7), (9, 4, 3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1), 1),
}


@pytest.mark.parametrize("case_id", list(CASES))
def test_conv_on_either_product_matches_reference(case_id, gemm_choice, monkeypatch):
    monkeypatch.setattr(conv, "WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(conv, "WINOGRAD_WEIGHT_MIN_CHANNELS", 1)
    case = CASES[case_id]
    rng = np.random.default_rng(5)
    x = make_array(rng, case.x_shape, np.float32)
    w = make_array(rng, case.w_shape, np.float32)
    y = ref_conv.conv_forward(x, w, *case.args)
    gy = make_array(rng, y.shape, np.float32)
    _assert_conv_matches(conv_all(conv, case, x, w, gy), conv_all(ref_conv, case, x, w, gy))


def _assert_conv_matches(got, expected):
    for name, a, e in zip(("y", "gx", "gw"), got, expected):
        assert a.dtype == np.float32 and a.shape == e.shape, name
        assert_close(a, e, rtol=1e-4, atol=1e-4, name=name)


DIRECT_CASES = {
    "2d-1ch": ConvCase((2, 1, 9, 8), (4, 1, 3, 3), (1, 1), (1, 1), (1, 1), 1),
    "2d-3ch-rect": ConvCase((1, 3, 7, 11), (5, 3, 3, 2), (1, 1), (1, 0), (1, 1), 1),
    "2d-17ch-dilation": ConvCase((2, 17, 9, 10), (19, 17, 3, 3), (1, 1), (2, 1), (2, 1), 1),
    "2d-one-pixel": ConvCase((3, 5, 1, 1), (7, 5, 3, 3), (1, 1), (1, 1), (1, 1), 1),
    "2d-kernel-larger-than-input": ConvCase((2, 4, 2, 3), (3, 4, 5, 5), (1, 1), (2, 2), (1, 1), 1),
    "2d-1x1": ConvCase((2, 6, 5, 4), (9, 6, 1, 1), (1, 1), (0, 0), (1, 1), 1),
    "2d-wide-k": ConvCase((1, 40, 6, 7), (70, 40, 3, 3), (1, 1), (1, 1), (1, 1), 1),
    "3d": ConvCase((2, 3, 5, 4, 6), (9, 3, 3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), 1),
    "3d-dilation-pad": ConvCase((1, 4, 6, 5, 5), (3, 4, 2, 3, 3), (1, 1, 1), (0, 2, 1),
                                (2, 2, 1), 1),
    "2d-stride2-17ch": ConvCase((2, 17, 9, 8), (19, 17, 3, 3), (2, 2), (1, 1), (1, 1), 1),
    "2d-stride2-1x1": ConvCase((1, 6, 7, 8), (5, 6, 1, 1), (2, 2), (0, 0), (1, 1), 1),
    "2d-stride-mixed-dilation": ConvCase((1, 3, 11, 9), (4, 3, 3, 2), (3, 1), (2, 1), (2, 3), 1),
    "2d-stride2-one-pixel": ConvCase((2, 3, 1, 1), (4, 3, 3, 3), (2, 2), (1, 1), (1, 1), 1),
    "3d-stride2": ConvCase((1, 4, 5, 6, 7), (9, 4, 3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1), 1),
}


@pytest.mark.parametrize("tiny_tiles", [False, True], ids=["tasks", "many-tasks"])
@pytest.mark.parametrize("case_id", list(DIRECT_CASES))
def test_direct_convolution_matches_reference(case_id, tiny_tiles, monkeypatch):
    """The direct path (input read in place), forced on every shape; with a tiny
    tile budget a slice is cut into many tasks (column runs, filter panels)."""
    from cnnfast.cpu import _direct

    monkeypatch.setattr(conv, "DIRECT_MIN_EFFICIENCY", 0.0)
    if tiny_tiles:
        monkeypatch.setattr(_direct, "TILE_BUDGET", 1)
    case = DIRECT_CASES[case_id]
    rng = np.random.default_rng(9)
    x = make_array(rng, case.x_shape, np.float32, "sliced")
    w = make_array(rng, case.w_shape, np.float32)
    y = ref_conv.conv_forward(x, w, *case.args)
    gy = make_array(rng, y.shape, np.float32)
    geo = conv._geometry(case.x_shape, case.w_shape, *case.args)
    # the kernels themselves, then the convolution's choice of them
    x5 = np.ascontiguousarray(np.asarray(x).reshape((geo.N, geo.C) + geo.size))
    w5 = w.reshape((geo.K, geo.C) + geo.ks)
    y5 = np.empty((geo.N, geo.K) + geo.out, dtype=np.float32)
    _direct.forward(x5, w5, geo.st, geo.pd, geo.dl, 2, True, y5)
    assert_close(y5.reshape(y.shape), y, rtol=1e-4, atol=1e-4, name="direct y")
    gw = _direct.backward_weight(gy.reshape(y5.shape), x5, geo.ks, geo.st, geo.pd, geo.dl, 2,
                                 True)
    assert_close(gw.reshape(w.shape), ref_conv.conv_backward_weight(gy, x, case.w_shape,
                                                                    *case.args),
                 rtol=1e-4, atol=1e-4, name="direct gw")
    assert geo.direct_gemm(np.float32) == (geo.st == (1, 1, 1))
    got = conv_all(conv, case, x, w, gy)
    _assert_conv_matches(got, conv_all(ref_conv, case, x, w, gy))
    again = (conv.conv_forward(x, w, *case.args),
             conv.conv_backward_weight(gy, x, case.w_shape, *case.args))
    assert all(np.array_equal(a, b) for a, b in zip(again, (got[0], got[2])))


def test_direct_tasks_split_batch_one_across_threads():
    from cnnfast.cpu import _direct

    tasks = _direct.forward_tasks(1, 1, col_tiles=25, panels=8, threads=2)
    assert len(tasks) >= 4
    # every (column tile, filter panel) pair is covered exactly once
    cover = np.zeros((25, 8), dtype=int)
    for n, od, t0, t1, q0, q1 in tasks:
        cover[t0:t1, q0:q1] += 1
    assert (cover == 1).all()
    one_tile = _direct.forward_tasks(1, 1, col_tiles=1, panels=8, threads=2)
    assert len(one_tile) >= 4 and set(one_tile[:, 2]) == {0}


@pytest.mark.skipif(not mk.is_x86(), reason="MXCSR is x86's")
def test_flush_to_zero_drops_denormal_inputs_and_restores_the_thread():
    """With flushing on (the default), a denormal input counts as 0 (DAZ) and products that
    underflow come out 0 (FTZ); off, they are kept. The calling thread's MXCSR comes back."""
    tiny = np.float32(1e-39)  # a float32 denormal
    case = ConvCase((1, 2, 6, 5), (3, 2, 3, 3), (1, 1), (1, 1), (1, 1), 1)
    rng = np.random.default_rng(2)
    x = rng.standard_normal(case.x_shape).astype(np.float32)
    w = rng.standard_normal(case.w_shape).astype(np.float32)
    x_denormal = x.copy()
    x_denormal[0, 0] = 0
    x_denormal[0, 1] = tiny  # outputs of about 1e-39: denormal themselves
    saved = mk.get_flush_denormals()
    try:
        mk.set_flush_denormals(True)
        flushed = conv.conv_forward(x_denormal, w, *case.args)
        assert not flushed.any()
        mk.set_flush_denormals(False)
        kept = conv.conv_forward(x_denormal, w, *case.args)
        assert np.count_nonzero(kept) == kept.size
        assert_close(kept, ref_conv.conv_forward(x_denormal.astype(np.float64), w, *case.args),
                     rtol=1e-3, atol=1e-43)
    finally:
        mk.set_flush_denormals(saved)
    # Python's own float arithmetic on this thread still has denormals.
    assert np.float32(1e-30) * np.float32(1e-9) != 0


_AVX2_SCRIPT = r"""
import json
import numpy as np
from cnnfast import config as settings
from cnnfast.cpu import _microkernel as mk
rng = np.random.default_rng(0)
a = rng.standard_normal((13, 300)).astype(np.float32)
b = rng.standard_normal((300, 45)).astype(np.float32)
c = np.empty((13, 45), np.float32)
mk.gemm(a, b, c, False)
err = float(np.abs(c - a.astype(np.float64) @ b).max())
asm = "".join(mk.gemm.inspect_asm().values())
print(json.dumps({"tile": [mk.MR, mk.NR], "err": err, "zmm": "zmm" in asm,
                  "ymm_fma": "vfmadd231ps\t%ymm" in asm or "ymm" in asm}))
"""

HASWELL_FEATURES = ("+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+cx8,+f16c,+fma,+fxsr,+lzcnt,"
                    "+mmx,+movbe,+popcnt,+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave")


@pytest.mark.skipif(not mk.is_x86(), reason="an x86 AVX2 target")
def test_microkernel_compiles_and_runs_for_avx2(tmp_path):
    """The same vector IR for an AVX2 CPU (Haswell): the 16-lane vectors split into ymm
    registers, no AVX-512 instruction, the right product."""
    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES=HASWELL_FEATURES,
               NUMBA_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", _AVX2_SCRIPT], env=env, check=True,
                         capture_output=True, text=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["tile"] == [6, 16]
    assert got["err"] < 1e-3
    assert not got["zmm"] and got["ymm_fma"]


def test_fma_ceiling_is_measured():
    rate = mk.fma_ceiling.__wrapped__(1, seconds=0.01, repeats=1)
    assert np.isfinite(rate) and rate > 0.1
    assert mk.fma_flops(10) == 2 * mk.LANES * mk._CEILING_ACCS * 10


def test_small_float32_calls_run_the_serial_build(monkeypatch):
    from cnnfast.cpu import _parallel

    kernel = _parallel.ParallelKernel(lambda x, out: None)
    calls = []
    monkeypatch.setattr(kernel, "parallel", lambda *a: calls.append("parallel"))
    monkeypatch.setattr(kernel, "serial", lambda *a: calls.append("serial"))
    small = np.zeros(_parallel.PARALLEL_MIN_ELEMENTS - 1, dtype=np.float32)
    large = np.zeros(_parallel.PARALLEL_MIN_ELEMENTS, dtype=np.float32)
    kernel(small, small)
    kernel(small, large)
    kernel(large.astype(np.float64), large)
    assert calls == ["serial", "parallel", "serial"]


@pytest.mark.parametrize("avx512_blas", [False, True])
def test_auto_picks_the_product_by_the_blas_kernels(monkeypatch, avx512_blas):
    """auto: the direct path either way; column-matrix products on the microkernel unless the
    BLAS has AVX-512 kernels, and then Winograd on BLAS first for small 3x3 layers."""
    monkeypatch.setattr(mk, "blas_has_avx512", lambda: avx512_blas)
    monkeypatch.setattr(conv, "blas_has_avx512", lambda: avx512_blas)
    with settings.using_config(cpu_gemm="auto"):
        assert mk.use_direct(np.float32) and not mk.use_direct(np.float64)
        assert mk.use_own(np.float32) == (not avx512_blas)
        small = conv._geometry((2, 16, 14, 14), (16, 16, 3, 3), (1, 1), (1, 1), (1, 1), 1)
        large = conv._geometry((2, 16, 64, 64), (16, 16, 3, 3), (1, 1), (1, 1), (1, 1), 1)
        assert small.winograd_first(np.float32) == avx512_blas
        assert not large.winograd_first(np.float32) and large.direct_gemm(np.float32)
    with settings.using_config(cpu_gemm="blas"):
        assert not mk.use_direct(np.float32) and not mk.use_own(np.float32)
    with settings.using_config(cpu_gemm="own"):
        assert mk.use_own(np.float32) and not small.winograd_first(np.float32)
