"""``cnnfast doctor``: the environment report (no GPU needed) and ``--compile``, which compiles
every CUDA kernel variant with the real compiler (NVVM and ptxas from wheels) and fails on a
compile error or a spill."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cnnfast import cli, doctor


def test_doctor_reports_this_machine(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    for item in ("python", "numpy", "numba", "numba-cuda", "cupy", "blas", "nvidia driver",
                 "gpu", "cpu path", "fma ceiling", "sgemm", "numba cache"):
        assert any(line.startswith(item + " ") for line in out.splitlines()), item
    assert "advice:" in out or "no problems found" in out


def test_doctor_cpu_rates_measure_the_ceiling_and_both_products():
    from cnnfast.cpu import machine_rates

    rates = machine_rates(seconds=0.01, repeats=1)
    for key in ("fma_1", "fma_all", "blas_1", "blas_all", "own_1"):
        assert np.isfinite(rates[key]) and rates[key] > 0, key
    fma, sgemm = doctor.cpu_rate_rows(dict(rates, fma_1=200.0, own_1=150.0, blas_1=100.0))
    assert fma[0] == "fma ceiling" and "200 GFLOP/s on 1 thread" in fma[1]
    assert sgemm[0] == "sgemm" and "BLAS 100 GFLOP/s on 1 thread (50% of the ceiling)" in sgemm[1]
    assert "cnnfast 150 on 1 thread (75%" in sgemm[1]


@pytest.mark.parametrize("driver, cupy, expected", [
    ((None, "nvidia-smi not runnable (FileNotFoundError)"), [], "no NVIDIA driver visible"),
    (("580.1", "13.0"), [], "pip install 'cnnfast[cuda13]'"),
    (("550.1", "12.4"), [], "pip install 'cnnfast[cuda12]'"),
    (("550.1", "12.4"), ["cupy-cuda13x"], "needs a newer driver"),
    (("470.1", "11.4"), [], "update the NVIDIA driver"),
])
def test_doctor_advice_names_the_fix(monkeypatch, driver, cupy, expected):
    monkeypatch.setattr(doctor, "_driver_cuda_version", lambda: driver)
    monkeypatch.setattr(doctor, "_gpus", lambda: ([], "CuPy sees no CUDA device"))
    real_version = doctor._version
    monkeypatch.setattr(doctor, "_version", lambda d: "14.0" if d in cupy else (
        None if d.startswith("cupy") else real_version(d)))
    _, advice = doctor.environment()
    assert any(expected in line for line in advice), advice


@pytest.mark.parametrize("numba_cuda, numpy, conflict", [
    ("0.30.4", "2.5.2", True),      # the H200 image of 2026-12-04: the first compile failed
    ("0.30.4", "2.5.0rc1", True),
    ("0.30.4", "2.4.6", False),     # what pip resolves with cnnfast's extras
    ("0.31.0", "2.5.2", False),
    ("0.30.4", "3.0.0+local", True),
])
def test_doctor_names_the_numpy_numba_cuda_conflict(numba_cuda, numpy, conflict):
    advice = doctor.numpy_conflict(numba_cuda, numpy)
    assert (advice is not None) == conflict
    if conflict:
        assert "numpy<2.5" in advice and numpy in advice and numba_cuda in advice


def test_doctor_flags_belong_to_compile(capsys):
    with pytest.raises(SystemExit):
        cli.main(["doctor", "--json", "x.json"])
    with pytest.raises((SystemExit, argparse.ArgumentError)):
        cli.main(["doctor", "--compile", "--arch", "sm_75"])


def test_theoretical_occupancy():
    # 122 registers x 256 threads: 4 warps per 16K-register sub-partition, 2 blocks, 25%
    assert doctor.occupancy("sm_90", 122, 8320, 256) == (2, 0.25)
    assert doctor.occupancy("sm_80", 32, 0, 256) == (8, 1.0)
    assert doctor.occupancy("sm_90", 40, 0, 32) == (32, 0.5)  # the 32-blocks-per-SM limit
    # shared memory bound: 100 KB a block leaves room for 2 on sm_90, 1 on sm_80
    assert doctor.occupancy("sm_90", 32, 100_000, 128)[0] == 2
    assert doctor.occupancy("sm_80", 32, 100_000, 128)[0] == 1


def _compiler_ready() -> bool:
    code = ("from cnnfast import doctor; import numba.cuda.cudadrv.nvvm as n; "
            "assert doctor.find_ptxas(); n.NVVM()")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    return subprocess.run([sys.executable, "-c", code], env=env,
                          capture_output=True).returncode == 0


def test_every_kernel_compiles_for_real_without_spills(tmp_path):
    """Numba -> NVVM -> PTX -> ptxas for sm_80 and sm_90, in a process without the simulator
    (this one runs under it); the launches of a simulated training step are all among them."""
    if not _compiler_ready():
        pytest.skip("NVVM or ptxas missing: pip install 'numba-cuda[cu13]' nvidia-cuda-nvcc "
                    "(the test extra brings them)")
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    result = subprocess.run([sys.executable, "-m", "cnnfast", "doctor", "--compile", "--json",
                             str(out)], env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    assert not [r for r in rows if r["error"]]
    assert not [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    kernels = {r["kernel"] for r in rows}
    for family in ("conv_forward_kernel", "conv_backward_data_kernel",
                   "conv_backward_weight_kernel", "channel_partials_kernel",
                   "channel_map_kernel", "optimizer_update_kernel", "max_pool_forward_kernel"):
        assert family in kernels
    conv = [r for r in rows if r["kernel"] == "conv_forward_kernel" and "64x64x16" in r["variant"]
            and "float32" in r["variant"]]
    assert conv and all(r["threads"] == 256 and r["registers"] > 32 for r in conv)
    # the tensor-core kernels, linked with kernels/mma.cu by nvJitLink, and mma.cu on its own
    for family in ("conv_forward_kernel", "conv_backward_data_kernel",
                   "conv_backward_weight_kernel"):
        for precision in ("tf32", "bf16"):
            linked = [r for r in rows if r["kernel"] == family and f"w4x2 {precision}" in
                      r["variant"] and "128x64x16" in r["variant"]]
            assert {r["arch"] for r in linked} == {"sm_80", "sm_90"}, (family, precision)
            assert all(r["threads"] == 256 and r["registers"] > 32 for r in linked)
    wrappers = {(r["kernel"], r["arch"]) for r in rows if "kernels/mma.cu" in r["variant"]}
    assert wrappers == {(f, a) for f in ("cnnfast_mma_tf32_m16n8k8", "cnnfast_mma_bf16_m16n8k16")
                        for a in ("sm_80", "sm_90")}

    # every launch of a simulated SmallCNN training step is a compiled variant
    import cnnfast
    from cnnfast import functional as F
    from cnnfast import models, optim
    from cnnfast.cuda import _runtime as rt

    model = models.SmallCNN(seed=0).to("cuda")
    opt = optim.Adam(model.parameters())
    x = cnnfast.tensor(np.random.default_rng(0).standard_normal((2, 1, 4, 4)).astype(np.float32),
                       device="cuda")
    with rt.count_launches() as records:
        F.cross_entropy(model(x), cnnfast.tensor(np.array([0, 1]), device="cuda")).backward()
        opt.step()
    compiled = {r["key"] for r in rows}
    for r in records:
        assert doctor.variant_key(r) in compiled, r


def test_gpu_check_script_runs_in_the_simulator(tmp_path):
    """benchmarks/gpu_check.sh --sim: the GPU acceptance script's logic on tiny shapes."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_check.sh"), "--sim",
                             str(tmp_path)], env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "summary.json").read_text())
    assert report["verdict"] == "pass" and report["sim"]
    assert {n: s["rc"] for n, s in report["steps"].items()} == {
        "doctor": 0, "suite": 0, "ops": 0, "step": 0, "memcheck": 77, "racecheck": 77,
        "bench": 0, "tc": 0}
    ops = report["ops"]["rows"]
    assert len(ops) > 30 and all(r["ok"] for r in ops)
    assert {"conv_backward_weight", "batch_norm_relu_forward_train", "max_pool_backward"} <= {
        r["op"] for r in ops}
    (step,) = report["bench"]["steps"]
    assert step["launches"] <= 36 and step["kernel_arguments"] <= 250
    assert (tmp_path / "gpu_check.log").read_text().count("=== ") >= 14
    tc = report["tc_check"]
    assert tc["verdict"] == "pass" and len(tc["checks"]) >= 27 and all(
        r["ok"] for r in tc["checks"])
    assert {(r["kernel"], r["pass"]) for r in tc["checks"]} == {
        (k, p) for k in ("fp32", "tf32", "bf16")
        for p in ("forward", "backward_data", "backward_weight")}
    assert any(r["shape"].startswith("tiny3d") for r in tc["checks"]) and tc["bench"]
