"""The Python half of ``benchmarks/gpu_check.sh`` (the GPU acceptance check; see README.md).

    python benchmarks/gpu_check.py ops     OUT_DIR [--sim]   every op vs the CPU reference
    python benchmarks/gpu_check.py step    OUT_DIR [--sim]   one SmallCNN training step
    python benchmarks/gpu_check.py bench   OUT_DIR [--sim]   cnnfast vs PyTorch + cuDNN
    python benchmarks/gpu_check.py summary OUT_DIR           read the JSONs, print a summary

On a GPU the shapes are real: the convolutions of SmallCNN (28x28) and of ResNet-18 2D (28x28)
and 3D (28^3), their activations, and full training steps. With ``--sim`` everything runs in
Numba's CUDA simulator on tiny shapes and the hardware-only parts (timings against cuDNN, host
launch cost) are skipped, so CI can test this script's logic. GPU work is timed with CUDA events
after warm-up runs (compilation stays out), the median of the repeats reported.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

SIM = "--sim" in sys.argv
if SIM:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    # The simulator runs one Python thread per CUDA thread and polls them at barriers: a short
    # switch interval makes it several times faster (tests/conftest.py does the same).
    sys.setswitchinterval(5e-4)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working tree's cnnfast

import cnnfast  # noqa: E402
from cnnfast import functional as F  # noqa: E402
from cnnfast import models, optim  # noqa: E402
from cnnfast.backend import to_numpy  # noqa: E402
from cnnfast.bench import (  # noqa: E402
    ConvShape,
    benchmark,
    conv_shapes,
    relative_error,
    resnet18_conv_shapes,
)
from cnnfast.cuda import _runtime as rt  # noqa: E402
from cnnfast.reference import activation as ref_act  # noqa: E402
from cnnfast.reference import conv as ref_conv  # noqa: E402
from cnnfast.reference import norm as ref_norm  # noqa: E402
from cnnfast.reference import pool as ref_pool  # noqa: E402

# float32 kernels against a float64 reference: relative error norms land far below this
F32_TOLERANCE = 1e-4


def _device(a):
    if SIM:
        return np.asarray(a)
    import cupy

    return cupy.asarray(a)


def _sync():
    if not SIM:
        import cupy

        cupy.cuda.get_current_stream().synchronize()


# --- shapes -------------------------------------------------------------------------------------

def smallcnn_conv_shapes(batch: int, size: int) -> list[ConvShape]:
    return [ConvShape("smallcnn.conv1", batch, 1, 8, (size, size), (3, 3), (1, 1), (1, 1)),
            ConvShape("smallcnn.conv2", batch, 8, 16, (size // 2,) * 2, (3, 3), (1, 1), (1, 1)),
            ConvShape("smallcnn.conv3", batch, 16, 32, (size // 4,) * 2, (3, 3), (1, 1), (1, 1))]


def check_conv_shapes() -> list[ConvShape]:
    """Real layer shapes at a small batch (the reference is NumPy); tiny ones in the simulator."""
    if SIM:
        return conv_shapes("tiny")
    return (smallcnn_conv_shapes(4, 28) + [_rebatch(s, 2) for s in conv_shapes("r18-28")]
            + [_rebatch(s, 1) for s in conv_shapes("r18-3d")])


def bench_conv_shapes(full: bool = False) -> list[ConvShape]:
    """SmallCNN (batch 128) and ResNet-18 layers at 28x28 (batch 32) and 28^3 (batch 8); with
    ``full`` also ResNet-18 at 64x64 (batch 32), 224x224 (batch 8) and 64^3 (batch 2)."""
    if SIM:
        return conv_shapes("tiny")[:1]
    shapes = smallcnn_conv_shapes(128, 28) + conv_shapes("r18-28") + conv_shapes("r18-3d")
    if full:
        shapes += (conv_shapes("r18-64") + resnet18_conv_shapes(224, 2, 8, prefix="r18-224.")
                   + resnet18_conv_shapes(64, 3, 2, prefix="r18-3d-64."))
    return shapes


def bench_steps() -> tuple[tuple[str, int, int, int], ...]:
    """(model, spatial rank, batch, size) of the timed training steps."""
    if SIM:
        return (("smallcnn", 2, 2, 4),)
    return (("smallcnn", 2, 128, 28), ("resnet18", 2, 128, 28), ("resnet18_3d", 3, 32, 28))


def _rebatch(shape: ConvShape, n: int) -> ConvShape:
    return ConvShape(shape.shape_id, n, shape.C, shape.K, shape.size, shape.kernel, shape.stride,
                     shape.padding, shape.dilation, shape.groups)


def activation_shapes() -> dict[str, tuple[int, ...]]:
    if SIM:
        return {"tiny.act": (2, 3, 6, 7), "tiny.act3d": (1, 2, 4, 3, 4)}
    return {"smallcnn.act": (16, 8, 28, 28), "r18-28.act": (4, 64, 28, 28),
            "r18-3d.act": (1, 64, 28, 28, 28)}


# --- (b) every op against the CPU reference -------------------------------------------------------

def check_ops(out_dir: Path) -> int:
    from cnnfast.cuda import activation, conv, norm, pool

    rng = np.random.default_rng(0)
    rows = []

    def record(op, shape_id, got, want, tolerance=F32_TOLERANCE):
        err = relative_error(got, want, "l2")   # ||got - want|| / ||want||, in float64
        rows.append({"op": op, "shape": shape_id, "relative_error": err,
                     "ok": bool(err <= tolerance)})

    for s in check_conv_shapes():
        x = rng.standard_normal((s.N, s.C) + s.size)
        w = rng.standard_normal((s.K, s.C // s.groups) + s.kernel) / math.sqrt(
            s.C * math.prod(s.kernel))
        b = rng.standard_normal(s.K)
        args = (s.stride, s.padding, s.dil, s.groups)
        y64 = ref_conv.conv_forward(x, w, *args)
        gy = rng.standard_normal(y64.shape)
        xd, wd, bd, gyd = (_device(a.astype(np.float32)) for a in (x, w, b, gy))
        record("conv_forward", s.shape_id, conv.conv_forward(xd, wd, *args), y64)
        record("conv_bias_relu_forward", s.shape_id,
               conv.conv_bias_relu_forward(xd, wd, bd, True, *args),
               np.maximum(ref_conv.bias_add(y64, b), 0))
        record("conv_backward_data", s.shape_id, conv.conv_backward_data(gyd, wd, x.shape, *args),
               ref_conv.conv_backward_data(gy, w, x.shape, *args))
        record("conv_backward_weight", s.shape_id,
               conv.conv_backward_weight(gyd, xd, w.shape, *args),
               ref_conv.conv_backward_weight(gy, x, w.shape, *args))
        record("bias_grad", s.shape_id, conv.bias_grad(gyd), ref_conv.bias_grad(gy))

    for shape_id, shape in activation_shapes().items():
        nd = len(shape) - 2
        x = rng.standard_normal(shape) * 2 + 1
        xd = _device(x.astype(np.float32))
        c = shape[1]
        gamma, beta = rng.random(c) + 0.5, rng.standard_normal(c)
        gd, bd = _device(gamma.astype(np.float32)), _device(beta.astype(np.float32))
        y, mean, invstd = norm.batch_norm_relu_forward_train(xd, gd, bd, 1e-5)
        y_ref, mean_ref, invstd_ref = ref_norm.batch_norm_forward_train(x, gamma, beta, 1e-5)
        record("batch_norm_relu_forward_train", shape_id, y, np.maximum(y_ref, 0))
        record("batch_norm mean", shape_id, mean, mean_ref)
        record("batch_norm invstd", shape_id, invstd, invstd_ref)
        gy = rng.standard_normal(shape)
        mask = np.maximum(y_ref, 0) > 0
        got = norm.batch_norm_relu_backward(_device(gy.astype(np.float32)), xd, y, gd,
                                            _device(mean_ref.astype(np.float32)),
                                            _device(invstd_ref.astype(np.float32)))
        want = ref_norm.batch_norm_backward(np.where(mask, gy, 0), x, gamma, mean_ref, invstd_ref)
        # the ReLU mask comes from float32 outputs: a value at 0 can flip; compare loosely
        for name, g, wv in zip(("gx", "ggamma", "gbeta"), got, want):
            record(f"batch_norm_relu_backward {name}", shape_id, g, wv, 1e-3)
        record("relu_forward", shape_id, activation.relu_forward(xd), ref_act.relu_forward(x))
        for kind, window in (("max", ((3,) * nd, (2,) * nd, (1,) * nd)),
                             ("avg", ((2,) * nd, (2,) * nd, (0,) * nd))):
            if kind == "max":
                yp, idx = pool.max_pool_forward(xd, *window)
                yp_ref, idx_ref = ref_pool.max_pool_forward(x.astype(np.float32), *window)
                record("max_pool_forward", shape_id, yp, yp_ref, 0.0)
                gyp = rng.standard_normal(yp_ref.shape)
                record("max_pool_backward", shape_id,
                       pool.max_pool_backward(_device(gyp.astype(np.float32)), idx, shape),
                       ref_pool.max_pool_backward(gyp, idx_ref, shape))
            else:
                yp = pool.avg_pool_forward(xd, *window)
                record("avg_pool_forward", shape_id, yp, ref_pool.avg_pool_forward(x, *window))
                gyp = rng.standard_normal(to_numpy(yp).shape)
                record("avg_pool_backward", shape_id,
                       pool.avg_pool_backward(_device(gyp.astype(np.float32)), shape, *window),
                       ref_pool.avg_pool_backward(gyp, shape, *window))

    rows += _check_training_step()
    failed = [r for r in rows if not r["ok"]]
    (out_dir / "ops.json").write_text(json.dumps({"sim": SIM, "rows": rows}, indent=1) + "\n")
    print(f"ops: {len(rows) - len(failed)} of {len(rows)} within tolerance")
    for r in failed:
        print(f"  FAILED {r['op']} {r['shape']}: relative error {r['relative_error']:.3e}")
    return 1 if failed else 0


def _step_model(device: str, nd: int = 2):
    model = models.SmallCNN(seed=0, spatial_dims=nd).to(device)
    # SGD, not Adam, for the cross-check: Adam turns a gradient that is rounding noise around 0
    # (batch norm over a 1x1 map) into a full step of either sign
    return model, optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def _step_batch(batch: int, size: int, nd: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 1) + (size,) * nd).astype(np.float32)
    return x, (np.arange(batch) % 2).astype(np.int64)


def train_step(model, opt, x, target, device: str):
    opt.zero_grad()
    loss = F.cross_entropy(model(cnnfast.tensor(x, device=device)),
                           cnnfast.tensor(target, device=device))
    loss.backward()
    opt.step()
    return loss


def _check_training_step() -> list[dict]:
    """SmallCNN SGD steps on cuda against the fast CPU path (2D, and 3D on a GPU)."""
    rows = []
    steps = 2 if SIM else 3
    for nd, batch, size in ((2, 2, 4),) if SIM else ((2, 32, 28), (3, 4, 28)):
        x, target = _step_batch(batch, size, nd)
        params = {}
        for device in ("cpu", "cuda"):
            model, opt = _step_model(device, nd)
            for _ in range(steps):
                train_step(model, opt, x, target, device)
            params[device] = {k: to_numpy(v) for k, v in model.state_dict().items()}
        # over all parameters at once: one whose gradient is rounding noise around 0 (a batch
        # norm bias before a 1x1 map) has no meaningful relative error of its own
        keys = sorted(params["cpu"])
        worst = relative_error(np.concatenate([params["cuda"][k].ravel() for k in keys]),
                               np.concatenate([params["cpu"][k].ravel() for k in keys]), "l2")
        rows.append({"op": f"SmallCNN {steps} SGD steps vs cpu",
                     "shape": f"{nd}d {batch}x{size}",
                     "relative_error": worst, "ok": bool(worst <= 1e-3)})
    return rows


# --- (c) what compute-sanitizer watches --------------------------------------------------------

def one_step(out_dir: Path) -> int:
    batch, size = (2, 4) if SIM else (16, 28)
    model, opt = _step_model("cuda")
    x, target = _step_batch(batch, size)
    with rt.count_launches() as records:
        loss = float(train_step(model, opt, x, target, "cuda").item())
    _sync()
    print(f"step: SmallCNN batch {batch}, loss {loss:.4f}, {len(records)} launches, "
          f"{sum(r.arguments for r in records)} kernel arguments")
    return 0 if math.isfinite(loss) else 1


# --- (d) the benchmark -------------------------------------------------------------------------

def _timer(repeats: int, events: str = "cupy", budget_ms: float = 1500.0):
    """A function timing ``fn`` with CUDA events by the one timer (cnnfast.bench.benchmark; the
    callers warm up themselves): the median ms of ``repeats`` runs, fewer (at least 3) when one
    run would take the item past ``budget_ms``."""
    def time_ms(fn):
        timing = benchmark(fn, repeats=repeats, warmup=0, events=events,
                           max_duration=budget_ms / 1e3, min_repeats=3)
        return float(np.median(timing.gpu_times) * 1e3)
    return time_ms


def _torch_timer(torch, repeats: int):
    return _timer(repeats, events="torch")


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def bench(out_dir: Path, full: bool = False) -> int:
    from cnnfast.cuda import conv

    torch = _torch()
    torch_cuda = torch is not None and not SIM and torch.cuda.is_available()
    repeats, warmup = (1, 0) if SIM else (10, 3)
    result = {"sim": SIM, "conv": [], "steps": [], "launch": {}, "skipped": []}
    if SIM:
        result["skipped"].append("timings against cuDNN and host launch cost need a GPU")
    time_ms = (lambda fn: (fn(), 0.0)[1]) if SIM else _timer(repeats)
    rng = np.random.default_rng(0)

    for s in bench_conv_shapes(full):
        x = _device(rng.standard_normal((s.N, s.C) + s.size).astype(np.float32))
        w = _device((rng.standard_normal((s.K, s.C // s.groups) + s.kernel) * 0.1).astype(
            np.float32))
        args = (s.stride, s.padding, s.dil, s.groups)
        y = conv.conv_forward(x, w, *args)
        gy = _device(rng.standard_normal(to_numpy(y).shape if SIM else y.shape).astype(
            np.float32))
        runs = {"forward": lambda: conv.conv_forward(x, w, *args),
                "backward_data": lambda: conv.conv_backward_data(gy, w, x.shape, *args),
                "backward_weight": lambda: conv.conv_backward_weight(gy, x, w.shape, *args)}
        row = {"shape": s.shape_id, "label": s.label(), "C": s.C, "K": s.K,
               "gflop": s.flops() / 1e9}
        for name, fn in runs.items():
            for _ in range(warmup):
                fn()
            row[f"cnnfast_{name}_ms"] = time_ms(fn)
        if not SIM:  # the same passes with the tiles autotune picks (tuned on the warm-up call)
            with cnnfast.config.using_config(cuda_autotune=True, cache_dir=str(out_dir)):
                for name, fn in runs.items():
                    for _ in range(warmup):
                        fn()
                    row[f"cnnfast_tuned_{name}_ms"] = time_ms(fn)
        if torch_cuda:
            row.update(_torch_conv(torch, s, to_numpy(x), to_numpy(w), to_numpy(gy), repeats,
                                   warmup))
        result["conv"].append(row)
        print(f"conv {s.shape_id}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()
                                                   if k.endswith("_ms")))

    for name, nd, batch, size in bench_steps():
        x, target = _step_batch(batch, size, nd)
        build = (lambda d: models.SmallCNN(seed=0).to(d)) if name == "smallcnn" else (
            lambda d: models.resnet18(seed=0, spatial_dims=nd).to(d))
        model = build("cuda")
        opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        step = lambda: train_step(model, opt, x, target, "cuda")  # noqa: E731
        with rt.count_launches() as records:
            step()  # the first step (a warm-up on a GPU) is the one counted
        for _ in range(warmup - 1):
            step()
        row = {"model": name, "batch": batch, "size": size, "launches": len(records),
               "kernel_arguments": sum(r.arguments for r in records),
               "cnnfast_ms": 0.0 if SIM else time_ms(step)}
        if not SIM:
            _sync()
            start = time.perf_counter()
            step()  # host time: everything but the wait for the GPU
            row["cnnfast_host_ms"] = (time.perf_counter() - start) * 1e3
            _sync()
        if torch_cuda:
            row.update(_torch_step(torch, model, x, target, repeats, warmup))
        result["steps"].append(row)
        print(f"step {name}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "model"))

    if not SIM:
        result["launch"] = _launch_cost()
        print(f"launch: {result['launch']}")
    (out_dir / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _torch_conv(torch, s: ConvShape, x, w, gy, repeats, warmup) -> dict:
    tf = torch.nn.functional
    grad = torch.nn.grad
    dev = "cuda"
    xt, wt, gyt = (torch.from_numpy(a).to(dev) for a in (x, w, gy))
    conv_fn = tf.conv2d if s.nd == 2 else tf.conv3d
    input_fn = grad.conv2d_input if s.nd == 2 else grad.conv3d_input
    weight_fn = grad.conv2d_weight if s.nd == 2 else grad.conv3d_weight
    kw = {"stride": s.stride, "padding": s.padding, "dilation": s.dil, "groups": s.groups}
    time_ms = _torch_timer(torch, repeats)
    out = {}
    for tf32 in (False, True):
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        runs = {"forward": lambda: conv_fn(xt, wt, **kw),
                "backward_data": lambda: input_fn(xt.shape, wt, gyt, **kw),
                "backward_weight": lambda: weight_fn(xt, wt.shape, gyt, **kw)}
        for name, fn in runs.items():
            for _ in range(warmup):
                fn()
            out[f"cudnn{'_tf32' if tf32 else ''}_{name}_ms"] = time_ms(fn)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    return out


def _torch_step(torch, model, x, target, repeats, warmup) -> dict:
    from cnnfast.bench import torch_mirror

    tmodel = torch_mirror(model).to("cuda")
    tmodel.load_state_dict({k: torch.from_numpy(to_numpy(v)) for k, v in
                            model.state_dict().items()}, strict=False)
    topt = torch.optim.SGD(tmodel.parameters(), lr=0.01, momentum=0.9)
    xt, tt = torch.from_numpy(x).cuda(), torch.from_numpy(target).cuda()

    def step():
        topt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(tmodel(xt), tt).backward()
        topt.step()

    out = {}
    time_ms = _torch_timer(torch, repeats)
    for tf32 in (False, True):
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        for _ in range(warmup):
            step()
        out[f"cudnn{'_tf32' if tf32 else ''}_ms"] = time_ms(step)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    return out


def _launch_cost(launches: int = 500) -> dict:
    """Host microseconds to enqueue one launch: through cnnfast's launch path (argument
    conversion, stream lookup) and raw Numba, on a 1-element ReLU (the GPU is never the wait)."""
    import cupy
    from numba import cuda

    from cnnfast.cuda import activation

    x = cupy.ones(1, cupy.float32)
    activation.relu_forward(x)
    y = cupy.empty_like(x)
    kernel = activation._relu_forward_kernel(np.dtype(np.float32))
    xa, ya = cuda.as_cuda_array(x), cuda.as_cuda_array(y)
    kernel[1, 32](xa, ya, 1)
    _sync()
    out = {}
    for name, fn in (("cnnfast_relu_forward_us", lambda: activation.relu_forward(x)),
                     ("cnnfast_launch_us", lambda: rt.launch(kernel, 1, 32, x, y, 1)),
                     ("numba_raw_us", lambda: kernel[1, 32](xa, ya, 1))):
        start = time.perf_counter()
        for _ in range(launches):
            fn()
        out[name] = (time.perf_counter() - start) / launches * 1e6
        _sync()
    return out


# --- summary -----------------------------------------------------------------------------------

def summary(out_dir: Path) -> int:
    status = {}
    status_file = out_dir / "status.txt"
    if status_file.exists():
        for line in status_file.read_text().splitlines():
            name, rc, seconds = line.split()
            status[name] = {"rc": int(rc), "seconds": float(seconds)}
    report = {"sim": SIM, "steps": status}
    for name in ("ops", "bench", "tc_check"):
        path = out_dir / f"{name}.json"
        if path.exists():
            report[name] = json.loads(path.read_text())
    lines = ["", "GPU check summary" + (" (simulator: tiny shapes, no timings)" if SIM else "")]
    for name, s in status.items():
        verdict = {0: "ok", 77: "skipped"}.get(s["rc"], f"FAILED (exit {s['rc']})")
        lines.append(f"  {name:<12} {verdict:<20} {s['seconds']:7.1f} s")
    ops = report.get("ops", {}).get("rows", [])
    if ops:
        worst = max(ops, key=lambda r: r["relative_error"])
        lines.append(f"  ops: {sum(r['ok'] for r in ops)}/{len(ops)} within tolerance; largest "
                     f"relative error {worst['relative_error']:.2e} ({worst['op']} "
                     f"{worst['shape']})")
    for row in report.get("bench", {}).get("steps", []):
        text = (f"  step {row['model']} batch {row['batch']}: {row['launches']} launches, "
                f"{row['kernel_arguments']} arguments")
        if not SIM:
            text += f", cnnfast {row['cnnfast_ms']:.2f} ms"
            for key in ("cudnn_ms", "cudnn_tf32_ms"):
                if key in row:
                    text += f", {key[:-3]} {row[key]:.2f} ms"
        lines.append(text)
    conv_rows = report.get("bench", {}).get("conv", [])
    if conv_rows and not SIM and "cudnn_forward_ms" in conv_rows[0]:
        for name in ("forward", "backward_data", "backward_weight"):
            ratios = [r[f"cnnfast_{name}_ms"] / r[f"cudnn_{name}_ms"] for r in conv_rows]
            lines.append(f"  conv {name}: cnnfast / cuDNN (TF32 off) time, geometric mean "
                         f"{math.exp(np.mean(np.log(ratios))):.2f} over {len(ratios)} layers")
            if all(f"cnnfast_tuned_{name}_ms" in r for r in conv_rows):
                tuned = [r[f"cnnfast_tuned_{name}_ms"] / r[f"cudnn_{name}_ms"] for r in conv_rows]
                lines.append(f"    with autotune's tiles: {math.exp(np.mean(np.log(tuned))):.2f}")
            large = [r for r in conv_rows if min(r.get("C", 0), r.get("K", 0)) >= 64]
            if large:
                share = [r[f"cudnn_{name}_ms"] / r[f"cnnfast_{name}_ms"] for r in large]
                best = max(r["gflop"] / r[f"cnnfast_{name}_ms"] for r in large)
                lines.append(f"    layers with >= 64 channels: cnnfast throughput / cuDNN's "
                             f"{math.exp(np.mean(np.log(share))):.2f} (geometric mean, "
                             f"{len(large)} layers; min {min(share):.2f}, max {max(share):.2f}); "
                             f"best {best:.1f} TFLOP/s")
    tc = report.get("tc_check", {})
    if tc.get("checks"):
        worst = max(tc["checks"], key=lambda r: r["max_error_over_bound"])
        lines.append(f"  tensor cores: {sum(r['ok'] for r in tc['checks'])}/{len(tc['checks'])} "
                     f"within the rounding bound (largest error / bound "
                     f"{worst['max_error_over_bound']:.2f}, {worst['kernel']} {worst['pass']})")
    for name, ratio in tc.get("targets", {}).items():
        if math.isfinite(ratio.get("tf32_over_fp32", math.nan)):  # no timings: the simulator
            lines.append(f"  tensor cores {name}: TF32 {ratio['tf32_over_fp32']:.2f}x cnnfast "
                         f"FP32, {ratio['tf32_vs_cudnn_tf32']:.2f}x cuDNN TF32 throughput")
    launch = report.get("bench", {}).get("launch")
    if launch:
        lines.append("  host us per launch: " + ", ".join(f"{k[:-3]} {v:.1f}"
                                                          for k, v in launch.items()))
    failed = [n for n, s in status.items() if s["rc"] not in (0, 77)]
    lines.append(f"  verdict: {'PASS' if not failed else 'FAIL: ' + ', '.join(failed)}")
    print("\n".join(lines))
    report["verdict"] = "pass" if not failed else "fail"
    (out_dir / "summary.json").write_text(json.dumps(report, indent=1) + "\n")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("ops", "step", "bench", "summary"))
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--sim", action="store_true", help="Numba's simulator, tiny shapes")
    parser.add_argument("--full", action="store_true",
                        help="bench: also ResNet-18 layers at 64x64, 224x224 and 64^3")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if not SIM and not cnnfast.backend.gpu_present():
        if args.what != "summary":
            print("gpu_check: no GPU visible through CuPy (run with --sim to use the simulator)",
                  file=sys.stderr)
            return 2
    with rt.launch_config(tiles=rt.SMALL_TILES, threads=32) if SIM else _nothing():
        if args.what == "bench":
            return bench(args.out_dir, args.full)
        return {"ops": check_ops, "step": one_step, "summary": summary}[args.what](args.out_dir)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    sys.exit(main())
