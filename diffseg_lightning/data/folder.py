"""Generic 2D image folders: a paired ``images/`` + ``masks/`` layout, and an unlabelled folder for predict."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from diffseg_lightning.utils.errors import DiffSegError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
SPLITS = ("train", "val", "test")


def read_image(path: Path) -> np.ndarray:
    """Read a 2D image file as float32 (C, H, W), with a clear error naming the file when it cannot be read."""
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB") if img.mode in ("P", "CMYK", "YCbCr") else img)
    except (UnidentifiedImageError, OSError) as err:
        raise DiffSegError(f"{path}: not a readable image ({err})") from None
    array = array.astype(np.float32)
    return array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)


def check_channels(image: np.ndarray, channels: int | None, path: Path) -> np.ndarray:
    """Raise, naming the file, when an image's channel count is not the configured one."""
    if channels is not None and image.shape[0] != channels:
        raise DiffSegError(f"{path}: image has {image.shape[0]} channel(s) but the config expects {channels}")
    return image


def resize(image: torch.Tensor, size: Sequence[int] | None, mode: str) -> torch.Tensor:
    """Resize (C, H, W) to ``size`` (bilinear for images, nearest for masks); None keeps the size."""
    if size is None or tuple(image.shape[-2:]) == tuple(size):
        return image
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(image[None], size=tuple(size), mode=mode, **kwargs)[0]


def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DiffSegError(f"data root {folder} does not exist or is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DiffSegError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def as_size(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


class ImageFolder(Dataset):
    """Every image in one folder, unlabelled, for ``diffseg-predict``.

    Items: ``image`` (C, H, W) resized to ``size``, ``case`` (the file path), ``index``, and
    ``original_size`` (2,) so predictions can be resized back.
    """

    def __init__(self, root: str | Path, size: int | Sequence[int] | None = 64, channels: int | None = None) -> None:
        self.root = Path(root)
        self.files = list_images(self.root)
        self.size = as_size(size)
        self.channels = channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        path = self.files[index]
        image = torch.from_numpy(check_channels(read_image(path), self.channels, path))
        return {
            "image": resize(image, self.size, "bilinear"),
            "case": str(path),
            "index": torch.tensor(index),
            "original_size": torch.tensor(image.shape[-2:]),
        }


class PairedFolder(Dataset):
    """``root/images/<name>.<ext>`` with ``root/masks/<name>.<ext>`` (same stem), split by a seeded shuffle.

    Masks are binarised: values > 127 when the mask's maximum exceeds 1 (8-bit masks, JPEG noise
    included), else values > 0 (0/1 masks). Colour masks are averaged over channels first.

    Args:
        root: folder holding ``images/`` and ``masks/``.
        split: ``train``, ``val`` or ``test``.
        fractions: train / val / test shares of the sorted, seed-shuffled cases.
        size: resize target (H, W) or one int; None keeps each file's size.
        seed: shuffle seed of the split.
        channels: expected image channels (an image with another count is an error naming it).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        fractions: Sequence[float] = (0.7, 0.15, 0.15),
        size: int | Sequence[int] | None = 64,
        seed: int = 0,
        channels: int | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
            raise ValueError(f"fractions must be three non-negative shares summing to 1, got {list(fractions)}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise DiffSegError(f"data root {self.root} does not exist or is not a folder")
        images = list_images(self.root / "images")
        masks = {p.stem: p for p in list_images(self.root / "masks")}
        missing = [p.name for p in images if p.stem not in masks]
        if missing:
            raise DiffSegError(f"{self.root / 'masks'}: no mask for {len(missing)} image(s), e.g. {missing[0]}")
        order = np.random.default_rng(seed).permutation(len(images))
        bounds = np.round(np.cumsum([0, *fractions]) * len(images)).astype(int)
        chosen = sorted(order[bounds[SPLITS.index(split)] : bounds[SPLITS.index(split) + 1]])
        self.pairs = [(images[i], masks[images[i].stem]) for i in chosen]
        self.size = as_size(size)
        self.channels = channels

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        image_path, mask_path = self.pairs[index]
        image = torch.from_numpy(check_channels(read_image(image_path), self.channels, image_path))
        raw = read_image(mask_path).mean(axis=0, keepdims=True)
        if raw.shape[-2:] != tuple(image.shape[-2:]):
            raise DiffSegError(f"{mask_path}: mask size {raw.shape[-2:]} differs from image size {tuple(image.shape[-2:])}")
        mask = torch.from_numpy((raw > (127 if raw.max() > 1 else 0)).astype(np.float32))
        return {
            "image": resize(image, self.size, "bilinear"),
            "mask": resize(mask, self.size, "nearest"),
            "case": str(image_path),
            "index": torch.tensor(index),
        }
