"""Tensor-core convolution check: are cnnfast's TF32 and BF16 kernels right, and how fast?

    python benchmarks/gpu_tc_check.py OUT_DIR          on a GPU (sm_80 or newer), under 90 s
    python benchmarks/gpu_tc_check.py OUT_DIR --sim    Numba's simulator, tiny shapes (CI)

1. Correctness: forward, backward data and backward weight, each with FP32 (SIMT), TF32 and
   BF16 (tensor-core) kernels, at the ResNet-18 layer shapes of 28 x 28 images (2D) and 28^3
   volumes (3D), against a float64 reference (PyTorch/cuDNN in float64 on the GPU, NumPy's
   reference path in the simulator). Every element must lie within the bound derived from the
   rounding, ``cnnfast.cuda._mma.error_bound``: (2u + u^2 + gamma_n) * sum |a||b| with
   u = 2^-11 (TF32), 2^-8 (BF16), 0 (FP32) and gamma_n for n float32 accumulations.
2. Speed (GPU only): each pass timed with CUDA events (warm-up first, median of repeats) for
   cnnfast FP32 / TF32 / BF16 and PyTorch + cuDNN with TF32 off, TF32 on and BF16 inputs; the
   TF32 forward also with each candidate MMA tile shape. Reported as ms and TFLOP/s, with the
   issue's targets: TF32 >= 3x cnnfast FP32 and >= 0.5x cuDNN TF32 on layers of >= 64 channels.
3. Training: SmallCNN fitted on the synthetic nodule task with each kernel family (same seed),
   each model's test AUROC under each precision: how much TF32 / BF16 change the result.

Writes OUT_DIR/tc_check.json and prints a summary; exit status 0 when every check passed (the
speed targets are reported, not enforced). A time budget stops the benchmark early (what was
left out is listed) so the whole run stays within its limit.
"""

from __future__ import annotations

import argparse
import contextlib
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
    sys.setswitchinterval(5e-4)  # the simulator polls one Python thread per CUDA thread
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working tree's cnnfast

import cnnfast  # noqa: E402
import cnnfast.config  # noqa: E402
from cnnfast.backend import to_numpy  # noqa: E402
from cnnfast.bench import ConvShape, benchmark, conv_shapes, relative_error  # noqa: E402
from cnnfast.cuda import _mma, conv  # noqa: E402
from cnnfast.cuda import _runtime as rt  # noqa: E402
from cnnfast.reference import conv as ref_conv  # noqa: E402

PASSES = ("forward", "backward_data", "backward_weight")
KERNELS = {"fp32": "highest", "tf32": "high", "bf16": "medium"}  # -> float32 matmul precision
MMA_CANDIDATES = {"128x64/w4x2": rt.GPU_MMA_TILES,
                  "64x64/w2x2": rt.MmaTiles(64, 64, 16, 2, 2),
                  "64x128/w2x4": rt.MmaTiles(64, 128, 16, 2, 4)}
BUDGET_S = 75.0  # the benchmark starts no new shape after this much wall time


def precision(name: str):
    """The float32 matmul precision for a block (``cnnfast.set_float32_matmul_precision``)."""
    return cnnfast.config.using_config(matmul_precision=name)


# --- shapes ---------------------------------------------------------------------------------

def _rebatch(s: ConvShape, n: int) -> ConvShape:
    return ConvShape(s.shape_id, n, s.C, s.K, s.size, s.kernel, s.stride, s.padding, s.dilation,
                     s.groups)


def check_shapes() -> list[ConvShape]:
    if SIM:
        return [ConvShape("tiny.3x3", 2, 5, 10, (7, 6), (3, 3), (1, 1), (1, 1)),
                ConvShape("tiny.down", 1, 6, 12, (8, 7), (3, 3), (2, 2), (1, 1)),
                ConvShape("tiny3d.down", 1, 3, 5, (5, 4, 6), (3, 3, 3), (2, 2, 2), (1, 1, 1))]
    return ([_rebatch(s, 4) for s in conv_shapes("r18-28")]
            + [_rebatch(s, 1) for s in conv_shapes("r18-3d")])


