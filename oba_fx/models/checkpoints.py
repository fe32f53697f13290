"""Reading checkpoint files safely (``torch.load(..., weights_only=True)``) with errors that say
what is wrong with the file and what to pass instead.

Example:
    >>> import os, tempfile, torch
    >>> f = os.path.join(tempfile.mkdtemp(), "sd.pt")
    >>> torch.save({"w": torch.ones(2)}, f)
    >>> read_checkpoint(f)["w"].tolist()
    [1.0, 1.0]
    >>> torch.save({"opt": torch.optim.SGD}, f)
    >>> read_checkpoint(f)
    Traceback (most recent call last):
    ...
    oba_fx.errors.BadFileError: checkpoint '...sd.pt' holds Python objects other than tensors and plain \
containers, which are not unpickled (it could run code); save the weights alone: torch.save(model.state_dict(), path)
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import BadFileError, one_line
from ..files import check_checkpoint_file


def read_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """The object in the checkpoint file ``path``, read on the CPU with ``weights_only=True``.

    Raises:
        MissingFileError: (a ``FileNotFoundError``) no file at ``path``.
        BadFileError: (an ``OSError``) not a torch checkpoint, truncated, or holding Python
            objects that ``weights_only`` refuses.
    """
    path = check_checkpoint_file(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors differ by torch version
        if "weights only load failed" in str(exc).lower():
            raise BadFileError(f"{what} {str(path)!r} holds Python objects other than tensors and plain containers, "
                               "which are not unpickled (it could run code); save the weights alone: "
                               "torch.save(model.state_dict(), path)") from exc
        first = one_line(str(exc).splitlines()[0] if str(exc) else "")
        raise BadFileError(f"{what} {str(path)!r} cannot be read ({type(exc).__name__}: {first}); it may be "
                           "truncated: pass a complete file written by torch.save") from exc
