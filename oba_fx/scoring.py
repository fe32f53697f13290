"""Per-parameter importance scores from calibration batches (OBA, Taylor, OBD) and data-free ones.

:func:`score` returns, for every parameter of the model, a tensor of the parameter's shape: the
mean over batches of the per-batch score. The second-order quantities come from
:mod:`oba_fx.hvp` (one dual forward and one backward per batch, exact ``H θ``).

**Mode.** By default the model is scored in **eval mode**: BatchNorm uses its running
statistics, which are constants, so each sample's loss depends on that sample alone (what the
pruned network computes at inference, and what per-sample gradients assume), and dropout is
off. ``mode="train"`` scores the train-mode function instead (batch statistics are then part of
the function, exactly differentiated); ``mode="keep"`` uses the modes the modules are in. In
every case the model is never mutated: parameters are read, buffers are passed as copies (running
statistics are not updated) and every module's ``training`` flag is restored.

Example:
    >>> import torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> data = [(torch.randn(8, 3), torch.randint(0, 2, (8,))) for _ in range(2)]
    >>> s = score(m, data, criterion="oba", hessian="full", progress=False)
    >>> {k: tuple(v.shape) for k, v in s.items()}
    {'0.weight': (4, 3), '0.bias': (4,), '2.weight': (2, 4), '2.bias': (2,)}
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap

from . import meta as M
from .hvp import (HESSIAN_MODES, HVPProgram, _math_attention, LossFn, build_hvp_program, check_hessian, default_loss_fn,
                  fused_hvp)

log = logging.getLogger(__name__)

#: criteria that need calibration data
DATA_CRITERIA = ("oba", "taylor", "obd_fisher", "obd_hutchinson")
#: criteria computed from the weights alone
DATA_FREE_CRITERIA = ("l1", "l2", "random")
#: every criterion :func:`score` accepts
CRITERIA = DATA_CRITERIA + DATA_FREE_CRITERIA
#: scoring modes
MODES = ("eval", "train", "keep")


def score(model: nn.Module, data: Iterable | None, *, example_inputs: Any = None, criterion: str = "oba",
          hessian: str = "functional", loss_fn: LossFn | None = None, first_order: float = 0.0,
          max_batches: int | None = None, probes: int = 16, seed: int = 0, progress: bool = True,
          mode: str = "eval") -> dict[str, torch.Tensor]:
    """Per-parameter scores, averaged over calibration batches.

    Criteria (``θ`` a parameter, ``g`` the batch gradient, ``H`` the batch Hessian over *all*
    floating parameters of the model, ``⊙`` elementwise):

    * ``"oba"``: ``θ ⊙ (H θ) + first_order · θ ⊙ g``, with ``H`` the functional Hessian ``H_F``
      (``hessian="functional"``, the OBA paper's quantity) or the full ``H`` (``"full"``).
      Note the sign: the Taylor loss change of removing ``θ`` is ``−gᵀθ + ½ θᵀHθ``, so the
      design's ``−λ θ g`` is ``first_order=−λ``.
    * ``"taylor"``: ``θ ⊙ g``.
    * ``"obd_fisher"``: ``θ² ⊙ diag(F)`` with the empirical Fisher
      ``F = (1/N) Σ_n g_n g_nᵀ``, ``g_n = ∇_θ loss_fn(z_n, y_n)`` the gradient of sample ``n``'s
      loss (``loss_fn`` applied to a batch of that one sample's logits) and ``N`` the batch size;
      so ``diag(F) = (1/N) Σ_n g_n²``. Per-sample gradients use ``torch.func.vmap(grad)`` when
      every module is in eval mode, else one forward of the whole batch and one backward per
      sample (exact when batch statistics couple the samples).
    * ``"obd_hutchinson"``: ``θ² ⊙ d`` with ``d = (1/K) Σ_k r_k ⊙ (H r_k)`` the Hutchinson
      estimate of ``diag(H)`` (full Hessian) from ``K = probes`` Rademacher vectors per batch.
    * data-free: ``"l1"`` ``|θ|``, ``"l2"`` ``θ²``, ``"random"`` uniform ``[0, 1)`` noise drawn
      from ``torch.Generator().manual_seed(seed)`` (float32, in parameter order, then cast).

    Args:
        model: an ``nn.Module`` or ``torch.fx.GraphModule`` returning logits. Never mutated.
        data: an iterable of ``(x, y)`` batches (ignored by the data-free criteria).
        example_inputs: when given (and ``criterion="oba"``), the fused computation is generated
            once as an FX program (:func:`oba_fx.hvp.build_hvp_program`) for batches whose input
            has this shape and reused for them (cheaper per batch after a one-off trace); other
            batches run eagerly. A GraphModule whose ``meta["oba.hvp_program"]`` (written by
            ``HVPCodegen``) fits is used the same way.
        criterion: one of :data:`CRITERIA`.
        hessian: ``"functional"`` or ``"full"`` (used by ``"oba"``).
        loss_fn: ``loss_fn(logits, y) -> scalar``; default mean cross-entropy.
        first_order: weight of ``θ ⊙ g`` added to the OBA score.
        max_batches: use at most this many batches.
        probes: Rademacher probes per batch for ``"obd_hutchinson"``.
        seed: seeds the Hutchinson probes and the ``"random"`` scores.
        progress: show a tqdm bar over batches (tqdm disables itself when not on a terminal).
        mode: ``"eval"`` (default, see the module docstring), ``"train"`` or ``"keep"``.

    Returns:
        ``{name: score}`` for every ``model.named_parameters()`` name, in the parameter's shape,
        dtype and device.

    Raises:
        ValueError: unknown ``criterion``, ``hessian`` or ``mode``; no batches in ``data``.

    Example:
        >>> m = torch.nn.Linear(2, 1)
        >>> score(m, None, criterion="gradnorm")
        Traceback (most recent call last):
        ...
        ValueError: unknown criterion 'gradnorm'; expected one of ('oba', 'taylor', 'obd_fisher', \
'obd_hutchinson', 'l1', 'l2', 'random')
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; expected one of {CRITERIA}")
    check_hessian(hessian)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if criterion in DATA_FREE_CRITERIA:
        return _data_free(model, criterion, seed)
    if data is None:
        raise ValueError(f"criterion {criterion!r} needs calibration data: an iterable of (x, y) batches")

    loss_fn = loss_fn or default_loss_fn
    all_params = dict(model.named_parameters())
    names = [n for n, p in all_params.items() if p.is_floating_point()]
    device = next(iter(all_params.values())).device if all_params else torch.device("cpu")
    totals = {n: torch.zeros_like(p, memory_format=torch.contiguous_format) for n, p in all_params.items()}
    gen = torch.Generator().manual_seed(seed)
    programs: dict = {}
    n_batches = 0
    log.info("scoring %d parameter tensors with %r (hessian=%s, mode=%s)", len(names), criterion, hessian, mode)
    with _scoring_mode(model, mode):
        for batch in _progress(data, max_batches, progress, criterion):
            x, y = _to_device(batch[0], device), _to_device(batch[1], device)
            if criterion == "oba":
                per = _oba(model, x, y, names, loss_fn, hessian, first_order, example_inputs, programs)
            elif criterion == "taylor":
                per = {n: all_params[n].detach() * g for n, g in _gradient(model, x, y, names, loss_fn).items()}
            elif criterion == "obd_fisher":
                fisher = empirical_fisher_diagonal(model, (x, y), param_names=names, loss_fn=loss_fn)
                per = {n: all_params[n].detach().square() * d for n, d in fisher.items()}
            else:
                diag = hutchinson_diagonal(model, (x, y), probes, param_names=names, loss_fn=loss_fn, generator=gen)
                per = {n: all_params[n].detach().square() * d for n, d in diag.items()}
            for n, s in per.items():
                totals[n] += s
            n_batches += 1
    if n_batches == 0:
        raise ValueError("no batches: `data` yielded nothing (or max_batches=0)")
    log.info("scored %d batches", n_batches)
    return {n: t / n_batches for n, t in totals.items()}


# --------------------------------------------------------------------------------------------


class _scoring_mode:
    """Put the model in the scoring mode; restore every module's ``training`` flag afterwards."""

    def __init__(self, model: nn.Module, mode: str):
        self.model, self.mode = model, mode
        self.flags = [(m, m.training) for m in model.modules()]

    def __enter__(self) -> nn.Module:
        if self.mode != "keep":
            self.model.train(self.mode == "train")
        return self.model

    def __exit__(self, *exc: Any) -> None:
        for m, flag in self.flags:
            m.training = flag


def _progress(data: Iterable, max_batches: int | None, progress: bool, criterion: str) -> Iterator:
    total = None
    try:
        total = len(data)  # type: ignore[arg-type]
    except TypeError:
        pass
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    it = _take(data, max_batches)
    if not progress:
        return it
    from tqdm.auto import tqdm

    return iter(tqdm(it, total=total, desc=f"score[{criterion}]", unit="batch", disable=None, leave=False))


def _take(data: Iterable, max_batches: int | None) -> Iterator:
    for i, batch in enumerate(data):
        if max_batches is not None and i >= max_batches:
            return
        yield batch


def _to_device(t: Any, device: torch.device) -> Any:
    return t.to(device) if isinstance(t, torch.Tensor) else t


def _data_free(model: nn.Module, criterion: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        if criterion == "l1":
            out[name] = t.abs().clone()
        elif criterion == "l2":
            out[name] = t.square()
        else:
            out[name] = torch.rand(t.shape, generator=g).to(dtype=t.dtype if t.is_floating_point() else torch.float32,
                                                            device=t.device)
    return out


def _state(model: nn.Module) -> tuple[dict, dict]:
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    return params, buffers


def _gradient(model: nn.Module, x: Any, y: Any, names: Sequence[str], loss_fn: LossFn) -> dict[str, torch.Tensor]:
    """Plain batch gradient (one forward + backward); buffers are copies."""
    params, buffers = _state(model)
    leaves = {n: params[n].detach().requires_grad_() for n in names}
    bufs = {n: b.clone() for n, b in buffers.items()}
    with torch.enable_grad():
        loss = loss_fn(functional_call(model, ({**params, **leaves}, bufs), (x,)), y)
        gs = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(names, gs)}


def _oba(model: nn.Module, x: Any, y: Any, names: list[str], loss_fn: LossFn, hessian: str, first_order: float,
         example_inputs: Any, programs: dict) -> dict[str, torch.Tensor]:
    with_grad = first_order != 0.0
    prog = _program_for(model, x, y, names, loss_fn, hessian, with_grad, example_inputs, programs)
    r = prog(model, x, y) if prog is not None else fused_hvp(
        model, (x, y), param_names=names, loss_fn=loss_fn, hessian=hessian)
    params = dict(model.named_parameters())
    out = {}
    for n in names:
        theta = params[n].detach()
        s = theta * r.hvps[n]
        if with_grad:
            s = s + first_order * theta * r.grads[n]
        out[n] = s
    return out


def _program_fits(prog: Any, model: nn.Module, x: Any, y: Any, names: list[str], loss_fn: LossFn, hessian: str,
                  with_grad: bool) -> bool:
    return (isinstance(prog, HVPProgram) and prog.hessian == hessian and list(prog.param_names) == names
            and (prog.with_grad or not with_grad) and prog.loss_fn is loss_fn and prog.matches(model, x, y))


def _program_for(model: nn.Module, x: Any, y: Any, names: list[str], loss_fn: LossFn, hessian: str,
                 with_grad: bool, example_inputs: Any, programs: dict) -> HVPProgram | None:
    """A generated program that fits this batch, or ``None`` (run eagerly)."""
    attached = getattr(model, "meta", {}).get(M.HVP_PROGRAM) if isinstance(getattr(model, "meta", None), dict) else None
    if attached is not None and _program_fits(attached, model, x, y, names, loss_fn, hessian, with_grad):
        return attached
    if example_inputs is None or not isinstance(x, torch.Tensor):
        return None
    ex = example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
    if not isinstance(ex, torch.Tensor) or tuple(ex.shape) != tuple(x.shape):
        return None
    key = (tuple(x.shape), tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__)
    prog = programs.get(key)
    if prog is None or not _program_fits(prog, model, x, y, names, loss_fn, hessian, with_grad):
        log.info("generating the fused HVP program for input shape %s", tuple(x.shape))
        prog = build_hvp_program(model, (x, y), param_names=names, loss_fn=loss_fn, hessian=hessian,
                                 with_grad=with_grad)
        programs[key] = prog
    return prog


# --------------------------------------------------------------------------------------------
# diagonal estimates (OBD baselines)
# --------------------------------------------------------------------------------------------


def _samples_coupled(model: nn.Module) -> bool:
    """Whether a sample's output may depend on the other samples (or on randomness)."""
    return any(m.training for m in model.modules())


def _per_sample_gradient_chunks(model: nn.Module, batch: tuple[Any, Any], names: Sequence[str], loss_fn: LossFn,
                                chunk: int) -> Iterator[dict[str, torch.Tensor]]:
    """``{name: G}`` for consecutive chunks of samples, ``G[i]`` the gradient of sample ``i``'s loss."""
    params, buffers = _state(model)
    x, y = batch
    if not _samples_coupled(model):
        def sample_loss(p: dict, xn: torch.Tensor, yn: Any) -> torch.Tensor:
            out = functional_call(model, ({**params, **p}, buffers), (xn.unsqueeze(0),))
            return loss_fn(out, yn.unsqueeze(0))

        per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
        scored = {n: params[n] for n in names}
        for i in range(0, x.shape[0], chunk):
            with _math_attention():  # the fused CPU attention kernel has no vmap rule
                g = per_sample(scored, x[i:i + chunk], y[i:i + chunk])
            yield g
        return
    leaves = {n: params[n].detach().requires_grad_() for n in names}
    bufs = {n: b.clone() for n, b in buffers.items()}
    with torch.enable_grad():
        z = functional_call(model, ({**params, **leaves}, bufs), (x,))
        for i in range(z.shape[0]):
            li = loss_fn(z[i:i + 1], y[i:i + 1])
            gs = torch.autograd.grad(li, list(leaves.values()), retain_graph=True, allow_unused=True)
            yield {n: (torch.zeros_like(leaves[n]) if g is None else g).unsqueeze(0) for n, g in zip(names, gs)}


def _names(model: nn.Module, param_names: Sequence[str] | None) -> list[str]:
    if param_names is not None:
        return list(param_names)
    return [n for n, p in model.named_parameters() if p.is_floating_point()]


def per_sample_gradients(model: nn.Module, batch: tuple[Any, Any], *, param_names: Sequence[str] | None = None,
                         loss_fn: LossFn | None = None) -> dict[str, torch.Tensor]:
    """``{name: G}`` with ``G[n] = ∇_θ loss_fn(z_n, y_n)``, the gradient of sample ``n``'s loss.

    ``z_n`` is sample ``n``'s row of the logits of the whole batch (in train mode BatchNorm's batch
    statistics therefore couple the samples, and are differentiated). Uses ``vmap(grad)`` when
    every module is in eval mode, else one forward and a backward per sample. Memory: batch size
    times the parameters (:func:`empirical_fisher_diagonal` works in chunks instead).

    Example:
        >>> m = torch.nn.Linear(3, 2).double().eval()
        >>> x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
        >>> G = per_sample_gradients(m, (x, y))
        >>> G["weight"].shape
        torch.Size([4, 2, 3])
        >>> g = torch.autograd.grad(torch.nn.functional.cross_entropy(m(x), y), m.weight)[0]
        >>> torch.allclose(G["weight"].mean(0), g)
        True
    """
    names = _names(model, param_names)
    n = batch[0].shape[0]
    chunks = list(_per_sample_gradient_chunks(model, batch, names, loss_fn or default_loss_fn, n))
    return {k: torch.cat([c[k] for c in chunks]) for k in names}


#: per-sample gradients held at once by :func:`empirical_fisher_diagonal` (elements)
FISHER_CHUNK_ELEMENTS = 1 << 25


def empirical_fisher_diagonal(model: nn.Module, batch: tuple[Any, Any], *, param_names: Sequence[str] | None = None,
                              loss_fn: LossFn | None = None) -> dict[str, torch.Tensor]:
    """``diag((1/N) Σ_n g_n g_nᵀ) = (1/N) Σ_n g_n²`` with ``g_n`` as in :func:`per_sample_gradients`,
    accumulated over chunks of samples (at most :data:`FISHER_CHUNK_ELEMENTS` gradient entries
    at once)."""
    names = _names(model, param_names)
    params = dict(model.named_parameters())
    n_params = max(1, sum(params[k].numel() for k in names))
    chunk = max(1, FISHER_CHUNK_ELEMENTS // n_params)
    acc = {k: torch.zeros_like(params[k], memory_format=torch.contiguous_format).detach() for k in names}
    n = 0
    for G in _per_sample_gradient_chunks(model, batch, names, loss_fn or default_loss_fn, chunk):
        for k in names:
            acc[k] += G[k].square().sum(0)
        n += next(iter(G.values())).shape[0] if G else 0
    return {k: a / max(n, 1) for k, a in acc.items()}


def rademacher_like(params: Mapping[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Independent ±1 entries shaped like each tensor (drawn on the CPU from ``generator``)."""
    return {n: (torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(dtype=p.dtype, device=p.device)
            for n, p in params.items()}


def hutchinson_diagonal(model: nn.Module, batch: tuple[Any, Any], probes: int | Sequence[Mapping[str, torch.Tensor]],
                        *, param_names: Sequence[str] | None = None, loss_fn: LossFn | None = None,
                        generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Hutchinson estimate ``(1/K) Σ_k r_k ⊙ (H r_k)`` of the full Hessian's diagonal.

    Args:
        model, batch, param_names, loss_fn: as in :func:`oba_fx.hvp.fused_hvp`.
        probes: the number ``K`` of Rademacher probes to draw, or the probes themselves
            (``[{name: r_k}]``; with the ``K ≥ n`` rows of a Hadamard matrix the estimate is exact).
        generator: draws the probes (default seed 0).

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh(), torch.nn.Linear(2, 2)).double()
        >>> x, y = torch.randn(3, 2, dtype=torch.float64), torch.tensor([0, 1, 1])
        >>> d = hutchinson_diagonal(m, (x, y), 4)
        >>> d["0.weight"].shape
        torch.Size([2, 2])
    """
    params, _ = _state(model)
    names = _names(model, param_names)
    if isinstance(probes, int):
        if probes < 1:
            raise ValueError(f"probes must be >= 1, got {probes}")
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        probe_list: Sequence[Mapping[str, torch.Tensor]] = [
            rademacher_like({n: params[n] for n in names}, gen) for _ in range(probes)]
    else:
        probe_list = list(probes)
    acc = {n: torch.zeros_like(params[n]) for n in names}
    for r in probe_list:
        hv = fused_hvp(model, batch, param_names=names, loss_fn=loss_fn, hessian="full", tangents=r).hvps
        for n in names:
            acc[n] += r[n] * hv[n]
    return {n: a / len(probe_list) for n, a in acc.items()}


__all__ = ["score", "CRITERIA", "DATA_CRITERIA", "DATA_FREE_CRITERIA", "MODES", "HESSIAN_MODES",
           "per_sample_gradients", "empirical_fisher_diagonal", "hutchinson_diagonal", "rademacher_like"]
