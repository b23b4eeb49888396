"""The benchmark runner's logic on tiny shapes: the correctness gate, the JSON report, --compare,
command-line errors, and the ResNet-18 shapes it derives. No timing is asserted."""

from __future__ import annotations

import copy
import json
import math
import os
import sys

import numpy as np
import pytest

import cnnfast
from cnnfast import bench, dispatch
from cnnfast.bench import measuring, workloads
from cnnfast.bench.cli import parser as bench_parser


@pytest.fixture(autouse=True)
def _short_samples(monkeypatch):
    monkeypatch.setattr(measuring, "MIN_SAMPLE_S", 0.001)


def machine_threads_default() -> int:
    return bench.machine_threads()


@pytest.fixture(autouse=True)
def _keep_thread_counts():
    """In-process executors set Numba's and PyTorch's thread counts for the whole process; put
    them back, as later tests compare bits with runs at the default count (the fast path's
    chunking, and so its summation order, follows the thread count)."""
    import numba

    numba_threads = numba.get_num_threads()
    torch = sys.modules.get("torch")
    torch_threads = torch.get_num_threads() if torch else None
    yield
    numba.set_num_threads(numba_threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(torch_threads or machine_threads_default())


def _options(**kw) -> bench.Options:
    base = {"ops": ("conv",), "shapes": ("tiny.conv2d",), "paths": ("reference",), "models": (),
            "repeats": 2, "memory_steps": 0, "progress": False, "threads": 0}
    base.update(kw)
    return bench.Options(**base)


class WrongPath(bench.KernelCandidate):
    """The reference kernels with every output scaled by 1.01: a deliberately wrong path."""

    def __init__(self):
        super().__init__("reference")
        self.name = "wrong"
        self.calls = 0

    def op_fn(self, item, inputs):
        fn = super().op_fn(item, inputs)

        def wrong():
            self.calls += 1
            return tuple(o * o.dtype.type(1.01) if o.dtype.kind == "f" else o for o in fn())
        return wrong


def _rows(report, path):
    return [r for r in report["results"] if r["path"] == path]


def test_wrong_path_is_flagged_and_never_timed():
    wrong = WrongPath()
    report = bench.run_benchmarks(_options(isolation="in-process"),
                                  [bench.KernelCandidate("reference"), wrong])
    wrong_rows = _rows(report, "wrong")
    assert [r["phase"] for r in wrong_rows] == ["fwd", "bwd_data", "bwd_weight"]
    for r in wrong_rows:
        assert r["status"] == "WRONG"
        assert "relative error" in r["reason"]
        assert r["median_s"] is None and "times_s" not in r
    assert wrong.calls == 6  # one check call per item and dtype, no warm-up, no repeats
    for r in _rows(report, "reference"):
        assert r["status"] == "ok" and r["median_s"] > 0 and len(r["times_s"]) == 2
    table = bench.format_table(report)
    assert "WRONG" in table and "oracle" in table


class Broken(bench.KernelCandidate):
    """A path whose kernels raise (module level: it is sent to a worker process)."""

    def __init__(self):
        super().__init__("reference")
        self.name = "broken"

    def op_fn(self, item, inputs):
        def fail():
            raise RuntimeError("kernel exploded")
        return fail


class NoPool(bench.KernelCandidate):
    def __init__(self):
        super().__init__("reference")
        self.name = "nopool"

    def unavailable_for(self, item):
        return "pool kernels not written yet" if item.family == "pool" else None


def test_raising_path_is_reported_as_error():
    report = bench.run_benchmarks(_options(shapes=("tiny.act",), ops=("relu",)),
                                  [bench.KernelCandidate("reference"), Broken()])
    rows = _rows(report, "broken")
    assert {r["status"] for r in rows} == {"ERROR"}
    assert "kernel exploded" in rows[0]["reason"]


def test_unavailable_family_is_skipped_with_a_reason():
    report = bench.run_benchmarks(_options(shapes=("tiny.act",), ops=("pool", "relu")),
                                  [bench.KernelCandidate("reference"), NoPool()])
    statuses = {(r["op"], r["status"]) for r in _rows(report, "nopool")}
    assert statuses == {("pool", "skipped"), ("relu", "ok")}
    assert "pool kernels not written yet" in bench.format_table(report)


def test_torch_peer_agrees_with_reference_on_every_op():
    pytest.importorskip("torch")
    report = bench.run_benchmarks(_options(ops=("conv", "pool", "relu", "bn"),
                                           shapes=("tiny.conv2d.s2", "tiny.conv3d", "tiny.act"),
                                           paths=("reference", "torch"), repeats=1))
    torch_rows = _rows(report, "torch")
    assert len(torch_rows) == 3 * 2 + 4 + 2 + 2
    bad = [(r["id"], r["status"], r["reason"]) for r in torch_rows if r["status"] != "ok"]
    assert not bad
    for r in _rows(report, "reference"):
        torch_row = next(t for t in torch_rows if t["id"] == r["id"])
        assert r["time_vs_torch"] == pytest.approx(r["median_s"] / torch_row["median_s"])
        assert r["cpu_s"] > 0 and r["cpu_vs_torch"] == pytest.approx(r["cpu_s"] /
                                                                     torch_row["cpu_s"])
    assert report["machine"]["isolation"] == "process"
    pids = report["machine"]["workers"]
    assert set(pids) == {"reference", "torch"} and os.getpid() not in pids.values()
    assert len(set(pids.values())) == 2


def test_report_json_has_machine_versions_options_and_figures(tmp_path, capsys):
    out = tmp_path / "report.json"
    argv = ["--ops", "conv,relu,step", "--shapes", "tiny.conv2d,tiny.act", "--paths",
            "reference", "--models", "smallcnn", "--step-batch", "4", "--memory-steps", "3",
            "--repeats", "2", "--no-progress", "--out", str(out)]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "median" in printed and "memory growth" in printed and str(out) in printed
    report = json.loads(out.read_text())
    assert report["schema"] == bench.SCHEMA
    machine = report["machine"]
    for key in ("cpu", "cores", "threads_available", "gpu", "platform"):
        assert key in machine
    assert machine["cores"] >= 1
    assert {"OPENBLAS_CORETYPE", "OMP_WAIT_POLICY"} <= set(machine["thread_env"])
    assert all({"library", "architecture"} <= set(b) for b in machine["blas"])
    ceiling = machine["ceiling"]
    assert ceiling["fma_all"] > 0 and ceiling["fma_1"] > 0 and ceiling["blas_1"] > 0
    assert "FMA ceiling (float32, measured)" in printed and "of ceil" in printed
    for key in ("python", "numpy", "numba", "torch", "cnnfast"):
        assert key in report["versions"]
    assert report["versions"]["cnnfast"] == cnnfast.__version__
    assert report["options"]["repeats"] == 2
    conv = [r for r in report["results"] if r["op"] == "conv"]
    assert len(conv) == 3
    for r in conv:
        assert r["status"] == "ok" and r["median_s"] > 0 and r["gflops"] > 0
        assert math.isclose(r["ceiling_share"],
                            r["gflops"] / (ceiling["fma_1"] * ceiling["threads"]))
        assert r["min_s"] <= r["median_s"] and r["iqr_s"] >= 0 and r["first_call_s"] > 0
        assert math.isclose(r["gflop"], 2 * 2 * 4 * 7 * 6 * 3 * 9 / 1e9)
    step = next(r for r in report["results"] if r["op"] == "step")
    assert step["status"] == "ok" and step["batch"] == 4 and step["gflop"] > 0
    assert step["peak_rss_mb"] is not None and step["peak_traced_mb"] > 0
    (growth,) = report["memory"]
    assert growth["model"] == "smallcnn" and growth["steps"] == 3
    assert isinstance(growth["growth_mb"], float)


def _write(path, report):
    path.write_text(json.dumps(report))
    return str(path)


def _fake_report(medians: dict[str, float], status: str = "ok") -> dict:
    return {"schema": bench.SCHEMA, "machine": {"cpu": "test cpu"},
            "results": [{"id": item, "path": "cpu", "status": status, "reason": None,
                         "median_s": t} for item, t in medians.items()]}


def test_compare_flags_a_regression(tmp_path, capsys):
    old = _write(tmp_path / "old.json", _fake_report({"conv.fwd/a": 1.0, "conv.fwd/b": 2.0}))
    slower = _write(tmp_path / "new.json", _fake_report({"conv.fwd/a": 1.05, "conv.fwd/b": 2.5}))
    assert bench.main(["--compare", old, slower]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "conv.fwd/b" in out and "25% slower" in out
    assert "1 regression(s)" in out
    assert bench.main(["--compare", old, slower, "--threshold", "0.3"]) == 0
    assert bench.main(["--compare", old, old]) == 0


def test_compare_relative_to_torch_cancels_a_slower_machine(tmp_path, capsys):
    def report(cpu_s, torch_s):
        rows = [{"id": "conv.fwd/a", "path": p, "status": "ok", "reason": None, "median_s": t,
                 "time_vs_torch": t / torch_s} for p, t in (("cpu", cpu_s), ("torch", torch_s))]
        return {"schema": bench.SCHEMA, "machine": {"cpu": "test cpu"}, "results": rows}

    old = _write(tmp_path / "old.json", report(1.0, 1.0))
    busier = _write(tmp_path / "busier.json", report(2.0, 2.0))   # everything 2x slower
    assert bench.main(["--compare", old, busier]) == 1
    assert bench.main(["--compare", old, busier, "--metric", "time_vs_torch"]) == 0
    worse = _write(tmp_path / "worse.json", report(1.5, 1.0))      # cpu alone got slower
    assert bench.main(["--compare", old, worse, "--metric", "time_vs_torch"]) == 1
    assert "50% slower relative to torch" in capsys.readouterr().out


def test_compare_reads_a_schema_1_report_speed_ratio_as_a_time_ratio(tmp_path, capsys):
    """Schema 1 stored vs_torch = t_torch / t_path; it is read as time_vs_torch = its inverse."""
    rows = [{"id": "conv.fwd/a", "path": "cpu", "status": "ok", "reason": None, "median_s": 2.0,
             "vs_torch": 0.5}]
    old = _write(tmp_path / "old.json", {"schema": "cnnfast-bench/1",
                                         "machine": {"cpu": "test cpu"}, "results": rows})
    assert bench.load_report(old)["results"][0]["time_vs_torch"] == 2.0
    new_rows = [dict(rows[0], time_vs_torch=2.0)]
    del new_rows[0]["vs_torch"]
    new = _write(tmp_path / "new.json", {"schema": bench.SCHEMA, "machine": {"cpu": "test cpu"},
                                         "results": new_rows})
    assert bench.main(["--compare", old, new, "--metric", "vs_torch"]) == 0
    assert "1.00x" in capsys.readouterr().out


def test_compare_flags_a_path_that_became_wrong(tmp_path, capsys):
    old = _write(tmp_path / "old.json", _fake_report({"conv.fwd/a": 1.0}))
    new_report = _fake_report({"conv.fwd/a": None}, status="WRONG")
    new = _write(tmp_path / "new.json", new_report)
    assert bench.main(["--compare", old, new]) == 1
    assert "now WRONG" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--paths", "reference,gpu"], "unknown path 'gpu'"),
    (["--ops", "conv,softmax"], "unknown op 'softmax'"),
    (["--models", "vgg16"], "unknown model 'vgg16'"),
    (["--shapes", "r18-99"], "unknown shape 'r18-99'"),
    (["--repeats", "0"], "--repeats must be a positive number"),
    (["--repeats", "many"], "invalid int value"),
    (["--check-batch", "-3"], "--check-batch"),
    (["--frobnicate"], "unrecognized arguments"),
    (["--compare", "/nonexistent/old.json", "/nonexistent/new.json"], "cannot read"),
])
def test_bad_input_exits_2_with_one_clear_line(argv, message, capsys):
    assert bench.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("cnnfast bench: error:") and message in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""


