"""``linear``: x @ weight.T + bias."""

from __future__ import annotations

from cnnfast import dispatch
from cnnfast.functional.checks import check_same, float_tensor
from cnnfast.tensor import Function, Tensor


class Linear(Function):
    def forward(self, x, w, b):
        self.kernels = dispatch.kernels(self.device)
        self.x = x if self.needs_input_grad[1] else None
        self.w = w if self.needs_input_grad[0] else None
        return self.kernels.linear_forward(x, w, b)

    def backward(self, gy):
        need = self.needs_input_grad
        return self.kernels.linear_backward(gy, self.x, self.w, need_x=need[0], need_w=need[1],
                                            need_b=need[2])


def linear(x, weight, bias=None) -> Tensor:
    """x (*, IN) @ weight (OUT, IN).T + bias (OUT,) -> (*, OUT): any leading axes (none for a
    single vector), as in PyTorch."""
    x = float_tensor(x, "linear", "input")
    weight = float_tensor(weight, "linear", "weight", device=x.device)
    bias = None if bias is None else float_tensor(bias, "linear", "bias", device=x.device)
    check_same("linear", x, "input", weight=weight, bias=bias)
    if x.ndim < 1:
        raise ValueError(f"linear: input must be at least 1-D (*, IN), got shape {x.shape}")
    if weight.ndim != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"linear: weight must have shape (OUT, {x.shape[-1]}), "
                         f"got {weight.shape}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"linear: bias must have shape ({weight.shape[0]},), got {bias.shape}")
    lead = x.shape[:-1]
    if x.ndim != 2:
        x = x.reshape(-1, x.shape[-1])
    if x.shape[0] == 0:  # no rows: the kernels never see an empty matrix
        y = x @ weight.T
        y = y if bias is None else y + bias
    else:
        y = Linear().apply(x, weight, bias)
    return y if len(lead) == 1 else y.reshape(lead + (weight.shape[0],))
