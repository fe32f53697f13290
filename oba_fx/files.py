"""Checks of the files and folders users name, made before any work (torch is not imported, so
the command line can run them first): a file can be written there, a checkpoint file exists
and looks like one ``torch.save`` wrote.

Each raises :class:`oba_fx.errors.MissingFileError` (a ``FileNotFoundError``) or
:class:`oba_fx.errors.BadFileError` (an ``OSError``) naming the path the user gave, what is
wrong and a way out.

Example:
    >>> import os, tempfile
    >>> folder = tempfile.mkdtemp()
    >>> check_writable(os.path.join(folder, "new", "m.pt"), "--out", create=True)
    >>> check_writable(os.path.join(folder, "new", "m.pt"), "save")
    Traceback (most recent call last):
    ...
    oba_fx.errors.MissingFileError: save: cannot write '.../new/m.pt': the folder '.../new' does not \
exist; create it or pass a path in an existing folder
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from .errors import BadFileError, MissingFileError

#: the first bytes of a file written by torch.save's legacy (non-zip) format: a pickled magic number
LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def check_writable(path: str | os.PathLike, what: str, *, create: bool = False) -> None:
    """A file can be written at ``path``: it is not a folder, and its folder is a writable folder
    (with ``create``: or can be made, its nearest existing ancestor being a writable folder).

    Args:
        path: the file to be written.
        what: who asks (``"save"``, ``"--out"``), the start of the message.
        create: the missing folders will be created before writing.
    """
    path = Path(path)
    if path.is_dir():
        raise BadFileError(f"{what}: cannot write {str(path)!r}: it is a folder; pass a file name such as "
                           f"{str(path / 'model.pt')!r}")
    folder = path.parent
    if not create and not folder.exists():
        raise MissingFileError(f"{what}: cannot write {str(path)!r}: the folder {str(folder)!r} does not exist; "
                               "create it or pass a path in an existing folder")
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise BadFileError(f"{what}: cannot write {str(path)!r}: {str(folder)!r} is a file, not a folder; pass "
                           "a path in a writable folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BadFileError(f"{what}: cannot write {str(path)!r}: the folder {str(folder)!r} is not writable; "
                           "pass a path in a writable folder")


def check_checkpoint_file(path: str | os.PathLike, what: str = "checkpoint") -> Path:
    """``path`` is a readable file in one of ``torch.save``'s formats (a zip archive, or the
    legacy pickle that starts with torch's magic number); returns it as a ``Path``.

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile(suffix=".th") as f:
        ...     _ = f.write(b"not a checkpoint"); f.flush()
        ...     check_checkpoint_file(f.name, "--weights")
        Traceback (most recent call last):
        ...
        oba_fx.errors.BadFileError: --weights '...th' is not a torch checkpoint (neither a zip archive nor \
torch's legacy format); pass a file written by torch.save(model.state_dict(), path)
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingFileError(f"{what} {str(path)!r} does not exist; pass the path of a checkpoint file")
    if not path.is_file():
        raise BadFileError(f"{what} {str(path)!r} is a folder, not a checkpoint file; pass the file itself")
    try:
        with open(path, "rb") as f:
            head = f.read(len(LEGACY_TORCH_MAGIC))
    except OSError as exc:
        raise BadFileError(f"{what} {str(path)!r} cannot be read ({exc.strerror or exc}); check its permissions "
                           "or pass another file") from exc
    if not head.startswith(LEGACY_TORCH_MAGIC) and not zipfile.is_zipfile(path):
        raise BadFileError(f"{what} {str(path)!r} is not a torch checkpoint (neither a zip archive nor torch's "
                           "legacy format); pass a file written by torch.save(model.state_dict(), path)")
    return path