def test_compare_refuses_a_file_that_is_not_a_report(tmp_path, capsys):
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    other = _write(tmp_path / "other.json", {"hello": 1})
    assert bench.main(["--compare", str(junk), other]) == 2
    assert "is not JSON" in capsys.readouterr().err
    assert bench.main(["--compare", other, other]) == 2
    assert "not a cnnfast bench report" in capsys.readouterr().err


def test_resnet18_shapes_match_the_model():
    """The derived unique conv shapes are exactly those resnet18 (3x3 stride-1 stem) runs."""
    from cnnfast import models

    derived = bench.resnet18_conv_shapes(28, 2, batch=1)
    assert len(derived) == 11
    model = models.resnet18(in_channels=bench.IN_CHANNELS, num_classes=2, stem="small")
    records: list = []
    x = np.random.default_rng(0).standard_normal((1, bench.IN_CHANNELS, 28, 28))
    with dispatch.cpu_path("reference"), cnnfast.no_grad(), \
            workloads.record_layers(model, records):
        model(cnnfast.tensor(x.astype(np.float32)))
    convs = {m.weight.shape: m for m in model.modules() if isinstance(m, cnnfast.nn.Conv2d)}
    assert convs
    seen = set()
    for kind, x_shape, w_shape, y_shape, _ in records:
        if kind != "Conv2d":
            continue
        m = next(c for c in model.modules()
                 if isinstance(c, cnnfast.nn.Conv2d) and c.weight.shape == w_shape)
        seen.add((x_shape[1], w_shape[0], x_shape[2:], w_shape[2:], m.stride, m.padding,
                  y_shape[2:]))
    expected = {(s.C, s.K, s.size, s.kernel, s.stride, s.padding, s.out) for s in derived}
    assert seen == expected
    sizes_3d = [s.size for s in bench.resnet18_conv_shapes(28, 3, batch=8)]
    assert sizes_3d[0] == (28, 28, 28) and (4, 4, 4) in sizes_3d


def test_conv_flops_formula():
    shape = bench.ConvShape("t", N=32, C=64, K=128, size=(28, 28), kernel=(3, 3), stride=(2, 2),
                            padding=(1, 1))
    assert shape.out == (14, 14)
    assert shape.flops() == 2 * 32 * 128 * 14 * 14 * 64 * 9


def test_quick_selection_is_small():
    options = bench.options_from_args(bench_parser().parse_args(["--quick"]))
    assert options.models == ("smallcnn", "resnet18")
    assert set(options.shapes) == set(bench.QUICK_SHAPES)
    assert options.memory_steps < 200
    items = bench.op_items(options.ops, options.shapes)
    assert sum(i.flops() or 0 for i in items) < 30e9


def test_reference_is_timed_only_on_small_shapes():
    runner = bench.Runner(_options())
    small = bench.op_items(("conv",), ("r18-28.layer1",))[0]
    big = bench.op_items(("conv",), ("r18-3d.layer1",))[0]
    assert runner._reference_timed(small) and not runner._reference_timed(big)
    assert runner._check_batch(big) < big.batch
    assert runner._check_batch(small) == small.batch
    everywhere = bench.Runner(_options(reference_all=True))
    assert everywhere._reference_timed(big)


def test_busy_machine_is_flagged():
    def report(start, during):
        return {"machine": {"threads_available": 2, "load_avg_start": [start, 0, 0]},
                "results": [{"load_1m": during}]}

    assert bench.busy_note(report(0.2, 2.5)) is None
    assert "busy" in bench.busy_note(report(1.8, 2.5))
    assert "busy" in bench.busy_note(report(0.2, 4.0))
    # CPU time used by others, where measured, decides at the start instead of the load
    # average (which an idle VM can hold at 1 with kernel threads that use no CPU).
    idle_vm = report(1.1, 2.5)
    idle_vm["machine"]["cpu_busy_start"] = 0.02
    assert bench.busy_note(idle_vm) is None
    idle_vm["machine"]["cpu_busy_start"] = 1.5
    assert "CPUs busy 1.5" in bench.busy_note(idle_vm)


