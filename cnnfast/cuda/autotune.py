"""Autotune: per convolution shape, the fastest GEMM tile configuration, timed once, kept on disk.

PyTorch's ``torch.backends.cudnn.benchmark`` is the model. Off by default, the convolutions use
the current launch configuration's tiles (``_runtime.launch_config``; 64 x 64 on a GPU), and
the same inputs give the same bits. On (``CNNFAST_CUDA_AUTOTUNE=1``, or
``cnnfast.config.set_option("cuda_autotune", True)``, or ``cnnfast train --cuda-autotune``), the
first float32 call of each (pass, geometry) times every tile configuration of
:data:`CANDIDATES` on that call's own arrays and keeps the fastest; the choice goes to
``<cache dir>/autotune/<GPU name>.json`` (``CNNFAST_CACHE_DIR``, default ``~/.cache/cnnfast``),
so later processes on the same kind of GPU start with it and time nothing.

Why tiles: one 64 x 64 tile per block suits the large layers, but a ResNet-18 layer at 7 x 7
(a GEMM of 1,568 rows) gives a 132-multiprocessor H200 200 blocks, under one wave at 2 blocks per
multiprocessor; 32-row tiles double or quadruple the blocks. Which wins is a measurement, and
one for each shape: the H200 run of 2026-12-04 showed small layers at 5-15x cuDNN's time and large
ones at 3-4x.

Tile configurations agree to rounding, not bit for bit (backward weight's split of its
reduction follows the tile), so a run with autotune gives the same bits as another run with the
same cache file. float64 is not tuned (it keeps the current configuration).
"""

from __future__ import annotations

import json
import re
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from cnnfast import config
from cnnfast._io import atomic_write
from cnnfast.backend import cuda_simulated
from cnnfast.cuda import _runtime as rt

SCHEMA = "cnnfast-autotune/1"
# The 64 x 64 default first: a tie keeps it. `cnnfast doctor --compile` compiles every candidate
# (cuda/_variants.py) and checks it for spills.
CANDIDATES: tuple[rt.GemmTiles, ...] = (
    rt.GPU_TILES,
    rt.GemmTiles(block_m=32, block_n=64, block_k=16, micro_m=2, micro_n=4),
    rt.GemmTiles(block_m=32, block_n=32, block_k=16, micro_m=2, micro_n=2),
)
TUNED_DTYPES = (np.dtype(np.float32),)
REPEATS = 5  # timed runs per candidate, after one untimed (compiling) run; the median counts

_choices: dict[str, dict[str, dict]] = {}  # device name -> key -> {"tiles": [...], "ms": [...]}


def enabled() -> bool:
    return bool(config.get("cuda_autotune"))


def device_name() -> str:
    """The GPU's name (the cache file's name), or the simulator's."""
    if cuda_simulated():
        return "numba-cuda-simulator"
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def cache_path(device: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", device).strip("-") or "gpu"
    return config.cache_dir() / "autotune" / f"{slug}.json"


def _tiles_of(entry) -> rt.GemmTiles | None:
    """The candidate an entry names, or None when it is malformed or no longer a candidate."""
    try:
        tiles = rt.GemmTiles(*(int(v) for v in entry["tiles"]))
    except (TypeError, ValueError, KeyError):
        return None
    return tiles if tiles in CANDIDATES else None


def _load(device: str) -> dict[str, dict]:
    """This device's choices: from memory, else from its cache file (an unreadable file is
    ignored with a warning and replaced at the next save: it holds timings, not results)."""
    if device in _choices:
        return _choices[device]
    path = cache_path(device)
    choices: dict[str, dict] = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
            schema = data.get("schema") if isinstance(data, dict) else None
            if schema != SCHEMA:
                raise ValueError(f"schema is {schema!r}, expected {SCHEMA!r}")
            stored = data.get("choices")
            if not isinstance(stored, dict):
                raise ValueError("'choices' is not an object")
            choices = {k: v for k, v in stored.items() if _tiles_of(v) is not None}
        except (OSError, ValueError) as err:
            warnings.warn(f"ignoring the autotune cache {path}: {err}", stacklevel=3)
            choices = {}
    _choices[device] = choices
    return choices


def _save(device: str) -> None:
    path = cache_path(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {"schema": SCHEMA, "device": device, "choices": _choices[device]}
    with atomic_write(path, "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)


def _host_ms(run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1e3


def _event_ms(run: Callable[[], None]) -> float:
    import cupy

    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    run()
    stop.record()
    stop.synchronize()
    return cupy.cuda.get_elapsed_time(start, stop)


def _measure(run: Callable[[], None], repeats: int) -> float:
    """Median milliseconds of ``run()``: CUDA events on a GPU, the host clock in the simulator.
    (Its own small clock: the layer rules keep kernels from importing bench's timer.)"""
    time_one = _host_ms if cuda_simulated() else _event_ms
    return float(np.median([time_one(run) for _ in range(repeats)]))


def key(pass_name: str, geo: tuple, dtype) -> str:
    return f"{pass_name} {np.dtype(dtype).name} " + ",".join(str(int(v)) for v in geo)


def run_tuned(pass_name: str, geo: tuple, dtype, run: Callable[[rt.GemmTiles], None]) -> None:
    """``run(tiles)`` with the tiles for this convolution: the launch configuration's, or with
    autotune on (float32), the cached choice, timing every candidate first if there is none.

    ``run`` must write its whole result on every call (the last call's result is kept), so the
    timing runs are harmless; the chosen candidate runs last."""
    if not enabled() or np.dtype(dtype) not in TUNED_DTYPES:
        run(rt.current_config().tiles)
        return
    device = device_name()
    choices = _load(device)
    k = key(pass_name, geo, dtype)
    tiles = _tiles_of(choices[k]) if k in choices else None
    if tiles is None:
        times = []
        for candidate in CANDIDATES:
            run(candidate)  # compiles it and warms up
            times.append(_measure(lambda c=candidate: run(c), REPEATS))
        tiles = CANDIDATES[int(np.argmin(times))]
        choices[k] = {"tiles": [tiles.block_m, tiles.block_n, tiles.block_k, tiles.micro_m,
                                tiles.micro_n], "ms": [round(t, 6) for t in times]}
        _save(device)
    run(tiles)


def forget() -> None:
    """Drop the choices held in memory (the cache files stay)."""
    _choices.clear()
