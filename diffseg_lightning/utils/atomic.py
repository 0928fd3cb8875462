"""Writing a file atomically: readers (and a resumed run) see the old file or the complete new one.

Here, at the bottom of the package, because every layer that writes run outputs uses it: the prediction
writer (``callbacks.py``) and ``diffseg-synthesize`` (``synthesize.py``). Named apart from
:mod:`diffseg_lightning.io.files` (file names and listings for the readers).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` with a temporary name beside ``path`` (same suffix), then rename it to ``path``.

    ``os.replace`` is atomic, so ``path`` is either absent, its old content or the complete new file;
    a failed write removes the temporary file.

    Args:
        path: the file to write.
        write: writes the file it is given (a name beside ``path``, ending like ``path``: ``.png``,
            ``.nii.gz``, ..., so writers that pick the format by suffix pick the right one).
    """
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f"{path.name[: len(path.name) - len(suffix)]}.tmp-{os.getpid()}{suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
