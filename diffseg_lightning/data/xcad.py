"""XCAD X-ray coronary angiography in its released layout (Ma et al., "Self-Supervised Vessel Segmentation via
Adversarial Learning", ICCV 2021; used by DARL, Kim, Oh & Ye, ICLR 2023)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from diffseg_lightning.data.base import CaseDataset, check_channels, check_same_size
from diffseg_lightning.data.masks import mask_foreground
from diffseg_lightning.data.splits import check_split
from diffseg_lightning.data.transforms import as_size, resize
from diffseg_lightning.io.files import broken_link, list_images, same_stems
from diffseg_lightning.io.images import read_image, read_mask_file
from diffseg_lightning.utils.errors import ConfigError, DiffSegError

XCAD_SPLITS = ("train", "val", "test")
XCAD_FOLDERS = ("XCAD", "Dataset_XCAD")  # the SSVS download's name, and the DARL repository's


def locate_xcad(root: str | Path) -> Path:
    """The XCAD folder: ``root`` itself when it holds ``train/`` or ``test/``, else ``root/XCAD`` or
    ``root/Dataset_XCAD``; an error naming the expected layout otherwise."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DiffSegError(f"data root {root} does not exist or is not a folder")
    for candidate in (root, *(root / name for name in XCAD_FOLDERS)):
        if (candidate / "train").is_dir() or (candidate / "test").is_dir():
            return candidate
    raise DiffSegError(
        f"data root {root}: expected XCAD's layout, train/{{trainA,trainB,trainC}}/ and test/{{images,masks}}/ "
        f"(in {root} or in {root}/XCAD or {root}/Dataset_XCAD)"
    )


