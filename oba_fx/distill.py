"""Knowledge distillation for fine-tuning: the loss and the checks on a teacher.

Distillation (Hinton, Vinyals and Dean, 2015): with ``teacher=`` (for pruning: the dense model
before pruning, as ``oba-fx prune --finetune-epochs N`` does by default) the loss is
:func:`distillation_loss`, ``(1 - α)·CE(student, y) + α·T²·KL(softmax(teacher/T) ‖ softmax(student/T))``.
Defaults ``T = 4``, ``α = 0.9``: the teacher is the very network the student was cut from, so its
function is the target and its soft outputs the main signal; the hard labels keep a 10 % share.
Our training images are JPEG-degraded copies (``shared/data``) on which the dense model is about
10 points less accurate than on exact images, so fitting their hard labels pulls the network
towards the degraded distribution, while matching the dense model's outputs on them does not.
``T = 4`` is the value most often used on CIFAR-10 (e.g. Tian et al., "Contrastive
Representation Distillation", 2020): a 93 %-accurate network's softmax is nearly one-hot at
``T = 1``, and ``T = 4`` lets the ranking of the other classes carry signal; the ``T²`` factor
keeps the soft term's gradient at the scale of the hard one's. Both are options.

Example:
    >>> import torch
    >>> s = torch.tensor([[2.0, 0.0]]); y = torch.tensor([0])
    >>> float(distillation_loss(s, s, y, weight=1.0))
    0.0
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any, Callable

import torch
import torch.nn as nn

from .batches import module_device
from oba_fx.errors import BadInputError, BadTypeError

__all__ = ["DEFAULT_DISTILL_WEIGHT", "DEFAULT_TEMPERATURE", "check_distill_settings", "check_teacher",
           "distillation_loss", "teacher_on"]

logger = logging.getLogger(__name__)

#: Default distillation temperature ``T`` (see the module documentation).
DEFAULT_TEMPERATURE = 4.0
#: Default share ``α`` of the distillation term (see the module documentation).
DEFAULT_DISTILL_WEIGHT = 0.9


def check_distill_settings(temperature: float, weight: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise BadInputError(f"the distillation temperature must be a positive number, got {temperature!r} "
                         f"(default {DEFAULT_TEMPERATURE})")
    if not (isinstance(weight, (int, float)) and 0.0 <= weight <= 1.0):
        raise BadInputError(f"the distillation weight is the share of the teacher's loss and must be in [0, 1], "
                         f"got {weight!r} (0: plain cross-entropy; default {DEFAULT_DISTILL_WEIGHT})")


def _check_logits(student: Any, teacher: Any) -> None:
    for who, t in (("student", student), ("teacher", teacher)):
        if not isinstance(t, torch.Tensor):
            raise BadTypeError(f"distillation needs logits tensors, but the {who} returned {type(t).__name__}; "
                            "wrap the model so that its forward returns the (batch, classes) logits")
    if student.shape != teacher.shape or student.dim() != 2:
        raise BadInputError(
            f"distillation needs student and teacher logits of the same shape (batch, classes), got "
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)}; use a teacher with the "
            "student's classes in the same order (e.g. the dense model before pruning), or turn distillation "
            "off (teacher=None; CLI: --no-distill)")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: Any,
                      temperature: float = DEFAULT_TEMPERATURE, weight: float = DEFAULT_DISTILL_WEIGHT, *,
                      loss_fn: Callable[[Any, Any], torch.Tensor] | None = None) -> torch.Tensor:
    """Knowledge-distillation loss (Hinton et al., 2015): hard labels plus the teacher's softened logits.

    ``(1 - weight) * CE(student, targets) + weight * T² * KL(softmax(teacher / T) ‖ softmax(student / T))``
    with ``T = temperature``; the KL divergence is summed over the classes and averaged over the batch
    ("batchmean"), the cross-entropy averaged over the batch. The factor ``T²`` keeps the soft term's
    gradients at the scale of the hard term's whatever the temperature. No gradient flows into
    ``teacher_logits``.

    Args:
        student_logits: ``(batch, classes)`` scores of the model being trained.
        teacher_logits: ``(batch, classes)`` scores of the teacher, same shape.
        targets: Class indices (whatever ``loss_fn`` takes).
        temperature: Softening temperature ``T > 0``.
        weight: Share ``α`` in [0, 1] of the soft term; 0 gives exactly the hard loss.
        loss_fn: The hard loss ``loss_fn(student_logits, targets)``; default cross-entropy.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: Logits of different shapes (both are named) or not 2-D, a temperature
            ``<= 0`` or a weight outside [0, 1].
        TypeError: Logits that are not tensors.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> s = torch.tensor([[2.0, 0.0, -1.0]]); t = torch.tensor([[1.0, 0.5, -0.5]]); y = torch.tensor([0])
        >>> bool(distillation_loss(s, t, y, weight=0.0) == F.cross_entropy(s, y))
        True
        >>> float(distillation_loss(s, s, y, temperature=4.0, weight=1.0))  # the teacher agrees: no loss
        0.0
        >>> round(float(distillation_loss(s, t, y, temperature=1.0, weight=1.0)), 4)
        0.2459
    """
    _check_logits(student_logits, teacher_logits)
    check_distill_settings(temperature, weight)
    hard = None if weight == 1 else (loss_fn if loss_fn is not None else nn.functional.cross_entropy)(
        student_logits, targets)
    if weight == 0:
        return hard
    log_p_student = nn.functional.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = nn.functional.log_softmax(teacher_logits.detach().to(student_logits.dtype) / temperature, dim=1)
    soft = nn.functional.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    soft = (temperature * temperature) * soft
    return soft if hard is None else (1.0 - weight) * hard + weight * soft


def check_teacher(teacher: nn.Module, model: nn.Module) -> None:
    if not isinstance(teacher, nn.Module):
        raise BadTypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    if teacher is model or {id(p) for p in teacher.parameters()} & {id(p) for p in model.parameters()}:
        raise BadInputError("the teacher shares parameters with the model being trained; a teacher must stay fixed: "
                         "pass a frozen copy taken before pruning, e.g. teacher=copy.deepcopy(model)")


def teacher_on(teacher: nn.Module, device: torch.device) -> nn.Module:
    """``teacher`` itself if it lives on ``device``, else a copy moved there (the original is never touched)."""
    if module_device(teacher) == device:
        return teacher
    logger.info("the teacher is on %s, the student trains on %s: distilling from a copy on %s",
                module_device(teacher), device, device)
    return copy.deepcopy(teacher).to(device)
