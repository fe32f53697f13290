"""The Hessian block structure claimed from the graph against the dense float64 H_F.

Every block the analysis declares zero must be exactly zero (round-off only) in the dense
functional Hessian; every block it declares possibly non-zero must be non-zero for these
generic random weights (degenerate cases such as a batch on which a ReLU is dead everywhere
do not occur with these seeds; a failure there would show up as a "declared non-zero" miss).
"""

import itertools

import pytest
import torch

import oba_fx
from hessian_oracle import dense_case, math_attention, one_thread_per_test  # noqa: F401

CASES = [("tanh_mlp", "eval"), ("res_bn_cnn", "eval"), ("res_bn_cnn", "train"), ("gelu_layernorm", "eval"),
         ("self_attention", "eval"), ("se_gate", "eval"), ("attention_only", "eval"), ("transformer_block", "eval"),
         ("functional_layers", "eval"), ("functional_layers", "train")]


def _blocks(name, mode):
    """Layer names and the max |entry| of each (a, b) block of H_F, summed over the batches."""
    model, data, dense = dense_case(name, mode)
    fp = dense[0][0]
    layer_of = [n.rpartition(".")[0] for n in fp.names]
    sizes = [dict(model.named_parameters())[n].numel() for n in fp.names]
    idx, start = {}, 0
    for lay, n in zip(layer_of, sizes):
        idx.setdefault(lay, []).extend(range(start, start + n))
        start += n
    HF = sum(h.H_F.abs() for _, h in dense)
    norms = {(a, b): float(HF[idx[a]][:, idx[b]].max()) for a in idx for b in idx}
    return model, data, list(idx), norms, float(HF.max())


def _structure(model, data, mode):
    model.train(mode == "train")
    with math_attention():
        return oba_fx.hessian_structure(model, data[0][0])


@pytest.mark.parametrize("name,mode", CASES)
def test_blocks_declared_zero_are_exactly_zero(name, mode):
    model, data, layers, norms, scale = _blocks(name, mode)
    G = _structure(model, data, mode)
    for a, b in itertools.combinations_with_replacement(layers, 2):
        if not G.has_edge(a, b):
            assert norms[a, b] <= 1e-12 * scale, f"block ({a}, {b}) declared zero is {norms[a, b]:.3g}"


@pytest.mark.parametrize("name,mode", CASES)
def test_blocks_declared_nonzero_are_nonzero(name, mode):
    model, data, layers, norms, scale = _blocks(name, mode)
    G = _structure(model, data, mode)
    for a, b in G.edges:
        assert norms[a, b] > 1e-8 * scale, f"block ({a}, {b}) declared {G.edges[a, b]['kind']} is zero"


def test_relu_residual_cnn_has_no_self_blocks_and_all_series_blocks():
    model, data, layers, _, _ = _blocks("res_bn_cnn", "eval")
    G = _structure(model, data, "eval")
    assert not any(a == b for a, b in G.edges)
    assert G.edges["conv1", "fc"]["kind"] == "series" and G.has_edge("conv1", "conv2")


def test_tanh_mlp_has_self_blocks():
    model, data, layers, _, _ = _blocks("tanh_mlp", "eval")
    G = _structure(model, data, "eval")
    assert G.has_edge("fc1", "fc1") and G.has_edge("fc2", "fc2")


def test_attention_has_parallel_qk_and_qkv_blocks():
    model, data, _, _, _ = _blocks("self_attention", "eval")
    G = _structure(model, data, "eval")
    assert G.edges["q", "k"]["kind"] == "parallel" and G.has_edge("q", "v") and G.has_edge("k", "v")
    assert not G.has_edge("v", "v")  # v reaches only one operand of A @ v and no smooth op


def test_sdpa_has_qk_and_qkv_blocks_and_no_vv_block():
    """q, k, v Linears feeding ``F.scaled_dot_product_attention`` directly (no LayerNorm, no
    residual): among q, k and v the declared blocks are exactly q–q, k–k, q–k, q–v, k–v, with the
    three cross blocks parallel, and these are exactly the non-zero ones of the dense H_F (v–v,
    linear in the value operand and after it, is an exact zero)."""
    model, data, _, norms, scale = _blocks("attention_only", "eval")
    expected = {("q", "q"), ("k", "k"), ("q", "k"), ("q", "v"), ("k", "v")}
    pairs = list(itertools.combinations_with_replacement(["q", "k", "v"], 2))
    dense_nonzero = {(a, b) for a, b in pairs if norms[a, b] > 1e-8 * scale}
    assert dense_nonzero == expected, f"dense H_F non-zero blocks among q, k, v: {sorted(dense_nonzero)}"
    G = _structure(model, data, "eval")
    declared = {(a, b) for a, b in pairs if G.has_edge(a, b)}
    assert declared == expected, f"declared blocks among q, k, v: {sorted(declared)}"
    assert all(G.edges[a, b]["kind"] == "parallel" for a, b in [("q", "k"), ("q", "v"), ("k", "v")])


def test_functional_layers_are_series_like_their_modules():
    """``F.batch_norm`` / ``F.group_norm`` / ``F.conv2d`` on module tensors: each weight has a
    series block with what reaches its input and no block of its own (nothing smooth follows
    the GroupNorm), while the GroupNorm, smooth in its input, gives every layer upstream one."""
    G = _structure(*_blocks("functional_layers", "eval")[:2], "eval")
    assert G.edges["conv", "bn"]["kind"] == "series" and G.edges["conv2", "gn"]["kind"] == "series"
    assert G.edges["gn", "fc"]["kind"] == "series" and not G.has_edge("gn", "gn")
    assert all(G.has_edge(a, a) for a in ("conv", "bn", "conv2"))
