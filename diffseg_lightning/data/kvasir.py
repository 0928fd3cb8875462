"""Kvasir-SEG polyp segmentation in its official layout (Jha et al., "Kvasir-SEG: A Segmented Polyp Dataset",
MMM 2020).

Also home of the small helpers the official-layout loaders share (``glas.py`` and ``drive.py`` import them):
locating a dataset folder, seeded fraction splits, reading label maps without colour conversion, and the
image/mask size check.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from diffseg_lightning.data.folder import as_size, check_channels, read_image, resize
from diffseg_lightning.utils.errors import DiffSegError

KVASIR_SPLITS = ("train", "val", "test")


# ------------------------------------------------------------------------------------------ shared helpers
def locate_root(root: str | Path, folder: str, marker: str) -> Path:
    """The dataset folder: ``root/folder`` when it exists, else ``root`` itself when it holds ``marker``.

    Args:
        root: the folder the user gave (the one holding ``folder``, or ``folder`` itself).
        folder: the dataset's own folder name, e.g. ``Kvasir-SEG``.
        marker: a file or folder inside ``folder`` that identifies it, e.g. ``images``.

    Raises:
        DiffSegError: naming ``root`` and the layout expected when neither matches.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DiffSegError(f"data root {root} does not exist or is not a folder")
    if (root / folder / marker).exists():
        return root / folder
    if (root / marker).exists():
        return root
    if (root / folder).is_dir():  # the dataset folder, incomplete: the loader names the missing file
        return root / folder
    raise DiffSegError(
        f"data root {root}: expected {root / folder / marker} (or data.root pointing at the {folder} folder "
        f"itself, holding {marker})"
    )


