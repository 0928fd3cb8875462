"""Generic image folders: a paired 2D ``images/`` + ``masks/`` layout, and an unlabelled folder (2D images and
NIfTI files) for predict."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from diffseg_lightning.data.base import CaseDataset, check_channels, check_same_size
from diffseg_lightning.data.masks import Foreground, check_foreground, mask_foreground
from diffseg_lightning.data.splits import check_fractions, seeded_split
from diffseg_lightning.data.transforms import as_size, resize
from diffseg_lightning.exceptions import read_all
from diffseg_lightning.io.files import (
    IMAGE_SUFFIXES,
    NIFTI_SUFFIXES,
    broken_link,
    file_stem,
    is_nifti,
    list_images,
    same_stems,
)
from diffseg_lightning.io.images import CONVERTED_MODES, channels_first, read_image, read_mask_file
from diffseg_lightning.io.volumes import nifti_layout, read_nifti_item
from diffseg_lightning.utils.errors import ConfigError, DiffSegError

PREDICT_SUFFIXES = IMAGE_SUFFIXES + NIFTI_SUFFIXES
SPLITS = ("train", "val", "test")


def _reason(err: Exception, path: Path) -> str:
    """Why a file cannot be used, without its path (the report names it)."""
    if isinstance(err, DiffSegError):
        return str(err).removeprefix(f"{path}: ")
    return f"not a readable image ({type(err).__name__}: {err})"


def describe_skipped(skipped: Sequence[tuple[str | Path, str]]) -> str:
    """``skipped 2 file(s): a.png (reason), b.nii.gz (reason)``."""
    return f"skipped {len(skipped)} file(s): " + ", ".join(f"{Path(p).name} ({why})" for p, why in skipped)


def nothing_usable(folder: str | Path, skipped: Sequence[tuple[str | Path, str]]) -> DiffSegError:
    """The error when no file of ``folder`` can be predicted; it names each file as ``name: reason``."""
    reasons = "; ".join(f"{Path(p).name}: {why}" for p, why in skipped)
    return DiffSegError(f"no usable image in {folder} ({len(skipped)} file(s) skipped): {reasons}")


class ImageFolder(Dataset):
    """Every image in one folder, unlabelled, for ``diffseg-predict``: 2D image files and NIfTI files.

    2D files (png, jpg, bmp, tif, gif) are one item each. A NIfTI file (``.nii``, ``.nii.gz``) is one
    item when it holds a 2D image, and one item per axial slice (its last spatial axis) when it holds a
    3D volume; see :func:`~diffseg_lightning.io.volumes.nifti_layout` for how its shape is read.

    Every file is checked when the dataset is built, from its header (and, for PNG, the chunk
    checksums), so that an unreadable file, a broken symbolic link, one with the wrong channel count, and one
    whose outputs would overwrite those of a file earlier in name order (same stem) never reach the
    DataLoader: they are listed in ``skipped`` as ``(path, reason)``. A file that passes this check but fails when its pixels are read
    (truncated data, NaN / inf values) gives an all-zero item whose ``error`` names the reason, so one bad
    file does not end a run; :class:`~diffseg_lightning.callbacks.MaskWriter` reports and skips it.

    Items: ``image`` (C, H, W) resized to ``size``, ``case`` (the file path), ``index``, ``slice`` (the
    axial slice, -1 for a 2D image), ``num_slices`` (0 for a 2D image), ``original_size`` (2,) so
    predictions can be resized back, and ``error`` ("" when the item was read).

    Args:
        root: the folder (not searched recursively).
        size: resize target (H, W) or one int; None keeps each file's size.
        channels: the model's image channels; None accepts any count.

    Raises:
        DiffSegError: when the folder is missing, holds no image files, or none of them is usable.
    """

    def __init__(
        self, root: str | Path, size: int | Sequence[int] | None = 64, channels: int | None = None
    ) -> None:
        self.root = Path(root)
        self.size = as_size(size)
        self.channels = channels
        self.skipped: list[tuple[Path, str]] = []
        self.files: list[Path] = []
        self.items: list[tuple[Path, int]] = []
        self.num_slices: dict[Path, int] = {}
        self.shapes: dict[Path, tuple[int, int]] = {}
        self._volume: tuple[Path, np.ndarray] | None = None  # the last volume read, for its next slices
        stems: dict[str, Path] = {}
        for path in list_images(self.root, PREDICT_SUFFIXES):
            try:
                link = broken_link(path)
                if link:
                    raise DiffSegError(link)
                if file_stem(path) in stems:
                    raise DiffSegError(f"same output names as {stems[file_stem(path)].name}")
                height, width, slices = self.inspect(path)
            except Exception as err:  # any failure to read a header means: skip this file, say why
                self.skipped.append((path, _reason(err, path)))
                continue
            stems[file_stem(path)] = path
            self.files.append(path)
            self.shapes[path], self.num_slices[path] = (height, width), slices
            self.items.extend((path, k) for k in (range(slices) if slices else [-1]))
        if not self.items:
            raise nothing_usable(self.root, self.skipped)

    def inspect(self, path: Path) -> tuple[int, int, int]:
        """``(height, width, slices)`` from a file's header; raises when the file cannot be used."""
        if is_nifti(path):
            shape = nib.load(path).shape
            slices, channels = nifti_layout(shape, self.channels)
            height, width = shape[:2]
        else:
            with Image.open(path) as img:
                channels = 3 if img.mode in CONVERTED_MODES else len(img.getbands())
                width, height = img.size
                img.verify()
            slices = 0
        if self.channels is not None and channels != self.channels:
            raise DiffSegError(f"image has {channels} channel(s) but the config expects {self.channels}")
        return int(height), int(width), slices

    def read(self, path: Path, slice_index: int) -> np.ndarray:
        """Float32 (C, H, W) of one item, checked for its channel count and finite values."""
        if not is_nifti(path):
            image = read_image(path)
        elif slice_index < 0:
            image = read_nifti_item(path)
        else:
            if self._volume is None or self._volume[0] != path:
                self._volume = (path, np.asarray(nib.load(path).dataobj, dtype=np.float32))
            image = channels_first(self._volume[1][:, :, slice_index])
        check_channels(image, self.channels, path)
        if not np.isfinite(image).all():
            raise DiffSegError(f"{path}: image holds NaN or infinite values")
        return image

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        path, slice_index = self.items[index]
        error = ""
        try:
            image = self.read(path, slice_index)
        except Exception as err:  # reported by the writer; the other items go on
            error = _reason(err, path)
            image = np.zeros((self.channels or 1, *self.shapes[path]), np.float32)
        image = torch.from_numpy(np.ascontiguousarray(image))
        return {
            "image": resize(image, self.size, "bilinear"),
            "case": str(path),
            "index": torch.tensor(index),
            "slice": torch.tensor(slice_index),
            "num_slices": torch.tensor(self.num_slices[path]),
            "original_size": torch.tensor(image.shape[-2:]),
            "error": error,
        }


