"""Where a candidate runs: in this process, or in a worker process of its own.

Users run one library per process. Timed side by side in one process, two libraries' thread
pools compete: PyTorch's OpenMP threads keep spinning after each op while Numba's threads want
the same cores (benchmarks/README.md, "Isolation"). So by default every candidate gets a worker
process of its own (:class:`WorkerExecutor`), started with ``spawn`` (no inherited thread pools
or locks) and kept for the whole run (JIT compilation once); the runner still alternates the
candidates sample by sample, and only one process runs at a time: the others wait on a pipe,
asleep. :class:`LocalExecutor` runs a candidate here: the ``--in-process`` option, the oracle,
and tests that inspect a candidate object.

Both offer the same calls. Work is named by keys (an op item or a model at a dtype) so that
the large objects (inputs, models, trainers) stay in the process that uses them; only results
of the correctness check (arrays at the check batch) and timings cross the pipe.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable

import numpy as np

import cnnfast
from cnnfast.bench.measuring import measure_growth, measure_step_memory, time_call
from cnnfast.bench.paths import Candidate, KernelCandidate, TorchCandidate
from cnnfast.bench.workloads import (
    ModelSpec,
    OpItem,
    build_model,
    model_data,
    step_flops_per_sample,
)


def _cast(a: np.ndarray, dtype) -> np.ndarray:
    return a.astype(dtype) if a.dtype.kind == "f" else a


def set_threads(cand: Candidate, n: int) -> dict:
    """Give ``cand``'s library ``n`` threads (PyTorch's intra-op pool, Numba's parallel loops);
    returns what each library reports using."""
    used = {}
    if isinstance(cand, TorchCandidate) and cand.unavailable() is None:
        cand.torch.set_num_threads(n)
        used["torch"] = cand.torch.get_num_threads()
    if getattr(cand, "path", None) == "cpu":
        try:
            import numba

            numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
            used["numba"] = numba.get_num_threads()
            used["numba_layer"] = numba.threading_layer()   # set_num_threads launched it
        except ImportError:
            pass
    return used


class LocalExecutor:
    """Runs one candidate in this process."""

    def __init__(self, cand: Candidate):
        self.cand = cand
        self.name = cand.name
        self.device_kind = cand.device_kind
        self.isolated = False
        self.pid = os.getpid()
        self._work: dict[str, tuple[Callable[[], None], object]] = {}
        self._states: dict[tuple, dict] = {}
        self._cpu: dict[str, list[float]] = {}

    # -- set-up ------------------------------------------------------------------------------
    def start(self, threads: int) -> tuple[str | None, dict, int]:
        """(why this candidate cannot run here or None, threads its library uses, the id of
        the process it runs in)."""
        from cnnfast.cpu import tune_malloc

        tune_malloc()   # every candidate, PyTorch too, runs with the allocator cnnfast users get
        reason = self.cand.unavailable()
        return reason, ({} if reason else set_threads(self.cand, threads)), os.getpid()

    def unavailable_for(self, item: OpItem | ModelSpec) -> str | None:
        return self.cand.unavailable_for(item)

    def close(self) -> None:
        self._work.clear()

    # -- correctness -------------------------------------------------------------------------
    def op_result(self, item: OpItem, n: int, dtype) -> tuple[tuple, float]:
        """(outputs as NumPy arrays, seconds of this call) of ``item`` at batch ``n`` with its
        floating-point inputs in ``dtype``; the first call includes JIT compilation."""
        c = self.cand
        inputs = {k: c.native(_cast(v, dtype)) for k, v in item.make_inputs(n).items()}
        start = time.perf_counter()
        got = c.op_fn(item, inputs)()
        c.sync()
        seconds = time.perf_counter() - start
        return tuple(np.asarray(c.to_numpy(g)) for g in got), seconds

    def _state(self, spec: ModelSpec, seed: int) -> dict:
        # The same seed gives the same initial weights in every process (cnnfast's own RNG).
        key = (spec.name, spec.stem, seed)
        if key not in self._states:
            cnnfast.manual_seed(seed)
            self._states[key] = build_model(spec.name, spec.stem).state_dict()
        return self._states[key]

    def step_result(self, spec: ModelSpec, seed: int, dtype) -> tuple[tuple, float, float]:
        """((loss, {name: gradient}), seconds, step FLOPs per sample) of one forward + backward
        at the initial weights, at ``spec.check_batch``, in ``dtype``. A float32 trainer is
        kept for :meth:`prepare_step`."""
        trainer = self.cand.trainer(spec, self._state(spec, seed))
        if dtype != np.float32:
            trainer.to_dtype(dtype)
        x, y = model_data(spec, spec.check_batch)
        start = time.perf_counter()
        got = trainer.check(_cast(x, dtype), y)
        seconds = time.perf_counter() - start
        records = getattr(trainer, "records", None)
        flops = step_flops_per_sample(records) if records else None
        if dtype == np.float32:
            self._work[f"trainer/{spec.name}"] = (trainer.step, trainer)
        return got, seconds, flops

    # -- timing ------------------------------------------------------------------------------
    def prepare_op(self, item: OpItem) -> str:
        c = self.cand
        inputs = {k: c.native(v) for k, v in item.make_inputs(item.batch).items()}
        fn = c.op_fn(item, inputs)
        key = f"op/{item.id}"
        self._work[key] = (fn, None)
        return key

    def prepare_step(self, spec: ModelSpec) -> str:
        key = f"step/{spec.name}"
        run, trainer = self._work.pop(f"trainer/{spec.name}")
        trainer.prepare(*model_data(spec, spec.batch))
        self._work[key] = (run, trainer)
        return key

    def prepare_unchecked(self, spec: ModelSpec, seed: int) -> str:
        """A float32 training step at ``spec.batch``, not checked (the scaling sweep: the main
        run checks these models); returns its key."""
        trainer = self.cand.trainer(spec, self._state(spec, seed))
        trainer.prepare(*model_data(spec, spec.batch))
        key = f"scaling/{spec.name}/{spec.stem}/{spec.input_shape}/{spec.batch}"
        self._work[key] = (trainer.step, trainer)
        self._states.clear()
        return key

    def sample(self, key: str, inner: int = 1) -> float:
        """Seconds per call of the prepared work ``key`` (``inner`` calls, collector paused).
        The process's CPU time per call (all its threads) is kept for :meth:`cpu_times`."""
        gc.collect(1)   # what earlier samples left in the young generations, untimed
        c0 = time.process_time()
        seconds = time_call(self._work[key][0], self.cand.sync, inner)
        self._cpu.setdefault(key, []).append((time.process_time() - c0) / inner)
        return seconds

    def call(self, key: str) -> None:
        """Run the prepared work ``key`` once, synchronised (no timing: pytest-benchmark's)."""
        self._work[key][0]()
        self.cand.sync()

    def cpu_times(self, key: str) -> list[float]:
        """CPU seconds per call of each sample of ``key`` since the last call; a measure that
        other processes' load inflates far less than wall time (only where the work itself
        runs in this process: in-process, it includes every candidate's threads)."""
        return self._cpu.pop(key, [])

    def memory(self, key: str) -> dict:
        cand = self.cand
        numpy_path = isinstance(cand, KernelCandidate) and cand.device == "cpu"
        return measure_step_memory(self._work[key][1], numpy_path)

    def growth(self, key: str, steps: int) -> dict:
        return measure_growth(self._work[key][1], steps)

    def release(self, key: str) -> None:
        self._work.pop(key, None)
        gc.collect()


