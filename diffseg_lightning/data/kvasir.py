"""Kvasir-SEG polyp segmentation in its official layout (Jha et al., "Kvasir-SEG: A Segmented Polyp Dataset",
MMM 2020)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffseg_lightning.data.base import CaseDataset, check_channels, check_same_size, locate_root
from diffseg_lightning.data.masks import mask_foreground
from diffseg_lightning.data.splits import check_fractions, check_split, seeded_split
from diffseg_lightning.data.transforms import as_size, resize
from diffseg_lightning.io.files import broken_link, list_images, same_stems
from diffseg_lightning.io.images import read_image, read_mask_file
from diffseg_lightning.utils.errors import DiffSegError

KVASIR_SPLITS = ("train", "val", "test")


class KvasirSEG(CaseDataset):
    """Kvasir-SEG polyps (Jha et al., MMM 2020), read from the official release as it is.

    Layout: ``<root>/Kvasir-SEG/images/<id>.jpg`` with ``<root>/Kvasir-SEG/masks/<id>.jpg``, and
    ``kavsir_bboxes.json`` (the release's spelling) holding ``{id: {height, width, bbox: [{label, xmin,
    ymin, xmax, ymax}]}}``. ``root`` may also be the ``Kvasir-SEG`` folder itself. Image sizes vary per
    image, so keep ``size`` set for batching.

    Masks are JPEG and RGB, so they carry compression noise around the edges: they are read by the shared
    ``binary`` rule for JPEG masks (:mod:`~diffseg_lightning.data.masks`): grey as luma (ITU-R 601, PIL's
    "L"), the polyp is grey > 127; a colour mask, or one whose values are not 0/255 (or 0/1) with
    compression noise (a soft mask), is an error naming the file and its values. All 300 masks of the real
    subset pass and give the same masks as grey > 127.

    Split (there is no official one): the ids are sorted, shuffled with ``numpy.random.default_rng(seed)``
    and cut into ``fractions`` (train / val / test, default 0.8 / 0.1 / 0.1, i.e. 800 / 100 / 100 of the
    1000 released pairs); see :func:`~diffseg_lightning.data.splits.seeded_split`. With ``folds`` = k,
    ``test`` is fold ``fold`` of a seeded k-fold of the ids and the other folds are split into train / val
    by ``fractions[0] : fractions[1]``. The split depends only on the set of image ids (masks missing or
    not), the fractions, the seed and the fold.

    Bad cases: an image without its mask is an error naming the expected mask (whatever split it falls
    in, so it is found before training), and so are two images of one id (``a.jpg`` and ``a.jpeg``, naming
    both) and a broken symbolic link (naming its target); under ``on_bad_case="skip"`` it is left out of its split instead
    and listed in ``skipped`` (by the dataset of that split only), and the other cases keep their split.
    ``seen_labels`` collects the stored mask values read (0..255 with JPEG noise; all channels).

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
        on_bad_case: ``error`` or ``skip`` (see Bad cases).
        folds: k for k-fold cross-validation (None: the fraction split).
        fold: the held-out fold, 0 .. k - 1.

    Raises:
        DiffSegError: when the folder is missing or an image has no mask (naming the expected mask path;
            ``skip`` leaves that case out instead).
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
        on_bad_case: str = "error",
        folds: int | None = None,
        fold: int = 0,
    ) -> None:
        super().__init__(on_bad_case)
        self.split = check_split(split, KVASIR_SPLITS, "KvasirSEG")
        check_fractions(fractions)
        self.root = locate_root(root, self.FOLDER, "images")
        if not (self.root / "images").is_dir():
            raise DiffSegError(
                f"{self.root}: no images/ folder (expected images/<id>.jpg and masks/<id>.jpg)"
            )
        images = list_images(self.root / "images", (".jpg", ".jpeg"))
        if not (self.root / "masks").is_dir():
            raise DiffSegError(f"{self.root}: no masks/ folder beside images/")
        chosen = set(seeded_split(len(images), fractions, seed, split, folds, fold))
        twins = same_stems(images)
        self.pairs: list[tuple[Path, Path]] = []
        for number, image in enumerate(images):
            mask = self.root / "masks" / image.name
            if broken_link(image):
                problem = (image, broken_link(image))
            elif image in twins:
                problem = (image, f"{twins[image].name} has the same id: keep one of them")
            elif broken_link(mask):
                problem = (mask, broken_link(mask))
            elif not mask.is_file():
                problem = (image, f"no mask; expected {mask}")
            else:
                problem = None
            if problem is not None:
                if number in chosen or self.on_bad_case == "error":
                    self.bad_case(*problem)
            elif number in chosen:
                self.pairs.append((image, mask))
        self.ids: list[str] = [image.stem for image, _ in self.pairs]
        self.size = as_size(size)
        self.channels = channels
        self.fractions = tuple(float(f) for f in fractions)
        self.seed = seed
        self.folds, self.fold = folds, fold
        self._boxes: dict | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def __repr__(self) -> str:
        return (
            f"KvasirSEG(root={str(self.root)!r}, split={self.split!r}, cases={len(self)}, size={self.size}, "
            f"fractions={self.fractions}, seed={self.seed}, folds={self.folds}, fold={self.fold})"
        )

    def __getitem__(self, index: int) -> dict:
        image_path, mask_path = self.pairs[index]
        image = check_channels(read_image(image_path), self.channels, image_path)
        values, lossy = read_mask_file(mask_path)
        self.note_labels(values)
        check_same_size(mask_path, values.shape[:2], image_path, image.shape)
        polyp = mask_foreground(values, "binary", mask_path, lossy, owner="Kvasir-SEG")
        mask = torch.from_numpy(polyp.astype(np.float32))[None]
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