def test_cpu_busy_reads_proc_stat():
    busy = bench.cpu_busy(0.05)
    if not os.path.exists("/proc/stat"):
        assert busy is None
    else:
        assert 0.0 <= busy <= os.cpu_count()


def test_relative_errors():
    a = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    assert bench.relative_error(a, a) == 0
    assert bench.relative_error(a * 1.01, a) == pytest.approx(0.01, rel=1e-3)
    assert bench.relative_error(a[:2], a) == math.inf
    assert bench.relative_error(np.array([1.0, np.nan, 3.0]), a) == math.inf
    assert bench.relative_error(np.array([1, 2]), np.array([1, 3])) == math.inf
    assert bench.relative_error(a, a, "l2") == 0
    assert bench.relative_error(a * 1.01, a, "l2") == pytest.approx(0.01, rel=1e-3)
    b = np.array([1.0, 2.0, 4.0])   # max-abs: 1/4; L2: 1/sqrt(21)
    assert bench.relative_error(a, b) == pytest.approx(0.25)
    assert bench.relative_error(a, b, "l2") == pytest.approx(1 / math.sqrt(21))
    assert bench.relative_error(np.zeros(3), np.zeros(3), "l2") == 0
    with pytest.raises(ValueError, match="norm"):
        bench.relative_error(a, a, "l1")
    step = (1.0, {"w": a})
    ok, err32, err64, _, _ = bench.check_step(step, (1.0, {"w": copy.copy(a)}), step, step)
    assert ok and err32 == err64 == 0
    ok, _, _, _, what = bench.check_step((1.0, {}), step, step, step)
    assert not ok and "no gradient for w" in what


