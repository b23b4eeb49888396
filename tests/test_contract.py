"""The kernel contract (``cnnfast/dispatch.py``'s docstring): one test body per op, run on every
kernel path against PyTorch.

Each op is wired once (an ``ours(k, *inputs) -> (outputs, vjp)`` function over the contract
names of a kernel namespace ``k``) and each test is a call to :func:`check_op`, which injects
the path (Chainer's backend-parametrised test bodies; tinygrad's ``helper_test_op``). For every
path it checks, from the same inputs:

* every output and every input gradient against PyTorch's forward and autograd;
* on the fast paths, the same against the reference kernels (the oracle of the project);
* dtypes kept, outputs on the path's device, inputs left unmodified.

Grids: every case in float32 and float64 and in three memory layouts on ``reference`` and
``cpu``; in the CUDA simulator (one Python thread per CUDA thread) every case in float32 and
contiguous, and one small case of each grid in every dtype and layout. On a real GPU the whole
grid runs. The per-path files keep what forces that path's own branches (Winograd, row bands,
GEMM tiles, reach tables, ties and NaN in pooling, threads) and finite differences.
"""

from __future__ import annotations

import numpy as np
import pytest
from cases import ConvCase, PoolCase, make_array

from cnnfast import backend, dispatch
from cnnfast.testing import assert_close, to_numpy, torch_results

PATHS = dispatch.KERNEL_PATHS
ON_GPU = backend.gpu_present() and not backend.cuda_simulated()
DTYPES = {"f32": np.float32, "f64": np.float64}
LAYOUTS = ["contiguous", "transposed", "sliced"]


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def grid(case_ids, sweep: str | None = None) -> list:
    """(path, case_id, dtype, layout) params: every case in every dtype and layout; in the CUDA
    simulator every case in float32 contiguous and only case ``sweep`` (default: the last) in
    every dtype and layout."""
    params = []
    sweep = sweep or case_ids[-1]
    for path in PATHS:
        for case_id in case_ids:
            for dtype_id, dtype in DTYPES.items():
                for layout in LAYOUTS:
                    full = path != "cuda" or ON_GPU or case_id == sweep
                    if full or (dtype_id, layout) == ("f32", "contiguous"):
                        params.append(pytest.param(path, case_id, dtype, layout,
                                                   marks=pytest.mark.torch,
                                                   id=f"{path}-{case_id}-{dtype_id}-{layout}"))
    return params


def tolerance(dtype, scale: float = 1.0) -> dict:
    """Sums of a few hundred terms computed in another order (PyTorch, or another path)."""
    if dtype == np.float32:
        return {"rtol": 1e-4 * scale, "atol": 1e-5 * scale}
    return {"rtol": 1e-9, "atol": 1e-10 * scale}


def check_op(path, ours, theirs, arrays, torch, tol: dict, grad: bool = True) -> None:
    """Run ``ours`` with ``path``'s kernels and with PyTorch; compare outputs and gradients.

    ``ours(k, *inputs)`` returns ``(outputs, vjp)``: one array or a tuple (extra outputs such as
    max pooling's indices or batch norm's statistics after the first), and ``vjp(gy)`` giving
    one gradient per input (None where the contract computes none; ``vjp`` None: no backward).
    ``theirs(*tensors)`` returns PyTorch's outputs in the same order, the first differentiable.
    """
    device = "cuda" if path == "cuda" else "cpu"
    before = [a.copy() for a in arrays]
    kernels = dispatch.kernels_of(path)
    outs, vjp = ours(kernels, *(backend.to_device(a, device) for a in arrays))
    outs = outs if isinstance(outs, tuple) else (outs,)
    gy = np.random.default_rng(99).standard_normal(outs[0].shape).astype(arrays[0].dtype)
    want, want_grads = torch_results(theirs, arrays, gy, grad)
    assert len(outs) == len(want)
    grads = vjp(backend.to_device(gy, device)) if grad else ()
    got = list(outs) + [g for g in grads if g is not None]
    want += [w for w, g in zip(want_grads, grads) if g is not None]
    names = [f"output {i}" for i in range(len(outs))]
    names += [f"gradient of input {i}" for i, g in enumerate(grads) if g is not None]

    if path != "reference":  # the same op on the oracle's kernels, from the same host arrays
        ref_outs, ref_vjp = ours(dispatch.kernels_of("reference"), *arrays)
        ref_outs = ref_outs if isinstance(ref_outs, tuple) else (ref_outs,)
        ref = list(ref_outs) + [g for g in (ref_vjp(gy) if grad else ()) if g is not None]
        got, want, names = got * 2, want + ref, names + [f"{n} vs reference" for n in names]

    for name, a, e in zip(names, got, want):
        assert backend.is_cupy_array(a) == (path == "cuda" and ON_GPU), f"{name}: wrong device"
        a = to_numpy(a)
        assert a.shape == e.shape, f"{name}: shape {a.shape}, expected {e.shape}"
        if e.dtype.kind in "iu":  # indices: exact
            assert a.dtype == np.int64, name
            np.testing.assert_array_equal(a, e, err_msg=name)
        else:
            assert a.dtype == arrays[0].dtype, f"{name}: dtype {a.dtype}"
            assert_close(a, e, name=name, **tol)
    for i, (a, b) in enumerate(zip(arrays, before)):
        np.testing.assert_array_equal(a, b, err_msg=f"input {i} was modified")


