"""Check that a speed-up keeps the analysis identical: dump the coupling records of zoo models
with one checkout, dump them again with another, compare.

    PYTHONPATH=/path/to/old/checkout python benchmarks/coupling_diff.py dump before.pkl
    PYTHONPATH=/path/to/new/checkout python benchmarks/coupling_diff.py dump after.pkl
    python benchmarks/coupling_diff.py compare before.pkl after.pkl    # exit 1 on any difference

Recorded per model (random weights, seed 0, input 1x3x224x224, ``analyze_model(...,
share_weights=True)``): the spaces, element units, unit count, pinned and prunable units, groups,
primary spaces, parameter spaces, barriers, attention heads, the graph, every node's spaces and
shapes.
"""

from __future__ import annotations

import argparse
import pickle
import sys

import numpy as np
import torch
import torchvision

MODELS = ("efficientnet_b0", "mnasnet0_5", "densenet121", "mobilenet_v2", "mobilenet_v3_small", "convnext_tiny",
          "regnet_x_400mf", "regnet_y_400mf", "resnet18", "shufflenet_v2_x0_5", "googlenet", "squeezenet1_0",
          "swin_t", "maxvit_t", "resnext50_32x4d", "vit_b_16", "efficientnet_v2_s")


def record(name: str) -> dict:
    """The coupling record of one torchvision model."""
    from oba_fx.passes.pipeline import analyze_model

    torch.manual_seed(0)
    m = torchvision.models.get_model(name, weights=None).eval()
    gm = analyze_model(m, (torch.randn(1, 3, 224, 224),), share_weights=True)
    c = gm.meta["oba.coupling"]
    return dict(spaces=c.spaces, unit=c.unit.copy(), n_units=c.n_units, pinned=c.pinned.copy(),
                prunable=c.prunable.copy(), group=c.group.copy(), primary=c.primary,
                param_spaces=dict(c.param_spaces), barriers=c.barriers, heads=c.heads, graph=str(gm.graph),
                spaces_meta={n.name: repr(n.meta.get("oba.spaces")) for n in gm.graph.nodes},
                shapes={n.name: repr(n.meta.get("tensor_meta")) for n in gm.graph.nodes})


def differences(a: dict, b: dict) -> list[str]:
    """``"model: field"`` for every field that differs (or model missing on one side)."""
    out = []
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            out.append(f"{name}: only on one side")
            continue
        for k, va in a[name].items():
            vb = b[name].get(k)
            same = np.array_equal(va, vb) if isinstance(va, np.ndarray) else va == vb
            if not same:
                out.append(f"{name}: {k}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump", help="write the coupling records of --models to OUT")
    d.add_argument("out")
    d.add_argument("--models", nargs="+", default=list(MODELS))
    c = sub.add_parser("compare", help="compare two dumps")
    c.add_argument("a")
    c.add_argument("b")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.cmd == "dump":
        import oba_fx

        recs = {}
        for name in a.models:
            recs[name] = record(name)
            print(f"{name}: {recs[name]['n_units']} units", flush=True)
        with open(a.out, "wb") as f:
            pickle.dump(recs, f)
        print(f"oba_fx from {oba_fx.__file__}; {len(recs)} models -> {a.out}")
        return 0
    with open(a.a, "rb") as f, open(a.b, "rb") as g:
        diffs = differences(pickle.load(f), pickle.load(g))
    print("\n".join(diffs) if diffs else "identical")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
