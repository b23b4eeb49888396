"""``cnnfast doctor``: what a user runs first on a new machine.

Without flags it reports versions (Python, NumPy, Numba, numba-cuda, CuPy, the BLAS NumPy
uses), whether an NVIDIA driver and GPU are visible and which CUDA version the driver supports,
the active CPU kernel path and its thread count, Numba's cache folder, the CPU's measured
float32 FMA ceiling next to the sgemm rates of BLAS and of cnnfast's own microkernel
(:func:`cnnfast.cpu.machine_rates`), and one line of advice per problem found. It needs no
GPU and starts no GPU work.

``--compile`` builds every kernel variant the CUDA path can launch (:mod:`cnnfast.cuda._variants`)
with the real compiler, no GPU needed: Numba -> NVVM -> PTX for each target architecture, then
``ptxas -v`` from the ``nvidia-cuda-nvcc`` wheel (never a toolkit the machine happens to have),
and prints one row per kernel and architecture: registers, spill bytes, stack frame, shared
memory, block size and the theoretical occupancy that follows. The tensor-core kernels call the
CUDA C of the top-level ``kernels/``: for them NVVM writes LTO-IR, NVRTC compiles
``kernels/mma.cu`` to LTO-IR, and nvJitLink links the two with link-time optimisation into the
PTX that ptxas assembles (what Numba does at run time, there straight to a cubin); every
``kernels/*.cu`` also gets rows of its own (NVRTC, then ``ptxas -c``). NVRTC and nvJitLink come
from their wheels through ``cuda-bindings``, driver-free. The exit status is 1 when a kernel
fails to compile or spills.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import glob
import importlib
import itertools
import json
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cnnfast import config

ARCHES = ("sm_80", "sm_90")

# Per-SM limits of the theoretical-occupancy calculation (CUDA occupancy calculator's data):
# registers are allocated per warp in units of 256 from four sub-partitions of 16K registers;
# shared memory in 128-byte units with 1 KiB reserved per block.
_SM_LIMITS = {
    "sm_80": {"warps": 64, "blocks": 32, "registers": 65536, "shared": 167936},
    "sm_90": {"warps": 64, "blocks": 32, "registers": 65536, "shared": 233472},
}


# --- the environment report ---------------------------------------------------------------------

def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - not installed, or no metadata
        return None


def _driver_cuda_version() -> tuple[str | None, str | None]:
    """(driver version, CUDA version the driver supports) from nvidia-smi, or (None, reason)."""
    try:
        out = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"nvidia-smi not runnable ({type(exc).__name__})"
    if out.returncode != 0:
        return None, (out.stderr or out.stdout).strip().splitlines()[0] if (
            out.stderr or out.stdout).strip() else f"nvidia-smi exit status {out.returncode}"
    driver = re.search(r"Driver Version:\s*([\d.]+)", out.stdout)
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", out.stdout)
    return (driver.group(1) if driver else "?"), (cuda.group(1) if cuda else "?")


def _gpus() -> tuple[list[str], str | None]:
    """Names of the GPUs CuPy sees, and why none when it sees none."""
    if config.cuda_simulated():
        return [], "NUMBA_ENABLE_CUDASIM is set: the cuda device is Numba's simulator"
    try:
        import cupy
    except ImportError:
        return [], "CuPy is not installed"
    except Exception as exc:  # noqa: BLE001 - a broken CuPy install
        return [], f"CuPy failed to import: {exc}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
        names = []
        for i in range(count):
            name = cupy.cuda.runtime.getDeviceProperties(i)["name"]
            names.append(name.decode() if isinstance(name, bytes) else str(name))
        return names, None if names else "CuPy sees no CUDA device"
    except Exception as exc:  # noqa: BLE001 - no driver, no device
        return [], f"CuPy sees no usable GPU: {str(exc).splitlines()[0]}"


def _blas() -> str:
    try:
        from threadpoolctl import threadpool_info

        libs = [f"{i.get('internal_api')} {i.get('version')} ({i.get('num_threads')} threads)"
                for i in threadpool_info() if i.get("user_api") == "blas"]
        return ", ".join(libs) or "none found"
    except Exception as exc:  # noqa: BLE001 - threadpoolctl missing or failing
        return f"unknown ({exc})"


def _release(version: str) -> tuple[int, ...]:
    """(2, 5, 2) of '2.5.2', '2.5.2rc1' or '2.5.2+local': the leading release numbers."""
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def numpy_conflict(numba_cuda_version: str, numpy_version: str) -> str | None:
    """Advice when this numba-cuda cannot compile a kernel with this NumPy, else None.

    numba-cuda up to 0.30.4 registers an overload of ``np.row_stack``, which NumPy 2.5 removed:
    the first kernel compilation then fails with "module 'numpy' has no attribute 'row_stack'"
    (seen on an H200 machine whose image paired numba-cuda 0.30.4 with NumPy 2.5.2)."""
    if _release(numba_cuda_version) <= (0, 30, 4) and _release(numpy_version) >= (2, 5):
        return (f"numba-cuda {numba_cuda_version} cannot compile CUDA kernels with NumPy "
                f"{numpy_version} (it overloads np.row_stack, removed in NumPy 2.5): "
                "pip install 'numpy<2.5'")
    return None


def environment() -> tuple[list[tuple[str, str]], list[str]]:
    """([(item, value)], [advice lines]) describing this machine for cnnfast."""
    import numpy as np

    from cnnfast import dispatch

    rows: list[tuple[str, str]] = []
    advice: list[str] = []
    rows.append(("python", f"{platform.python_version()} ({sys.executable})"))
    versions = {name: _version(name) for name in ("cnnfast", "numpy", "numba", "numba-cuda")}
    versions["numpy"] = np.__version__
    cupy_dists = [d for d in ("cupy-cuda12x", "cupy-cuda13x", "cupy") if _version(d)]
    versions["cupy"] = ", ".join(f"{d} {_version(d)}" for d in cupy_dists) or None
    for name, value in versions.items():
        rows.append((name, value or "not installed"))
    rows.append(("blas", _blas()))
    if versions["numba-cuda"] is None:
        advice.append("numba-cuda is missing: pip install 'cnnfast[cuda12]' or 'cnnfast[cuda13]'")
    else:
        conflict = numpy_conflict(versions["numba-cuda"], np.__version__)
        if conflict:
            advice.append(conflict)

    driver, cuda_version = _driver_cuda_version()
    if driver is None:
        rows.append(("nvidia driver", f"not found ({cuda_version})"))
    else:
        rows.append(("nvidia driver", f"{driver}, supports CUDA {cuda_version}"))
    gpus, why = _gpus()
    rows.append(("gpu", ", ".join(gpus) if gpus else f"none ({why})"))
    major = cuda_version.split(".")[0] if driver is not None else None
    if driver is None:
        advice.append("no NVIDIA driver visible: device 'cuda' will not run here (CPU paths "
                      "work; NUMBA_ENABLE_CUDASIM=1 runs the CUDA kernels in the simulator)")
    elif major in ("12", "13"):
        wanted = f"cupy-cuda{major}x"
        too_new = [d for d in cupy_dists if d.startswith("cupy-cuda") and d[9:11] > major]
        if too_new:  # a driver runs code built for its CUDA major version or older, not newer
            advice.append(f"{', '.join(too_new)} needs a newer driver than this CUDA "
                          f"{cuda_version} one: pip uninstall {' '.join(too_new)} && "
                          f"pip install 'cnnfast[cuda{major}]'")
        elif not cupy_dists:
            advice.append(f"the driver supports CUDA {cuda_version}: pip install "
                          f"'cnnfast[cuda{major}]' (brings {wanted} and numba-cuda[cu{major}])")
    elif major is not None:
        advice.append(f"the driver supports CUDA {cuda_version}; cnnfast's extras need a "
                      f"CUDA 12 or 13 driver: update the NVIDIA driver")
    if driver is not None and not gpus and why and "not installed" not in why:
        advice.append(f"a driver is present but {why}")

    from cnnfast.cpu import _parallel

    path = dispatch.get_cpu_path()
    threads = _parallel.num_threads()
    rows.append(("cpu path", f"{path} (CNNFAST_CPU_PATH or cnnfast.set_cpu_path), "
                             f"{threads} threads, {os.cpu_count()} CPUs"))
    if path == "reference":
        advice.append("the CPU path is 'reference' (NumPy, slow): unset CNNFAST_CPU_PATH or "
                      "call cnnfast.set_cpu_path('fast')")

    from cnnfast.cpu import machine_rates

    rows.extend(cpu_rate_rows(machine_rates()))

    from numba.core import config as numba_config

    cache = numba_config.CACHE_DIR or "beside each module (__pycache__)"
    rows.append(("numba cache", cache))
    if numba_config.CACHE_DIR and not os.access(numba_config.CACHE_DIR, os.W_OK):
        advice.append(f"NUMBA_CACHE_DIR={numba_config.CACHE_DIR} is not writable: every run "
                      f"recompiles the CPU kernels")
    return rows, advice


def cpu_rate_rows(rates: dict) -> list[tuple[str, str]]:
    """The doctor's rows for :func:`cnnfast.cpu.machine_rates`."""
    one, every = rates["fma_1"], rates["fma_all"]
    vector = "AVX-512" if rates["avx512"] else "no AVX-512"
    return [
        ("fma ceiling", f"{one:.0f} GFLOP/s on 1 thread, {every:.0f} on {rates['threads']} "
                        f"(float32, {rates['target']}, {vector})"),
        ("sgemm", f"BLAS {rates['blas_1']:.0f} GFLOP/s on 1 thread "
                  f"({rates['blas_1'] / one:.0%} of the ceiling), {rates['blas_all']:.0f} on "
                  f"its threads; cnnfast {rates['own_1']:.0f} on 1 thread "
                  f"({rates['own_1'] / one:.0%}, {rates['tile'][0]}x{rates['tile'][1]} tile)"),
    ]


