"""The small CIFAR ViT: shapes, FX tracing, checkpoint round trip, and pruning end to end (tiny sizes)."""

from __future__ import annotations

import torch
import torch.fx

import oba_fx
from oba_fx.models import get_model, list_models, load_checkpoint
from oba_fx.models.vit_cifar import ViTCifar, load_vit_cifar, vit_cifar

TINY = dict(dim=16, depth=2, heads=2, mlp_dim=32)


def _tiny(**kw) -> ViTCifar:
    torch.manual_seed(0)
    return vit_cifar(**{**TINY, **kw}).eval()


def test_registered_with_default_size():
    assert "vit_cifar" in list_models()
    m = get_model("vit_cifar", num_classes=7)
    assert isinstance(m, ViTCifar)
    assert m.config == dict(image_size=32, patch=4, dim=128, depth=6, heads=4, mlp_dim=256,
                            num_classes=7, in_chans=3)
    assert m.blocks[0].attn.head_dim == 32


def test_output_shape_and_tokens():
    m = _tiny(num_classes=5)
    assert m.pos_embed.shape == (1, 65, 16)  # 8x8 patches of 4 + the class token
    assert m(torch.randn(3, 3, 32, 32)).shape == (3, 5)


def test_symbolic_trace_matches_eager():
    m = _tiny()
    x = torch.randn(2, 3, 32, 32)
    gm = torch.fx.symbolic_trace(m)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.nn.functional.scaled_dot_product_attention in targets
    torch.testing.assert_close(gm(x), m(x))


def test_checkpoint_round_trip(tmp_path):
    m = _tiny(heads=4)
    f = tmp_path / "vit.pt"
    torch.save({"model": "vit_cifar", "config": m.config, "state_dict": m.state_dict(), "epochs": 0}, f)
    x = torch.randn(2, 3, 32, 32)
    loaded = load_vit_cifar(f)
    assert loaded.blocks[1].attn.num_heads == 4
    torch.testing.assert_close(loaded(x), m(x))
    # the generic loader fills a model built with the same config
    torch.testing.assert_close(load_checkpoint(vit_cifar(**m.config), f).eval()(x), m(x))


def test_prune_l1_runs_and_reports():
    m = _tiny()
    x = torch.randn(2, 3, 32, 32)
    out = oba_fx.prune_graph(m, x, criterion="l1", channel_ratio=0.3, verbose=False)
    assert out(x).shape == (2, 10)
    assert out(torch.randn(3, 3, 32, 32)).shape == (3, 10)  # another batch size than the example's
    r = out.meta["oba"]
    assert r["flops_after"] < r["flops_before"]
    assert r["params_after"] < r["params_before"]
    # MLP neurons are prunable (attention heads are not asserted on here)
    assert any(k.endswith("mlp.fc1.weight") for k in r["kept"])
    # the original model is untouched
    assert m.blocks[0].mlp.fc1.out_features == 32


def test_prune_with_batch_one_example_runs_other_batches():
    m = _tiny()
    out = oba_fx.prune_graph(m, torch.randn(1, 3, 32, 32), criterion="l1", channel_ratio=0.3, verbose=False)
    assert out(torch.randn(3, 3, 32, 32)).shape == (3, 10)
