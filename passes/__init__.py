"""torch.fx passes of oba_fx (installed as ``oba_fx.passes``).

Each pass is a thin ``torch.fx.passes.infra.pass_base.PassBase`` over an algorithm in
``oba_fx``: it reads what earlier passes wrote into ``node.meta`` / ``gm.meta`` and writes its
own typed record. :mod:`oba_fx.passes.pipeline` runs them in order.
"""

from .coupling import CouplingPass
from .hessian_structure import HessianStructurePass
from .select import SelectPass
from .shape_prop import ShapePropPass
from .slim import SlimPass
from .verify import VerifyPass

__all__ = ["ShapePropPass", "CouplingPass", "HessianStructurePass", "SelectPass", "SlimPass", "VerifyPass"]
