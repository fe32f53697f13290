"""oba_fx: structured pruning with exact second-order (Optimal Brain Apoptosis) scores, as
torch.fx compiler passes.

Example:
    >>> import torch, oba_fx
    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> small = oba_fx.prune_graph(m, torch.randn(2, 8), channel_ratio=0.25)
    >>> small.get_submodule("0").out_features
    24
"""

from .api import explain, hessian_structure, prune_graph
from .bn import recalibrate_bn
from .finetune import FinetuneResult, finetune
from .io import load, save
from .scoring import score
from .errors import MissingAnalysisError, OBAError, SurgeryError, TraceError, VerificationError

__all__ = ["prune_graph", "explain", "hessian_structure", "finetune", "FinetuneResult", "save", "load", "score",
           "recalibrate_bn", "OBAError", "TraceError", "SurgeryError", "VerificationError",
           "MissingAnalysisError"]
__version__ = "0.1.0"
