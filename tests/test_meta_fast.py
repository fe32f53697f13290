"""The meta-device shortcuts of oba_fx.meta_fast give exactly what the ops themselves give."""

import itertools
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from oba_fx import meta_fast


def _same(fast: torch.Tensor, real: torch.Tensor) -> None:
    assert (fast.shape, fast.stride(), fast.dtype, fast.device) == (real.shape, real.stride(), real.dtype, real.device)


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _tensors():
    base = [torch.empty(0), torch.empty(()), torch.empty(5), torch.empty(2, 3), torch.empty(1, 4, 1, 1),
            torch.empty(1, 1, 3, 3), torch.empty(2, 3, 4, 5), torch.empty(1, 3, 1, 5), torch.empty(2, 3, 1, 4, 5),
            torch.empty(1, 2, 1, 1, 1), torch.empty(2, 0, 3, 3)]
    out = []
    for t in base:
        out += [t, t.requires_grad_(t.is_floating_point()) if t.dim() else t]
        if t.dim() >= 2:
            out += [t.transpose(0, 1), t[..., ::2] if t.shape[-1] else t, t.unsqueeze(0).expand(3, *t.shape)]
        if t.dim() == 4:
            out.append(t.contiguous(memory_format=torch.channels_last))
            out.append(t.permute(0, 2, 3, 1))
        if t.dim() == 5:
            out.append(t.contiguous(memory_format=torch.channels_last_3d))
    return out + [t.to("meta") for t in out] + [torch.empty(2, 3, dtype=torch.int64)]


def test_tensor_metadata_equals_torch_fx_on_every_layout():
    for t in _tensors():
        assert meta_fast.tensor_metadata(t) == _extract_tensor_metadata(t), (t.shape, t.stride())


def test_like_keeps_shape_and_strides_as_empty_like():
    for t in _tensors():
        if t.device.type == "meta":
            _same(meta_fast.like(t), torch.empty_like(t))


_LAYERS = [
    (nn.Conv2d(4, 6, 3), (2, 4, 9, 7)),
    (nn.Conv2d(4, 6, 3, stride=2, padding=1), (1, 4, 8, 8)),
    (nn.Conv2d(4, 8, (3, 1), stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2), (1, 4, 11, 5)),
    (nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), (1, 6, 1, 1)),
    (nn.Conv2d(1, 3, 1), (1, 1, 1, 1)),
    (nn.Conv2d(3, 3, 1), (1, 3, 4, 4)),
    (nn.Conv1d(3, 5, 3, padding=2), (2, 3, 6)),
    (nn.Conv3d(2, 4, 3, stride=2), (1, 2, 5, 6, 7)),
    (nn.Linear(5, 3), (4, 5)),
    (nn.Linear(5, 3, bias=False), (2, 7, 5)),
    (nn.Linear(5, 1), (1, 5)),
    (nn.Linear(5, 3), (2, 3, 4, 5)),
    (nn.Linear(5, 3), (5,)),
    (nn.AdaptiveAvgPool2d(1), (1, 8, 7, 7)),
    (nn.AdaptiveAvgPool2d((3, None)), (2, 4, 7, 5)),
    (nn.AdaptiveAvgPool2d(2), (1, 8, 1, 3)),
    (nn.AdaptiveAvgPool2d(1), (1, 2, 1, 3)),
    (nn.AdaptiveAvgPool1d(2), (2, 3, 5)),
    (nn.AdaptiveAvgPool3d((1, 2, 2)), (1, 2, 3, 4, 5)),
]


@pytest.mark.parametrize("layer,shape", _LAYERS, ids=[f"{type(m).__name__}{s}" for m, s in _LAYERS])
def test_module_result_equals_the_layer_on_meta(layer, shape):
    m = layer.to("meta").eval()
    x = _meta(*shape)
    fast = meta_fast.module_result(m, x)
    assert fast is not None
    _same(fast, m(x))


@pytest.mark.parametrize("layer,shape", _LAYERS[:12], ids=[f"{type(m).__name__}{s}" for m, s in _LAYERS[:12]])
def test_conv_and_linear_results_equal_the_layer_on_any_input_layout(layer, shape):
    m = layer.to("meta").eval()
    x = _meta(*reversed(shape)).permute(*reversed(range(len(shape))))  # every stride reversed
    _same(meta_fast.module_result(m, x), m(x))
    if len(shape) == 4:
        x = _meta(*shape).contiguous(memory_format=torch.channels_last)
        _same(meta_fast.module_result(m, x), m(x))


def test_module_result_is_the_result_once_the_weights_are_on_meta():
    x = _meta(1, 4, 8, 8)
    conv = nn.Conv2d(4, 6, 3, stride=2)
    _same(meta_fast.module_result(conv, x), conv.to("meta")(x))


