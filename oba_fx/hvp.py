"""Fused loss, gradient and Hessian-vector product ``H θ`` in one dual forward and one backward.

This module is pure algorithm (it never imports ``oba_fx.passes``). Notation as in DESIGN.md §2:
``θ`` the scored parameters, ``z`` the logits, ``ℓ(z)`` the loss of a batch,
``c = ∂ℓ/∂z``, ``J = ∂z/∂θ``, ``v`` the tangent (``v = θ`` for OBA).

**The computation.** One dual (primal + tangent) forward of the model gives ``z`` and
``ż = J v`` while reverse mode records; then one backward pulls ``c`` back to the parameters.
The backward runs on dual tensors, so it returns at once

* its primal, ``Jᵀ c = g`` (the gradient), and
* its tangent, ``d/dt [J(θ + t v)ᵀ c(t)]``: with ``c`` held fixed (``stopgrad(∂ℓ/∂z)``,
  ``hessian="functional"``) this is ``Σ_k c_k ∇²_θ z_k · v = H_F v``; with ``c`` carrying its own
  tangent ``∇²_z ℓ · ż`` (``hessian="full"``) the extra term is ``Jᵀ ∇²_z ℓ J v = H_GN v``, riding
  the same backward, and the result is ``H v``.

By symmetry of second derivatives this equals ``∇_θ ⟨stopgrad(c), ż⟩`` (+ ``∇_θ ⟨stopgrad(∇²_z ℓ ż),
z⟩``), the reverse-over-forward form of DESIGN.md §2, at the same cost. Per conv / linear layer
(counting convolutions; one gradient costs 1 forward + 2 backward = 3): eagerly, the dual forward
runs ``Y``, ``W ⋆ Ẋ`` and ``θ ⋆ X`` and the backward the input- and weight-gradients of the
primal and of their tangents: 9, i.e. 3× a gradient. The generated program (below) shares
``θ ⋆ X = Y`` and ``convᵀ(ȳ, θ) = convᵀ(ȳ, W)``: 7 (2.33×), or 6 (2.0×) without the gradient
as an output. The forward-over-reverse order is
used because, in torch 2.14.1, the *backward of a forward-mode tangent* is wrong for LayerNorm
and for BatchNorm in train mode (their tangent formulas treat the saved mean and inverse standard
deviation as constants), while the tangent of the backward is exact; the tests check every
toy model against dense double-backward Hessians. ``c`` and ``∇²_z ℓ ż`` come from the loss head
only (a ``grad`` and a ``jvp`` of ``grad`` of ``loss_fn`` at the logits), so any twice
differentiable ``loss_fn(logits, y)`` works. Scaled-dot-product attention runs its math kernel
(the fused CPU kernel has no second derivative).

**The generated program.** :func:`build_hvp_program` traces the same computation in its
``torch.func`` form (``jvp`` of ``vjp``) with ``make_fx`` (functionalised; scored parameters,
other parameters, buffers, inputs and targets as explicit placeholders) into one aten-level
``torch.fx.GraphModule`` and simplifies it using that the tangent *is* ``θ``: aliases and
detaches are dropped, exact zeros are propagated (the input's zero tangent), and
common-subexpression elimination finds that the tangent ``conv(X, θ)`` is the primal
``conv(X, W)`` (``Ẏ = Y + W ⋆ Ẋ``, DESIGN.md §2) and that the backward's ``convᵀ(ȳ, θ)`` is the
primal input-gradient; dead code is removed (without ``with_grad`` the primal weight-gradients go
too). The program gives the eager numbers to round-off.

**Modes.** Whatever mode the module is in is what is differentiated: in eval mode BatchNorm's
running statistics are constants; in train mode the batch statistics are part of the function
(exact for that function). Buffers are always passed as copies, so running statistics are never
updated and the module is never mutated.

Example:
    >>> import torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    >>> r = fused_hvp(m, (x, y), hessian="full")
    >>> sorted(r.hvps) == sorted(n for n, _ in m.named_parameters())
    True
    >>> g = torch.autograd.grad(torch.nn.functional.cross_entropy(m(x), y), m[0].weight)[0]
    >>> torch.allclose(r.grads["0.weight"], g)
    True
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, grad_and_value, jvp, vjp

log = logging.getLogger(__name__)

#: the Hessians :func:`fused_hvp` can multiply by
HESSIAN_MODES = ("functional", "full")

#: make_fx tracing mode ("fake" traces without running the kernels: faster, same graph)
_TRACING_MODE = "fake"

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]


def default_loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy, the default ``loss_fn``."""
    return F.cross_entropy(logits, target)


