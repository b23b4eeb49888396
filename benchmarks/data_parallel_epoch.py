"""Epoch time of one process with T threads against T processes (ranks) with one thread each,
on this machine: ``cnnfast train`` vs ``cnnfast train --workers T`` (needs ``cnnfast[mpi]``).

The two set-ups run alternately, ``--repeats`` times each, so a change in the machine's load
hits both; each run trains 2 epochs and the second epoch's time (training + sharded validation,
from ``metrics.json``) is kept: the first includes Numba's cache loading. The 1-minute load
average before each run is printed beside it.

    python benchmarks/data_parallel_epoch.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

WORKLOADS = {
    # name: (data sizes, CLI model arguments, global batch)
    "smallcnn": ({"n_train": 6000, "n_val": 1000, "n_test": 16, "size": 28},
                 ["--model", "smallcnn"], 128),
    "resnet18": ({"n_train": 320, "n_val": 64, "n_test": 16, "size": 28},
                 ["--model", "resnet18"], 32),
}
THREAD_VARS = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _dataset(folder: Path, sizes: dict) -> Path:
    from cnnfast import synthetic
    from cnnfast.data import save_npz

    return save_npz(folder / f"nodule{sizes['n_train']}.npz",
                    synthetic.nodule_dataset(seed=0, **sizes))


def _epoch_seconds(data: Path, model_args: list, batch: int, ranks: int, threads: int,
                   out: Path) -> float:
    env = dict(os.environ)
    env.update(dict.fromkeys(THREAD_VARS, str(threads)))
    cmd = [sys.executable, "-m", "cnnfast", "train", "--data", str(data), *model_args,
           "--epochs", "2", "--batch-size", str(batch), "--schedule", "none", "--no-progress",
           "--out", str(out)]
    if ranks > 1:
        cmd += ["--workers", str(ranks)]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return json.loads((out / "metrics.json").read_text())["history"][1]["seconds"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    args = parser.parse_args(argv)
    setups = [(1, args.cores), (args.cores, 1)]  # (ranks, threads per rank)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.workloads:
            sizes, model_args, batch = WORKLOADS[name]
            data = _dataset(tmp, sizes)
            times: dict[tuple, list] = {s: [] for s in setups}
            for i in range(args.repeats):
                for ranks, threads in setups:
                    load = os.getloadavg()[0]
                    t = _epoch_seconds(data, model_args, batch, ranks, threads,
                                       tmp / f"{name}-{ranks}-{i}")
                    times[(ranks, threads)].append(t)
                    print(f"{name}: {ranks} rank(s) x {threads} thread(s): epoch {t:.2f} s "
                          f"(load before: {load:.2f})", flush=True)
            for (ranks, threads), ts in times.items():
                print(f"{name}: {ranks} x {threads}: median {statistics.median(ts):.2f} s, "
                      f"range {min(ts):.2f}-{max(ts):.2f} s over {len(ts)} runs")


if __name__ == "__main__":
    main()
