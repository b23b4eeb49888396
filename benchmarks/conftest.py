"""Shared setup of the pytest-benchmark suites (``pytest benchmarks/``; see README.md).

Every benchmark is parametrised over the paths (reference, cpu, cuda, torch, cudnn) and over the
items of ``cnnfast.bench`` (the same shapes and models as ``python -m cnnfast.bench``). A path
that is not available here is skipped; the reference path runs on small shapes only. Before a
candidate is timed, its result is checked against the reference (``cnnfast.bench.checked_op`` /
``checked_step``): a wrong result fails the test instead of producing a number.

Options (after ``pytest benchmarks/``):
  --bench-sets r18-28,r18-64,r18-3d   shape sets (``tiny`` too); default all but tiny
  --bench-paths reference,cpu,torch    paths; default all
  --bench-models smallcnn,resnet18     models of bench_train_step.py; default all three
  --bench-reference-all                time the reference path everywhere
Set CNNFAST_BENCH_CUDA_SIM=1 to run the cuda path in Numba's CUDA simulator (tiny shapes only;
use with --bench-sets tiny).
"""

from __future__ import annotations

import os

from cnnfast import config as cnnfast_config  # "config" is pytest's config here

if cnnfast_config.get("bench_cuda_sim"):
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"   # before anything imports Numba (cnnfast does not)

import pytest  # noqa: E402

from cnnfast import bench  # noqa: E402

DEFAULT_SETS = ("r18-28", "r18-64", "r18-3d")


def pytest_addoption(parser):
    group = parser.getgroup("cnnfast bench")
    group.addoption("--bench-sets", default=",".join(DEFAULT_SETS),
                    help=f"comma list of shape sets ({', '.join(bench.SETS)})")
    group.addoption("--bench-paths", default=",".join(bench.PATHS),
                    help=f"comma list of paths ({', '.join(bench.PATHS)})")
    group.addoption("--bench-models", default=",".join(bench.MODELS),
                    help=f"comma list of models ({', '.join(bench.MODELS)})")
    group.addoption("--bench-reference-all", action="store_true",
                    help="time the reference path on every shape and model")


def _split(config, name: str, allowed) -> list[str]:
    values = [v.strip() for v in config.getoption(name).split(",") if v.strip()]
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise pytest.UsageError(f"{name}: unknown {unknown} (choose from {', '.join(allowed)})")
    return values


def pytest_configure(config):
    threads = bench.machine_threads()
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass
    config._cnnfast_threads = threads


def pytest_report_header(config):
    return (f"cnnfast bench: {bench.cpu_model()}, {config._cnnfast_threads} threads for "
            f"PyTorch; sets {config.getoption('--bench-sets')}")


def pytest_generate_tests(metafunc):
    config = metafunc.config
    if "path" in metafunc.fixturenames:
        paths = _split(config, "--bench-paths", bench.PATHS)
        metafunc.parametrize("path", paths)
    if "op_item" in metafunc.fixturenames:
        sets = _split(config, "--bench-sets", bench.SETS)
        shape_ids = [i for i, s in bench.all_shape_ids().items() if s in sets]
        items = bench.op_items(metafunc.module.OPS, shape_ids)
        metafunc.parametrize("op_item", items, ids=[i.id for i in items])
    if "model_spec" in metafunc.fixturenames:
        models = _split(config, "--bench-models", bench.MODELS)
        specs = [bench.MODEL_SPECS[m] for m in models]
        metafunc.parametrize("model_spec", specs, ids=models)


_candidates: dict[str, bench.Candidate] = {}


@pytest.fixture
def candidate(path):
    """The path's candidate, skipped when this machine cannot run it."""
    if path not in _candidates:
        _candidates[path] = bench.make_candidates(bench.Options(
            paths=(path,), cuda_sim=cnnfast_config.cuda_simulated()))[0]
    cand = _candidates[path]
    reason = cand.unavailable()
    if reason:
        pytest.skip(f"{path}: {reason}")
    return cand


def skip_unless_runs(request, cand, item) -> None:
    """Skip when ``cand`` cannot run ``item``, or when it is the reference on a big item."""
    reason = cand.unavailable_for(item)
    if reason:
        pytest.skip(reason)
    everywhere = request.config.getoption("--bench-reference-all")
    if cand.name == "reference" and not bench.reference_timed(item, everywhere):
        pytest.skip("reference is timed on small shapes only (--bench-reference-all)")


@pytest.fixture
def runs(request):
    return lambda cand, item: skip_unless_runs(request, cand, item)