def inputs(seed, shapes, dtype, layout, distinct: bool = False):
    """Standard-normal arrays (or, with ``distinct``, a permutation of well-separated values:
    no ties, so max pooling has one winner per window) in ``layout`` for rank >= 2 shapes."""
    rng = np.random.default_rng(seed)
    out = []
    for shape in shapes:
        layout_here = layout if len(shape) >= 2 else "contiguous"
        a = make_array(rng, shape, dtype, layout_here)
        if distinct:
            n = a.size
            a[...] = ((rng.permutation(n) - n / 2) * (4.0 / n + 0.01)).reshape(a.shape)
        out.append(a)
    return out


# --- convolution + bias -------------------------------------------------------------------------

CONV_CASES = {
    "2d-plain": ConvCase((2, 3, 5, 6), (4, 3, 3, 3), (1, 1), (0, 0), (1, 1), 1),
    "2d-batch1-odd-stride2-pad1": ConvCase((1, 3, 7, 5), (4, 3, 3, 2), (2, 1), (1, 1), (1, 1), 1),
    "2d-dilation2-pad": ConvCase((2, 2, 7, 6), (3, 2, 3, 3), (1, 1), (2, 1), (2, 2), 1),
    "2d-groups2-stride2": ConvCase((2, 4, 6, 5), (6, 2, 3, 3), (2, 2), (1, 0), (1, 1), 2),
    "2d-depthwise": ConvCase((2, 3, 5, 5), (3, 1, 3, 3), (1, 1), (1, 1), (1, 1), 3),
    "2d-depthwise-multiplier2": ConvCase((1, 2, 5, 4), (4, 1, 2, 3), (1, 2), (0, 1), (1, 1), 2),
    "2d-1x1-stride3": ConvCase((1, 3, 7, 8), (2, 3, 1, 1), (3, 3), (0, 0), (1, 1), 1),
    "2d-stride-gt-kernel": ConvCase((1, 2, 8, 7), (2, 2, 2, 2), (3, 3), (1, 1), (1, 1), 1),
    "3d-plain": ConvCase((1, 2, 4, 5, 3), (3, 2, 2, 3, 2), (1, 1, 1), (0, 0, 0), (1, 1, 1), 1),
    "3d-stride-pad-dil-groups2": ConvCase((2, 4, 4, 5, 4), (4, 2, 3, 2, 2), (2, 1, 2), (1, 0, 1),
                                          (1, 2, 1), 2),
}


def conv_bias(case: ConvCase):
    def ours(k, x, w, b):
        y = k.bias_add(k.conv_forward(x, w, *case.args), b)
        return y, lambda gy: (k.conv_backward_data(gy, w, x.shape, *case.args),
                              k.conv_backward_weight(gy, x, w.shape, *case.args),
                              k.bias_grad(gy))
    return ours


@pytest.mark.parametrize("path,case_id,dtype,layout",
                         grid(list(CONV_CASES), sweep="2d-batch1-odd-stride2-pad1"))
