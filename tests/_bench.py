"""Load a script from ``benchmarks/`` as a module, so tests can check its pure helpers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(filename: str) -> ModuleType:
    """Execute ``benchmarks/<filename>`` as module ``oba_bench_<stem>``; ``benchmarks/`` is on
    ``sys.path`` only while it runs (for its ``_common`` / sibling imports)."""
    spec = importlib.util.spec_from_file_location(f"oba_bench_{Path(filename).stem}", BENCH / filename)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod
