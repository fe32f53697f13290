"""Helpers the pictures share: module paths of FX nodes, stages, matplotlib set-up.

A *stage* is a module prefix that splits a network into a few readable parts: the prefix that
holds more than half of the names is expanded one level, again and again (``features`` of a
MobileNetV2 becomes ``features.0`` ... ``features.18``; ``encoder`` of a ViT becomes its
``encoder.layers.encoder_layer_k``).

Example:
    >>> names = ["conv1", "layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.1.conv1", "fc"]
    >>> stage_map(names)["layer2.1.conv1"]
    'layer2'
    >>> sorted(set(stage_map(["features.0.0", "features.1.conv.0", "features.2.conv.0", "classifier.1"]).values()))
    ['classifier', 'features.0', 'features.1', 'features.2']
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Iterable

import torch.fx
from oba_fx.errors import BadInputError

log = logging.getLogger(__name__)

#: dots per inch of every PNG: 8-point labels are about 11 pixels high at 100 % zoom
DPI = 100
#: font size (points) of node and axis labels
FONT = 8


def module_path(node: torch.fx.Node) -> str:
    """Qualified name of the module whose ``forward`` holds ``node`` (the module itself for a
    ``call_module``, the owner of the attribute for a ``get_attr``; ``""`` at the root)."""
    if node.op == "call_module":
        return str(node.target)
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[0]
    stack = node.meta.get("nn_module_stack") or {}
    return str(next(reversed(stack.values()))[0]) if stack else ""


def prefix(name: str, depth: int) -> str:
    """The first ``depth`` dot-separated components of ``name``."""
    return ".".join(name.split(".")[:depth])


def stage_map(names: Iterable[str], share: float = 0.5) -> dict[str, str]:
    """``{name: its stage}``: module prefixes, the one holding more than ``share`` of the names
    expanded one level until none does, or until most of its names would become stages of
    their own (a stage is a container, not one layer)."""
    names = list(dict.fromkeys(names))
    depth = {n: 1 for n in names}
    while names:
        stage = {n: prefix(n, depth[n]) for n in names}
        counts = Counter(stage.values())
        big, count = counts.most_common(1)[0]
        members = [n for n in names if stage[n] == big]
        deeper = [n for n in members if n.count(".") + 1 > depth[n]]
        containers = [n for n in members if n.count(".") + 1 > depth[n] + 1]  # not a leaf once deeper
        if count <= share * len(names) or 2 * len(containers) < len(members) or len(names) < 4:
            return stage
        for n in deeper:
            depth[n] += 1
    return {}


def relative(name: str, stage: str) -> str:
    """``name`` without its stage prefix (the name itself when it is the stage)."""
    return name[len(stage) + 1:] if stage and name.startswith(stage + ".") else name


def pyplot():
    """matplotlib's pyplot with the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` (PNG or SVG, by suffix) and close it."""
    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg"):
        raise BadInputError(f"a picture is written as .png or .svg, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    pyplot().close(fig)
    log.info("wrote %s", path)
    return path
