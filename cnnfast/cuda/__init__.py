"""Numba CUDA kernels on CuPy arrays, or in Numba's CUDA simulator (contract in cnnfast.dispatch)."""
