"""The CUDA kernels (cnnfast.cuda) against the NumPy reference kernels (cnnfast.reference).

Without a GPU they run in Numba's CUDA simulator on NumPy arrays (one Python thread per CUDA
thread), so the shapes are tiny and most tests use the small tile configuration; the default
(GPU) configuration is checked on tiny shapes too. Tests marked ``gpu`` use real sizes and run
only where CuPy sees a device.
"""

from __future__ import annotations

import os

from cases import ConvCase, PoolCase

from cnnfast import dispatch

if not dispatch.gpu_present():
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cnnfast.cuda import _runtime as rt  # noqa: E402
from cnnfast.cuda import activation, conv, norm, pool  # noqa: E402
from cnnfast.reference import activation as ref_activation  # noqa: E402
from cnnfast.reference import conv as ref_conv  # noqa: E402
from cnnfast.reference import norm as ref_norm  # noqa: E402
from cnnfast.reference import pool as ref_pool  # noqa: E402
from cnnfast.testing import assert_close, to_numpy  # noqa: E402

ON_GPU = dispatch.gpu_present() and not dispatch.cuda_simulated()
DTYPES = pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])


def dev(a):
    """A host array on the kernels' device: CuPy on a GPU, NumPy in the simulator."""
    if ON_GPU:
        import cupy

        return cupy.asarray(a)
    return np.asarray(a)


def assert_same_bits(a, b, name: str) -> None:
    a, b = to_numpy(a), to_numpy(b)
    assert a.dtype == b.dtype and a.shape == b.shape, name
    assert a.tobytes() == b.tobytes(), f"{name}: two runs differ in their bits"


