"""Numba CUDA kernels on CuPy arrays, or in Numba's CUDA simulator.

The kernel contract is in cnnfast.dispatch.
"""
