"""NIfTI files as arrays: one-line errors naming the file, how a NIfTI's shape reads as a 2D image or a
volume of axial slices (:func:`nifti_layout`), the check that the volumes of one case (modalities,
segmentation, every annotator's mask) lie on one voxel grid, and a writer of a NIfTI like another
(:func:`nifti_writer`).

The loaders read arrays as stored (no reorientation) and pair voxel ``[i, j, k]`` of the image with voxel
``[i, j, k]`` of the mask, which is right only when the files share their shape and their affine (voxel ->
world). :func:`check_same_grid` checks that from the headers alone (no voxel is decoded), in this order:
the shape, the orientation (``nibabel.aff2axcodes``: a flipped or swapped axis), the voxel spacing, and
the largest difference of the two affines (origin and axis directions).

Tolerance: two affines agree when every entry of their 3 x 4 part differs by at most
``GRID_TOLERANCE`` (1e-3) times the smallest voxel size. The NIfTI header stores the affine in float32
(``srow_*``, or the qform's quaternion and offsets), so one affine written by two tools differs by float32
rounding: about 6e-8 of the largest coordinate, 6e-5 mm for an origin 1000 mm away, 100 times below 1e-3
of a 1 mm voxel. A misalignment that matters is a sizeable fraction of a voxel (a shift of 0.5 voxel, a
flip, 2 mm instead of 1 mm spacing), 500 times above it. This is the relative-to-voxel rule of ITK /
SimpleITK (their coordinate tolerance is a multiple of the spacing; default 1e-6, which files rounded to
float32 by another tool can fail) and of the same order as nnU-Net's relaxed geometry check (``rtol=1e-3``,
``atol=1e-4``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from diffseg_lightning.exceptions import DiffSegError
from diffseg_lightning.io.images import channels_first

GRID_TOLERANCE = 1e-3  # of the smallest voxel size: see the module docstring


def load_nifti(path: Path) -> nib.Nifti1Image:
    """``nibabel.load`` with a one-line error naming the file."""
    try:
        return nib.load(path)
    except Exception as err:  # any reason a file cannot be opened as NIfTI
        raise DiffSegError(f"{path}: not a readable NIfTI file ({type(err).__name__}: {err})") from None


def read_nifti_data(path: Path) -> np.ndarray:
    """All voxels of a NIfTI file in their stored dtype (float when the header scales them), with a one-line
    error naming the file (truncated gzip, short file, ...)."""
    try:
        return np.asanyarray(load_nifti(path).dataobj)
    except DiffSegError:
        raise
    except Exception as err:
        raise DiffSegError(f"{path}: cannot read the NIfTI data ({type(err).__name__}: {err})") from None


def read_nifti_array(path: Path) -> np.ndarray:
    """All voxels of a NIfTI file as float32, with a one-line error naming the file."""
    return np.asarray(read_nifti_data(path), dtype=np.float32)


def nifti_layout(shape: Sequence[int], channels: int | None) -> tuple[int, int]:
    """``(slices, channels)`` of a NIfTI array shape; 0 slices means one 2D image.

    (H, W): one single-channel image. (H, W, C) with C equal to the model's ``channels``: one
    C-channel image (so (H, W, 1) is a 2D image for a one-channel model). (H, W, D) with any other D:
    a volume of D single-channel axial slices (the last axis). (H, W, D, C): D slices of C channels.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) not in (2, 3, 4) or 0 in shape:
        raise DiffSegError(f"NIfTI of shape {shape} is not a 2D image or a 3D volume")
    if len(shape) == 2:
        return 0, 1
    if len(shape) == 3:
        return (0, shape[2]) if shape[2] == channels else (shape[2], 1)
    return shape[2], shape[3]


def read_nifti_item(path: Path, slice_index: int = -1) -> np.ndarray:
    """One item of a NIfTI file as float32 (C, H, W): the whole 2D image (-1) or axial slice ``slice_index``."""
    proxy = nib.load(path).dataobj
    return channels_first(
        np.asarray(proxy if slice_index < 0 else proxy[:, :, slice_index], dtype=np.float32)
    )


