"""Data-parallel training under mpiexec (the mpich wheel's, from ``cnnfast[mpi]``).

The independent truth is a single-process run of the same command: after one epoch the
checkpoints of 2 and 3 ranks (3: uneven shards) must match it to float32 rounding. Each rank
runs one thread (CI has 2 cores). Faults: a killed rank and a stopped rank each end the job with
a clear error in bounded time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mpi4py")

from cnnfast import config, synthetic  # noqa: E402 - after the skip
from cnnfast.checkpoint import load_checkpoint  # noqa: E402
from cnnfast.data import save_npz  # noqa: E402

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
if not os.access(MPIEXEC, os.X_OK):
    MPIEXEC = shutil.which("mpiexec")
if MPIEXEC is None:
    pytest.skip("no mpiexec (pip install 'cnnfast[mpi]')", allow_module_level=True)

ONE_THREAD = dict.fromkeys(("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                            "MKL_NUM_THREADS"), "1")


def _env(**extra) -> dict:
    env = {**os.environ, **ONE_THREAD, "PYTHONUNBUFFERED": "1", **extra}
    # the ranks import the cnnfast under test, wherever pytest runs from
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def nodule_npz(tmp_path_factory):
    """The built-in synthetic nodule set, small: 100 training images of 16x16, so a global batch
    of 32 leaves a last batch of 4 (3 ranks: shards 11/11/10, then 2/1/1)."""
    ds = synthetic.nodule_dataset(100, 40, 40, seed=0, size=16)
    return save_npz(tmp_path_factory.mktemp("data") / "nodule16.npz", ds)


def _train_argv(data, out, *extra) -> list[str]:
    return ["train", "--data", str(data), "--model", "smallcnn", "--channels", "4", "8", "16",
            "--epochs", "1", "--batch-size", "32", "--no-progress", "--out", str(out), *extra]


def _run(cmd, timeout=240, **env) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _max_difference(a: dict, b: dict) -> float:
    assert list(a) == list(b)
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


def test_two_and_three_ranks_match_one_process(tmp_path, nodule_npz):
    python = [sys.executable, "-m", "cnnfast"]
    _run(python + _train_argv(nodule_npz, tmp_path / "one"))
    two = _run(python + _train_argv(nodule_npz, tmp_path / "two", "--workers", "2"))
    _run([MPIEXEC, "-n", "3"] + python + _train_argv(nodule_npz, tmp_path / "three"))
    _run([MPIEXEC, "-n", "2"] + python + _train_argv(nodule_npz, tmp_path / "local-bn",
                                                     "--no-sync-bn"))
    assert "data parallel: 2 ranks (mpi)" in two.stdout
    assert two.stdout.count("epoch   1/1") == 1  # rank 0 alone prints

    state = {name: load_checkpoint(tmp_path / name / "smallcnn.ckpt").state_dict
             for name in ("one", "two", "three", "local-bn")}
    diffs = {name: _max_difference(state["one"], state[name])
             for name in ("two", "three", "local-bn")}
    print(f"max |difference| vs one process: {diffs}")
    for name in ("two", "three"):
        for key, value in state["one"].items():  # weights, running statistics of every layer
            np.testing.assert_allclose(state[name][key], value, rtol=1e-5, atol=1e-6,
                                       err_msg=f"{name} ranks, {key}")
    # the comparison can fail: per-rank batch statistics give other running variances
    assert diffs["local-bn"] > 1e-4
    metrics = [json.loads((tmp_path / name / "metrics.json").read_text())["history"][0]
               for name in ("one", "two", "three")]
    for m in metrics[1:]:  # the epoch's loss is summed over all ranks' samples
        assert m["train_loss"] == pytest.approx(metrics[0]["train_loss"], rel=1e-5)
        assert m["val_auc"] == pytest.approx(metrics[0]["val_auc"], abs=1e-6)
    # only rank 0 wrote: one checkpoint, no stray temporary files
    assert sorted(p.name for p in (tmp_path / "three").iterdir() if p.suffix == ".ckpt") == [
        "smallcnn.ckpt"]
    assert not [p for p in (tmp_path / "three").iterdir() if p.name.startswith(".")]


REDUCER_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import cnnfast
    from cnnfast import distributed
    from cnnfast.tensor import Tensor

    dp = distributed.from_environment()
    comm, rank, size = dp.comm, dp.rank, dp.size
    rng = np.random.default_rng(7)
    shapes = [(300,), (17, 9), (5,), (1000,), (3, 3, 3)]
    params = [cnnfast.tensor(np.zeros(s, np.float32), requires_grad=True) for s in shapes]
    # every rank knows every rank's gradients, so each can compute the expected sum itself
    grads = [[(rng.standard_normal(s) * 10.0 ** rng.integers(-3, 4)).astype(np.float32)
              for s in shapes] for _ in range(size)]
    reducer = distributed.GradientReducer(params, comm, bucket_bytes=400)
    assert len(reducer.buckets) >= 3, len(reducer.buckets)
    reducer.arm()
    loss = sum(((p * Tensor(g)).sum() for p, g in zip(params, grads[rank])), Tensor(np.float32(0)))
    loss.backward()
    started_in_backward = reducer.next_start
    reducer.finish()
    assert started_in_backward == len(reducer.buckets), started_in_backward
    for i, p in enumerate(params):
        want = grads[0][i].copy()
        for r in range(1, size):
            want += grads[r][i]  # rank order, float32: the documented summation order
        assert np.array_equal(p.grad.numpy(), want), (rank, i)
    digest = np.concatenate([p.grad.numpy().ravel() for p in params]).view(np.uint32)
    everyone = np.empty((size, digest.size), np.uint32)
    comm.comm.Allgather(digest, everyone)
    assert (everyone == everyone[0]).all()
    open(f"{sys.argv[1]}/ok-{rank}", "w").close()  # (stdout lines of ranks may interleave)
""")


