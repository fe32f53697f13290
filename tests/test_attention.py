"""Attention: the stand-ins equal the library code they replace, heads are units, and small
configurations of torchvision's ViT, Swin (v1, v2), ConvNeXt and MaxViT prune by heads and MLP
neurons to the FLOPs asked, equal to the masked original (``prune_graph`` raises otherwise)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import oba_fx
from oba_fx.attention import MultiheadAttention, window_attention
from oba_fx.meta import COUPLING
from oba_fx.passes.pipeline import analyze_model


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------ nn.MultiheadAttention stand-in
def _pair(seed=0, **kw):
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(**{"embed_dim": 8, "num_heads": 2, **kw}).eval()
    return ref, MultiheadAttention.from_torch(ref).eval()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
def test_stand_in_equals_multihead_attention_for_self_attention(batch_first, need_weights, average):
    ref, ours = _pair(batch_first=batch_first)
    x = torch.randn(3, 5, 8)
    a = ref(x, x, x, need_weights=need_weights, average_attn_weights=average)
    b = ours(x, x, x, need_weights=need_weights, average_attn_weights=average)
    torch.testing.assert_close(b[0], a[0], atol=1e-6, rtol=1e-5)
    if need_weights:
        torch.testing.assert_close(b[1], a[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mask_kind", ["bool2d", "float2d", "per_head3d", "padding", "padding+bool2d"])
def test_stand_in_equals_multihead_attention_with_masks(mask_kind):
    ref, ours = _pair(batch_first=True)
    q, kv = torch.randn(3, 4, 8), torch.randn(3, 6, 8)
    kw = {}
    if "bool2d" in mask_kind:
        kw["attn_mask"] = torch.rand(4, 6) > 0.7
        kw["attn_mask"][:, 0] = False
    if mask_kind == "float2d":
        kw["attn_mask"] = torch.randn(4, 6)
    if mask_kind == "per_head3d":
        kw["attn_mask"] = torch.randn(3 * 2, 4, 6)
    if "padding" in mask_kind:
        kw["key_padding_mask"] = torch.tensor([[False] * 6, [False] * 4 + [True] * 2, [False] * 5 + [True]])
    torch.testing.assert_close(ours(q, kv, kv, need_weights=False, **kw)[0],
                               ref(q, kv, kv, need_weights=False, **kw)[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("need_weights", [False, True])
def test_stand_in_equals_multihead_attention_with_a_causal_hint(need_weights):
    ref, ours = _pair(batch_first=True)
    x, mask = torch.randn(2, 5, 8), nn.Transformer.generate_square_subsequent_mask(5)
    a = ref(x, x, x, attn_mask=mask, is_causal=True, need_weights=need_weights)
    b = ours(x, x, x, attn_mask=mask, is_causal=True, need_weights=need_weights)
    torch.testing.assert_close(b[0], a[0], atol=1e-6, rtol=1e-5)


def test_stand_in_equals_multihead_attention_with_separate_key_and_value_widths():
    ref, ours = _pair(kdim=5, vdim=3, batch_first=True)
    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 6, 5), torch.randn(2, 6, 3)
    torch.testing.assert_close(ours(q, k, v)[0], ref(q, k, v)[0], atol=1e-6, rtol=1e-5)


def test_stand_in_shares_parameters_and_state_dict_keys():
    ref, ours = _pair()
    assert ours.in_proj_weight is ref.in_proj_weight and ours.out_proj.weight is ref.out_proj.weight
    assert set(ours.state_dict()) == set(ref.state_dict())


def test_multihead_attention_with_bias_kv_is_kept_whole():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.head = nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.attn(x, x, x)[0].mean(1))

    out = oba_fx.prune_graph(Net().eval(), torch.randn(2, 5, 8), channel_ratio=0.5)
    assert out.meta["oba"]["heads"] == {}
    assert any(b["reason"].startswith("nn.MultiheadAttention kept whole") for b in out.meta["oba"]["barriers"])


def test_unbatched_multihead_attention_falls_back_to_the_whole_module():
    """The stand-in handles batched inputs only: a 2-D call is traced again with the module kept."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.attn, self.head = nn.Linear(8, 8), nn.MultiheadAttention(8, 2), nn.Linear(8, 2)

        def forward(self, x):
            h = self.fc(x)
            return self.head(self.attn(h, h, h)[0])

    x = torch.randn(5, 8)
    out = oba_fx.prune_graph(Net().eval(), x, channel_ratio=0.5)
    assert out.meta["oba"]["heads"] == {} and out(x).shape == (5, 2)


