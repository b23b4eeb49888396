"""Tensor-core MMA (cnnfast/cuda/_mma.py, kernels/mma.cu): the fragment layouts against the PTX
ISA's tables written out here, the operand rounding against hand-worked values and PyTorch's
bfloat16, the simulator's emulation of each wrapper against a NumPy matrix product, and the
TF32/BF16 convolution kernels against the float64 reference within bounds derived from the
rounding (``_mma.error_bound``), 2D and 3D, forward and both backward passes."""

from __future__ import annotations

import numpy as np
import pytest
from numba import cuda

from cnnfast import backend, config
from cnnfast.cuda import _mma, conv
from cnnfast.cuda import _runtime as rt
from cnnfast.reference import conv as ref

GPU = backend.gpu_present() and not backend.cuda_simulated()

PRECISION = {"tf32": "high", "bf16": "medium"}  # float32 matmul precision selecting each MMA


# --- fragment layouts: the PTX ISA tables, restated lane by lane ------------------------------

def _isa_positions(precision: str, lane: int) -> dict[str, list[tuple[int, int]]]:
    """(row, col) of each fragment element of ``lane``, written from the PTX ISA's tables
    ("Matrix fragments for mma.m16n8k8" .tf32 and "mma.m16n8k16" .bf16)."""
    g, t = lane >> 2, lane % 4
    c = [(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)]
    if precision == "tf32":
        a = [(g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4)]
        b = [(t, g), (t + 4, g)]
    else:
        a = [(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1),
             (g, 2 * t + 8), (g, 2 * t + 9), (g + 8, 2 * t + 8), (g + 8, 2 * t + 9)]
        b = [(2 * t, g), (2 * t + 1, g), (2 * t + 8, g), (2 * t + 9, g)]
    return {"a": a, "b": b, "c": c}


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_fragment_layout_is_the_isa_table_and_covers_each_matrix_once(precision):
    layout = _mma.fragment_layout(precision)
    shape = _mma.SHAPES[precision]
    for lane in range(32):
        want = _isa_positions(precision, lane)
        for f in "abc":
            assert [tuple(p) for p in layout[f][lane]] == want[f], (precision, f, lane)
    for f, (rows, cols) in {"a": (shape.m, shape.k), "b": (shape.k, shape.n),
                            "c": (shape.m, shape.n)}.items():
        hits = np.zeros((rows, cols), int)
        np.add.at(hits, (layout[f][..., 0].ravel(), layout[f][..., 1].ravel()), 1)
        assert (hits == 1).all(), (precision, f)
    # lane 13: g = 3, t = 1 (a spot check by hand)
    if precision == "tf32":
        assert [tuple(p) for p in layout["a"][13]] == [(3, 1), (11, 1), (3, 5), (11, 5)]
    else:
        assert tuple(layout["a"][13][5]) == (3, 11) and tuple(layout["b"][13][3]) == (11, 3)


# --- operand rounding ---------------------------------------------------------------------------

def test_tf32_rounds_to_nearest_ties_away_from_zero():
    ulp = 2.0 ** -10  # TF32 spacing at 1
    x = np.array([1 + ulp / 2, 1 + ulp / 2 - 2 ** -23, 1 + 1.5 * ulp, -(1 + ulp / 2), 3.0,
                  np.inf, -np.inf, 0.0], np.float32)
    want = np.array([1 + ulp, 1.0, 1 + 2 * ulp, -(1 + ulp), 3.0, np.inf, -np.inf, 0.0])
    np.testing.assert_array_equal(_mma.round_operand(x, "tf32"), want.astype(np.float32))
    assert np.isnan(_mma.round_operand(np.float32(np.nan), "tf32"))
    rng = np.random.default_rng(0)
    v = rng.standard_normal(10_000).astype(np.float32)
    r = _mma.round_operand(v, "tf32")
    assert (r.view(np.uint32) & 0x1FFF == 0).all()  # 10 mantissa bits left
    assert (np.abs(r - v) <= _mma.unit_roundoff("tf32") * np.abs(v)).all()


def test_bf16_rounds_to_nearest_even_like_pytorch():
    ulp = 2.0 ** -7
    x = np.array([1 + ulp / 2, 1 + 1.5 * ulp, 1 + ulp / 2 + 2 ** -20, -2.5], np.float32)
    want = np.array([1.0, 1 + 2 * ulp, 1 + ulp, -2.5], np.float32)  # ties go to the even one
    np.testing.assert_array_equal(_mma.round_operand(x, "bf16"), want)
    torch = pytest.importorskip("torch")
    v = (np.random.default_rng(1).standard_normal(10_000) * 100).astype(np.float32)
    np.testing.assert_array_equal(_mma.round_operand(v, "bf16"),
                                  torch.from_numpy(v).bfloat16().float().numpy())


# --- the emulation, lane by lane, against NumPy -------------------------------------------------

