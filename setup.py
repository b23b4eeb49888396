"""Build configuration that pyproject.toml cannot express: the top-level ``kernels/`` folder
(CUDA C sources) ships inside the wheel as the data-only package ``cnnfast.kernels``, through a
package-dir mapping; ``cnnfast.cuda._mma.kernels_dir()`` finds it there. Everything else is in
pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["cnnfast", "cnnfast.*"]) + ["cnnfast.kernels"],
    package_dir={"cnnfast.kernels": "kernels"},
    package_data={"cnnfast.kernels": ["*.cu", "*.cuh", "README.md"]},
)