def bench_shapes() -> list[ConvShape]:
    """ResNet-18's layers at the bench's batches, 2D and 3D taking turns (the time budget may
    stop the list early); in the simulator one tiny shape, untimed."""
    if SIM:
        return check_shapes()[:1]
    two, three = conv_shapes("r18-28"), conv_shapes("r18-3d")
    turns = [s for pair in zip(two, three) for s in pair]
    return turns + two[len(turns) // 2:] + three[len(turns) // 2:]


def mma_candidates() -> dict:
    return {"small": rt.SMALL_MMA_TILES} if SIM else MMA_CANDIDATES


# --- arrays and the float64 reference ---------------------------------------------------------

def _device(a):
    if SIM:
        return np.ascontiguousarray(a)
    import cupy

    return cupy.asarray(a)


def _torch():
    if SIM:
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _torch_ops(torch, nd: int):
    tf, grad = torch.nn.functional, torch.nn.grad
    return ((tf.conv2d, grad.conv2d_input, grad.conv2d_weight) if nd == 2 else
            (tf.conv3d, grad.conv3d_input, grad.conv3d_weight))


def reference(s: ConvShape, x, w, gy) -> dict:
    """{pass: (exact result, exact sum of |products|)} in float64 (x, w, gy host float32)."""
    args = (s.stride, s.padding, s.dil, s.groups)
    torch = _torch()
    if torch is None:
        x, w, gy = (a.astype(np.float64) for a in (x, w, gy))
        ax, aw, agy = np.abs(x), np.abs(w), np.abs(gy)
        return {"forward": (ref_conv.conv_forward(x, w, *args),
                            ref_conv.conv_forward(ax, aw, *args)),
                "backward_data": (ref_conv.conv_backward_data(gy, w, x.shape, *args),
                                  ref_conv.conv_backward_data(agy, aw, x.shape, *args)),
                "backward_weight": (ref_conv.conv_backward_weight(gy, x, w.shape, *args),
                                    ref_conv.conv_backward_weight(agy, ax, w.shape, *args))}
    fwd, bwd_in, bwd_w = _torch_ops(torch, s.nd)
    kw = {"stride": s.stride, "padding": s.padding, "dilation": s.dil, "groups": s.groups}
    t = [torch.from_numpy(a).to("cuda", torch.float64) for a in (x, w, gy)]
    xt, wt, gyt = t
    ax, aw, agy = (v.abs() for v in t)
    with torch.no_grad():
        out = {"forward": (fwd(xt, wt, **kw), fwd(ax, aw, **kw)),
               "backward_data": (bwd_in(xt.shape, wt, gyt, **kw), bwd_in(xt.shape, aw, agy, **kw)),
               "backward_weight": (bwd_w(xt, wt.shape, gyt, **kw), bwd_w(ax, wt.shape, agy, **kw))}
    return {k: (a.cpu().numpy(), b.cpu().numpy()) for k, (a, b) in out.items()}


def reduction(s: ConvShape, pass_name: str) -> int:
    cg, kg = s.C // s.groups, s.K // s.groups
    taps = math.prod(s.kernel)
    return {"forward": cg * taps, "backward_data": kg * taps,
            "backward_weight": s.N * math.prod(s.out)}[pass_name]


def run_pass(pass_name: str, s: ConvShape, x, w, gy):
    args = (s.stride, s.padding, s.dil, s.groups)
    if pass_name == "forward":
        return conv.conv_forward(x, w, *args)
    if pass_name == "backward_data":
        return conv.conv_backward_data(gy, w, x.shape, *args)
    return conv.conv_backward_weight(gy, x, w.shape, *args)


def _inputs(s: ConvShape, rng):
    x = rng.standard_normal((s.N, s.C) + s.size).astype(np.float32)
    w = (rng.standard_normal((s.K, s.C // s.groups) + s.kernel)
         / math.sqrt(s.C // s.groups * math.prod(s.kernel))).astype(np.float32)
    gy = rng.standard_normal((s.N, s.K) + s.out).astype(np.float32)
    return x, w, gy


# --- 1. correctness ---------------------------------------------------------------------------

def check(rng) -> list[dict]:
    rows = []
    for s in check_shapes():
        x, w, gy = _inputs(s, rng)
        exact = reference(s, x, w, gy)
        xd, wd, gyd = _device(x), _device(w), _device(gy)
        for kernel, setting in KERNELS.items():
            with precision(setting):
                for pass_name in PASSES:
                    try:
                        got = to_numpy(run_pass(pass_name, s, xd, wd, gyd)).astype(np.float64)
                    except Exception as exc:  # noqa: BLE001 - one run on a GPU: record, go on
                        rows.append({"shape": s.shape_id, "label": s.label(), "kernel": kernel,
                                     "pass": pass_name, "ok": False, "max_error_over_bound":
                                     math.inf, "error": f"{type(exc).__name__}: {exc}"[:2000]})
                        print(f"  ERROR {kernel} {pass_name} {s.shape_id}: {rows[-1]['error']}",
                              flush=True)
                        continue
                    want, abs_sum = exact[pass_name]
                    bound = _mma.error_bound(abs_sum, reduction(s, pass_name), kernel)
                    err = np.abs(got - want)
                    finite = bool(np.isfinite(got).all())
                    rows.append({
                        "shape": s.shape_id, "label": s.label(), "kernel": kernel,
                        "pass": pass_name, "reduction": reduction(s, pass_name),
                        "max_error_over_bound": float(np.max(err / np.maximum(bound, 1e-300))),
                        "relative_l2_error": relative_error(got, want, norm="l2"),
                        "ok": finite and bool((err <= bound).all())})
    return rows


# --- 2. speed -----------------------------------------------------------------------------------

def _time_ms(fn, repeats: int = 5, warmup: int = 2) -> float:
    """Median CUDA-event milliseconds of ``fn`` by the one timer (``cnnfast.bench.benchmark``;
    CuPy's and PyTorch's work share the legacy stream); in the simulator ``fn`` runs once and
    the time is 0."""
    if SIM:
        fn()
        return 0.0
    timing = benchmark(fn, repeats=repeats, warmup=warmup, events="cupy", max_duration=1.0,
                       min_repeats=3)
    return float(np.median(timing.gpu_times) * 1e3)


def _torch_times(torch, s: ConvShape, x, w, gy) -> dict:
    fwd, bwd_in, bwd_w = _torch_ops(torch, s.nd)
    kw = {"stride": s.stride, "padding": s.padding, "dilation": s.dil, "groups": s.groups}
    out = {}
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    for name, dtype, tf32 in (("cudnn_fp32", torch.float32, False),
                              ("cudnn_tf32", torch.float32, True),
                              ("cudnn_bf16", torch.bfloat16, False)):
        cudnn.allow_tf32 = matmul.allow_tf32 = tf32
        xt, wt, gyt = (torch.from_numpy(a).to("cuda", dtype) for a in (x, w, gy))
        with torch.no_grad():
            runs = {"forward": lambda: fwd(xt, wt, **kw),
                    "backward_data": lambda: bwd_in(xt.shape, wt, gyt, **kw),
                    "backward_weight": lambda: bwd_w(xt, wt.shape, gyt, **kw)}
            for pass_name, fn in runs.items():
                out[f"{name}_{pass_name}_ms"] = _time_ms(fn)
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    return out


def bench(rng, start: float) -> tuple[list[dict], list[str]]:
    rows, skipped = [], []
    torch = _torch()
    for s in bench_shapes():
        if not SIM and time.perf_counter() - start > BUDGET_S:
            skipped.append(s.shape_id)
            continue
        x, w, gy = _inputs(s, rng)
        xd, wd, gyd = _device(x), _device(w), _device(gy)
        row = {"shape": s.shape_id, "label": s.label(), "channels": min(s.C, s.K),
               "gflop": s.flops() / 1e9, "errors": []}

        def timed(key, fn):
            try:
                row[key] = _time_ms(fn)
            except Exception as exc:  # noqa: BLE001 - one run on a GPU: record, go on
                row["errors"].append(f"{key}: {type(exc).__name__}: {exc}"[:1000])

        for kernel, setting in KERNELS.items():
            with precision(setting):
                for pass_name in PASSES:
                    timed(f"cnnfast_{kernel}_{pass_name}_ms",
                          lambda p=pass_name: run_pass(p, s, xd, wd, gyd))
        with precision("high"):
            for name, tiles in mma_candidates().items():
                with rt.launch_config(mma_tiles=tiles):
                    timed(f"tiles {name} tf32_forward_ms",
                          lambda: run_pass("forward", s, xd, wd, gyd))
        if torch is not None:
            try:
                row.update(_torch_times(torch, s, x, w, gy))
            except Exception as exc:  # noqa: BLE001 - one run on a GPU: record, go on
                row["errors"].append(f"torch: {type(exc).__name__}: {exc}"[:1000])
        for key in [k for k in row if k.endswith("_ms")]:
            row[key[:-3] + "_tflops"] = row["gflop"] / row[key] if row[key] > 0 else 0.0
        rows.append(row)
        print(f"bench {s.shape_id:<22} " + ", ".join(
            f"{k[:-3]} {row[k]:.3f}" for k in row if k.endswith("forward_ms")), flush=True)
        for error in row["errors"]:
            print(f"  ERROR {s.shape_id} {error}", flush=True)
    return rows, skipped


# --- 3. training with each precision ------------------------------------------------------------

def train_compare() -> dict:
    """SmallCNN fitted on the synthetic nodule task from one seed with each kernel family, then
    every model scored on the test split under every precision: how far TF32 / BF16 training
    and evaluation move the AUROC from FP32's (the measured difference)."""
    from cnnfast import models, synthetic
    from cnnfast.train import TrainConfig, evaluate, fit

    n_train, n_test, epochs, channels = (8, 8, 1, (2, 2, 2)) if SIM else (2048, 512, 3,
                                                                          (8, 16, 32))
    data = synthetic.nodule_dataset(n_train, n_test, n_test, seed=0, size=8 if SIM else 28)
    out = {"epochs": epochs, "train": n_train, "auroc": {}}
    trained = {}
    for kernel, setting in KERNELS.items():
        model = models.SmallCNN(data.in_channels, data.num_outputs, channels=channels,
                                seed=0).to("cuda")
        cfg = TrainConfig(epochs=epochs, batch_size=8 if SIM else 64, lr=3e-3,
                          schedule="none", seed=0, device="cuda")
        start = time.perf_counter()
        with precision(setting):
            fit(model, data, cfg, progress=False)
        out[f"fit_{kernel}_s"] = round(time.perf_counter() - start, 2)
        trained[kernel] = model
    for trained_with, model in trained.items():
        for scored_with, setting in KERNELS.items():
            with precision(setting):
                metrics, _ = evaluate(model, data.test, data.task, device="cuda")
            out["auroc"][f"{trained_with} scored {scored_with}"] = float(metrics.auc)
    fp32 = out["auroc"]["fp32 scored fp32"]
    out["largest_auroc_change"] = max(abs(v - fp32) for v in out["auroc"].values())
    return out


def _geomean(values) -> float:
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def targets(rows: list[dict]) -> dict:
    """Throughput ratios per pass over the layers of >= 64 channels (geometric means)."""
    wide = [r for r in rows if r["channels"] >= 64]
    out = {}
    for pass_name in PASSES:
        ratio = {}
        for name, num, den in (("tf32_over_fp32", "cnnfast_fp32", "cnnfast_tf32"),
                               ("bf16_over_fp32", "cnnfast_fp32", "cnnfast_bf16"),
                               ("tf32_vs_cudnn_tf32", "cudnn_tf32", "cnnfast_tf32"),
                               ("bf16_vs_cudnn_bf16", "cudnn_bf16", "cnnfast_bf16")):
            pairs = [r[f"{num}_{pass_name}_ms"] / r[f"{den}_{pass_name}_ms"] for r in wide
                     if f"{num}_{pass_name}_ms" in r and r.get(f"{den}_{pass_name}_ms")]
            ratio[name] = _geomean(pairs)
        ratio["target_tf32_3x_fp32"] = bool(ratio["tf32_over_fp32"] >= 3)
        ratio["target_tf32_half_cudnn"] = bool(ratio["tf32_vs_cudnn_tf32"] >= 0.5)
        out[pass_name] = ratio
    best = {}
    for r in wide:
        times = {k.split()[1]: r[k] for k in r if k.startswith("tiles ") and k.endswith("_ms")}
        if times:
            fastest = min(times, key=times.get)
            best[fastest] = best.get(fastest, 0) + 1
    out["fastest_mma_tiles_count"] = best
    return out


def _environment() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"]
    out = {"device": name.decode() if isinstance(name, bytes) else str(name),
           "compute_capability": f"{props['major']}.{props['minor']}",
           "driver_cuda": cupy.cuda.runtime.driverGetVersion(), "versions": {}}
    for dist in ("numba-cuda", "cupy-cuda13x", "cupy-cuda12x", "torch", "cuda-bindings",
                 "nvidia-nvjitlink", "nvidia-cuda-nvrtc"):
        try:
            out["versions"][dist] = version(dist)
        except PackageNotFoundError:
            pass
    try:
        from numba.cuda.cudadrv.driver import _have_nvjitlink

        out["numba_lto"] = bool(_have_nvjitlink())  # the wrappers inline only with LTO
    except Exception as exc:  # noqa: BLE001 - a numba-cuda without that probe
        out["numba_lto"] = f"unknown ({exc})"
    return out


def _compiled_kernels(records) -> list[dict]:
    """Registers, local memory (spills) and shared memory of each conv kernel the check ran, as
    the driver reports them for this GPU."""
    out, seen = [], set()
    for r in records:
        tiles = getattr(r.dispatcher, "cnnfast_tiles", None)
        if tiles is None or id(r.dispatcher) in seen:
            continue
        seen.add(id(r.dispatcher))
        row = {"kernel": r.kernel, "tiles": str(tiles)}
        try:
            for what in ("regs_per_thread", "local_mem_per_thread", "shared_mem_per_block"):
                row[what] = list(getattr(r.dispatcher, f"get_{what}")().values())
        except Exception as exc:  # noqa: BLE001 - report, do not fail the check
            row["error"] = str(exc)[:300]
        out.append(row)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--sim", action="store_true", help="Numba's simulator, tiny shapes")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if not SIM and not cnnfast.backend.gpu_present():
        print("gpu_tc_check: no GPU visible through CuPy (--sim runs the simulator)",
              file=sys.stderr)
        return 2
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    report = {"sim": SIM, "tool": "benchmarks/gpu_tc_check.py"}
    if not SIM:
        report.update(_environment())
    small = rt.launch_config(tiles=rt.SMALL_TILES, threads=32, mma_tiles=rt.SMALL_MMA_TILES)
    with small if SIM else contextlib.nullcontext(), rt.count_launches() as launched:
        checks = check(rng)
        report["check_seconds"] = round(time.perf_counter() - start, 1)
        failed = [r for r in checks if not r["ok"]]
        print(f"check: {len(checks) - len(failed)} of {len(checks)} within the derived bound "
              f"({report['check_seconds']} s)", flush=True)
        for r in failed:
            print(f"  FAILED {r['kernel']} {r['pass']} {r['shape']}: error / bound "
                  f"{r['max_error_over_bound']:.3g}")
        try:
            training = train_compare()
            print(f"training: AUROC {training['auroc']} (largest change from FP32 "
                  f"{training['largest_auroc_change']:.4f})", flush=True)
        except Exception as exc:  # noqa: BLE001 - one run on a GPU: record, go on
            training = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            print(f"  ERROR training: {training['error']}", flush=True)
        rows, skipped = bench(rng, start)  # last: it stops at the time budget
    report["kernels"] = [] if SIM else _compiled_kernels(launched)
    report.update({"checks": checks, "bench": rows, "skipped_for_time": skipped,
                   "training": training,
                   "targets": targets(rows) if rows else {},
                   "seconds": round(time.perf_counter() - start, 1),
                   "verdict": "fail" if failed else "pass"})
    for pass_name, ratio in report["targets"].items():
        if pass_name in PASSES:
            print(f"  {pass_name:<16} tf32/fp32 {ratio['tf32_over_fp32']:.2f}x, bf16/fp32 "
                  f"{ratio['bf16_over_fp32']:.2f}x, tf32 vs cuDNN tf32 "
                  f"{ratio['tf32_vs_cudnn_tf32']:.2f}, bf16 vs cuDNN bf16 "
                  f"{ratio['bf16_vs_cudnn_bf16']:.2f} (throughput, layers >= 64 channels)")
    (args.out_dir / "tc_check.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"tc check: {report['verdict'].upper()} in {report['seconds']} s"
          + (f"; benchmark skipped for time: {', '.join(skipped)}" if skipped else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
