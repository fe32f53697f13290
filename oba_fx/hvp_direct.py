"""The fused HVP program generated directly from the model's FX graph (no ``make_fx`` trace).

:func:`build_direct_program` walks the model's ``torch.fx`` graph once and writes the fused
forward-over-reverse product with ``v = θ`` (``docs/design.md`` "The fused HVP") layer by layer,
with the simplifications of :mod:`oba_fx.hvp_simplify` built into each rule:

* a convolution / linear layer ``Y = W ⋆ X + b``: ``Ẏ = Y + W ⋆ Ẋ``; backward ``X̄ = Wᵀ ⋆ Ȳ``,
  ``Ẋ̄ = Wᵀ ⋆ Ȳ̇ + X̄``, ``(Hθ)_W = corr(Ẋ, Ȳ) + corr(X, Ȳ̇)``, ``(Hθ)_b = Σ Ȳ̇``;
* BatchNorm with running statistics, ``Y = x̂ γ + β``, ``x̂ = (X − μ) r``: ``Ẏ = s Ẋ + Y``
  (``s = γ r``); ``X̄ = s Ȳ``, ``Ẋ̄ = s Ȳ̇ + X̄``, ``(Hθ)_γ = Σ (Ȳ̇ x̂ + Ȳ Ẋ r)``;
* ReLU, max-pooling, and ops linear in their input (add, slicing, padding, average pooling,
  reshapes, eval-mode dropout): their second derivative is zero, so tangent and pullback are
  the op's own (pulled back twice: ``Ȳ`` and ``Ȳ̇``);
* LayerNorm, exact GELU and scaled-dot-product attention, written out by hand
  (:mod:`oba_fx.hvp_direct_tf`);
* a parameter read as a tensor (``get_attr``: a class token, a position embedding, a functional
  layer's weight): its tangent is itself, its adjoint's tangent is its ``(Hθ)``;
* **every other node** (``call_function``, ``call_method``, a leaf module with or without its own
  parameters): the generic rule of :mod:`oba_fx.hvp_generic` runs it as ``f(X, θ_own)`` and
  differentiates that one op exactly with ``torch.func`` (``jvp`` forward; ``vjp`` and the ``jvp``
  of the ``vjp`` backward), non-tensor arguments passed through;
* the loss head: ``c = ∂ℓ/∂z`` (held fixed for ``hessian="functional"``; with its tangent
  ``∇²_z ℓ ż`` for ``"full"``).

Exact zeros are decided while generating (a tensor has a tangent only if a scored parameter
reaches it), so the program holds no zero arithmetic; it costs 2 convolutions per layer forward
and 4 backward (2x a gradient's 3). A frozen parameter has tangent zero. The program reads
every tensor from its placeholders (an :class:`~oba_fx.hvp_program.HVPProgram`), works for any
batch size, and is generated in milliseconds, CNNs and transformers alike. What is not one fixed
function of its inputs raises :class:`UnsupportedGraph` (:mod:`oba_fx.hvp_direct_refuse`: random
ops, train-mode BatchNorm / dropout, attention dropout, an in-place op on a tensor other nodes
read, several model inputs); :mod:`oba_fx.hvp_cache` then uses the ``make_fx`` program or the
eager path.

Example:
    >>> import torch
    >>> from oba_fx.hvp import fused_hvp
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
    ...                         torch.nn.Flatten(), torch.nn.Linear(12, 2)).double().eval()
    >>> x, y = torch.randn(4, 2, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    >>> prog = build_direct_program(m, hessian="full")
    >>> r, ref = prog(m, x, y), fused_hvp(m, (x, y), hessian="full")
    >>> all(torch.allclose(r.hvps[n], ref.hvps[n]) for n in ref.hvps)
    True
"""

from __future__ import annotations

import logging
import operator
from typing import Any, Sequence

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from . import hvp_direct_ops as R
from . import hvp_direct_refuse as X
from .hvp_direct_generic_rules import TransformerAndGenericRules
from .hvp_direct_refuse import UnsupportedGraph
from .hvp_generic import add_tree
from .hvp import LossFn, check_hessian, default_loss_fn, split_state, trainable_param_names
from .hvp_program import HVPProgram, training_flags

