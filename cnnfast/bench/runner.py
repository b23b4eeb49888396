"""The run: options, the runner that checks and times every candidate on every item, and
:func:`run_benchmarks`, which returns the report."""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import cnnfast
from cnnfast.bench.candidates import (
    PATHS,
    Candidate,
    KernelCandidate,
    TorchCandidate,
    family_kernels,
    kernel_call,
)
from cnnfast.bench.checks import (
    REFERENCE_MAX_REPEATS,
    TOLERANCE,
    check_batch_for,
    compare_grads,
    compare_outputs,
    reference_timed,
)
from cnnfast.bench.machine import gpu_name, machine_info, machine_threads, versions
from cnnfast.bench.memory import measure_growth, measure_step_memory
from cnnfast.bench.report import SCHEMA
from cnnfast.bench.timing import Entry, _timed, inner_loops, round_robin
from cnnfast.bench.trainers import Trainer
from cnnfast.bench.workloads import (
    MODEL_SPECS,
    MODELS,
    OPS,
    ModelSpec,
    OpItem,
    _model_data,
    _step_flops_per_sample,
    build_model,
    op_items,
)


@dataclass
class Options:
    quick: bool = False
    paths: tuple[str, ...] = PATHS
    ops: tuple[str, ...] = OPS
    models: tuple[str, ...] = MODELS
    shapes: tuple[str, ...] = ()          # shape ids after expanding set names
    repeats: int | None = None            # None: 5 (quick 3), fewer for slow items
    memory_steps: int = 200
    cuda_sim: bool = False
    threads: int = 0
    check_batch: int | None = None        # None: automatic; 0: always the full batch
    step_batch: int | None = None
    reference_all: bool = False
    item_budget_s: float = 20.0           # time per candidate and item above which repeats drop
    progress: bool = True
    out: str | None = None
    seed: int = 0

def make_candidates(options: Options) -> list[Candidate]:
    cands: list[Candidate] = []
    for name in options.paths:
        if name in ("torch", "cudnn"):
            cands.append(TorchCandidate(name))
        else:
            cands.append(KernelCandidate(name, cuda_sim_allowed=options.cuda_sim))
    return cands

def _set_threads(n: int, cands: list[Candidate]) -> dict:
    used = {}
    for c in cands:
        if isinstance(c, TorchCandidate) and c.unavailable() is None:
            c._torch.set_num_threads(n)
            used["torch"] = c._torch.get_num_threads()
    if any(getattr(c, "path", None) == "cpu" for c in cands):
        try:
            import numba

            numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
            used["numba"] = numba.get_num_threads()
        except ImportError:
            pass
    return used