def check_hessian(hessian: str) -> str:
    """Return ``hessian`` if it is one of :data:`HESSIAN_MODES`, else raise ``ValueError``.

    Example:
        >>> check_hessian("gauss_newton")
        Traceback (most recent call last):
        ...
        ValueError: unknown hessian 'gauss_newton'; expected one of ('functional', 'full')
    """
    if hessian not in HESSIAN_MODES:
        raise ValueError(f"unknown hessian {hessian!r}; expected one of {HESSIAN_MODES}")
    return hessian


def trainable_param_names(model: nn.Module) -> list[str]:
    """Names of the floating-point parameters of ``model`` that require grad (the default set).

    Example:
        >>> m = torch.nn.Linear(2, 2)
        >>> m.bias.requires_grad_(False)  # doctest: +ELLIPSIS
        Parameter containing:
        ...
        >>> trainable_param_names(m)
        ['weight']
    """
    return [n for n, p in model.named_parameters() if p.is_floating_point() and p.requires_grad]


@dataclass(frozen=True)
class HVPResult:
    """What one fused pass returns.

    Attributes:
        loss: the batch loss ``ℓ(z)`` (a 0-d tensor, detached).
        grads: ``{name: g}`` for the scored parameters (empty when not requested).
        hvps: ``{name: (H v)}`` for the scored parameters, ``H`` per ``hessian``.
        hessian: ``"functional"`` or ``"full"``.
    """

    loss: torch.Tensor
    grads: dict[str, torch.Tensor]
    hvps: dict[str, torch.Tensor]
    hessian: str


# --------------------------------------------------------------------------------------------
# the fused computation: torch.func form (traced into the program) and autograd form (eager)
# --------------------------------------------------------------------------------------------


def _split_state(model: nn.Module, names: Sequence[str]) -> tuple[dict, dict, dict]:
    """(scored params, other params, buffers) of ``model`` as plain detached tensors."""
    wanted = set(names)
    params = dict(model.named_parameters())
    missing = wanted - set(params)
    if missing:
        raise KeyError(f"not parameters of the model: {sorted(missing)}")
    scored = {n: params[n].detach() for n in names}
    frozen = {n: p.detach() for n, p in params.items() if n not in wanted}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    return scored, frozen, buffers


