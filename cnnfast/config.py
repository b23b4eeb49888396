"""Every environment variable cnnfast reads, read here and only here (a leaf: no cnnfast import).

Option (``get(name)``) and variable, with its default:

- ``debug``, CNNFAST_DEBUG: the CLI shows a user error's full traceback, not one line (off)
- ``cpu_path``, CNNFAST_CPU_PATH: the CPU kernel path, ``fast`` or ``reference`` (``fast``)
- ``cuda_simulated``, NUMBA_ENABLE_CUDASIM: Numba's CUDA simulator stands in for a GPU (off);
  read only, since Numba reads it once, when it is first imported
- ``data_dir``, CNNFAST_DATA_DIR: where MedMNIST files are looked for and downloaded
  (``~/.medmnist``)
- ``medmnist_url``, CNNFAST_MEDMNIST_URL: download from this URL instead of Zenodo (none)
- ``matmul_precision``, CNNFAST_MATMUL_PRECISION: how float32 convolutions multiply on
  ``cuda``, ``highest`` (FP32), ``high`` (TF32 tensor cores) or ``medium`` (BF16) (``highest``)
- ``malloc_tune``, CNNFAST_MALLOC_TUNE: raise glibc's mmap and trim thresholds once (on)
- ``dist_timeout``, CNNFAST_DIST_TIMEOUT: seconds a data-parallel rank waits for the others (300)
- ``bench_cuda_sim``, CNNFAST_BENCH_CUDA_SIM: ``benchmarks/`` runs the pytest-benchmark suites'
  cuda path in the simulator (off)
- ``cpu_gemm``, CNNFAST_CPU_GEMM: the float32 CPU convolution's matrix product, ``auto``, ``own``
  (cnnfast's microkernel) or ``blas`` (``auto``)
- ``cpu_flush_denormals``, CNNFAST_CPU_FLUSH_DENORMALS: the CPU convolution kernels run with
  flush-to-zero / denormals-are-zero (on)
- ``opinfo_full``, CNNFAST_OPINFO_FULL: ``tests/test_opinfo.py`` runs every PyTorch sample, not
  a deterministic subset of the largest grids (off)
- ``cuda_autotune``, CNNFAST_CUDA_AUTOTUNE: time the convolutions' tile configurations once per
  shape and GPU and keep the fastest (``cnnfast.cuda.autotune``) (off)
- ``cache_dir``, CNNFAST_CACHE_DIR: where cnnfast keeps what it measured, e.g. autotune choices
  (``~/.cache/cnnfast``)
- ``fuzz_examples``, CNNFAST_FUZZ_EXAMPLES; ``property_examples``, CNNFAST_PROPERTY_EXAMPLES:
  examples per test in ``tests/test_fuzz.py`` (100) and ``tests/test_properties.py`` (80)

One truthiness rule for the on/off variables: ``1``/``true``/``yes``/``on`` (any case, or any
non-zero integer) is on, ``0``/``false``/``no``/``off`` is off, anything else is a
:class:`ValueError` naming the variable. A variable that is unset or empty takes its default.

The environment is read when an option is asked for (:func:`get`), so a variable set before
the first use counts; :func:`set_option` and the :func:`using_config` context override it, the
way Chainer's ``chainer.using_config`` and tinygrad's ``Context`` do::

    with cnnfast.config.using_config(cpu_path="reference"):
        ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

CPU_PATHS = ("fast", "reference")  # the user's names of the two CPU kernel paths
MATMUL_PRECISIONS = ("highest", "high", "medium")  # PyTorch's set_float32_matmul_precision

_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


def parse_flag(name: str, text: str) -> bool:
    """``text`` (the value of variable ``name``) as on/off, by the one rule above."""
    word = text.strip().lower()
    if word in _ON:
        return True
    if word in _OFF:
        return False
    try:
        return int(word) != 0
    except ValueError:
        raise ValueError(f"{name} must be one of {'/'.join(_ON)} or {'/'.join(_OFF)}, got "
                         f"{text!r}") from None


def _text(name: str, text: str) -> str:
    return text.strip()


def _path(name: str, text: str) -> Path:
    return Path(text.strip()).expanduser()


def _count(name: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {text!r}")
    return value


def _seconds(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {text!r}") from None
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {text!r}")
    return value


def _one_of(*choices: str) -> Callable[[str, str], str]:
    def parse(name: str, text: str) -> str:
        value = text.strip()
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {text!r}")
        return value
    return parse


@dataclasses.dataclass(frozen=True)
class Option:
    variable: str
    parse: Callable[[str, str], Any]
    default: Any
    settable: bool = True  # False: read by a library at its import, so an override would lie


OPTIONS: dict[str, Option] = {
    "debug": Option("CNNFAST_DEBUG", parse_flag, False),
    "cpu_path": Option("CNNFAST_CPU_PATH", _one_of(*CPU_PATHS), "fast"),
    "cuda_simulated": Option("NUMBA_ENABLE_CUDASIM", parse_flag, False, settable=False),
    "data_dir": Option("CNNFAST_DATA_DIR", _path, None),  # None: ~/.medmnist, see data_dir()
    "medmnist_url": Option("CNNFAST_MEDMNIST_URL", _text, None),
    "matmul_precision": Option("CNNFAST_MATMUL_PRECISION", _one_of(*MATMUL_PRECISIONS),
                               "highest"),
    "malloc_tune": Option("CNNFAST_MALLOC_TUNE", parse_flag, True),
    "dist_timeout": Option("CNNFAST_DIST_TIMEOUT", _seconds, 300.0),
    "bench_cuda_sim": Option("CNNFAST_BENCH_CUDA_SIM", parse_flag, False),
    "cpu_gemm": Option("CNNFAST_CPU_GEMM", _one_of("auto", "own", "blas"), "auto"),
    "cpu_flush_denormals": Option("CNNFAST_CPU_FLUSH_DENORMALS", parse_flag, True),
    "opinfo_full": Option("CNNFAST_OPINFO_FULL", parse_flag, False),
    "cuda_autotune": Option("CNNFAST_CUDA_AUTOTUNE", parse_flag, False),
    "cache_dir": Option("CNNFAST_CACHE_DIR", _path, None),  # None: ~/.cache/cnnfast
    "fuzz_examples": Option("CNNFAST_FUZZ_EXAMPLES", _count, 100),
    "property_examples": Option("CNNFAST_PROPERTY_EXAMPLES", _count, 80),
}

_overrides: dict[str, Any] = {}


def _option(name: str) -> Option:
    try:
        return OPTIONS[name]
    except KeyError:
        raise ValueError(f"unknown cnnfast option {name!r}; the options are "
                         f"{sorted(OPTIONS)}") from None


def get(name: str) -> Any:
    """The value of option ``name``: an override, else its environment variable, else the
    default. A malformed variable raises :class:`ValueError` naming it."""
    option = _option(name)
    if name in _overrides:
        return _overrides[name]
    text = os.environ.get(option.variable)
    if text is None or not text.strip():
        return option.default
    return option.parse(option.variable, text)


def _checked(name: str, value: Any) -> Any:
    option = _option(name)
    if not option.settable:
        raise ValueError(f"option {name!r} ({option.variable}) is read by a library when it is "
                         "imported; set the variable before starting Python instead")
    if isinstance(value, str):  # spelled as in the environment: the same checks apply
        return option.parse(option.variable, value)
    if option.parse is parse_flag:
        if not isinstance(value, bool):
            raise TypeError(f"option {name!r} must be a bool, got {type(value).__name__}")
    elif value is not None and option.default is not None and not isinstance(
            value, type(option.default)):
        raise TypeError(f"option {name!r} must be a {type(option.default).__name__}, got "
                        f"{type(value).__name__}")
    return value


def set_option(name: str, value: Any) -> None:
    """Override option ``name`` for the rest of the process (checked like its variable)."""
    _overrides[name] = _checked(name, value)


@contextlib.contextmanager
def using_config(**values: Any):
    """Override options inside the block, then restore what was there before."""
    checked = {name: _checked(name, value) for name, value in values.items()}
    missing = object()
    previous = {name: _overrides.get(name, missing) for name in checked}
    _overrides.update(checked)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is missing:
                _overrides.pop(name, None)
            else:
                _overrides[name] = value


# --- the options the library reads in more than one place -------------------------------------

def debug() -> bool:
    return get("debug")


def cuda_simulated() -> bool:
    """True when Numba's CUDA simulator stands in for a GPU (NUMBA_ENABLE_CUDASIM on)."""
    return get("cuda_simulated")


def data_dir() -> Path:
    """Where MedMNIST files are looked for and downloaded: ``$CNNFAST_DATA_DIR`` or
    ``~/.medmnist`` (shared with the ``medmnist`` package)."""
    return get("data_dir") or Path.home() / ".medmnist"


def cache_dir() -> Path:
    """Where cnnfast keeps what it measured (autotune choices): ``$CNNFAST_CACHE_DIR`` or
    ``~/.cache/cnnfast``."""
    return get("cache_dir") or Path.home() / ".cache" / "cnnfast"
