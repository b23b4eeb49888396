"""The run: options, the runner that checks and times every candidate on every item, and
:func:`run_benchmarks`, which returns the report."""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from cnnfast.bench.checks import (
    REFERENCE_MAX_REPEATS,
    check_batch_for,
    check_op,
    check_step,
    reference_timed,
)
from cnnfast.bench.executor import LocalExecutor, WorkerExecutor
from cnnfast.bench.measuring import (
    Entry,
    add_ratios,
    blas_info,
    cpu_busy,
    gpu_name,
    inner_loops,
    machine_info,
    machine_threads,
    round_robin,
    versions,
)
from cnnfast.bench.paths import PATHS, Candidate, KernelCandidate, TorchCandidate
from cnnfast.bench.report import SCHEMA
from cnnfast.bench.workloads import MODEL_SPECS, MODELS, OPS, ModelSpec, OpItem, op_items

# Environment variables that decide how the libraries' thread pools wait (benchmarks/README.md,
# "Isolation"): recorded with every report.
THREAD_ENV = ("NUMBA_THREADING_LAYER", "NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY",
              "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
              # OpenBLAS's kernel choice (NumPy's BLAS, which cnnfast's GEMMs run on): a forced
              # OPENBLAS_CORETYPE=Haswell runs AVX2 kernels on an AVX-512 machine, at about
              # half its speed (benchmarks/README.md, "BLAS kernels").
              "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


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
    isolation: str = "process"            # "process": a worker per candidate; or "in-process"


def make_candidate(path: str, cuda_sim: bool = False) -> Candidate:
    """The candidate of one of :data:`PATHS` (``cuda_sim``: the cuda path may run simulated)."""
    if path in ("torch", "cudnn"):
        return TorchCandidate(path)
    return KernelCandidate(path, cuda_sim_allowed=cuda_sim)


def make_candidates(options: Options) -> list[Candidate]:
    return [make_candidate(name, options.cuda_sim) for name in options.paths]


def make_executor(cand: Candidate, isolation: str = "process") -> LocalExecutor | WorkerExecutor:
    """A worker process of its own for ``cand`` (``isolation="process"``), or this process."""
    return LocalExecutor(cand) if isolation == "in-process" else WorkerExecutor(cand)


class Runner:
    """Checks every candidate on every item against the float64 oracle, then times the ones
    that pass, alternating, each in its own worker process (``Options.isolation``)."""

    def __init__(self, options: Options, candidates: list[Candidate] | None = None):
        self.o = options
        self.cands = candidates if candidates is not None else make_candidates(options)
        self.oracle = LocalExecutor(KernelCandidate("reference"))
        self.execs: dict[str, LocalExecutor | WorkerExecutor] = {}
        self.threads: dict[str, dict] = {}
        self.pids: dict[str, int] = {}
        self.results: list[dict] = []
        self.memory: list[dict] = []
        self.notes: list[str] = []
        self.unavailable: dict[str, str] = {}

    def _reference_timed(self, item) -> bool:
        return reference_timed(item, self.o.reference_all)

    def _repeats(self, name: str, warm_s: float) -> int:
        if self.o.repeats is not None:
            r = self.o.repeats
        else:
            r = 3 if self.o.quick else 5
            if warm_s * r > self.o.item_budget_s:
                r = max(3 if not self.o.quick else 2, int(self.o.item_budget_s / warm_s))
                r = min(r, 3 if self.o.quick else 5)
        if name == "reference":
            r = min(r, REFERENCE_MAX_REPEATS - (1 if self.o.quick else 0))
        return r

    def _row(self, item_id, op, phase, shape_id, set_name, label, batch, name) -> dict:
        return {"id": item_id, "op": op, "phase": phase, "shape_id": shape_id, "set": set_name,
                "shape": label, "batch": batch, "path": name, "status": "skipped",
                "reason": None, "check_batch": None, "check_error": None,
                "check_error_f64": None, "check_tolerance": None, "first_call_s": None,
                "median_s": None, "gflop": None, "gflops": None, "time_vs_torch": None,
                "cpu_s": None, "cpu_vs_torch": None}

    def _check_batch(self, item: OpItem) -> int:
        return check_batch_for(item, self.o.quick, self.o.check_batch)

    def _rows_and_active(self, item, *fields) -> tuple[list[dict], list]:
        """A result row per candidate for ``item`` (an OpItem or a ModelSpec; ``fields`` are
        :meth:`_row`'s before the path), and the (executor, row) pairs that will run; the
        others' rows say why not."""
        rows, active = [], []
        for cand in self.cands:
            row = self._row(*fields, cand.name)
            rows.append(row)
            reason = self.unavailable.get(cand.name)
            if reason is None and cand.name == "reference" and not self._reference_timed(item):
                reason = "reference timed on small shapes only (--reference-all)"
            ex = self.execs.get(cand.name)
            if reason is None:
                try:
                    reason = ex.unavailable_for(item)
                except Exception as e:  # noqa: BLE001 - a worker that died
                    row["status"], reason = "ERROR", f"{type(e).__name__}: {e}"
            if reason:
                row["reason"] = reason
                continue
            active.append((ex, row))
        return rows, active

    def _judge(self, row: dict, verdict: tuple) -> bool:
        ok, err32, err64, tol32, what = verdict
        row["check_error"] = err32 if math.isfinite(err32) else None
        row["check_error_f64"] = err64 if math.isfinite(err64) else None
        row["check_tolerance"] = tol32
        if not ok:
            row["status"], row["reason"] = "WRONG", what
        return ok

    def _checked(self, active: list, check_batch: int, refs: tuple, result, verdict, prepare,
                 gflop: float | None) -> list[Entry]:
        """Check each active candidate against the float64 oracle's ``refs`` (its float32 and
        float64 results, ``result(executor, dtype) -> (outputs, seconds)``, judged by
        ``verdict``), and prepare the ones that pass for timing (``prepare(executor) -> key``).
        Returns their entries; the other rows say WRONG or ERROR and why."""
        ref32, ref64 = refs
        entries = []
        for ex, row in active:
            row["check_batch"] = check_batch
            try:
                got32, row["first_call_s"] = result(ex, np.float32)
                got64, _ = result(ex, np.float64)
                if not self._judge(row, verdict(got32, got64, ref32, ref64)):
                    continue
                del got32, got64
                key = prepare(ex)
                row["status"], row["gflop"] = "ok", gflop
                entries.append(Entry(ex, key, row))
            except Exception as e:  # noqa: BLE001 - one broken path must not stop the run
                row["status"], row["reason"] = "ERROR", f"{type(e).__name__}: {e}"
        return entries

    def run_item(self, item: OpItem) -> None:
        rows, active = self._rows_and_active(item, item.id, item.op, item.phase, item.shape_id,
                                             item.set_name, item.label, item.batch)
        entries = []
        if active:
            n = self._check_batch(item)

            def result(ex, dtype):
                return ex.op_result(item, n, dtype)

            refs = (result(self.oracle, np.float32)[0], result(self.oracle, np.float64)[0])
            gflop = None if item.flops() is None else item.flops() / 1e9
            entries = self._checked(active, n, refs, result, check_op,
                                    lambda ex: ex.prepare_op(item), gflop)
            del refs
        self._time(entries)
        for e in entries:
            with contextlib.suppress(Exception):  # a worker that died: its row says so
                e.executor.release(e.key)
        self.results.extend(rows)

    def _time(self, entries: list[Entry]) -> None:
        # one untimed warm-up each at the timed shape decides the repeats and inner loops
        for e in entries:
            try:
                t = e.executor.sample(e.key, 1)
            except Exception as ex:  # noqa: BLE001
                e.row["status"], e.row["reason"] = "ERROR", f"{type(ex).__name__}: {ex}"
                continue
            e.row["warmup_s"] = t
            e.executor.cpu_times(e.key)     # drop the warm-up's
            e.repeats = self._repeats(e.row["path"], t)
            e.inner = inner_loops(t)
        entries[:] = [e for e in entries if e.row["status"] == "ok"]
        round_robin(entries)
        for e in entries:
            if e.row.get("gflop") and e.row.get("median_s"):
                e.row["gflops"] = e.row["gflop"] / e.row["median_s"]
            with contextlib.suppress(Exception):  # a worker that died has no CPU times
                cpu = e.executor.cpu_times(e.key)
                e.row["cpu_s"] = statistics.median(cpu) if cpu else None

    def _model_spec(self, spec: ModelSpec) -> ModelSpec:
        if self.o.step_batch:
            spec = ModelSpec(spec.name, spec.input_shape, self.o.step_batch,
                             min(spec.check_batch, self.o.step_batch))
        if self.o.check_batch is not None:
            n = spec.batch if self.o.check_batch == 0 else min(self.o.check_batch, spec.batch)
            spec = ModelSpec(spec.name, spec.input_shape, spec.batch, n)
        return spec

    def run_model(self, spec: ModelSpec) -> list[Entry]:
        """Check and time one training step on every candidate; returns the timed entries
        (their trainers stay prepared in their executors for the memory figures)."""
        spec = self._model_spec(spec)
        item_id = f"step.train/{spec.name}"
        label = f"{spec.batch}x" + "x".join(map(str, spec.input_shape))
        rows, active = self._rows_and_active(spec, item_id, "step", "train", spec.name, "model",
                                             label, spec.batch)
        entries = []
        if active:
            def result(ex, dtype):
                got, seconds, _ = ex.step_result(spec, self.o.seed, dtype)
                return got, seconds

            ref32, _, flops = self.oracle.step_result(spec, self.o.seed, np.float32)
            refs = (ref32, result(self.oracle, np.float64)[0])
            self.oracle.close()
            entries = self._checked(active, spec.check_batch, refs, result, check_step,
                                    lambda ex: ex.prepare_step(spec), flops * spec.batch / 1e9)
            del ref32, refs
        self._time(entries)
        for e in entries:
            if e.row["status"] != "ok":
                continue
            try:
                e.row.update(e.executor.memory(e.key))
            except Exception as ex:  # noqa: BLE001
                e.row["memory_error"] = f"{type(ex).__name__}: {ex}"
        self.results.extend(rows)
        return [e for e in entries if e.row["status"] == "ok"]

    def start(self) -> None:
        """Start an executor per candidate (a worker process unless in-process)."""
        for cand in self.cands:
            try:
                ex = self.execs[cand.name] = make_executor(cand, self.o.isolation)
                reason, threads, self.pids[cand.name] = ex.start(self.o.threads)
            except Exception as e:  # noqa: BLE001 - a worker that cannot start
                reason, threads = f"{type(e).__name__}: {e}", {}
            if reason:
                self.unavailable[cand.name] = reason
                self.notes.append(f"{cand.name}: not run ({reason})")
            self.threads[cand.name] = threads

    def close(self) -> None:
        for ex in self.execs.values():
            ex.close()

    def run(self) -> None:
        self.start()
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
                timed = self.run_model(spec)
                for e in timed:
                    if spec.name == "smallcnn" and self.o.memory_steps > 0:
                        bar.set_description(f"memory/{spec.name}/{e.row['path']}")
                        try:
                            growth = e.executor.growth(e.key, self.o.memory_steps)
                        except Exception as ex:  # noqa: BLE001
                            growth = {"error": f"{type(ex).__name__}: {ex}"}
                        self.memory.append({"model": spec.name, "path": e.row["path"],
                                            **growth})
                    e.executor.release(e.key)
                bar.update(1)
        finally:
            bar.close()
            self.close()
        self._ratios()

    def _ratios(self) -> None:
        """``time_vs_torch = t_path / t_peer``, the peer being PyTorch on the same kind of device
        (< 1: faster than PyTorch); ``cpu_vs_torch`` the same for CPU time, where each path ran
        in its own process (in one process, CPU time counts every path's threads)."""
        peer = {"cpu": "torch", "gpu": "cudnn"}
        kinds = {c.name: c.device_kind for c in self.cands}
        ratios = {"median_s": "time_vs_torch"}
        if self.o.isolation == "process":
            ratios["cpu_s"] = "cpu_vs_torch"
        add_ratios(self.results, lambda row: row["id"], lambda path: peer[kinds.get(path, "cpu")],
                   ratios)


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
    options.threads = options.threads or machine_threads()
    runner = Runner(options, candidates)
    started = _dt.datetime.now().astimezone()
    machine = machine_info(options.threads)  # the load before the run
    # The oracle runs here; every candidate, PyTorch too, runs with the allocator settings a
    # cnnfast user gets (each executor applies them in its own process).
    from cnnfast.cpu import tune_malloc

    machine["malloc"] = tune_malloc()
    machine["isolation"] = options.isolation
    machine["thread_env"] = {k: os.environ.get(k) for k in THREAD_ENV}
    machine["blas"] = blas_info()
    machine["ceiling"] = ceiling_info(options.threads)
    t0 = time.perf_counter()
    runner.run()
    machine["threads"] = {k: v for t in runner.threads.values() for k, v in t.items()}
    machine["threads_by_path"] = runner.threads
    machine["workers"] = runner.pids
    machine["gpu"] = gpu_name()
    with contextlib.suppress(OSError, AttributeError):
        machine["load_avg_end"] = os.getloadavg()
    machine["cpu_busy_end"] = cpu_busy(0.5)
    add_ceiling_shares(runner.results, machine["ceiling"])
    return {
        "schema": SCHEMA,
        "created": started.isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - t0,
        "machine": machine,
        "versions": versions(),
        "options": asdict(options),
        "notes": runner.notes,
        "results": runner.results,
        "memory": runner.memory,
    }


CPU_PATHS = ("reference", "cpu", "torch")


def ceiling_info(threads: int) -> dict:
    """This CPU's float32 FMA ceiling on one thread and on the run's threads, beside the sgemm
    rates of BLAS and of cnnfast's microkernel (:func:`cnnfast.cpu.machine_rates`), in
    GFLOP/s, measured before the run."""
    import numba

    from cnnfast.cpu import machine_rates

    saved = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        return machine_rates(repeats=5)
    finally:
        numba.set_num_threads(saved)


def ceiling_of_run(ceiling: dict) -> float | None:
    """The ceiling a run's rows are measured against: the 1-thread FMA rate times the run's
    threads (on a shared machine the all-thread measure reads what the other load leaves)."""
    if not ceiling.get("fma_1"):
        return None
    return ceiling["fma_1"] * ceiling["threads"]


def add_ceiling_shares(rows: list[dict], ceiling: dict) -> None:
    """Each CPU row's GFLOP/s as a share of :func:`ceiling_of_run`."""
    top = ceiling_of_run(ceiling)
    for row in rows:
        if top and row.get("gflops") and row.get("path") in CPU_PATHS:
            row["ceiling_share"] = row["gflops"] / top

