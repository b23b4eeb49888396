"""Fast CPU kernels: Numba and BLAS through NumPy (contract in cnnfast.dispatch).

Importing this package tunes glibc's allocator thresholds once (see :mod:`cnnfast.cpu._malloc`;
``CNNFAST_MALLOC_TUNE=0`` turns that off).
"""

from cnnfast.cpu._malloc import tune_malloc

tune_malloc()