# ------------------------------------------------------------------ heads as units
class PackedQKV(nn.Module):
    """timm-style attention: one qkv Linear, reshape (B, N, 3, heads, head_dim), index q, k, v."""

    def __init__(self, dim=8, heads=4):
        super().__init__()
        self.qkv, self.proj, self.head = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, 2)
        self.heads, self.hd = heads, dim // heads

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = (q @ k.transpose(-2, -1) * self.hd ** -0.5).softmax(dim=-1)
        y = (a @ v).transpose(1, 2).reshape(b, n, -1)
        return self.head(self.proj(y).mean(1))


def test_packed_qkv_reshape_makes_each_head_one_unit():
    """The split 3*C -> (3, heads, head_dim) puts the space on the heads (not on the ``3``, which
    ``qkv[0]`` indexes away): the qkv rows form exactly ``heads`` prunable units."""
    gm = analyze_model(PackedQKV(), (torch.randn(2, 5, 8),))
    c = gm.meta[COUPLING]
    rows = c.units_of(c.param_spaces[("qkv.weight", 0)])
    assert len(set(rows.tolist())) == 4 and c.prunable[rows].all()
    assert [h.space.size for h in c.heads] == [4]


def test_packed_qkv_prunes_heads_and_rewrites_the_head_count():
    torch.manual_seed(0)
    model, x = PackedQKV().eval(), torch.randn(2, 5, 8)
    with torch.no_grad():  # make heads 1 and 3 the smallest
        model.qkv.weight.view(3, 4, 2, 8)[:, [1, 3]] *= 1e-3
        model.proj.weight.view(8, 4, 2)[:, [1, 3]] *= 1e-3
    out = oba_fx.prune_graph(model, x, criterion="l1", channel_ratio=0.2, verify=True)
    assert out.meta["oba"]["heads"] == {"softmax": [4, 2]}  # attention at the root: keyed by node
    assert out.qkv.weight.shape == (12, 8) and out.proj.weight.shape == (8, 4)


class UnbindQKV(PackedQKV):
    """The same attention with ``q, k, v = qkv.unbind(0)`` and ``F.scaled_dot_product_attention``."""

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return self.head(self.proj(y).mean(1))


def test_unbind_attention_prunes_heads():
    torch.manual_seed(0)
    model = UnbindQKV().eval()
    with torch.no_grad():
        model.qkv.weight.view(3, 4, 2, 8)[:, 2] *= 1e-3
    out = oba_fx.prune_graph(model, torch.randn(2, 5, 8), criterion="l1", channel_ratio=0.1)
    assert out.meta["oba"]["heads"] == {"scaled_dot_product_attention": [4, 3]}


class MaskedMHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.head = nn.MultiheadAttention(8, 4, batch_first=True), nn.Linear(8, 2)

    def forward(self, x, pad, mask=None):
        return self.head(self.attn(x, x, x, key_padding_mask=pad, attn_mask=mask, need_weights=False)[0].mean(1))


def test_multihead_attention_with_padding_mask_prunes_heads():
    torch.manual_seed(0)
    x, pad = torch.randn(2, 5, 8), torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    out = oba_fx.prune_graph(MaskedMHA().eval(), (x, pad), criterion="l1", channel_ratio=0.7)
    (before, after), = out.meta["oba"]["heads"].values()
    assert before == 4 and after < 4 and out.meta["oba"]["max_rel_error"] < 1e-4


