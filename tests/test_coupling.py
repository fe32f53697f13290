"""Coupling rules on tiny graphs: which channels go together, what is pinned, how constants
are rewritten. Each test prunes and relies on prune_graph's own slimmed == masked check, plus
one structural claim of its own."""

import torch
import torch.nn as nn
import torch.nn.functional as F

import oba_fx
from oba_fx import meta as M
from oba_fx.passes.pipeline import analyze_model


def _coupling(model, x):
    return analyze_model(model, (x,)).meta[M.COUPLING]


class PadShortcut(nn.Module):
    """Option-A shortcut: zero-padding on the channel dim, added to a conv branch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.head(self.conv(x) + F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2)))


def test_pad_amounts_are_rewritten_to_the_kept_padding_channels():
    torch.manual_seed(0)
    m = PadShortcut().eval()
    c = _coupling(m, torch.randn(2, 4, 8, 8))
    assert int(c.prunable.sum()) == 4  # only the 2 + 2 padding channels can go
    out = oba_fx.prune_graph(m, torch.randn(2, 4, 8, 8), channel_ratio=0.75)
    kept = out.meta["oba"]["kept"]["conv.weight"][0]
    lo, hi = sum(k < 2 for k in kept), sum(k >= 6 for k in kept)
    assert out.conv.out_channels == 5 and lo + hi == 1
    assert f"(0, 0, 0, 0, {lo}, {hi})" in out.code


def test_channels_entering_a_cat_map_with_offsets():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(10, 2, 1)

        def forward(self, x):
            return self.c(torch.cat([self.a(x), self.b(x)], 1))

    m = Cat().eval()
    with torch.no_grad():
        m.b.weight[2] = 0
        m.b.bias[2] = 0
    out = oba_fx.prune_graph(m, torch.randn(1, 3, 4, 4), channel_ratio=0.1)
    assert out.meta["oba"]["kept"]["c.weight"][1] == [i for i in range(10) if i != 4 + 2]


def test_split_sizes_are_rewritten_per_piece():
    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            u, v = torch.chunk(self.a(x), 2, dim=1)
            return self.b(u) + self.c(v)

    m = Split().eval()
    with torch.no_grad():
        m.a.weight[[0, 1, 5]] = 0
        m.a.bias[[0, 1, 5]] = 0
    out = oba_fx.prune_graph(m, torch.randn(1, 3, 4, 4), channel_ratio=3 / 8)
    assert "[2, 3]" in out.code  # chunk(2) became split([2, 3])


def test_depthwise_conv_couples_input_and_output_channels():
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 1)).eval()
    out = oba_fx.prune_graph(m, torch.randn(1, 3, 6, 6), channel_ratio=0.25)
    c0, c1, c2 = (out.get_submodule(str(i)) for i in range(3))
    assert (c0.out_channels, c1.groups, c1.in_channels, c2.in_channels) == (6, 6, 6, 6)


def test_grouped_conv_removes_whole_groups():
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=4), nn.Conv2d(8, 4, 1)).eval()
    c = _coupling(m, torch.randn(1, 3, 6, 6))
    # the 8 channels between conv 0 and the grouped conv form 4 units of 2, the grouped conv's
    # output channels are in the same units
    assert int(c.prunable.sum()) == 4
    out = oba_fx.prune_graph(m, torch.randn(1, 3, 6, 6), channel_ratio=0.25)
    assert out.get_submodule("1").groups == 3 and out.get_submodule("1").out_channels == 6


def test_flatten_into_linear_takes_whole_spatial_blocks():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 2 * 2, 5)).eval()
    out = oba_fx.prune_graph(m, torch.randn(1, 3, 4, 4), channel_ratio=0.5)
    kept = out.meta["oba"]["kept"]
    chans = kept["0.weight"][0]
    assert kept["2.weight"][1] == [c * 4 + k for c in chans for k in range(4)]


def test_reshape_into_heads_makes_a_head_one_unit():
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            b, n, _ = x.shape
            h = self.qkv(x).reshape(b, n, 2, 4).permute(0, 2, 1, 3)
            return self.proj(h.permute(0, 2, 1, 3).reshape(b, n, 8))

    c = _coupling(Heads().eval(), torch.randn(1, 3, 8))
    assert int(c.prunable.sum()) == 2  # 2 heads of 4 channels


def test_channel_count_read_from_a_shape_and_used_in_arithmetic_is_pinned():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            h = self.a(x)
            return self.b(h / h.shape[-1])  # depends on the channel count itself

    assert int(_coupling(Scale(), torch.randn(2, 4)).prunable.sum()) == 0


def test_unknown_function_is_a_barrier_and_reported():
    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.b(torch.cumsum(self.a(x), dim=1))

    m = Weird().eval()
    c = _coupling(m, torch.randn(1, 3, 2, 2))
    assert int(c.prunable.sum()) == 0
    assert [b.target.rpartition(".")[2] for b in c.barriers] == ["cumsum"]


def test_layernorm_over_channels_pins_them_but_not_the_mlp_hidden_units():
    m = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6)).eval()
    c = _coupling(m, torch.randn(2, 4))
    assert int(c.prunable.sum()) == 12


def test_classifier_outputs_are_never_pruned():
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    out = oba_fx.prune_graph(m, torch.randn(2, 4), channel_ratio=0.5)
    assert out.get_submodule("2").out_features == 3


def test_batched_matmul_over_heads_prunes_whole_heads():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.proj = (nn.Linear(8, 8) for _ in range(4))

        def forward(self, x):
            b, n, _ = x.shape

            def heads(t):
                return t.reshape(b, n, 4, 2).permute(0, 2, 1, 3)

            a = torch.softmax(heads(self.q(x)) @ heads(self.k(x)).transpose(-1, -2), dim=-1)
            return self.proj((a @ heads(self.v(x))).permute(0, 2, 1, 3).reshape(b, n, 8))

    torch.manual_seed(0)
    out = oba_fx.prune_graph(Attn().eval(), torch.randn(2, 5, 8), channel_ratio=0.5)
    kept = out.meta["oba"]["kept"]["q.weight"][0]
    assert len(kept) == 4  # 2 of 4 heads of 2 channels, each head whole:
    assert all(k % 2 == 0 and k2 == k + 1 for k, k2 in zip(kept[::2], kept[1::2]))
    assert out.meta["oba"]["max_rel_error"] <= 1e-4