def _mma_through_lanes(precision: str, a, b, c):
    """D from one simulated warp: each lane loads its fragments by the ISA positions written in
    this file, calls the emulated wrapper, and stores its D fragment the same way."""
    emulate = {"tf32": _mma.emulate_tf32, "bf16": _mma.emulate_bf16}[precision]
    positions = [_isa_positions(precision, lane) for lane in range(32)]
    pa = np.array([p["a"] for p in positions])
    pb = np.array([p["b"] for p in positions])
    pc = np.array([p["c"] for p in positions])
    na, nb = pa.shape[1], pb.shape[1]

    @cuda.jit
    def warp_kernel(a, b, c, d, pa, pb, pc):
        lane = cuda.threadIdx.x
        args = [a[pa[lane, i, 0], pa[lane, i, 1]] for i in range(na)]
        args += [b[pb[lane, i, 0], pb[lane, i, 1]] for i in range(nb)]
        args += [c[pc[lane, i, 0], pc[lane, i, 1]] for i in range(4)]
        out = emulate(*args)
        for i in range(4):
            d[pc[lane, i, 0], pc[lane, i, 1]] = out[i]

    d = np.full(c.shape, np.nan, np.float32)
    warp_kernel[1, 32](a, b, c, d, pa, pb, pc)
    return d


@pytest.mark.skipif(GPU, reason="the emulation is the simulator's stand-in for the hardware")
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_emulated_mma_is_the_matrix_product_of_rounded_operands(precision):
    shape = _mma.SHAPES[precision]
    rng = np.random.default_rng(2)
    a = rng.standard_normal((shape.m, shape.k)).astype(np.float32)
    b = rng.standard_normal((shape.k, shape.n)).astype(np.float32)
    c = rng.standard_normal((shape.m, shape.n)).astype(np.float32)
    d = _mma_through_lanes(precision, a, b, c)
    ar, br = (_mma.round_operand(m, precision).astype(np.float64) for m in (a, b))
    want = ar @ br + c
    bound = _mma.error_bound(np.abs(ar) @ np.abs(br) + np.abs(c), shape.k, precision,
                             rounded_inputs=True)
    assert (np.abs(d - want) <= bound).all()
    # and the rounding is real: unrounded operands give a product outside that bound
    exact = a.astype(np.float64) @ b + c
    assert (np.abs(d - exact) > bound).any()
    # every element placed by its lane: one-hot A and B pick single products out
    for i, j in ((0, 0), (shape.m - 1, shape.k - 1), (9, 3)):
        one_a = np.zeros_like(a)
        one_a[i, j] = 1
        d = _mma_through_lanes(precision, one_a, b, np.zeros_like(c))
        want = np.zeros_like(c)
        want[i] = _mma.round_operand(b[j], precision)
        np.testing.assert_array_equal(d, want)


@pytest.mark.skipif(GPU, reason="the emulation is the simulator's stand-in for the hardware")
def test_emulation_outside_a_simulated_kernel_is_refused():
    with pytest.raises(RuntimeError, match="simulator"):
        _mma.emulate_tf32(*([0.0] * 10))


# --- the convolution kernels on tensor cores ----------------------------------------------------

CASES = [  # x shape, w shape, stride, padding, dilation, groups
    ((2, 5, 7, 6), (10, 5, 3, 3), (1, 1), (1, 1), (1, 1), 1),  # channels not a multiple of 8
    ((1, 6, 9, 8), (4, 3, 3, 2), (2, 2), (1, 0), (1, 1), 2),  # stride 2, groups, batch 1
    ((2, 3, 8, 7), (17, 3, 2, 3), (1, 2), (0, 1), (2, 1), 1),  # dilation, 17 filters
    ((1, 3, 5, 4, 6), (5, 3, 3, 2, 3), (2, 1, 1), (1, 0, 1), (1, 1, 1), 1),  # 3D
]


def _rounded(a, precision):
    return _mma.round_operand(a, precision).astype(np.float64)


def _check(got, want, abs_sum, reduction, precision, rounded_inputs):
    bound = _mma.error_bound(abs_sum, reduction, precision, rounded_inputs)
    err = np.abs(np.asarray(got, np.float64) - want)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert (err <= bound).all(), (f"{precision}: |error| {err[worst]:.3g} > bound "
                                  f"{bound[worst]:.3g} at {worst}")


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=["odd-channels", "stride-groups", "dilation", "3d"])
def test_tensor_core_convolution_matches_the_reference(precision, case):
    x_shape, w_shape, stride, padding, dilation, groups = case
    rng = np.random.default_rng(3)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    args = (stride, padding, dilation, groups)
    xr, wr = _rounded(x, precision), _rounded(w, precision)
    y_ref = ref.conv_forward(xr, wr, *args)
    gy = rng.standard_normal(y_ref.shape).astype(np.float32)
    gyr = _rounded(gy, precision)
    kg, cg = w_shape[0] // groups, w_shape[1]
    taps = int(np.prod(w_shape[2:]))
    positions = y_ref.size // w_shape[0]
    with config.using_config(matmul_precision=PRECISION[precision]):
        assert conv.mma_tiles(np.float32).precision == precision
        y = conv.conv_forward(x, w, *args)
        gx = conv.conv_backward_data(gy, w, x.shape, *args)
        gw = conv.conv_backward_weight(gy, x, w.shape, *args)
    # on operands already rounded, only float32 accumulation separates kernel and reference
    _check(y, y_ref, ref.conv_forward(np.abs(xr), np.abs(wr), *args), cg * taps, precision,
           True)
    _check(gx, ref.conv_backward_data(gyr, wr, x.shape, *args),
           ref.conv_backward_data(np.abs(gyr), np.abs(wr), x.shape, *args), kg * taps,
           precision, True)
    _check(gw, ref.conv_backward_weight(gyr, xr, w.shape, *args),
           ref.conv_backward_weight(np.abs(gyr), np.abs(xr), w.shape, *args), positions,
           precision, True)
    # against the exact float32 inputs: the operand rounding term of the bound as well
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    _check(y, ref.conv_forward(x64, w64, *args), ref.conv_forward(np.abs(x64), np.abs(w64),
                                                                  *args),
           cg * taps, precision, False)


