"""cnnfast.cuda.autotune: the choice among tile configurations, its cache file, its results.

In the simulator the timings mean nothing, so most tests give the tuner a clock of their own
(``_measure``) that makes a known candidate the fastest, and check what it then does: run that
candidate, write it to the cache file, take it from there in a fresh process state, and give
results that match the NumPy reference and, bit for bit, the same tiles run directly.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from cnnfast import config
from cnnfast.cuda import _runtime as rt
from cnnfast.cuda import autotune, conv
from cnnfast.reference import conv as ref_conv
from cnnfast.testing import assert_close, to_numpy

# two small configurations keep the simulator quick (one Python thread per CUDA thread)
FIRST = rt.SMALL_TILES
SECOND = rt.GemmTiles(block_m=16, block_n=8, block_k=4, micro_m=2, micro_n=2)
ARGS = ((2, 1), (1, 1), (1, 1), 1)


@pytest.fixture
def tuner(tmp_path, monkeypatch):
    """Autotune on, two candidates, a clock that makes SECOND the faster, a fresh cache dir;
    yields the list of candidates the clock was asked to time."""
    monkeypatch.setattr(autotune, "CANDIDATES", (FIRST, SECOND))
    timed = []

    def measure(run, repeats):
        run()
        timed.append(current[0])
        return {FIRST: 2.0, SECOND: 1.0}[current[0]]

    current = [None]
    real_run_tuned = autotune.run_tuned

    def run_tuned(pass_name, geo, dtype, run):
        def tracking(tiles):
            current[0] = tiles
            run(tiles)
        real_run_tuned(pass_name, geo, dtype, tracking)

    monkeypatch.setattr(autotune, "_measure", measure)
    monkeypatch.setattr(autotune, "run_tuned", run_tuned)
    autotune.forget()
    with config.using_config(cuda_autotune=True, cache_dir=str(tmp_path)):
        yield timed
    autotune.forget()


def _inputs(dtype=np.float32):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 7, 6)).astype(dtype)
    w = rng.standard_normal((5, 3, 3, 3)).astype(dtype)
    gy = rng.standard_normal(ref_conv.conv_forward(x, w, *ARGS).shape).astype(dtype)
    return x, w, gy


def _all_passes(x, w, gy):
    return (conv.conv_forward(x, w, *ARGS), conv.conv_backward_data(gy, w, x.shape, *ARGS),
            conv.conv_backward_weight(gy, x, w.shape, *ARGS))


def test_the_faster_candidate_is_chosen_kept_on_disk_and_reused(tuner, tmp_path):
    x, w, gy = _inputs()
    got = _all_passes(x, w, gy)
    assert tuner == [FIRST, SECOND] * 3  # each pass timed both candidates once
    want = (ref_conv.conv_forward(x, w, *ARGS), ref_conv.conv_backward_data(gy, w, x.shape, *ARGS),
            ref_conv.conv_backward_weight(gy, x, w.shape, *ARGS))
    for g, r, name in zip(got, want, ("forward", "backward data", "backward weight")):
        assert_close(g, r, name=name)
    with rt.launch_config(tiles=SECOND), config.using_config(cuda_autotune=False):
        direct = _all_passes(x, w, gy)
    for g, d in zip(got, direct):  # the chosen tiles' own bits
        assert to_numpy(g).tobytes() == to_numpy(d).tobytes()

    (path,) = (tmp_path / "autotune").iterdir()
    assert path.name == "numba-cuda-simulator.json"
    report = json.loads(path.read_text())
    assert report["schema"] == autotune.SCHEMA and len(report["choices"]) == 3
    assert all(c["tiles"] == [16, 8, 4, 2, 2] and c["ms"] == [2.0, 1.0]
               for c in report["choices"].values())

    _all_passes(x, w, gy)  # the same shapes again: nothing is timed
    autotune.forget()      # a new process: the file answers
    _all_passes(x, w, gy)
    assert len(tuner) == 6


def test_another_shape_is_timed_on_its_own(tuner):
    x, w, gy = _inputs()
    conv.conv_forward(x, w, *ARGS)
    conv.conv_forward(x[:1], w, *ARGS)  # another batch is another geometry
    assert tuner == [FIRST, SECOND, FIRST, SECOND]


def test_an_unreadable_or_stale_cache_is_ignored_and_replaced(tuner, tmp_path):
    x, w, gy = _inputs()
    path = autotune.cache_path(autotune.device_name())
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="ignoring the autotune cache"):
        conv.conv_forward(x, w, *ARGS)
    assert len(tuner) == 2 and json.loads(path.read_text())["schema"] == autotune.SCHEMA

    # an entry naming tiles that are no longer a candidate is dropped and timed again
    report = json.loads(path.read_text())
    (key,) = report["choices"]
    report["choices"][key]["tiles"] = [64, 64, 16, 4, 4]
    path.write_text(json.dumps(report))
    autotune.forget()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        conv.conv_forward(x, w, *ARGS)
    assert len(tuner) == 4


def test_off_by_default_and_float64_is_not_tuned(tuner, tmp_path):
    x, w, gy = _inputs(np.float64)
    conv.conv_forward(x, w, *ARGS)  # autotune on, but float64
    x32, w32, _ = _inputs()
    with config.using_config(cuda_autotune=False):
        conv.conv_forward(x32, w32, *ARGS)
    assert tuner == [] and not (tmp_path / "autotune").exists()


def test_the_switch_is_an_option_with_the_house_rule(monkeypatch):
    monkeypatch.setenv("CNNFAST_CUDA_AUTOTUNE", "yes")
    assert autotune.enabled()
    monkeypatch.setenv("CNNFAST_CUDA_AUTOTUNE", "maybe")
    with pytest.raises(ValueError, match="CNNFAST_CUDA_AUTOTUNE"):
        autotune.enabled()
    monkeypatch.delenv("CNNFAST_CUDA_AUTOTUNE")
    assert not autotune.enabled()


def test_every_candidate_is_a_valid_shipped_configuration():
    from cnnfast.cuda import _variants

    assert autotune.CANDIDATES[0] == rt.GPU_TILES
    assert set(autotune.CANDIDATES) <= (set(_variants.SHIPPED_TILES.values())
                                        | set(_variants.TUNED_TILES.values()))


def test_train_cuda_autotune_fills_the_cache_for_that_run_only(tmp_path, monkeypatch, capsys):
    from cnnfast import synthetic
    from cnnfast.cli import main
    from cnnfast.data import save_npz

    monkeypatch.setattr(autotune, "CANDIDATES", (FIRST, SECOND))
    monkeypatch.setattr(autotune, "REPEATS", 1)
    monkeypatch.setenv("CNNFAST_CACHE_DIR", str(tmp_path / "cache"))
    autotune.forget()
    data = save_npz(tmp_path / "nodules.npz", synthetic.nodule_dataset(8, 4, 4, seed=0, size=8))
    argv = ["train", "--data", str(data), "--model", "smallcnn", "--channels", "2", "2", "2",
            "--epochs", "1", "--batch-size", "4", "--no-progress", "--cuda-autotune"]
    assert main(argv + ["--out", str(tmp_path / "cpu"), "--device", "cpu"]) == 2
    assert "--cuda-autotune" in capsys.readouterr().err
    assert main(argv + ["--out", str(tmp_path / "run"), "--device", "cuda"]) == 0
    choices = json.loads(autotune.cache_path(autotune.device_name()).read_text())["choices"]
    assert {k.split()[0] for k in choices} == {"forward", "backward_data", "backward_weight"}
    assert not autotune.enabled()  # the option was the training's alone
    autotune.forget()