def randn(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


# --- convolution ----------------------------------------------------------------------------

# With SMALL_TILES (8 x 8 tiles, 4-deep slices) these cover partial row and column tiles, several
# column tiles per group, reductions that are not a multiple of 4, and split backward weight.
CONV_CASES = {
    "2d-plain": ConvCase((2, 3, 5, 6), (4, 3, 3, 3), (1, 1), (0, 0), (1, 1), 1),
    "2d-batch1-stride2-pad1-nonsquare": ConvCase((1, 3, 7, 5), (4, 3, 3, 2), (2, 1), (1, 1),
                                                 (1, 1), 1),
    "2d-dilation2-pad": ConvCase((2, 2, 7, 6), (3, 2, 3, 3), (1, 1), (2, 1), (2, 2), 1),
    "2d-groups2-stride2-two-col-tiles": ConvCase((1, 4, 6, 5), (18, 2, 3, 3), (2, 2), (1, 0),
                                                 (1, 1), 2),
    "2d-depthwise": ConvCase((2, 3, 5, 5), (3, 1, 3, 3), (1, 1), (1, 1), (1, 1), 3),
    "2d-1x1-stride3-unreached-inputs": ConvCase((1, 3, 7, 8), (2, 3, 1, 1), (3, 3), (0, 0),
                                                (1, 1), 1),
    "2d-stride-gt-kernel": ConvCase((1, 2, 8, 7), (2, 2, 2, 2), (3, 3), (1, 1), (1, 1), 1),
    "3d-plain": ConvCase((1, 2, 4, 5, 3), (3, 2, 2, 3, 2), (1, 1, 1), (0, 0, 0), (1, 1, 1), 1),
    "3d-stride-pad-dil-groups2": ConvCase((2, 4, 4, 5, 4), (4, 2, 3, 2, 2), (2, 1, 2), (1, 0, 1),
                                          (1, 2, 1), 2),
    # backward data's stride phases: dilation 2 at stride 2 leaves whole phases without a tap
    # (their gradient is 0), and a depth of 1 at stride 2 leaves a phase without positions
    "2d-stride2-dilation2-tapless-phases": ConvCase((1, 2, 7, 6), (3, 2, 3, 2), (2, 2), (1, 2),
                                                    (2, 2), 1),
    "3d-depth1-stride2": ConvCase((2, 2, 1, 5, 4), (2, 2, 1, 3, 3), (2, 2, 2), (0, 1, 1),
                                  (1, 1, 1), 1),
}
FLOAT64_CASES = ["2d-batch1-stride2-pad1-nonsquare", "3d-stride-pad-dil-groups2"]


def _conv_check(case: ConvCase, dtype, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    x = randn(rng, case.x_shape, dtype)
    w = randn(rng, case.w_shape, dtype)
    y_ref = ref_conv.conv_forward(x, w, *case.args)
    gy = randn(rng, y_ref.shape, dtype)
    y = conv.conv_forward(dev(x), dev(w), *case.args)
    assert y.dtype == dtype
    assert_close(y, y_ref, name="conv_forward")
    gx = conv.conv_backward_data(dev(gy), dev(w), x.shape, *case.args)
    assert_close(gx, ref_conv.conv_backward_data(gy, w, x.shape, *case.args),
                 name="conv_backward_data")
    gw = conv.conv_backward_weight(dev(gy), dev(x), w.shape, *case.args)
    assert_close(gw, ref_conv.conv_backward_weight(gy, x, w.shape, *case.args),
                 name="conv_backward_weight")
    assert gx.dtype == dtype and gw.dtype == dtype


@pytest.mark.parametrize("case_id", list(CONV_CASES))
def test_backward_data_phases_list_exactly_the_taps_that_reach(case_id):
    """Each stride phase's taps, against brute force: input d meets output od through tap kd
    when od * SD + kd * DD == d + PD; the phases cover every input position once."""
    case = CONV_CASES[case_id]
    geo = conv._geometry(case.x_shape, case.w_shape, *case.args)
    axes = ((geo.D, geo.KD, geo.SD, geo.PD, geo.DD, geo.OD), (geo.H, geo.KH, geo.SH, geo.PH,
            geo.DH, geo.OH), (geo.W, geo.KW, geo.SW, geo.PW, geo.DW, geo.OW))
    phases = conv._stride_phases(geo)
    assert len(phases) == geo.SD * geo.SH * geo.SW
    covered = []
    for phase in phases:
        for (first, count, taps), (size, ks, st, pad, dil, out) in zip(phase, axes):
            positions = range(first, size, st)
            assert count == len(positions)
            for d in positions:
                reach = {(k, (d + pad - k * dil) // st) for k in range(ks)
                         if (d + pad - k * dil) % st == 0}
                assert {(k, (d - first) // st + off) for k, off in taps} == reach
        covered.append(tuple(tuple(range(f, axis[0], axis[2])) for (f, _, _), axis
                             in zip(phase, axes)))
    for axis_index, axis in enumerate(axes):
        seen = sorted({d for c in covered for d in c[axis_index]})
        assert seen == list(range(axis[0]))


@pytest.mark.parametrize("case_id", list(CONV_CASES))
def test_conv_matches_reference_float32(case_id):
    _conv_check(CONV_CASES[case_id], np.float32)


@pytest.mark.parametrize("case_id", FLOAT64_CASES)
def test_conv_matches_reference_float64(case_id):
    _conv_check(CONV_CASES[case_id], np.float64)


def test_conv_default_tiles_on_a_tiny_shape():
    """The GPU configuration (64 x 64 tiles, 256 threads, 4 x 4 micro-tiles) itself."""
    with rt.launch_config(tiles=rt.GPU_TILES, threads=256):
        _conv_check(ConvCase((1, 2, 5, 4), (3, 2, 3, 2), (1, 1), (1, 0), (1, 1), 1), np.float32)


def test_conv_backward_weight_splits_its_reduction():
    """Small tiles and a long reduction take the two-pass split path; one tile stays whole."""
    tiles = rt.SMALL_TILES
    assert conv._weight_splits(60, 1, tiles.block_k) == 2
    assert conv._weight_splits(4096, 1, tiles.block_k) == 128
    assert conv._weight_splits(10, 1, tiles.block_k) == 1
    assert conv._weight_splits(10**9, 10**6, tiles.block_k) == 1


@pytest.mark.parametrize("case_id", ["2d-dilation2-pad", "3d-stride-pad-dil-groups2"])
def test_conv_backward_is_bitwise_deterministic(case_id):
    case = CONV_CASES[case_id]
    rng = np.random.default_rng(1)
    x, w = dev(randn(rng, case.x_shape, np.float32)), dev(randn(rng, case.w_shape, np.float32))
    gy = dev(randn(rng, ref_conv.conv_forward(to_numpy(x), to_numpy(w), *case.args).shape,
                   np.float32))
    for name, run in [
        ("backward data", lambda: conv.conv_backward_data(gy, w, case.x_shape, *case.args)),
        ("backward weight", lambda: conv.conv_backward_weight(gy, x, case.w_shape, *case.args)),
        ("bias grad", lambda: conv.bias_grad(gy)),
    ]:
        assert_same_bits(run(), run(), name)


def test_conv_accepts_non_contiguous_inputs():
    rng = np.random.default_rng(2)
    x = randn(rng, (2, 3, 6, 5), np.float32).transpose(0, 1, 3, 2)  # (2, 3, 5, 6), strided
    w = randn(rng, (4, 3, 3, 3), np.float32)[:, :, ::-1]
    args = ((1, 2), (1, 0), (1, 1), 1)
    assert_close(conv.conv_forward(dev(x), dev(w), *args), ref_conv.conv_forward(x, w, *args))


@DTYPES
def test_bias_add_and_grad(dtype):
    rng = np.random.default_rng(3)
    for shape in [(2, 5, 3, 4), (1, 3, 2, 3, 4)]:
        y, b = randn(rng, shape, dtype), randn(rng, shape[1], dtype)
        out = conv.bias_add(dev(y), dev(b))
        assert out.dtype == dtype
        assert_close(out, ref_conv.bias_add(y, b), name="bias_add")
        gb = conv.bias_grad(dev(y))
        assert gb.dtype == dtype and gb.shape == (shape[1],)
        assert_close(gb, ref_conv.bias_grad(y), name="bias_grad")
    # count 2 * 9 * 8 = 144 > 32 threads * 4 per channel: the split reduction path
    y = randn(rng, (2, 3, 9, 8), dtype)
    assert_close(conv.bias_grad(dev(y)), ref_conv.bias_grad(y), name="bias_grad split")


# --- pooling --------------------------------------------------------------------------------

POOL_CASES = {
    "2d-k2s2": PoolCase((2, 3, 6, 6), (2, 2), (2, 2), (0, 0)),
    "2d-batch1-odd-k3s2p1": PoolCase((1, 2, 7, 5), (3, 3), (2, 2), (1, 1)),
    "2d-overlap-k3s1p1": PoolCase((2, 2, 5, 6), (3, 3), (1, 1), (1, 1)),
    "2d-nonsquare-kernel": PoolCase((1, 3, 7, 8), (3, 2), (2, 1), (1, 0)),
    "2d-stride-gt-kernel": PoolCase((1, 2, 8, 7), (2, 2), (3, 3), (0, 1)),
    "3d-k2s2": PoolCase((1, 2, 4, 5, 6), (2, 2, 2), (2, 2, 2), (0, 0, 0)),
    "3d-k3s2p1": PoolCase((2, 2, 5, 4, 5), (3, 3, 2), (2, 1, 2), (1, 1, 1)),
}


def _pool_input(rng, shape, dtype, ties: bool):
    if ties:  # few distinct values: windows with several maxima check "first in scan order"
        return rng.integers(-2, 3, size=shape).astype(dtype)
    return randn(rng, shape, dtype)


@pytest.mark.parametrize("case_id", list(POOL_CASES))
@DTYPES
def test_max_pool_matches_reference(case_id, dtype):
    case = POOL_CASES[case_id]
    rng = np.random.default_rng(4)
    x = _pool_input(rng, case.x_shape, dtype, ties=(dtype == np.float32))
    y_ref, idx_ref = ref_pool.max_pool_forward(x, *case.args)
    y, idx = pool.max_pool_forward(dev(x), *case.args)
    assert y.dtype == dtype and idx.dtype == np.int64
    assert_close(y, y_ref, rtol=0, atol=0, name="max_pool y")
    np.testing.assert_array_equal(to_numpy(idx), idx_ref)
    gy = randn(rng, y_ref.shape, dtype)
    gx_ref = ref_pool.max_pool_backward(gy, idx_ref, x.shape)
    inferred = pool.max_pool_backward(dev(gy), idx, x.shape)
    assert_close(inferred, gx_ref, name="max_pool gx (reach inferred from idx)")
    given = pool.max_pool_backward(dev(gy), idx, x.shape, kernel=case.kernel, stride=case.stride,
                                   padding=case.padding)
    assert_close(given, gx_ref, name="max_pool gx (reach from the geometry)")
    assert_same_bits(inferred, pool.max_pool_backward(dev(gy), idx, x.shape), "max_pool gx")


def test_max_pool_nan_is_a_maximum():
    rng = np.random.default_rng(5)
    x = randn(rng, (1, 2, 5, 5), np.float32)
    x[0, 0, 1, 1] = x[0, 1, 3, 2] = x[0, 1, 3, 4] = np.nan
    args = ((3, 3), (2, 2), (1, 1))
    y_ref, idx_ref = ref_pool.max_pool_forward(x, *args)
    y, idx = pool.max_pool_forward(dev(x), *args)
    np.testing.assert_array_equal(to_numpy(y), y_ref)  # NaNs in the same places
    np.testing.assert_array_equal(to_numpy(idx), idx_ref)


@pytest.mark.parametrize("case_id", list(POOL_CASES))
@DTYPES
def test_avg_pool_matches_reference(case_id, dtype):
    case = POOL_CASES[case_id]
    rng = np.random.default_rng(6)
    x = randn(rng, case.x_shape, dtype)
    y_ref = ref_pool.avg_pool_forward(x, *case.args)
    y = pool.avg_pool_forward(dev(x), *case.args)
    assert y.dtype == dtype
    assert_close(y, y_ref, name="avg_pool y")
    gy = randn(rng, y_ref.shape, dtype)
    gx = pool.avg_pool_backward(dev(gy), x.shape, *case.args)
    assert gx.dtype == dtype
    assert_close(gx, ref_pool.avg_pool_backward(gy, x.shape, *case.args), name="avg_pool gx")
    assert_same_bits(gx, pool.avg_pool_backward(dev(gy), x.shape, *case.args), "avg_pool gx")


def test_pool_accepts_non_contiguous_inputs():
    rng = np.random.default_rng(7)
    x = randn(rng, (2, 3, 6, 7), np.float32)[:, :, :, ::-1].transpose(0, 1, 3, 2)
    args = ((3, 2), (2, 2), (1, 0))
    y, idx = pool.max_pool_forward(dev(x), *args)
    y_ref, idx_ref = ref_pool.max_pool_forward(x, *args)
    assert_close(y, y_ref)
    np.testing.assert_array_equal(to_numpy(idx), idx_ref)
    assert_close(pool.avg_pool_forward(dev(x), *args), ref_pool.avg_pool_forward(x, *args))


def test_reach_tables_agree():
    """The reach inferred from idx lies inside the reach of the window geometry."""
    case = POOL_CASES["3d-k3s2p1"]
    x = randn(np.random.default_rng(8), case.x_shape, np.float32)
    _, idx = pool.max_pool_forward(dev(x), *case.args)
    geo = pool._geometry(case.x_shape, *case.args)
    inferred = to_numpy(pool._infer_reach(idx, geo))
    geometric = pool._reach_from_geometry(geo)
    span = len(geometric) // 2
    seen = inferred[span:] >= 0
    assert (inferred[:span][seen] >= geometric[:span][seen]).all()
    assert (inferred[span:][seen] <= geometric[span:][seen]).all()


# --- activation -----------------------------------------------------------------------------

@DTYPES
def test_relu_matches_reference(dtype):
    rng = np.random.default_rng(9)
    x = randn(rng, (3, 4, 5, 7), dtype)
    x[0, 0, 0, :3] = [0.0, -0.0, np.nan]
    x.setflags(write=False)  # a read-only input must stay untouched (the simulator copies back)
    y = activation.relu_forward(dev(x))
    assert y.dtype == dtype
    np.testing.assert_array_equal(to_numpy(y), ref_activation.relu_forward(x))
    gy = randn(rng, x.shape, dtype)
    y_ref = ref_activation.relu_forward(x)
    gx = activation.relu_backward(dev(gy), dev(y_ref))
    np.testing.assert_array_equal(to_numpy(gx), ref_activation.relu_backward(gy, y_ref))


# --- batch norm -----------------------------------------------------------------------------

BN_SHAPES = {
    "2d": (2, 3, 4, 5),
    "2d-batch1-split-channels": (1, 2, 9, 17),  # count 153 > 32 threads * 4: split reduction
    "3d": (2, 2, 3, 4, 3),
}


def _bn_inputs(rng, shape, dtype):
    c = shape[1]
    x = (randn(rng, shape, dtype) * 3 + 5).astype(dtype)  # |mean| > std: two-pass matters
    gamma = (rng.random(c) + 0.5).astype(dtype)
    beta = randn(rng, c, dtype)
    return x, gamma, beta


@pytest.mark.parametrize("shape_id", list(BN_SHAPES))
@DTYPES
def test_batch_norm_matches_reference(shape_id, dtype):
    rng = np.random.default_rng(10)
    shape = BN_SHAPES[shape_id]
    x, gamma, beta = _bn_inputs(rng, shape, dtype)
    eps = 1e-5
    y, mean, invstd = norm.batch_norm_forward_train(dev(x), dev(gamma), dev(beta), eps)
    y_ref, mean_ref, invstd_ref = ref_norm.batch_norm_forward_train(x, gamma, beta, eps)
    for got, want, name in [(y, y_ref, "y"), (mean, mean_ref, "mean"),
                            (invstd, invstd_ref, "invstd")]:
        assert got.dtype == dtype and got.shape == want.shape, name
        assert_close(got, want, name=f"batch_norm_forward_train {name}")

    running_mean, running_var = randn(rng, shape[1], dtype), (rng.random(shape[1]) + 0.1)
    running_var = running_var.astype(dtype)
    y_eval = norm.batch_norm_forward_eval(dev(x), dev(gamma), dev(beta), dev(running_mean),
                                          dev(running_var), eps)
    assert y_eval.dtype == dtype
    assert_close(y_eval, ref_norm.batch_norm_forward_eval(x, gamma, beta, running_mean,
                                                          running_var, eps), name="eval y")

    gy = randn(rng, shape, dtype)
    grads = norm.batch_norm_backward(dev(gy), dev(x), dev(gamma), dev(mean_ref), dev(invstd_ref))
    grads_ref = ref_norm.batch_norm_backward(gy, x, gamma, mean_ref, invstd_ref)
    for got, want, name in zip(grads, grads_ref, ["gx", "ggamma", "gbeta"]):
        assert got.dtype == dtype and got.shape == want.shape, name
        rtol, atol = (1e-4, 1e-4) if dtype == np.float32 else (1e-9, 1e-10)
        assert_close(got, want, rtol=rtol, atol=atol, name=f"batch_norm_backward {name}")
    again = norm.batch_norm_backward(dev(gy), dev(x), dev(gamma), dev(mean_ref),
                                     dev(invstd_ref))
    for got, rerun, name in zip(grads, again, ["gx", "ggamma", "gbeta"]):
        assert_same_bits(got, rerun, f"batch_norm_backward {name}")


# --- default launch configuration, import hygiene -------------------------------------------

def test_default_config_on_tiny_shapes():
    """Every non-conv kernel with the default 256-thread blocks."""
    rng = np.random.default_rng(11)
    with rt.launch_config(tiles=rt.GPU_TILES, threads=256, mma_tiles=rt.GPU_MMA_TILES):
        assert rt.current_config() == rt.LaunchConfig()
        x = randn(rng, (2, 3, 5, 4), np.float32)
        args = ((3, 3), (2, 2), (1, 1))
        y, idx = pool.max_pool_forward(dev(x), *args)
        y_ref, idx_ref = ref_pool.max_pool_forward(x, *args)
        np.testing.assert_array_equal(to_numpy(idx), idx_ref)
        gy = randn(rng, y_ref.shape, np.float32)
        assert_close(pool.max_pool_backward(dev(gy), idx, x.shape),
                     ref_pool.max_pool_backward(gy, idx_ref, x.shape))
        assert_close(pool.avg_pool_backward(dev(gy), x.shape, *args),
                     ref_pool.avg_pool_backward(gy, x.shape, *args))
        gamma, beta = np.ones(3, np.float32), np.zeros(3, np.float32)
        out = norm.batch_norm_forward_train(dev(x), dev(gamma), dev(beta), 1e-5)
        for got, want in zip(out, ref_norm.batch_norm_forward_train(x, gamma, beta, 1e-5)):
            assert_close(got, want)
        assert_close(conv.bias_grad(dev(x)), ref_conv.bias_grad(x))
        assert_close(activation.relu_forward(dev(x)), ref_activation.relu_forward(x))


def test_import_compiles_nothing_and_needs_no_cupy():
    code = ("import sys\n"
            "import cnnfast.cuda.conv, cnnfast.cuda.pool, cnnfast.cuda.norm, "
            "cnnfast.cuda.activation, cnnfast.cuda.optim, cnnfast.cuda._variants, "
            "cnnfast.doctor\n"
            "from cnnfast.cuda import conv\n"
            "assert 'cupy' not in sys.modules, 'cupy imported'\n"
            "assert conv._forward_kernel.cache_info().currsize == 0, 'compiled at import'\n")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_bad_tile_configurations_are_refused():
    with pytest.raises(ValueError, match="thread count"):
        rt.GemmTiles(block_m=64, block_n=16, block_k=16, micro_m=8, micro_n=4)  # 32 threads
    with pytest.raises(ValueError, match="micro-tile"):
        rt.GemmTiles(block_m=64, block_n=60, block_k=16, micro_m=4, micro_n=8)
    with pytest.raises(ValueError, match="power of two"):
        rt.LaunchConfig(threads=96)


# --- launch economy: geometry in one argument, fused ops, one-launch optimizer ---------------

def test_geometry_is_named_and_travels_as_one_device_array():
    geo = conv._geometry((2, 3, 7, 5), (4, 3, 3, 2), (2, 1), (1, 1), (1, 1), 1)
    assert (geo.N, geo.C, geo.D, geo.K, geo.KD, geo.OD, geo.OH, geo.OW) == (2, 3, 1, 4, 1, 1, 4, 6)
    x = np.zeros((2, 3, 7, 5), np.float32)
    with rt.count_launches() as records:
        conv.conv_forward(dev(x), dev(np.zeros((4, 3, 3, 2), np.float32)), (2, 1), (1, 1),
                          (1, 1), 1)
    (record,) = records
    assert record.arguments == 6  # x, w, bias placeholder, taps, y, geometry
    assert str(record.types[-1]) == "array(int64, 1d, C)"
    with pytest.raises(TypeError, match="must hold ints"):
        rt.launch(record.dispatcher, 1, 1, (1.5, 2))


def test_fused_conv_bias_relu_gives_the_unfused_bits():
    case = CONV_CASES["2d-groups2-stride2-two-col-tiles"]
    rng = np.random.default_rng(13)
    x, w = dev(randn(rng, case.x_shape, np.float32)), dev(randn(rng, case.w_shape, np.float32))
    b = dev(randn(rng, case.w_shape[0], np.float32))
    plain = conv.conv_forward(x, w, *case.args)
    with_bias = conv.bias_add(plain, b)
    assert_same_bits(conv.conv_bias_relu_forward(x, w, b, False, *case.args), with_bias, "bias")
    assert_same_bits(conv.conv_bias_relu_forward(x, w, b, True, *case.args),
                     activation.relu_forward(with_bias), "bias + relu")
    assert_same_bits(conv.conv_bias_relu_forward(x, w, None, True, *case.args),
                     activation.relu_forward(plain), "relu")


@pytest.mark.parametrize("shape_id", ["2d-batch1-split-channels", "3d"])
def test_fused_batch_norm_relu_gives_the_unfused_bits(shape_id):
    rng = np.random.default_rng(14)
    x, gamma, beta = (dev(a) for a in _bn_inputs(rng, BN_SHAPES[shape_id], np.float32))
    gy = dev(randn(rng, BN_SHAPES[shape_id], np.float32))
    y, mean, invstd = norm.batch_norm_forward_train(x, gamma, beta, 1e-5)
    yr, mean_r, invstd_r = norm.batch_norm_relu_forward_train(x, gamma, beta, 1e-5)
    assert_same_bits(yr, activation.relu_forward(y), "forward")
    assert_same_bits(mean_r, mean, "mean")
    assert_same_bits(invstd_r, invstd, "invstd")
    fused = norm.batch_norm_relu_backward(gy, x, yr, gamma, mean, invstd)
    unfused = norm.batch_norm_backward(activation.relu_backward(gy, yr), x, gamma, mean, invstd)
    for a, b, name in zip(fused, unfused, ("gx", "ggamma", "gbeta")):
        assert_same_bits(a, b, name)
    for a, b, name in zip(fused, norm.batch_norm_relu_backward(gy, x, yr, gamma, mean, invstd),
                          ("gx", "ggamma", "gbeta")):
        assert_same_bits(a, b, f"{name} repeat")
    stats = (gamma, beta, mean, 1.0 / (invstd * invstd))
    assert_same_bits(norm.batch_norm_relu_forward_eval(x, *stats, 1e-5),
                     activation.relu_forward(norm.batch_norm_forward_eval(x, *stats, 1e-5)),
                     "eval")


def test_fused_ops_compose_on_the_cpu_paths():
    """Paths without fused kernels get them composed from their plain ops (same results)."""
    rng = np.random.default_rng(15)
    x, gamma, beta = _bn_inputs(rng, BN_SHAPES["2d"], np.float64)
    for path in ("reference", "cpu"):
        k = dispatch.kernels_of(path)
        y, mean, invstd = k.batch_norm_relu_forward_train(x, gamma, beta, 1e-5)
        y_ref, _, _ = ref_norm.batch_norm_forward_train(x, gamma, beta, 1e-5)
        assert_close(y, np.maximum(y_ref, 0))
        gy = rng.standard_normal(x.shape)
        grads = k.batch_norm_relu_backward(gy, x, y, gamma, mean, invstd)
        want = ref_norm.batch_norm_backward(np.where(y > 0, gy, 0), x, gamma, mean, invstd)
        for got, expected in zip(grads, want):
            assert_close(got, expected)


def test_sequential_fuses_relu_only_into_layers_without_their_own_forward():
    import cnnfast
    from cnnfast import functional as F
    from cnnfast import nn

    calls = []

    class Logged(nn.BatchNorm2d):
        def forward(self, x):
            calls.append(1)
            return super().forward(x)

    x = cnnfast.tensor(np.random.default_rng(18).standard_normal((2, 1, 5, 5)).astype(
        np.float32), device="cuda")
    for bn in (nn.BatchNorm2d(2), Logged(2)):
        conv_layer = nn.Conv2d(1, 2, 3, rng=np.random.default_rng(0))
        fused = nn.Sequential(conv_layer, bn, nn.ReLU()).to("cuda")(x)
        plain = F.relu(bn(conv_layer(x)))
        assert_same_bits(fused.data, plain.data, type(bn).__name__)
    assert calls == [1, 1]  # the subclass's forward ran, in Sequential and directly


def _train_step(model, opt, x, target):
    import cnnfast
    from cnnfast import functional as F

    opt.zero_grad()
    loss = F.cross_entropy(model(cnnfast.tensor(x, device="cuda")),
                           cnnfast.tensor(target, device="cuda"))
    loss.backward()
    opt.step()
    return loss


def test_smallcnn_training_step_meets_the_launch_budget():
    """Issue 10's target for one SmallCNN step on device cuda: <= 36 launches, <= 250 kernel
    arguments (it was 51 launches carrying 617 arguments)."""
    from cnnfast import models, optim

    model = models.SmallCNN(seed=0).to("cuda")
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = np.random.default_rng(16).standard_normal((2, 1, 8, 8)).astype(np.float32)
    with rt.count_launches() as records:
        _train_step(model, opt, x, np.array([0, 1]))
    launches, arguments = len(records), sum(r.arguments for r in records)
    assert launches <= 36 and arguments <= 250, (launches, arguments)
    names = [r.kernel for r in records]
    assert names.count("optimizer_update_kernel") == 1
    assert "relu_forward_kernel" not in names  # every ReLU fused into its batch norm


@pytest.mark.parametrize("make", [
    lambda ps: __import__("cnnfast").optim.SGD(ps, lr=0.1),
    lambda ps: __import__("cnnfast").optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1,
                                               weight_decay=1e-2),
    lambda ps: __import__("cnnfast").optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    lambda ps: __import__("cnnfast").optim.Adam(ps, lr=0.01, weight_decay=1e-3),
    lambda ps: __import__("cnnfast").optim.AdamW(ps, lr=0.01, weight_decay=0.1),
], ids=["sgd", "sgd-momentum-dampening-wd", "sgd-nesterov", "adam", "adamw"])
def test_one_launch_optimizer_matches_the_host_updates(make):
    import cnnfast
    from cnnfast import nn

    rng = np.random.default_rng(17)
    shapes = [(4, 1, 3, 3), (4,), (2, 4)]
    init = [randn(rng, s, np.float32) for s in shapes]
    grads = [[randn(rng, s, np.float32) for s in shapes] for _ in range(3)]
    results = {}
    for device in ("cpu", "cuda"):
        params = [nn.Parameter(a.copy(), device=device) for a in init]
        opt = make(params)
        with rt.count_launches() as records:
            for step, gs in enumerate(grads):
                if step == 2:  # a parameter replaced from outside is taken back in
                    params[1].data = params[1].data * 1
                for p, g in zip(params, gs):
                    p.grad = cnnfast.Tensor(g, device=device)
                opt.step()
        results[device] = [p.numpy() for p in params]
        if device == "cuda":
            assert len(records) == 3, "one launch per step"
    for got, want in zip(results["cuda"], results["cpu"]):
        assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_optimizer_skips_to_per_parameter_updates_when_a_gradient_is_missing():
    import cnnfast
    from cnnfast import nn, optim

    a, b = (nn.Parameter(np.ones(3, np.float32), device="cuda") for _ in range(2))
    opt = optim.Adam([a, b], lr=0.1)
    a.grad = cnnfast.Tensor(np.ones(3, np.float32), device="cuda")
    with rt.count_launches() as records:
        opt.step()
    assert not records and opt.state[id(a)]["step"] == 1 and id(b) not in opt.state
    assert (a.numpy() < 1).all() and (b.numpy() == 1).all()


# --- real GPU ---------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a real GPU (CuPy with a CUDA device)")
def test_gpu_real_shapes_match_reference_and_repeat():
    import cupy

    rng = np.random.default_rng(12)
    with rt.launch_config(tiles=rt.GPU_TILES, threads=256), cupy.cuda.Stream(non_blocking=True):
        for case in [ConvCase((8, 32, 28, 28), (64, 32, 3, 3), (1, 1), (1, 1), (1, 1), 1),
                     ConvCase((4, 64, 15, 15), (128, 16, 3, 3), (2, 2), (1, 1), (1, 1), 4),
                     ConvCase((2, 8, 12, 14, 13), (16, 8, 3, 3, 3), (1, 2, 1), (1, 1, 1),
                              (1, 1, 2), 1)]:
            x = randn(rng, case.x_shape, np.float32)
            w = (randn(rng, case.w_shape, np.float32) * 0.1).astype(np.float32)
            y_ref = ref_conv.conv_forward(x, w, *case.args)
            gy = randn(rng, y_ref.shape, np.float32)
            xd, wd, gyd = cupy.asarray(x), cupy.asarray(w), cupy.asarray(gy)
            tol = {"rtol": 1e-4, "atol": 1e-3}
            assert_close(conv.conv_forward(xd, wd, *case.args), y_ref, **tol)
            gx = conv.conv_backward_data(gyd, wd, x.shape, *case.args)
            assert_close(gx, ref_conv.conv_backward_data(gy, w, x.shape, *case.args), **tol)
            gw = conv.conv_backward_weight(gyd, xd, w.shape, *case.args)
            assert_close(gw, ref_conv.conv_backward_weight(gy, x, w.shape, *case.args),
                         rtol=1e-4, atol=1e-2)
            assert_same_bits(gx, conv.conv_backward_data(gyd, wd, x.shape, *case.args), "gx")
            assert_same_bits(gw, conv.conv_backward_weight(gyd, xd, w.shape, *case.args), "gw")

        x = randn(rng, (16, 32, 56, 56), np.float32)
        y, idx = pool.max_pool_forward(cupy.asarray(x), (3, 3), (2, 2), (1, 1))
        y_ref, idx_ref = ref_pool.max_pool_forward(x, (3, 3), (2, 2), (1, 1))
        np.testing.assert_array_equal(cupy.asnumpy(idx), idx_ref)
        gy = randn(rng, y_ref.shape, np.float32)
        gx = pool.max_pool_backward(cupy.asarray(gy), idx, x.shape)
        assert_close(gx, ref_pool.max_pool_backward(gy, idx_ref, x.shape))
        gamma, beta = np.ones(32, np.float32), np.zeros(32, np.float32)
        out = norm.batch_norm_forward_train(cupy.asarray(x), cupy.asarray(gamma),
                                            cupy.asarray(beta), 1e-5)
        for got, want in zip(out, ref_norm.batch_norm_forward_train(x, gamma, beta, 1e-5)):
            assert_close(got, want, rtol=1e-4, atol=1e-4)
        gx_bn = norm.batch_norm_backward(cupy.asarray(x), cupy.asarray(x), cupy.asarray(gamma),
                                         out[1], out[2])
        assert_same_bits(gx_bn[0], norm.batch_norm_backward(
            cupy.asarray(x), cupy.asarray(x), cupy.asarray(gamma), out[1], out[2])[0], "bn gx")


@pytest.mark.skipif(ON_GPU, reason="about Numba's CUDA simulator")
def test_simulator_gives_a_block_one_shared_array_per_line():
    """conftest locks the simulator's shared-array allocation: unlocked, 32 threads reaching one
    ``cuda.shared.array`` line together got several private arrays in about 4% of launches
    (numba-cuda 0.30.4), which showed as rare wrong or non-repeatable kernel results."""
    import threading

    from numba.cuda.simulator import kernelapi

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: widen any race
    try:
        for _ in range(300):
            shared = kernelapi.FakeCUDAShared(0)
            start = threading.Barrier(32)
            got = []

            def thread():
                start.wait()
                got.append(id(shared.array(16, np.float64)))

            threads = [threading.Thread(target=thread) for _ in range(32)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(set(got)) == 1, f"{len(set(got))} arrays for one shared.array line"
    finally:
        sys.setswitchinterval(interval)