# --- the correctness gate: float64 decides, float32 within float32's own error ---------------

class ScaledStepTrainer(bench.CnnfastTrainer):
    """A reference trainer whose gradients come out scaled by ``factor`` in float64 and by
    ``factor32`` in float32."""

    factor, factor32 = 1.0, 1.0

    def check(self, x, y):
        loss, grads = super().check(x, y)
        f = self.factor32 if x.dtype == np.float32 else self.factor
        return loss, {k: None if g is None else g * g.dtype.type(f) for k, g in grads.items()}


class ScaledStepPath(bench.KernelCandidate):
    """The reference path with wrong step gradients (module level: sent to a worker)."""

    def __init__(self, name, factor=1.0, factor32=1.0):
        super().__init__("reference")
        self.name, self.factor, self.factor32 = name, factor, factor32

    def trainer(self, spec, state):
        t = ScaledStepTrainer(self, spec, state)
        t.factor, t.factor32 = self.factor, self.factor32
        return t


def test_a_wrong_step_is_caught_in_its_own_worker_process():
    """1% off in both dtypes (the float64 check catches it) and 30% off in float32 only (the
    float32 check does), each timed in a worker; the reference itself passes."""
    spec = {"models": ("smallcnn",), "ops": ("step",), "step_batch": 4, "repeats": 1}
    report = bench.run_benchmarks(_options(**spec), [
        bench.KernelCandidate("reference"), ScaledStepPath("off1pc", 1.01, 1.01),
        ScaledStepPath("off32", 1.0, 1.3), ScaledStepPath("right", 1.0, 1.0)])
    rows = {r["path"]: r for r in report["results"]}
    assert rows["off1pc"]["status"] == "WRONG" and "in float64" in rows["off1pc"]["reason"]
    assert rows["off32"]["status"] == "WRONG" and "in float32" in rows["off32"]["reason"]
    assert rows["right"]["status"] == "ok" and rows["right"]["median_s"] > 0
    assert rows["right"]["check_error_f64"] < 1e-12
    assert rows["reference"]["status"] == "ok"


def _step_results(path, spec, seed=0):
    ex = bench.LocalExecutor(bench.KernelCandidate(path) if path != "torch"
                             else bench.TorchCandidate("torch"))
    ex.start(1)
    return (ex.step_result(spec, seed, np.float32)[0], ex.step_result(spec, seed, np.float64)[0])


def test_a_correct_float32_peer_is_never_reported_wrong():
    """`cnnfast bench --quick` once printed `torch WRONG ... gradient of features.1.1.bias:
    relative error 1.46e-02` for this step: float32 ReLU masks flip near zero. Against the
    float64 reference, with float32's tolerance, PyTorch and the fast path both pass."""
    pytest.importorskip("torch")
    spec = bench.MODEL_SPECS["smallcnn"]          # batch 64, checked at 64
    ref32, ref64 = _step_results("reference", spec)
    for path in ("torch", "cpu"):
        got32, got64 = _step_results(path, spec)
        ok, err32, err64, tol32, what = bench.check_step(got32, got64, ref32, ref64)
        assert ok, (path, what)
        assert err64 < 1e-10 <= tol32
    # ...and the same results, made wrong, are caught.
    loss32, grads32 = got32
    loss64, grads64 = got64
    name = "features.1.1.bias"
    off64 = {**grads64, name: grads64[name] * 1.001}
    ok, _, _, _, what = bench.check_step(got32, (loss64, off64), ref32, ref64)
    assert not ok and f"{name} in float64" in what
    off32 = {**grads32, "fc.weight": grads32["fc.weight"] * np.float32(1.2)}
    ok, _, _, _, what = bench.check_step((loss32, off32), got64, ref32, ref64)
    assert not ok and "fc.weight in float32" in what
    ok, _, _, _, what = bench.check_step((loss32 * 1.001, grads32), got64, ref32, ref64)
    assert not ok and "loss in float32" in what


