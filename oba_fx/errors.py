"""Exceptions raised by oba_fx.

Every error names what was being processed (a node, a module, a parameter), what was
expected, and a way out, so that a user can act on it without reading the source.
"""

from __future__ import annotations


class OBAError(Exception):
    """Base class of every oba_fx error."""


class TraceError(OBAError):
    """The model could not be traced by ``torch.fx``.

    Example:
        >>> str(TraceError("model.block", "control flow on a tensor")).startswith("cannot trace")
        True
    """

    def __init__(self, where: str, why: str, line: str | None = None) -> None:
        self.where, self.why, self.line = where, why, line
        msg = f"cannot trace {where}: {why}"
        if line:
            msg += f"\n  at: {line}"
        msg += (
            "\n  ways out: declare the module as a leaf (prune_graph(..., leaf_modules=[MyBlock]) or"
            " leaf_modules=['path.to.module']), fix arguments that drive Python control flow with"
            " concrete_args={'flag': value}, or rewrite the data-dependent branch with torch.where."
        )
        super().__init__(msg)


class MissingAnalysisError(OBAError, KeyError):
    """An analysis result was read before the pass that writes it had run."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class SurgeryError(OBAError):
    """Slimming could not express a selection; raised instead of building a wrong network."""


class VerificationError(OBAError):
    """The slimmed network does not compute what the masked original computes."""


class BadInputError(OBAError, ValueError):
    """An input the library cannot work with (non-finite weights or data, an empty batch...);
    the message names it, says what was expected and a way out. Also a ``ValueError``."""
