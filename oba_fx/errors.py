"""Exceptions raised by oba_fx: one family, rooted at :class:`OBAError`.

Every error names what was being processed (a node, a module, a parameter, a file), what was
expected, and a way out, on one line, so that a user can act on it without reading the source.

An error about bad input also subclasses the built-in exception it stands for, so that code
written against the built-ins keeps working (``except ValueError`` catches a
:class:`BadInputError`, ``except FileNotFoundError`` a :class:`MissingFileError`):

============================  ======================  ==============================================
class                         also a                  raised for
============================  ======================  ==============================================
:class:`BadInputError`        ``ValueError``          a value out of range, non-finite numbers,
                                                      labels that do not fit the logits
:class:`BadTypeError`         ``TypeError``           an argument of the wrong kind (not a module, a
                                                      TorchScript module, a bare tensor as data)
:class:`BadFileError`         ``OSError``             a file or folder that cannot be read or
                                                      written
:class:`MissingFileError`     ``FileNotFoundError``   a file or folder that does not exist
:class:`BadNameError`         ``KeyError``            a name the model does not have (a parameter)
:class:`UnimportableError`    ``ImportError``         a saved model refers to code not importable
                                                      here
:class:`DivergedError`        ``FloatingPointError``  the training loss became NaN/Inf (learning
                                                      rate)
:class:`MissingSettingError`  ``RuntimeError``        a needed setting (flag, environment variable)
                                                      not given
============================  ======================  ==============================================

:class:`TraceError`, :class:`SurgeryError`, :class:`VerificationError` and
:class:`MissingAnalysisError` (also a ``KeyError``) are ``OBAError`` s too. Only internal
consistency checks (a bug in oba_fx, never the user's input) raise bare built-ins.

Example:
    >>> try:
    ...     raise MissingFileError("no saved model at 'm.pt'; pass a file written by oba_fx.save")
    ... except FileNotFoundError as e:
    ...     isinstance(e, OBAError), str(e)
    (True, "no saved model at 'm.pt'; pass a file written by oba_fx.save")
"""

from __future__ import annotations


def one_line(text: object) -> str:
    r"""``text`` with its line breaks and runs of spaces collapsed, to quote a foreign message.

    Example:
        >>> one_line("Expected 4D input\n  got 2D")
        'Expected 4D input got 2D'
    """
    return " ".join(str(text).split())


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
        msg = f"cannot trace {where}: {one_line(why)}"
        if line:
            msg += f" (at {line})"
        msg += (
            "; ways out: declare the module as a leaf (prune_graph(..., leaf_modules=[MyBlock]) or"
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


class BadTypeError(OBAError, TypeError):
    """An argument of the wrong kind (e.g. a function or a TorchScript module where an
    ``nn.Module`` is expected, a bare tensor where an iterable of batches is expected). Also a
    ``TypeError``.

    Example:
        >>> issubclass(BadTypeError, TypeError)
        True
    """


class BadFileError(OBAError, OSError):
    """A file or folder that cannot be read or written (unwritable folder, corrupt or foreign
    file); the message names the path the user gave, never an internal temporary file. Also an
    ``OSError``."""

    def __str__(self) -> str:  # OSError(errno, msg) formats; ours carries one sentence
        return str(self.args[0]) if self.args else ""


class MissingFileError(BadFileError, FileNotFoundError):
    """A file or folder that does not exist. Also a ``FileNotFoundError``."""


class BadNameError(OBAError, KeyError):
    """A name the model does not have (a parameter, a module). Also a ``KeyError``."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class UnimportableError(OBAError, ImportError):
    """A saved model refers to a class or function that cannot be imported here. Also an
    ``ImportError``."""


class DivergedError(OBAError, FloatingPointError):
    """Fine-tuning diverged: the training loss became NaN or infinite (usually a learning rate
    too high for the model). Also a ``FloatingPointError``."""


class MissingSettingError(OBAError, RuntimeError):
    """A setting the call needs was not given (a command-line flag or an environment variable,
    e.g. the data folder). Also a ``RuntimeError``."""