def test_conv_bias(torch, path, case_id, dtype, layout):
    c = CONV_CASES[case_id]
    conv = getattr(torch.nn.functional, f"conv{len(c.stride)}d")
    check_op(path, conv_bias(c), lambda x, w, b: conv(x, w, b, *c.args), inputs(
        6, [c.x_shape, c.w_shape, c.w_shape[:1]], dtype, layout), torch, tolerance(dtype, 2.0))


# --- pooling --------------------------------------------------------------------------------------

POOL_CASES = {
    "2d-k2s2": PoolCase((2, 3, 6, 6), (2, 2), (2, 2), (0, 0)),
    "2d-batch1-odd-k3s2p1": PoolCase((1, 2, 7, 5), (3, 3), (2, 2), (1, 1)),
    "2d-overlap-k3s1p1": PoolCase((2, 2, 5, 6), (3, 3), (1, 1), (1, 1)),
    "2d-nonsquare-kernel": PoolCase((1, 3, 7, 8), (3, 2), (2, 1), (1, 0)),
    "2d-stride-gt-kernel": PoolCase((1, 2, 8, 7), (2, 2), (3, 3), (0, 1)),
    "3d-k2s2": PoolCase((1, 2, 4, 5, 6), (2, 2, 2), (2, 2, 2), (0, 0, 0)),
    "3d-k3s2p1": PoolCase((2, 2, 5, 4, 5), (3, 3, 2), (2, 1, 2), (1, 1, 1)),
}


def max_pool(case: PoolCase):
    def ours(k, x):
        y, idx = k.max_pool_forward(x, *case.args)
        return (y, idx), lambda gy: (k.max_pool_backward(gy, idx, x.shape),)
    return ours


def avg_pool(case: PoolCase):
    def ours(k, x):
        return k.avg_pool_forward(x, *case.args), lambda gy: (
            k.avg_pool_backward(gy, x.shape, *case.args),)
    return ours


@pytest.mark.parametrize("path,case_id,dtype,layout", grid(list(POOL_CASES)))
def test_max_pool(torch, path, case_id, dtype, layout):
    c = POOL_CASES[case_id]
    pool = getattr(torch.nn.functional, f"max_pool{len(c.kernel)}d")
    check_op(path, max_pool(c), lambda x: pool(x, *c.args, return_indices=True),
             inputs(7, [c.x_shape], dtype, layout, distinct=True), torch, tolerance(dtype))


@pytest.mark.parametrize("path,case_id,dtype,layout", grid(list(POOL_CASES)))
def test_avg_pool(torch, path, case_id, dtype, layout):
    c = POOL_CASES[case_id]
    pool = getattr(torch.nn.functional, f"avg_pool{len(c.kernel)}d")
    check_op(path, avg_pool(c), lambda x: pool(x, *c.args), inputs(8, [c.x_shape], dtype, layout),
             torch, tolerance(dtype))


ADAPTIVE_CASES = {
    "2d-to-1x1": ((2, 3, 5, 4), (1, 1)),
    "2d-odd-7x5-to-3x2": ((1, 2, 7, 5), (3, 2)),
    "2d-identity": ((1, 2, 5, 5), (5, 5)),
    "2d-equal-bins-6x4-to-3x2": ((2, 2, 6, 4), (3, 2)),
    "3d-equal-bins-4x2x6-to-2x1x3": ((1, 2, 4, 2, 6), (2, 1, 3)),
    "2d-upsample-3-to-5": ((1, 1, 3, 4), (5, 3)),
    "3d-to-1": ((2, 2, 3, 4, 5), (1, 1, 1)),
    "3d-odd": ((1, 2, 5, 6, 7), (2, 4, 3)),
}


@pytest.mark.parametrize("path,case_id,dtype,layout", grid(list(ADAPTIVE_CASES)))
def test_adaptive_avg_pool(torch, path, case_id, dtype, layout):
    shape, out = ADAPTIVE_CASES[case_id]
    pool = getattr(torch.nn.functional, f"adaptive_avg_pool{len(out)}d")
    check_op(path, lambda k, x: (k.adaptive_avg_pool_forward(x, out), lambda gy: (
        k.adaptive_avg_pool_backward(gy, x.shape),)), lambda x: pool(x, out),
        inputs(9, [shape], dtype, layout, distinct=True), torch, tolerance(dtype))