def test_per_head_attention_mask_keeps_every_head():
    """A ``(batch * heads, L, S)`` mask holds one plane per head: heads cannot be sliced from it,
    so every query and key row of the in-projection stays (value features may still go)."""
    torch.manual_seed(0)
    x, pad = torch.randn(2, 5, 8), torch.zeros(2, 5, dtype=torch.bool)
    out = oba_fx.prune_graph(MaskedMHA().eval(), (x, pad, torch.randn(8, 5, 5)), criterion="l1", channel_ratio=0.7)
    kept = out.meta["oba"]["kept"].get("attn.in_proj_weight", {}).get(0, list(range(24)))
    assert set(range(16)) <= set(kept) and out.meta["oba"]["max_rel_error"] < 1e-4


# ------------------------------------------------------------------ Swin window attention
def _swin_args(c=8, heads=2, ws=(4, 4), v2=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = ws[0] * ws[1]
    return dict(qkv_weight=torch.randn(3 * c, c, generator=g) / c ** 0.5, proj_weight=torch.randn(c, c, generator=g),
                relative_position_bias=torch.randn(1, heads, n, n, generator=g), window_size=list(ws),
                num_heads=heads, qkv_bias=torch.randn(3 * c, generator=g), proj_bias=torch.randn(c, generator=g),
                logit_scale=torch.randn(heads, 1, 1, generator=g) if v2 else None, training=False)


@pytest.mark.parametrize("hw,shift,v2", [((8, 8), [0, 0], False), ((8, 8), [2, 2], False), ((6, 7), [2, 2], False),
                                         ((6, 7), [2, 2], True), ((3, 3), [2, 2], False)])
def test_window_attention_equals_torchvision(hw, shift, v2):
    from torchvision.models.swin_transformer import shifted_window_attention

    x = torch.randn(2, *hw, 8)
    kw = _swin_args(v2=v2)
    torch.testing.assert_close(window_attention(x, shift_size=shift, **kw),
                               shifted_window_attention(x, shift_size=list(shift), **kw), atol=1e-5, rtol=1e-5)


def test_window_attention_takes_the_head_width_from_the_weights():
    """Two heads of width 3 on a 8-channel map: the inner width differs from the input width."""
    x = torch.randn(1, 4, 4, 8)
    kw = _swin_args()
    kw.update(qkv_weight=torch.randn(18, 8), qkv_bias=torch.randn(18), proj_weight=torch.randn(5, 6),
              proj_bias=torch.randn(5))
    assert window_attention(x, shift_size=[2, 2], **kw).shape == (1, 4, 4, 5)


# ------------------------------------------------------------------ torchvision models, small configs
def _vit():
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                             num_classes=10)


def _swin(v2=False):
    from torchvision.models.swin_transformer import (PatchMergingV2, SwinTransformer, SwinTransformerBlockV2)

    extra = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                           num_classes=10, **extra)


def _convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10)


def _maxvit():
    from torchvision.models.maxvit import MaxVit

    return MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16, 32],
                  block_layers=[1, 1], head_dim=4, stochastic_depth_prob=0.0, num_classes=10)


SMALL = {"vit": (_vit, 2), "swin": (_swin, 4), "swin_v2": (lambda: _swin(True), 4), "convnext": (_convnext, 0),
         "maxvit": (_maxvit, 4)}


def _prune(name, criterion, target=0.6):
    torch.manual_seed(0)
    model = SMALL[name][0]().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    data = [(torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)) for _ in range(2)]
    out = oba_fx.prune_graph(model, x, criterion=criterion, target_flops=target,
                             data=None if criterion == "l1" else data, verbose=False)
    return model, x, out


