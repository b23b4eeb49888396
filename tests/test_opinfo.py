"""PyTorch's own OpInfo samples (``op_db``) through cnnfast: forward and every input gradient
against PyTorch, float64 and float32, on the reference and fast CPU paths, and a derandomised
subset on ``cuda`` (the simulator without a GPU). Pinned to the torch of the test extra.

Every sample passes, or is listed in :data:`SKIPS` with the reason, and then cnnfast must refuse
it with a ValueError/TypeError whose message names the argument (a listed sample that starts to
pass fails too, so the table stays true). The machinery is in tests/opinfo_harness.py;
``python tests/opinfo_harness.py`` prints the counts per op (``CNNFAST_OPINFO_FULL=1``: every
sample of the largest grids, which are sub-sampled here to keep CI short).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("expecttest")  # torch.testing._internal needs it

import opinfo_harness as H  # noqa: E402

# PyTorch's own note on its 'same' padding of even kernels (a copy of the input)
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")

# op id -> [(what the samples have, a word cnnfast's error must contain, the reason)]
SKIPS = {
    "batch_norm": [(lambda s: s.input.ndim == 1, "input must be 2-D",
                    "a 1-D input (0,) has no channel axis; cnnfast takes (N, C, ...)")],
}
SKIPS["batch_norm.without_cudnn"] = SKIPS["batch_norm"]

CUDA_SAMPLES_PER_OP = 2  # the simulator runs one Python thread per CUDA thread: keep it small


def _listed(op_id: str, sample):
    for matches, word, reason in SKIPS.get(op_id, ()):
        if matches(sample):
            return word, reason
    return None


def _check(key, found, dtype, path):
    op_id = H.key_id(key)
    problems = []
    for sample in found:
        outcome = H.run_sample(key, sample, dtype, path)
        listed = _listed(op_id, sample)
        where = f"{op_id} {H.sample_id(sample)}"
        if listed is None:
            if outcome.status != "passed":
                problems.append(f"{where}: {outcome.status}: {outcome.message}")
        elif outcome.status == "passed":
            problems.append(f"{where}: passes now; remove it from SKIPS ({listed[1]})")
        elif outcome.status != "unsupported" or listed[0] not in outcome.message:
            problems.append(f"{where}: listed as unsupported ({listed[1]}) but got "
                            f"{outcome.status}: {outcome.message}")
    assert not problems, f"{len(problems)} of {len(found)} samples:\n" + "\n".join(problems)


KEYS = sorted(H.COUNTERPARTS)
IDS = [H.key_id(k) for k in KEYS]


@pytest.mark.torch
@pytest.mark.parametrize("path", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("key", KEYS, ids=IDS)
def test_opinfo_samples_on_the_cpu_paths(key, dtype, path):
    _check(key, H.samples(key, dtype), dtype, path)


@pytest.mark.torch
@pytest.mark.parametrize("key", KEYS, ids=IDS)
def test_opinfo_samples_on_cuda(key):
    """A derandomised subset (by a hash of each sample's description), float32."""
    _check(key, H.derandomised_subset(key, np.float32, CUDA_SAMPLES_PER_OP), np.float32, "cuda")


def test_every_skip_reason_names_an_op_we_run():
    assert set(SKIPS) <= set(IDS)
