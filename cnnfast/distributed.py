"""Data-parallel training over MPI (mpi4py + MPICH wheels) and, on ``cuda``, NCCL (CuPy).

``mpiexec -n N cnnfast train ...`` (or ``cnnfast train --workers N``) runs N copies of the
training; :func:`from_environment` sees the launcher's variables and returns a
:class:`DataParallel` (``None`` in a plain single process, without importing mpi4py).

What makes N ranks compute what one process computes (to float32 rounding):

* **One global batch.** ``--batch-size`` is the global batch B. Every rank draws the same
  shuffled order from the same seed (the single-process :class:`~cnnfast.data.DataLoader`,
  unchanged) and takes its contiguous shard of each global batch: the first ``B % N`` ranks get
  ``ceil(B / N)`` samples, the others ``floor(B / N)`` (``numpy.array_split``). The last, partial
  batch of an epoch (``n % B`` samples) is split the same way, so no sample is dropped or
  repeated and the epoch has the same steps as in one process. Every rank must get at least one
  sample of every batch: ``N`` must not exceed the smallest global batch (checked up front).
* **One average.** Each rank back-propagates its shard's mean loss scaled by ``n_r / B``
  (:meth:`DataParallel.backward`), so the sum over ranks of the gradients is the gradient of the
  global batch's mean loss even when shards differ in size; the gradient reduction is a sum.
* **One set of batch statistics.** Batch norm layers become
  :class:`~cnnfast.nn.sync_batchnorm.SyncBatchNorm2d`/``3d`` (on by default in the CLI), whose
  statistics are summed over the ranks in forward and backward.
* **Same randomness.** Every rank keeps the random streams of one process (same seed: the
  shuffled order, the random flips, the dropout generators), draws what one process would draw
  for the whole global batch and keeps its rows; dropout layers become :class:`ShardedDropout`,
  which draws the global batch's mask. Checkpoints and training states therefore do not depend
  on the number of ranks, dropout included.
* **Same start.** Rank 0's weights, buffers and optimizer state are broadcast to all ranks.

Gradient reduction (:class:`GradientReducer`): parameters are grouped into buckets (~4 MiB, in
reverse registration order, the order backward produces their gradients); a hook on each
parameter (:meth:`cnnfast.Tensor.register_post_accumulate_grad_hook`) marks it ready and a
bucket whose gradients are all final is started at once with non-blocking MPI while backward
goes on. **Fixed summation order:** MPI's ``MPI_Allreduce`` may add the ranks' contributions in
an order that depends on the algorithm MPICH picks (message size, world size), and the standard
does not promise the same bits on every rank. So the sum is done by hand in two non-blocking
steps: ``Ialltoall`` gives rank r the r-th chunk of every rank's bucket, rank r adds those
chunks in rank order 0, 1, ..., N-1, and ``Iallgather`` hands the summed chunks to everyone.
Every rank gets identical bits, the result depends only on N, and each rank sends and receives
``2 (N-1)/N`` of a bucket, as a ring allreduce does. Each phase has its own duplicated
communicator, so the phases of different buckets may interleave freely. MPICH progresses
non-blocking collectives inside MPI calls; every hook polls the requests in flight
(``MPICH_ASYNC_PROGRESS=1`` adds a progress thread). The small reductions of SyncBatchNorm and of
the epoch's loss use :meth:`Communicator.sum_over_ranks` (allgather, then a sum in rank order).

On ``cuda`` the buckets go through NCCL (``cupy.cuda.nccl``, ``ncclAllReduce`` with ``ncclSum``
on a side stream), one GPU per rank chosen by the local rank; NCCL's ring order is fixed for a
fixed set of GPUs. Without NCCL, cuda buckets are staged through host memory and MPI.

Faults: every wait polls with a deadline (``CNNFAST_DIST_TIMEOUT`` seconds, default 300); when it
passes, :class:`DistributedError` names the operation and the ranks, and the CLI calls
``MPI_Abort`` so the whole job ends instead of hanging. A rank that dies (signal, crash) is
noticed by MPICH's launcher, which ends the others.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

import numpy as np

from cnnfast import backend as _backend
from cnnfast import config, dispatch, nn

ENV_TIMEOUT = config.OPTIONS["dist_timeout"].variable
DEFAULT_BUCKET_BYTES = 4 << 20

# Launcher variables that carry the world size: MPICH/Hydra and Intel MPI (PMI), Open MPI,
# PMIx, Slurm's srun.
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "SLURM_NTASKS")
_THREAD_VARS = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                "MKL_NUM_THREADS")


class DistributedError(RuntimeError):
    """A data-parallel run cannot go on (a rank stopped answering, a bad world size)."""


def launcher_world_size(environ=None) -> int:
    """The number of ranks the launcher (mpiexec, srun) announces in the environment; 1 if none.

    Slurm's ``SLURM_NTASKS`` counts only under ``srun`` (``SLURM_PROCID`` set), not in a batch
    script that merely runs inside an allocation.
    """
    env = os.environ if environ is None else environ
    for name in _SIZE_VARS:
        if name == "SLURM_NTASKS" and "SLURM_PROCID" not in env:
            continue
        value = env.get(name, "")
        if value.isdigit() and int(value) >= 1:
            return int(value)
    return 1


def choose_backend(device: str, world_size: int, nccl_available: bool) -> str:
    """Which path reduces the gradients: ``"none"`` for one rank, ``"nccl"`` for ``cuda`` with
    NCCL, ``"mpi"`` otherwise (``cuda`` without NCCL stages the buckets through the host)."""
    if device not in dispatch.DEVICES:
        raise ValueError(f"device must be one of {dispatch.DEVICES}, got {device!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if world_size == 1:
        return "none"
    return "nccl" if device == "cuda" and nccl_available else "mpi"


def gpu_for_rank(local_rank: int, gpu_count: int) -> int:
    """The GPU a rank uses: its local rank, when the node has at least that many GPUs."""
    if gpu_count < 1:
        raise DistributedError("device cuda: no GPU visible to this rank")
    if local_rank >= gpu_count:
        raise DistributedError(f"local rank {local_rank} has no GPU of its own: this node has "
                               f"{gpu_count} GPU(s); start at most {gpu_count} ranks per node")
    return local_rank


def shard_bounds(total: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of ``rank``'s contiguous share of ``total`` items: the first
    ``total % world_size`` ranks get one more (``numpy.array_split``)."""
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def threads_per_rank(cpus: int, ranks_on_node: int) -> int:
    """CPU threads each rank of a node may use so that the ranks do not oversubscribe it."""
    return max(1, cpus // max(1, ranks_on_node))


def timeout_from_env() -> float:
    """Seconds a rank waits for the others: ``$CNNFAST_DIST_TIMEOUT``, else 300."""
    return config.get("dist_timeout")


# --- the MPI communicator ----------------------------------------------------------------------

def _import_mpi():
    try:
        import mpi4py
    except ModuleNotFoundError:
        raise DistributedError("data-parallel training needs mpi4py and MPICH: "
                               "pip install 'cnnfast[mpi]'") from None
    mpi4py.rc.thread_level = "funneled"  # only the main thread calls MPI
    from mpi4py import MPI

    return MPI


class Communicator:
    """A thin layer over an ``MPI.Comm``: rank, size, local rank, and waits with a deadline."""

    def __init__(self, comm=None, timeout: float | None = None):
        MPI = _import_mpi()
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        self.timeout = timeout_from_env() if timeout is None else float(timeout)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def dup(self) -> Communicator:
        twin = Communicator.__new__(Communicator)
        twin.__dict__.update(self.__dict__)
        twin.comm = self.comm.Dup()
        return twin

    def wait(self, requests: Sequence, what: str) -> None:
        """Wait for ``requests`` or raise :class:`DistributedError` after the timeout."""
        requests = list(requests)
        deadline = time.monotonic() + self.timeout
        spins = 0
        while not self.MPI.Request.Testall(requests):
            spins += 1
            if spins > 200:  # first spin (a step's reductions finish in microseconds), then nap
                if time.monotonic() > deadline:
                    raise DistributedError(
                        f"rank {self.rank}/{self.size}: {what} got no answer from the other "
                        f"ranks within {self.timeout:g} s ({ENV_TIMEOUT}); a rank has stopped "
                        f"or died")
                time.sleep(0.0005)

    def barrier(self) -> None:
        self.wait([self.comm.Ibarrier()], "barrier")

    def sum_over_ranks(self, values: np.ndarray) -> np.ndarray:
        """Elementwise float64 sum of a small vector over the ranks, added in rank order
        (identical bits on every rank)."""
        local = np.ascontiguousarray(values, dtype=np.float64).reshape(-1)
        gathered = np.empty((self.size, local.size), np.float64)
        self.wait([self.comm.Iallgather(local, gathered)], "sum over ranks")
        total = gathered[0].copy()
        for r in range(1, self.size):
            total += gathered[r]
        return total

    def broadcast_array(self, array: np.ndarray, what: str) -> None:
        """Overwrite a contiguous host ``array`` in place with rank 0's."""
        self.wait([self.comm.Ibcast(array, root=0)], f"broadcast of {what}")

    def broadcast_bytes(self, data: bytes | None, what: str) -> bytes:
        size = np.array([len(data) if self.is_main else 0], np.int64)
        self.broadcast_array(size, what)
        buf = (np.frombuffer(data, np.uint8).copy() if self.is_main
               else np.empty(int(size[0]), np.uint8))
        self.broadcast_array(buf, what)
        return buf.tobytes()

    def gather_rows(self, local: np.ndarray, total_rows: int) -> np.ndarray:
        """Concatenate every rank's ``(rows, columns)`` block (rank r holds rows
        ``shard_bounds(total_rows, size, r)``) on every rank."""
        local = np.ascontiguousarray(local)
        if local.ndim != 2:
            raise ValueError(f"gather_rows: expected (rows, columns), got shape {local.shape}")
        # a rank with no rows may not know the row width (predict_logits gives (0, 0))
        widths = np.empty((self.size, 1), np.int64)
        mine = np.array([local.shape[1] if local.shape[0] else -1], np.int64)
        self.wait([self.comm.Iallgather(mine, widths)], "gathering output widths")
        width = int(widths.max())
        if local.shape[0] == 0:
            local = np.zeros((0, max(width, 0)), local.dtype)
        row = local.shape[1]
        counts = [(b - a) * row for a, b in (shard_bounds(total_rows, self.size, r)
                                             for r in range(self.size))]
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
        out = np.empty((total_rows,) + local.shape[1:], local.dtype)
        self.wait([self.comm.Iallgatherv(local, [out, (counts, displs)])], "gathering outputs")
        return out

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now (``MPI_Abort``)."""
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)


# --- gradient buckets --------------------------------------------------------------------------

class _Bucket:
    def __init__(self, params: list, world: int):
        self.params = params
        self.sizes = [p.size for p in params]
        self.count = sum(self.sizes)
        self.chunk = -(-self.count // world)  # padded to world * chunk elements
        self.dtype = params[0].dtype
        self.reset()

    def reset(self) -> None:
        self.waiting = len(self.params)
        self.phase = 0  # 0 collecting, 1 alltoall in flight, 2 allgather in flight, 3 done
        self.request = None
        self.buffers: tuple = ()

    def flat_gradients(self, xp, world: int):
        flat = xp.zeros(world * self.chunk, self.dtype)
        offset = 0
        for p, n in zip(self.params, self.sizes):
            if p.grad is not None:
                flat[offset:offset + n] = p.grad.data.reshape(-1)
            offset += n
        return flat


class GradientReducer:
    """Sums the parameters' gradients over the ranks in buckets started during backward.

    ``arm()`` before ``loss.backward()``, ``finish()`` after it: every parameter then holds the
    sum over ranks of its gradient (zeros where no rank had one), identical on every rank.
    """

    def __init__(self, params: Sequence, comm: Communicator, backend: str = "mpi",
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, nccl=None):
        if backend not in ("mpi", "nccl"):
            raise ValueError(f"backend must be 'mpi' or 'nccl', got {backend!r}")
        if not isinstance(bucket_bytes, int) or bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be a positive int, got {bucket_bytes!r}")
        self.comm, self.backend, self.nccl = comm, backend, nccl
        self.world = comm.size
        self.scatter_comm, self.gather_comm = comm.dup(), comm.dup()
        self.buckets: list[_Bucket] = []
        current: list = []
        for p in reversed(list(params)):  # backward yields the last layers' gradients first
            if current and (p.dtype != current[0].dtype or
                            sum(q.size for q in current) * p.dtype.itemsize >= bucket_bytes):
                self.buckets.append(_Bucket(current, self.world))
                current = []
            current.append(p)
        if current:
            self.buckets.append(_Bucket(current, self.world))
        self.bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self.armed = False
        for p in params:
            p.register_post_accumulate_grad_hook(self._on_gradient)

    def arm(self) -> None:
        for b in self.buckets:
            b.reset()
        self.next_start = self.next_gather = 0
        self.armed = True

    def _on_gradient(self, p) -> None:
        if not self.armed:
            return
        bucket = self.bucket_of[id(p)]
        bucket.waiting -= 1
        self._advance(final=False)

    def _advance(self, final: bool) -> None:
        """Start ready buckets and move finished phases on, always in bucket order (collectives
        must be issued in the same order on every rank)."""
        while self.next_start < len(self.buckets):
            b = self.buckets[self.next_start]
            if b.waiting > 0 and not final:
                break
            self._start(b)
            self.next_start += 1
        while self.next_gather < self.next_start:
            b = self.buckets[self.next_gather]
            if b.phase == 1:
                if final:
                    self.scatter_comm.wait([b.request], "gradient reduction (scatter)")
                elif not b.request.Test():
                    break
                self._gather(b)
            self.next_gather += 1

    def _start(self, b: _Bucket) -> None:
        p0 = b.params[0]
        if self.backend == "nccl":
            self._start_nccl(b)
            return
        flat = b.flat_gradients(p0.xp, self.world)
        if _backend.is_cupy_array(flat):
            flat = flat.get()  # cuda without NCCL: stage through the host
        received = np.empty((self.world, b.chunk), b.dtype)
        b.buffers = (flat.reshape(self.world, b.chunk), received)
        b.request = self.scatter_comm.comm.Ialltoall(b.buffers[0], received)
        b.phase = 1

    def _gather(self, b: _Bucket) -> None:
        received = b.buffers[1]
        mine = received[0].copy()
        for r in range(1, self.world):  # the fixed summation order: rank 0, 1, ..., N-1
            mine += received[r]
        out = np.empty((self.world, b.chunk), b.dtype)
        b.buffers = (mine, out)
        b.request = self.gather_comm.comm.Iallgather(mine, out)
        b.phase = 2

    def _start_nccl(self, b: _Bucket) -> None:
        import cupy

        flat = b.flat_gradients(cupy, self.world)
        stream = self.nccl.stream
        ready = cupy.cuda.Event()
        ready.record()  # the gradients were written on the current stream
        stream.wait_event(ready)
        kind = self.nccl.dtypes[np.dtype(b.dtype)]
        self.nccl.comm.allReduce(flat.data.ptr, flat.data.ptr, flat.size, kind,
                                 self.nccl.sum_op, stream.ptr)
        b.buffers = (flat,)
        b.phase = 3

    def finish(self) -> None:
        """Wait for every bucket and write the summed gradients into the parameters."""
        if not self.armed:
            raise RuntimeError("GradientReducer.finish() without arm()")
        self.armed = False
        self._advance(final=True)
        if self.backend == "nccl":
            self._wait_nccl()
        else:
            pending = [b.request for b in self.buckets if b.phase == 2]
            self.gather_comm.wait(pending, "gradient reduction (gather)")
        for b in self.buckets:
            flat = b.buffers[-1].reshape(-1)
            offset = 0
            for p, n in zip(b.params, b.sizes):
                # a new array: a parameter's .grad may be an array another parameter shares
                value = flat[offset:offset + n].reshape(p.shape).copy()
                p.grad = _tensor(_backend.to_device(value, p.device), p.device)
                offset += n


    def _wait_nccl(self) -> None:
        """Poll the NCCL stream with the same deadline as MPI waits (a synchronize() would
        block for ever on a rank that stopped)."""
        stream, deadline = self.nccl.stream, time.monotonic() + self.comm.timeout
        while not stream.done:
            if time.monotonic() > deadline:
                raise DistributedError(
                    f"rank {self.comm.rank}/{self.world}: NCCL gradient reduction did not "
                    f"finish within {self.comm.timeout:g} s ({ENV_TIMEOUT}); a rank has "
                    f"stopped or died")
            time.sleep(0.0002)


def _tensor(data, device):
    from cnnfast.tensor import Tensor

    return Tensor(data, device=device)


class _Nccl:
    """An NCCL communicator over all ranks (unique id sent by MPI) and its side stream."""

    def __init__(self, comm: Communicator):
        import cupy
        from cupy.cuda import nccl

        uid = nccl.get_unique_id() if comm.is_main else None
        raw = comm.broadcast_bytes(bytes(np.asarray(uid, np.int8).tobytes())
                                   if comm.is_main else None, "NCCL id")
        uid = tuple(int(v) for v in np.frombuffer(raw, np.int8))
        self.comm = nccl.NcclCommunicator(comm.size, uid, comm.rank)
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.sum_op = nccl.NCCL_SUM
        self.dtypes = {np.dtype(np.float32): nccl.NCCL_FLOAT32,
                       np.dtype(np.float64): nccl.NCCL_FLOAT64}


def nccl_available() -> bool:
    try:
        from cupy.cuda import nccl
    except ImportError:
        return False
    return bool(getattr(nccl, "available", True))


# --- data-parallel training -------------------------------------------------------------------

class DataParallel:
    """What :func:`cnnfast.train.fit` needs to train on several ranks (see the module notes)."""

    def __init__(self, comm: Communicator, device: str = "cpu", sync_batchnorm: bool = True,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        self.comm, self.device = comm, device
        self.sync_batchnorm = sync_batchnorm
        self.bucket_bytes = bucket_bytes
        self.backend = choose_backend(device, comm.size,
                                      device == "cuda" and nccl_available())
        self.reducer: GradientReducer | None = None
        self.batch_rows: int | None = None  # the global batch now being trained
        self.batch_start = 0  # and where this rank's rows start in it

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def size(self) -> int:
        return self.comm.size

    @property
    def is_main(self) -> bool:
        return self.comm.is_main

    def setup(self, model, optimizer) -> None:
        """Synchronise batch norm, shard dropout masks, broadcast rank 0's model and optimizer
        state, install the gradient hooks."""
        from cnnfast.nn.sync_batchnorm import convert_sync_batchnorm

        if self.sync_batchnorm:
            convert_sync_batchnorm(model, self.comm)
        for m in model.modules():
            if isinstance(m, nn.Dropout) and not isinstance(m, ShardedDropout):
                object.__setattr__(m, "__class__", ShardedDropout)
                object.__setattr__(m, "shards", self)
        broadcast_module(model, self.comm)
        broadcast_optimizer_state(optimizer, self.comm)
        nccl = _Nccl(self.comm) if self.backend == "nccl" else None
        self.reducer = GradientReducer(list(model.parameters()), self.comm,
                                       "nccl" if nccl else "mpi", self.bucket_bytes, nccl)

    def check_batches(self, n: int, batch_size: int, drop_last: bool = False) -> None:
        """Refuse a run in which some rank would get no sample of some global batch."""
        smallest = batch_size if n % batch_size == 0 or drop_last else min(batch_size,
                                                                             n % batch_size)
        if self.size > smallest:
            raise DistributedError(
                f"{self.size} ranks but a global batch of only {smallest} sample(s) ({n} "
                f"training samples, batch size {batch_size}): every rank needs at least one "
                f"sample of every batch; use at most {smallest} ranks or change --batch-size")

    def shard_batch(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """This rank's rows of a global batch and their share ``n_r / B`` of it (the weight
        :meth:`backward` gives this rank's mean loss)."""
        a, b = shard_bounds(len(x), self.size, self.rank)
        self.batch_rows, self.batch_start = len(x), a
        return x[a:b], y[a:b], (b - a) / len(x)

    def backward(self, loss, fraction: float) -> None:
        """Back-propagate ``fraction * loss`` (``fraction = n_r / B``) and sum the gradients over
        the ranks: the result is the gradient of the global batch's mean loss."""
        self.reducer.arm()
        try:
            loss.backward(np.full(loss.shape, fraction, dtype=loss.dtype))
        finally:
            self.reducer.finish()

    def sum(self, *values: float) -> list[float]:
        return [float(v) for v in self.comm.sum_over_ranks(np.array(values, np.float64))]

    def shard(self, total: int) -> slice:
        return slice(*shard_bounds(total, self.size, self.rank))

    def gather_rows(self, local: np.ndarray, total_rows: int) -> np.ndarray:
        return self.comm.gather_rows(local, total_rows)

    def abort(self, code: int = 1) -> None:
        self.comm.abort(code)


class ShardedDropout(nn.Dropout):
    """Dropout of a data-parallel rank: draws the mask of the whole global batch, as one process
    would, from the same generator on every rank, and applies its own rows. (``shards`` is the
    :class:`DataParallel` that knows the global batch; outside training, plain dropout.)"""

    shards = None

    def forward(self, x):
        from cnnfast import rng as _rng
        from cnnfast.functional.activation import Dropout
        from cnnfast.tensor import as_tensor

        shards = self.shards
        if (not self.training or self.p == 0.0 or shards is None or shards.batch_rows is None
                or shards.size == 1):
            return super().forward(x)
        x = as_tensor(x, name="dropout input")
        rows, start = shards.batch_rows, shards.batch_start
        shape = (rows,) + x.shape[1:]
        mask = dispatch.kernels(x.device).dropout_mask(x.xp, shape, float(self.p),
                                                       _rng.resolve(self.rng), x.dtype)
        return Dropout(mask[start:start + x.shape[0]]).apply(x)


def broadcast_module(module, comm: Communicator) -> None:
    """Copy rank 0's parameters and buffers into every rank's ``module``."""
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        host = np.ascontiguousarray(_backend.to_device(t.data, "cpu")).copy()
        comm.broadcast_array(host, name)
        t.data[...] = _backend.to_device(host, t.device)


def broadcast_optimizer_state(optimizer, comm: Communicator) -> None:
    """Make every rank's optimizer state (step counts, moments, momentum buffers) rank 0's.

    The layout (which parameter has which entries, their shapes, the scalars) travels as JSON,
    the arrays as raw buffers.
    """
    import json

    params = [p for g in optimizer.param_groups for p in g["params"]]
    layout = None
    if comm.is_main:
        layout = {}
        for i, p in enumerate(params):
            state = optimizer.state.get(id(p))
            if state:
                layout[i] = {k: (["array", list(np.shape(v)), str(v.dtype)] if hasattr(v, "shape")
                                 else ["scalar", v]) for k, v in state.items()}
        layout = json.dumps(layout).encode()
    layout = json.loads(comm.broadcast_bytes(layout, "optimizer state layout"))
    for key, entries in layout.items():
        p = params[int(key)]
        state = optimizer.state.setdefault(id(p), {}) if comm.is_main else {}
        for name, (kind, *spec) in entries.items():
            if kind == "scalar":
                state[name] = spec[0]
                continue
            shape, dtype = spec
            host = (np.ascontiguousarray(_backend.to_device(state[name], "cpu")).copy()
                    if comm.is_main else np.empty(shape, dtype))
            comm.broadcast_array(host, f"optimizer state {name}")
            state[name] = _backend.to_device(host, p.device)
        optimizer.state[id(p)] = state


def from_environment(device: str = "cpu", sync_batchnorm: bool = True,
                     timeout: float | None = None) -> DataParallel | None:
    """A :class:`DataParallel` when a launcher started this process as one of several ranks,
    else ``None`` (mpi4py is then not imported).

    Limits each rank's CPU threads so the ranks of a node share its cores (unless
    ``NUMBA_NUM_THREADS`` was set), and on ``cuda`` selects the GPU of the local rank.
    """
    if launcher_world_size() == 1:
        return None
    comm = Communicator(timeout=timeout)
    if comm.size == 1:
        return None
    if "NUMBA_NUM_THREADS" not in os.environ:
        _limit_threads(threads_per_rank(os.cpu_count() or 1, comm.local_size))
    if device == "cuda" and not _backend.cuda_simulated():  # the simulator has no GPU to pick
        import cupy

        gpu = gpu_for_rank(comm.local_rank, cupy.cuda.runtime.getDeviceCount())
        cupy.cuda.Device(gpu).use()
    return DataParallel(comm, device, sync_batchnorm)


def _limit_threads(n: int) -> None:
    import numba

    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)
    except ImportError:
        pass