def test_module_result_leaves_what_it_cannot_vouch_for_to_torch():
    x = _meta(1, 4, 8, 8)
    assert meta_fast.module_result(nn.Conv2d(3, 6, 3).to("meta"), x) is None  # channel mismatch: torch raises
    assert meta_fast.module_result(nn.Conv2d(4, 6, 3, padding="same").to("meta"), x) is None
    assert meta_fast.module_result(nn.Conv2d(4, 6, 3, padding_mode="reflect").to("meta"), x) is None
    assert meta_fast.module_result(nn.Conv2d(4, 6, 9).to("meta"), x) is None  # kernel larger than input
    assert meta_fast.module_result(nn.Conv2d(4, 6, 3).to("meta"), _meta(4, 8, 8)) is None  # unbatched
    assert meta_fast.module_result(nn.AdaptiveAvgPool2d(1), x.contiguous(memory_format=torch.channels_last)) is None
    assert meta_fast.module_result(nn.Conv2d(4, 6, 3).to("meta"), _meta(1, 4, 8, 8, dtype=torch.float64)) is None
    assert meta_fast.module_result(type("MyConv", (nn.Conv2d,), {})(4, 6, 3).to("meta"), x) is None
    assert meta_fast.module_result(nn.Linear(3, 2).to("meta"), _meta(2, 4)) is None
    assert meta_fast.module_result(nn.AdaptiveAvgPool2d(1), _meta(8, 7, 7)) is None
    assert meta_fast.module_result(nn.AdaptiveAvgPool2d(1), _meta(1, 1, 3, 3)) is None  # contiguous and channels-last


