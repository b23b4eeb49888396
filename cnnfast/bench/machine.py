"""The machine: CPU model, threads, GPU, library versions and how busy the CPUs are."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from typing import TYPE_CHECKING

import numpy as np

import cnnfast
from cnnfast import dispatch

if TYPE_CHECKING:
    from cnnfast.bench.runner import Options


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Cores' worth of CPU time that ran (anything but idle and I/O wait) during ``seconds``,
    from /proc/stat; called while this process sleeps, it is what other processes used. None
    where /proc/stat is missing. Unlike the load average, it is not raised by kernel threads that
    wait uninterruptibly without using a CPU (a VM can show a load of 1 while idle)."""
    def sample():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    ticks = total1 - total0
    if ticks <= 0:
        return None
    return (os.cpu_count() or 1) * (ticks - (idle1 - idle0)) / ticks


def _stat_ticks() -> tuple[int, int]:
    """(all ticks, busy ticks) of every CPU so far, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]), sum(fields[:8]) - idle


def _process_ticks(pid: int) -> int:
    """User + system clock ticks a process has used (its own threads; 0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return 0


class OthersBusy:
    """Cores' worth of CPU that other processes used while the block ran: all busy time in
    /proc/stat minus what the processes ``pids`` (this one and the workers being timed) used.
    ``cores`` stays None where /proc is missing."""

    def __init__(self, pids):
        self.pids = set(pids) | {os.getpid()}
        self.cores: float | None = None

    def _snapshot(self):
        total, busy = _stat_ticks()
        return total, busy, sum(_process_ticks(p) for p in self.pids)

    def __enter__(self):
        try:
            self._start = self._snapshot()
        except (OSError, ValueError, IndexError):
            self._start = None
        return self

    def __exit__(self, *exc):
        if self._start is None:
            return
        try:
            total, busy, own = (b - a for a, b in zip(self._start, self._snapshot()))
        except (OSError, ValueError, IndexError):
            return
        if total > 0:
            self.cores = max(0.0, (os.cpu_count() or 1) * (busy - own) / total)


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None

def machine_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    if dispatch.cuda_simulated():
        return None
    if dispatch.gpu_present():
        try:
            import cupy

            props = cupy.cuda.runtime.getDeviceProperties(0)
            name = props["name"]
            return name.decode() if isinstance(name, bytes) else str(name)
        except Exception:  # noqa: BLE001 - report what can be found
            return "CUDA GPU"
    torch = sys.modules.get("torch")   # only when a torch candidate loaded it
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return None


def versions() -> dict:
    """Versions of Python and the libraries, from package metadata (nothing heavy is imported)."""
    from importlib import metadata

    out = {"python": platform.python_version(), "numpy": np.__version__,
           "cnnfast": cnnfast.__version__}
    for name, dists in (("numba", ("numba",)), ("torch", ("torch",)),
                        ("cupy", ("cupy", "cupy-cuda12x", "cupy-cuda11x", "cupy-cuda13x"))):
        out[name] = None
        for dist in dists:
            with contextlib.suppress(metadata.PackageNotFoundError):
                out[name] = metadata.version(dist)
                break
    return out


def machine_info(options: Options) -> dict:
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads_available": machine_threads(),
        "threads_used": options.threads,
        "platform": platform.platform(),
        "gpu": gpu_name(),
        "cuda_simulator": dispatch.cuda_simulated(),
    }
    with contextlib.suppress(OSError, AttributeError):
        info["load_avg_start"] = os.getloadavg()
    info["cpu_busy_start"] = cpu_busy()
    return info


def blas_info() -> list[dict]:
    """The BLAS libraries loaded here and the kernels they chose (threadpoolctl, where
    installed): {library, version, architecture, threads}."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [{"library": i.get("internal_api"), "version": i.get("version"),
             "architecture": i.get("architecture"), "threads": i.get("num_threads")}
            for i in threadpool_info() if i.get("user_api") == "blas"]
