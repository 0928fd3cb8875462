"""File names and listings shared by every reader: image and NIfTI suffixes, a file's stem, the image files
of a folder, files stored twice under one stem, and broken symbolic links.

Nothing here decodes a file; :mod:`~diffseg_lightning.io.images` and :mod:`~diffseg_lightning.io.volumes` do.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from diffseg_lightning.exceptions import DiffSegError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def is_nifti(path: str | Path) -> bool:
    """True for ``.nii`` and ``.nii.gz`` files."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def file_stem(path: str | Path) -> str:
    """The name without its image suffix: ``a.png`` -> ``a``, ``b.nii.gz`` -> ``b``."""
    name = Path(path).name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else Path(name).stem


def broken_link(path: Path) -> str | None:
    """``"broken symbolic link to <target>"`` when ``path`` is a symbolic link to nothing, else None."""
    if path.is_symlink() and not path.exists():
        return f"broken symbolic link to {os.readlink(path)}"
    return None


def list_images(folder: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Path]:
    """The files of ``folder`` with one of ``suffixes`` (any case), sorted by name, broken symbolic links
    included (so that the caller reports them: :func:`broken_link`).

    Raises:
        DiffSegError: when the folder is missing or holds no such file.
    """
    if not folder.is_dir():
        raise DiffSegError(f"data root {folder} does not exist or is not a folder")
    files = sorted(
        p
        for p in folder.iterdir()
        if (p.is_file() or broken_link(p)) and p.name.lower().endswith(tuple(suffixes))
    )
    if not files:
        raise DiffSegError(f"{folder} holds no images ({', '.join(suffixes)})")
    return files


def same_stems(paths: Sequence[Path]) -> dict[Path, Path]:
    """``{path: another path of the same stem}`` for every path of ``paths`` whose stem is not unique.

    Two files of one stem (``a.png`` and ``a.jpg``) are one case stored twice: paired by stem, both would
    take the same partner file and could land in different splits.
    """
    groups: dict[str, list[Path]] = {}
    for path in paths:
        groups.setdefault(file_stem(path), []).append(path)
    return {p: next(q for q in group if q != p) for group in groups.values() if len(group) > 1 for p in group}


__all__ = [
    "IMAGE_SUFFIXES",
    "NIFTI_SUFFIXES",
    "broken_link",
    "file_stem",
    "is_nifti",
    "list_images",
    "same_stems",
]