def _operand_pairs():
    cl = _meta(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    pairs = [(_meta(*s), _meta(*s)) for s in [(5,), (2, 3), (1, 4, 1, 1), (2, 3, 4, 5), (1, 2, 3, 1, 1)]]
    pairs += [(_meta(2, 3, 4, 4), _meta(2, 3, 1, 1)), (_meta(1, 3, 1, 1), _meta(1, 3, 4, 4)),
              (_meta(1, 6, 1, 1), _meta(1, 6, 1, 1)), (_meta(4, 1), _meta(3)), (_meta(5), _meta(2, 1, 5)),
              (cl, _meta(2, 3, 1, 1)), (cl, cl), (cl, _meta(2, 3, 4, 5)), (_meta(2, 3).t(), _meta(3, 2)),
              (_meta(1, 3, 1, 1).contiguous(memory_format=torch.channels_last), _meta(1, 3, 7, 7))]
    return pairs


@pytest.mark.parametrize("fn", [operator.add, operator.mul, torch.add, torch.mul])
def test_function_result_equals_the_op_for_broadcasting_operands(fn):
    for x, y in _operand_pairs():
        for args in [(x, y), (y, x), (x, 2.0), (3, y)]:
            _same(meta_fast.function_result(fn, args, {}), fn(*args))


def test_method_result_equals_the_tensor_method():
    for x, y in _operand_pairs():
        _same(meta_fast.method_result("mul", (x, y), {}), x.mul(y))


def test_binary_shortcuts_leave_mixed_dtypes_and_other_ops_to_torch():
    x = _meta(2, 3, 4, 4)
    assert meta_fast.function_result(operator.mul, (x, _meta(2, 5, 1, 1)), {}) is None  # torch raises
    assert meta_fast.function_result(operator.add, (x, _meta(2, 3, 4, 4, dtype=torch.float16)), {}) is None
    assert meta_fast.function_result(torch.add, (x, x), {"alpha": 2}) is None
    assert meta_fast.function_result(operator.sub, (x, x), {}) is None
    assert meta_fast.function_result(operator.add, (x, True), {}) is None
    assert meta_fast.function_result(operator.add, (x, _meta(())), {}) is None
    assert meta_fast.method_result("add_", (x, x), {}) is None


def test_shortcuts_equal_the_ops_over_a_grid_of_convolutions():
    for k, s, p, d, size in itertools.product((1, 3, 5), (1, 2, 3), (0, 1, 2), (1, 2), (1, 4, 7, 10)):
        m = nn.Conv2d(2, 3, k, stride=s, padding=p, dilation=d).to("meta")
        x = _meta(1, 2, size, size + 1)
        fast = meta_fast.module_result(m, x)
        try:
            real = m(x)
        except RuntimeError:
            assert fast is None
            continue
        _same(fast, real)


def _layouts(*shape):
    """A contiguous tensor of ``shape``, one with every stride reversed, and a channels-last one."""
    out = [_meta(*shape), _meta(*reversed(shape)).permute(*reversed(range(len(shape))))]
    if len(shape) == 4:
        out.append(_meta(*shape).contiguous(memory_format=torch.channels_last))
    return out


def test_cat_result_equals_torch_cat():
    cases = [([_meta(1, 4, 5, 5), _meta(1, 3, 5, 5)], 1), ([_meta(2, 3), _meta(2, 5), _meta(2, 1)], -1),
             ([_meta(3, 2, 2)], 0), ([_meta(1, 4, 1, 1), _meta(1, 3, 1, 1)], 1), ([_meta(2, 3, 4), _meta(5, 3, 4)], 0)]
    for tensors, dim in cases:
        fast = meta_fast.function_result(torch.cat, (tensors, dim), {})
        if all(meta_fast._plain(t) for t in tensors):
            _same(fast, torch.cat(tensors, dim))
        else:
            assert fast is None
    for x in _layouts(1, 4, 5, 5)[1:]:  # not contiguous: torch lays the result out
        assert meta_fast.function_result(torch.cat, ([x, x], 1), {}) is None
    _same(meta_fast.function_result(torch.cat, (), {"tensors": [_meta(2, 3)] * 2, "dim": 1}),
          torch.cat([_meta(2, 3)] * 2, dim=1))


def test_cat_result_leaves_mismatches_and_out_to_torch():
    a, b = _meta(1, 4, 5, 5), _meta(1, 3, 5, 6)
    assert meta_fast.function_result(torch.cat, ([a, b], 1), {}) is None  # torch raises
    assert meta_fast.function_result(torch.cat, ([a, a], 4), {}) is None
    assert meta_fast.function_result(torch.cat, ([a, a.double()], 1), {}) is None
    assert meta_fast.function_result(torch.cat, ([a, a],), {"out": a}) is None
    assert meta_fast.function_result(torch.cat, ([a, _meta(0)], 1), {}) is None


def test_layer_norm_result_equals_f_layer_norm_on_any_layout():
    for x in _layouts(2, 3, 4, 5) + _layouts(2, 7, 5):
        for args, kwargs in [((x, (5,)), {}), ((x, [5], _meta(5), _meta(5), 1e-6), {}),
                             ((x, (5,)), {"weight": _meta(5), "eps": 1e-6})]:
            _same(meta_fast.function_result(F.layer_norm, args, kwargs), F.layer_norm(*args, **kwargs))


def test_layer_norm_result_leaves_ambiguous_layouts_to_torch():
    for x in [_meta(1, 5, 1, 1).permute(0, 2, 3, 1), _meta(1, 1, 5, 5).transpose(2, 3), _meta(1, 1, 5, 5)]:
        assert meta_fast.function_result(F.layer_norm, (x, (5,)), {}) is None


def test_layer_norm_result_leaves_shape_mismatches_to_torch():
    x = _meta(2, 3, 4, 5)
    assert meta_fast.function_result(F.layer_norm, (x, (4,)), {}) is None
    assert meta_fast.function_result(F.layer_norm, (x, (5,), _meta(4)), {}) is None
    assert meta_fast.function_result(F.layer_norm, (x, (5,), _meta(5, dtype=torch.float64)), {}) is None


def test_mean_result_equals_tensor_mean_over_listed_dims():
    checked = 0
    for x in _layouts(2, 8, 5, 5) + _layouts(1, 6, 7, 7) + _layouts(3, 4, 5) + [_meta(2, 3), _meta(4, 1, 3, 3)]:
        for k in range(1, x.dim() + 1):
            for dims in itertools.combinations(range(-x.dim(), 0), k):
                for keep in (False, True):
                    fast = meta_fast.method_result("mean", (x, list(dims), keep), {})
                    via_fn = meta_fast.function_result(torch.mean, (x, dims), {"keepdim": keep})
                    for got in (fast, via_fn):
                        if got is not None:
                            _same(got, x.mean(list(dims), keepdim=keep))
                            checked += 1
    assert checked > 100
    _same(meta_fast.method_result("mean", (_meta(1, 1280, 7, 7), [2, 3]), {}), _meta(1, 1280, 7, 7).mean([2, 3]))


def test_mean_result_leaves_other_uses_to_torch():
    x = _meta(2, 3, 4, 4)
    for args, kwargs in [((x,), {}), ((x, [2, 2]), {}), ((x, [4]), {}), ((x, []), {}), ((x, 1), {"dtype": torch.float64}),
                         ((x, [2, 3], True), {}), ((x.contiguous(memory_format=torch.channels_last), [1]), {}),
                         ((x, 1, False, torch.float64), {}), ((_meta(0, 3), 1), {})]:
        assert meta_fast.method_result("mean", args, kwargs) is None, (args, kwargs)


class _Attentions(nn.Module):
    """Scaled-dot-product attention four times: twice on the same layout, once on a transposed
    view, once causal with a different value width."""

    def forward(self, q, k, v, w):
        a = F.scaled_dot_product_attention(q, k, v)
        b = F.scaled_dot_product_attention(q, k, v)
        c = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        d = F.scaled_dot_product_attention(q, k, w, is_causal=True)
        return a, b, c, d


def test_memoized_attention_layouts_equal_the_op_on_meta_for_each_call():
    from oba_fx.meta_shapes import meta_shapes

    gm = torch.fx.symbolic_trace(_Attentions())
    inputs = (torch.randn(2, 3, 5, 4, requires_grad=True), torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4),
              torch.randn(2, 3, 5, 6))
    meta_shapes(gm, inputs)
    on_meta = [t.to("meta").requires_grad_(t.requires_grad) for t in inputs]
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    got = [(tm.shape, tm.stride, tm.dtype, tm.requires_grad) for tm in (n.meta["tensor_meta"] for n in out)]
    want = [(e.shape, e.stride(), e.dtype, e.requires_grad) for e in _Attentions()(*on_meta)]
    assert got == want
    assert got[2][1] != got[0][1] and got[3][0][-1] == 6  # the other layouts were not taken from the memo