def split_by_fractions(count: int, fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Partition ``range(count)`` into ``len(fractions)`` sorted index lists by a seeded shuffle.

    The cases are shuffled with ``numpy.random.default_rng(seed).permutation(count)`` and cut at
    ``round(cumsum(fractions) * count)``, the rule of :class:`~diffseg_lightning.data.PairedFolder`, so a
    split depends only on the number of cases, the fractions and the seed.

    Raises:
        ValueError: when the fractions are negative or do not sum to 1.
    """
    if min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be non-negative shares summing to 1, got {list(fractions)}")
    order = np.random.default_rng(seed).permutation(count)
    bounds = np.round(np.cumsum([0.0, *fractions]) * count).astype(int)
    bounds[-1] = count
    return [sorted(int(i) for i in order[bounds[k] : bounds[k + 1]]) for k in range(len(fractions))]


def read_label_map(path: Path) -> np.ndarray:
    """A label image as stored, (H, W): grey values, or the palette INDICES of a palette ("P") image.

    Unlike :func:`~diffseg_lightning.data.folder.read_image`, a palette image is not converted to RGB, so a
    GIF whose indices are 0/1 (DRIVE's second observer) reads as 0/1, and instance ids stay ids. An RGB(A)
    file is accepted only when its colour channels are equal (grey stored as colour).

    Raises:
        DiffSegError: naming the file when it cannot be read or holds colour.
    """
    try:
        with Image.open(path) as img:
            array = np.asarray(img)
            mode = img.mode
    except FileNotFoundError:
        raise DiffSegError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError) as err:
        raise DiffSegError(f"{path}: not a readable image ({err})") from None
    if array.ndim == 3:
        colour = array[..., :3]
        if not (
            np.array_equal(colour[..., 0], colour[..., 1]) and np.array_equal(colour[..., 0], colour[..., 2])
        ):
            raise DiffSegError(f"{path}: expected a grey or palette label image, found colour ({mode})")
        array = colour[..., 0]
    return array


def check_same_size(
    mask_path: Path, mask_shape: Sequence[int], image_path: Path, image_shape: Sequence[int]
) -> None:
    """Raise, naming the mask, when its (H, W) differs from the image's."""
    if tuple(mask_shape[-2:]) != tuple(image_shape[-2:]):
        raise DiffSegError(
            f"{mask_path}: mask size {tuple(mask_shape[-2:])} (H, W) differs from the size "
            f"{tuple(image_shape[-2:])} of its image {image_path.name}"
        )


def check_split(split: str, splits: Sequence[str], name: str) -> str:
    if split not in splits:
        raise ValueError(f"{name}: split must be one of {tuple(splits)}, got {split!r}")
    return split


# ------------------------------------------------------------------------------------------------ Kvasir-SEG
class KvasirSEG(Dataset):
    """Kvasir-SEG polyps (Jha et al., MMM 2020), read from the official release as it is.

    Layout: ``<root>/Kvasir-SEG/images/<id>.jpg`` with ``<root>/Kvasir-SEG/masks/<id>.jpg``, and
    ``kavsir_bboxes.json`` (the release's spelling) holding ``{id: {height, width, bbox: [{label, xmin,
    ymin, xmax, ymax}]}}``. ``root`` may also be the ``Kvasir-SEG`` folder itself. Image sizes vary per
    image, so keep ``size`` set for batching.

    Masks are JPEG and RGB, so they carry compression noise around the edges: they are converted to grey
    (ITU-R 601 luma, PIL's "L") and binarised with grey > 127.

    Split (there is no official one): the ids are sorted, shuffled with ``numpy.random.default_rng(seed)``
    and cut into ``fractions`` (train / val / test, default 0.8 / 0.1 / 0.1, i.e. 800 / 100 / 100 of the
    1000 released pairs); see :func:`split_by_fractions`. The split depends only on the set of ids, the
    fractions and the seed.

    Items (the :class:`~diffseg_lightning.data.SegmentationDataModule` contract):
        ``image`` float32 (C, H, W), 0..255, resized bilinearly to ``size``; ``mask`` float32 (1, H, W) in
        {0, 1}, resized with nearest; ``case`` (str, the image path); ``index`` int64; ``original_size``
        int64 (2,) the stored (H, W), to resize predictions back.

    Bounding boxes vary in number per image (1 to 4 in the release), so they stay out of the items (they
    could not be collated): ask :meth:`boxes` and :meth:`box_labels` for them.

    Args:
        root: folder holding ``Kvasir-SEG/``, or ``Kvasir-SEG/`` itself.
        split: ``train``, ``val`` or ``test``.
        size: resize target (H, W) or one int; None keeps each image's size.
        channels: expected image channels (3); another count is an error naming the file. None accepts any.
        fractions: train / val / test shares.
        seed: shuffle seed of the split.

    Raises:
        DiffSegError: when the folder is missing or an image has no mask (naming the expected mask path).
            Unreadable files, a wrong channel count and a mask whose size differs from its image's raise
            when the item is read, naming the file.
    """

    FOLDER = "Kvasir-SEG"
    BOXES_FILE = "kavsir_bboxes.json"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        size: int | Sequence[int] | None = 128,
        channels: int | None = 3,
        fractions: Sequence[float] = (0.8, 0.1, 0.1),
        seed: int = 0,
    ) -> None:
        self.split = check_split(split, KVASIR_SPLITS, "KvasirSEG")
        if len(fractions) != 3:
            raise ValueError(
                f"KvasirSEG: fractions must be three shares (train, val, test), got {list(fractions)}"
            )
        self.root = locate_root(root, self.FOLDER, "images")
        if not (self.root / "images").is_dir():
            raise DiffSegError(
                f"{self.root}: no images/ folder (expected images/<id>.jpg and masks/<id>.jpg)"
            )
        images = sorted(
            p
            for p in (self.root / "images").iterdir()
            if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg")
        )
        if not images:
            raise DiffSegError(f"{self.root / 'images'} holds no .jpg images")
        if not (self.root / "masks").is_dir():
            raise DiffSegError(f"{self.root}: no masks/ folder beside images/")
        pairs = []
        for image in images:
            mask = self.root / "masks" / image.name
            if not mask.is_file():
                raise DiffSegError(f"{image}: no mask; expected {mask}")
            pairs.append((image, mask))
        chosen = split_by_fractions(len(pairs), fractions, seed)[KVASIR_SPLITS.index(split)]
        self.pairs: list[tuple[Path, Path]] = [pairs[i] for i in chosen]
        self.ids: list[str] = [image.stem for image, _ in self.pairs]
        self.size = as_size(size)
        self.channels = channels
        self.fractions = tuple(float(f) for f in fractions)
        self.seed = seed
        self._boxes: dict | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def __repr__(self) -> str:
        return (
            f"KvasirSEG(root={str(self.root)!r}, split={self.split!r}, cases={len(self)}, size={self.size}, "
            f"fractions={self.fractions}, seed={self.seed})"
        )

    def __getitem__(self, index: int) -> dict:
        image_path, mask_path = self.pairs[index]
        image = check_channels(read_image(image_path), self.channels, image_path)
        grey = read_image(mask_path)
        if grey.shape[0] >= 3:  # RGB(A) JPEG mask: luma, as PIL's convert("L")
            grey = 0.299 * grey[0:1] + 0.587 * grey[1:2] + 0.114 * grey[2:3]
        elif grey.shape[0] == 2:  # grey + alpha
            grey = grey[0:1]
        check_same_size(mask_path, grey.shape, image_path, image.shape)
        mask = torch.from_numpy((grey > 127).astype(np.float32))
        return {
            "image": resize(torch.from_numpy(image), self.size, "bilinear"),
            "mask": resize(mask, self.size, "nearest"),
            "case": str(image_path),
            "index": torch.tensor(index),
            "original_size": torch.tensor(image.shape[-2:]),
        }

    # ---------------------------------------------------------------------------------------------- boxes
    def _key(self, key: int | str) -> str:
        if isinstance(key, str):
            if key not in self.ids:
                raise KeyError(f"KvasirSEG: no case {key!r} in the {self.split} split")
            return key
        return self.ids[key]

    def _box_table(self) -> dict:
        if self._boxes is None:
            path = self.root / self.BOXES_FILE
            try:
                self._boxes = json.loads(path.read_text())
            except FileNotFoundError:
                raise DiffSegError(f"{path}: not found (the release's bounding boxes)") from None
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise DiffSegError(f"{path}: not valid JSON ({err})") from None
        return self._boxes

    def box_labels(self, key: int | str) -> list[str]:
        """The labels of case ``key``'s boxes (``"polyp"`` in the release), in the order of :meth:`boxes`."""
        case = self._key(key)
        return [str(box.get("label", "")) for box in self._entry(case)["bbox"]]

    def _entry(self, case: str) -> dict:
        path = self.root / self.BOXES_FILE
        entry = self._box_table().get(case)
        if entry is None or "bbox" not in entry:
            raise DiffSegError(f"{path}: no entry with boxes for {case}")
        return entry

    def boxes(self, key: int | str, native: bool = False) -> torch.Tensor:
        """Bounding boxes of a case as float32 (N, 4) ``[xmin, ymin, xmax, ymax]`` in pixels.

        Args:
            key: the dataset index or the case id (file stem).
            native: coordinates of the stored image; by default they are scaled to the item's ``size``
                (x by W_out / W, y by H_out / H), matching ``item["mask"]``.

        Raises:
            DiffSegError: when ``kavsir_bboxes.json`` is missing or unreadable, has no entry for the case, or
                its ``height`` / ``width`` differ from the stored image's.
        """
        case = self._key(key)
        entry = self._entry(case)
        image_path = self.pairs[self.ids.index(case)][0]
        with Image.open(image_path) as img:
            width, height = img.size
        if (int(entry.get("height", height)), int(entry.get("width", width))) != (height, width):
            raise DiffSegError(
                f"{self.root / self.BOXES_FILE}: {case} is {entry.get('height')}x{entry.get('width')} (HxW) "
                f"but {image_path.name} is {height}x{width}"
            )
        coords = [[float(box[k]) for k in ("xmin", "ymin", "xmax", "ymax")] for box in entry["bbox"]]
        out = torch.tensor(coords, dtype=torch.float32).reshape(-1, 4)
        if not native and self.size is not None:
            out = out * torch.tensor([self.size[1] / width, self.size[0] / height] * 2)
        return out