def _math_attention():
    """Scaled-dot-product attention on its (twice differentiable) math kernel."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _model_call(model: nn.Module, frozen: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor],
                x: Any) -> Callable[[dict], torch.Tensor]:
    def call(p: dict) -> torch.Tensor:
        bufs = {n: b.clone() for n, b in buffers.items()}  # train-mode BN updates only these copies
        out = functional_call(model, ({**frozen, **p}, bufs), (x,))
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the model must return a logits tensor, got {type(out).__name__}")
        return out
    return call


def _fused_fn(model: nn.Module, loss_fn: LossFn, hessian: str) -> Callable:
    """``f(scored, tangents, frozen, buffers, x, y) -> (loss, grads, hvps)`` (dicts), all with
    ``torch.func`` (``jvp`` of ``vjp``), so that it can be functionalised and traced.

    ``tangents=None`` means ``v = θ`` (the scored parameters' own values).
    """
    full = hessian == "full"

    def fused(scored: dict, tangents: dict | None, frozen: dict, buffers: dict, x: Any, y: Any):
        call = _model_call(model, frozen, buffers, x)

        def backward(p: dict):
            z, pullback = vjp(call, p)
            c, loss = grad_and_value(lambda logits: loss_fn(logits, y))(z if full else z.detach())
            (g,) = pullback(c)
            return g, loss

        v = tangents if tangents is not None else {n: t.detach() for n, t in scored.items()}
        g, hv, loss = jvp(backward, (scored,), (v,), has_aux=True)
        return loss, g, hv

    return fused


def _fused_eager(model: nn.Module, names: Sequence[str], loss_fn: LossFn, hessian: str,
                 tangents: Mapping[str, torch.Tensor] | None, x: Any, y: Any):
    """The same computation with ``torch.autograd.forward_ad`` and ``torch.autograd.grad``
    (less dispatch overhead than the nested ``torch.func`` transforms in eager mode)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    leaves = {n: params[n].detach().requires_grad_() for n in names}
    frozen = {n: p for n, p in params.items() if n not in leaves}
    with torch.enable_grad(), fwAD.dual_level():
        duals = {n: fwAD.make_dual(leaves[n], (tangents[n] if tangents is not None else params[n]).detach())
                 for n in names}
        z = _model_call(model, frozen, buffers, x)(duals)
        z_p, z_t = fwAD.unpack_dual(z)
        logits = z_p.detach().requires_grad_()
        loss = loss_fn(logits, y)
        (c,) = torch.autograd.grad(loss, logits, create_graph=hessian == "full")
        if hessian == "full":
            t = torch.zeros_like(z_p) if z_t is None else z_t.detach()
            (hz,) = torch.autograd.grad(c, logits, grad_outputs=t)
            c = fwAD.make_dual(c.detach(), hz)
        gs = _pull_back(z, list(leaves.values()), c)
        grads, hvps = {}, {}
        for n, g in zip(names, gs):
            primal, tangent = fwAD.unpack_dual(g) if g is not None else (None, None)
            grads[n] = torch.zeros_like(leaves[n]) if primal is None else primal.detach()
            hvps[n] = torch.zeros_like(leaves[n]) if tangent is None else tangent.detach()
    return loss.detach(), grads, hvps


def _pull_back(z: torch.Tensor, leaves: list[torch.Tensor], c: torch.Tensor):
    """``Jᵀ c`` on dual tensors. Some backward kernels (SiLU's, Mish's in torch 2.14.1) have no
    forward-mode formula; with ``create_graph`` autograd runs their differentiable
    decompositions instead (same numbers, more memory), so that is the fallback."""
    try:
        return torch.autograd.grad(z, leaves, grad_outputs=c, allow_unused=True, retain_graph=True)
    except NotImplementedError as e:
        if "forward AD" not in str(e):
            raise
        log.info("retrying the backward with create_graph=True (%s)", e)
        return torch.autograd.grad(z, leaves, grad_outputs=c, allow_unused=True, create_graph=True)


def fused_hvp(model: nn.Module, batch: tuple[Any, Any], *, param_names: Sequence[str] | None = None,
              loss_fn: LossFn | None = None, hessian: str = "functional",
              tangents: Mapping[str, torch.Tensor] | None = None) -> HVPResult:
    """Loss, gradient and ``H v`` of one batch in one dual forward and one backward (eager).

    Args:
        model: an ``nn.Module`` or ``torch.fx.GraphModule`` returning logits; used in its current
            train/eval mode (see the module docstring) and never mutated.
        batch: ``(x, y)``; ``x`` is passed to the model, ``y`` to ``loss_fn``.
        param_names: the parameters ``θ`` (default :func:`trainable_param_names`). The others are
            constants, so the result is the ``θ`` block of the Hessian times ``v``.
        loss_fn: ``loss_fn(logits, y) -> scalar``; default mean cross-entropy. Must be twice
            differentiable in the logits when ``hessian="full"``.
        hessian: ``"functional"`` (``H_F v``, the network's own curvature weighted by ``∂ℓ/∂z``)
            or ``"full"`` (``H v``).
        tangents: ``{name: v}``; default ``v = θ`` (the OBA quantity).

    Returns:
        :class:`HVPResult`; a parameter the loss does not depend on gets zeros.

    Example:
        >>> m = torch.nn.Linear(3, 2).double()
        >>> x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
        >>> r = fused_hvp(m, (x, y))            # a linear model has no functional curvature
        >>> float(r.hvps["weight"].abs().max())
        0.0
    """
    check_hessian(hessian)
    names = list(param_names) if param_names is not None else trainable_param_names(model)
    _split_state(model, names)  # validates the names
    x, y = batch
    with _math_attention():
        loss, grads, hvps = _fused_eager(model, names, loss_fn or default_loss_fn, hessian, tangents, x, y)
    return HVPResult(loss, grads, hvps, hessian)


# --------------------------------------------------------------------------------------------
# the generated program
# --------------------------------------------------------------------------------------------


def _signature(x: Any, y: Any) -> tuple:
    def sig(t: Any) -> Any:
        if isinstance(t, torch.Tensor):
            return (tuple(t.shape), t.dtype, t.device.type)
        return type(t).__name__
    return sig(x), sig(y)


def _training_flags(model: nn.Module) -> tuple[bool, ...]:
    return tuple(m.training for m in model.modules())


@dataclass
class HVPProgram:
    """A generated, simplified aten-level FX program computing ``(loss, grads..., hvps...)``.

    Call it with the model whose state to read: ``program(model, x, y) -> HVPResult``. It is
    specialised to the traced input shapes, dtypes and train/eval flags (:meth:`matches`).

    Attributes:
        graph_module: the program; placeholders are the scored parameters, the other parameters,
            the buffers (in the orders below), then ``x`` and ``y``; outputs are
            ``(loss, *grads, *hvps)`` in ``param_names`` order (no grads if not ``with_grad``).
        param_names: order of the scored parameters.
        frozen_names: order of the other parameters.
        buffer_names: order of the buffers.
        hessian: ``"functional"`` or ``"full"``.
        with_grad: whether gradients are outputs.
        signature: shapes / dtypes of ``(x, y)`` it was traced for.
        training: the modules' ``training`` flags at trace time.
        loss_fn: the loss it was generated for.
        stats: node and op counts before and after simplification.
    """

    graph_module: torch.fx.GraphModule
    param_names: tuple[str, ...]
    frozen_names: tuple[str, ...]
    buffer_names: tuple[str, ...]
    hessian: str
    with_grad: bool
    signature: tuple
    training: tuple[bool, ...]
    loss_fn: LossFn = default_loss_fn
    stats: dict = field(default_factory=dict)

    def matches(self, model: nn.Module, x: Any, y: Any) -> bool:
        """Whether this program applies to ``model`` in its current mode and this batch."""
        return _signature(x, y) == self.signature and _training_flags(model) == self.training

    def inputs(self, model: nn.Module, x: Any, y: Any) -> list:
        """The flat input list for :attr:`graph_module`."""
        params = dict(model.named_parameters())
        bufs = dict(model.named_buffers())
        return ([params[n].detach() for n in self.param_names] + [params[n].detach() for n in self.frozen_names]
                + [bufs[n].detach() for n in self.buffer_names] + [x, y])

    def __call__(self, model: nn.Module, x: Any, y: Any) -> HVPResult:
        if not self.matches(model, x, y):
            raise ValueError("this HVP program was generated for other input shapes or another train/eval mode; "
                             "check program.matches(model, x, y) or generate a new one")
        with torch.no_grad():
            out = self.graph_module(*self.inputs(model, x, y))
        k = len(self.param_names)
        loss, rest = out[0], list(out[1:])
        grads = dict(zip(self.param_names, rest[:k])) if self.with_grad else {}
        hvps = dict(zip(self.param_names, rest[k:] if self.with_grad else rest))
        return HVPResult(loss, grads, hvps, self.hessian)


def build_hvp_program(model: nn.Module, batch: tuple[Any, Any], *, param_names: Sequence[str] | None = None,
                      loss_fn: LossFn | None = None, hessian: str = "functional", with_grad: bool = True,
                      simplify: bool = True) -> HVPProgram:
    """Generate the fused program (tangent ``v = θ``) for batches shaped like ``batch``.

    Args:
        model: as in :func:`fused_hvp` (its current train/eval mode is baked in).
        batch: an example ``(x, y)``; it is run once while tracing.
        param_names, loss_fn, hessian: as in :func:`fused_hvp`.
        with_grad: also output the gradients (else dead-code elimination drops the primal
            weight-gradients: about one conv / matmul per layer less).
        simplify: run :func:`simplify_hvp_graph` (else the raw ``make_fx`` trace).

    Returns:
        An :class:`HVPProgram`.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
        >>> prog = build_hvp_program(m, (x, y), hessian="full")
        >>> ref = fused_hvp(m, (x, y), hessian="full")
        >>> torch.allclose(prog(m, x, y).hvps["0.weight"], ref.hvps["0.weight"])
        True
    """
    from torch.func import functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    check_hessian(hessian)
    names = tuple(param_names) if param_names is not None else tuple(trainable_param_names(model))
    scored, frozen, buffers = _split_state(model, names)
    loss_fn = loss_fn or default_loss_fn
    fn = _fused_fn(model, loss_fn, hessian)
    frozen_names, buffer_names = tuple(frozen), tuple(buffers)
    k, kf, kb = len(names), len(frozen_names), len(buffer_names)

    def flat(*args):
        p = dict(zip(names, args[:k]))
        fz = dict(zip(frozen_names, args[k:k + kf]))
        bf = dict(zip(buffer_names, args[k + kf:k + kf + kb]))
        x, y = args[k + kf + kb:]
        loss, g, hv = fn(p, None, fz, bf, x, y)
        return (loss, *[g[n] for n in names if with_grad], *[hv[n] for n in names])

    x, y = batch
    args = [scored[n] for n in names] + [frozen[n] for n in frozen_names] + [buffers[n] for n in buffer_names] + [x, y]
    with _math_attention():
        gm = make_fx(functionalize(flat, remove="mutations"), tracing_mode=_TRACING_MODE)(*args)
    _name_placeholders(gm, [f"p_{n}" for n in names] + [f"f_{n}" for n in frozen_names]
                       + [f"b_{n}" for n in buffer_names] + ["x", "y"])
    stats = {"nodes_traced": len(gm.graph.nodes)}
    if simplify:
        stats.update(simplify_hvp_graph(gm))
    stats["nodes"] = len(gm.graph.nodes)
    log.info("HVP program for %d parameters (%s): %d nodes traced, %d after simplification",
             k, hessian, stats["nodes_traced"], stats["nodes"])
    return HVPProgram(gm, names, frozen_names, buffer_names, hessian, with_grad, _signature(x, y),
                      _training_flags(model), loss_fn, stats)


def _name_placeholders(gm: torch.fx.GraphModule, names: Sequence[str]) -> None:
    """Give the program's placeholders readable names (best effort)."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(phs) != len(names):
        return
    for node, name in zip(phs, names):
        safe = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in name)
        try:
            node._rename(safe)
            node.target = node.name
        except Exception:  # pragma: no cover - private API; names are cosmetic
            return
    gm.recompile()


# --------------------------------------------------------------------------------------------
# graph simplification (valid for the functionalised make_fx trace of the fused function)
# --------------------------------------------------------------------------------------------

aten = torch.ops.aten


def _ops(*names: str) -> frozenset:
    out = set()
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(aten, packet, None)
        if op is not None and hasattr(op, overload or "default"):
            out.add(getattr(op, overload or "default"))
    return frozenset(out)


_IDENTITY = _ops("alias.default", "detach.default", "alias_copy.default", "detach_copy.default",
                 "lift_fresh_copy.default")
_ZERO_MAKERS = _ops("zeros.default", "zeros_like.default", "new_zeros.default", "_efficientzerotensor.default")
_FILLS = _ops("full.default", "full_like.default", "new_full.default", "fill.Scalar")
#: ops whose result is zero when their first argument is
_ZERO_IF_FIRST = _ops("view.default", "_unsafe_view.default", "reshape.default", "expand.default", "t.default",
                      "transpose.int", "permute.default", "unsqueeze.default", "squeeze.default", "squeeze.dim",
                      "squeeze.dims", "clone.default", "slice.Tensor", "select.int", "_to_copy.default",
                      "contiguous.default", "neg.default", "sum.default", "sum.dim_IntList", "mean.default",
                      "mean.dim", "div.Tensor", "div.Scalar", "mul.Scalar", "threshold_backward.default",
                      "repeat.default", "unfold.default", "expand_copy.default", "view_copy.default",
                      "t_copy.default", "permute_copy.default", "transpose_copy.int", "unsqueeze_copy.default",
                      "squeeze_copy.dim", "squeeze_copy.dims", "_unsafe_view.default", "select_copy.int",
                      "slice_copy.Tensor", "avg_pool2d.default",
                      "avg_pool2d_backward.default", "_adaptive_avg_pool2d.default",
                      "_adaptive_avg_pool2d_backward.default", "max_pool2d_with_indices_backward.default",
                      "gelu_backward.default", "tanh_backward.default", "sigmoid_backward.default")
#: ops whose result is zero when any of their first two (tensor) arguments is
_ZERO_IF_ANY2 = _ops("mul.Tensor", "mm.default", "bmm.default", "matmul.default")
_ADD, _SUB = _ops("add.Tensor"), _ops("sub.Tensor")
_ADDMM = _ops("addmm.default")
_CONV = _ops("convolution.default")
_CONV_BWD = _ops("convolution_backward.default")


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _same_shape(a: Any, b: Any) -> bool:
    va, vb = _val(a), _val(b)
    return (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.shape == vb.shape
            and va.dtype == vb.dtype)


_SAME_SHAPE_VIEWS = _ops("expand.default", "view.default", "_unsafe_view.default", "reshape.default")
_TO_COPY = _ops("_to_copy.default")


def _is_identity(node: torch.fx.Node) -> bool:
    """An alias, a same-shape view / expand, or a ``_to_copy`` that changes nothing."""
    t = node.target
    if not isinstance(node.args[0] if node.args else None, torch.fx.Node) or not _same_shape(node, node.args[0]):
        return False
    if t in _IDENTITY or t in _SAME_SHAPE_VIEWS:
        return True
    if t in _TO_COPY:
        src = _val(node.args[0])
        kw = dict(node.kwargs)
        return (set(kw) <= {"dtype", "layout", "device", "non_blocking"} and kw.get("dtype", src.dtype) == src.dtype
                and kw.get("layout", torch.strided) == src.layout
                and torch.device(kw.get("device", src.device)) == src.device)
    return False


def _drop_identities(graph: torch.fx.Graph) -> int:
    n_done = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and _is_identity(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            n_done += 1
    return n_done


def _split_conv_backward(graph: torch.fx.Graph) -> int:
    """One ``convolution_backward`` per used output, with the unused ``bias_sizes`` normalised."""
    n_done = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _CONV_BWD:
            continue
        mask = list(node.args[10])
        users = [u for u in node.users if u.op == "call_function" and u.target is operator.getitem]
        if len(users) != len(node.users):
            continue
        used = sorted({u.args[1] for u in users})
        if len(used) == 1 and mask == [i == used[0] for i in range(3)] and (used[0] == 2 or node.args[3] is None):
            continue
        for i in used:
            args = list(node.args)
            args[10] = [j == i for j in range(3)]
            if i != 2:
                args[3] = None
            with graph.inserting_before(node):
                new = graph.call_function(aten.convolution_backward.default, tuple(args))
                new.meta = dict(node.meta)
                item = graph.call_function(operator.getitem, (new, i))
                item.meta["val"] = node.meta["val"][i] if isinstance(node.meta.get("val"), (tuple, list)) else None
            for u in [u for u in users if u.args[1] == i]:
                u.replace_all_uses_with(item)
                graph.erase_node(u)
        graph.erase_node(node)
        n_done += 1
    return n_done


def _is_zero_const(node: Any, zero: set) -> bool:
    return isinstance(node, torch.fx.Node) and node in zero


def _propagate_zeros(graph: torch.fx.Graph) -> int:
    """Mark tensors that are exactly zero and fold them away (``a + 0 → a``, ``0 · b → 0``...)."""
    zero: set = set()
    n_done = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        t, a = node.target, node.args
        z = False
        if t in _ZERO_MAKERS:
            z = True
        elif t in _FILLS:
            val = a[-1] if t is not aten.full.default else a[1]
            z = isinstance(val, (int, float)) and val == 0
        elif t in _ZERO_IF_FIRST:
            z = _is_zero_const(a[0], zero)
        elif t in _ZERO_IF_ANY2:
            z = _is_zero_const(a[0], zero) or _is_zero_const(a[1], zero)
        elif t in _CONV:
            z = (_is_zero_const(a[0], zero) or _is_zero_const(a[1], zero)) and (a[2] is None or a[2] in zero)
        elif t in _CONV_BWD:
            mask = list(a[10])
            if sum(mask) == 1:
                i = mask.index(True)
                z = _is_zero_const(a[0], zero) or (i == 0 and a[2] in zero) or (i == 1 and a[1] in zero)
        elif t is operator.getitem and isinstance(a[0], torch.fx.Node) and a[0] in zero:
            z = True
        elif t in _ADD or t in _SUB:
            lhs, rhs = a[0], a[1]
            alpha = node.kwargs.get("alpha", 1)
            if _is_zero_const(lhs, zero) and _is_zero_const(rhs, zero):
                z = True
            elif _is_zero_const(rhs, zero) and _same_shape(node, lhs):
                node.replace_all_uses_with(lhs)
                graph.erase_node(node)
                n_done += 1
                continue
            elif t in _ADD and alpha == 1 and _is_zero_const(lhs, zero) and _same_shape(node, rhs):
                node.replace_all_uses_with(rhs)
                graph.erase_node(node)
                n_done += 1
                continue
        elif t in _ADDMM and len(a) == 3 and not node.kwargs:
            if _is_zero_const(a[1], zero) or _is_zero_const(a[2], zero):
                z = a[0] in zero
        if not z:
            continue
        zero.add(node)
        if t in _ZERO_MAKERS or t in _FILLS or t is operator.getitem:
            continue
        val = _val(node)
        if not isinstance(val, torch.Tensor):
            continue
        with graph.inserting_before(node):
            new = graph.call_function(aten.zeros.default, (list(val.shape),),
                                      {"dtype": val.dtype, "device": val.device})
            new.meta["val"] = val
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        zero.add(new)
        n_done += 1
    return n_done


def _addmm_to_mm(graph: torch.fx.Graph) -> int:
    """``addmm(b, A, B) → mm(A, B) + b``, so that a tangent ``mm(X, θᵀ)`` can reuse the primal."""
    n_done = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _ADDMM and len(node.args) == 3 and not node.kwargs:
            b, m1, m2 = node.args
            with graph.inserting_before(node):
                mm = graph.call_function(aten.mm.default, (m1, m2))
                out = graph.call_function(aten.add.Tensor, (mm, b))
            val = _val(node)
            mm.meta["val"] = val
            out.meta["val"] = val
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            n_done += 1
    return n_done


def _freeze(arg: Any) -> Any:
    if isinstance(arg, (list, tuple)):
        return tuple(_freeze(a) for a in arg)
    if isinstance(arg, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in arg.items()))
    if isinstance(arg, float) and math.isnan(arg):
        return ("nan",)
    return arg


def _cse_key(node: torch.fx.Node) -> Any:
    t = node.target
    if t in _CONV_BWD and list(node.args[10]) == [True, False, False]:
        # the input-gradient depends on the input only through its shape, dtype and layout
        v = _val(node.args[1])
        if isinstance(v, torch.Tensor):
            args = list(node.args)
            args[1] = ("like", tuple(v.shape), tuple(v.stride()), v.dtype)
            return (t, _freeze(args), _freeze(node.kwargs))
    return (t, _freeze(node.args), _freeze(node.kwargs))


def _cse(graph: torch.fx.Graph) -> int:
    seen: dict = {}
    n_done = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        t = node.target
        if isinstance(t, torch._ops.OpOverload):
            if t._schema.is_mutable or torch.Tag.nondeterministic_seeded in t.tags:
                continue
        elif t is not operator.getitem:
            continue
        try:
            key = _cse_key(node)
            hash(key)
        except TypeError:
            continue
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
            n_done += 1
        else:
            seen[key] = node
    return n_done


def simplify_hvp_graph(gm: torch.fx.GraphModule, max_rounds: int = 4) -> dict[str, int]:
    """Simplify a functionalised ``make_fx`` trace of the fused function in place.

    Rewrites (each exact for a functionalised, mutation-free trace): drop aliases, detaches,
    same-shape views and no-op ``_to_copy``;
    ``addmm → mm + add``; split ``convolution_backward`` per used output; propagate exact zeros;
    common-subexpression elimination (deterministic, non-mutating ops; input-gradients of a
    convolution keyed by the input's shape instead of its value); dead-code elimination.
    Rounds repeat until nothing changes.

    Returns:
        counts of each rewrite.

    Example:
        >>> from torch.fx.experimental.proxy_tensor import make_fx
        >>> def f(a, b):
        ...     return torch.mm(a, b.detach()) + torch.mm(a, b) + torch.zeros_like(a) @ b
        >>> gm = make_fx(f)(torch.randn(2, 2), torch.randn(2, 2))
        >>> stats = simplify_hvp_graph(gm)
        >>> sum(n.target is torch.ops.aten.mm.default for n in gm.graph.nodes)
        1
    """
    g = gm.graph
    counts = {"identities": 0, "addmm": 0, "conv_backward_split": 0, "zeros": 0, "cse": 0}
    counts["addmm"] += _addmm_to_mm(g)
    counts["conv_backward_split"] += _split_conv_backward(g)
    for _ in range(max_rounds):
        changed = 0
        for key, rewrite in (("identities", _drop_identities), ("zeros", _propagate_zeros), ("cse", _cse)):
            k = rewrite(g)
            counts[key] += k
            changed += k
        g.eliminate_dead_code()
        if not changed:
            break
    g.lint()
    gm.recompile()
    return counts

