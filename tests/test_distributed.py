"""Data-parallel pieces that need no MPI: sharding, launcher detection, communicator selection,
SyncBatchNorm (ranks simulated by threads) and the autograd hook the gradient buckets use.

The runs under mpiexec are in ``test_distributed_mpi.py``.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import cnnfast
from cnnfast import distributed, nn
from cnnfast import functional as F
from cnnfast.cli import main
from cnnfast.nn.sync_batchnorm import SyncBatchNorm2d, SyncBatchNorm3d, convert_sync_batchnorm

# --- sharding and environment ----------------------------------------------------------------


@pytest.mark.parametrize("total", [0, 1, 2, 7, 32, 100])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shard_bounds_cover_everything_once_like_array_split(total, world):
    bounds = [distributed.shard_bounds(total, world, r) for r in range(world)]
    expected = np.array_split(np.arange(total), world)
    assert [list(range(a, b)) for a, b in bounds] == [list(e) for e in expected]


def test_launcher_world_size_reads_mpich_openmpi_and_srun():
    size = distributed.launcher_world_size
    assert size({}) == 1
    assert size({"PMI_SIZE": "3"}) == 3
    assert size({"OMPI_COMM_WORLD_SIZE": "4"}) == 4
    # an sbatch script inside an allocation is not a rank; srun's tasks are
    assert size({"SLURM_NTASKS": "8"}) == 1
    assert size({"SLURM_NTASKS": "8", "SLURM_PROCID": "5"}) == 8
    assert size({"PMI_SIZE": "junk"}) == 1


@pytest.mark.parametrize("device, world, nccl, expected", [
    ("cpu", 1, False, "none"), ("cpu", 4, True, "mpi"), ("cuda", 1, True, "none"),
    ("cuda", 2, True, "nccl"), ("cuda", 2, False, "mpi"),
])
def test_choose_backend(device, world, nccl, expected):
    assert distributed.choose_backend(device, world, nccl) == expected


def test_choose_backend_and_gpu_choice_refuse_bad_input():
    with pytest.raises(ValueError, match="device must be one of"):
        distributed.choose_backend("tpu", 2, False)
    with pytest.raises(ValueError, match="world_size"):
        distributed.choose_backend("cpu", 0, False)
    assert distributed.gpu_for_rank(1, 4) == 1
    with pytest.raises(distributed.DistributedError, match="local rank 2 has no GPU"):
        distributed.gpu_for_rank(2, 2)
    with pytest.raises(distributed.DistributedError, match="no GPU"):
        distributed.gpu_for_rank(0, 0)


def test_threads_per_rank_and_timeout(monkeypatch):
    assert distributed.threads_per_rank(2, 2) == 1
    assert distributed.threads_per_rank(2, 3) == 1
    assert distributed.threads_per_rank(16, 4) == 4
    monkeypatch.setenv(distributed.ENV_TIMEOUT, "7.5")
    assert distributed.timeout_from_env() == 7.5
    monkeypatch.setenv(distributed.ENV_TIMEOUT, "-1")
    with pytest.raises(ValueError, match="CNNFAST_DIST_TIMEOUT"):
        distributed.timeout_from_env()


def test_launch_command_limits_threads(monkeypatch):
    pytest.importorskip("mpi4py")
    for name in distributed._THREAD_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed.os, "cpu_count", lambda: 2)
    cmd, env = distributed.launch_command(["train", "--data", "x.npz"], 2)
    assert cmd[0].endswith("mpiexec") and cmd[1:3] == ["-n", "2"]
    assert cmd[-5:] == ["-m", "cnnfast", "train", "--data", "x.npz"]
    assert all(env[name] == "1" for name in distributed._THREAD_VARS)
    with pytest.raises(ValueError, match="workers"):
        distributed.launch_command([], 0)


def test_cli_refuses_workers_inside_mpiexec(monkeypatch, capsys):
    monkeypatch.setenv("PMI_SIZE", "2")
    code = main(["train", "--data", "synthetic-nodule2d", "--workers", "2"])
    assert code == 2
    assert "under mpiexec or srun leave it out" in capsys.readouterr().err


def test_single_process_needs_no_mpi(monkeypatch):
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.from_environment() is None


# --- the autograd hook -------------------------------------------------------------------------

def test_post_accumulate_grad_hook_sees_the_final_gradient_once():
    w = cnnfast.tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True)
    seen = []
    w.register_post_accumulate_grad_hook(lambda t: seen.append(t.grad.numpy().copy()))
    (w * w + w * 3.0).sum().backward()  # w used twice: the hook sees the sum, 2w + 3
    assert len(seen) == 1
    np.testing.assert_array_equal(seen[0], [5.0, 7.0, 9.0])
    y = w * 2.0
    with pytest.raises(RuntimeError, match="only a leaf"):
        y.register_post_accumulate_grad_hook(lambda t: None)


# --- SyncBatchNorm, ranks simulated by threads ------------------------------------------------

class ThreadGroup:
    """``sum_over_ranks`` for ranks that are threads of one process (sum in rank order)."""

    def __init__(self, size: int):
        self.size = size
        self.slots: list = [None] * size
        self.barrier = threading.Barrier(size)
        self.local = threading.local()

    def sum_over_ranks(self, v):
        self.slots[self.local.rank] = np.asarray(v, np.float64).copy()
        self.barrier.wait()
        total = self.slots[0].copy()
        for r in range(1, self.size):
            total += self.slots[r]
        self.barrier.wait()
        return total


def _run_ranks(group: ThreadGroup, fn):
    results, errors = [None] * group.size, []

    def body(rank):
        group.local.rank = rank
        try:
            results[rank] = fn(rank)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(group.size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize("nd, sizes", [(2, (5, 3)), (2, (2, 2, 1)), (3, (2, 3))])
def test_sync_batchnorm_matches_batch_norm_of_the_whole_batch(nd, sizes, dtype, tol):
    """Forward, running statistics and backward of shards = plain batch norm of the global
    batch (the reference path, itself checked against PyTorch and finite differences)."""
    rng = np.random.default_rng(nd + len(sizes))
    C, spatial = 3, (4, 5) if nd == 2 else (3, 2, 4)
    n = sum(sizes)
    x = (rng.standard_normal((n, C) + spatial) * 2 + 1).astype(dtype)
    gy = rng.standard_normal(x.shape).astype(dtype)
    gamma = rng.uniform(0.5, 1.5, C).astype(dtype)
    beta = rng.standard_normal(C).astype(dtype)
    plain_cls = nn.BatchNorm2d if nd == 2 else nn.BatchNorm3d

    with cnnfast.cpu_path("reference"):
        bn = plain_cls(C, dtype=dtype)
        bn.weight.data[...], bn.bias.data[...] = gamma, beta
        xt = cnnfast.tensor(x, requires_grad=True)
        y = bn(xt)
        y.backward(gy)
        ref = (y.numpy(), xt.grad.numpy(), bn.weight.grad.numpy(), bn.bias.grad.numpy(),
               bn.running_mean.numpy(), bn.running_var.numpy())

    bounds = np.cumsum((0,) + sizes)
    group = ThreadGroup(len(sizes))

    def rank_fn(rank):
        sync = (SyncBatchNorm2d if nd == 2 else SyncBatchNorm3d)(C, dtype=dtype)
        sync.weight.data[...], sync.bias.data[...] = gamma, beta
        object.__setattr__(sync, "group", group)
        a, b = bounds[rank], bounds[rank + 1]
        xs = cnnfast.tensor(x[a:b], requires_grad=True)
        ys = sync(xs)
        ys.backward(gy[a:b])
        return (ys.numpy(), xs.grad.numpy(), sync.weight.grad.numpy(), sync.bias.grad.numpy(),
                sync.running_mean.numpy(), sync.running_var.numpy())

    parts = _run_ranks(group, rank_fn)
    got_y = np.concatenate([p[0] for p in parts])
    got_gx = np.concatenate([p[1] for p in parts])
    got_ggamma = sum(p[2].astype(np.float64) for p in parts)  # the gradient reducer's sum
    got_gbeta = sum(p[3].astype(np.float64) for p in parts)
    for got, want in ((got_y, ref[0]), (got_gx, ref[1]), (got_ggamma, ref[2]),
                      (got_gbeta, ref[3])):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    for p in parts:  # every rank has the global running statistics
        np.testing.assert_allclose(p[4], ref[4], rtol=tol, atol=tol)
        np.testing.assert_allclose(p[5], ref[5], rtol=tol, atol=tol)


def test_sync_batchnorm_per_rank_statistics_would_differ():
    """The comparison above can fail: shards normalised alone give other outputs."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
    x[3:] += 5.0
    whole = F.batch_norm(x, None, None, training=True).numpy()
    alone = np.concatenate([F.batch_norm(x[:3], None, None, training=True).numpy(),
                            F.batch_norm(x[3:], None, None, training=True).numpy()])
    assert np.abs(whole - alone).max() > 0.5


def test_convert_sync_batchnorm_keeps_names_and_plain_behaviour_without_group():
    from cnnfast.models import SmallCNN

    model = SmallCNN(1, 2, channels=(2, 3), seed=0)
    before = model.state_dict()
    x = np.random.default_rng(1).standard_normal((4, 1, 8, 8)).astype(np.float32)
    y_plain = model(cnnfast.tensor(x)).numpy()
    model.load_state_dict(before)
    convert_sync_batchnorm(model, None)
    kinds = [type(m).__name__ for m in model.modules() if "BatchNorm" in type(m).__name__]
    assert kinds == ["SyncBatchNorm2d", "SyncBatchNorm2d"]
    assert list(model.state_dict()) == list(before)
    np.testing.assert_array_equal(model(cnnfast.tensor(x)).numpy(), y_plain)


def test_sync_batchnorm_refuses_a_single_value_per_channel():
    group = ThreadGroup(2)

    def rank_fn(rank):
        sync = SyncBatchNorm2d(2)
        object.__setattr__(sync, "group", group)
        return sync(cnnfast.tensor(np.ones((1 - rank, 2, 1, 1), np.float32)))

    with pytest.raises(ValueError, match="more than one value per channel"):
        _run_ranks(group, rank_fn)
