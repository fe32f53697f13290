"""Rules of the directly generated fused HVP program (:mod:`oba_fx.hvp_direct`) beyond CNN ops:
LayerNorm, exact GELU and scaled-dot-product attention by hand (:mod:`oba_fx.hvp_direct_tf`),
parameters read with ``get_attr``, and the generic rule that differentiates any other node
exactly with ``torch.func`` at run time (:mod:`oba_fx.hvp_generic`).

:class:`TransformerAndGenericRules` is a mixin of the generator: its methods use the generator's
state (``primal``, ``tangent``, placeholders ``ph``, ``scored``) and helpers (``call``, ``item``,
``pull``, ``to_param``) and, like every rule, return the node's backward step or ``None``.

Example:
    >>> import torch
    >>> from oba_fx.hvp import fused_hvp
    >>> from oba_fx.hvp_direct import build_direct_program
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6), torch.nn.GELU(),
    ...                         torch.nn.Linear(6, 3)).double().eval()
    >>> x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    >>> r, ref = build_direct_program(m)(m, x, y), fused_hvp(m, (x, y))
    >>> all(torch.allclose(r.hvps[n], ref.hvps[n]) for n in ref.hvps)
    True
"""

from __future__ import annotations

import logging

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from . import hvp_direct_ops as R
from . import hvp_direct_refuse as X
from . import hvp_direct_tf as T
from .hvp_direct_refuse import UnsupportedGraph
from .hvp_generic import NodeFn, getitem_backward, getitem_forward

log = logging.getLogger(__name__)


