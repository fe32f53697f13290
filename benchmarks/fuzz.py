"""Fuzz the pipeline with seeded random networks and an independent masked reference.

Each seed builds a small random CNN (``build``) from the ingredients that have broken structured
pruning before: residual adds, ``cat``/``split``/``chunk``/channel shuffle, squeeze-excitation
gates, modules called twice, ``einsum`` over channels, several heads, layers written as
functions of their module's tensors (``F.conv2d`` / ``F.linear`` / ``F.batch_norm`` /
``F.group_norm``, timm's style), static, strided and shape-sized channel slices, ``narrow``,
``reshape_as``, ``addcmul``, ``max`` along a spatial dim, a channel count read from one tensor to
reshape another, and traps that reduce over channels. Every network is pruned with
``oba_fx.prune_graph(model, x, channel_ratio=r)`` and compared, on the example batch, with the
eager original masked from the report alone (``tests/_oracle.py``: ``masked_and_slimmed`` and
``check_params_sliced``; no tracing, no coupling shared with the library).

Outcomes (one per network):

* ``pruned``: verified, matches the oracle, and at least one channel was removed;
* ``pinned-nothing``: verified and correct, but every channel was pinned (nothing removed);
* ``refused: <OBAError>``: the library declined with a documented error (``SurgeryError``
  counts separately: it means an internal bug);
* ``crashed: <exception>``: any other exception;
* ``wrong``: the slimmed network differs from the oracle (relative error > ``--tol``), or its
  parameters are not the original ones at the reported indices.

    python benchmarks/fuzz.py [--n 2000] [--seed 0] [--out benchmarks/results/fuzz]

Writes ``<out>.json`` (every network: seed, ingredients, ratio, outcome, detail, seconds) and
``<out>.md`` (the summary table), and prints the table.

Example:
    >>> model, x, recipe = build(1)
    >>> recipe
    ['reshape_as', 'shared_block', 'conv', 'narrow', 'einsum']
    >>> tuple(model(x).shape)
    (2, 5)
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(Path(__file__).resolve().parent)]
import oba_fx  # noqa: E402
from oba_fx.errors import OBAError, SurgeryError  # noqa: E402
from _oracle import check_params_sliced, masked_and_slimmed, randomize  # noqa: E402

CLASSES = 5
SIZE = 5


# ============================================================================ layers on their own tensors
class RawConv(nn.Conv2d):
    """A conv whose forward calls ``F.conv2d`` on its tensors (traced through, not a leaf)."""

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d``: ``F.batch_norm`` with its own statistics, then ReLU."""

    def forward(self, x):
        return F.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1,
                                   self.eps))


class RawGroupNorm(nn.GroupNorm):
    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class RawLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class EinsumConv(nn.Conv2d):
    """A 1x1 conv written as ``einsum`` over channels with its weight."""

    def forward(self, x):
        return torch.einsum("bchw,dc->bdhw", x, self.weight[:, :, 0, 0]) + self.bias[:, None, None]


# ============================================================================ blocks
def _conv(rng: random.Random, cin: int, cout: int, k: int = 1, groups: int = 1) -> nn.Module:
    raw = rng.random() < 0.3
    cls = RawConv if raw else nn.Conv2d
    return cls(cin, cout, k, padding=k // 2, groups=groups)


def _norm(rng: random.Random, c: int) -> nn.Module:
    r = rng.random()
    if r < 0.3:
        return BatchNormAct2d(c)
    if r < 0.4 and c % 2 == 0:
        return RawGroupNorm(2, c)
    return nn.Sequential(nn.BatchNorm2d(c), nn.ReLU())


class ConvBlock(nn.Module):
    def __init__(self, rng, c, cout):
        super().__init__()
        self.conv, self.norm = _conv(rng, c, cout, rng.choice([1, 3])), _norm(rng, cout)

    def forward(self, x):
        return self.norm(self.conv(x))


class Residual(nn.Module):
    def __init__(self, rng, c, cout):
        super().__init__()
        self.a, self.b = ConvBlock(rng, c, c), _conv(rng, c, c, 3)

    def forward(self, x):
        return F.relu(x + self.b(self.a(x)))


class SplitCat(nn.Module):
    def __init__(self, rng, c, cout):
        super().__init__()
        self.k = rng.randint(1, c - 1)
        self.conv = _conv(rng, c - self.k, c - self.k)

    def forward(self, x):
        a, b = torch.split(x, [self.k, self.conv.in_channels], 1)
        return torch.cat([a, F.relu(self.conv(b))], 1)


class ChunkCat(nn.Module):
    def forward(self, x):
        return torch.cat(x.chunk(2, 1), 1) * 1.5


class Shuffle(nn.Module):
    def forward(self, x):
        b, c, h, w = x.shape
        return x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)