class Runner:
    def __init__(self, options: Options, candidates: list[Candidate] | None = None):
        self.o = options
        self.cands = candidates if candidates is not None else make_candidates(options)
        self.reference = KernelCandidate("reference")
        self.results: list[dict] = []
        self.memory: list[dict] = []
        self.notes: list[str] = []
        self.unavailable: dict[str, str] = {}

    def _reference_timed(self, item) -> bool:
        return reference_timed(item, self.o.reference_all)

    def _repeats(self, cand: Candidate, warm_s: float) -> int:
        if self.o.repeats is not None:
            r = self.o.repeats
        else:
            r = 3 if self.o.quick else 5
            if warm_s * r > self.o.item_budget_s:
                r = max(3 if not self.o.quick else 2, int(self.o.item_budget_s / warm_s))
                r = min(r, 3 if self.o.quick else 5)
        if cand.name == "reference":
            r = min(r, REFERENCE_MAX_REPEATS - (1 if self.o.quick else 0))
        return r

    def _row(self, item_id, op, phase, shape_id, set_name, label, batch, cand) -> dict:
        return {"id": item_id, "op": op, "phase": phase, "shape_id": shape_id, "set": set_name,
                "shape": label, "batch": batch, "path": cand.name, "status": "skipped",
                "reason": None, "check_batch": None, "check_error": None, "first_call_s": None,
                "median_s": None, "gflop": None, "gflops": None, "vs_torch": None}

    def _check_batch(self, item: OpItem) -> int:
        return check_batch_for(item, self.o.quick, self.o.check_batch)

    def _rows_and_active(self, item, *fields) -> tuple[list[dict], list]:
        """A result row per candidate for ``item`` (an OpItem or a ModelSpec; ``fields`` are
        :meth:`_row`'s before ``cand``), and the (candidate, row) pairs that will run; the
        others' rows say why not."""
        rows, active = [], []
        for cand in self.cands:
            row = self._row(*fields, cand)
            rows.append(row)
            reason = self.unavailable.get(cand.name) or cand.unavailable_for(item)
            if reason is None and cand.name == "reference" and not self._reference_timed(item):
                reason = "reference timed on small shapes only (--reference-all)"
            if reason:
                row["reason"] = reason
                continue
            active.append((cand, row))
        return rows, active

    def run_item(self, item: OpItem) -> None:
        entries = []
        rows, active = self._rows_and_active(item, item.id, item.op, item.phase, item.shape_id,
                                             item.set_name, item.label, item.batch)
        if not active:
            self.results.extend(rows)
            return
        n_check = self._check_batch(item)
        check_inputs = item.make_inputs(n_check)
        expected = kernel_call(family_kernels("reference", item.family), item, check_inputs)()
        full_inputs = check_inputs if n_check == item.batch else None
        for cand, row in active:
            row["check_batch"] = n_check
            try:
                native = {k: cand.native(v) for k, v in check_inputs.items()}
                start = time.perf_counter()
                got = cand.op_fn(item, native)()
                cand.sync()
                row["first_call_s"] = time.perf_counter() - start
                got = tuple(cand.to_numpy(g) for g in got)
                ok, err, what = compare_outputs(got, expected, TOLERANCE["op"])
                row["check_error"] = err if math.isfinite(err) else None
                if not ok:
                    row["status"], row["reason"] = "WRONG", what
                    continue
                if full_inputs is None:
                    full_inputs = item.make_inputs(item.batch)
                native = {k: cand.native(v) for k, v in full_inputs.items()}
                fn = cand.op_fn(item, native)
                row["status"] = "ok"
                row["gflop"] = None if item.flops() is None else item.flops() / 1e9
                entries.append(Entry(cand, fn, row, 0))
            except Exception as e:  # noqa: BLE001 - one broken path must not stop the run
                row["status"], row["reason"] = "ERROR", f"{type(e).__name__}: {e}"
        del expected, check_inputs
        self._time(entries)
        self.results.extend(rows)

    def _time(self, entries: list[Entry]) -> None:
        # one untimed warm-up each at the timed shape decides the repeats and inner loops
        gc.collect()
        for e in entries:
            try:
                t = _timed(e.fn, e.cand.sync)
            except Exception as ex:  # noqa: BLE001
                e.row["status"], e.row["reason"] = "ERROR", f"{type(ex).__name__}: {ex}"
                continue
            e.row["warmup_s"] = t
            e.repeats = self._repeats(e.cand, t)
            e.inner = inner_loops(t)
        entries[:] = [e for e in entries if e.row["status"] == "ok"]
        round_robin(entries)
        for e in entries:
            if e.row.get("gflop") and e.row.get("median_s"):
                e.row["gflops"] = e.row["gflop"] / e.row["median_s"]

    def run_model(self, spec: ModelSpec) -> list[tuple[Candidate, Trainer]]:
        if self.o.step_batch:
            spec = ModelSpec(spec.name, spec.input_shape, self.o.step_batch,
                             min(spec.check_batch, self.o.step_batch))
        if self.o.check_batch is not None:
            n = spec.batch if self.o.check_batch == 0 else min(self.o.check_batch, spec.batch)
            spec = ModelSpec(spec.name, spec.input_shape, spec.batch, n)
        item_id = f"step.train/{spec.name}"
        dims = "x".join(map(str, spec.input_shape))
        label = f"{spec.batch}x{dims}"
        rows, active = self._rows_and_active(spec, item_id, "step", "train", spec.name, "model",
                                             label, spec.batch)
        trained = []
        if not active:
            self.results.extend(rows)
            return trained
        cnnfast.manual_seed(self.o.seed)
        state = build_model(spec.name).state_dict()
        xc, yc = _model_data(spec, spec.check_batch)
        ref_trainer = self.reference.trainer(spec, state)
        expected = ref_trainer.check(xc, yc)
        flops = _step_flops_per_sample(ref_trainer.records) * spec.batch
        del ref_trainer
        xf, yf = _model_data(spec, spec.batch)
        entries = []
        for cand, row in active:
            row["check_batch"] = spec.check_batch
            try:
                trainer = cand.trainer(spec, state)
                start = time.perf_counter()
                got = trainer.check(xc, yc)
                row["first_call_s"] = time.perf_counter() - start
                ok, err, what = compare_grads(got, expected, TOLERANCE["step"])
                row["check_error"] = err if math.isfinite(err) else None
                if not ok:
                    row["status"], row["reason"] = "WRONG", what
                    continue
                trainer.prepare(xf, yf)
                row["status"], row["gflop"] = "ok", flops / 1e9
                entries.append(Entry(cand, trainer.step, row, 0))
                trained.append((cand, trainer, row))
            except Exception as e:  # noqa: BLE001
                row["status"], row["reason"] = "ERROR", f"{type(e).__name__}: {e}"
        self._time(entries)
        for cand, trainer, row in trained:
            if row["status"] != "ok":
                continue
            try:
                row.update(measure_step_memory(trainer, isinstance(cand, KernelCandidate)
                                               and cand.device == "cpu"))
            except Exception as e:  # noqa: BLE001
                row["memory_error"] = f"{type(e).__name__}: {e}"
        self.results.extend(rows)
        return [(c, t) for c, t, r in trained if r["status"] == "ok"]

    def run(self) -> None:
        for cand in self.cands:
            reason = cand.unavailable()
            if reason:
                self.unavailable[cand.name] = reason
                self.notes.append(f"{cand.name}: not run ({reason})")
        items = op_items(self.o.ops, self.o.shapes)
        models = [MODEL_SPECS[m] for m in self.o.models] if "step" in self.o.ops else []
        total = len(items) + len(models)
        bar = _progress(total, self.o.progress)
        try:
            for item in items:
                bar.set_description(item.id)
                self.run_item(item)
                bar.update(1)
            for spec in models:
                bar.set_description(f"step.train/{spec.name}")
                trained = self.run_model(spec)
                if spec.name == "smallcnn" and self.o.memory_steps > 0:
                    for cand, trainer in trained:
                        bar.set_description(f"memory/{spec.name}/{cand.name}")
                        try:
                            growth = measure_growth(trainer, self.o.memory_steps)
                        except Exception as e:  # noqa: BLE001
                            growth = {"error": f"{type(e).__name__}: {e}"}
                        self.memory.append({"model": spec.name, "path": cand.name, **growth})
                del trained
                bar.update(1)
        finally:
            bar.close()
        self._ratios()

    def _ratios(self) -> None:
        peer = {"cpu": "torch", "gpu": "cudnn"}
        kinds = {c.name: c.device_kind for c in self.cands}
        kinds.setdefault("reference", "cpu")
        by_id: dict[str, dict[str, dict]] = {}
        for row in self.results:
            by_id.setdefault(row["id"], {})[row["path"]] = row
        for rows in by_id.values():
            for path, row in rows.items():
                ref = rows.get(peer[kinds.get(path, "cpu")])
                if row.get("median_s") and ref and ref.get("median_s"):
                    row["vs_torch"] = ref["median_s"] / row["median_s"]


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        enabled = False
    if not enabled:
        class _Quiet:
            def set_description(self, *_):
                pass

            def update(self, *_):
                pass

            def close(self):
                pass
        return _Quiet()
    return tqdm(total=total, file=sys.stderr, unit="item", dynamic_ncols=True, leave=False)


def run_benchmarks(options: Options, candidates: list[Candidate] | None = None) -> dict:
    """Run the benchmarks ``options`` select and return the report (what ``--out`` writes)."""
    runner = Runner(options, candidates)
    options.threads = options.threads or machine_threads()
    threads = _set_threads(options.threads, runner.cands)
    started = _dt.datetime.now().astimezone()
    machine = machine_info(options)          # the load average before the run
    machine["threads"] = threads
    # Every candidate (PyTorch too) runs under the allocator settings a cnnfast user gets.
    from cnnfast.cpu._malloc import tune_malloc

    machine["malloc"] = tune_malloc()
    t0 = time.perf_counter()
    runner.run()
    machine["gpu"] = gpu_name()              # torch may have loaded since
    with contextlib.suppress(OSError, AttributeError):
        machine["load_avg_end"] = os.getloadavg()
    opts = asdict(options)
    return {
        "schema": SCHEMA,
        "created": started.isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - t0,
        "machine": machine,
        "versions": versions(),
        "options": opts,
        "notes": runner.notes,
        "results": runner.results,
        "memory": runner.memory,
    }

