"""Architecture: the layer rules of DESIGN.md, checked on the import graph of cnnfast.

The graph counts every ``import`` of a cnnfast module: at module level, inside a function (a lazy
import still makes two modules depend on each other) and under ``if TYPE_CHECKING:`` (an import
for annotations is a dependency a reader follows just the same). The rules:

1. no import cycle;
2. the kernels (``reference/``, ``cpu/``, ``cuda/``) import only the leaves and their own package;
3. the core (``tensor``, ``functional``, ``nn``, ``optim`` and what they are built from) never
   imports the workflow, the CLI or the bench, and reaches kernels only through ``dispatch``;
4. ``bench`` imports only the public API, ``dispatch`` and the leaves;
5. no ``_private`` name is imported across modules (a package's private modules are its own);
6. the leaves import only leaves.

Each rule is a function from the graph (or the import records) to its violations, and each is
tested on a planted violation. A module's size is a warning, not a rule: cut a module where the
ideas part, not where a counter runs out.
"""

from __future__ import annotations

import ast
import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "cnnfast"
LONG_MODULE = 700   # lines: a module longer than this gets a warning

KERNEL_PACKAGES = ("cnnfast.reference", "cnnfast.cpu", "cnnfast.cuda")
LEAVES = {"cnnfast.backend", "cnnfast.shapes", "cnnfast.config", "cnnfast._io", "cnnfast.dataset",
          "cnnfast._version"}
# The autograd core and the public ops, and the modules they are built from.
# A new module of the core goes here; one of the workflow must not be reached from it.
CORE = {"cnnfast.tensor", "cnnfast.autograd", "cnnfast.ops", "cnnfast.dlpack",
        "cnnfast.functional", "cnnfast.nn", "cnnfast.optim", "cnnfast.rng", "cnnfast.dispatch"}
CLI_AND_BENCH = ("cnnfast.cli", "cnnfast.bench")
# What bench may use besides itself: the public API (the package and what it documents), the
# one dispatch point, the leaves, and the cpu package's allocator setting (tune_malloc).
PUBLIC_API = {"cnnfast", "cnnfast.tensor", "cnnfast.functional", "cnnfast.nn", "cnnfast.optim",
              "cnnfast.models", "cnnfast.dispatch", "cnnfast.cpu"}
# The one module allowed into other packages' private modules: ``cnnfast doctor`` reports the
# kernels' internals (Numba's threads, the FMA ceiling, every CUDA kernel variant it compiles),
# as DESIGN.md places it. Private names (functions, classes) stay off limits to it too.
PRIVATE_READERS = {"cnnfast.doctor": KERNEL_PACKAGES}


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


@dataclass(frozen=True)
class Import:
    importer: str
    module: str          # the cnnfast module imported (or whose name is imported)
    name: str | None     # the name taken from it (``from module import name``), or None
    line: int


