"""Trainers: one model on one candidate, for the correctness check and the timed step."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

import cnnfast
from cnnfast.bench.mirror import _set_dropout, torch_mirror
from cnnfast.bench.workloads import ModelSpec, _record_layers, build_model

if TYPE_CHECKING:  # annotations only: candidates imports this module when it makes a trainer
    from cnnfast.bench.candidates import KernelCandidate, TorchCandidate


class Trainer:
    """One model on one candidate: ``check(x, y)`` gives (loss, grads) at the initial weights;
    ``step()`` runs one full training step on the timed batch."""

    model = None

    def check(self, x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        raise NotImplementedError

    def prepare(self, x: np.ndarray, y: np.ndarray) -> None:
        raise NotImplementedError

    def to_dtype(self, dtype) -> None:
        """Cast the model's parameters and buffers (float64 for the correctness check)."""
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError


class CnnfastTrainer(Trainer):
    def __init__(self, cand: KernelCandidate, spec: ModelSpec, state: dict):
        from cnnfast import nn, optim

        self.cand = cand
        self.model = build_model(spec.name, spec.stem)
        self.model.load_state_dict(state)
        if cand.device == "cuda":
            self.model.to("cuda")
        self.model.train()
        self.loss_fn = nn.CrossEntropyLoss()
        self.opt = optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.records: list | None = None

    def to_dtype(self, dtype):
        self.model.to(dtype=dtype)

    def _tensors(self, x, y):
        return (cnnfast.tensor(x, device=self.cand.device),
                cnnfast.tensor(y, device=self.cand.device))

    def check(self, x, y):
        xt, yt = self._tensors(x, y)
        saved = _set_dropout(self.model, 0.0)
        records: list = []
        try:
            with self.cand.selected(), _record_layers(self.model, records):
                self.model.zero_grad()
                loss = self.loss_fn(self.model(xt), yt)
                loss.backward()
        finally:
            _set_dropout(self.model, None, saved)
        self.records = records
        grads = {name: self.cand.to_numpy(p.grad.data) if p.grad is not None else None
                 for name, p in self.model.named_parameters()}
        self.model.zero_grad()
        return float(loss.item()), grads

    def prepare(self, x, y):
        self.xt, self.yt = self._tensors(x, y)

    def step(self):
        with self.cand.selected():
            self.opt.zero_grad()
            loss = self.loss_fn(self.model(self.xt), self.yt)
            loss.backward()
            self.opt.step()
        self.cand.sync()


class TorchTrainer(Trainer):
    def __init__(self, cand: TorchCandidate, spec: ModelSpec, state: dict):
        torch = cand._torch
        self.cand, self.torch = cand, torch
        self.model = torch_mirror(build_model(spec.name, spec.stem))
        own = self.model.state_dict()
        missing = [k for k in state if k not in own]
        if missing:
            raise ValueError(f"the torch mirror lacks {missing[:3]}")
        self.model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()},
                                   strict=False)
        self.model.to(cand.dev).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)

    def to_dtype(self, dtype):
        self.model.to(dtype=getattr(self.torch, np.dtype(dtype).name))

    def _tensors(self, x, y):
        return self.cand.native(x), self.cand.native(y)

    def check(self, x, y):
        xt, yt = self._tensors(x, y)
        saved = _set_dropout(self.model, 0.0)
        try:
            self.model.zero_grad(set_to_none=True)
            loss = self.torch.nn.functional.cross_entropy(self.model(xt), yt)
            loss.backward()
        finally:
            _set_dropout(self.model, None, saved)
        grads = {name: None if p.grad is None else p.grad.detach().cpu().numpy()
                 for name, p in self.model.named_parameters()}
        self.model.zero_grad(set_to_none=True)
        return float(loss.item()), grads

    def prepare(self, x, y):
        self.xt, self.yt = self._tensors(x, y)

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        loss = self.torch.nn.functional.cross_entropy(self.model(self.xt), self.yt)
        loss.backward()
        self.opt.step()
        self.cand.sync()