def test_op_check_tolerates_float32_rounding_and_catches_small_errors():
    item = bench.op_items(("conv",), ("tiny.conv2d",))[0]
    oracle = bench.LocalExecutor(bench.KernelCandidate("reference"))
    ref32 = oracle.op_result(item, 2, np.float32)[0]
    ref64 = oracle.op_result(item, 2, np.float64)[0]
    assert bench.check_op(ref32, ref64, ref32, ref64)[0]
    ok, _, _, _, what = bench.check_op(ref32, (ref64[0] * 1.000001,), ref32, ref64)
    assert not ok and "output 0 in float64" in what
    ok, _, _, _, what = bench.check_op((ref32[0] * np.float32(1.001),), ref64, ref32, ref64)
    assert not ok and "output 0 in float32" in what
    ok, _, _, _, what = bench.check_op((ref32[0][:1],), ref64, ref32, ref64)
    assert not ok and "shape" in what


class DyingPath(bench.KernelCandidate):
    """A path whose worker process exits in the middle of a kernel."""

    def __init__(self):
        super().__init__("reference")
        self.name = "dying"

    def op_fn(self, item, inputs):
        return lambda: os._exit(3)


def test_a_worker_that_dies_is_an_error_and_the_run_goes_on():
    report = bench.run_benchmarks(_options(shapes=("tiny.conv2d", "tiny.act"),
                                           ops=("conv", "relu")),
                                  [bench.KernelCandidate("reference"), DyingPath()])
    rows = _rows(report, "dying")
    assert rows and {r["status"] for r in rows} == {"ERROR"}
    assert "died" in rows[0]["reason"]
    assert all(r["status"] == "ok" for r in _rows(report, "reference"))


def test_in_process_option():
    args = bench_parser().parse_args(["--in-process"])
    assert bench.options_from_args(args).isolation == "in-process"
    assert bench.options_from_args(bench_parser().parse_args([])).isolation == "process"
    report = bench.run_benchmarks(_options(isolation="in-process"))
    assert report["machine"]["workers"] == {"reference": os.getpid()}
    assert all(r["status"] == "ok" and "others_busy" in r for r in report["results"])


def test_scaling_sweep_writes_json_and_png(tmp_path, monkeypatch, capsys):
    """A tiny grid through the command line: every point timed for both paths in workers,
    time ratios where PyTorch ran, the ImageNet stem above 28 pixels, a PNG beside the JSON."""
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    from cnnfast.bench import scaling

    monkeypatch.setattr(scaling, "REDUCED_GRID", {"smallcnn": (4, 28, (2, 4), (28, 32), True),
                                                  "resnet18": (2, 28, (), (32,), False)})
    monkeypatch.setattr(scaling, "_spec", lambda m, s, b: bench.ModelSpec(
        m, (1, s, s), b, 2, "imagenet" if m == "resnet18" and s > 28 else "small"))
    monkeypatch.setattr(scaling, "SIZE_SWEEP_BATCH", {"smallcnn": 2, "resnet18": 2})
    out = tmp_path / "scaling.json"
    # the reference path: no JIT compilation in the fresh workers, so the test stays short
    argv = ["--scaling", "--models", "smallcnn,resnet18", "--paths", "reference,torch",
            "--repeats", "1", "--threads", "2", "--no-progress", "--out", str(out)]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["schema"] == scaling.SCALING_SCHEMA
    points = report["points"]
    sweeps = {(p["model"], p["sweep"]) for p in points}
    assert sweeps == {("smallcnn", "batch"), ("smallcnn", "size"), ("smallcnn", "threads"),
                      ("resnet18", "size")}
    assert {p["threads"] for p in points if p["sweep"] == "threads"} == {1, 2}
    assert all(p["status"] == "ok" and p["median_s"] > 0 for p in points), points
    ref = [p for p in points if p["path"] == "reference"]
    assert all(p["time_vs_torch"] > 0 for p in ref)
    assert next(p for p in points if p["model"] == "resnet18")["stem"] == "imagenet"
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "time/torch" in capsys.readouterr().out