# --- activation, batch norm, linear -------------------------------------------------------------

def relu(k, x):
    y = k.relu_forward(x)
    return y, lambda gy: (k.relu_backward(gy, y),)


@pytest.mark.parametrize("path,case_id,dtype,layout", grid(["2d", "3d-batch1"]))
def test_relu(torch, path, case_id, dtype, layout):
    shape = {"2d": (2, 3, 5, 4), "3d-batch1": (1, 2, 3, 4, 5)}[case_id]
    check_op(path, relu, torch.relu, inputs(10, [shape], dtype, layout), torch, tolerance(dtype))


NORM_SHAPES = {"2d": (3, 4, 5, 3), "2d-batch1-odd": (1, 3, 5, 7), "3d": (2, 3, 3, 4, 5)}
EPS = 1e-5


def batch_norm_train(k, x, gamma, beta):
    y, mean, invstd = k.batch_norm_forward_train(x, gamma, beta, EPS)
    return (y, mean, invstd), lambda gy: k.batch_norm_backward(gy, x, gamma, mean, invstd)


def torch_batch_norm_train(torch):
    def theirs(x, gamma, beta):
        axes = [0] + list(range(2, x.ndim))
        var = x.detach().var(dim=axes, unbiased=False)
        y = torch.nn.functional.batch_norm(x, None, None, gamma, beta, training=True, eps=EPS)
        return y, x.detach().mean(dim=axes), 1 / torch.sqrt(var + EPS)
    return theirs


@pytest.mark.parametrize("path,case_id,dtype,layout", grid(list(NORM_SHAPES)))
def test_batch_norm_train(torch, path, case_id, dtype, layout):
    shape = NORM_SHAPES[case_id]
    x, gamma, beta = inputs(11, [shape, shape[1:2], shape[1:2]], dtype, layout)
    x *= 2.0  # in place: keeps the layout; a mean far from 0 tests the variance's accuracy
    x += 1.5
    check_op(path, batch_norm_train, torch_batch_norm_train(torch), [x, gamma, beta], torch,
             tolerance(dtype, 2.0))


@pytest.mark.parametrize("path,case_id,dtype,layout", grid(list(NORM_SHAPES)))
def test_batch_norm_eval(torch, path, case_id, dtype, layout):
    shape = NORM_SHAPES[case_id]
    x, gamma, beta, mean = inputs(12, [shape] + [shape[1:2]] * 3, dtype, layout)
    var = np.random.default_rng(12).uniform(0.5, 2.0, shape[1:2]).astype(dtype)
    check_op(path, lambda k, x, g, b, m, v: (k.batch_norm_forward_eval(x, g, b, m, v, EPS), None),
             lambda x, g, b, m, v: torch.nn.functional.batch_norm(x, m, v, g, b, eps=EPS),
             [x, gamma, beta, mean, var], torch, tolerance(dtype), grad=False)


@pytest.mark.parametrize("path,case_id,dtype,layout", grid(["batch1", "batch7"]))
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_linear(torch, path, case_id, dtype, layout, with_bias):
    n = {"batch1": 1, "batch7": 7}[case_id]
    arrays = inputs(13, [(n, 9), (5, 9), (5,)][:3 if with_bias else 2], dtype, layout)

    def ours(k, x, w, b=None):
        return k.linear_forward(x, w, b), lambda gy: k.linear_backward(gy, x, w,
                                                                      need_b=with_bias)

    check_op(path, ours, torch.nn.functional.linear, arrays, torch, tolerance(dtype))


def test_linear_backward_computes_only_the_gradients_asked_for():
    for path in PATHS:
        k = dispatch.kernels_of(path)
        gy, x, w = (np.ones(s, np.float32) for s in ((2, 3), (2, 4), (3, 4)))
        gx, gw, gb = k.linear_backward(gy, x, w, need_x=False, need_w=True, need_b=False)
        assert gx is None and gb is None and gw.shape == (3, 4), path
