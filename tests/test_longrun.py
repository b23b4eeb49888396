"""Long run: 2,000 SmallCNN training steps on the fast CPU path with the resident set size (RSS)
and Python's traced allocations (tracemalloc, which also counts NumPy's buffers) sampled: memory
must not grow beyond noise once the first steps have warmed the caches and allocators.

CI runs the 2,000 steps at a small batch (8 images of 16x16, SmallCNN 4-8-16). The full-size
run (batch 64, 28x28, SmallCNN 8-16-32, as the benchmarks' training step) prints its figures:

    python tests/test_longrun.py --steps 2000 --batch 64 --size 28 --channels 8 16 32
"""

from __future__ import annotations

import gc
import os
import sys
import time
import tracemalloc

import numpy as np

WARMUP = 200        # steps before the baseline sample: kernels compiled, pools and caches filled
SAMPLE_EVERY = 100


def rss_bytes() -> int | None:
    """Current resident set size (Linux /proc), or None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def run_steps(steps: int, batch: int, size: int, channels: tuple[int, ...], seed: int = 0,
              threads: int | None = 1) -> dict:
    """Train a SmallCNN for ``steps`` optimizer steps (fast path, Adam, cross-entropy, random
    flips), sampling RSS and tracemalloc every :data:`SAMPLE_EVERY` steps.

    ``threads`` caps Numba's and BLAS's threads (``None``: their defaults). One thread by
    default: memory does not depend on it, and on a shared, oversubscribed machine the parallel
    kernels' threads wait on each other (a step measured 20x slower with 2 threads there).
    """
    import numba
    from threadpoolctl import threadpool_limits

    previous = numba.get_num_threads()
    if threads is not None:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        with threadpool_limits(threads):
            return _run_steps(steps, batch, size, channels, seed)
    finally:
        numba.set_num_threads(previous)


def _run_steps(steps: int, batch: int, size: int, channels: tuple[int, ...], seed: int) -> dict:
    import cnnfast
    from cnnfast import dispatch, nn, optim
    from cnnfast.data import DataLoader, Split
    from cnnfast.models import SmallCNN
    from cnnfast.transforms import RandomFlip

    rng = np.random.default_rng(seed)
    n = batch * 16
    images = rng.integers(0, 256, (n, 1, size, size)).astype(np.uint8)
    labels = rng.integers(0, 2, (n, 1)).astype(np.int64)
    from cnnfast.dataset import Normalization

    loader = DataLoader(Split(images, labels), batch, shuffle=True, seed=seed,
                        normalization=Normalization.medmnist(2), transform=RandomFlip(axes=(1,)))
    cnnfast.manual_seed(seed)
    model = SmallCNN(1, 2, channels=channels, seed=seed)
    opt = optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    samples = []  # (step, rss, traced)
    tracemalloc.start()
    started = time.perf_counter()
    step = 0
    try:
        with dispatch.cpu_path("fast"):
            while step < steps:
                for x, y in loader:
                    loss = loss_fn(model(cnnfast.tensor(x)), cnnfast.tensor(y[:, 0]))
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    step += 1
                    if step % SAMPLE_EVERY == 0:
                        # Each step's graph holds reference cycles (tensor <-> function) that
                        # the cyclic collector frees in its own time; collect first, so a
                        # sample measures what is kept, not when the collector last ran.
                        gc.collect()
                        samples.append((step, rss_bytes(), tracemalloc.get_traced_memory()[0]))
                    if step == steps:
                        break
        assert np.isfinite(loss.item())
    finally:
        tracemalloc.stop()
    return {"seconds": time.perf_counter() - started, "samples": samples}


def growth(samples: list, index: int) -> tuple[float, float]:
    """(growth from the warm-up sample to the end, least-squares slope per 1,000 steps) of
    column ``index`` (1 RSS, 2 traced) after :data:`WARMUP`."""
    rows = [(s, v[index]) for s, *_ in samples for v in [_row(samples, s)] if s >= WARMUP]
    steps = np.array([r[0] for r in rows], float)
    values = np.array([r[1] for r in rows], float)
    slope = np.polyfit(steps, values, 1)[0] * 1000 if len(rows) > 1 else 0.0
    return float(values[-1] - values[0]), float(slope)


def _row(samples, step):
    return next(s for s in samples if s[0] == step)


def test_two_thousand_steps_do_not_grow_memory():
    result = run_steps(2000, batch=8, size=16, channels=(4, 8, 16))
    samples = result["samples"]
    assert len(samples) == 20
    traced_growth, traced_slope = growth(samples, 2)
    # The tensors of a step are freed when it ends: what is still traced is the model, the
    # optimizer state and the data, the same size every step. A leak of one small array a step
    # would be 2,000 arrays here.
    assert traced_growth < 64 << 10, samples
    assert abs(traced_slope) < 32 << 10, samples
    if samples[0][1] is not None:
        rss_growth, rss_slope = growth(samples, 1)
        # RSS moves with the allocator's arenas and page reuse: allow a few MB of noise, far
        # below what a leak of the step's buffers (about 1 MB a step here) would add.
        assert rss_growth < 8 << 20, samples
        assert rss_slope < 4 << 20, samples


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="long-run memory check")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--channels", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--threads", type=int, default=None,
                        help="Numba/BLAS threads (default: theirs)")
    args = parser.parse_args()
    out = run_steps(args.steps, args.batch, args.size, tuple(args.channels),
                    threads=args.threads)
    s = out["samples"]
    rss_g, rss_s = growth(s, 1) if s[0][1] is not None else (float("nan"),) * 2
    tr_g, tr_s = growth(s, 2)
    print(f"{args.steps} steps, batch {args.batch}, {args.size}x{args.size}, SmallCNN "
          f"{args.channels}, threads {args.threads or 'default'}: {out['seconds']:.1f} s with "
          "tracemalloc on")
    print(f"RSS at step {WARMUP}: {_row(s, WARMUP)[1] / 2**20:.1f} MB, at the end: "
          f"{s[-1][1] / 2**20:.1f} MB, growth {rss_g / 2**20:+.2f} MB, slope "
          f"{rss_s / 2**20:+.3f} MB per 1,000 steps, range {min(r[1] for r in s) / 2**20:.1f}-"
          f"{max(r[1] for r in s) / 2**20:.1f} MB")
    print(f"traced at step {WARMUP}: {_row(s, WARMUP)[2] / 2**20:.2f} MB, at the end: "
          f"{s[-1][2] / 2**20:.2f} MB, growth {tr_g / 2**10:+.1f} KB, slope "
          f"{tr_s / 2**10:+.2f} KB per 1,000 steps")
    sys.exit(0)