class WorkerError(RuntimeError):
    """A call failed in the worker process; the message carries its traceback's last line."""


def _worker_main(conn, cand: Candidate, env: dict) -> None:
    """The worker process: run :class:`LocalExecutor` calls sent over ``conn`` until ``None``."""
    os.environ.update(env)
    executor = LocalExecutor(cand)
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        method, args = message
        try:
            result = ("ok", getattr(executor, method)(*args))
        except BaseException as e:  # noqa: BLE001 - reported to the runner, never lost
            tb = traceback.format_exc(limit=4)
            result = ("error", f"{type(e).__name__}: {e}", tb)
        conn.send(result)


class WorkerExecutor:
    """Runs one candidate in a worker process of its own (``spawn``), with the calls of
    :class:`LocalExecutor`; an exception in the worker is raised here as :class:`WorkerError`
    with the original type and message."""

    def __init__(self, cand: Candidate, env: dict | None = None):
        self.name = cand.name
        self.device_kind = cand.device_kind
        self.isolated = True
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker_main, args=(child, cand, dict(env or {})),
                                 name=f"cnnfast-bench-{cand.name}", daemon=True)
        self._proc.start()
        self.pid = self._proc.pid
        child.close()

    def _call(self, method: str, *args):
        try:
            self._conn.send((method, args))
            reply = self._conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError) as e:
            code = self._proc.exitcode
            raise WorkerError(f"the {self.name} worker process died (exit code {code})") from e
        if reply[0] == "error":
            raise WorkerError(reply[1])
        return reply[1]

    def __getattr__(self, method: str):
        # Every public method of LocalExecutor, run in the worker (close is this class's own).
        if method.startswith("_") or not callable(getattr(LocalExecutor, method, None)):
            raise AttributeError(method)
        return lambda *args: self._call(method, *args)

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(5)
        self._conn.close()
