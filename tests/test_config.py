"""``cnnfast.config``: every environment variable read in one place, by one truthiness rule."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import cnnfast
from cnnfast import config, dispatch

PACKAGE_DIR = Path(cnnfast.__file__).resolve().parent
REPO = PACKAGE_DIR.parent


@pytest.mark.parametrize("text, expected", [
    ("1", True), ("true", True), ("Yes", True), (" ON ", True), ("2", True),
    ("0", False), ("false", False), ("No", False), ("off", False), ("00", False),
])
def test_one_truthiness_rule(monkeypatch, text, expected):
    for name in ("debug", "malloc_tune", "bench_cuda_sim", "cuda_simulated"):
        monkeypatch.setenv(config.OPTIONS[name].variable, text)
        assert config.get(name) is expected, name


@pytest.mark.parametrize("name", ["debug", "malloc_tune", "cuda_simulated", "dist_timeout",
                                  "cpu_path", "data_dir"])
def test_unset_and_empty_give_the_default(monkeypatch, name):
    option = config.OPTIONS[name]
    monkeypatch.delenv(option.variable, raising=False)
    assert config.get(name) == option.default
    monkeypatch.setenv(option.variable, "  ")
    assert config.get(name) == option.default


@pytest.mark.parametrize("name, text", [("debug", "maybe"), ("malloc_tune", "y"),
                                        ("cpu_path", "gpu"), ("dist_timeout", "-1"),
                                        ("dist_timeout", "soon"), ("fuzz_examples", "0")])
def test_a_malformed_variable_is_named(monkeypatch, name, text):
    variable = config.OPTIONS[name].variable
    monkeypatch.setenv(variable, text)
    with pytest.raises(ValueError, match=variable):
        config.get(name)


def test_typed_values(monkeypatch, tmp_path):
    monkeypatch.setenv("CNNFAST_DIST_TIMEOUT", "7.5")
    assert config.get("dist_timeout") == 7.5
    monkeypatch.setenv("CNNFAST_DATA_DIR", str(tmp_path))
    assert config.data_dir() == tmp_path
    monkeypatch.delenv("CNNFAST_DATA_DIR")
    assert config.data_dir() == Path.home() / ".medmnist"


def test_using_config_overrides_and_restores(monkeypatch):
    monkeypatch.setenv("CNNFAST_DEBUG", "0")
    with config.using_config(debug=True):
        assert config.debug() is True
        with config.using_config(debug="off"):  # spelled as in the environment
            assert config.debug() is False
        assert config.debug() is True
    assert config.debug() is False
    with pytest.raises(RuntimeError), config.using_config(debug=True):
        raise RuntimeError  # restored on an exception too
    assert config.debug() is False


def test_using_config_checks_its_arguments():
    with pytest.raises(ValueError, match="unknown cnnfast option 'debgu'"):
        with config.using_config(debgu=True):
            pass
    with pytest.raises(TypeError, match="'debug' must be a bool"):
        with config.using_config(debug=1):
            pass
    with pytest.raises(ValueError, match="NUMBA_ENABLE_CUDASIM"):  # Numba read it at import
        with config.using_config(cuda_simulated=True):
            pass
    with pytest.raises(ValueError, match="CNNFAST_CPU_PATH"):
        with config.using_config(cpu_path="gpu"):
            pass


def test_cpu_path_lives_in_the_configuration(monkeypatch):
    monkeypatch.setenv("CNNFAST_CPU_PATH", "reference")
    before = dispatch.get_cpu_path()
    with config.using_config(cpu_path="reference"):
        assert dispatch.get_cpu_path() == "reference"
        assert dispatch.path_name("cpu") == "reference"
        with dispatch.cpu_path("fast"):
            assert config.get("cpu_path") == "fast"
        assert dispatch.get_cpu_path() == "reference"
    assert dispatch.get_cpu_path() == before


# --- nobody else reads the environment ----------------------------------------------------------

def _reads_of_variables(tree: ast.AST) -> list[str]:
    """Names of CNNFAST_* / NUMBA_ENABLE_CUDASIM variables ``tree`` reads (``os.environ.get``,
    ``os.getenv``, ``os.environ[...]`` loads, ``in os.environ``), by literal name."""
    def named(node) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                node.value.startswith("CNNFAST_") or node.value == "NUMBA_ENABLE_CUDASIM"):
            return node.value
        return None

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and ast.unparse(node.func) in (
                "os.environ.get", "os.getenv", "environ.get", "getenv"):
            found.append(named(node.args[0]))
        elif (isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load)
              and ast.unparse(node.value) in ("os.environ", "environ")):
            found.append(named(node.slice))
        elif isinstance(node, ast.Compare) and any(
                ast.unparse(c) in ("os.environ", "environ") for c in node.comparators):
            found.append(named(node.left))
    return [name for name in found if name]


def test_the_scan_sees_every_kind_of_read():
    source = ("import os\nos.environ.get('CNNFAST_A')\nos.getenv('CNNFAST_B', '1')\n"
              "x = os.environ['NUMBA_ENABLE_CUDASIM']\n'CNNFAST_C' in os.environ\n"
              "os.environ['CNNFAST_D'] = '1'\nos.environ.get('HOME')\n")
    assert _reads_of_variables(ast.parse(source)) == ["CNNFAST_A", "CNNFAST_B",
                                                      "NUMBA_ENABLE_CUDASIM", "CNNFAST_C"]


def test_only_config_reads_cnnfast_variables():
    files = [*PACKAGE_DIR.rglob("*.py"), *(REPO / "tests").glob("*.py"),
             *(REPO / "benchmarks").glob("*.py")]
    reads = {str(p.relative_to(REPO)): names for p in files if p.name != "config.py"
             if (names := _reads_of_variables(ast.parse(p.read_text())))}
    assert not reads, f"read these variables through cnnfast.config instead: {reads}"


def test_every_variable_is_documented():
    for option in config.OPTIONS.values():
        assert option.variable in config.__doc__, option.variable
