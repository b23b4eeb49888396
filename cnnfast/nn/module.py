"""``Module`` and ``Parameter``: parameters, buffers, submodules, state dicts, train/eval, to()."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

import numpy as np

from cnnfast import dispatch
from cnnfast.tensor import Tensor


class Parameter(Tensor):
    """A tensor a module learns: ``requires_grad`` is on."""

    def __init__(self, data, requires_grad: bool = True, device: str | None = None):
        super().__init__(data, requires_grad=requires_grad, device=device)

    def __repr__(self) -> str:
        return "Parameter containing:\n" + super().__repr__()


class Module:
    """Base class of layers and models, PyTorch-shaped.

    Assigning a ``Parameter`` or a ``Module`` to an attribute registers it; buffers (state that is
    saved but not learned, such as batch norm's running statistics) are registered with
    :meth:`register_buffer`.
    """

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name: str, value) -> None:
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}: call super().__init__() before assigning "
                               f"attributes")
        for registry in (self._parameters, self._buffers, self._modules):
            registry.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def register_buffer(self, name: str, value: Tensor | None) -> None:
        object.__setattr__(self, name, value)
        self._buffers[name] = value

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # --- traversal --------------------------------------------------------------------------------
    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        stack = [(prefix, self)]
        while stack:
            name, module = stack.pop(0)
            yield name, module
            for child_name, child in module._modules.items():
                if child is not None:
                    stack.append((f"{name}.{child_name}" if name else child_name, child))

    def modules(self) -> Iterator[Module]:
        for _, m in self.named_modules():
            yield m

    def children(self) -> Iterator[Module]:
        yield from (m for m in self._modules.values() if m is not None)

    def named_parameters(self) -> Iterator[tuple[str, Parameter]]:
        for prefix, module in self.named_modules():
            for name, p in module._parameters.items():
                if p is not None:
                    yield (f"{prefix}.{name}" if prefix else name), p

    def parameters(self) -> Iterator[Parameter]:
        for _, p in self.named_parameters():
            yield p

    def named_buffers(self) -> Iterator[tuple[str, Tensor]]:
        for prefix, module in self.named_modules():
            for name, b in module._buffers.items():
                if b is not None:
                    yield (f"{prefix}.{name}" if prefix else name), b

    # --- state ------------------------------------------------------------------------------
    def state_dict(self) -> OrderedDict:
        """Parameters and buffers by dotted name, as NumPy copies."""
        state = OrderedDict()
        for name, t in list(self.named_parameters()) + list(self.named_buffers()):
            state[name] = np.array(t.numpy(), copy=True)
        return state

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy ``state`` into the parameters and buffers; checks everything before writing any.

        Raises ``ValueError`` naming missing, unexpected or mis-shaped entries (missing and
        unexpected entries are allowed with ``strict=False``; mis-shaped ones never are).
        """
        own = OrderedDict(list(self.named_parameters()) + list(self.named_buffers()))
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        problems = []
        if strict and missing:
            problems.append(f"missing keys {missing}")
        if strict and unexpected:
            problems.append(f"unexpected keys {unexpected}")
        for name, t in own.items():
            if name in state:
                value = np.asarray(dispatch.to_device(state[name], "cpu"))
                if value.shape != t.shape:
                    problems.append(f"{name!r} has shape {value.shape}, expected {t.shape}")
                elif value.dtype.kind != "f" and t.dtype.kind == "f":
                    problems.append(f"{name!r} has dtype {value.dtype}, expected {t.dtype}")
        if problems:
            raise ValueError(f"load_state_dict for {type(self).__name__}: " + "; ".join(problems))
        for name, t in own.items():
            if name in state:
                value = np.asarray(dispatch.to_device(state[name], "cpu")).astype(t.dtype)
                t.data[...] = dispatch.to_device(value, t.device)

    # --- modes and devices ----------------------------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    def to(self, device: str | None = None, dtype=None) -> Module:
        """Move (and optionally cast) every parameter and buffer in place."""
        if device is not None and device not in dispatch.DEVICES:
            raise ValueError(f"device must be one of {dispatch.DEVICES}, got {device!r}")
        if device == "cuda":
            dispatch.require_cuda()
        for t in list(self.parameters()) + [b for _, b in self.named_buffers()]:
            target = t.device if device is None else device
            data = dispatch.to_device(t.data, target)
            if dtype is not None and data.dtype.kind == "f":
                data = data.astype(dtype)
            t.data, t.device = data, target
            if t.grad is not None:
                t.grad = None
        return self

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def num_parameters(self) -> int:
        return sum(p.size for p in self.parameters())

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, child in self._modules.items():
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        return "\n".join(lines) + (")" if len(lines) == 1 else "\n)")
