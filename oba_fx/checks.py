"""Checks of what users hand in: a usable model, iterable data, batches and labels that fit,
finite weights, finite and non-empty batches, finite scores.

Each raises an :class:`oba_fx.errors.OBAError` (:class:`~oba_fx.errors.BadInputError`, or
:class:`~oba_fx.errors.BadTypeError` for an argument of the wrong kind) naming the model,
parameter or batch, what was expected and a way out, before any work is done or any result can
silently become NaN.

Example:
    >>> import torch
    >>> m = torch.nn.Linear(2, 2)
    >>> with torch.no_grad():
    ...     _ = m.bias.fill_(float("inf"))
    >>> check_finite_model(m)
    Traceback (most recent call last):
    ...
    oba_fx.errors.BadInputError: parameter 'bias' has 2 non-finite (NaN/Inf) values; prune a model with finite \
weights (check the checkpoint you loaded)
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn as nn

from .errors import BadInputError, BadTypeError, one_line

#: ``ignore_index`` of the default cross-entropy: a label that is not scored
IGNORE_LABEL = -100


def _tensors(x: Any) -> Iterable[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)


def _non_finite(t: torch.Tensor) -> int:
    if not (t.is_floating_point() or t.is_complex()) or t.device.type == "meta":
        return 0
    return int((~torch.isfinite(t)).sum())


def check_model(model: Any, who: str, *, traced: bool = True, finite: bool = True) -> None:
    """``model`` is an ``nn.Module`` that ``who`` can work with: not TorchScript (when it is to be
    ``traced`` by torch.fx), no parameter or buffer on the meta device, every weight ``finite``.

    Example:
        >>> check_model(lambda x: x, "prune_graph")
        Traceback (most recent call last):
        ...
        oba_fx.errors.BadTypeError: prune_graph expects a torch.nn.Module, got function; pass the network \
itself (an nn.Module instance, e.g. torchvision.models.resnet18())
    """
    if traced and isinstance(model, torch.jit.ScriptModule):
        raise BadTypeError(f"{who} got a TorchScript module ({type(model).__name__}), which torch.fx cannot trace; "
                           "pass the nn.Module before torch.jit.script / torch.jit.trace")
    if not isinstance(model, nn.Module):
        raise BadTypeError(f"{who} expects a torch.nn.Module, got {type(model).__name__}; pass the network itself "
                           "(an nn.Module instance, e.g. torchvision.models.resnet18())")
    if any(t is not None and t.is_meta for m in model.modules() for table in (m._parameters, m._buffers)
           for t in table.values()):
        _raise_on_meta(list(model.named_modules()), who)
    if finite:
        check_finite_model(model)


def _raise_on_meta(modules: list[tuple[str, nn.Module]], who: str) -> None:
    """Raise naming the first parameter, else buffer, on the meta device."""
    for kind, attr in (("parameter", "_parameters"), ("buffer", "_buffers")):
        for name, t in _named(modules, attr):
            if t.device.type == "meta":
                raise BadInputError(f"{who}: {kind} {name!r} is on the meta device (a shape without values); "
                                    "materialise the model first, e.g. model.to_empty(device='cpu') then "
                                    "model.load_state_dict(...)")


def _named(modules: list[tuple[str, nn.Module]], attr: str):
    """``(qualified name, tensor)`` of each module's ``_parameters`` or ``_buffers``, each tensor
    once, in the order of ``named_parameters()`` / ``named_buffers()``."""
    seen = set()
    for prefix, m in modules:
        for k, t in getattr(m, attr).items():
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                yield (f"{prefix}.{k}" if prefix else k), t


def check_data(data: Any, who: str, *, reads: int = 1) -> None:
    """``data`` is ``None`` or an iterable of batches that ``who`` can read ``reads`` times: not a
    bare tensor (iterating one yields its rows), and not a one-shot iterator (a generator) when
    it is read more than once.

    Example:
        >>> check_data(torch.zeros(8, 3), "score")
        Traceback (most recent call last):
        ...
        oba_fx.errors.BadTypeError: score: data is a bare tensor of shape (8, 3); pass an iterable of (inputs, \
targets) batches, e.g. [(x, y)] or a torch.utils.data.DataLoader
        >>> check_data((b for b in [(1, 2)]), "finetune", reads=3)
        Traceback (most recent call last):
        ...
        oba_fx.errors.BadInputError: finetune: data is a one-shot iterator (generator) but is read 3 times; \
pass a list of batches or a DataLoader, which can be read again
    """
    if data is None:
        return
    if isinstance(data, torch.Tensor):
        raise BadTypeError(f"{who}: data is a bare tensor of shape {tuple(data.shape)}; pass an iterable of "
                           "(inputs, targets) batches, e.g. [(x, y)] or a torch.utils.data.DataLoader")
    if not isinstance(data, Iterable):
        raise BadTypeError(f"{who}: data is a {type(data).__name__}, not an iterable of (inputs, targets) batches; "
                           "pass e.g. [(x, y)] or a torch.utils.data.DataLoader")
    if reads > 1 and isinstance(data, Iterator):
        raise BadInputError(f"{who}: data is a one-shot iterator ({type(data).__name__}) but is read {reads} times; "
                            "pass a list of batches or a DataLoader, which can be read again")


def split_batch(batch: Any, what: str) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch that must carry labels.

    Example:
        >>> split_batch(torch.zeros(4, 2), "calibration batch 0")
        Traceback (most recent call last):
        ...
        oba_fx.errors.BadTypeError: calibration batch 0 is a Tensor, not an (inputs, targets) pair; this \
criterion needs labels: yield (x, y) batches
    """
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise BadTypeError(f"{what} is a {type(batch).__name__}, not an (inputs, targets) pair; this criterion "
                           "needs labels: yield (x, y) batches")
    return batch[0], batch[1]