class PairedFolder(CaseDataset):
    """``root/images/<name>.<ext>`` with ``root/masks/<name>.<ext>`` (same stem), split by a seeded shuffle.

    Mask values: ``foreground`` says which stored values are foreground (the rule of
    :mod:`~diffseg_lightning.data.masks`): ``binary`` (default) accepts exactly 0/1 and 0/255 masks (JPEG
    masks with tolerance bands for their compression noise) and makes any other mask an error naming the
    file, its values and the setting to choose; a value (``2``) or a list of values (``[1, 2]``, labels of a
    multi-class map that form the foreground); ``nonzero`` (every value but 0; for a colour mask, every
    non-black pixel). Grey stored as RGB is grey; true colour is an error unless ``nonzero``. The values
    are checked when an item is read, so the DataModule's check pass (and ``diffseg-check-data``) reports a
    misfit mask as a problem of its file before training. ``seen_labels`` collects the stored mask values
    read (every channel).

    Split: :func:`~diffseg_lightning.data.splits.seeded_split` of the images sorted by name (their masks
    present or not), by ``fractions``; with ``folds`` = k, ``test`` is fold ``fold`` of a seeded k-fold and
    the other folds are split into train / val by ``fractions[0] : fractions[1]``.

    Bad cases: images without a mask are an error naming the ``masks`` folder, their count and the first
    of them (whatever their split); so are two images of one stem (``a.png`` and ``a.jpg``: one case
    stored twice, which would fall into two splits) or two masks of one stem (which one is meant is
    unclear), naming both files, and a broken symbolic link in ``images/`` or ``masks/``, naming the link
    and its target. Under ``on_bad_case="skip"`` each such image is left out of its split instead and
    listed in ``skipped`` (by the dataset of that split only).

    Items: ``image`` float32 (C, H, W), bilinear to ``size``; ``mask`` float32 (1, H, W) in {0, 1},
    nearest; ``case`` (str, the image path); ``index``; ``original_size`` int64 (2,) the stored (H, W).

    Args:
        root: folder holding ``images/`` and ``masks/``.
        split: ``train``, ``val`` or ``test``.
        fractions: train / val / test shares of the sorted, seed-shuffled cases.
        size: resize target (H, W) or one int; None keeps each file's size.
        seed: shuffle seed of the split.
        channels: expected image channels (an image with another count is an error naming it).
        on_bad_case: ``error`` or ``skip`` (see Bad cases).
        folds: k for k-fold cross-validation (None: the fraction split).
        fold: the held-out fold, 0 .. k - 1.
        foreground: which mask values are foreground (see Mask values).

    Raises:
        ConfigError: for a ``foreground`` that is not one of the rules above.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        fractions: Sequence[float] = (0.7, 0.15, 0.15),
        size: int | Sequence[int] | None = 64,
        seed: int = 0,
        channels: int | None = None,
        on_bad_case: str = "error",
        folds: int | None = None,
        fold: int = 0,
        foreground: Foreground | float | Sequence[float] = "binary",
    ) -> None:
        super().__init__(on_bad_case)
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
        check_fractions(fractions)
        self.foreground = check_foreground(foreground)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DiffSegError(f"data root {self.root} does not exist or is not a folder")
        images = list_images(self.root / "images")
        mask_files = list_images(self.root / "masks")
        masks = {file_stem(p): p for p in mask_files}
        problems = self.pair_problems(images, masks, same_stems(images), same_stems(mask_files))
        if problems and self.on_bad_case == "error":  # whatever split the image is in
            missing = [images[i].name for i, (_, why) in problems.items() if why.startswith("no mask")]
            others = [problem for problem in problems.values() if not problem[1].startswith("no mask")]
            if others:
                self.bad_case(*others[0])
            self.bad_case(self.root / "masks", f"no mask for {len(missing)} image(s), e.g. {missing[0]}")
        self.pairs: list[tuple[Path, Path]] = []
        for i in seeded_split(len(images), fractions, seed, split, folds, fold):
            if i in problems:
                self.bad_case(*problems[i])
            else:
                self.pairs.append((images[i], masks[file_stem(images[i])]))
        self.size = as_size(size)
        self.channels = channels
        self.folds, self.fold = folds, fold

    def pair_problems(
        self,
        images: Sequence[Path],
        masks: dict[str, Path],
        twin_images: dict[Path, Path],
        twin_masks: dict[Path, Path],
    ) -> dict[int, tuple[Path, str]]:
        """``{image number: (where, reason)}`` of every image that cannot be paired with one mask."""
        problems = {}
        for i, image in enumerate(images):
            mask = masks.get(file_stem(image))
            if broken_link(image):
                problems[i] = (image, broken_link(image))
            elif image in twin_images:
                problems[i] = (
                    image,
                    f"{twin_images[image].name} has the same stem: one case stored twice would pair with one "
                    "mask and could fall into two splits; keep one of them",
                )
            elif mask is None:
                problems[i] = (image, f"no mask; expected {self.root / 'masks' / file_stem(image)}.<ext>")
            elif mask in twin_masks:
                why = f"{twin_masks[mask].name} has the same stem: which mask {image.name} has is unclear"
                problems[i] = (mask, f"{why}; keep one of them")
            elif broken_link(mask):
                problems[i] = (mask, broken_link(mask))
        return problems

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        image_path, mask_path = self.pairs[index]

        def read_mask() -> np.ndarray:
            values, lossy = read_mask_file(mask_path)
            self.note_labels(values)
            return mask_foreground(values, self.foreground, mask_path, lossy)

        image, foreground = read_all(  # a bad image does not hide a bad mask from the check
            lambda: torch.from_numpy(check_channels(read_image(image_path), self.channels, image_path)),
            read_mask,
        )
        check_same_size(mask_path, foreground.shape[:2], image_path, image.shape)
        mask = torch.from_numpy(foreground.astype(np.float32))[None]
        return {
            "image": resize(image, self.size, "bilinear"),
            "mask": resize(mask, self.size, "nearest"),
            "case": str(image_path),
            "index": torch.tensor(index),
            "original_size": torch.tensor(image.shape[-2:]),
        }
