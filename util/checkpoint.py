"""Checkpoint I/O: atomic writes and reading a file with one-line errors. Reading backbone weights from the formats
users bring (key normalisation) is models/checkpoint_keys.py's."""
import contextlib
import os
import pickle
import zipfile

import torch

from util.cli import UserError
from util.logs import temporary_path


def _os_error(exc):
    """The OSError behind a failed write, if any: torch.save reports one raised by the file as a RuntimeError."""
    while exc is not None and not isinstance(exc, OSError):
        exc = exc.__context__
    return exc


def save_atomic(obj, path):
    """torch.save to a temporary file, fsync, then rename: a reader never sees a half-written file. A failed
    write (disk full, I/O error) leaves the previous file as it was and stops the run with a one-line error."""
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        cause = _os_error(exc)
        if cause is None:
            raise
        raise UserError(f"cannot write {path}: {cause.strerror or cause}; its previous version, if any, is "
                        f"unchanged") from exc
    with contextlib.suppress(OSError):  # makes the rename durable; some file systems cannot sync a folder
        dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def load_file(path, what="checkpoint"):
    """torch.load on CPU with a clear error for a missing, truncated or corrupt file."""
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" not in str(exc):
            raise UserError(f"cannot read {what} {path}: {str(exc).splitlines()[0]}") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise UserError(f"cannot read {what} {path} (truncated or corrupt?): {str(exc).splitlines()[0]}") from exc
    # Training checkpoints (AlgoPerf's among them) also pickle plain Python objects such as numpy scalars;
    # weights-only loading refuses those, so we unpickle fully: only load checkpoints you trust.
    # on stdout, with the run's other messages: stderr is kept for the one-line `error: ...` of a user error
    print(f"warning: {path} needs full unpickling (torch.load weights_only=False), which can run code stored in "
          "the file: load only checkpoints you trust")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UserError(f"cannot read {what} {path} (truncated or corrupt?): {str(exc).splitlines()[0]}") from exc
