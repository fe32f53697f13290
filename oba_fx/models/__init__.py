"""Model registry: the CIFAR models of the papers plus every torchvision classification model.

Example:
    >>> from oba_fx.models import get_model, list_models
    >>> "resnet56" in list_models() and "resnet50" in list_models()
    True
    >>> m = get_model("resnet20")
    >>> type(m).__name__
    'CifarResNet'
    >>> vit = get_model("vit_cifar")           # small ViT for 32x32 inputs (see oba_fx.models.vit_cifar)
    >>> vit.blocks[0].attn.num_heads, vit.head.out_features
    (4, 10)

``"vit_cifar"`` is the small CIFAR Vision Transformer of :mod:`oba_fx.models.vit_cifar`
(default size); :func:`load_vit_cifar` rebuilds one of any size from a checkpoint that stores its
``"config"``.

Name clash: ``"resnet32"`` style names of the thin CIFAR ResNets (20, 32, 44, 56, 110) do not
exist in torchvision, so every name resolves to exactly one model.  torchvision's own
``"resnet18"``, ``"resnet50"``, ... are the ImageNet models.

The depth-generic constructor lives at ``oba_fx.models.cifar_resnet.cifar_resnet(depth)``; it is
deliberately not re-exported here, so that ``oba_fx.models.cifar_resnet`` stays the submodule.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping

import torch
from torch import nn

from .cifar_resnet import (
    BasicBlock,
    CifarResNet,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet110,
)
from .vit_cifar import ViTCifar, load_vit_cifar, vit_cifar
from .wide import VGGCifar, vgg19_bn_cifar, wide_resnet32
from .checkpoints import read_checkpoint
from oba_fx.errors import BadInputError
from oba_fx.files import check_checkpoint_file

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "VGGCifar",
    "ViTCifar",
    "get_model",
    "list_models",
    "load_checkpoint",
    "load_vit_cifar",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "vgg19_bn_cifar",
    "vit_cifar",
    "wide_resnet32",
]

logger = logging.getLogger(__name__)

_CIFAR_MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "wide_resnet32": wide_resnet32,
    "vgg19_bn_cifar": vgg19_bn_cifar,
    "vit_cifar": vit_cifar,
}


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def list_models() -> list[str]:
    """All names :func:`get_model` accepts: the CIFAR models, then torchvision classification models.

    Example:
        >>> list_models()[:3]
        ['resnet20', 'resnet32', 'resnet44']
    """
    return list(_CIFAR_MODELS) + [n for n in _torchvision_names() if n not in _CIFAR_MODELS]


def get_model(name: str, num_classes: int = 10, weights: str | os.PathLike | None = None) -> nn.Module:
    """Build a model by name, optionally loading a checkpoint (strict).

    Args:
        name: A CIFAR model (``"resnet20"``, ``"resnet32"``, ``"resnet44"``, ``"resnet56"``,
            ``"resnet110"``, ``"wide_resnet32"``, ``"vgg19_bn_cifar"``, ``"vit_cifar"`` with its
            default size; use :func:`load_vit_cifar` for a checkpoint of another size) or any torchvision
            classification model name (``"resnet50"``, ``"vit_b_16"``, ...), built with random
            weights via ``torchvision.models.get_model(name, weights=None, num_classes=...)``.
        num_classes: Classifier outputs.
        weights: Path to a checkpoint file, see :func:`load_checkpoint`.  ``None`` keeps the
            random initialisation.

    Returns:
        The model, in training mode, on the CPU.

    Raises:
        ValueError: Unknown name (the message lists close matches).
        FileNotFoundError: ``weights`` does not exist.

    Example:
        >>> get_model("resnet56", num_classes=100).linear.out_features
        100
        >>> get_model("resnet18", num_classes=10).fc.out_features
        10
    """
    if name in _CIFAR_MODELS:
        builder = _CIFAR_MODELS[name]
    else:
        tv_names = _torchvision_names()
        if name not in tv_names:
            close = difflib.get_close_matches(name, list(_CIFAR_MODELS) + tv_names, n=5, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise BadInputError(
                f"unknown model name {name!r}.{hint} "
                "List all names with oba_fx.models.list_models()."
            )
        import torchvision

        def builder(num_classes: int) -> nn.Module:
            return torchvision.models.get_model(name, weights=None, num_classes=num_classes)

    if weights is not None:
        check_checkpoint_file(weights)
    model = builder(num_classes=num_classes)
    if weights is not None:
        load_checkpoint(model, weights)
    return model


def _extract_state_dict(obj: object, path: str) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if not isinstance(obj, Mapping):
        raise BadInputError(f"checkpoint {path!r} holds a {type(obj).__name__}, not a state_dict")
    for key in ("state_dict", "model_state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            return inner
    return obj


def _mismatch(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> str:
    """How a state_dict differs from ``model``'s, in one line: counts with an example of each."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]  # BatchNorm allows these
    unexpected = [k for k in sd if k not in own]
    shapes = [k for k in own if k in sd and hasattr(sd[k], "shape") and tuple(sd[k].shape) != tuple(own[k].shape)]
    parts = [f"{len(ks)} {what} (e.g. {ks[0]!r})" for what, ks in
             (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if ks]
    return ", ".join(parts) or "load_state_dict refused it"


def load_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load a checkpoint into ``model`` in place and return it.

    Accepted formats: a plain state_dict; a dict holding one under ``"state_dict"`` (the akamaster
    CIFAR ResNet format, ``{'state_dict': ..., 'best_prec1': ...}``), ``"model_state_dict"`` or
    ``"model"``.  A ``module.`` prefix (from ``nn.DataParallel`` / DDP) is stripped from every key.
    The file is read with ``torch.load(..., weights_only=True, map_location="cpu")``.

    Args:
        model: The model to fill.
        path: Checkpoint file.
        strict: Passed to ``load_state_dict``.

    Returns:
        ``model``.

    Raises:
        MissingFileError: (a ``FileNotFoundError``) ``path`` does not exist.
        BadFileError: (an ``OSError``) the file is not a readable torch checkpoint.
        BadInputError: (a ``ValueError``) it holds no state_dict, or keys or shapes do not match
            the model.

    Example:
        >>> import tempfile, os, torch
        >>> m = get_model("resnet20")
        >>> f = os.path.join(tempfile.mkdtemp(), "r20.th")
        >>> torch.save({"state_dict": {"module." + k: v for k, v in m.state_dict().items()}}, f)
        >>> load_checkpoint(get_model("resnet20"), f).linear.in_features
        64
    """
    path = os.fspath(path)
    obj = read_checkpoint(path)
    sd = _extract_state_dict(obj, path)
    sd = OrderedDict((k.removeprefix("module."), v) for k, v in sd.items())
    try:
        result = model.load_state_dict(sd, strict=strict)
    except RuntimeError as exc:
        raise BadInputError(f"checkpoint {path!r} does not fit {type(model).__name__}: {_mismatch(model, sd)}; "
                            "pass the checkpoint of this architecture, or the model it was saved from") from exc
    if not strict and (result.missing_keys or result.unexpected_keys):
        logger.warning(
            "loaded %s non-strictly: %d missing keys, %d unexpected keys",
            path,
            len(result.missing_keys),
            len(result.unexpected_keys),
        )
    logger.info("loaded checkpoint %s into %s", path, type(model).__name__)
    return model
