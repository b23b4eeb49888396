"""Resumable training: the training-state file, bitwise-equal resumes (in-process crashes and
SIGKILLed ``cnnfast train`` processes, including kills during a state write), the run lock, and
refused resumes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from cnnfast import synthetic
from cnnfast.checkpoint import load_checkpoint
from cnnfast.cli import main
from cnnfast.data import save_npz
from cnnfast.models import SmallCNN
from cnnfast.state import (
    LOCK_NAME,
    STATE_NAME,
    RunLock,
    RunLockedError,
    TrainingStateError,
    decode_state,
    encode_state,
    read_state,
)
from cnnfast.train import TrainConfig, fit


def _same_bits(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes()
        for k in a)


def _history(result_or_dicts) -> list[dict]:
    rows = result_or_dicts if isinstance(result_or_dicts, list) else result_or_dicts.history_dicts()
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


# --- in-process: a crash (exception) at chosen points, then resume ------------------------------

class _Crash(Exception):
    pass


@pytest.fixture(scope="module")
def tiny_2d():
    return synthetic.nodule_dataset(48, 16, 16, seed=3, size=16)


def _model():
    # dropout with the model's own generator: its state must travel in the training state too
    return SmallCNN(1, 2, channels=(4, 8), dropout=0.3, seed=5)


CONFIGS = {
    "adam-multistep-flip": TrainConfig(epochs=3, batch_size=16, lr=3e-3, seed=7, flip_axes=(1,)),
    "sgd-cosine": TrainConfig(epochs=3, batch_size=16, lr=0.05, optimizer="sgd",
                              schedule="cosine", weight_decay=1e-4, seed=8),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_crash_and_resume_is_bitwise_equal(tmp_path, tiny_2d, monkeypatch, name):
    import cnnfast
    import cnnfast.train as train

    config = CONFIGS[name]
    reference = _model()
    ref = fit(reference, tiny_2d, config, state_path=tmp_path / "ref.state", progress=False)
    ref_global = cnnfast.rng.default_generator().bit_generator.state

    # 3 batches an epoch, 9 steps; states after steps 2, 4, 5 (epoch end: step 3 is one), ...
    real_write = train.write_state
    real_step = train.optim.Optimizer.step
    crash_points = {"adam-multistep-flip": [("after write", 1), ("before step", 5),
                                            ("after write", 6)],
                    "sgd-cosine": [("before step", 8)]}[name]
    for i, (kind, n) in enumerate(crash_points):
        path = tmp_path / f"run{i}.state"
        counter = {"write": 0, "step": 0}

        def write(p, state, kind=kind, n=n, counter=counter):
            real_write(p, state)
            counter["write"] += 1
            if kind == "after write" and counter["write"] == n:
                raise _Crash

        def step(self, kind=kind, n=n, counter=counter):
            counter["step"] += 1
            if kind == "before step" and counter["step"] == n:
                raise _Crash
            real_step(self)

        monkeypatch.setattr(train, "write_state", write)
        monkeypatch.setattr(train.optim.Optimizer, "step", step)
        with pytest.raises(_Crash):
            fit(_model(), tiny_2d, config, state_path=path, save_every=2, progress=False)
        monkeypatch.undo()
        cnnfast.manual_seed(999)  # whatever the crashed run left behind must not matter
        model = _model()
        result = fit(model, tiny_2d, config, state_path=path, save_every=2, progress=False,
                     resume=read_state(path))
        assert _same_bits(model.state_dict(), reference.state_dict()), (kind, n)
        assert _same_bits(result.best_state, ref.best_state)
        assert _history(result) == _history(ref)
        assert result.best_epoch == ref.best_epoch
        assert cnnfast.rng.default_generator().bit_generator.state == ref_global
        assert read_state(path).finished


def test_state_round_trip_and_damage(tmp_path, tiny_2d):
    path = tmp_path / "s.state"
    fit(_model(), tiny_2d, TrainConfig(epochs=1, batch_size=16, seed=1), state_path=path,
        progress=False)
    raw = path.read_bytes()
    state = decode_state(raw)
    again = decode_state(encode_state(state))
    assert _same_bits(again.model, state.model) and again.rng == state.rng
    assert again.history == state.history and again.best_val_auc == state.best_val_auc
    assert b"pickle" not in raw and raw[:8] == b"CNNFCKPT"
    with pytest.raises(TrainingStateError, match="checksum mismatch"):
        decode_state(raw[:-100] + bytes([raw[-100] ^ 1]) + raw[-99:])
    with pytest.raises(TrainingStateError, match="truncated"):
        decode_state(raw[:-10])
    ckpt = tmp_path / "m.ckpt"
    from cnnfast.checkpoint import save_checkpoint

    save_checkpoint(ckpt, _model().state_dict(), {"model": _model().config})
    with pytest.raises(TrainingStateError, match="a checkpoint, not a training state"):
        read_state(ckpt)


def test_resume_refuses_other_arguments(tmp_path, tiny_2d):
    path = tmp_path / "s.state"
    config = TrainConfig(epochs=2, batch_size=16, seed=1)
    fit(_model(), tiny_2d, config, state_path=path, progress=False)
    state = read_state(path)
    other = TrainConfig(epochs=2, batch_size=8, lr=1e-2, seed=1)
    with pytest.raises(TrainingStateError, match=r"--batch-size: 8 here, 16 in the saved run.*"
                                                 r"--lr: 0\.01 here, 0\.001 in the saved run"):
        fit(_model(), tiny_2d, other, state_path=path, progress=False, resume=state)
    with pytest.raises(TrainingStateError, match="channels"):
        fit(SmallCNN(1, 2, channels=(4, 4), dropout=0.3, seed=5), tiny_2d, config,
            state_path=path, progress=False, resume=state)
    changed = synthetic.nodule_dataset(48, 16, 16, seed=4, size=16)
    with pytest.raises(TrainingStateError, match="images or labels differ"):
        fit(_model(), changed, config, state_path=path, progress=False, resume=state)


def test_non_finite_loss_names_epoch_and_step_and_keeps_last_good_state(tmp_path, tiny_2d,
                                                                         monkeypatch):
    import cnnfast.train as train

    path = tmp_path / "s.state"
    model = _model()
    calls = {"n": 0}
    real = train.loss_for

    def poisoned_loss(task):
        fn = real(task)

        def loss(logits, target):
            calls["n"] += 1
            value = fn(logits, target)
            return value * float("nan") if calls["n"] == 5 else value
        return loss

    monkeypatch.setattr(train, "loss_for", poisoned_loss)
    with pytest.raises(FloatingPointError, match=r"loss is nan in epoch 2, step 2 of 3 \(step 5 "
                                                 r"of the run\).*last good training state is in"):
        fit(model, tiny_2d, TrainConfig(epochs=3, batch_size=16, seed=1), state_path=path,
            save_every=1, progress=False)
    state = read_state(path)
    assert state.global_step == 4 and state.epochs_done == 1 and state.batches_done == 1
    assert _same_bits(state.model, model.state_dict())  # the bad step was never taken
    assert all(np.isfinite(v).all() for v in model.state_dict().values())


# --- the run lock ---------------------------------------------------------------------------------

def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_run_lock_refuses_a_live_owner_and_takes_over_a_stale_one(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from cnnfast.state import RunLock; "
         f"RunLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(holder.pid)
        with pytest.raises(RunLockedError, match=f"in use by another training \\(pid "
                                                 f"{holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.communicate("", timeout=30)
    # The holder ended without releasing (stdin closed -> it exits with the lock file in place).
    assert (tmp_path / LOCK_NAME).exists()
    with RunLock(tmp_path) as lock:
        assert lock.stale_pid == holder.pid
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
    assert not (tmp_path / LOCK_NAME).exists()


# --- the command line: SIGKILL at chosen points and at random times ---------------------------

# Runs `cnnfast train` in a child that SIGKILLs itself at one chosen point, by wrapping the
# os calls every atomic writer makes (no test hook in the library itself):
#   step N          before the N-th optimizer step
#   mid-write N     during the N-th state write: the temporary file cut to half its bytes
#   before-rename N the N-th state's temporary file complete and fsynced, not yet renamed
#   after-rename N  just after the N-th state file was renamed into place
#   ckpt-write N    during the N-th best-checkpoint write (temporary file complete)
_CHILD = textwrap.dedent("""
    import os, signal, sys
    mode, n, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    count = [0]
    def die():
        os.kill(os.getpid(), signal.SIGKILL)
    def hit():
        count[0] += 1
        return count[0] == n
    real_replace, real_rename, real_fsync = os.replace, os.rename, os.fsync
    def name_of(fd):
        try:
            return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            return ""
    def fsync(fd):
        real_fsync(fd)
        name = name_of(fd)
        if mode == "mid-write" and name.startswith(".training.state.") and hit():
            os.ftruncate(fd, os.fstat(fd).st_size // 2)
            real_fsync(fd)
            die()
    def replacing(real):
        def replace(src, dst, *args, **kwargs):
            dst_name = os.path.basename(str(dst))
            if dst_name == "training.state" and mode == "before-rename" and hit():
                die()
            if dst_name.endswith(".ckpt") and mode == "ckpt-write" and hit():
                die()
            out = real(src, dst, *args, **kwargs)
            if dst_name == "training.state" and mode == "after-rename" and hit():
                die()
            return out
        return replace
    os.replace, os.rename, os.fsync = replacing(real_replace), replacing(real_rename), fsync
    if mode == "step":
        from cnnfast import optim
        real_step = optim.Optimizer.step
        def step(self):
            if hit():
                die()
            real_step(self)
        optim.Optimizer.step = step
    from cnnfast.cli import main
    sys.exit(main(argv))
""")


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    ds = synthetic.nodule_dataset(48, 16, 16, seed=2, size=16)
    return str(save_npz(tmp_path_factory.mktemp("resume") / "tiny.npz", ds))


def _train_args(npz: str, out: Path) -> list[str]:
    # 3 batches an epoch, 3 epochs = 9 steps; a state after every 2 steps and every epoch
    return ["train", "--data", npz, "--model", "smallcnn", "--channels", "4", "8", "--epochs",
            "3", "--batch-size", "16", "--lr", "0.003", "--flip", "--seed", "3",
            "--save-every", "2", "--no-progress", "--out", str(out)]


def _run_child(mode: str, n: int, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _CHILD, mode, str(n), *argv],
                          capture_output=True, text=True, timeout=300)


def _check_out_intact(out: Path) -> None:
    """Every file a training writes in ``out`` reads back whole (temporary files aside)."""
    for p in out.iterdir():
        if p.name.startswith(".") and p.name.endswith(".tmp"):
            continue
        if p.name == STATE_NAME:
            read_state(p)
        elif p.suffix == ".ckpt":
            load_checkpoint(p)
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.name == LOCK_NAME:
            assert p.read_text().strip().isdigit()


def _train_in_child(argv: list[str]) -> None:
    # Every run compared bitwise is a fresh process: the fast path's bits depend on its thread
    # count, which other tests in this process may have changed.
    done = _run_child("none", 0, argv)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="module")
def reference_run(tiny_npz, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    _train_in_child(_train_args(tiny_npz, out))
    return out


# Writes in this run: states after steps 2, 3 (epoch 1), 4, 6 (epoch 2), 8, 9 (epoch 3, final);
# best checkpoints after improving epochs.
# Each kill's resume is the next kill's run: fresh (nothing saved), fresh, fresh (state after step
# 2 kept), resumed mid-epoch 1, resumed at epoch 1's end, mid-epoch 2, epoch 2's end; then done.
KILL_CHAIN = [("step", 2), ("mid-write", 1), ("ckpt-write", 1), ("before-rename", 2),
              ("after-rename", 1), ("mid-write", 2), ("step", 1)]


def test_sigkill_chain_then_resume_is_bitwise_equal(tiny_npz, reference_run, tmp_path, capsys):
    out = tmp_path / "out"
    args = _train_args(tiny_npz, out)
    kills = 0
    for mode, n in KILL_CHAIN:
        done = _run_child(mode, n, args + (["--resume"] if kills else []))
        if done.returncode == 0:
            break  # the run ended before this point came
        assert done.returncode == -signal.SIGKILL, (mode, n, done.stderr[-2000:])
        kills += 1
        _check_out_intact(out)
    assert kills == len(KILL_CHAIN)
    # a resume with other arguments, or a new training over the unfinished one, is refused
    code = main(args[:-2] + ["--lr", "0.01", "--out", str(out), "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "--lr: 0.01 here, 0.003 in the saved run" in err, err
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and "holds an unfinished training" in err and "--resume" in err, err
    _train_in_child(args + ["--resume"])
    _check_out_intact(out)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert not (out / LOCK_NAME).exists()
    got, want = load_checkpoint(out / "smallcnn.ckpt"), load_checkpoint(reference_run /
                                                                        "smallcnn.ckpt")
    assert _same_bits(got.state_dict, want.state_dict)
    assert _history(got.header["history"]) == _history(want.header["history"])
    assert read_state(out / STATE_NAME).finished


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def test_sigkill_at_random_times_then_resume_is_bitwise_equal(tiny_npz, reference_run, tmp_path):
    out = tmp_path / "out"
    args = _train_args(tiny_npz, out) + ["--save-every", "1"]
    rng = random.Random(13)
    for attempt in range(2):
        before = _mtime(out / STATE_NAME)
        child = subprocess.Popen([sys.executable, "-m", "cnnfast", *args, "--resume"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # kill it at a random time after it has written a state (it trains by then)
        deadline = time.monotonic() + 120
        while _mtime(out / STATE_NAME) == before and child.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.6))
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=60)
        if child.returncode == 0:
            break
        _check_out_intact(out)
    _train_in_child(args + ["--resume"])
    got, want = load_checkpoint(out / "smallcnn.ckpt"), load_checkpoint(reference_run /
                                                                        "smallcnn.ckpt")
    assert _same_bits(got.state_dict, want.state_dict)


def test_cli_refuses_a_second_training_into_the_same_out(tiny_npz, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    left = [".training.state.0badf00d.tmp", ".smallcnn.ckpt.12345678.tmp"]  # a killed writer's
    mine = [".mine.tmp", "notes.txt"]                                          # the user's
    for name in left + mine:
        (out / name).write_text("x")
    with RunLock(out):
        code = main(_train_args(tiny_npz, out))
    err = capsys.readouterr().err
    assert code == 2 and f"is in use by another training (pid {os.getpid()}" in err, err
    (out / LOCK_NAME).write_text(f"{_dead_pid()}\n")  # left by a killed run
    assert main(_train_args(tiny_npz, out) + ["--epochs", "1"]) == 0
    assert "taking over the lock of pid" in capsys.readouterr().err
    assert all((out / n).exists() for n in mine) and not any((out / n).exists() for n in left)