def test_precision_leaves_float64_and_the_default_on_fp32_kernels():
    assert conv.mma_tiles(np.float32) is None  # "highest", the default: FP32 kernels
    with config.using_config(matmul_precision="high"):
        assert conv.mma_tiles(np.float64) is None
        rng = np.random.default_rng(4)
        x = rng.standard_normal((1, 3, 6, 5))
        w = rng.standard_normal((4, 3, 3, 3))
        args = ((1, 1), (1, 1), (1, 1), 1)
        np.testing.assert_allclose(conv.conv_forward(x, w, *args),
                                   ref.conv_forward(x, w, *args), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [
    {"block_m": 24}, {"warps_m": 3}, {"block_k": 8}, {"precision": "fp16"},
])
def test_mma_tiles_refuse_shapes_the_kernels_cannot_run(bad):
    good = {"block_m": 32, "block_n": 16, "block_k": 16, "warps_m": 2, "warps_n": 1}
    rt.MmaTiles(**good)
    with pytest.raises(ValueError):
        rt.MmaTiles(**{**good, **bad})


# --- the precision switch ---------------------------------------------------------------------

def test_float32_matmul_precision_is_set_checked_and_read_from_the_environment(monkeypatch):
    import cnnfast

    assert cnnfast.get_float32_matmul_precision() == "highest"
    with pytest.raises(ValueError, match="float32 matmul precision.*'fp16'"):
        cnnfast.set_float32_matmul_precision("fp16")
    with config.using_config(matmul_precision="highest"):  # drops the setting afterwards
        cnnfast.set_float32_matmul_precision("medium")
        assert cnnfast.get_float32_matmul_precision() == "medium"
        assert conv.mma_tiles(np.float32).precision == "bf16"
    monkeypatch.setenv("CNNFAST_MATMUL_PRECISION", "high")
    assert conv.mma_tiles(np.float32).precision == "tf32"
    monkeypatch.setenv("CNNFAST_MATMUL_PRECISION", "tf32")
    with pytest.raises(ValueError, match="CNNFAST_MATMUL_PRECISION"):
        cnnfast.get_float32_matmul_precision()


def test_train_matmul_precision_runs_the_tensor_core_kernels(tmp_path, capsys):
    from cnnfast import synthetic
    from cnnfast.cli import main
    from cnnfast.data import save_npz

    data = save_npz(tmp_path / "nod.npz", synthetic.nodule_dataset(8, 4, 4, seed=0, size=8))
    with rt.count_launches() as records:
        code = main(["train", "--data", str(data), "--model", "smallcnn", "--channels", "4",
                     "4", "4", "--epochs", "1", "--batch-size", "8", "--no-progress",
                     "--device", "cuda", "--matmul-precision", "high", "--out",
                     str(tmp_path / "run")])
    assert code == 0
    assert "matmul precision high" in capsys.readouterr().out
    tiles = {getattr(r.dispatcher, "cnnfast_tiles", None) for r in records}
    assert {"conv_forward_kernel", "conv_backward_weight_kernel"} <= {
        r.kernel for r in records if isinstance(getattr(r.dispatcher, "cnnfast_tiles", None),
                                                rt.MmaTiles)}
    assert all(t.precision == "tf32" for t in tiles if isinstance(t, rt.MmaTiles))
    assert config.get("matmul_precision") == "highest"  # the option was scoped to the command


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_fragment_reads_hit_32_distinct_shared_memory_banks(precision):
    """A warp's reads of one A (or B) fragment element: lane (g, t) reads row k0 + t (TF32) or
    k0 + 2t (BF16), column base + g of a shared tile; the padded pitch spreads them over the 32
    banks (4-byte words), where the SIMT kernels' pitch of BM + 1 would not."""
    from cnnfast.cuda._gemm import gemm_steps

    tiles = rt.MmaTiles(precision=precision)
    steps = gemm_steps(tiles, np.dtype(np.float32))
    step = 1 if precision == "tf32" else 2

    def banks(pitch):
        return {((lane % 4) * step * pitch + lane // 4) % 32 for lane in range(32)}

    for shape in (steps.a_shape, steps.b_shape):
        assert len(banks(shape[1])) == 32, shape
    assert len(banks(tiles.block_m + 1)) < 32
