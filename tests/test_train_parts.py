"""The pieces of ``cnnfast.train.fit`` one by one: the set-up, one training step and its NaN
stop, one epoch with mid-epoch saves, validation, keeping the best weights, the log line and the
progress bar (fit itself: tests/test_train_cli.py, tests/test_resume.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cnnfast import synthetic, train
from cnnfast.checkpoint import load_checkpoint
from cnnfast.metrics import Metrics
from cnnfast.models import SmallCNN
from cnnfast.state import read_state


@pytest.fixture
def run(tmp_path):
    ds = synthetic.nodule_dataset(48, 16, 16, seed=0, size=12)
    model = SmallCNN(1, 2, channels=(2, 4), seed=0)
    config = train.TrainConfig(epochs=2, batch_size=16, lr=1e-2, seed=0)
    return train._prepare_run(model, ds, config, tmp_path / "state", None, None)


class Bar:
    """A stand-in progress bar that records what fit's pieces tell it."""

    def __init__(self):
        self.calls = []

    def start_epoch(self, epoch, epochs):
        self.calls.append(("epoch", epoch, epochs))

    def step(self, train_loss, history):
        self.calls.append(("step", train_loss))


def _weights(model):
    return {k: v.copy() for k, v in model.state_dict().items()}


def test_prepare_run_builds_the_run(run):
    assert len(run.loader) == 3 and run.loss_fn is not None and run.schedule is not None
    assert run.epochs_done == 0 and run.global_step == 0 and run.result.history == []


def test_train_step_updates_the_weights_and_returns_the_loss(run):
    before = _weights(run.model)
    x, y = run.loader.batch(run.loader.epoch_order(), 0)
    value, n = train._train_step(run, x, y, 1, 0)
    assert n == 16 and math.isfinite(value) and value > 0
    after = run.model.state_dict()
    assert any(not np.array_equal(before[k], after[k]) for k in before)


def test_a_non_finite_loss_stops_before_the_step_and_undoes_the_statistics(run):
    before = _weights(run.model)
    x, y = run.loader.batch(run.loader.epoch_order(), 0)
    x = x.copy()
    x[0] = np.nan
    with pytest.raises(FloatingPointError, match="epoch 1, step 1 of 3"):
        train._train_step(run, x, y, 1, 0)
    after = run.model.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)  # weights and BN buffers


def test_train_epoch_steps_every_batch_and_saves_mid_epoch(run):
    bar = Bar()
    train._train_epoch(run, 1, bar, save_every=2)
    assert run.global_step == 3 and run.seen == 48
    assert bar.calls[0] == ("epoch", 1, 2) and sum(c[0] == "step" for c in bar.calls) == 3
    state = read_state(run.path)     # written after step 2 of 3 (not after the last one)
    assert (state.epochs_done, state.batches_done, state.global_step) == (0, 2, 2)


def test_validate_appends_the_epoch_record(run):
    run.loss_sum, run.seen = 6.0, 3
    record, metrics = train._validate(run, 1, 0.01, 0.0)
    assert run.result.history == [record] and (run.loss_sum, run.seen) == (0.0, 0)
    assert record.train_loss == 2.0 and record.lr == 0.01 and record.val_auc == metrics.auc
    assert 0.0 <= metrics.auc <= 1.0 and math.isfinite(record.val_loss)


def _metrics(auc):
    return Metrics(task="binary-class", auc=auc, acc=0.5)


def test_keep_best_keeps_improvements_and_writes_the_checkpoint(run, tmp_path):
    ckpt = tmp_path / "best.ckpt"
    assert train._keep_best(run, 1, _metrics(0.6), ckpt)          # the first epoch always
    assert (run.result.best_epoch, run.result.best_val_auc) == (1, 0.6)
    assert load_checkpoint(ckpt).header["epoch"] == 1
    assert not train._keep_best(run, 2, _metrics(0.6), ckpt)      # a tie is no improvement
    assert not train._keep_best(run, 3, _metrics(0.5), None)
    assert train._keep_best(run, 4, _metrics(0.7), None)          # kept, no file asked for
    assert run.result.best_epoch == 4 and load_checkpoint(ckpt).header["epoch"] == 1


def test_epoch_line():
    record = train.EpochRecord(3, 0.5, 0.25, 0.875, 0.75, 1e-3, 1.0)
    line = train.epoch_line(3, 10, 1e-3, record, True)
    assert line == ("epoch   3/10  lr 1.00e-03  train loss 0.5000  val loss 0.2500  val AUROC "
                    "0.8750  val acc 0.7500  *best*")
    assert not train.epoch_line(3, 10, 1e-3, record, False).endswith("*best*")


def test_progress_logs_each_epoch_only_when_asked():
    record = train.EpochRecord(1, 0.5, 0.25, 0.875, 0.75, 1e-3, 1.0)
    lines = []
    bar = train._Progress(total=3, initial=0, enabled=False, log=lines.append)
    bar.start_epoch(1, 1)
    bar.step(0.5, [])
    bar.end_epoch(record, "the line")
    bar.close()
    assert lines == ["the line"]
    quiet = train._Progress(total=3, initial=0, enabled=False, log=None)
    quiet.end_epoch(record, "not logged")
    quiet.close()
