"""Property-based tests (hypothesis): every op, forward and backward, on every path present
(``cpu`` fast, ``cuda`` — in Numba's simulator without a GPU, tiny shapes), against the NumPy
reference path, over random geometry: N, C, K, spatial sizes, kernel, stride, padding, dilation,
groups, 2D and 3D, float32 and float64. The strategies reach the corners on purpose: kernels
larger than the input (made valid by padding), strides larger than the kernel, one-pixel images,
groups equal to the channels.

CI runs a fixed derandomised set (``CNNFAST_PROPERTY_EXAMPLES`` scales it: the number of
examples per op family on the cpu path; the simulator gets an eighth, at least 3). The
reference itself is checked against PyTorch and finite differences in test_functional.py and
test_reference_*.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import cnnfast  # noqa: E402
from cnnfast import config, dispatch  # noqa: E402
from cnnfast import functional as F  # noqa: E402
from cnnfast.testing import assert_close  # noqa: E402

CPU_EXAMPLES = config.get("property_examples")
SIM = dispatch.cuda_simulated()
CUDA_EXAMPLES = max(3, CPU_EXAMPLES // 8) if SIM else CPU_EXAMPLES
PATHS = [p for p in dispatch.KERNEL_PATHS if p != "reference"]   # each against the reference
EXAMPLES_RUN: dict[str, int] = {}


def _settings(path: str):
    return settings(max_examples=CPU_EXAMPLES if path == "cpu" else CUDA_EXAMPLES, deadline=None,
                    derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large])


def _tolerance(dtype, reduction_size: int = 1) -> tuple[float, float]:
    # float32 sums of a few hundred terms in another order (GEMM, Winograd) differ by ~1e-6
    # relative per term; scale with the length of the reduction.
    if dtype == np.float64:
        return 1e-9, 1e-9 * max(1.0, math.sqrt(reduction_size))
    return 2e-4, 2e-5 * max(1.0, math.sqrt(reduction_size))


def _run(path: str, fn, arrays, grads_for, seed: int):
    """``fn`` on tensors of ``arrays`` on ``path`` ("reference", "cpu" or "cuda"), then backward
    with a seeded random output gradient. Returns (output, [grads of arrays[i] for grads_for])."""
    with dispatch.using_path(path) as device:
        tensors = [cnnfast.tensor(a, requires_grad=i in grads_for, device=device)
                   if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a
                   for i, a in enumerate(arrays)]
        y = fn(*tensors)
        assert y.device == device
        gy = np.random.default_rng(seed).standard_normal(y.shape).astype(y.dtype)
        y.backward(cnnfast.tensor(gy, device=device))
        return y.numpy(), [tensors[i].grad.numpy() for i in grads_for]


def _compare(path: str, fn, arrays, grads_for, reduction_size: int, what: str, seed: int = 0):
    EXAMPLES_RUN[what] = EXAMPLES_RUN.get(what, 0) + 1
    want_y, want_g = _run("reference", fn, arrays, grads_for, seed)
    got_y, got_g = _run(path, fn, arrays, grads_for, seed)
    rtol, atol = _tolerance(want_y.dtype, reduction_size)
    assert_close(got_y, want_y, rtol, atol, name=f"{what} output on {path}")
    for i, (g, w) in enumerate(zip(got_g, want_g)):
        assert_close(g, w, rtol, atol, name=f"{what} grad of input {grads_for[i]} on {path}")


dtypes = st.sampled_from([np.float32, np.float64])


# --- convolution ---------------------------------------------------------------------------------

@st.composite
def conv_cases(draw, tiny: bool, nd: int):
    groups = draw(st.integers(1, 2 if tiny else 3))
    cpg = draw(st.integers(1, 2 if tiny else 3))      # channels per group (1: groups == C)
    kpg = draw(st.integers(1, 2 if tiny else 3))
    n = draw(st.integers(1, 2 if tiny else 3))
    max_s = (4 if nd == 2 else 3) if tiny else (9 if nd == 2 else 5)
    max_k = 3 if (tiny or nd == 3) else 4
    spatial, kernel, stride, padding, dilation = [], [], [], [], []
    for _ in range(nd):
        s = draw(st.integers(1, max_s))
        k = draw(st.integers(1, max_k))
        d = draw(st.integers(1, 2))
        # a kernel that does not fit the input is made valid by padding (kernel > input)
        extent = d * (k - 1) + 1
        p_min = max(0, -(-(extent - s) // 2))
        p = p_min + draw(st.integers(0, 1 if tiny else 2))
        spatial.append(s)
        kernel.append(k)
        dilation.append(d)
        padding.append(p)
        stride.append(draw(st.integers(1, 4)))      # often larger than the kernel
    dtype = draw(dtypes)
    bias = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    c, k_out = groups * cpg, groups * kpg
    x = rng.standard_normal((n, c, *spatial)).astype(dtype)
    w = rng.standard_normal((k_out, cpg, *kernel)).astype(dtype)
    b = rng.standard_normal(k_out).astype(dtype) if bias else None
    return nd, x, w, b, tuple(stride), tuple(padding), tuple(dilation), groups


def _conv_check(path, case):
    nd, x, w, b, stride, padding, dilation, groups = case
    conv = F.conv2d if nd == 2 else F.conv3d
    arrays = [x, w] + ([b] if b is not None else [])

    def fn(x, w, b=None):
        return conv(x, w, b, stride=stride, padding=padding, dilation=dilation, groups=groups)

    reduction = int(np.prod(w.shape[1:])) * max(1, x.shape[0])
    _compare(path, fn, arrays, list(range(len(arrays))), reduction, f"conv{nd}d")


def _conv_example(nd, x_shape, w_shape, stride, padding, dilation, groups, dtype=np.float64):
    rng = np.random.default_rng(0)
    return (nd, rng.standard_normal(x_shape).astype(dtype),
            rng.standard_normal(w_shape).astype(dtype), rng.standard_normal(w_shape[0]).astype(
            dtype), stride, padding, dilation, groups)


CONV_CORNERS = [  # kernel larger than the input with padding; stride > kernel; one pixel;
    # groups == channels (depthwise); 3D one voxel with a 3x3x3 kernel
    _conv_example(2, (1, 2, 2, 3), (2, 2, 4, 5), (1, 1), (2, 2), (1, 1), 1),
    _conv_example(2, (2, 3, 7, 6), (3, 3, 2, 1), (4, 3), (0, 1), (1, 1), 1, np.float32),
    _conv_example(2, (1, 1, 1, 1), (2, 1, 1, 1), (1, 1), (0, 0), (1, 1), 1),
    _conv_example(2, (2, 4, 5, 5), (4, 1, 3, 3), (1, 2), (1, 1), (2, 1), 4),
    _conv_example(3, (1, 2, 1, 1, 1), (2, 1, 3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), 2),
]


@pytest.mark.parametrize("nd", [2, 3])
def test_conv_cpu_matches_reference(nd):
    @settings(_settings("cpu"), max_examples=max(3, CPU_EXAMPLES // 2))
    @given(case=conv_cases(tiny=False, nd=nd))
    def check(case):
        _conv_check("cpu", case)
    check()


@pytest.mark.parametrize("nd", [2, 3])
def test_conv_cuda_matches_reference(nd):
    @settings(_settings("cuda"), max_examples=max(2, CUDA_EXAMPLES // 2))
    @given(case=conv_cases(tiny=True, nd=nd))
    def check(case):
        _conv_check("cuda", case)
    check()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("index", range(len(CONV_CORNERS)))
def test_conv_corner_cases_match_reference(path, index):
    _conv_check(path, CONV_CORNERS[index])


# --- pooling -------------------------------------------------------------------------------------

POOLS = ["max", "avg", "adaptive"]


@st.composite
def pool_cases(draw, tiny: bool, kind: str, nd: int):
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 2 if tiny else 3))
    max_s = (4 if nd == 2 else 3) if tiny else (9 if nd == 2 else 5)
    spatial, kernel, stride, padding = [], [], [], []
    for _ in range(nd):
        s = draw(st.integers(1, max_s))
        k = draw(st.integers(1, 3))
        p = draw(st.integers(0, k // 2))           # pooling allows padding up to half the kernel
        if k > s + 2 * p:                           # make the window fit the padded input
            k = s + 2 * p if s + 2 * p >= 1 else 1
            p = min(p, k // 2)
            if k > s + 2 * p:
                k = s
        spatial.append(s)
        kernel.append(k)
        padding.append(p)
        stride.append(draw(st.integers(1, 4)))
    dtype = draw(dtypes)
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    # distinct values: max pooling's gradient is defined without ties
    size = n * c * int(np.prod(spatial))
    x = (rng.permutation(size).reshape(n, c, *spatial) / size + rng.standard_normal() * 0.1)
    out = tuple(draw(st.integers(1, s)) for s in spatial)
    return nd, kind, x.astype(dtype), tuple(kernel), tuple(stride), tuple(padding), out


def _pool_check(path, case):
    nd, kind, x, kernel, stride, padding, out = case
    if kind == "adaptive":
        op = F.adaptive_avg_pool2d if nd == 2 else F.adaptive_avg_pool3d

        def fn(x):
            return op(x, out)
    else:
        op = {("max", 2): F.max_pool2d, ("max", 3): F.max_pool3d, ("avg", 2): F.avg_pool2d,
              ("avg", 3): F.avg_pool3d}[kind, nd]

        def fn(x):
            return op(x, kernel, stride, padding)
    _compare(path, fn, [x], [0], int(np.prod(kernel)), f"{kind}_pool{nd}d")


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("kind", POOLS)
def test_pooling_cpu_matches_reference(kind, nd):
    @settings(_settings("cpu"), max_examples=max(3, CPU_EXAMPLES // 2))
    @given(case=pool_cases(tiny=False, kind=kind, nd=nd))
    def check(case):
        _pool_check("cpu", case)
    check()


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("kind", POOLS)
def test_pooling_cuda_matches_reference(kind, nd):
    @settings(_settings("cuda"), max_examples=2)
    @given(case=pool_cases(tiny=True, kind=kind, nd=nd))
    def check(case):
        _pool_check("cuda", case)
    check()


# --- batch norm, relu, linear, dropout, losses ------------------------------------------------

POINTWISE = ["batch_norm_train", "batch_norm_eval", "relu", "linear", "dropout", "bce",
             "cross_entropy"]


@st.composite
def pointwise_cases(draw, tiny: bool, op: str):
    nd = draw(st.sampled_from([2, 3]))
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 3 if tiny else 5))
    spatial = [draw(st.integers(1, 3 if tiny else 6)) for _ in range(nd)]
    if n * int(np.prod(spatial)) < 2:
        n = 2                                       # batch-norm training needs 2 values
    dtype = draw(dtypes)
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    x = rng.standard_normal((n, c, *spatial)).astype(dtype)
    extra = {"gamma": rng.standard_normal(c).astype(dtype),
             "beta": rng.standard_normal(c).astype(dtype),
             "mean": rng.standard_normal(c).astype(dtype),
             "var": rng.uniform(0.5, 2.0, c).astype(dtype),
             "out": draw(st.integers(1, 4)), "p": draw(st.sampled_from([0.1, 0.5, 0.9])),
             "seed": draw(st.integers(0, 1000)), "rng": rng}
    return op, x, extra


def _pointwise_check(path, case):
    op, x, e = case
    rng = e["rng"]
    n, c = x.shape[:2]
    if op == "batch_norm_train":
        def fn(x, g, b):
            return F.batch_norm(x, e["mean"].copy(), e["var"].copy(), g, b, training=True)
        _compare(path, fn, [x, e["gamma"], e["beta"]], [0, 1, 2], x.size // c, op)
    elif op == "batch_norm_eval":
        def fn(x, g, b):
            return F.batch_norm(x, e["mean"], e["var"], g, b, training=False)
        _compare(path, fn, [x, e["gamma"], e["beta"]], [0, 1, 2], x.size // c, op)
    elif op == "relu":
        _compare(path, F.relu, [x], [0], 1, op)
    elif op == "linear":
        flat = x.reshape(n, -1)
        w = rng.standard_normal((e["out"], flat.shape[1])).astype(x.dtype)
        b = rng.standard_normal(e["out"]).astype(x.dtype)
        _compare(path, F.linear, [flat, w, b], [0, 1, 2], flat.shape[1], op)
    elif op == "dropout":
        def fn(x):
            return F.dropout(x, e["p"], True, e["seed"])  # the same mask on every path
        _compare(path, fn, [x], [0], 1, op)
    elif op == "bce":
        z = x.reshape(n, -1)
        y = (rng.random(z.shape) < 0.5).astype(x.dtype)
        pw = rng.uniform(0.5, 2.0, z.shape[1]).astype(x.dtype)

        def fn(z, y):
            return F.binary_cross_entropy_with_logits(z, y, pos_weight=pw)
        _compare(path, fn, [z * 5, y], [0], z.size, op)
    else:
        z = x.reshape(n, -1)
        target = rng.integers(0, z.shape[1], n)

        def fn(z):
            return F.cross_entropy(z, cnnfast.tensor(target, device="cuda" if path == "cuda"
                                                     and z.device == "cuda" else "cpu"))
        _compare(path, fn, [z * 3], [0], z.size, op)


@pytest.mark.parametrize("op", POINTWISE)
def test_pointwise_and_losses_cpu_match_reference(op):
    @settings(_settings("cpu"), max_examples=max(3, CPU_EXAMPLES // 4))
    @given(case=pointwise_cases(tiny=False, op=op))
    def check(case):
        _pointwise_check("cpu", case)
    check()


@pytest.mark.parametrize("op", POINTWISE)
def test_pointwise_and_losses_cuda_match_reference(op):
    @settings(_settings("cuda"), max_examples=max(2, CUDA_EXAMPLES // 2))
    @given(case=pointwise_cases(tiny=True, op=op))
    def check(case):
        _pointwise_check("cuda", case)
    check()


def test_report_examples_run():
    """Prints how many examples each op family ran in this session (pytest -s shows it)."""
    print("\nproperty-test examples run:", dict(sorted(EXAMPLES_RUN.items())))