def check_labels(y: Any, logits_shape: tuple[int, ...], what: str) -> None:
    """Labels ``y`` fit the default loss (cross-entropy) on logits of ``logits_shape``: class
    indices in ``[0, C)`` (or -100, ignored) of the logits' shape without the class dimension, or
    class probabilities of the logits' shape.

    Example:
        >>> check_labels(torch.tensor([0, 3]), (2, 3), "calibration batch 0")
        Traceback (most recent call last):
        ...
        oba_fx.errors.BadInputError: calibration batch 0: label 3 is outside [0, 3) (the model has 3 outputs); \
check the labels, or the number of classes of the model's head
    """
    if len(logits_shape) < 2:
        return
    n_classes, expected = logits_shape[1], (logits_shape[0], *logits_shape[2:])
    if not isinstance(y, torch.Tensor):
        raise BadTypeError(f"{what}: the labels are a {type(y).__name__}, expected a tensor of class indices of "
                           f"shape {expected}; yield (inputs, targets) batches with tensor targets")
    if y.is_floating_point() and tuple(y.shape) == tuple(logits_shape):
        return  # class probabilities
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise BadInputError(f"{what}: the labels have dtype {y.dtype} and shape {tuple(y.shape)}; the default loss "
                            f"(cross-entropy) takes class indices (int64) of shape {expected} or class "
                            f"probabilities of the logits' shape {tuple(logits_shape)}; convert them "
                            "(labels.long()) or pass loss_fn=")
    if tuple(y.shape) != expected:
        raise BadInputError(f"{what}: the labels have shape {tuple(y.shape)}, expected {expected} (one class index "
                            f"per sample) for logits of shape {tuple(logits_shape)}; pass loss_fn= for other targets")
    bad = (y != IGNORE_LABEL) & ((y < 0) | (y >= n_classes))
    if bool(bad.any()):
        raise BadInputError(f"{what}: label {int(y[bad][0])} is outside [0, {n_classes}) (the model has "
                            f"{n_classes} outputs); check the labels, or the number of classes of the model's head")


class LabelCheck:
    """Checks every batch's labels with :func:`check_labels`; the logits' shape per sample is
    learned once, from an eval-mode forward of the first batch (no state changes).

    Args:
        model: the model whose logits the labels are compared with.
        enabled: ``False`` makes every call a no-op (a custom ``loss_fn`` takes any targets).
        forward: how a batch's inputs are fed to ``model`` (default ``model(x)``).

    Example:
        >>> labels = LabelCheck(torch.nn.Linear(4, 3))
        >>> labels(torch.randn(2, 4), torch.tensor([0, 2]), "batch 0")
        >>> labels(torch.randn(2, 4), torch.tensor([[0], [2]]), "batch 1")
        Traceback (most recent call last):
        ...
        oba_fx.errors.BadInputError: batch 1: the labels have shape (2, 1), expected (2,) (one class index per \
sample) for logits of shape (2, 3); pass loss_fn= for other targets
    """

    def __init__(self, model: nn.Module, enabled: bool = True, forward: Callable[[Any], Any] | None = None) -> None:
        self.model, self.enabled = model, enabled
        self.forward = forward or model
        self.per_sample: tuple[int, ...] | None = None

    def __call__(self, x: Any, y: Any, what: str) -> None:
        if not self.enabled:
            return
        if self.per_sample is None:
            from .tracing import eval_mode

            try:
                with eval_mode(self.model):
                    out = self.forward(x)
            except Exception as exc:  # the model's own error, e.g. a shape mismatch
                shapes = [tuple(t.shape) for t in _tensors(x)]
                raise BadInputError(f"{what}: the inputs (shapes {shapes}) do not fit the model: "
                                    f"{type(exc).__name__}: {one_line(exc)}; yield (inputs, targets) batches "
                                    "whose inputs the model's forward() accepts") from exc
            if not isinstance(out, torch.Tensor) or out.dim() < 2:
                self.enabled = False  # not logits: the loss decides what fits
                return
            self.per_sample = tuple(out.shape[1:])
        n = next((t.shape[0] for t in _tensors(x) if t.dim() > 0), None)
        if n is not None:
            check_labels(y, (n, *self.per_sample), what)


def check_finite_model(model: nn.Module) -> None:
    """Every floating parameter and buffer of ``model`` is finite."""
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            n = _non_finite(t.detach())
            if n:
                raise BadInputError(f"{kind} {name!r} has {n} non-finite (NaN/Inf) values; prune a model with "
                                    "finite weights (check the checkpoint you loaded)")


def check_inputs_usable(inputs: Any, what: str) -> None:
    """The tensors of ``inputs`` are finite and none has an empty batch (first) dimension."""
    for t in _tensors(inputs):
        if t.dim() > 0 and t.shape[0] == 0:
            raise BadInputError(f"{what} has an empty batch (shape {tuple(t.shape)}); give at least one sample")
        n = _non_finite(t)
        if n:
            raise BadInputError(f"{what} has {n} non-finite (NaN/Inf) values; clean or normalise the data first")


def check_finite_scores(scores: Mapping[str, torch.Tensor], what: str) -> None:
    """Every score is finite (a NaN loss makes every second-order score NaN)."""
    for name, t in scores.items():
        n = _non_finite(t)
        if n:
            raise BadInputError(f"{what} gave {n} non-finite scores for parameter {name!r} (is the loss NaN or "
                                "infinite on it? check loss_fn and the targets)")
