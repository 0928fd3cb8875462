"""ISIC skin-lesion segmentation (2016, 2017 and 2018 challenges) in the official on-disk layouts.

Also home of :func:`read_binary_lesion_mask`, which PH2 (``ph2.py``) shares.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from diffseg_lightning.data.base import CaseDataset, check_channels, check_same_size
from diffseg_lightning.data.masks import mask_foreground, present_values
from diffseg_lightning.data.splits import check_split, train_val_split
from diffseg_lightning.data.transforms import as_size, resize
from diffseg_lightning.io.images import CONVERTED_MODES, channels_first, read_mask_file
from diffseg_lightning.utils.errors import ConfigError, DiffSegError

ISIC_SPLITS = ("train", "val", "test")
ISIC_YEARS = (2016, 2017, 2018)
_IMAGE_NAME = re.compile(r"^ISIC_(\d+)\.jpg$")

# year -> official split -> (image folder, ground-truth folder, mask name suffix before ".png")
ISIC_LAYOUT: dict[int, dict[str, tuple[str, str, str]]] = {
    2016: {
        "train": (
            "ISBI2016_ISIC_Part1_Training_Data",
            "ISBI2016_ISIC_Part1_Training_GroundTruth",
            "_Segmentation",
        ),
        "test": ("ISBI2016_ISIC_Part1_Test_Data", "ISBI2016_ISIC_Part1_Test_GroundTruth", "_Segmentation"),
    },
    2017: {
        "train": ("ISIC-2017_Training_Data", "ISIC-2017_Training_Part1_GroundTruth", "_segmentation"),
        "val": ("ISIC-2017_Validation_Data", "ISIC-2017_Validation_Part1_GroundTruth", "_segmentation"),
        "test": ("ISIC-2017_Test_v2_Data", "ISIC-2017_Test_v2_Part1_GroundTruth", "_segmentation"),
    },
    2018: {
        "train": ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth", "_segmentation"),
        "val": (
            "ISIC2018_Task1-2_Validation_Input",
            "ISIC2018_Task1_Validation_GroundTruth",
            "_segmentation",
        ),
        "test": ("ISIC2018_Task1-2_Test_Input", "ISIC2018_Task1_Test_GroundTruth", "_segmentation"),
    },
}


def read_jpeg(path: Path, size: tuple[int, int] | None) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode a JPEG as float32 (C, h, w), at a reduced scale when ``size`` allows; also its stored (H, W).

    With ``size`` = (H_out, W_out), ``Image.draft("RGB", (W_out, H_out))`` makes libjpeg decode straight
    to 1/2, 1/4 or 1/8 scale (scaled inverse DCT), the smallest of these whose sides stay >= the target,
    so the returned array is at most 8x smaller per side than stored and never smaller than ``size``; the
    caller then resizes to ``size``. A draft is a no-op when the image is less than twice the target.

    Returns:
        ``(image, (H, W))``: the decoded image (C, h, w), and the size stored in the file (before scaling),
        which the mask must match.

    Raises:
        DiffSegError: naming the file when it cannot be read (unknown format, truncated data).
    """
    try:
        with Image.open(path) as img:
            width, height = img.size
            if size is not None and img.format == "JPEG":
                img.draft("RGB", (size[1], size[0]))
            array = np.asarray(img.convert("RGB") if img.mode in CONVERTED_MODES else img)
    except FileNotFoundError:
        raise DiffSegError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DiffSegError(f"{path}: not a readable image ({err})") from None
    return channels_first(array.astype(np.float32)), (height, width)


def read_binary_lesion_mask(
    dataset: CaseDataset, path: Path, image_path: Path, stored: Sequence[int], owner: str = "ISIC"
) -> np.ndarray:
    """Read a lesion mask as bool (H, W), checked against its image's stored size and the binary rule.

    The values are read and binarised by the shared mask rule (``binary`` of
    :mod:`~diffseg_lightning.data.masks`): they must be 0/1 or 0/255 (grey, grey stored as RGB, or a
    palette image by its colours, so a [white, black] palette cannot invert the lesion); the lesion is the
    non-zero value. They are recorded with ``dataset.note_labels``.

    Raises:
        DiffSegError: naming the mask when it cannot be read, holds colour, differs in size from its image,
            or holds other values.
    """
    values, lossy = read_mask_file(path)
    check_same_size(path, values.shape[:2], image_path, stored)
    dataset.note_labels(present_values(values))
    return mask_foreground(values, "binary", path, lossy, owner=owner)


def find_folder(root: Path, name: str) -> Path | None:
    """``root/name``, else the one ``root/<folder>/name`` (a download kept in its own folder), else None.

    Raises:
        DiffSegError: when ``name`` sits in several sub-folders of ``root`` (which one is meant is unclear).
    """
    if (root / name).is_dir():
        return root / name
    nested = sorted(p / name for p in root.iterdir() if p.is_dir() and (p / name).is_dir())
    if len(nested) > 1:
        raise DiffSegError(
            f"{root}: {name} found in several folders ({', '.join(map(str, nested))}); keep one"
        )
    return nested[0] if nested else None