def nifti_writer(
    source: nib.spatialimages.SpatialImage, data: np.ndarray, dtype: type
) -> Callable[[Path], None]:
    """A NIfTI like ``source`` (its class, affine and header: spacing, orientation codes) holding ``data``.

    ``data`` is (H, W) or (H, W, D); a trailing axis of 1 stands in for the source's channel axis, so
    the source's shape and zooms are kept. The writer saves it at the path it is given (for
    :func:`~diffseg_lightning.utils.atomic.atomic_write`).
    """
    data = data.reshape(*data.shape, *(1,) * (len(source.shape) - data.ndim)).astype(dtype)
    header = source.header.copy()
    header.set_data_dtype(dtype)
    header["cal_min"], header["cal_max"] = 0, 0  # the source's display range means nothing here
    image = type(source)(data, source.affine, header)
    return lambda tmp: nib.save(image, tmp)


def _shown(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


@dataclass(frozen=True)
class Grid:
    """The voxel grid of a NIfTI header: shape (spatial axes), affine, orientation codes and voxel sizes."""

    shape: tuple[int, ...]
    affine: np.ndarray
    codes: str
    sizes: np.ndarray

    @classmethod
    def of(cls, image: nib.Nifti1Image, spatial: int | None = None) -> Grid:
        """The grid of ``image``'s first ``spatial`` axes (None: all; the rest, e.g. channels, not compared)."""
        affine = np.asarray(image.affine, dtype=np.float64)
        finite = np.isfinite(affine).all()
        return cls(
            tuple(int(n) for n in image.shape[:spatial]),
            affine,
            "".join(map(str, nib.aff2axcodes(affine))) if finite else "?",
            nib.affines.voxel_sizes(affine) if finite else np.full(3, np.nan),
        )

    def difference(self, reference: Grid, name: str = "the reference") -> str:
        """What differs from ``reference`` (called ``name`` in the message); "" when the grids agree."""
        if self.shape != reference.shape:
            return f"shape {self.shape} differs from {reference.shape} of {name}"
        if "?" in (self.codes, reference.codes):
            return f"the affine (sform / qform) of it or of {name} holds NaN or infinite values"
        if self.codes != reference.codes:
            return f"orientation {self.codes} differs from {reference.codes} of {name} (an axis is flipped or swapped)"
        tolerance = GRID_TOLERANCE * float(reference.sizes.min())
        if np.abs(self.sizes - reference.sizes).max() > tolerance:
            return f"voxel spacing {_shown(self.sizes)} differs from {_shown(reference.sizes)} of {name}"
        difference = float(np.abs(self.affine[:3] - reference.affine[:3]).max())
        if difference > tolerance:
            return (
                f"affine differs from {name}'s by up to {difference:.4g} (origin or axis directions; "
                f"tolerance {tolerance:.2g} = {GRID_TOLERANCE:g} of a voxel)"
            )
        return ""


def _display(path: Path, beside: Path) -> str:
    """``path``'s name when it sits in ``beside``'s folder, else the whole path."""
    return path.name if path.parent == beside.parent else str(path)


def check_same_grid(
    paths: Sequence[Path], images: Sequence[nib.Nifti1Image] | None = None, spatial: int | None = None
) -> list[nib.Nifti1Image]:
    """Check that the NIfTI files of one case share shape, orientation, spacing and affine; return the headers.

    The reference is the grid most files share (the first file's on a tie), so the odd file is the one
    named, e.g. a segmentation saved flipped among four aligned modalities.

    Args:
        paths: the case's files (image channels first, then the masks).
        images: their headers when already loaded (None: loaded here).
        spatial: how many leading axes are spatial (see :meth:`Grid.of`); None: all.

    Raises:
        DiffSegError: ``<file>: <what differs> of <reference file>; ...`` for the first file off the grid, or
            for an unreadable header.
    """
    headers = list(images) if images is not None else [load_nifti(path) for path in paths]
    grids = [Grid.of(header, spatial) for header in headers]
    if all(not grid.difference(grids[0]) for grid in grids[1:]):
        return headers
    agree = [sum(not other.difference(grid) for other in grids) for grid in grids]
    reference = agree.index(max(agree))  # the first of the most shared grids
    for path, grid in zip(paths, grids, strict=True):
        what = grid.difference(grids[reference], _display(paths[reference], path))
        if what:
            raise DiffSegError(
                f"{path}: {what}; the volumes of a case must share one voxel grid, or image and mask are "
                "misaligned"
            )
    return headers


__all__ = [
    "GRID_TOLERANCE",
    "Grid",
    "check_same_grid",
    "load_nifti",
    "nifti_layout",
    "nifti_writer",
    "read_nifti_array",
    "read_nifti_data",
    "read_nifti_item",
]