def test_gradient_buckets_sum_in_rank_order_during_backward(tmp_path):
    script = tmp_path / "reducer.py"
    script.write_text(REDUCER_SCRIPT)
    _run([MPIEXEC, "-n", "3", sys.executable, str(script), str(tmp_path)], timeout=120)
    assert sorted(p.name for p in tmp_path.glob("ok-*")) == ["ok-0", "ok-1", "ok-2"]


# --- faults: a rank that dies or stops ends the job, never a hang ---------------------------------

def _rank_pids(marker: str) -> dict[int, int]:
    """PID of each rank whose command line holds ``marker`` (read from /proc)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in cmdline and b"cnnfast" in cmdline:
            for item in environ:
                if item.startswith(b"PMI_RANK="):
                    found[int(item[len(b"PMI_RANK="):])] = int(pid)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_a_failed_rank_ends_the_job_with_a_clear_error(tmp_path, nodule_npz, fault):
    out = tmp_path / f"fault-{fault}"
    argv = _train_argv(nodule_npz, out, "--workers", "2")
    argv[argv.index("--epochs") + 1] = "500"  # far longer than the test waits
    job = subprocess.Popen([sys.executable, "-m", "cnnfast", *argv],
                           env=_env(CNNFAST_DIST_TIMEOUT="4"), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    pids: dict[int, int] = {}
    try:
        for line in job.stdout:  # wait until both ranks train
            if line.startswith("epoch   1/"):
                break
        pids = _rank_pids(str(out))
        assert sorted(pids) == [0, 1], pids
        os.kill(pids[1], signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        hit = time.monotonic()
        rest = job.stdout.read()
        code = job.wait(timeout=90)
        elapsed = time.monotonic() - hit
    finally:
        for pid in pids.values():  # a stopped rank may outlive MPI_Abort's SIGTERM
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if job.poll() is None:
            job.kill()
            job.wait()
    assert code != 0
    assert "the 2-rank job failed" in rest
    if fault == "kill":
        assert "BAD TERMINATION" in rest and elapsed < 30, (elapsed, rest[-2000:])
    else:  # rank 0 waits CNNFAST_DIST_TIMEOUT seconds, says so, and aborts the job
        assert "got no answer from the other ranks within 4 s" in rest, rest[-2000:]
        assert elapsed < 4 + 30, elapsed


# --- resume (cnnfast.state): rank 0 writes the state, every rank reads it -------------------------

KILLER = textwrap.dedent("""
    # Runs `cnnfast ARGS`, but rank 1 SIGKILLs itself right after optimizer step KILL_AT.
    import os, signal, sys
    from cnnfast import optim
    from cnnfast.cli import main

    steps, kill_at = [0], int(os.environ["KILL_AT"])
    original = optim.Optimizer.step

    def step(self):
        original(self)
        steps[0] += 1
        if steps[0] == kill_at and os.environ.get("PMI_RANK") == "1":
            os.kill(os.getpid(), signal.SIGKILL)

    optim.Optimizer.step = step
    sys.exit(main(sys.argv[1:]))
