"""Property: for random small networks built from supported ops, at a random channel ratio and
criterion, the slimmed network computes what the original eager network computes with the
removed channels masked (``_oracle.masked_original``, built from the report alone).

Ops drawn: conv (with or without bias), grouped and depthwise conv, BatchNorm (random
statistics), GroupNorm, ReLU / GELU, residual add, a residual add of a zero-padded shortcut
(option A), ``torch.cat`` of two branches, ``torch.split`` / ``Tensor.chunk`` + getitem, a
three-way split whose parts are read by index (one dropped), ``F.pad`` on the channel dim,
channel shuffle (view / transpose / reshape, with sizes read from ``x.size()`` or constant),
avg / max pooling, a squeeze-excitation gate (mean -> conv -> ReLU -> conv -> sigmoid -> mul), a
gated product of two convs, a channels-last Linear (permute -> Linear -> GELU -> permute), and a
head that is either flatten -> Linear over C*H*W features or global pooling -> flatten -> Linear.

Hypothesis runs derandomized (the same examples on every run, so CI is reproducible).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, reject, settings
from hypothesis import strategies as st

from _oracle import check_params_sliced, masked_and_slimmed, one_thread, randomize  # noqa: F401 (fixture)

TOL = 1e-4
#: CI runs 25 fixed examples; a bug hunt: OBA_HYPOTHESIS_EXAMPLES=500 OBA_HYPOTHESIS_EXPLORE=1
EXAMPLES = int(os.environ.get("OBA_HYPOTHESIS_EXAMPLES", "25"))
EXPLORE = os.environ.get("OBA_HYPOTHESIS_EXPLORE", "") not in ("", "0")
IN_CH, SIDE = 3, 8
MAX_CH = 16


def _divisors(c: int) -> list[int]:
    return [d for d in range(2, c + 1) if c % d == 0]


@st.composite
def networks(draw) -> tuple:
    """A network spec: ``(steps, head)``; each step is ``(kind, params)`` and keeps track of the
    channel count ``c`` and the spatial side ``h``."""
    c = draw(st.integers(2, MAX_CH))
    steps: list[tuple] = [("conv", (IN_CH, c, draw(st.sampled_from([1, 3])), draw(st.booleans())))]
    h = SIDE
    for _ in range(draw(st.integers(1, 6))):
        kinds = ["conv", "bn", "act", "res", "cat", "pad", "padres", "se", "glu", "mlp_cl"]
        if c >= 2:
            kinds += ["split", "gconv", "gn"]
        if c % 2 == 0:
            kinds += ["chunk"]
        if c >= 3:
            kinds += ["split3"]
        if any(d < c for d in _divisors(c)):  # a proper divisor > 1 to shuffle by
            kinds += ["shuffle"]
        if h >= 2:
            kinds += ["pool"]
        kind = draw(st.sampled_from(kinds))
        if kind == "conv":
            o = draw(st.integers(1, MAX_CH))
            steps.append(("conv", (c, o, draw(st.sampled_from([1, 3])), draw(st.booleans()))))
            c = o
        elif kind == "gconv":
            g = draw(st.sampled_from(_divisors(c)))
            o = g * draw(st.integers(1, max(1, MAX_CH // g)))
            steps.append(("gconv", (c, o, g, draw(st.booleans()))))  # g == c: depthwise
            c = o
        elif kind == "bn":
            steps.append(("bn", (c,)))
        elif kind == "gn":
            steps.append(("gn", (draw(st.sampled_from(_divisors(c))), c)))
        elif kind == "act":
            steps.append(("act", (draw(st.sampled_from(["relu", "gelu"])),)))
        elif kind == "res":
            steps.append(("res", (c, draw(st.booleans()))))
        elif kind == "cat":
            a, b = draw(st.integers(1, MAX_CH // 2)), draw(st.integers(1, MAX_CH // 2))
            steps.append(("cat", (c, a, b)))
            c = a + b
        elif kind == "split":
            c1 = draw(st.integers(1, c - 1))
            o = draw(st.integers(1, MAX_CH // 2))
            steps.append(("split", (c, c1, o)))
            c = o + c - c1
        elif kind == "chunk":
            o = draw(st.integers(1, MAX_CH // 2))
            steps.append(("chunk", (c, o)))
            c = c // 2 + o
        elif kind == "pad":
            lo, hi = draw(st.integers(0, 3)), draw(st.integers(0, 3))
            steps.append(("pad", (lo, hi)))
            c = c + lo + hi
        elif kind == "glu":
            o = draw(st.integers(1, MAX_CH))
            steps.append(("glu", (c, o)))
            c = o
        elif kind == "mlp_cl":
            o = draw(st.integers(1, MAX_CH))
            steps.append(("mlp_cl", (c, o)))
            c = o
        elif kind == "split3":
            a = draw(st.integers(1, c - 2))
            b = draw(st.integers(1, c - 1 - a))
            steps.append(("split3", (c, a, b)))
            c = c - b
        elif kind == "padres":
            lo, hi = draw(st.integers(0, 3)), draw(st.integers(0, 3))
            steps.append(("padres", (c, lo, hi)))
            c = c + lo + hi
        elif kind == "shuffle":
            g = draw(st.sampled_from([d for d in _divisors(c) if d < c]))
            steps.append(("shuffle", (g, c, h, draw(st.booleans()))))
        elif kind == "pool":
            steps.append(("pool", (draw(st.sampled_from(["avg", "max"])),)))
            h //= 2
        elif kind == "se":
            steps.append(("se", (c, draw(st.integers(1, c)))))
    head = draw(st.sampled_from(["flatten", "gap"]))
    return steps, (head, c, h)


class Net(nn.Module):
    """Executes a spec from :func:`networks`; the spec is a plain Python attribute, so tracing
    unrolls the loop."""

    def __init__(self, spec: tuple) -> None:
        super().__init__()
        steps, (head, c, h) = spec
        self.steps = steps
        self.mods = nn.ModuleList()
        self.idx: list[int] = []
        for kind, p in steps:
            self.idx.append(len(self.mods))
            if kind == "conv":
                i, o, k, bias = p
                self.mods.append(nn.Conv2d(i, o, k, padding=k // 2, bias=bias))
            elif kind == "gconv":
                i, o, g, bias = p
                self.mods.append(nn.Conv2d(i, o, 3, padding=1, groups=g, bias=bias))
            elif kind == "bn":
                self.mods.append(nn.BatchNorm2d(p[0]))
            elif kind == "gn":
                self.mods.append(nn.GroupNorm(p[0], p[1]))
            elif kind == "res":
                c_, with_bn = p
                body = [nn.Conv2d(c_, c_, 3, padding=1, bias=not with_bn)] + ([nn.BatchNorm2d(c_)] if with_bn else [])
                self.mods.append(nn.Sequential(*body))
            elif kind == "cat":
                c_, a, b = p
                self.mods.append(nn.Conv2d(c_, a, 1))
                self.mods.append(nn.Sequential(nn.Conv2d(c_, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU()))
            elif kind == "split":
                c_, c1, o = p
                self.mods.append(nn.Conv2d(c1, o, 1))
            elif kind == "glu":
                c_, o = p
                self.mods.append(nn.Conv2d(c_, o, 1))
                self.mods.append(nn.Conv2d(c_, o, 3, padding=1))
            elif kind == "mlp_cl":
                c_, o = p
                self.mods.append(nn.Linear(c_, o))
            elif kind == "padres":
                c_, lo, hi = p
                self.mods.append(nn.Sequential(nn.Conv2d(c_, c_ + lo + hi, 3, padding=1), nn.BatchNorm2d(c_ + lo + hi)))
            elif kind == "chunk":
                c_, o = p
                self.mods.append(nn.Conv2d(c_ // 2, o, 3, padding=1))
            elif kind == "se":
                c_, r = p
                self.mods.append(nn.Conv2d(c_, r, 1))
                self.mods.append(nn.Conv2d(r, c_, 1))
        self.head_kind = head
        self.fc = nn.Linear(c * h * h if head == "flatten" else c, 5)

    def forward(self, x):
        for (kind, p), i in zip(self.steps, self.idx):
            if kind in ("conv", "gconv", "bn", "gn"):
                x = self.mods[i](x)
            elif kind == "act":
                x = F.relu(x) if p[0] == "relu" else F.gelu(x)
            elif kind == "res":
                x = x + self.mods[i](x)
            elif kind == "cat":
                x = torch.cat([self.mods[i](x), self.mods[i + 1](x)], dim=1)
            elif kind == "split":
                a, b = torch.split(x, [p[1], p[0] - p[1]], dim=1)
                x = torch.cat([self.mods[i](a), b], dim=1)
            elif kind == "chunk":
                a, b = x.chunk(2, dim=1)
                x = torch.cat([b, self.mods[i](a)], dim=1)
            elif kind == "pad":
                x = F.pad(x, (0, 0, 0, 0, p[0], p[1]))
            elif kind == "glu":  # product of two activations
                x = self.mods[i](x) * torch.sigmoid(self.mods[i + 1](x))
            elif kind == "mlp_cl":  # a linear over channels, channels-last
                x = F.gelu(self.mods[i](x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
            elif kind == "split3":  # three parts, the middle one dropped, read by index
                parts = torch.split(x, [p[1], p[2], p[0] - p[1] - p[2]], dim=1)
                x = torch.cat([parts[2], parts[0]], dim=1)
            elif kind == "padres":  # option-A shortcut: zero-padded channels added to a wider body
                x = self.mods[i](x) + F.pad(x, (0, 0, 0, 0, p[1], p[2]))
            elif kind == "shuffle":
                g, c, h, dynamic = p
                if dynamic:  # torchvision's channel_shuffle: sizes read from the tensor
                    n, c_, h_, w_ = x.size()
                    x = x.view(n, g, c_ // g, h_, w_).transpose(1, 2).contiguous().view(n, -1, h_, w_)
                else:
                    x = x.view(-1, g, c // g, h, h).transpose(1, 2).reshape(-1, c, h, h)
            elif kind == "pool":
                x = F.avg_pool2d(x, 2) if p[0] == "avg" else F.max_pool2d(x, 2)
            elif kind == "se":
                s = x.mean((2, 3), keepdim=True)
                s = torch.sigmoid(self.mods[i + 1](F.relu(self.mods[i](s))))
                x = x * s
        if self.head_kind == "gap":
            x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


def test_net_builder_runs_every_kind():
    """The spec interpreter itself: a network with every kind of step runs (channel counts in
    the comments) and has the head's output shape."""
    steps = [("conv", (3, 8, 3, True)), ("bn", (8,)), ("act", ("gelu",)), ("res", (8, True)),  # 8
             ("gn", (4, 8)), ("gconv", (8, 8, 8, False)), ("gconv", (8, 12, 4, True)),  # 12
             ("cat", (12, 3, 5)), ("split", (8, 3, 4)), ("pad", (1, 0)), ("padres", (10, 1, 1)),  # 8, 9, 10, 12
             ("shuffle", (3, 12, 8, True)), ("shuffle", (4, 12, 8, False)), ("pool", ("max",)),  # side 4
             ("se", (12, 2)), ("chunk", (12, 2)), ("act", ("relu",)), ("pool", ("avg",)),  # 6 + 2 = 8, side 2
             ("glu", (8, 7)), ("mlp_cl", (7, 9)), ("split3", (9, 2, 3))]  # 7, 9, 9 - 3 = 6
    net = Net((steps, ("flatten", 6, 2))).eval()
    assert net(torch.randn(2, IN_CH, SIDE, SIDE)).shape == (2, 5)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not EXPLORE, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(spec=networks(), ratio=st.floats(0.15, 0.6), criterion=st.sampled_from(["l1", "random"]),
       seed=st.integers(0, 2**16))
def test_slimmed_equals_masked_original(spec, ratio, criterion, seed):
    torch.manual_seed(seed)
    model = randomize(Net(spec), seed=seed).eval()
    x = torch.randn(2, IN_CH, SIDE, SIDE)
    try:
        r = masked_and_slimmed(model, x, criterion=criterion, channel_ratio=ratio, seed=seed)
    except ValueError as e:
        if "channel_ratio" in str(e) and "max_layer_ratio" in str(e):
            reject()  # the ratio asks for more channels than the per-layer cap allows: not a bug
        raise
    rep = r["report"]
    event("units removed" if rep["units_removed"] else "nothing removed")
    event("masking changed the output" if r["effect"] > 10 * TOL else "masking did not change the output")
    for b in rep["barriers"]:
        event(f"barrier {b['target']}")
    assert r["err"] <= TOL, f"slimmed vs masked original: {r['err']:.3g}\nspec={spec}"
    check_params_sliced(model, r["compiled"], r["report"]["kept"])
