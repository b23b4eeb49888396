"""Predicted data-parallel efficiency of ResNet-18 training on N machines (a model, not a
measurement).

    step(N)    = compute / N + allreduce(N)          (global batch fixed: strong scaling)
    allreduce  = 2 (N - 1) / N * 44.7 MB / bandwidth (a bandwidth-optimal ring, or cnnfast's
                                                      alltoall + rank-order sum + allgather,
                                                      which moves the same bytes)
    efficiency = step(1) / (N * step(N))

ResNet-18 has 11.2 M float32 parameters: 44.7 MB of gradients per step. No overlap of the
allreduce with backward and no per-message latency are assumed (overlap can hide up to the
backward pass, about 2/3 of compute; latency adds about 2 (N - 1) messages of a few
microseconds to tens of microseconds). Run: ``python benchmarks/scaling_model.py``.
"""

from __future__ import annotations

import argparse

# cnnfast.models.resnet18(1, 2, 2, stem="small"), the MedMNIST model: 11,168,706 parameters
GRADIENT_BYTES = 11_168_706 * 4  # 44.7 MB

# Link bandwidth per machine, bytes/s, one direction.
LINKS = {
    "10 Gb/s": 10e9 / 8,
    "25 Gb/s": 25e9 / 8,
    "100 Gb/s": 100e9 / 8,
    "NVLink": 300e9,  # NVLink 3 (A100): 300 GB/s per GPU per direction, nominal
}
NODE_GPUS = 8  # one NVLink domain (an 8-GPU node); beyond it NVLink rows are hypothetical

COMPUTE = {
    # measured here: cnnfast ResNet-18 (28x28, batch 32) training step on 2 CPU cores, from the
    # committed benchmark run (README "Performance": 773 ms)
    "cpu": 0.773,
    # assumed, not measured (no GPU here): a ResNet-18 step of a few tens of ms on one GPU
    "gpu": 0.050,
}


def allreduce_seconds(n: int, bandwidth: float, nbytes: float = GRADIENT_BYTES) -> float:
    return 2 * (n - 1) / n * nbytes / bandwidth


def efficiency(n: int, compute: float, bandwidth: float) -> float:
    step = compute / n + allreduce_seconds(n, bandwidth)
    return compute / (n * step)


def table(compute: float, counts=(1, 2, 4, 8, 16, 32, 64)) -> str:
    head = f"| N | {' | '.join(LINKS)} |"
    lines = [head, "|" + "---|" * (len(LINKS) + 1)]
    for n in counts:
        cells = []
        for name, bw in LINKS.items():
            cell = f"{efficiency(n, compute, bw):.0%}"
            if name == "NVLink" and n > NODE_GPUS:
                cell += "*"
            cells.append(cell)
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compute", type=float, default=None,
                        help="compute seconds per step on one machine (default: both presets)")
    args = parser.parse_args(argv)
    presets = {"given": args.compute} if args.compute else COMPUTE
    print("allreduce of 44.7 MB, seconds: "
          + ", ".join(f"{name} N=64: {allreduce_seconds(64, bw):.4f}"
                      for name, bw in LINKS.items()))
    for name, compute in presets.items():
        print(f"\ncompute {compute * 1e3:.0f} ms per step on one machine ({name}); "
              f"efficiency = step(1) / (N * step(N)):")
        print(table(compute))
    print(f"\n* NVLink beyond one {NODE_GPUS}-GPU node: hypothetical (the network link applies)")


if __name__ == "__main__":
    main()
