"""NumPy reference kernels: the oracle every other path is checked against.

The kernel contract is in cnnfast.dispatch.
"""