def print_environment() -> int:
    rows, advice = environment()
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print()
    if advice:
        for line in advice:
            print(f"advice: {line}")
    else:
        print("no problems found")
    return 0


# --- real compilation -------------------------------------------------------------------------

def find_ptxas() -> str | None:
    """ptxas from the nvidia-cuda-nvcc wheel (cu13 or cu12 layout), or None."""
    try:
        nvidia = importlib.import_module("nvidia")
    except ImportError:
        return None
    for root in getattr(nvidia, "__path__", []):
        for pattern in ("cu13/bin/ptxas", "cuda_nvcc/bin/ptxas", "*/bin/ptxas"):
            found = sorted(glob.glob(os.path.join(root, pattern)))
            if found:
                return found[0]
    return None


@dataclasses.dataclass
class CompileRow:
    kernel: str
    variant: str
    arch: str
    key: str
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack_bytes: int = 0
    shared_bytes: int = 0
    threads: int = 0
    blocks_per_sm: int = 0
    occupancy: float = 0.0
    error: str = ""


def occupancy(arch: str, registers: int, shared_bytes: int, threads: int) -> tuple[int, float]:
    """(resident blocks per SM, theoretical occupancy) of a kernel on ``arch``."""
    limits = _SM_LIMITS[arch]
    warps = -(-threads // 32)
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    warps_by_registers = (limits["registers"] // 4 // regs_per_warp) * 4
    by_registers = warps_by_registers // warps
    per_block_shared = -(-(shared_bytes + 1024) // 128) * 128
    by_shared = limits["shared"] // per_block_shared
    blocks = min(by_registers, by_shared, limits["warps"] // warps, limits["blocks"])
    return blocks, blocks * warps / limits["warps"]


_PTXAS_RESOURCES = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                              r"(\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


@functools.lru_cache(maxsize=1)
def _variants():
    from cnnfast.cuda import _variants

    return _variants.kernel_variants()


def variant_key(record) -> str:
    """What identifies a launch's compiled code: kernel, closure constants, argument types."""
    from cnnfast.cuda import _variants

    constants = _variants.closure_constants(record.dispatcher)
    return f"{record.kernel} [{constants}] ({', '.join(str(t) for t in record.types)})"


def _label(label: str, record) -> tuple[str, str]:
    """(variant words for the table, key identifying the compiled code)."""
    from cnnfast.cuda import _variants

    constants = _variants.closure_constants(record.dispatcher)
    words = dict(w.split("=", 1) for w in constants.split())
    per_thread = (f"{words.get('RM')}x{words.get('RN')}" if "RM" in words else
                  f"w{words.get('WM')}x{words.get('WN')} {words.get('MMA')}")
    shown = [label.split()[0] + " tiles" if "BM" in words else "",
             f"{words['BM']}x{words['BN']}x{words['BK']}/{per_thread}" if "BM" in words else ""]
    dtype = next((str(t.dtype) for t in record.types if hasattr(t, "dtype")), "")
    shown.append(words.get("dtype", dtype))
    hidden = {"BM", "BN", "BK", "RM", "RN", "TM", "TN", "A_LOADS", "B_LOADS", "A_STEP", "B_STEP",
              "LOAD_STEP", "TAPS", "dtype", "BIG", "ACC_M", "ACC_N", "MMA", "WM", "WN"}
    shown += [f"{k}={v}" for k, v in words.items() if k not in hidden]
    return " ".join(w for w in shown if w), variant_key(record)


def _compile_one(index: int, arch: str, ptxas: str) -> CompileRow:
    """Compile variant ``index`` for ``arch`` (in a worker process without the simulator)."""
    from numba import cuda

    from cnnfast.cuda._variants import links_cuda_c

    label, record = _variants()[index]
    variant, key = _label(label, record)
    row = CompileRow(record.kernel, variant, arch, key, threads=record.block)
    cc = (int(arch[3]), int(arch[4:]))
    _target_without_driver(cc)
    linked = links_cuda_c(record.dispatcher)
    try:
        if linked:  # a tensor-core kernel: Numba's LTO-IR + kernels/mma.cu, as Numba links them
            ltoir, _ = cuda.compile(record.dispatcher.py_func, record.types, device=False,
                                    abi="numba", output="ltoir", cc=cc)
        else:
            ptx, _ = cuda.compile_ptx(record.dispatcher.py_func, record.types, cc=cc)
    except Exception as exc:  # noqa: BLE001 - any compile failure is a table row
        row.error = f"NVVM: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        return row
    if linked:
        from cnnfast.cuda import _mma

        try:
            mma = nvrtc_compile(str(_mma.source("mma.cu")), arch, lto=True)
            ptx = nvjitlink_ptx([("kernel", ltoir), ("mma.cu", mma)], arch)
        except RuntimeError as exc:
            row.error = str(exc)[:300]
            return row
    return _ptxas_resources(row, ptx, arch, ptxas, record.shared_bytes)


def _ptxas_resources(row: CompileRow, ptx: str, arch: str, ptxas: str, dynamic_shared: int = 0,
                     relocatable: bool = False) -> CompileRow:
    """Assemble ``ptx`` with ``ptxas -v`` and fill ``row`` with what it reports."""
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "kernel.ptx")
        Path(source).write_text(ptx)
        out = subprocess.run([ptxas, f"-arch={arch}", "-v", *(["-c"] if relocatable else []),
                              source, "-o", os.path.join(tmp, "kernel.cubin")],
                             capture_output=True, text=True)
    log = out.stdout + out.stderr
    if out.returncode != 0:
        last = log.strip().splitlines()[-1][:300] if log.strip() else f"exit {out.returncode}"
        row.error = f"ptxas: {last}"
        return row
    if relocatable:  # device functions only: per-function stack and spills, no register count
        name = re.escape(row.kernel)
        props = re.search(rf"Function properties for {name}\s+(\d+) bytes stack frame, (\d+) "
                          rf"bytes spill stores, (\d+) bytes spill loads", log)
        if not props:
            row.error = f"ptxas compiled no function {row.kernel}"
            return row
        row.stack_bytes, row.spill_stores, row.spill_loads = (int(v) for v in props.groups())
        return row
    resources = _PTXAS_RESOURCES.search(log)
    used = _PTXAS_USED.search(log)
    smem = _PTXAS_SMEM.search(log)
    if not (resources and used):
        row.error = f"could not read ptxas -v output: {log[:300]!r}"
        return row
    row.stack_bytes, row.spill_stores, row.spill_loads = (int(v) for v in resources.groups())
    row.registers = int(used.group(1))
    row.shared_bytes = (int(smem.group(1)) if smem else 0) + dynamic_shared
    row.blocks_per_sm, row.occupancy = occupancy(arch, row.registers, row.shared_bytes,
                                                 row.threads)
    return row


# --- CUDA C: NVRTC and nvJitLink from the wheels, no driver ------------------------------------

def _check(result, what: str, log=None) -> tuple:
    status, *values = result if isinstance(result, tuple) else (result,)
    if int(status) != 0:
        detail = f": {log()}" if log else ""
        raise RuntimeError(f"{what} failed ({status}){detail}")
    return tuple(values)


@functools.lru_cache(maxsize=None)
def nvrtc_compile(path: str, arch: str, lto: bool = False):
    """A CUDA C file compiled by NVRTC for ``arch`` (relocatable): PTX text, or LTO-IR bytes."""
    from cuda.bindings import nvrtc

    (prog,) = _check(nvrtc.nvrtcCreateProgram(Path(path).read_bytes(),
                                              os.path.basename(path).encode(), 0, [], []),
                     "nvrtcCreateProgram")

    def log():
        (size,) = _check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        text = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, text)
        return text.rstrip(b"\0").decode(errors="replace").strip()[:300]

    options = [f"-arch={arch}".encode(), b"-rdc=true", b"-std=c++17"] + ([b"-dlto"] if lto
                                                                          else [])
    try:
        _check(nvrtc.nvrtcCompileProgram(prog, len(options), options),
               f"NVRTC {os.path.basename(path)}", log)
        get_size, get = ((nvrtc.nvrtcGetLTOIRSize, nvrtc.nvrtcGetLTOIR) if lto else
                         (nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX))
        (size,) = _check(get_size(prog), "NVRTC output size")
        code = b" " * size
        _check(get(prog, code), "NVRTC output")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return code if lto else code.rstrip(b"\0").decode()


def nvjitlink_ptx(objects: list[tuple[str, bytes]], arch: str) -> str:
    """LTO-IR objects linked by nvJitLink with link-time optimisation into one PTX module (what
    ptxas then assembles; Numba links a kernel and its ``link=`` files the same way)."""
    from cuda.bindings import nvjitlink

    handle = nvjitlink.create(3, [f"-arch={arch}", "-lto", "-ptx"])
    try:
        try:
            for name, data in objects:
                nvjitlink.add_data(handle, nvjitlink.InputType.LTOIR, data, len(data), name)
            nvjitlink.complete(handle)
        except nvjitlink.nvJitLinkError as exc:
            text = bytearray(nvjitlink.get_error_log_size(handle))
            nvjitlink.get_error_log(handle, text)
            detail = bytes(text).rstrip(b"\0").decode(errors="replace")[:300]
            raise RuntimeError(f"nvJitLink: {exc}: {detail}") from exc
        size = nvjitlink.get_linked_ptx_size(handle)
        ptx = bytearray(size)
        nvjitlink.get_linked_ptx(handle, ptx)
    finally:
        _destroy(nvjitlink, handle)
    return bytes(ptx).rstrip(b"\0").decode()


def _destroy(nvjitlink, handle) -> None:
    try:
        nvjitlink.destroy(handle)
    except Exception:  # noqa: BLE001 - nothing to do about a failed cleanup
        pass


def cuda_c_functions(path: str) -> list[str]:
    """The ``extern "C" __device__`` functions a kernels/ source defines."""
    return re.findall(r'extern\s+"C"\s+__device__\s+\w+\s+(\w+)\s*\(',
                      Path(path).read_text())


def _compile_source(path: str, arch: str, ptxas: str) -> list[CompileRow]:
    """Rows for one kernels/ source on its own: NVRTC to PTX, ``ptxas -c -v`` per function."""
    name = os.path.basename(path)
    functions = cuda_c_functions(path) or [name]
    rows = [CompileRow(f, f"kernels/{name} NVRTC + ptxas -c", arch, f"{name}:{f}", threads=32)
            for f in functions]
    try:
        ptx = nvrtc_compile(path, arch)
    except (RuntimeError, ImportError, OSError) as exc:
        for row in rows:
            row.error = str(exc)[:300]
        return rows
    return [_ptxas_resources(row, ptx, arch, ptxas, relocatable=True) for row in rows]


class _TargetDevice:
    """Stands in for the current device when there is no driver: numba-cuda compiles a device
    function that is not inlined for ``get_current_device().compute_capability`` (a GPU would
    answer); here the answer is the architecture being compiled for."""

    def __init__(self, cc: tuple[int, int]):
        self.compute_capability = cc


def _target_without_driver(cc: tuple[int, int]) -> None:
    from numba.cuda import dispatcher

    if hasattr(dispatcher, "get_current_device"):
        dispatcher.get_current_device = lambda: _TargetDevice(cc)


def _worker_init() -> None:
    os.environ.pop("NUMBA_ENABLE_CUDASIM", None)


def compile_all(arches=ARCHES, jobs: int | None = None) -> tuple[list[CompileRow], float]:
    """Compile every kernel variant for every arch; (rows, seconds). Needs no GPU."""
    ptxas = find_ptxas()
    if ptxas is None:
        raise RuntimeError("ptxas not found: pip install nvidia-cuda-nvcc (CUDA 13) or "
                           "nvidia-cuda-nvcc-cu12, or the test extra")
    start = time.perf_counter()
    count = len(_variants())
    tasks = [(i, arch) for i in range(count) for arch in arches]
    jobs = jobs or min(os.cpu_count() or 1, 8)
    if jobs <= 1:
        rows = [_compile_one(i, arch, ptxas) for i, arch in tasks]
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context,
                                                    initializer=_worker_init) as pool:
            rows = list(pool.map(_compile_one, *zip(*tasks), [ptxas] * len(tasks),
                                 chunksize=max(1, len(tasks) // (4 * jobs))))
    from cnnfast.cuda import _mma

    for path in sorted(_mma.kernels_dir().glob("*.cu")):  # each CUDA C source on its own
        for arch in arches:
            rows += _compile_source(str(path), arch, ptxas)
    return rows, time.perf_counter() - start


def summary(rows: list[CompileRow]) -> list[dict]:
    """Per kernel family and arch: variants, register range, spills, lowest occupancy."""
    families: dict[tuple[str, str], list[CompileRow]] = {}
    for r in rows:
        families.setdefault((r.kernel, r.arch), []).append(r)
    out = []
    for (kernel, arch), group in sorted(families.items()):
        ok = [r for r in group if not r.error]
        out.append({
            "kernel": kernel, "arch": arch, "variants": len(group),
            "errors": len(group) - len(ok),
            "registers": [min((r.registers for r in ok), default=0),
                          max((r.registers for r in ok), default=0)],
            "spill_bytes": sum(r.spill_stores + r.spill_loads for r in ok),
            "stack_bytes": max((r.stack_bytes for r in ok), default=0),
            "occupancy": [min((r.occupancy for r in ok), default=0.0),
                          max((r.occupancy for r in ok), default=0.0)],
        })
    return out


def format_table(rows: list[CompileRow]) -> str:
    header = (f"{'kernel':<28} {'variant':<34} {'arch':<5} {'regs':>4} {'spill st/ld':>11} "
              f"{'stack':>5} {'smem':>6} {'threads':>7} {'blocks':>6} {'occupancy':>9}")
    lines = [header, "-" * len(header)]
    for r in sorted(rows, key=lambda r: (r.kernel, r.variant, r.arch)):
        if r.error:
            lines.append(f"{r.kernel:<28} {r.variant:<34} {r.arch:<5} ERROR {r.error}")
            continue
        lines.append(f"{r.kernel:<28} {r.variant:<34} {r.arch:<5} {r.registers:>4} "
                     f"{f'{r.spill_stores}/{r.spill_loads}':>11} {r.stack_bytes:>5} "
                     f"{r.shared_bytes:>6} {r.threads:>7} {r.blocks_per_sm:>6} "
                     f"{r.occupancy:>8.0%}")
    lines.append("")
    lines.append("per kernel family: registers min-max, spill bytes, occupancy min-max")
    for s in summary(rows):
        lines.append(f"  {s['kernel']:<28} {s['arch']}  {s['variants']:>2} variants  "
                     f"regs {s['registers'][0]}-{s['registers'][1]}  spills {s['spill_bytes']}  "
                     f"occupancy {s['occupancy'][0]:.0%}-{s['occupancy'][1]:.0%}"
                     + (f"  ERRORS {s['errors']}" if s["errors"] else ""))
    return "\n".join(lines)


def run_compile(json_path: str | None = None, arches=ARCHES, jobs: int | None = None) -> int:
    """Compile, print the table, optionally write JSON; 1 on a compile error or a spill."""
    if config.cuda_simulated():
        # The simulator replaces numba.cuda's compiler: compile in a fresh process without it.
        env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
        command = [sys.executable, "-m", "cnnfast", "doctor", "--compile",
                   "--arch", ",".join(arches)]
        if json_path:
            command += ["--json", json_path]
        if jobs:
            command += ["--jobs", str(jobs)]
        return subprocess.run(command, env=env).returncode
    try:
        rows, seconds = compile_all(arches, jobs)
    except RuntimeError as exc:
        print(f"cnnfast doctor --compile: {exc}", file=sys.stderr)
        return 1
    print(format_table(rows))
    errors = [r for r in rows if r.error]
    spills = [r for r in rows if r.spill_stores or r.spill_loads]
    print(f"\n{len(rows) // max(len(arches), 1)} kernel variants x {len(arches)} architectures "
          f"compiled in {seconds:.1f} s: {len(errors)} errors, {len(spills)} spilling")
    if json_path:
        from cnnfast import _io

        payload = {
            "tool": "cnnfast doctor --compile",
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "versions": {d: _version(d) for d in ("numba", "numba-cuda", "nvidia-nvvm",
                                                  "nvidia-cuda-nvcc", "nvidia-cuda-nvcc-cu12")},
            "ptxas": os.path.basename(os.path.dirname(os.path.dirname(find_ptxas() or ""))),
            "seconds": round(seconds, 1),
            "rows": [dataclasses.asdict(r) for r in rows],
            "summary": summary(rows),
        }
        with _io.atomic_write(json_path, "w") as f:
            f.write(json.dumps(payload, indent=1) + "\n")
    return 1 if errors or spills else 0
