"""The package's import arrows point one way: Face (``oba_fx.api``, ``oba_fx.cli``, the package
``__init__``) -> Passes (``oba_fx.passes``, the ``passes/`` folder) -> Algorithms (every other
module of ``oba_fx``); no module imports one of a higher layer, and module-level imports have no
cycle. Imports are read from the source (``ast``), so a lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
FACE = {"oba_fx", "oba_fx.api", "oba_fx.cli", "oba_fx.__main__"}


def _modules() -> dict[str, Path]:
    out = {}
    for base, prefix in ((ROOT / "oba_fx", "oba_fx"), (ROOT / "passes", "oba_fx.passes")):
        for p in base.rglob("*.py"):
            if "passes" in p.relative_to(base).parts[:1] and base.name == "oba_fx":
                continue  # a local link to passes/ in a work tree
            parts = list(p.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = p
    return out


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """``(imported oba_fx module, at module level)`` for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    type_only = {id(n) for b in tree.body if isinstance(b, ast.If) and "TYPE_CHECKING" in ast.dump(b.test)
                 for n in ast.walk(b)}
    found = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, path.name == "__init__.py", node)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for n in names:
            while n and n not in known:
                n = n.rpartition(".")[0]
            if n and n != module:
                found.append((n, id(node) in top))
    return found


def _layer(module: str) -> int:
    if module in FACE:
        return 2
    if module == "oba_fx.passes" or module.startswith("oba_fx.passes."):
        return 1
    return 0


def test_no_module_imports_a_higher_layer():
    mods = _modules()
    known = set(mods)
    upward = [(m, n) for m, p in mods.items() for n, _ in _imports(m, p, known)
              if _layer(n) > _layer(m) and not (m.startswith(n + ".") and n == "oba_fx")]
    assert not upward, f"upward imports (algorithms -> passes/face, passes -> face): {upward}"


def test_module_level_imports_have_no_cycle():
    mods = _modules()
    known = set(mods)
    G = nx.DiGraph()
    for m, p in mods.items():
        for n, top in _imports(m, p, known):
            if top and not m.startswith(n + "."):  # a submodule importing its own package's __init__
                G.add_edge(m, n)
    cycles = list(nx.simple_cycles(G))
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_the_layering_test_sees_the_modules():
    mods = _modules()
    assert {"oba_fx.api", "oba_fx.passes.pipeline", "oba_fx.coupling", "oba_fx.ops.base"} <= set(mods)
    imports = {n for n, _ in _imports("oba_fx.passes.pipeline", mods["oba_fx.passes.pipeline"], set(mods))}
    assert {"oba_fx.passes.select", "oba_fx.masking"} <= imports


def test_importing_a_pass_does_not_import_the_face():
    code = "import oba_fx.passes.coupling, sys; assert 'oba_fx.api' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
