"""Shape propagation with the example inputs (``tensor_meta`` on every node)."""

from __future__ import annotations

from typing import Any, Sequence

import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from oba_fx.tracing import propagate_shapes, root_cause
from oba_fx.errors import BadInputError, one_line


class ShapePropPass(PassBase):
    """Shape propagation (:func:`oba_fx.tracing.propagate_shapes`: fake tensors where possible,
    eval mode, no autograd, so no BatchNorm statistics change); a mismatch becomes a
    ``ValueError`` naming the node.

    Example:
        >>> import torch
        >>> gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 3))
        >>> _ = ShapePropPass((torch.randn(4, 2),))(gm)
        >>> out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        >>> tuple(out.meta["tensor_meta"].shape)
        (4, 3)
    """

    def __init__(self, example_inputs: Sequence[Any]) -> None:
        super().__init__()
        self.example_inputs = tuple(example_inputs)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        try:
            propagate_shapes(gm, self.example_inputs)
        except Exception as e:
            shapes = [tuple(x.shape) if hasattr(x, "shape") else type(x).__name__ for x in self.example_inputs]
            cause = root_cause(e)
            where = next((n for n in gm.graph.nodes if n.op != "placeholder" and "tensor_meta" not in n.meta), None)
            raise BadInputError(
                f"the example inputs (shapes {shapes}) do not fit the model: at node {getattr(where, 'name', '?')!r} "
                f"({getattr(where, 'target', '?')}): {type(cause).__name__}: {one_line(cause)}. "
                "Pass example_inputs the model's forward() accepts, e.g. torch.randn(1, 3, 224, 224) "
                "for an ImageNet CNN") from e
        return PassResult(gm, False)
