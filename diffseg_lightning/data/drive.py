"""DRIVE retinal vessel segmentation in its official layout (Staal et al., "Ridge-based vessel segmentation in
color images of the retina", IEEE TMI 2004)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from diffseg_lightning.data.base import CaseDataset, check_channels, check_same_size, locate_root
from diffseg_lightning.data.masks import mask_foreground
from diffseg_lightning.data.splits import check_split, train_val_split
from diffseg_lightning.data.transforms import as_size, resize
from diffseg_lightning.io.images import read_image, read_label_map
from diffseg_lightning.utils.errors import ConfigError, DiffSegError

DRIVE_SPLITS = ("train", "val", "test")
_IMAGE_NAME = re.compile(r"^(\d+)_(training|test)\.tif$")


def read_binary_mask(path: Path) -> np.ndarray:
    """A DRIVE mask GIF as bool (H, W), by the shared binary rule (:mod:`~diffseg_lightning.data.masks`).

    Grey GIFs (``1st_manual``, the field-of-view ``mask``) hold 0/255 and palette GIFs (``2nd_manual``) hold
    palette INDICES 0/1 whose colours are near-black / near-white: the stored values are read without
    colour conversion (:func:`~diffseg_lightning.io.images.read_label_map`) and must be 0/255 or 0/1; the
    non-zero value is foreground.

    Raises:
        DiffSegError: naming the file when it cannot be read or holds other values.
    """
    return mask_foreground(read_label_map(path), "binary", path, owner="DRIVE")


class DRIVE(CaseDataset):
    """DRIVE retinal vessels (Staal et al., IEEE TMI 2004), read from the original release as it is.

    Layout under ``<root>/DRIVE/`` (``root`` may also be that folder itself)::

        training/images/NN_training.tif   training/1st_manual/NN_manual1.gif   training/mask/NN_training_mask.gif
        test/images/NN_test.tif           test/1st_manual/NN_manual1.gif       test/mask/NN_test_mask.gif
                                          test/2nd_manual/NN_manual2.gif

    ``1st_manual`` (the reference) and the field-of-view ``mask`` GIFs hold 0/255; ``2nd_manual`` GIFs are
    palette images whose indices are 0/1, read as indices (see :func:`read_binary_mask`). The 2020
    grand-challenge.org re-release withholds the test annotations; this loader needs the original release.

    Metrics must be computed inside the field of view: every item carries ``fov``, and
    the metrics report (``diffseg_lightning.metrics.report``) scores only pixels with ``fov`` = 1 (the DRIVE protocol; the
    black border outside the FOV would otherwise inflate accuracy and specificity).

    Splits (``split``):
        ``train``: the ``training`` images minus the validation ones; ``val``: a seeded ``val_fraction`` of the
        ``training`` images (default 0.25; sorted by number, shuffled with ``numpy.random.default_rng(seed)``,
        see :func:`~diffseg_lightning.data.splits.train_val_split`); ``test``: the ``test`` images, scored
        against the first observer (``mask``), with the second observer in ``masks``. With ``folds`` = k,
        ``val`` is fold ``fold`` of a seeded k-fold of the ``training`` images and ``train`` the other folds
        (``val_fraction`` is then unused); ``test`` stays the official one. The split depends only on the
        ``training`` image files found (their masks present or not).

    Bad cases: an image of the split without its manual annotation or FOV mask (or second-observer mask,
    when used) is an error naming the expected file; under ``on_bad_case="skip"`` it is left out and listed
    in ``skipped``. ``seen_labels`` collects the stored values of the manual annotations read (0/255 for
    ``1st_manual``, palette indices 0/1 for ``2nd_manual``; the FOV mask is not a label and is not recorded).

    Items (the :class:`~diffseg_lightning.data.SegmentationDataModule` contract, plus extras):
        ``image`` float32 (C, H, W), 0..255, bilinear to ``size``; ``mask`` float32 (1, H, W) {0, 1}, the
        first observer (``1st_manual``), nearest; ``fov`` float32 (1, H, W) {0, 1}, the field of view,
        nearest; ``masks`` float32 (2, H, W) = [1st, 2nd observer], test split only, when the second
        observer is used; ``case`` (str, the image path); ``index`` int64; ``original_size`` int64 (2,).

    Args:
        root: folder holding ``DRIVE/``, or ``DRIVE/`` itself.
        split: ``train``, ``val`` or ``test``.
        size: resize target (H, W) or one int (the images are 584 x 565); None keeps the size.
        channels: expected image channels (3); another count is an error naming the file. None accepts any.
        val_fraction: share of the ``training`` images held out as ``val``.
        seed: shuffle seed of the train / val split.
        second_observer: for the test split, add ``masks``: True requires ``test/2nd_manual``, False never
            reads it, None (default) uses it when the ``test/2nd_manual`` folder exists.
        on_bad_case: ``error`` or ``skip`` (see Bad cases).
        folds: k for k-fold cross-validation on the ``training`` images (None: ``val_fraction``).
        fold: the validation fold, 0 .. k - 1.

    Raises:
        DiffSegError: when the folder is missing, a split has no images, or an image lacks its manual or FOV
            mask (or its second-observer mask, when used; ``skip`` leaves that case out instead); the error
            names the expected file. Unreadable files,
            a wrong channel count, a non-binary mask and a mask whose size differs from its image's raise when
            the item is read, naming the file.
    """

    FOLDER = "DRIVE"
    WHAT = {"manual": "manual annotation", "fov": "field-of-view mask", "second": "second observer"}

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        size: int | Sequence[int] | None = 128,
        channels: int | None = 3,
        val_fraction: float = 0.25,
        seed: int = 0,
        second_observer: bool | None = None,
        on_bad_case: str = "error",
        folds: int | None = None,
        fold: int = 0,
    ) -> None:
        super().__init__(on_bad_case)
        self.split = check_split(split, DRIVE_SPLITS, "DRIVE")
        if not 0.0 <= val_fraction <= 1.0:
            raise ConfigError(f"DRIVE: val_fraction must lie in [0, 1], got {val_fraction}")
        self.root = locate_root(root, self.FOLDER, "training" if split != "test" else "test")
        subset = "test" if split == "test" else "training"
        folder = self.root / subset
        if not (folder / "images").is_dir():
            raise DiffSegError(f"{folder}: no images/ folder (expected {subset}/images/NN_{subset}.tif)")
        numbered = []
        for path in (folder / "images").iterdir():
            match = _IMAGE_NAME.match(path.name)
            if match and match.group(2) == subset and path.is_file():
                numbered.append((int(match.group(1)), match.group(1), path))
        numbered.sort()
        if not numbered:
            raise DiffSegError(f"{folder / 'images'}: no NN_{subset}.tif images")
        if split != "test":
            chosen = train_val_split(len(numbered), split, val_fraction, seed, folds, fold)
            numbered = [numbered[i] for i in chosen]
        if split == "test":
            use_second = (
                (folder / "2nd_manual").is_dir() if second_observer is None else bool(second_observer)
            )
        else:
            use_second = False
        self.use_second_observer = use_second
        self.cases: list[dict[str, Path]] = []
        for _, number, image in numbered:
            files = {
                "image": image,
                "manual": folder / "1st_manual" / f"{number}_manual1.gif",
                "fov": folder / "mask" / f"{number}_{subset}_mask.gif",
            }
            if use_second:
                files["second"] = folder / "2nd_manual" / f"{number}_manual2.gif"
            missing = next((key for key, path in files.items() if not path.is_file()), None)
            if missing is not None:
                self.bad_case(image, f"no {self.WHAT[missing]}; expected {files[missing]}")
                continue
            self.cases.append(files)
        self.size = as_size(size)
        self.channels = channels
        self.val_fraction = float(val_fraction)
        self.seed = seed
        self.folds, self.fold = folds, fold

    def __len__(self) -> int:
        return len(self.cases)

    def __repr__(self) -> str:
        return (
            f"DRIVE(root={str(self.root)!r}, split={self.split!r}, cases={len(self)}, size={self.size}, "
            f"val_fraction={self.val_fraction}, seed={self.seed}, second_observer={self.use_second_observer}, "
            f"folds={self.folds}, fold={self.fold})"
        )

    def _mask(
        self, path: Path, image_path: Path, image_shape: Sequence[int], label: bool = True
    ) -> torch.Tensor:
        """A mask GIF as float32 (1, H, W) in {0, 1}, resized; ``label``: record its stored values."""
        values = read_label_map(path)
        if label:
            self.note_labels(values)
        check_same_size(path, values.shape, image_path, image_shape)
        vessels = mask_foreground(values, "binary", path, owner="DRIVE")
        return resize(torch.from_numpy(vessels.astype(np.float32))[None], self.size, "nearest")

    def __getitem__(self, index: int) -> dict:
        files = self.cases[index]
        image_path = files["image"]
        image = check_channels(read_image(image_path), self.channels, image_path)
        manual = self._mask(files["manual"], image_path, image.shape)
        item = {
            "image": resize(torch.from_numpy(image), self.size, "bilinear"),
            "mask": manual,
            "fov": self._mask(files["fov"], image_path, image.shape, label=False),
            "case": str(image_path),
            "index": torch.tensor(index),
            "original_size": torch.tensor(image.shape[-2:]),
        }
        if "second" in files:
            item["masks"] = torch.cat([manual, self._mask(files["second"], image_path, image.shape)])
        return item