@pytest.mark.parametrize("criterion", ["l1", "oba"])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_torchvision_models_prune_to_the_flops_target(name, criterion):
    """Verification against the masked original runs inside prune_graph (it raises on a
    mismatch); the FLOPs drop to the target and nothing is a barrier."""
    model, x, out = _prune(name, criterion)
    r = out.meta["oba"]
    assert r["flops_after"] <= 0.6 * r["flops_before"] and r["barriers"] == []
    assert r["max_rel_error"] < 1e-4 and out(x).shape == (2, 10)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_oba_removes_heads_and_reports_them_per_block(name):
    _, _, out = _prune(name, "oba")
    heads = out.meta["oba"]["heads"]
    assert len(heads) == SMALL[name][1]
    if heads:
        assert sum(b - a for b, a in heads.values()) > 0


@pytest.mark.parametrize("name,target", [("vit", 0.5), ("swin", 0.4), ("swin_v2", 0.4), ("maxvit", 0.4)])
def test_l1_removes_heads_at_a_lower_flops_target(name, target):
    _, _, out = _prune(name, "l1", target)
    assert sum(b - a for b, a in out.meta["oba"]["heads"].values()) > 0


def test_vit_slimmed_projection_shapes_follow_the_kept_heads():
    """A ViT block with k kept heads has 3*k*head_dim in-projection rows and k*head_dim
    out-projection columns (head_dim 8)."""
    _, _, out = _prune("vit", "oba")
    for block, (_, kept) in out.meta["oba"]["heads"].items():
        attn = out.get_submodule(block)
        assert attn.in_proj_weight.shape == (3 * kept * 8, 32) and attn.out_proj.weight.shape == (32, kept * 8)


def test_vit_steps_compose_the_heads_report():
    torch.manual_seed(0)
    model, x = _vit().eval(), torch.randn(2, 3, 32, 32)
    out = oba_fx.prune_graph(model, x, criterion="l1", target_flops=0.5, steps=3, verbose=False)
    heads = out.meta["oba"]["heads"]
    assert all(before == 4 for before, _ in heads.values())
    assert out.meta["oba"]["flops_after"] <= 0.5 * out.meta["oba"]["flops_before"]


def test_pruned_swin_saves_and_loads(tmp_path):
    """The slimmed Swin calls oba_fx's window attention: it must load without the model class."""
    _, x, out = _prune("swin", "oba")
    oba_fx.save(out, tmp_path / "swin.pt")
    torch.testing.assert_close(oba_fx.load(tmp_path / "swin.pt")(x), out(x))


# ------------------------------------------------------------------ residual-stream width (embed_width=True)
def _vit_width(embed_width):
    torch.manual_seed(0)
    model, x = _vit().eval(), torch.randn(2, 3, 32, 32)
    return oba_fx.prune_graph(model, x, criterion="l1", target_flops=0.6, embed_width=embed_width, verbose=False)


def test_residual_width_is_not_pruned_by_default():
    kept = _vit_width(False).meta["oba"]["kept"]
    assert not any(k in kept for k in ("class_token", "encoder.pos_embedding", "conv_proj.weight"))


def test_embed_width_prunes_one_residual_width_across_the_vit():
    """Patch embedding, class token, position embedding, every LayerNorm, every block's output
    projections and the head's input lose the same channels; the slimmed net equals the masked
    original whose LayerNorms renormalise over the kept channels."""
    out = _vit_width(True)
    kept, r = out.meta["oba"]["kept"], out.meta["oba"]
    ref = kept["class_token"][2]
    same = [kept["encoder.pos_embedding"][2], kept["conv_proj.weight"][0], kept["encoder.ln.weight"][0],
            kept["heads.head.weight"][1]]
    for i in range(2):
        blk = f"encoder.layers.encoder_layer_{i}"
        same += [kept[f"{blk}.ln_1.weight"][0], kept[f"{blk}.ln_2.weight"][0],
                 kept[f"{blk}.self_attention.out_proj.weight"][0], kept[f"{blk}.mlp.3.weight"][0],
                 kept[f"{blk}.self_attention.in_proj_weight"][1]]
    assert len(ref) < 32 and all(k == ref for k in same)
    assert r["max_rel_error"] < 1e-4 and out.encoder.ln.normalized_shape == (len(ref),)