log = logging.getLogger(__name__)


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: parameter-free modules linear in their input (dropout only in eval mode)
_LINEAR_MODULES = (nn.Identity, nn.Flatten, nn.Dropout, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                   nn.AdaptiveAvgPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_PIECEWISE_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_LINEAR_FUNCTIONS = {operator.getitem, F.pad, torch.flatten, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                     F.adaptive_avg_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, torch.mean, torch.sum,
                     torch.reshape, torch.permute, torch.transpose, F.dropout, operator.neg, torch.neg}
_PIECEWISE_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d}
_LINEAR_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "mean", "sum", "squeeze",
                   "unsqueeze", "neg", "expand"}
_RELUS = {F.relu, torch.relu}
_ADDS = {operator.add, torch.add}


def _tuple(v: Any, d: int) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [v] * d


class _Generator(TransformerAndGenericRules):
    """One pass over ``gm``'s nodes writing the forward (primal, tangent), then one in reverse
    writing the backward (adjoint, its tangent)."""

    #: use the hand-written LayerNorm / GELU / attention rules (False: the generic rule; for
    #: benchmarks/hvp_direct_vit.py, which measures both)
    transformer_rules = True

    def __init__(self, gm: torch.fx.GraphModule, names: Sequence[str], frozen: Sequence[str],
                 buffers: Sequence[str], loss_fn: LossFn, hessian: str, with_grad: bool) -> None:
        self.gm, self.with_grad, self.full = gm, with_grad, hessian == "full"
        self.loss_fn = loss_fn
        self.modules = dict(gm.named_modules())
        self.g = torch.fx.Graph()
        self.root = nn.Module()
        self.names, self.scored = list(names), set(names)
        self.ph: dict[str, torch.fx.Node] = {}
        for prefix, group in (("p", names), ("f", frozen), ("b", buffers)):
            for n in group:
                self.ph[n] = self.g.placeholder(prefix + "_" + "".join(c if c.isalnum() else "_" for c in n))
        self.x, self.y = self.g.placeholder("x"), self.g.placeholder("y")
        self.primal: dict[torch.fx.Node, Any] = {}
        self.tangent: dict[torch.fx.Node, torch.fx.Node | None] = {}
        self.bar: dict[torch.fx.Node, list] = {}
        self.grads: dict[str, list] = {n: [] for n in names}
        self.hvps: dict[str, list] = {n: [] for n in names}
        self.users_left: dict[torch.fx.Node, int] = {}
        #: nodes written by the generic rule (their output may be a tuple)
        self.generic_nodes: set[torch.fx.Node] = set()

    # -- emission helpers ------------------------------------------------------------------
    def call(self, fn: Any, *args: Any, **kwargs: Any) -> torch.fx.Node:
        return self.g.call_function(fn, args, kwargs)

    def add(self, a: Any, b: Any) -> Any:
        if a is None:
            return b
        return a if b is None else self.call(operator.add, a, b)

    def item(self, node: torch.fx.Node, i: int) -> torch.fx.Node:
        return self.call(operator.getitem, node, i)

    def active(self, arg: Any) -> bool:
        return isinstance(arg, torch.fx.Node) and self.tangent.get(arg) is not None

    def any_active(self, args: Any) -> bool:
        found = []
        torch.fx.node.map_arg(args, lambda n: found.append(self.active(n)))
        return any(found)

    def p(self, arg: Any) -> Any:
        return torch.fx.node.map_arg(arg, lambda n: self.primal[n])

    def param(self, module_name: str, attr: str) -> tuple[Any, bool]:
        """(placeholder or None, scored?) of a module's parameter."""
        if getattr(self.modules[module_name], attr, None) is None:
            return None, False
        full = f"{module_name}.{attr}" if module_name else attr
        return self.ph[full], full in self.scored

    def buffer(self, module_name: str, attr: str) -> Any:
        return self.ph[f"{module_name}.{attr}" if module_name else attr]

    def pull(self, node: Any, g: Any, dg: Any) -> None:
        """Add ``(g, dg)`` to the adjoint of ``node`` (if it carries a tangent)."""
        if not self.active(node):
            return
        acc = self.bar.setdefault(node, [None, None])
        if node in self.generic_nodes:  # tuples, and None at run time, add part by part
            acc[0], acc[1] = (a if b is None else b if a is None else self.call(add_tree, a, b)
                              for a, b in ((acc[0], g), (acc[1], dg)))
        else:
            acc[0], acc[1] = self.add(acc[0], g), self.add(acc[1], dg)

    def to_param(self, name: str, grad: Any, hv: Any) -> None:
        if self.with_grad and grad is not None:
            self.grads[name].append(grad)
        if hv is not None:
            self.hvps[name].append(hv)

    # -- the two passes --------------------------------------------------------------------
    def run(self) -> torch.fx.GraphModule:
        rules = []
        out_node = None
        for node in self.gm.graph.nodes:
            if node.op == "output":
                out_node = node.args[0]
                continue
            backward = self.forward(node)
            if backward is not None:
                rules.append((node, backward))
        if not isinstance(out_node, torch.fx.Node):
            raise UnsupportedGraph("the model must return one logits tensor")
        head = self.call(R.loss_head(self.loss_fn, self.full), self.primal[out_node], self.tangent.get(out_node),
                         self.y)
        loss = self.item(head, 0)
        self.pull(out_node, self.item(head, 1), self.item(head, 2) if self.full else None)
        for node, backward in reversed(rules):
            if node in self.bar:
                backward(*self.bar.pop(node))
        outs = [loss]
        if self.with_grad:
            outs += [self.total(n, self.grads[n]) for n in self.names]
        outs += [self.total(n, self.hvps[n]) for n in self.names]
        self.g.output(tuple(outs))
        program = torch.fx.GraphModule(self.root, self.g, "FusedHVPProgram")
        program.graph.eliminate_dead_code()
        program.graph.lint()
        program.recompile()
        return program

    def total(self, name: str, parts: list) -> torch.fx.Node:
        out = None
        for t in parts:
            out = self.add(out, t)
        return self.call(torch.zeros_like, self.ph[name]) if out is None else out

    def forward(self, node: torch.fx.Node):
        """Write ``node``'s primal and tangent; return its backward writer (or None)."""
        if node.op == "placeholder":
            if self.x in self.primal.values():
                raise UnsupportedGraph("a model with more than one input")
            self.primal[node], self.tangent[node] = self.x, None
            return None
        if node.op == "get_attr":
            return self.get_attr(node)
        if node.op == "call_module":
            return self.module_rule(node)
        if node.op in ("call_function", "call_method"):
            return self.function_rule(node)
        raise UnsupportedGraph(f"node {node.name} ({node.op})")

    # -- rules -----------------------------------------------------------------------------
    def module_rule(self, node: torch.fx.Node):
        m = self.modules[node.target]
        kind = type(m)
        if kind in _CONVS:
            return self.conv(node, m)
        if kind is nn.Linear:
            return self.linear(node, m)
        if kind in _BNS:
            return self.batchnorm(node, m)
        if kind is nn.LayerNorm and len(node.args) == 1 and not node.kwargs and self.transformer_rules:
            return self.layer_norm(node, m)
        if kind is nn.GELU and m.approximate == "none" and len(node.args) == 1 and not node.kwargs \
                and self.transformer_rules:
            return self.gelu(node)
        if next(m.parameters(recurse=True), None) is not None or next(m.buffers(), None) is not None:
            return self.generic(node)
        if kind is nn.ReLU:
            return self.relu(node, m.inplace)
        if kind in _LINEAR_MODULES or kind in _PIECEWISE_MODULES:
            if kind is nn.Dropout and m.training:
                raise UnsupportedGraph(f"module {node.target!r} (dropout in train mode)")
            self.root.add_module(node.target.replace(".", "_"), m)
            return self.unary(node, m, piecewise=kind in _PIECEWISE_MODULES)
        return self.generic(node)

    def function_rule(self, node: torch.fx.Node):
        t, method = node.target, node.op == "call_method"
        X.refuse_function(node)
        if not self.any_active(node.args) and not self.any_active(node.kwargs) or X.is_metadata(node):
            # a constant in θ (or a shape / dtype / device query): copied
            self.primal[node] = self.g.node_copy(node, lambda n: self.primal[n])
            self.tangent[node] = None
            return None
        if (not method and t in _RELUS) or (method and t == "relu"):
            return self.relu(node, bool(node.kwargs.get("inplace", False)))
        if (not method and t in _ADDS) or (method and t == "add"):
            return self.add_rule(node)
        if not method and t is F.gelu and len(node.args) == 1 and node.kwargs.get("approximate", "none") == "none" \
                and self.transformer_rules:
            return self.gelu(node)
        if not method and t is F.scaled_dot_product_attention and self.plain_attention(node) and self.transformer_rules:
            return self.attention(node)
        if not method and t is operator.getitem and node.args[0] in self.generic_nodes:
            return self.getitem_of_generic(node)
        if method and t in _LINEAR_METHODS:
            return self.unary(node, R.call_method(t), piecewise=False)
        if not method and (t in _LINEAR_FUNCTIONS or t in _PIECEWISE_FUNCTIONS):
            if t is F.pad and (node.kwargs.get("mode", "constant") != "constant" or node.kwargs.get("value") not in (None, 0)
                               or len(node.args) > 2):
                return self.generic(node)  # reflect / replicate / non-zero padding
            if t is F.dropout and len(node.args) > 2:
                return self.generic(node)  # training given positionally: refused or run as it is
            return self.unary(node, t, piecewise=t in _PIECEWISE_FUNCTIONS)
        return self.generic(node)

    def conv(self, node: torch.fx.Node, m: nn.Module):
        if m.padding_mode != "zeros" or isinstance(m.padding, str) or node.kwargs or len(node.args) != 1:
            return self.generic(node)  # padding "same" / reflect ...: run as one op
        d = m.weight.dim() - 2
        geo = (_tuple(m.stride, d), _tuple(m.padding, d), _tuple(m.dilation, d), m.groups)
        return self.layer(node, node.target, lambda x, w, b: self.call(
            torch.ops.aten.convolution.default, x, w, b, *geo[:3], False, [0] * d, geo[3]),
            lambda g, x, w: self.call(R.conv_input_grad, g, x, w, *geo),
            lambda g, x, w: self.call(R.conv_weight_grad, g, x, w, *geo), R.channel_sum)

    def linear(self, node: torch.fx.Node, m: nn.Module):
        if node.kwargs or len(node.args) != 1:
            return self.generic(node)
        return self.layer(node, node.target, lambda x, w, b: self.call(F.linear, x, w, b),
                          lambda g, x, w: self.call(torch.matmul, g, w),
                          lambda g, x, w: self.call(R.linear_weight_grad, g, x), R.linear_bias_grad, bias_dim=-1)

    def layer(self, node, name, fwd, input_grad, weight_grad, bias_sum, bias_dim: int = 1):
        """``Y = W ⋆ X + b`` (docstring of the module)."""
        xn = node.args[0]
        x, xdot = self.primal[xn], self.tangent.get(xn)
        (w, w_s), (b, b_s) = self.param(name, "weight"), self.param(name, "bias")
        y = fwd(x, w, b)
        theta = self.theta_part(y, b, w_s, b_s, bias_dim)
        ydot = self.add(fwd(xdot, w, None) if xdot is not None else None, theta)
        self.primal[node], self.tangent[node] = y, ydot
        if ydot is None:
            return None

        def backward(g, dg):
            if xdot is not None:
                xbar = input_grad(g, x, w)
                self.pull(xn, xbar, self.add(input_grad(dg, x, w) if dg is not None else None,
                                             xbar if w_s else None))
            if w_s:
                self.to_param(f"{name}.weight", weight_grad(g, x, w) if self.with_grad else None,
                              self.add(weight_grad(g, xdot, w) if xdot is not None else None,
                                       weight_grad(dg, x, w) if dg is not None else None))
            if b_s:
                self.to_param(f"{name}.bias", self.call(bias_sum, g) if self.with_grad else None,
                              self.call(bias_sum, dg) if dg is not None else None)
        return backward

    def theta_part(self, y, b, w_s: bool, b_s: bool, bias_dim: int):
        """``W_θ ⋆ X + b_θ`` with the scored entries' tangent ``θ`` and the others' zero."""
        if w_s:
            return y if (b is None or b_s) else self.call(R.sub_bias if bias_dim == 1 else operator.sub, y, b)
        if b_s:
            return self.call(R.bias_like, y, b) if bias_dim == 1 else self.call(torch.Tensor.expand_as, b, y)
        return None

    def batchnorm(self, node: torch.fx.Node, m: nn.Module):
        if m.training or not m.track_running_stats or m.running_mean is None or node.kwargs or len(node.args) != 1:
            raise UnsupportedGraph(f"module {node.target!r}: BatchNorm with batch statistics (train mode)")
        name, xn = node.target, node.args[0]
        x, xdot = self.primal[xn], self.tangent.get(xn)
        (gm_, g_s), (bt, b_s) = self.param(name, "weight"), self.param(name, "bias")
        mean, var = self.buffer(name, "running_mean"), self.buffer(name, "running_var")
        y = self.call(F.batch_norm, x, mean, var, gm_, bt, False, 0.0, m.eps)
        r = self.call(R.inv_std, var, m.eps)
        s = r if gm_ is None else self.call(operator.mul, r, gm_)
        theta = self.theta_part(y, bt, g_s, b_s, 1)
        ydot = (self.call(R.scale_add, xdot, s, theta) if xdot is not None and theta is not None
                else self.add(self.call(R.scale, xdot, s) if xdot is not None else None, theta))
        self.primal[node], self.tangent[node] = y, ydot
        if ydot is None:
            return None

        def backward(g, dg):
            if xdot is not None:
                xbar = self.call(R.scale, g, s)
                if dg is not None and g_s:
                    dxbar = self.call(R.scale_add, dg, s, xbar)
                else:
                    dxbar = self.add(self.call(R.scale, dg, s) if dg is not None else None, xbar if g_s else None)
                self.pull(xn, xbar, dxbar)
            if g_s:
                grad = None
                if self.with_grad:
                    grad = self.call(R.channel_sum, self.call(operator.mul, g, self.call(R.normalised, x, mean, r)))
                hv = (self.call(R.bn_weight_hvp, g, dg, x, xdot, mean, r) if dg is not None or xdot is not None
                      else None)
                self.to_param(f"{name}.weight", grad, hv)
            if b_s:
                self.to_param(f"{name}.bias", self.call(R.channel_sum, g) if self.with_grad else None,
                              self.call(R.channel_sum, dg) if dg is not None else None)
        return backward

    def relu(self, node: torch.fx.Node, inplace: bool):
        xn = node.args[0] if node.args else node.kwargs.get("input")
        if inplace and len(xn.users) > 1:
            raise UnsupportedGraph(f"node {node.name}: in-place ReLU on a tensor with other users")
        y = self.call(torch.relu, self.primal[xn])
        xdot = self.tangent.get(xn)
        self.primal[node] = y
        self.tangent[node] = self.call(R.relu_mask, xdot, y) if xdot is not None else None
        if xdot is None:
            return None

        def backward(g, dg):
            self.pull(xn, self.call(R.relu_mask, g, y), self.call(R.relu_mask, dg, y) if dg is not None else None)
        return backward

    def add_rule(self, node: torch.fx.Node):
        if len(node.args) != 2 or node.kwargs:
            return self.generic(node)  # add with alpha
        a, b = node.args
        y = self.call(operator.add, self.p(a), self.p(b))
        self.primal[node] = y
        ydot = self.add(*(self.tangent.get(v) if isinstance(v, torch.fx.Node) else None for v in (a, b)))
        self.tangent[node] = None if ydot is None else self.call(R.expand_like, ydot, y)
        if ydot is None:
            return None

        def backward(g, dg):
            for v in (a, b):
                if self.active(v):
                    pv = self.primal[v]
                    self.pull(v, self.call(R.unbroadcast, g, pv),
                              self.call(R.unbroadcast, dg, pv) if dg is not None else None)
        return backward

    def unary(self, node: torch.fx.Node, op: Any, piecewise: bool):
        """An op linear (or, ``piecewise``, piecewise linear) in its first argument."""
        if not node.args or self.any_active(node.args[1:]) or self.any_active(node.kwargs):
            return self.generic(node)  # linear in the first argument only: not this rule
        xn = node.args[0]
        if node.op == "call_module":
            y = self.g.call_module(node.target.replace(".", "_"), (self.primal[xn],) + self.p(node.args[1:]),
                                   self.p(node.kwargs))
            op = self.root.get_submodule(node.target.replace(".", "_"))
        else:
            fn = op if node.op == "call_method" else node.target
            y = self.call(fn, self.primal[xn], *self.p(node.args[1:]), **self.p(node.kwargs))
            op = fn
        x, xdot = self.primal[xn], self.tangent.get(xn)
        rest, kw = self.p(node.args[1:]), self.p(node.kwargs)
        self.primal[node] = y
        if xdot is None:
            self.tangent[node] = None
            return None
        tangent_fn = R.piecewise_jvp(op) if piecewise else R.linear_op(op)
        self.tangent[node] = (self.call(tangent_fn, x, xdot, *rest, **kw) if piecewise
                              else self.call(tangent_fn, xdot, *rest, **kw))
        vjp = R.pullback(op)

        def backward(g, dg):
            pair = self.call(vjp, x, g, dg, *rest, **kw)
            self.pull(xn, self.item(pair, 0), self.item(pair, 1) if dg is not None else None)
        return backward


