"""NumPy reference kernels: the oracle every other path is checked against (see cnnfast.dispatch)."""