def imports_of(name: str, source: str, modules, is_package: bool = False) -> list[Import]:
    """Every import of a cnnfast module in ``source`` (module ``name``), wherever it stands:
    module level, in a function, under ``if TYPE_CHECKING:``. ``from pkg import mod`` counts as
    an import of ``pkg.mod`` when that is a module."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [Import(name, alias.name, None, node.lineno) for alias in node.names
                      if alias.name in modules]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = name.split(".")
                package = package if is_package else package[:-1]
                package = package[:len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in modules:
                    found.append(Import(name, full, None, node.lineno))
                elif base in modules:
                    found.append(Import(name, base, alias.name, node.lineno))
    return [i for i in found if i.module != name]


@functools.lru_cache(maxsize=1)
def _all_imports() -> tuple[Import, ...]:
    modules = _modules()
    return tuple(i for name, path in modules.items()
                 for i in imports_of(name, path.read_text(), modules, path.name == "__init__.py"))


def all_imports() -> list[Import]:
    return list(_all_imports())


def import_graph(imports: list[Import] | None = None) -> dict[str, set[str]]:
    """module -> the cnnfast modules it imports."""
    graph: dict[str, set[str]] = {name: set() for name in _modules()}
    for i in all_imports() if imports is None else imports:
        graph.setdefault(i.importer, set()).add(i.module)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


# --- the rules: each returns its violations, one line each ------------------------------------

def cycle_violations(graph) -> list[str]:
    """No import cycle."""
    return [" <-> ".join(c) for c in import_cycles(graph)]


def kernel_violations(graph) -> list[str]:
    """Kernels import only the leaves and their own package."""
    out = []
    for module, targets in graph.items():
        own = next((p for p in KERNEL_PACKAGES if _within(module, p)), None)
        if own is None:
            continue
        out += [f"{module} -> {t}" for t in sorted(targets)
                if not (_within(t, own) or t in LEAVES)]
    return out


def _in_core(module: str) -> bool:
    return any(_within(module, c) for c in CORE)


def core_violations(graph) -> list[str]:
    """The core imports only the core (CORE: add a new core module there) and the leaves: no
    workflow module, no CLI, no bench, and kernels only through dispatch (which alone loads the
    kernel packages, by name)."""
    out = []
    for module, targets in graph.items():
        if _in_core(module):
            out += [f"{module} -> {t}" for t in sorted(targets)
                    if not (_in_core(t) or t in LEAVES)]
    return out


def bench_violations(graph) -> list[str]:
    """bench imports only itself, the public API, dispatch and the leaves."""
    out = []
    for module, targets in graph.items():
        if _within(module, "cnnfast.bench"):
            out += [f"{module} -> {t}" for t in sorted(targets)
                    if not (_within(t, "cnnfast.bench") or t in PUBLIC_API or t in LEAVES)]
    return out


def leaf_violations(graph) -> list[str]:
    """The leaves import only leaves."""
    return [f"{module} -> {t}" for module in sorted(LEAVES) for t in sorted(graph.get(module, ()))
            if t not in LEAVES]


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_violations(imports: list[Import]) -> list[str]:
    """``_private`` names imported across modules: a private function, class or constant of
    another module, or a private module of a package the importer is not part of (the private
    modules of a package, such as ``cnnfast.cuda._runtime``, are for that package's modules)."""
    out = []
    for i in imports:
        if i.name is not None and _private(i.name):
            out.append(f"{i.importer}:{i.line} imports {i.name} from {i.module}")
            continue
        parts = i.module.split(".")
        if any(_within(i.module, p) for p in PRIVATE_READERS.get(i.importer, ())):
            continue
        if any(_private(part) and not _within(i.importer, ".".join(parts[:depth]))
               for depth, part in enumerate(parts) if depth):
            out.append(f"{i.importer}:{i.line} imports private module {i.module}")
    return out


RULES = {"cycles": cycle_violations, "kernels": kernel_violations, "core": core_violations,
         "bench": bench_violations, "leaves": leaf_violations}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_layer_rule_holds(rule):
    violations = RULES[rule](import_graph())
    assert not violations, f"layer rule '{rule}' broken ({RULES[rule].__doc__.strip()}):\n" + (
        "\n".join(violations))


def test_no_private_name_is_imported_across_modules():
    violations = private_violations(all_imports())
    assert not violations, "private names imported across modules:\n" + "\n".join(violations)


# --- each rule fails on a planted violation -------------------------------------------------

PLANTED = {
    "cycles": ("cnnfast.backend", "cnnfast.dispatch"),      # dispatch -> backend -> dispatch
    "kernels": ("cnnfast.cpu.conv", "cnnfast.tensor"),      # a kernel that sees a Tensor
    "core": ("cnnfast.nn.module", "cnnfast.train"),         # the core reaching the workflow
    "bench": ("cnnfast.bench.runner", "cnnfast.train"),     # bench past the public API
    "leaves": ("cnnfast.config", "cnnfast.dispatch"),       # a leaf that is not one
}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_each_rule_fails_on_a_planted_violation(rule):
    graph = {m: set(t) for m, t in import_graph().items()}
    importer, target = PLANTED[rule]
    assert importer in graph and target in graph, "the planted modules must exist"
    graph[importer].add(target)
    violations = RULES[rule](graph)
    assert any(importer in v and target in v for v in violations), violations


def test_core_rule_sends_kernels_through_dispatch():
    graph = {m: set(t) for m, t in import_graph().items()}
    graph["cnnfast.optim"].add("cnnfast.cuda.optim")
    assert core_violations(graph) == ["cnnfast.optim -> cnnfast.cuda.optim"]


def test_private_rule_fails_on_planted_imports():
    modules = set(_modules())
    planted = ("from cnnfast.cpu.conv import _planted_helper\n"
               "import cnnfast.cuda._runtime\n"
               "def lazy():\n    from cnnfast.cuda import _runtime as rt\n")
    found = private_violations(imports_of("cnnfast.train", planted, modules))
    assert len(found) == 3, found
    assert "_planted_helper" in found[0] and "cnnfast.cuda._runtime" in found[1]
    # a package's private modules are its own; dunder names are not private
    own = "from cnnfast.cuda import _runtime as rt\nfrom cnnfast._version import __version__\n"
    assert private_violations(imports_of("cnnfast.cuda.conv", own, modules)) == []
    # doctor may read the kernels' private modules, not private names, nor other packages'
    doctor = ("from cnnfast.cuda import _variants\nfrom cnnfast.cpu._parallel import _lock\n"
              "from cnnfast.bench import measuring\nfrom cnnfast.nn.layers import _BatchNorm\n")
    found = private_violations(imports_of("cnnfast.doctor", doctor, modules))
    assert len(found) == 2 and "_lock" in found[0] and "_BatchNorm" in found[1], found


def test_graph_counts_lazy_relative_and_type_checking_imports():
    modules = set(_modules())
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import cnnfast.train\n"
              "def f():\n    from cnnfast import metrics\n    from . import shapes\n")
    found = {i.module for i in imports_of("cnnfast.data", source, modules)}
    assert found == {"cnnfast.train", "cnnfast.metrics", "cnnfast.shapes"}
    graph = import_graph()
    assert "cnnfast.backend" in graph["cnnfast.dispatch"]


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert import_cycles(graph) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("leaf", ["cnnfast.dataset", "cnnfast._io", "cnnfast.shapes",
                                  "cnnfast.config"])
def test_bottom_leaves_import_no_cnnfast_module(leaf):
    assert import_graph()[leaf] == set()


def test_long_modules_are_a_warning_not_a_failure():
    long = {name: n for name, path in _modules().items()
            if (n := len(path.read_text().splitlines())) > LONG_MODULE}
    for name, n in long.items():
        warnings.warn(f"{name} has {n} lines: does it hold more than one idea?", stacklevel=1)