class ISIC(CaseDataset):
    """ISIC skin-lesion segmentation, read from the official challenge downloads as they are.

    Papers: 2016: Gutman et al., "Skin lesion analysis toward melanoma detection: a challenge at ISBI 2016",
    arXiv:1605.01397 (Part 1); 2017: Codella et al., "Skin lesion analysis toward melanoma detection: a
    challenge at ISBI 2017", ISBI 2018, arXiv:1710.05006 (Part 1); 2018: Codella et al., "Skin lesion
    analysis toward melanoma detection 2018", arXiv:1902.03368 (Task 1), images from HAM10000 (Tschandl et
    al., Sci. Data 2018).

    Layout: the unzipped folders, by their official names, directly under ``root`` (or each in one folder of
    its own under ``root``)::

        2016  ISBI2016_ISIC_Part1_{Training,Test}_Data/ISIC_<id>.jpg
              ISBI2016_ISIC_Part1_{Training,Test}_GroundTruth/ISIC_<id>_Segmentation.png
        2017  ISIC-2017_{Training,Validation,Test_v2}_Data/ISIC_<id>.jpg
              ISIC-2017_{Training,Validation,Test_v2}_Part1_GroundTruth/ISIC_<id>_segmentation.png
        2018  ISIC2018_Task1-2_{Training,Validation,Test}_Input/ISIC_<id>.jpg
              ISIC2018_Task1_{Training,Validation,Test}_GroundTruth/ISIC_<id>_segmentation.png

    Only ``ISIC_<digits>.jpg`` files are images: the 2017 data folders' ``ISIC_<id>_superpixels.png``
    (Part 2's superpixel label maps), metadata CSVs, ``LICENSE.txt`` / ``ATTRIBUTION.txt``, ``.DS_Store``
    and macOS ``._*`` files are ignored. Cases are in numeric id order. Only the folders of the requested
    split are needed (a user who downloaded only Training can train); a missing one is an error naming it.

    Splits (``split``):
        2017 and 2018: ``train``, ``val`` and ``test`` are the official Training, Validation and Test sets
        (2000 / 150 / 600 images in 2017, 2594 / 100 / 1000 in 2018). 2016 has no official validation set:
        ``val`` is a seeded ``val_fraction`` of the Training images and ``train`` the rest (900 training,
        379 test images). With ``folds`` = k (any year): ``val`` is fold ``fold`` of a seeded k-fold
        partition of the official Training images and ``train`` the other folds (see
        :func:`~diffseg_lightning.data.splits.train_val_split`); the official Validation set is then unused,
        so that fold membership does not depend on whether it was downloaded. ``test`` is always the
        official Test set. The split is drawn over every image of the folder, before the masks are checked,
        so that a case skipped for a missing mask does not move the others between splits.

    Bad cases: an image without its mask is an error naming the expected mask (for the carved train / val
    splits, wherever in the Training folder it is, so it is found before training); under
    ``on_bad_case="skip"`` it is left out of its split and listed in ``skipped``.

    Decoding: images reach about 6000 px on a side. With ``size`` set, JPEGs are decoded straight at 1/2,
    1/4 or 1/8 scale by libjpeg's DCT scaling (:func:`read_jpeg`, PIL's ``Image.draft``), the smallest
    scale that keeps both sides >= the target, and then resized bilinearly to ``size``. On a synthetic
    4000 x 3000 JPEG, decode + resize to 128 or 256 took 8-11 ms against 120-200 ms for a full decode +
    resize (about 15x, one CPU thread), and the two results differ by about 1 grey level on average (the DCT
    scaling averages each block, so it aliases less than a bilinear resize of the full image; see the
    tests). Masks are PNG (no reduced decode): each is read at full size (about 40 ms at 4000 x 3000), its
    values checked, and resized with nearest neighbour (``resize(..., "nearest")`` on the 8-bit array), so
    the mask stays exactly binary. The EXIF orientation tag is not applied: masks are drawn on the stored
    pixel grid.

    Masks are 0/255 8-bit PNGs, read by the shared binary rule (:func:`read_binary_lesion_mask`): 0/255
    or 0/1; a mask with any other value (an anti-aliased edge, 128 for "uncertain") is an error naming the
    file and its values; the lesion is the non-zero value.

    Items (the :class:`~diffseg_lightning.data.SegmentationDataModule` contract):
        ``image`` float32 (3, H, W), 0..255, bilinear to ``size``; ``mask`` float32 (1, H, W) in {0, 1},
        nearest; ``case`` (str, the image path); ``index`` int64; ``original_size`` int64 (2,), the stored
        (H, W) of the image file.

    Args:
        root: the folder holding the year's official folders.
        split: ``train``, ``val`` or ``test``.
        year: 2016, 2017 or 2018.
        size: resize target (H, W) or one int; None keeps each image's size (they vary, so batching needs it).
        channels: expected image channels (3); another count is an error naming the file. None accepts any.
        val_fraction: share of the Training images held out as ``val`` (2016 only, without ``folds``).
        seed: shuffle seed of the carved splits (2016 ``val``, k-fold).
        folds: k of k-fold cross-validation on the Training images, or None.
        fold: which fold is ``val`` (0 .. folds - 1).
        on_bad_case: ``error`` (an image without its mask raises) or ``skip`` (it is left out, listed in
            ``skipped``).

    Raises:
        DiffSegError: when ``root`` or a needed folder is missing (naming the expected folder), a data folder
            holds no ``ISIC_<id>.jpg``, or (under ``error``) an image has no mask (naming the expected mask).
            Unreadable files, a wrong channel count, a mask whose size differs from its image's and mask
            values other than 0/255 (or 0/1) raise when the item is read, naming the file.
        ValueError: for an unknown split or year, or a ``val_fraction`` outside [0, 1].
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        year: int = 2018,
        size: int | Sequence[int] | None = 128,
        channels: int | None = 3,
        val_fraction: float = 0.2,
        seed: int = 0,
        folds: int | None = None,
        fold: int = 0,
        on_bad_case: str = "error",
    ) -> None:
        super().__init__(on_bad_case)
        self.split = check_split(split, ISIC_SPLITS, "ISIC")
        try:
            self.year = int(year)
        except (TypeError, ValueError):
            self.year = -1
        if self.year not in ISIC_YEARS:
            raise ConfigError(f"ISIC: year must be one of {ISIC_YEARS}, got {year!r}")
        if not 0.0 <= val_fraction <= 1.0:
            raise ConfigError(f"ISIC: val_fraction must lie in [0, 1], got {val_fraction}")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DiffSegError(f"data root {self.root} does not exist or is not a folder")
        layout = ISIC_LAYOUT[self.year]
        carved = split in ("train", "val") and (folds is not None or "val" not in layout)
        official = "train" if carved else split
        image_folder, mask_folder, suffix = layout[official]
        self.image_dir = self._folder(image_folder, f"the {official} images of ISIC {self.year}")
        self.mask_dir = self._folder(mask_folder, f"the {official} masks of ISIC {self.year}")
        ids = sorted(
            (int(m.group(1)), m.group(1))
            for m in (_IMAGE_NAME.match(p.name) for p in self.image_dir.iterdir())
            if m is not None
        )
        if not ids:
            raise DiffSegError(f"{self.image_dir}: no ISIC_<id>.jpg images")
        chosen = set(
            train_val_split(len(ids), split, val_fraction, seed, folds, fold) if carved else range(len(ids))
        )
        self.cases: list[tuple[Path, Path]] = []
        for i, (_, number) in enumerate(ids):
            image = self.image_dir / f"ISIC_{number}.jpg"
            mask = self.mask_dir / f"ISIC_{number}{suffix}.png"
            if not mask.is_file():
                if i in chosen or self.on_bad_case == "error":  # under "error", train finds val's too
                    self.bad_case(image, f"no mask; expected {mask}")
            elif i in chosen:
                self.cases.append((image, mask))
        self.size = as_size(size)
        self.channels = channels
        self.val_fraction = float(val_fraction)
        self.seed = seed
        self.folds = folds
        self.fold = fold

    def _folder(self, name: str, what: str) -> Path:
        folder = find_folder(self.root, name)
        if folder is None:
            raise DiffSegError(
                f"data root {self.root}: no {name} folder ({what}, split {self.split!r}); expected "
                f"{self.root / name}"
            )
        return folder

    @property
    def ids(self) -> list[str]:
        """The case ids of this split, e.g. ``["ISIC_0000000", ...]``."""
        return [image.stem for image, _ in self.cases]

    def __len__(self) -> int:
        return len(self.cases)

    def __repr__(self) -> str:
        return (
            f"ISIC(root={str(self.root)!r}, year={self.year}, split={self.split!r}, cases={len(self)}, "
            f"size={self.size}, folds={self.folds}, fold={self.fold}, seed={self.seed})"
        )

    def __getitem__(self, index: int) -> dict:
        image_path, mask_path = self.cases[index]
        image, stored = read_jpeg(image_path, self.size)
        check_channels(image, self.channels, image_path)
        mask = read_binary_lesion_mask(self, mask_path, image_path, stored)
        mask = resize(torch.from_numpy(mask.astype(np.uint8))[None], self.size, "nearest")
        return {
            "image": resize(torch.from_numpy(image), self.size, "bilinear"),
            "mask": mask.float(),
            "case": str(image_path),
            "index": torch.tensor(index),
            "original_size": torch.tensor(stored),
        }