class XCAD(CaseDataset):
    """XCAD coronary angiograms (Ma et al., ICCV 2021), read from the released layout as it is.

    Layout (as the DARL repository ships it, ``data/Dataset_XCAD``; its loader names the folders
    ``trainB`` = image, ``trainC`` = background, ``trainA`` = fractal label)::

        train/trainB/<name>.png   angiograms with contrast, no labels (1621 in the release)
        train/trainC/<name>.png   contrast-free background frames (same names as trainB)
        train/trainA/<n>.png      synthetic fractal vessel masks (0/255)
        test/images/<name>.png    test angiograms (126), 512 x 512 grey
        test/masks/<name>.png     their vessel masks (0/255)

    Masks (test masks and fake masks) are read by the shared binary rule
    (:mod:`~diffseg_lightning.data.masks`): 0/255 (or 0/1), the vessel is the non-zero value; any other value
    is an error naming the file and the values.

    ``root`` may be that folder or its parent holding ``XCAD/`` or ``Dataset_XCAD/``.

    Splits:
        ``train``: every angiogram, with an unpaired background and fake mask: item ``i`` takes background
        ``i mod len(trainC)`` and mask ``i mod len(trainA)`` of the sorted lists (the released loader pairs
        the sorted lists by index too; no label of an angiogram exists or is read). ``val``: a seeded
        ``val_count`` of the labelled test images (sorted, shuffled with ``numpy.random.default_rng(seed)``),
        for model selection; ``test``: the other labelled images. XCAD has no labelled validation set, and the
        released code selects its checkpoint on the first 12 test images and reports all 126: here the
        reported test images are never used for selection (with ``val_count = 12`` the test split holds 114).

    Bad cases: a test image without its mask is an error naming the expected file; under
    ``on_bad_case="skip"`` it is left out and listed in ``skipped``. Unreadable files, a wrong channel count
    and a mask whose size differs from its image's raise when the item is read, naming the file.

    Items: ``image`` float32 (1, H, W) 0..255 (bilinear to ``size``); train: ``background`` float32
    (1, H, W) 0..255 and ``fake_mask`` float32 (1, H, W) {0, 1} (nearest); val / test: ``mask`` float32
    (1, H, W) {0, 1} (nearest); ``case`` (str, the image path); ``index`` int64; ``original_size`` int64 (2,).

    Args:
        root: the XCAD folder or its parent.
        split: ``train``, ``val`` or ``test``.
        size: resize target (H, W) or one int; None keeps the size.
        channels: expected image channels (1).
        val_count: labelled test images held out for validation (0 gives an empty ``val``, an error).
        seed: shuffle seed of the val / test division.
        on_bad_case: ``error`` or ``skip``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        size: int | Sequence[int] | None = 256,
        channels: int | None = 1,
        val_count: int = 12,
        seed: int = 0,
        on_bad_case: str = "error",
    ) -> None:
        super().__init__(on_bad_case)
        self.split = check_split(split, XCAD_SPLITS, "XCAD")
        self.root = locate_xcad(root)
        self.size = as_size(size)
        self.channels = channels
        self.val_count, self.seed = int(val_count), int(seed)
        self.cases: list[dict[str, Path]] = []
        if self.split == "train":
            train = self.root / "train"
            angiograms = list_images(train / "trainB")
            backgrounds = list_images(train / "trainC")
            fakes = list_images(train / "trainA")
            for i, image in enumerate(angiograms):
                self.cases.append(
                    {
                        "image": image,
                        "background": backgrounds[i % len(backgrounds)],
                        "fake": fakes[i % len(fakes)],
                    }
                )
            return
        test = self.root / "test"
        images = list_images(test / "images")
        if not 0 <= self.val_count < len(images):
            raise ConfigError(
                f"XCAD: val_count must lie in [0, {len(images)}) (the labelled test images), got {val_count}"
            )
        order = np.random.default_rng(self.seed).permutation(len(images))
        held_out = set(order[: self.val_count].tolist())
        chosen = [p for i, p in enumerate(images) if (i in held_out) == (self.split == "val")]
        twins = same_stems(images)
        for image in chosen:
            mask = test / "masks" / image.name
            if image in twins:
                self.bad_case(image, f"{twins[image].name} has the same stem: keep one of them")
            elif broken_link(image):
                self.bad_case(image, broken_link(image))
            elif broken_link(mask):
                self.bad_case(mask, broken_link(mask))
            elif not mask.is_file():
                self.bad_case(image, f"no vessel mask; expected {mask}")
            else:
                self.cases.append({"image": image, "mask": mask})
        if not self.cases:
            raise DiffSegError(f"XCAD: the {self.split} split of {self.root} has no usable image")

    def __len__(self) -> int:
        return len(self.cases)

    def __repr__(self) -> str:
        return f"XCAD(root={str(self.root)!r}, split={self.split!r}, cases={len(self)}, size={self.size})"

    def _image(self, path: Path) -> np.ndarray:
        return check_channels(read_image(path), self.channels, path)

    def _binary(self, path: Path, image_path: Path, image_shape: Sequence[int]) -> torch.Tensor:
        values, lossy = read_mask_file(path)
        self.note_labels(values)
        check_same_size(path, values.shape[:2], image_path, image_shape)
        vessels = mask_foreground(values, "binary", path, lossy, owner="XCAD")
        return resize(torch.from_numpy(vessels.astype(np.float32))[None], self.size, "nearest")

    def __getitem__(self, index: int) -> dict:
        files = self.cases[index]
        image = self._image(files["image"])
        item = {
            "image": resize(torch.from_numpy(image), self.size, "bilinear"),
            "case": str(files["image"]),
            "index": torch.tensor(index),
            "original_size": torch.tensor(image.shape[-2:]),
        }
        if self.split == "train":
            background = self._image(files["background"])
            item["background"] = resize(
                torch.from_numpy(background), self.size or image.shape[-2:], "bilinear"
            )
            values, lossy = read_mask_file(files["fake"])
            fake = mask_foreground(values, "binary", files["fake"], lossy, owner="XCAD")
            fake_t = torch.from_numpy(fake.astype(np.float32))[None]
            item["fake_mask"] = resize(fake_t, self.size or image.shape[-2:], "nearest")
        else:
            item["mask"] = self._binary(files["mask"], files["image"], image.shape)
        return item
