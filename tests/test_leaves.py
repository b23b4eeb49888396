"""The leaf helpers: ``cnnfast._io.atomic_write``, ``cnnfast.shapes``, ``cnnfast.backend``."""

from __future__ import annotations

import itertools
import os
import stat

import numpy as np
import pytest

from cnnfast import backend, dispatch, shapes
from cnnfast._io import atomic_write

# --- atomic_write --------------------------------------------------------------------------------


def test_atomic_write_writes_binary_and_text(tmp_path):
    with atomic_write(tmp_path / "a.bin") as f:
        f.write(b"\x00\x01")
    with atomic_write(tmp_path / "b.txt", "w") as f:
        f.write("héllo\n")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt"]


def test_atomic_write_failure_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_write(target, "w") as f:
        f.write("half of the new")
        assert os.path.dirname(f.name) == str(tmp_path)  # the temporary is beside the target
        assert os.path.exists(f.name)
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_atomic_write_replaces_and_block_can_read_back(tmp_path):
    target = tmp_path / "data.part-test"
    target.write_bytes(b"old")
    with atomic_write(target, suffix=".part") as f:
        f.write(b"new bytes")
        f.flush()
        assert f.name.endswith(".part")
        with open(f.name, "rb") as back:  # e.g. a checksum check before the rename
            assert back.read() == b"new bytes"
    assert target.read_bytes() == b"new bytes"


def test_atomic_write_gives_plain_open_permissions(tmp_path):
    with atomic_write(tmp_path / "ours") as f:
        f.write(b"x")
    with open(tmp_path / "plain", "wb") as f:
        f.write(b"x")
    mode = stat.S_IMODE(os.stat(tmp_path / "ours").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)


def test_atomic_write_refuses_other_modes(tmp_path):
    with pytest.raises(ValueError, match="mode must be 'wb' or 'w', got 'a'"):
        with atomic_write(tmp_path / "x", "a"):
            pass
    assert not list(tmp_path.iterdir())


# --- shapes --------------------------------------------------------------------------------------


def test_lift3():
    assert shapes.lift3((5, 6), 1) == (1, 5, 6)
    assert shapes.lift3((2, 3), 0) == (0, 2, 3)
    assert shapes.lift3((4, 5, 6), 1) == (4, 5, 6)
    with pytest.raises(ValueError, match="1 to 3 spatial values"):
        shapes.lift3((1, 2, 3, 4), 1)


def test_output_size_formula_and_lifted_form():
    # (7 + 2*1 - 2*(3-1) - 1) // 2 + 1 = 3 ; (6 - 3) // 1 + 1 = 4
    assert shapes.output_size((7, 6), (3, 3), (2, 1), (1, 0), (2, 1)) == (3, 4)
    lifted = [shapes.lift3(t, f) for t, f in (((7, 6), 1), ((3, 3), 1), ((2, 1), 1),
                                                 ((1, 0), 0), ((2, 1), 1))]
    assert shapes.output_size(*lifted) == (1, 3, 4)
    assert shapes.output_size((5,), (2,), (2,), (0,)) == (2,)  # dilation defaults to 1


@pytest.mark.torch
def test_output_length_matches_torch_floor_and_ceil_mode():
    torch = pytest.importorskip("torch")
    grid = itertools.product(range(1, 10), range(1, 5), range(1, 4), range(0, 3), range(1, 3))
    checked = 0
    for size, kernel, stride, padding, dilation in grid:
        if padding > kernel // 2 or size + 2 * padding < dilation * (kernel - 1) + 1:
            continue  # PyTorch refuses these
        x = torch.zeros(1, 1, size)
        for ceil_mode in (False, True):
            want = torch.nn.functional.max_pool1d(x, kernel, stride, padding, dilation,
                                                  ceil_mode=ceil_mode).shape[-1]
            got = shapes.output_length(size, kernel, stride, padding, dilation, ceil_mode)
            assert got == want, (size, kernel, stride, padding, dilation, ceil_mode)
            checked += 1
    assert checked > 300


def test_output_length_ceil_mode_drops_a_window_starting_in_right_padding():
    # S=5, K=2, stride 2, P=1: ceil((5 + 2 - 2) / 2) + 1 = 4 windows would start at 0, 2, 4, 6;
    # 6 >= S + P = 6 starts in the right padding, so PyTorch keeps 3.
    assert shapes.output_length(5, 2, 2, 1, ceil_mode=True) == 3
    assert shapes.output_length(5, 2, 2, 0, ceil_mode=True) == 3  # starts 0, 2, 4
    assert shapes.output_length(5, 2, 2, 0) == 2


# --- backend ------------------------------------------------------------------------------------


def test_backend_on_numpy_arrays():
    a = np.arange(3.0)
    assert not backend.is_cupy_array(a)
    assert backend.array_xp(a) is np
    assert backend.device_xp("cpu") is np
    assert backend.to_device(a, "cpu") is a
    assert isinstance(backend.to_device([1, 2], "cpu"), np.ndarray)
    np.testing.assert_array_equal(backend.to_numpy([1, 2]), [1, 2])


def test_backend_to_numpy_of_a_tensor():
    import cnnfast

    t = cnnfast.tensor(np.ones((2, 2), dtype=np.float32))
    out = backend.to_numpy(t)
    assert isinstance(out, np.ndarray) and out.shape == (2, 2)


def test_backend_fake_cupy_array_is_recognised_by_module():
    fake = type("ndarray", (), {"__module__": "cupy._core.core"})()
    assert backend.is_cupy_array(fake)


def test_dispatch_reexports_the_backend_helpers():
    for name in ("is_cupy_array", "array_xp", "to_device", "gpu_present", "cuda_available",
                 "cuda_simulated", "device_xp", "require_cuda"):
        assert getattr(dispatch, name) is getattr(backend, name)