# --- the one timer ------------------------------------------------------------------------------

def test_benchmark_warms_up_then_times_each_repeat():
    calls, syncs = [], []
    timing = bench.benchmark(lambda: calls.append(1), repeats=3, warmup=2, inner=4,
                             sync=lambda: syncs.append(len(calls)))
    assert len(calls) == 2 + 3 * 4
    assert syncs == [2, 6, 10, 14]   # after the warm-up, then after each sample's inner calls
    assert len(timing.cpu_times) == 3 and all(s > 0 for s in timing.cpu_times)
    assert timing.gpu_times is None and timing.times == timing.cpu_times
    stats = timing.stats()
    assert stats["min_s"] <= stats["median_s"] <= stats["max_s"]
    with pytest.raises(ValueError, match="repeats"):
        bench.benchmark(lambda: None, repeats=0)
    capped = bench.benchmark(lambda: calls.append(1), repeats=50, warmup=0, max_duration=0.0,
                             min_repeats=3)   # cupyx's max_duration: stop once past it
    assert len(capped.cpu_times) == 3
    with pytest.raises(ValueError, match="events"):
        bench.benchmark(lambda: None, repeats=1, events="opencl")


def test_benchmark_times_what_it_runs():
    import time

    timing = bench.benchmark(lambda: time.sleep(0.01), repeats=2, warmup=0)
    assert all(0.009 < s < 1.0 for s in timing.cpu_times)


def test_add_ratios_pairs_rows_of_one_point():
    rows = [{"id": "a", "path": "cpu", "median_s": 2.0}, {"id": "a", "path": "torch",
                                                          "median_s": 4.0},
            {"id": "b", "path": "cpu", "median_s": 3.0}, {"id": "b", "path": "torch",
                                                          "median_s": None}]
    measuring.add_ratios(rows, lambda r: r["id"], lambda path: "torch",
                         {"median_s": "time_vs_torch"})
    assert [r.get("time_vs_torch") for r in rows] == [0.5, 1.0, None, None]


def test_worker_executor_offers_every_public_local_call():
    from cnnfast.bench.executor import LocalExecutor, WorkerExecutor

    worker = object.__new__(WorkerExecutor)   # no process: only the forwarding is looked at
    public = [n for n, v in vars(LocalExecutor).items() if callable(v) and not n.startswith("_")]
    assert "call" in public and "sample" in public
    for name in public:
        assert callable(getattr(worker, name)), name
    for name in ("_work", "_state", "cand", "no_such_call"):
        with pytest.raises(AttributeError):
            getattr(worker, name)



@pytest.mark.skipif(not dispatch.gpu_present() or dispatch.cuda_simulated(), reason="needs a GPU")
def test_benchmark_times_gpu_work_with_cuda_events():
    """On a GPU: CUDA-event times for CuPy work (and PyTorch's, where it sees the GPU), and the
    error measure on device arrays."""
    import cupy

    a = cupy.ones((2048, 2048), cupy.float32)
    timing = bench.benchmark(lambda: a @ a, repeats=3, warmup=1, events="cupy")
    assert len(timing.gpu_times) == 3 and all(t > 0 for t in timing.gpu_times)
    assert timing.times is timing.gpu_times
    assert bench.relative_error(a * 1.01, a, "l2") == pytest.approx(0.01, rel=1e-3)
    torch = sys.modules.get("torch") or pytest.importorskip("torch")
    if torch.cuda.is_available():
        t = torch.ones((2048, 2048), device="cuda")
        timing = bench.benchmark(lambda: t @ t, repeats=2, events="torch")
        assert len(timing.gpu_times) == 2 and all(s > 0 for s in timing.gpu_times)