class SE(nn.Module):
    def __init__(self, rng, c, cout):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, max(2, c // 2), 1), nn.Conv2d(max(2, c // 2), c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class Shared(nn.Module):
    """One conv called twice."""

    def __init__(self, rng, c, cout):
        super().__init__()
        self.conv = _conv(rng, c, c, 3)

    def forward(self, x):
        return self.conv(F.relu(self.conv(x)))


class Einsum(nn.Module):
    def __init__(self, rng, c, cout):
        super().__init__()
        self.mix = EinsumConv(c, cout, 1)

    def forward(self, x):
        return F.relu(self.mix(x))


class Linear(nn.Module):
    """A linear over channels: channels last, ``F.linear`` on a Linear's tensors, channels first."""

    def __init__(self, rng, c, cout):
        super().__init__()
        self.fc = RawLinear(c, cout) if rng.random() < 0.7 else nn.Linear(c, cout)

    def forward(self, x):
        return F.relu(self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


class SliceCat(nn.Module):
    def __init__(self, rng, c, cout):
        super().__init__()
        self.k = rng.randint(1, c - 1)
        self.conv = _conv(rng, c - self.k, c - self.k)

    def forward(self, x):
        return torch.cat([x[:, :self.k], F.relu(self.conv(x[:, self.k:]))], 1)


class ShapeSlice(nn.Module):
    def forward(self, x):
        h = x.shape[1] // 2
        return torch.cat([x[:, :h], F.relu(x[:, h:]) * 2], 1)


class Strided(nn.Module):
    def __init__(self, rng, c, cout):
        super().__init__()
        self.conv = _conv(rng, (c + 1) // 2, (c + 1) // 2)

    def forward(self, x):
        return torch.cat([F.relu(self.conv(x[:, ::2])), x[:, 1::2]], 1)


class Trap(nn.Module):
    """Reduces over channels (their count is read by the mean): channels stay."""

    def __init__(self, rng, c, cout):
        super().__init__()
        self.kind = rng.choice(["mean", "amax", "softmax", "norm"])

    def forward(self, x):
        if self.kind == "mean":
            return x - x.mean(1, keepdim=True)
        if self.kind == "amax":
            return x / (x.amax(1, keepdim=True).abs() + 1)
        if self.kind == "softmax":
            return x * F.softmax(x, 1)
        return F.normalize(x, dim=1)


class MaxDim(nn.Module):
    def forward(self, x):
        v, _ = x.max(dim=2, keepdim=True)
        return x + v + torch.min(x, 3, keepdim=True).values


class Narrow(nn.Module):
    def __init__(self, rng, c, cout):
        super().__init__()
        self.k = rng.randint(1, c - 1)
        self.conv = _conv(rng, c - self.k, c - self.k)

    def forward(self, x):
        return torch.cat([x.narrow(1, 0, self.k), F.relu(self.conv(x.narrow(1, self.k, x.shape[1] - self.k)))], 1)


class ReshapeAs(nn.Module):
    def __init__(self, rng, c, cout):
        super().__init__()
        self.conv = _conv(rng, c, c)

    def forward(self, x):
        return F.relu(self.conv(x)).flatten(2).reshape_as(x) + x


class AddCMul(nn.Module):
    def __init__(self, rng, c, cout):
        super().__init__()
        self.conv = _conv(rng, c, c)

    def forward(self, x):
        return torch.addcmul(x, torch.tanh(self.conv(x)), x, value=0.5)


class OtherCount(nn.Module):
    """A channel count read from one tensor sizes the reshape of another."""

    def __init__(self, rng, c, cout):
        super().__init__()
        self.conv = _conv(rng, c, c)

    def forward(self, x):
        z = self.conv(x)
        return F.relu(z.reshape(z.shape[0], x.shape[1], -1).reshape(x.shape)) + x


#: name -> (block, changes channel count, needs an even count)
BLOCKS: dict[str, tuple[Any, bool, bool]] = {
    "conv": (ConvBlock, True, False), "residual": (Residual, False, False), "split_cat": (SplitCat, False, False),
    "chunk_cat": (ChunkCat, False, True), "shuffle": (Shuffle, False, True), "se": (SE, False, False),
    "shared": (Shared, False, False), "einsum": (Einsum, True, False), "linear": (Linear, True, False),
    "slice": (SliceCat, False, False), "shape_slice": (ShapeSlice, False, False), "strided": (Strided, False, False),
    "trap": (Trap, False, False), "max_dim": (MaxDim, False, False), "narrow": (Narrow, False, False),
    "reshape_as": (ReshapeAs, False, False), "addcmul": (AddCMul, False, False), "other_count": (OtherCount, False, False),
}


class Net(nn.Module):
    def __init__(self, stem: nn.Module, blocks: list[nn.Module], heads: nn.ModuleList):
        super().__init__()
        self.stem, self.blocks, self.heads = stem, nn.ModuleList(blocks), heads

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        f = x.mean((2, 3))
        outs = tuple(h(f) for h in self.heads)
        return outs[0] if len(outs) == 1 else outs


def build(seed: int) -> tuple[nn.Module, torch.Tensor, list[str]]:
    """The random network of ``seed``, its example batch and its list of ingredients."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    c = rng.choice([4, 6, 8])
    stem = ConvBlock(rng, 3, c)
    blocks, recipe = [], []
    reusable: dict[int, nn.Module] = {}  # a block with parameters that keeps ``c`` channels, by ``c``
    for _ in range(rng.randint(2, 6)):
        name = rng.choice(list(BLOCKS))
        cls, changes, even = BLOCKS[name]
        if even and c % 2:
            name, (cls, changes, even) = "conv", BLOCKS["conv"]
        cout = rng.choice([4, 6, 8]) if changes else c
        if not changes and c in reusable and rng.random() < 0.2:  # the same block instance again
            blk, name = reusable[c], "shared_block"
        elif cls in (ChunkCat, Shuffle, ShapeSlice, MaxDim):
            blk = cls()
        else:
            blk = cls(rng, c, cout)
            if not changes and cls is not Trap:
                reusable.setdefault(c, blk)
        blocks.append(blk)
        recipe.append(name)
        c = cout
    heads = nn.ModuleList([nn.Linear(c, CLASSES) for _ in range(rng.choice([1, 1, 2]))])
    if len(heads) > 1:
        recipe.append("two_heads")
    model = randomize(Net(stem, blocks, heads).eval(), seed)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    return model, x, recipe


# ============================================================================ one run
def run_one(seed: int, tol: float = 1e-4) -> dict[str, Any]:
    """Build, prune and check the network of ``seed``; returns its record."""
    t0 = time.perf_counter()
    model, x, recipe = build(seed)
    rng = random.Random(seed + 10_000)
    ratio = rng.choice([0.2, 0.3, 0.5])
    kw = {"channel_ratio": ratio, "keep_residual": rng.random() < 0.5}
    rec: dict[str, Any] = {"seed": seed, "recipe": recipe, **kw}
    try:
        r = masked_and_slimmed(model, x, **kw)
        check_params_sliced(model, r["compiled"], r["report"]["kept"])
    except AssertionError as e:
        rec.update(outcome="wrong", detail=str(e).splitlines()[0][:200])
    except SurgeryError as e:
        rec.update(outcome="refused: SurgeryError", detail=str(e).splitlines()[0][:200])
    except OBAError as e:
        rec.update(outcome=f"refused: {type(e).__name__}", detail=str(e).splitlines()[0][:200])
    except Exception as e:  # noqa: BLE001 - a crash is what the fuzzer looks for
        rec.update(outcome=f"crashed: {type(e).__name__}", detail=str(e).splitlines()[0][:200] if str(e) else "")
    else:
        barriers = sorted({b["reason"][:80] for b in r["report"]["barriers"]})
        rec.update(err=r["err"], barriers=barriers)
        if r["err"] > tol:
            rec.update(outcome="wrong", detail=f"relative error {r['err']:.3g} vs the masked original")
        elif not r["report"]["kept"]:
            rec.update(outcome="pinned-nothing", detail="no channel removed")
        else:
            rec.update(outcome="pruned", detail="")
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


def summarise(records: list[dict[str, Any]]) -> str:
    """The Markdown summary table of ``records``."""
    n = len(records)
    counts = collections.Counter(r["outcome"] for r in records)
    order = ["pruned", "pinned-nothing"] + sorted(k for k in counts if k.startswith("refused")) + \
        sorted(k for k in counts if k.startswith("crashed")) + ["wrong"]
    lines = ["| outcome | networks | share |", "|---|---:|---:|"]
    for k in order:
        lines.append(f"| {k} | {counts.get(k, 0)} | {100 * counts.get(k, 0) / max(n, 1):.1f} % |")
    lines.append(f"| **total** | **{n}** | |")
    with_pins = sum(1 for r in records if r["outcome"] == "pruned" and r.get("barriers"))
    lines.append("")
    lines.append(f"Pruned with some channels pinned and reported as barriers: {with_pins}.")
    reasons = collections.Counter(b for r in records for b in r.get("barriers", []))
    if reasons:
        lines += ["", "| barrier reason (first 80 characters) | networks |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in reasons.most_common(12)]
    bad = [r for r in records if r["outcome"] not in ("pruned", "pinned-nothing")]
    if bad:
        lines += ["", "| seed | outcome | detail |", "|---:|---|---|"]
        lines += [f"| {r['seed']} | {r['outcome']} | {r['detail'][:120]} |" for r in bad[:30]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="networks to build and prune")
    ap.add_argument("--seed", type=int, default=0, help="first seed (networks use seed .. seed + n - 1)")
    ap.add_argument("--tol", type=float, default=1e-4, help="largest relative error counted as correct")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fuzz"), help="output path without suffix")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    records = []
    for s in range(args.seed, args.seed + args.n):
        records.append(run_one(s, args.tol))
        if len(records) % 100 == 0:
            print(f"{len(records)} networks, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    table = summarise(records)
    head = (f"Fuzz: {args.n} random networks, seeds {args.seed}..{args.seed + args.n - 1}, tol {args.tol:g}, "
            f"{time.perf_counter() - t0:.0f} s (oba_fx {getattr(oba_fx, '__version__', '?')}, torch {torch.__version__})")
    print(head + "\n\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(head + "\n\n" + table + "\n")
    from _common import machine
    out.with_suffix(".json").write_text(json.dumps({"n": args.n, "seed": args.seed, "tol": args.tol,
                                                    "machine": machine(), "records": records}, indent=0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