# --- the launcher of `cnnfast train --workers N` ----------------------------------------------

def mpiexec_path() -> str:
    """The ``mpiexec`` of this environment (the mpich wheel puts it beside the interpreter),
    else the first on ``PATH``."""
    import shutil

    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("mpiexec")
    if found is None:
        raise DistributedError("--workers needs mpiexec: pip install 'cnnfast[mpi]' (the mpich "
                               "wheel installs it)")
    return found


def launch_command(argv: Sequence[str], workers: int) -> tuple[list[str], dict]:
    """The ``mpiexec -n N python -m cnnfast ...`` command and environment that run ``argv`` (the
    CLI arguments without ``--workers``) on ``workers`` local ranks, each limited to its share
    of the cores."""
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    env = dict(os.environ)
    threads = str(threads_per_rank(os.cpu_count() or 1, workers))
    for name in _THREAD_VARS:
        env.setdefault(name, threads)
    cmd = [mpiexec_path(), "-n", str(workers), sys.executable, "-m", "cnnfast", *argv]
    return cmd, env


def launch(argv: Sequence[str], workers: int) -> int:
    """Run ``cnnfast argv`` on ``workers`` ranks and return the job's exit status."""
    import subprocess

    cmd, env = launch_command(argv, workers)
    return subprocess.call(cmd, env=env)
