"""torch.fx passes of oba_fx.

This folder is the top-level ``passes/`` of the repository; ``setup.cfg`` installs it as the
subpackage ``oba_fx.passes`` (``package_dir``), so it never collides with another top-level
package named ``passes``. Import it as ``oba_fx.passes``.

Each pass is an :class:`~oba_fx.passes.base.OBAPass` (a ``torch.fx``
``PassBase``: ``GraphModule -> PassResult``) over one algorithm of ``oba_fx``: it declares the
``gm.meta`` records it requires and ensures, reads what earlier passes wrote and writes its own
typed record. :mod:`oba_fx.passes.pipeline` is the one module that runs them in order
(``docs/design.md`` "The pipeline and its records").
"""

from .base import OBAPass
from .bn_recalibration import BNRecalibrationPass
from .compensate import CompensatePass
from .coupling import CouplingPass
from .hessian_structure import HessianStructurePass
from .score import ScorePass
from .select import SelectPass
from .shape_prop import ShapePropPass
from .slim import SlimPass
from .verify import VerifyPass

__all__ = ["OBAPass", "ShapePropPass", "CouplingPass", "HessianStructurePass", "ScorePass", "SelectPass", "CompensatePass",
           "SlimPass", "VerifyPass", "BNRecalibrationPass"]