def test_masked_norm_reference_is_what_a_smaller_layer_norm_computes():
    """Removing channels from a LayerNorm is not zeroing them: the reference renormalises."""
    from oba_fx.masking import masked_norm

    torch.manual_seed(0)
    ln = nn.LayerNorm(6).eval()
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-1, 1)
    x = torch.randn(3, 6)
    keep = torch.tensor([1.0, 0, 1, 1, 0, 1])
    idx = keep.nonzero().ravel()
    small = F.layer_norm(x[:, idx], (4,), ln.weight[idx], ln.bias[idx], ln.eps)
    torch.testing.assert_close(masked_norm(x * keep, keep, ln.weight, ln.bias, ln.eps, rms=False)[:, idx], small)
    assert not torch.allclose(ln(x * keep)[:, idx], small, atol=1e-3)


def test_embed_width_prunes_rms_norm_channels():
    """RMSNorm channels removed with embed_width: the slimmed norm equals the renormalised reference."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.RMSNorm(8), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2)).eval()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    out = oba_fx.prune_graph(model, torch.randn(3, 4), channel_ratio=0.4, embed_width=True)
    kept = out.meta["oba"]["kept"]
    assert len(kept["1.weight"][0]) < 8 and kept["0.weight"][0] == kept["1.weight"][0]
    assert out.get_submodule("1").normalized_shape == (len(kept["1.weight"][0]),)
    assert out.meta["oba"]["max_rel_error"] < 1e-4


@pytest.mark.parametrize("name", ["swin", "convnext", "maxvit"])
def test_embed_width_prunes_and_verifies_other_transformers(name):
    torch.manual_seed(0)
    model, x = SMALL[name][0]().eval(), torch.randn(2, 3, 32, 32)
    out = oba_fx.prune_graph(model, x, criterion="l1", target_flops=0.6, embed_width=True, verbose=False)
    r = out.meta["oba"]
    assert r["flops_after"] <= 0.6 * r["flops_before"] and r["max_rel_error"] < 1e-4 and r["barriers"] == []
    assert r["units_prunable"] > _prune(name, "l1")[2].meta["oba"]["units_prunable"]  # the width joined


# ------------------------------------------------------------------ the real torchvision models (-m zoo)
@pytest.mark.zoo
@pytest.mark.parametrize("criterion", ["l1", "oba"])
@pytest.mark.parametrize("name", ["vit_b_16", "swin_t", "convnext_tiny", "maxvit_t"])
def test_torchvision_transformers_prune_heads_and_neurons(name, criterion):
    """Random weights, 224x224, one synthetic calibration batch of 2: the FLOPs drop to 50 %,
    slimmed == masked (checked inside prune_graph), no barriers, heads reported per block (and
    some removed by oba)."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 224, 224, generator=gen)
    data = [(torch.randn(2, 3, 224, 224, generator=gen), torch.randint(0, 1000, (2,), generator=gen))]
    out = oba_fx.prune_graph(model, x, criterion=criterion, target_flops=0.5,
                             data=None if criterion == "l1" else data, verbose=False)
    r = out.meta["oba"]
    assert r["flops_after"] <= 0.5 * r["flops_before"] and r["barriers"] == [] and r["max_rel_error"] < 1e-4
    n_attention = {"vit_b_16": 12, "swin_t": 12, "convnext_tiny": 0, "maxvit_t": 22}[name]
    assert len(r["heads"]) == n_attention
    if criterion == "oba":  # random init gives every head nearly the same L1 norm: l1 removes MLP neurons first
        assert n_attention == 0 or sum(b - a for b, a in r["heads"].values()) > 0
