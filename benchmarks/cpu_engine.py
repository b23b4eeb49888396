"""The CPU engine against its limits: cnnfast's sgemm microkernel against OpenBLAS and the FMA
ceiling, and batch-1 inference against PyTorch, each library in its own process, alternating.

    python benchmarks/cpu_engine.py gemm  [--rounds 3]     # one thread each
    python benchmarks/cpu_engine.py infer [--rounds 3]     # the machine's threads

Each round starts one worker process per candidate, in turn; a worker times its work (best
of several runs, wall clock and its own CPU time) and prints one JSON line. The figures are
the best over rounds; the machine's uptime/load is recorded before and after. Unset
OPENBLAS_CORETYPE to time OpenBLAS's own kernel choice. Prints a JSON report (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

GEMM_SHAPES = [(256, 2304, 1568), (64, 576, 4096), (512, 4608, 224), (1152, 256, 900)]
INFER = [("resnet18", (1, 1, 28, 28)), ("resnet18", (1, 1, 64, 64)),
         ("resnet18_3d", (1, 1, 28, 28, 28))]


def _best(fn, repeats: int = 5) -> tuple[float, float]:
    fn()
    wall = cpu = float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall = min(wall, time.perf_counter() - t0)
        cpu = min(cpu, time.process_time() - c0)
    return wall, cpu


def gemm_worker(which: str) -> dict:
    import numpy as np
    from threadpoolctl import threadpool_info, threadpool_limits

    from cnnfast.cpu import _microkernel

    rng = np.random.default_rng(0)
    out = {"which": which, "ceiling_1": _microkernel.fma_ceiling(1), "shapes": {}}
    with threadpool_limits(1, user_api="blas"):
        out["blas"] = [i.get("architecture") for i in threadpool_info()
                       if i.get("user_api") == "blas"][:1]
        for m, k, n in GEMM_SHAPES:
            a = rng.standard_normal((m, k)).astype(np.float32)
            b = rng.standard_normal((k, n)).astype(np.float32)
            c = np.empty((m, n), dtype=np.float32)
            if which == "own":
                wall, cpu = _best(lambda: _microkernel.gemm(a, b, c, False))
            else:
                wall, cpu = _best(lambda: np.dot(a, b, c))
            out["shapes"][f"{m}x{k}x{n}"] = 2.0 * m * n * k / wall / 1e9
    out["tile"] = [_microkernel.MR, _microkernel.NR]
    out["target"] = _microkernel.target_name()
    return out


def infer_worker(which: str) -> dict:
    import numpy as np

    import cnnfast
    from cnnfast import models

    out = {"which": which, "models": {}}
    for name, shape in INFER:
        model = models.resnet18(in_channels=1, num_classes=2,
                                spatial_dims=3 if name == "resnet18_3d" else 2, seed=0)
        model.eval()
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        if which == "torch":
            import torch

            from cnnfast.bench.paths import torch_mirror

            tm = torch_mirror(model)
            tm.load_state_dict({k: torch.from_numpy(v.copy())
                                for k, v in model.state_dict().items()}, strict=False)
            tm.eval()
            xt = torch.from_numpy(x)

            def run():
                with torch.no_grad():
                    tm(xt)
        else:
            xt = cnnfast.tensor(x)

            def run():
                with cnnfast.no_grad():
                    model(xt)
        wall, cpu = _best(run)
        out["models"][f"{name} {'x'.join(map(str, shape))}"] = {"wall_s": wall, "cpu_s": cpu}
    return out


def _load() -> list[float]:
    return list(os.getloadavg())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("gemm", "infer"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        fn = gemm_worker if args.what == "gemm" else infer_worker
        print(json.dumps(fn(args.worker)))
        return 0
    candidates = ("own", "blas") if args.what == "gemm" else ("cnnfast", "torch")
    report = {"what": args.what, "machine": platform.processor() or platform.machine(),
              "uptime_start": subprocess.run(["uptime"], capture_output=True,
                                             text=True).stdout.strip(),
              "load_start": _load(), "env_coretype": os.environ.get("OPENBLAS_CORETYPE"),
              "rounds": []}
    for _ in range(args.rounds):
        row = {}
        for cand in candidates:
            res = subprocess.run([sys.executable, __file__, args.what, "--worker", cand],
                                 capture_output=True, text=True, check=True)
            row[cand] = json.loads(res.stdout.strip().splitlines()[-1])
        report["rounds"].append(row)
    report["load_end"] = _load()
    if args.what == "gemm":
        best = {c: {s: max(r[c]["shapes"][s] for r in report["rounds"])
                    for s in report["rounds"][0][c]["shapes"]} for c in candidates}
        ceiling = max(r[c]["ceiling_1"] for r in report["rounds"] for c in candidates)
        report["summary"] = {"ceiling_1_gflops": ceiling, "gflops": best,
                             "share_of_ceiling": {c: {s: v / ceiling for s, v in best[c].items()}
                                                  for c in candidates}}
    else:
        keys = report["rounds"][0]["cnnfast"]["models"]
        report["summary"] = {k: {c: min(r[c]["models"][k]["wall_s"] for r in report["rounds"])
                                 for c in candidates} for k in keys}
        for k, v in report["summary"].items():
            v["time_ratio"] = v["cnnfast"] / v["torch"]
    text = json.dumps(report, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(json.dumps(report["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
