"""Keys and typed records that the passes write into ``node.meta`` and ``gm.meta``.

Every analysis writes an immutable record under a namespaced key (as ``ShapeProp`` writes
``tensor_meta``). Readers use :func:`node_meta` / :func:`graph_meta`, whose error names the
pass that must run first.

Example:
    >>> import torch, torch.fx
    >>> gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    >>> try:
    ...     graph_meta(gm, COUPLING)
    ... except MissingAnalysisError as e:
    ...     print(str(e).split(";")[0])
    graph has no 'oba.coupling'
"""

from __future__ import annotations

from typing import Any

import torch.fx

from .errors import MissingAnalysisError

#: node.meta: ``torch.fx.passes.shape_prop.TensorMetadata`` (written by ShapeProp)
TENSOR_META = "tensor_meta"
#: node.meta: :class:`oba_fx.spaces.TensorSpaces` — channel index spaces of the node's value
SPACES = "oba.spaces"
#: gm.meta: :class:`oba_fx.spaces.Coupling` — element-level coupling of the whole graph
COUPLING = "oba.coupling"
#: gm.meta: per-parameter importance scores (a read-only mapping name -> tensor)
SCORES = "oba.scores"
#: gm.meta: :class:`oba_fx.select.Selection` — which units are removed
SELECTION = "oba.selection"
#: gm.meta: :class:`oba_fx.compensate.Compensation` — which layers were re-fit, errors before/after
COMPENSATION = "oba.compensation"
#: gm.meta: the Hessian block structure (a networkx graph), see ``oba_fx.hessian_blocks``
HESSIAN_STRUCTURE = "oba.hessian_structure"
#: gm.meta: the fused HVP program, see ``passes/hvp_codegen.py``
HVP_PROGRAM = "oba.hvp_program"
#: gm.meta: :class:`oba_fx.merging.MergeRecord` — removed units folded into kept partners
MERGED = "oba.merged"
#: gm.meta on a slimmed graph: the relative error of the slimmed == masked check
VERIFIED = "oba.verified"
#: gm.meta on a slimmed graph: whether BatchNorm statistics were re-estimated
BN_RECALIBRATED = "oba.bn_recalibrated"
#: gm.meta: ``{"input_shapes", "reason", "at"}`` when the graph was traced with the example input
#: shapes as constants (shape-driven control flow, see ``oba_fx.shape_tracing``)
SPECIALISED = "oba.specialised"
#: gm.meta on the returned model: the report dict (flops, params, kept indices, ...)
REPORT = "oba"

#: which pass writes each key (used in error messages)
PRODUCERS = {
    TENSOR_META: "oba_fx.passes.shape_prop.ShapePropPass",
    SPACES: "oba_fx.passes.coupling.CouplingPass",
    COUPLING: "oba_fx.passes.coupling.CouplingPass",
    SCORES: "oba_fx.passes.score.ScorePass",
    SELECTION: "oba_fx.passes.select.SelectPass",
    COMPENSATION: "oba_fx.passes.compensate.CompensatePass",
    HESSIAN_STRUCTURE: "oba_fx.passes.hessian_structure.HessianStructurePass",
    HVP_PROGRAM: "oba_fx.passes.hvp_codegen.HVPCodegen",
    MERGED: "oba_fx.passes.merge.MergePass",
    SPECIALISED: "oba_fx.tracing.trace (with example_inputs)",
    VERIFIED: "oba_fx.passes.verify.VerifyPass",
    BN_RECALIBRATED: "oba_fx.passes.bn_recalibration.BNRecalibrationPass",
}


def node_meta(node: torch.fx.Node, key: str) -> Any:
    """Return ``node.meta[key]`` or raise naming the pass that writes it."""
    try:
        return node.meta[key]
    except KeyError:
        raise MissingAnalysisError(
            f"node {node.name!r} ({node.op} {node.target}) has no {key!r}; "
            f"run {PRODUCERS.get(key, 'the pass that writes it')} first"
        ) from None


def graph_meta(gm: torch.fx.GraphModule, key: str) -> Any:
    """Return ``gm.meta[key]`` or raise naming the pass that writes it."""
    try:
        return gm.meta[key]
    except KeyError:
        raise MissingAnalysisError(
            f"graph has no {key!r}; run {PRODUCERS.get(key, 'the pass that writes it')} first"
        ) from None
