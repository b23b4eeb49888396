"""Fast CPU kernels: Numba and BLAS through NumPy (contract in cnnfast.dispatch)."""