class TransformerAndGenericRules:
    """Rules for LayerNorm, GELU, attention, ``get_attr`` and every node without a specific rule."""

    def layer_norm(self, node: torch.fx.Node, m: nn.Module):
        """LayerNorm over the last ``len(normalized_shape)`` dims (:mod:`oba_fx.hvp_direct_tf`)."""
        name, xn = node.target, node.args[0]
        x, xdot = self.primal[xn], self.tangent.get(xn)
        (w, w_s), (b, b_s) = self.param(name, "weight"), self.param(name, "bias")
        k = len(m.normalized_shape)
        out = self.call(T.layer_norm_forward, x, xdot, w, b, w_s, b_s, k, m.eps)
        y = self.item(out, 0)
        self.primal[node] = y
        if xdot is None and not w_s and not b_s:
            self.tangent[node] = None
            return None
        self.tangent[node] = self.item(out, 1)
        xhat, r, xhat_dot, mm = (self.item(out, i) for i in range(2, 6))

        def backward(g, dg):
            res = self.call(T.layer_norm_backward, g, dg, xhat, r, xhat_dot if xdot is not None else None,
                            mm if xdot is not None else None, w, w_s, k, xdot is not None)
            if xdot is not None:
                self.pull(xn, self.item(res, 0), self.item(res, 1))
            if w_s:
                self.to_param(f"{name}.weight", self.item(res, 2) if self.with_grad else None, self.item(res, 3))
            if b_s:
                self.to_param(f"{name}.bias", self.item(res, 4) if self.with_grad else None,
                              self.item(res, 5) if dg is not None else None)
        return backward

    def gelu(self, node: torch.fx.Node):
        """Exact GELU, elementwise: ``Ẏ = f' Ẋ``, ``Ẋ̄ = f' Ȳ̇ + f'' Ẋ Ȳ``."""
        xn = node.args[0]
        x, xdot = self.primal[xn], self.tangent.get(xn)
        if xdot is None:
            self.primal[node], self.tangent[node] = self.call(F.gelu, x), None
            return None
        out = self.call(T.gelu_forward, x, xdot)
        self.primal[node], self.tangent[node] = self.item(out, 0), self.item(out, 1)
        d1, d2 = self.item(out, 2), self.item(out, 3)

        def backward(g, dg):
            pair = self.call(T.gelu_backward, d1, d2, xdot, g, dg)
            self.pull(xn, self.item(pair, 0), self.item(pair, 1))
        return backward

    def plain_attention(self, node: torch.fx.Node) -> bool:
        """q, k, v positional, a constant mask, no dropout / causal flag / GQA: the hand-written rule."""
        allowed = {"attn_mask", "scale", "dropout_p", "is_causal", "enable_gqa"}
        kw = node.kwargs
        return (len(node.args) == 3 and set(kw) <= allowed and not self.active(kw.get("attn_mask"))
                and kw.get("dropout_p", 0.0) in (0, 0.0) and not kw.get("is_causal", False)
                and not kw.get("enable_gqa", False) and not isinstance(kw.get("scale"), torch.fx.Node))

    def attention(self, node: torch.fx.Node):
        """Scaled-dot-product attention (:mod:`oba_fx.hvp_direct_tf`)."""
        qkv = node.args
        prim = [self.primal[a] for a in qkv]
        tans = [self.tangent.get(a) for a in qkv]
        mask = self.p(node.kwargs.get("attn_mask"))
        out = self.call(T.attention_forward, *prim, *tans, mask, node.kwargs.get("scale"))
        self.primal[node], self.tangent[node] = self.item(out, 0), self.item(out, 1)
        a, adot, scale = (self.item(out, i) for i in (2, 3, 4))
        need = tuple(t is not None for t in tans)

        def backward(g, dg):
            res = self.call(T.attention_backward, *prim, *tans, a, adot, scale, g, dg, need)
            bars, dbars = self.item(res, 0), self.item(res, 1)
            for i, an in enumerate(qkv):
                if need[i]:
                    self.pull(an, self.item(bars, i), self.item(dbars, i))
        return backward

    def get_attr(self, node: torch.fx.Node):
        """A parameter read as a tensor (``cls_token``, ``F.conv2d(x, self.conv.weight)``): its
        tangent is itself if scored; its adjoint and the adjoint's tangent are its gradient and
        ``(Hθ)``. A buffer is a constant; another tensor attribute is copied into the program."""
        name = node.target
        if name in self.ph:
            self.primal[node] = self.ph[name]
            self.tangent[node] = self.ph[name] if name in self.scored else None
            if name not in self.scored:
                return None

            def backward(g, dg):
                self.to_param(name, g if self.with_grad else None, dg)
            return backward
        obj = self.gm
        for part in name.split("."):
            obj = getattr(obj, part)
        if not isinstance(obj, torch.Tensor) or isinstance(obj, nn.Parameter):
            raise UnsupportedGraph(f"get_attr {name!r} ({type(obj).__name__})")
        attr = "c_" + "".join(c if c.isalnum() else "_" for c in name)
        setattr(self.root, attr, obj)
        self.primal[node], self.tangent[node] = self.g.get_attr(attr), None
        return None

    def getitem_of_generic(self, node: torch.fx.Node):
        """``x[i]`` of a generic node's output, which may be a tuple (``chunk``, a module returning
        several tensors) or a tensor."""
        xn, index = node.args[0], self.p(node.args[1])
        out = self.call(getitem_forward, self.primal[xn], self.tangent[xn], index)
        y = self.item(out, 0)
        self.primal[node], self.tangent[node] = y, self.item(out, 1)
        self.generic_nodes.add(node)

        def backward(g, dg):
            pair = self.call(getitem_backward, self.primal[xn], index, g, dg)
            self.pull(xn, self.item(pair, 0), self.item(pair, 1) if dg is not None else None)
        return backward

    def generic(self, node: torch.fx.Node):
        """Any other node, as ``Y = f(X, θ_own)`` differentiated exactly by ``torch.func`` at run
        time (:mod:`oba_fx.hvp_generic`): its inputs with a tangent and its own scored parameters
        are the variables, everything else (frozen parameters, buffers, non-tensor arguments) is
        held constant."""
        module, scored, others = None, [], []
        if node.op == "call_module":
            module = self.modules[node.target]
            X.refuse_module(node.target, module)
            for pname, _ in module.named_parameters():
                (scored if f"{node.target}.{pname}" in self.scored else others).append(pname)
            others += [bname for bname, _ in module.named_buffers()]
            op = module
        else:
            X.refuse_function(node)
            op = node.target
        op, args, kwargs = X.out_of_place(node, op)
        if node.op == "call_method":
            op = R.call_method(op)
        if isinstance(op, nn.Module):
            module = op
        flat = NodeFn.flat_values(args, kwargs)
        active = [i for i, a in enumerate(flat) if self.active(a)]
        attention = module is not None or op is F.scaled_dot_product_attention
        full = (lambda n: f"{node.target}.{n}")
        fn = NodeFn.build(op, args, kwargs, active, module=module, scored=tuple(scored), others=tuple(others),
                          attention=attention)
        values = [self.primal[a] if isinstance(a, torch.fx.Node) else a for a in flat]
        sp = [self.ph[full(n)] for n in scored]
        op_ = [self.ph[full(n)] for n in others]
        if not active and not scored:
            self.primal[node], self.tangent[node] = self.call(fn.value, values, op_), None
            return None
        tans = [self.tangent[flat[i]] for i in active]
        out = self.call(fn.forward, values, tans, sp, op_)
        y = self.item(out, 0)
        self.primal[node], self.tangent[node] = y, self.item(out, 1)
        self.generic_nodes.add(node)
        log.debug("generic rule for node %s", node.name)

        def backward(g, dg):
            res = self.call(fn.backward, values, tans, sp, op_, y, g, dg)
            xbar, xdbar, pbar, pdbar = (self.item(res, k) for k in range(4))
            for k, i in enumerate(active):
                self.pull(flat[i], self.item(xbar, k), self.item(xdbar, k))
            for k, n in enumerate(scored):
                self.to_param(full(n), self.item(pbar, k) if self.with_grad else None, self.item(pdbar, k))
        return backward
