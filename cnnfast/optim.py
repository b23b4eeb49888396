"""Optimizers (SGD, Adam, AdamW) and learning-rate schedules, with PyTorch's update rules.

Updates run in place on the parameters' arrays (NumPy or CuPy), outside the autograd graph, and
keep their state (momentum buffers, moments) in arrays allocated once on the parameter's device.

On the ``cuda`` device a group whose parameters share a dtype and all have gradients is updated
by one kernel launch (the contract's ``optimizer_update``, through :mod:`cnnfast.dispatch`, with
twins on the reference and cpu paths): the group's parameters then live in one flat
buffer (each ``p.data`` a view of it; a ``p.data`` replaced from outside is copied back in), and
so do their state arrays.
"""

from __future__ import annotations

import math
import types
from collections.abc import Iterable

from cnnfast import dispatch
from cnnfast.tensor import Tensor

__all__ = ["SGD", "Adam", "AdamW", "CosineAnnealingLR", "MultiStepLR", "Optimizer", "StepLR"]


class Optimizer:
    def __init__(self, params: Iterable, defaults: dict):
        groups = list(params)
        if not groups:
            raise ValueError(f"{type(self).__name__}: got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.param_groups = []
        for group in groups:
            group = {**defaults, **group, "params": list(group["params"])}
            for p in group["params"]:
                if not isinstance(p, Tensor) or not p.requires_grad:
                    raise TypeError(f"{type(self).__name__}: every parameter must be a Tensor "
                                    f"with requires_grad=True, got {type(p).__name__}")
            if group["lr"] < 0:
                raise ValueError(f"{type(self).__name__}: lr must be >= 0, got {group['lr']}")
            if group.get("weight_decay", 0) < 0:
                raise ValueError(f"{type(self).__name__}: weight_decay must be >= 0, "
                                 f"got {group['weight_decay']}")
            group.setdefault("initial_lr", group["lr"])
            self.param_groups.append(group)
        self.state: dict[int, dict] = {}

    def zero_grad(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def step(self) -> None:
        for index, group in enumerate(self.param_groups):
            if self._fused_step(index, group):
                continue
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, p.grad.data, group, self.state.setdefault(id(p), {}))

    def _update(self, p: Tensor, g, group: dict, state: dict) -> None:
        raise NotImplementedError

    # --- one launch per group on the cuda device -----------------------------------------------
    def _fused_arguments(self, group: dict, states: list[dict]):
        """(rule, state names, kernel scalars) for the kernels' ``optimizer_update``, or None
        when this group must take the per-parameter path."""
        return None

    def _fused_step(self, index: int, group: dict) -> bool:
        params = group["params"]
        if not all(p.device == "cuda" and p.grad is not None and p.dtype == params[0].dtype
                   for p in params):
            return False
        states = [self.state.setdefault(id(p), {}) for p in params]
        fused = self._fused_arguments(group, states)
        if fused is None:
            return False
        rule, names, scalars = fused
        flats = self.__dict__.setdefault("_flat", {})
        flat = flats.get(index)
        if flat is None or flat.params is not params or flat.names != names:
            flat = flats[index] = _FlatGroup(params, names, states)
        flat.attach(states)
        xp = params[0].xp
        grads = xp.concatenate([p.grad.data.reshape(-1) for p in params])
        m = flat.state[names[0]] if names else None
        v = flat.state[names[1]] if len(names) > 1 else None
        dispatch.kernels("cuda").optimizer_update(rule, flat.data, grads, m, v, *scalars)
        return True

    def state_dict(self) -> dict:
        """Hyper-parameters per group and per-parameter state, by parameter position."""
        order = [p for group in self.param_groups for p in group["params"]]
        return {
            "param_groups": [{k: v for k, v in g.items() if k != "params"}
                             for g in self.param_groups],
            "state": {i: dict(self.state[id(p)]) for i, p in enumerate(order)
                      if id(p) in self.state},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore what :meth:`state_dict` returned (e.g. read back from a file): group
        hyper-parameters, and per-parameter state copied onto each parameter's device.

        Everything is checked before anything changes: the group count, the parameter positions
        and that each state array has its parameter's shape; ``ValueError`` otherwise.
        """
        order = [p for group in self.param_groups for p in group["params"]]
        groups = list(state_dict["param_groups"])
        if len(groups) != len(self.param_groups):
            raise ValueError(f"{type(self).__name__}.load_state_dict: {len(groups)} parameter "
                             f"groups given, this optimizer has {len(self.param_groups)}")
        new_state = {}
        for index, entries in state_dict["state"].items():
            index = int(index)
            if not 0 <= index < len(order):
                raise ValueError(f"{type(self).__name__}.load_state_dict: state for parameter "
                                 f"{index}, but there are {len(order)} parameters")
            p = order[index]
            restored = {}
            for key, value in entries.items():
                if isinstance(value, (int, float, bool)):
                    restored[key] = value
                    continue
                if tuple(value.shape) != tuple(p.shape):
                    raise ValueError(f"{type(self).__name__}.load_state_dict: {key} of "
                                     f"parameter {index} has shape {tuple(value.shape)}, the "
                                     f"parameter {tuple(p.shape)}")
                restored[key] = p.xp.array(value, dtype=p.data.dtype, copy=True)
            new_state[id(p)] = restored
        for group, saved in zip(self.param_groups, groups):
            for key, value in saved.items():
                group[key] = tuple(value) if isinstance(value, list) else value
        self.state = new_state


class _FlatGroup:
    """One flat buffer holding a group's parameters (each ``p.data`` a view of it) and one per
    state array (each ``state[name]`` a view), so one kernel updates them all."""

    def __init__(self, params: list, names: tuple[str, ...], states: list[dict]):
        self.params, self.names = params, names
        xp = params[0].xp
        self.sizes = [p.size for p in params]
        total = sum(self.sizes)
        self.data = xp.empty(total, dtype=params[0].dtype)
        self.views = self._views(self.data, params)
        self.state = {name: xp.zeros(total, dtype=params[0].dtype) for name in names}
        self.state_views = {name: self._views(buf, params) for name, buf in self.state.items()}
        for p, view in zip(params, self.views):
            view[...] = p.data
            p.data = view
        for name in names:
            for st, view in zip(states, self.state_views[name]):
                if st.get(name) is not None:
                    view[...] = st[name]
                st[name] = view

    @staticmethod
    def _views(buf, params) -> list:
        views, offset = [], 0
        for p in params:
            views.append(buf[offset:offset + p.size].reshape(p.shape))
            offset += p.size
        return views

    def attach(self, states: list[dict]) -> None:
        """Copy back in any parameter or state array replaced from outside since the last step."""
        for p, view in zip(self.params, self.views):
            if p.data is not view:
                view[...] = p.data
                p.data = view
        for name in self.names:
            for st, view in zip(states, self.state_views[name]):
                if st.get(name) is not view:
                    if st.get(name) is not None:
                        view[...] = st[name]
                    st[name] = view


class SGD(Optimizer):
    """SGD with optional momentum (PyTorch's form: buf = m * buf + g), nesterov, weight decay."""

    def __init__(self, params, lr: float = 0.01, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, dampening: float = 0.0):
        if momentum < 0:
            raise ValueError(f"SGD: momentum must be >= 0, got {momentum}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: nesterov needs momentum > 0 and dampening 0")
        super().__init__(params, {"lr": lr, "momentum": momentum, "nesterov": nesterov,
                                  "weight_decay": weight_decay, "dampening": dampening})

    def _update(self, p, g, group, state):
        if group["weight_decay"]:
            g = g + group["weight_decay"] * p.data
        m = group["momentum"]
        if m:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = g.copy()
            else:
                buf *= m
                buf += (1 - group["dampening"]) * g
            g = g + m * buf if group["nesterov"] else buf
        p.data -= group["lr"] * g

    def _fused_arguments(self, group, states):
        m = group["momentum"]
        if not m:
            return "sgd", (), (group["lr"], 0.0, 0.0, group["weight_decay"], 0.0, 1.0, False)
        started = {"momentum_buffer" in st for st in states}
        if len(started) > 1:  # some buffers exist, some not: the per-parameter path sorts it
            return None
        rule = "sgd_nesterov" if group["nesterov"] else "sgd_momentum"
        return rule, ("momentum_buffer",), (group["lr"], m, group["dampening"],
                                            group["weight_decay"], 0.0, 1.0, not started.pop())


class Adam(Optimizer):
    """Adam with bias correction; ``weight_decay`` adds to the gradient (L2), as in PyTorch."""

    decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"{type(self).__name__}: betas must lie in [0, 1), got {betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps,
                                  "weight_decay": weight_decay})

    def _update(self, p, g, group, state):
        lr, wd = group["lr"], group["weight_decay"]
        b1, b2 = group["betas"]
        if wd:
            if self.decoupled:
                p.data *= 1 - lr * wd
            else:
                g = g + wd * p.data
        if not state:
            xp = p.xp
            state["step"] = 0
            state["exp_avg"] = xp.zeros_like(p.data)
            state["exp_avg_sq"] = xp.zeros_like(p.data)
        state["step"] += 1
        t = state["step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * (g * g)
        step_size = lr / (1 - b1 ** t)
        denom = p.xp.sqrt(v) / math.sqrt(1 - b2 ** t) + group["eps"]
        p.data -= step_size * (m / denom)

    def _fused_arguments(self, group, states):
        steps = {st.get("step", 0) for st in states}
        if len(steps) > 1:  # parameters at different steps: the per-parameter path
            return None
        t = steps.pop() + 1
        for st in states:
            st["step"] = t
        lr, wd = group["lr"], group["weight_decay"]
        b1, b2 = group["betas"]
        rule = "adamw" if self.decoupled else "adam"
        return rule, ("exp_avg", "exp_avg_sq"), (
            lr / (1 - b1 ** t), b1, b2, lr * wd if self.decoupled else wd, group["eps"],
            math.sqrt(1 - b2 ** t), False)


class AdamW(Adam):
    """Adam with decoupled weight decay: p *= (1 - lr * weight_decay) before the Adam step."""

    decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(params, lr, betas, eps, weight_decay)


# --- schedules ---------------------------------------------------------------------------------

class _Schedule:
    """Sets each group's lr from the epoch count; call ``step()`` once per epoch."""

    def __init__(self, optimizer: Optimizer):
        self.optimizer = optimizer
        self.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        self.last_epoch = 0
        self._apply()

    def lr_at(self, base_lr: float, epoch: int) -> float:
        raise NotImplementedError

    def _apply(self) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = self.lr_at(base, self.last_epoch)

    def step(self) -> None:
        self.last_epoch += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]


class StepLR(_Schedule):
    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1):
        if step_size < 1:
            raise ValueError(f"StepLR: step_size must be >= 1, got {step_size}")
        self.step_size, self.gamma = step_size, gamma
        super().__init__(optimizer)

    def lr_at(self, base_lr, epoch):
        return base_lr * self.gamma ** (epoch // self.step_size)


class MultiStepLR(_Schedule):
    """lr = base * gamma ** (number of milestones passed), e.g. the MedMNIST recipe's [50, 75]."""

    def __init__(self, optimizer: Optimizer, milestones: Iterable[int], gamma: float = 0.1):
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = gamma
        super().__init__(optimizer)

    def lr_at(self, base_lr, epoch):
        return base_lr * self.gamma ** sum(1 for m in self.milestones if epoch >= m)


class CosineAnnealingLR(_Schedule):
    """lr = eta_min + (base - eta_min) * (1 + cos(pi * epoch / T_max)) / 2."""

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0):
        if T_max < 1:
            raise ValueError(f"CosineAnnealingLR: T_max must be >= 1, got {T_max}")
        self.T_max, self.eta_min = T_max, eta_min
        super().__init__(optimizer)

    def lr_at(self, base_lr, epoch):
        return self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * epoch /
                                                                       self.T_max)) / 2


# PyTorch's spelling, ``optim.lr_scheduler.MultiStepLR(...)``, for code written against torch
lr_scheduler = types.SimpleNamespace(StepLR=StepLR, MultiStepLR=MultiStepLR,
                                     CosineAnnealingLR=CosineAnnealingLR)