def build_direct_program(model: nn.Module, *, param_names: Sequence[str] | None = None,
                         loss_fn: LossFn | None = None, hessian: str = "functional",
                         with_grad: bool = True) -> HVPProgram:
    """Generate the fused program from ``model``'s FX graph (traced if it is not a GraphModule).

    Args:
        model: an ``nn.Module`` or ``torch.fx.GraphModule`` in its scoring mode (baked in).
        param_names, loss_fn, hessian, with_grad: as in :func:`oba_fx.hvp_program.build_hvp_program`.

    Returns:
        An :class:`~oba_fx.hvp_program.HVPProgram` valid for any batch size.

    Raises:
        UnsupportedGraph: a node without a rule (see the module docstring), hooks, or shared
            parameters.
    """
    check_hessian(hessian)
    names = tuple(param_names) if param_names is not None else tuple(trainable_param_names(model))
    _check_plain(model)
    gm = model if isinstance(model, torch.fx.GraphModule) else _trace(model)
    scored, frozen, buffers = split_state(model, names)
    gen = _Generator(gm, names, tuple(frozen), tuple(buffers), loss_fn or default_loss_fn, hessian, with_grad)
    program = gen.run()
    stats = {"nodes": len(program.graph.nodes), "generator": "direct"}
    log.info("direct HVP program for %d parameters (%s): %d nodes", len(names), hessian, stats["nodes"])
    return HVPProgram(program, names, tuple(frozen), tuple(buffers), hessian, with_grad, None,
                      training_flags(model), loss_fn or default_loss_fn, stats)


def _check_plain(model: nn.Module) -> None:
    if len(list(model.named_parameters(remove_duplicate=False))) != len(list(model.named_parameters())):
        raise UnsupportedGraph("shared parameters")
    for name, m in model.named_modules():
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or getattr(m, "_backward_pre_hooks", None):
            raise UnsupportedGraph(f"module {name!r} has hooks")


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure means: no direct program
        raise UnsupportedGraph(f"symbolic tracing failed ({type(e).__name__}: {e})") from e
