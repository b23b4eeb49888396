"""Array backends: NumPy on the host, CuPy on a GPU — the one array-module switch (a leaf).

Everything that asks "is this a CuPy array", "which array module (``xp``) does this array use",
"is there a GPU" or "copy this array to a device" asks here, like DeZero's ``dezero/cuda.py``.
This module imports NumPy only; CuPy is imported on first need, so it works (and stays cheap)
on machines without CuPy or a GPU. Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) runs the
``cuda`` device on NumPy arrays.

:mod:`cnnfast.dispatch` re-exports these names; it picks kernel paths, this module picks arrays.
"""

from __future__ import annotations

import numpy as np

from cnnfast import config

_gpu_present: bool | None = None


def cuda_simulated() -> bool:
    """True when Numba's CUDA simulator stands in for a GPU (NUMBA_ENABLE_CUDASIM=1)."""
    return config.cuda_simulated()


def gpu_present() -> bool:
    """True when CuPy is installed and sees a CUDA device (checked once, lazily)."""
    global _gpu_present
    if _gpu_present is None:
        try:
            import cupy

            _gpu_present = bool(cupy.is_available())
        except Exception:  # noqa: BLE001 - ImportError, or a CuPy without a usable driver
            _gpu_present = False
    return _gpu_present


def cuda_available() -> bool:
    """True when the ``cuda`` device can run: on a GPU through CuPy, or in the simulator."""
    return cuda_simulated() or gpu_present()


def require_cuda() -> None:
    """Raise a RuntimeError saying how to get a ``cuda`` device when there is none."""
    if not cuda_available():
        raise RuntimeError(
            "device 'cuda' is not available: no GPU was found through CuPy. Install the CUDA "
            "extra for the driver's CUDA version on a machine with an NVIDIA GPU (pip install "
            "'cnnfast[cuda12]' or 'cnnfast[cuda13]'; cnnfast doctor says which), or set "
            "NUMBA_ENABLE_CUDASIM=1 before importing cnnfast to run the CUDA kernels in Numba's "
            "simulator (slow; for testing only)."
        )


def is_cupy_array(a) -> bool:
    """True for a CuPy array (checked by type, without importing CuPy)."""
    return type(a).__module__.startswith("cupy")


def array_xp(a):
    """The array module of an array (``get_array_module``), without importing CuPy needlessly."""
    if is_cupy_array(a):
        import cupy

        return cupy
    return np


def device_xp(device: str):
    """The array module of a device's arrays: NumPy on cpu and in the simulator, else CuPy."""
    if device == "cuda" and not cuda_simulated():
        require_cuda()
        import cupy

        return cupy
    return np


def to_device(a, device: str):
    """Copy an array to ``device``'s array module (a no-op when it is already there)."""
    if device == "cuda" and not cuda_simulated():
        require_cuda()
        import cupy

        return cupy.asarray(a)
    if is_cupy_array(a):
        return a.get()
    return np.asarray(a)


def to_numpy(a) -> np.ndarray:
    """A host NumPy array of a NumPy/CuPy array or a ``Tensor`` (anything with ``.numpy()``)."""
    if hasattr(a, "numpy") and not isinstance(a, np.ndarray):
        return a.numpy()
    if is_cupy_array(a):
        return a.get()
    return np.asarray(a)
