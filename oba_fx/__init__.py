"""oba_fx: structured pruning with exact second-order (Optimal Brain Apoptosis) scores, as
torch.fx compiler passes.

The public names below are loaded on first use (module ``__getattr__``), so importing a light
part of the package (``oba_fx.criteria``, ``oba_fx.errors``, one pass of ``oba_fx.passes``) does
not import the whole face of it (:mod:`oba_fx.api`).

Example:
    >>> import torch, oba_fx
    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> small = oba_fx.prune_graph(m, torch.randn(2, 8), channel_ratio=0.25)
    >>> small.get_submodule("0").out_features
    24
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import (BadFileError, BadInputError, BadNameError, BadTypeError, DivergedError, MissingAnalysisError,
                     MissingFileError, MissingSettingError, OBAError, SurgeryError, TraceError, UnimportableError, VerificationError)

#: public name -> the module that defines it (imported on first access)
_LAZY = {
    "prune_graph": "oba_fx.api", "explain": "oba_fx.api", "hessian_structure": "oba_fx.api",
    "recalibrate_bn": "oba_fx.bn",
    "finetune": "oba_fx.finetune", "FinetuneResult": "oba_fx.finetune",
    "save": "oba_fx.io", "load": "oba_fx.io",
    "score": "oba_fx.scoring",
    "register_criterion": "oba_fx.criteria", "criterion_names": "oba_fx.criteria",
    "power_iteration": "oba_fx.hessian_eigen", "PowerIterationResult": "oba_fx.hessian_eigen",
    "prune_unstructured": "oba_fx.unstructured", "make_masks_permanent": "oba_fx.unstructured",
    "masks_of": "oba_fx.unstructured",
}

__all__ = [*_LAZY, "OBAError", "TraceError", "SurgeryError", "VerificationError", "MissingAnalysisError",
           "BadInputError", "BadTypeError", "BadFileError", "MissingFileError", "BadNameError", "UnimportableError",
           "DivergedError", "MissingSettingError"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'oba_fx' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
