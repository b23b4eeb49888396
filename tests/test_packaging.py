"""The wheel ships the top-level kernels/ (CUDA C sources) as cnnfast/kernels: built from a copy
of the source tree, installed (not editable) into a folder of its own, and imported from
there in a fresh interpreter, cnnfast finds mma.cu inside the installed package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _setuptools_new_enough() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 77


def test_installed_wheel_holds_the_cuda_sources(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    for folder in ("cnnfast", "kernels"):
        shutil.copytree(REPO / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # the build requirement (setuptools>=77) from this environment when it has it, else pip's
    # isolated build environment (CI's fresh venv, with the package index at hand)
    flags = ["--no-build-isolation"] if _setuptools_new_enough() else []
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", *flags,
                            str(src), "-w", str(tmp_path / "dist")],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("cnnfast-*.whl")
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q",
                              "--target", str(site), str(wheel)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]

    code = ("import cnnfast, cnnfast.cuda._mma as m; print(cnnfast.__file__); "
            "print(m.source('mma.cu')); print(m.kernels_dir() / 'README.md')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)  # the installed copy only: not this checkout
    found = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert found.returncode == 0, found.stderr[-2000:]
    package, mma, readme = (Path(line) for line in found.stdout.split())
    assert package.is_relative_to(site)
    assert mma == site / "cnnfast" / "kernels" / "mma.cu"
    assert mma.read_bytes() == (REPO / "kernels" / "mma.cu").read_bytes()
    assert readme.read_text() == (REPO / "kernels" / "README.md").read_text()