""")


def test_resume_after_a_rank_died_with_two_and_three_ranks(tmp_path, nodule_npz):
    """A 2-rank run killed in epoch 2 and resumed from rank 0's state gives the uninterrupted
    2-rank run's bits; resumed on 3 ranks, it matches to float32 rounding."""
    from cnnfast.state import STATE_NAME, read_state

    def argv(out, *extra):
        args = _train_argv(nodule_npz, out, "--save-every", "2", *extra)
        args[args.index("--epochs") + 1] = "3"  # 4 steps an epoch: states at steps 2, 4, 6, ...
        return args

    python = [sys.executable, "-m", "cnnfast"]
    _run(python + argv(tmp_path / "whole", "--workers", "2"))
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    crashed = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(killer),
                              *argv(tmp_path / "cut")], env=_env(KILL_AT="7"),
                             capture_output=True, text=True, timeout=240)
    assert crashed.returncode != 0 and "BAD TERMINATION" in crashed.stdout + crashed.stderr
    saved = read_state(tmp_path / "cut" / STATE_NAME)
    assert (saved.global_step, saved.epochs_done, saved.batches_done) == (6, 1, 2)
    shutil.copytree(tmp_path / "cut", tmp_path / "cut3")

    _run(python + argv(tmp_path / "cut", "--workers", "2", "--resume"))
    _run([MPIEXEC, "-n", "3"] + python + argv(tmp_path / "cut3", "--resume"))
    whole = read_state(tmp_path / "whole" / STATE_NAME)
    for name in ("cut", "cut3"):
        resumed = read_state(tmp_path / name / STATE_NAME)
        assert resumed.finished and resumed.global_step == whole.global_step == 12
        for key, value in whole.model.items():
            if name == "cut":  # the same ranks: the same bits
                assert resumed.model[key].tobytes() == value.tobytes(), key
            else:
                np.testing.assert_allclose(resumed.model[key], value, rtol=1e-5, atol=1e-6,
                                           err_msg=key)


FIT_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from cnnfast import distributed, synthetic
    from cnnfast.models import SmallCNN
    from cnnfast.train import TrainConfig, fit

    parallel = distributed.from_environment()
    ds = synthetic.nodule_dataset(64, 16, 16, seed=0, size=16)
    model = SmallCNN(1, 2, channels=(4, 8), dropout=0.3, seed=5)
    config = TrainConfig(epochs=1, batch_size=16, lr=3e-3, seed=7, flip_axes=(1,))
    fit(model, ds, config, progress=False, parallel=parallel)
    if parallel.is_main:
        np.savez(sys.argv[1], **model.state_dict())
""")


def test_dropout_and_random_flips_do_not_depend_on_the_number_of_ranks(tmp_path):
    """Every rank draws the global batch's flips and dropout mask (from one process's
    streams) and keeps its rows: 3 ranks train what one process trains."""
    from cnnfast.models import SmallCNN
    from cnnfast.train import TrainConfig, fit

    ds = synthetic.nodule_dataset(64, 16, 16, seed=0, size=16)
    model = SmallCNN(1, 2, channels=(4, 8), dropout=0.3, seed=5)
    fit(model, ds, TrainConfig(epochs=1, batch_size=16, lr=3e-3, seed=7, flip_axes=(1,)),
        progress=False)
    script = tmp_path / "fit.py"
    script.write_text(FIT_SCRIPT)
    _run([MPIEXEC, "-n", "3", sys.executable, str(script), str(tmp_path / "three.npz")])
    three = dict(np.load(tmp_path / "three.npz"))
    one = model.state_dict()
    for key, value in one.items():
        np.testing.assert_allclose(three[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


CUDA_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from cnnfast import distributed, synthetic
    from cnnfast.models import SmallCNN
    from cnnfast.train import TrainConfig, fit

    parallel = distributed.from_environment("cuda")
    assert parallel.backend == "mpi"  # no NCCL in the simulator: buckets staged through the host
    ds = synthetic.nodule_dataset(8, 4, 4, seed=0, size=8)
    model = SmallCNN(1, 2, channels=(2,), seed=5)
    config = TrainConfig(epochs=1, batch_size=4, seed=7, device="cuda", eval_batch_size=4)
    fit(model, ds, config, progress=False, parallel=parallel)
    if parallel.is_main:
        np.savez(sys.argv[1], **model.state_dict())
""")


@pytest.mark.skipif(not config.cuda_simulated(),
                    reason="a real GPU: two ranks would need two GPUs")
def test_device_cuda_in_the_simulator_trains_like_one_process(tmp_path):
    """The data-parallel path on device cuda (SyncBatchNorm on device arrays, gradients staged
    through the host for MPI) in Numba's CUDA simulator, tiny shapes."""
    from cnnfast.models import SmallCNN
    from cnnfast.train import TrainConfig, fit

    ds = synthetic.nodule_dataset(8, 4, 4, seed=0, size=8)
    model = SmallCNN(1, 2, channels=(2,), seed=5)
    fit(model, ds, TrainConfig(epochs=1, batch_size=4, seed=7, device="cuda",
                               eval_batch_size=4), progress=False)
    script = tmp_path / "dp_on_cuda.py"  # not cuda.py: it would shadow the cuda package
    script.write_text(CUDA_SCRIPT)
    _run([MPIEXEC, "-n", "2", sys.executable, str(script), str(tmp_path / "two.npz")])
    two = dict(np.load(tmp_path / "two.npz"))
    for key, value in model.state_dict().items():
        np.testing.assert_allclose(two[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
