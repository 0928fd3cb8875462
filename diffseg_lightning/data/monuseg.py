"""MoNuSeg: multi-organ nucleus segmentation in H&E tissue images (Kumar et al., IEEE TMI 2017).

Kumar, Verma, Sharma, Bhargava, Vahadane, Sethi, "A Dataset and a Technique for Generalized Nuclear
Segmentation for Computational Pathology", IEEE TMI 36(7), 2017; the MoNuSeg 2018 challenge
(https://monuseg.grand-challenge.org) released 30 training and 14 test images of 1000x1000 px (40x,
TCGA). Research use only.

Official on-disk layout, read as it is::

    <root>/Tissue Images/<TCGA id>.tif      training images (RGB)
    <root>/Annotations/<TCGA id>.xml        their annotations
    <root>/MoNuSegTestData/<TCGA id>.tif    test images, each with <TCGA id>.xml beside it

The annotation is Aperio ImageScope XML: ``Annotations/Annotation/Regions/Region/Vertices/Vertex``
with float ``X`` (column) and ``Y`` (row) pixel coordinates, one ``Region`` per nucleus (a closed
polygon). ``Annotations`` carries ``MicronsPerPixel``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from skimage.draw import polygon as fill_polygon

from diffseg_lightning.data.base import CaseDataset, check_channels
from diffseg_lightning.data.splits import check_split, train_val_split
from diffseg_lightning.data.transforms import as_size, resize
from diffseg_lightning.io.files import same_stems
from diffseg_lightning.io.images import read_image
from diffseg_lightning.utils.errors import ConfigError, DiffSegError

TRAIN_IMAGES = "Tissue Images"
TRAIN_ANNOTATIONS = "Annotations"
TEST_FOLDER = "MoNuSegTestData"
IMAGE_SUFFIXES = (".tif", ".tiff", ".png")
CROPS = ("none", "random", "tile")


def parse_regions(path: Path) -> tuple[list[np.ndarray], float | None]:
    """The polygons of a MoNuSeg XML file, each (N, 2) float64 ``(x, y)``, in file order, and the
    ``MicronsPerPixel`` of its root (None when absent).

    Raises:
        DiffSegError: naming the file, when it is not XML, lacks ``Annotation/Regions``, or a vertex has
            no numeric ``X`` / ``Y``, or a region has fewer than 3 vertices.
    """
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as err:
        raise DiffSegError(f"{path}: not a readable MoNuSeg XML annotation ({err})") from None
    annotations = [root] if root.tag == "Annotation" else root.findall("Annotation")
    region_lists = [a.find("Regions") for a in annotations]
    if not annotations or any(regions is None for regions in region_lists):
        raise DiffSegError(
            f"{path}: expected the MoNuSeg XML layout Annotations/Annotation/Regions/Region/Vertices/Vertex"
        )
    polygons = []
    for regions in region_lists:
        for region in regions.findall("Region"):
            try:
                vertices = np.array(
                    [(float(v.attrib["X"]), float(v.attrib["Y"])) for v in region.iter("Vertex")],
                    dtype=np.float64,
                ).reshape(-1, 2)
            except (KeyError, ValueError) as err:
                raise DiffSegError(
                    f"{path}: Region Id={region.get('Id')!r} has a Vertex without a numeric X and Y ({err})"
                ) from None
            if len(vertices) < 3 or not np.isfinite(vertices).all():
                raise DiffSegError(
                    f"{path}: Region Id={region.get('Id')!r} has {len(vertices)} finite vertices; a nucleus "
                    "outline needs at least 3"
                )
            polygons.append(vertices)
    microns = root.get("MicronsPerPixel")
    try:
        microns_per_pixel = float(microns) if microns is not None else None
    except ValueError:
        raise DiffSegError(f"{path}: MicronsPerPixel={microns!r} is not a number") from None
    return polygons, microns_per_pixel


def rasterize_instances(polygons: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """An int32 (H, W) instance map: 0 background, region k (file order, from 1) filled with k.

    A pixel belongs to a polygon when its centre (integer ``(row, col)``) lies inside or on it
    (``skimage.draw.polygon`` with ``r = Y``, ``c = X``); vertices outside the image are clipped.
    Overlapping nuclei: the later region wins, so an id can lose pixels or, when covered whole, vanish.
    """
    instances = np.zeros(shape, np.int32)
    for k, vertices in enumerate(polygons, start=1):
        rows, cols = fill_polygon(vertices[:, 1], vertices[:, 0], shape)
        instances[rows, cols] = k
    return instances


def resize_instances(instances: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """Nearest-neighbour resize of an integer (H, W) map keeping the ids exactly (float64 holds them)."""
    if size is None or tuple(instances.shape) == tuple(size):
        return instances
    return F.interpolate(instances[None, None].double(), size=size, mode="nearest")[0, 0].long()


def _image_size(path: Path) -> tuple[int, int] | str:
    """``(height, width)`` from the header, or why the file cannot be read."""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (UnidentifiedImageError, OSError) as err:
        return f"not a readable image ({err})"
    return height, width


class MoNuSeg(CaseDataset):
    """MoNuSeg 2018 nuclei in the official layout; polygon annotations rasterised to instance maps.

    Dataset: Kumar et al., IEEE TMI 2017; MoNuSeg 2018 challenge.

    Splits (deterministic): ``test`` is every image of ``<root>/MoNuSegTestData`` (or of ``root`` itself
    when ``root`` is that folder). ``train`` and ``val`` split the images of ``<root>/Tissue Images`` (sorted
    by name): a seeded permutation (:func:`~diffseg_lightning.data.splits.train_val_split`, ``seed``) puts
    ``round(val_fraction * N)`` of them in ``val`` (6 of the 30 official training images by default) and
    the rest in ``train``. With ``folds`` = k, ``val`` is fold ``fold`` of a seeded k-fold of the training
    images and ``train`` the other folds (``val_fraction`` is then unused); ``test`` stays the official
    one. The split depends only on the image files found (their XML present or not).

    Bad cases: an image without its XML is an error naming both (any training image, whatever its split,
    so it is found before training); so is, with crops, an image whose header cannot be read or that is
    smaller than ``crop_size``. Under ``on_bad_case="skip"`` such a case is left out of its split and listed
    in ``skipped`` (by the dataset of that split only). ``seen_labels`` collects the ids of the rasterised
    instance maps (the stored label is a polygon list; at most 64 distinct ids are recorded).

    Caching: with ``crop="random"`` every read of an item gives another window, so
    ``deterministic_items`` is False and the DataModule's array cache refuses the dataset.

    Annotations: :func:`parse_regions` then :func:`rasterize_instances` (pixel centres inside the polygon,
    x = column; later regions win where nuclei overlap). A missing XML, one that cannot be parsed or lacks
    the Region layout is an error naming the file. The rasterised map of every image read is cached in
    memory (int32, 4 MB per 1000x1000 image; about 0.5 s of XML parsing and filling saved per read);
    ``cache=False`` keeps only the last one.

    Size and crops:
        - ``crop="none"`` (default): the whole 1000x1000 image is one item, resized to ``size`` (256 by
          default, so nuclei of ~20 px shrink to ~5 px; use crops for work at native resolution).
        - ``crop="random"``: one random ``crop_size`` window per item, drawn with torch's global RNG (which
          Lightning seeds per worker), for training.
        - ``crop="tile"``: every image cut into ``crop_size`` tiles on a grid of stride ``crop_size``, the
          last row and column shifted to end at the border (they overlap their neighbours when the size
          is not a multiple), one item per tile, for evaluation (a 1000 px side and 256 px tiles: 4 x 4).
        The crop is then resized to ``size`` (None keeps it).

    Items:
        ``image`` (3, H, W) float32 (0-255, the DataModule z-scores it), bilinear;
        ``instances`` (H, W) int64 instance ids, nearest (ids kept exactly; small nuclei can vanish when
        downsizing); ``mask`` (1, H, W) float32 = ``instances > 0`` after resizing;
        ``spacing`` (2,) float32 micrometres per returned pixel (the XML's ``MicronsPerPixel`` scaled by
        the resize; NaN when the XML does not give it); ``origin`` (2,) int64 the crop's top-left
        (row, col) in the original image ((0, 0) without crops); ``original_size`` (2,) int64 the (H, W)
        of the stored pixels the item covers (the image, or the crop), to resize predictions back;
        ``case`` (str, the image file path); ``index``.

    Args:
        root: the MoNuSeg folder (holding ``Tissue Images``, ``Annotations`` and / or ``MoNuSegTestData``),
            or the ``MoNuSegTestData`` folder itself.
        split: ``train``, ``val`` or ``test``.
        size: resize target (H, W) or one int; None keeps the native (or crop) size.
        channels: image channels the model expects (3); an image with another count is an error naming it.
        val_fraction: share of the training images that form ``val``.
        seed: seed of the train / val split.
        crop: ``none``, ``random`` or ``tile`` (see above).
        crop_size: crop / tile size (H, W) or one int.
        cache: keep every rasterised instance map in memory.
        on_bad_case: ``error`` or ``skip`` (see Bad cases).
        folds: k for k-fold cross-validation on the training images (None: ``val_fraction``).
        fold: the validation fold, 0 .. k - 1.

    Raises:
        ValueError: for an unknown split or crop, or a ``val_fraction`` outside [0, 1].
        DiffSegError: naming the file, for a missing folder, image or XML, an unreadable image or XML, a
            wrong channel count, or a crop larger than the image (``skip`` leaves out a case whose XML is
            missing, or whose image is unreadable or smaller than the crop when the items are laid out).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        size: int | Sequence[int] | None = 256,
        channels: int | None = 3,
        val_fraction: float = 0.2,
        seed: int = 0,
        crop: str = "none",
        crop_size: int | Sequence[int] = 256,
        cache: bool = True,
        on_bad_case: str = "error",
        folds: int | None = None,
        fold: int = 0,
    ) -> None:
        super().__init__(on_bad_case)
        self.split = check_split(split)
        if crop not in CROPS:
            raise ConfigError(f"crop must be one of {CROPS}, got {crop!r}")
        if not 0.0 <= float(val_fraction) <= 1.0:
            raise ConfigError(f"val_fraction must lie in [0, 1], got {val_fraction}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise DiffSegError(f"data root {self.root} does not exist or is not a folder")
        self.size = as_size(size)
        self.channels = channels
        self.crop = crop
        self.crop_size = as_size(crop_size)
        self.cache = cache
        self.folds, self.fold = folds, fold
        self.deterministic_items = crop != "random"  # a random crop differs on every read: not cacheable

        if split == "test":
            folder = self.root / TEST_FOLDER if (self.root / TEST_FOLDER).is_dir() else self.root
            if folder == self.root and self.root.name != TEST_FOLDER:
                raise DiffSegError(
                    f"{self.root / TEST_FOLDER}: no MoNuSeg test folder (<root>/{TEST_FOLDER}/*.tif)"
                )
            files = self.list_images(folder)
            pairs = self.find_pairs(files, folder, range(len(files)))
        else:
            images = self.root / TRAIN_IMAGES
            if not images.is_dir():
                raise DiffSegError(
                    f"{images}: no MoNuSeg training folder (the layout is <root>/{TRAIN_IMAGES}/*.tif with "
                    f"<root>/{TRAIN_ANNOTATIONS}/*.xml)"
                )
            files = self.list_images(images)
            chosen = train_val_split(len(files), split, float(val_fraction), seed, folds, fold)
            pairs = self.find_pairs(files, self.root / TRAIN_ANNOTATIONS, chosen)

        self.pairs: list[tuple[Path, Path]] = []
        self.items: list[tuple[int, int, int]] = []  # (pair, top, left); (pair, -1, -1): whole or random
        for image_path, xml in pairs:
            number = len(self.pairs)
            if crop == "none":
                self.pairs.append((image_path, xml))
                self.items.append((number, 0, 0))
                continue
            size = _image_size(image_path)
            if isinstance(size, str):
                self.bad_case(image_path, size)
                continue
            (height, width), (ch, cw) = size, self.crop_size
            if ch > height or cw > width:
                self.bad_case(
                    image_path, f"image of size {(height, width)} is smaller than data.crop_size {(ch, cw)}"
                )
                continue
            self.pairs.append((image_path, xml))
            if crop == "random":
                self.items.append((number, -1, -1))
            else:
                tops = sorted({*range(0, height - ch, ch), height - ch})
                lefts = sorted({*range(0, width - cw, cw), width - cw})
                self.items.extend((number, top, left) for top in tops for left in lefts)
        self._instances: dict[int, tuple[np.ndarray, float | None]] = {}

    @staticmethod
    def list_images(folder: Path) -> list[Path]:
        """The image files of ``folder``, sorted by name; none at all is an error naming the folder."""
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DiffSegError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return files

    def find_pairs(
        self, files: Sequence[Path], annotations: Path, chosen: Sequence[int]
    ) -> list[tuple[Path, Path]]:
        """The images ``files[i]`` for ``i`` in ``chosen`` with their ``annotations/<stem>.xml``.

        An image of ``files`` without its XML, or whose stem another image shares (``a.tif`` and ``a.png``:
        one case stored twice, both paired with ``a.xml``), is :meth:`bad_case` (under ``error`` whichever
        split it is in; under ``skip`` it is recorded only when it is one of ``chosen``) and is left out.
        """
        chosen = set(chosen)
        twins = same_stems(files)
        pairs = []
        for number, path in enumerate(files):
            xml = annotations / f"{path.stem}.xml"
            if path in twins:
                problem = f"{twins[path].name} has the same stem: both would pair with {xml.name}; keep one"
            elif not xml.is_file():
                problem = f"no annotation {xml} (MoNuSeg pairs <id>.tif with <id>.xml)"
            else:
                problem = None
            if problem is not None:
                if number in chosen or self.on_bad_case == "error":
                    self.bad_case(path, problem)
            elif number in chosen:
                pairs.append((path, xml))
        return pairs

    def instances_of(self, number: int, shape: tuple[int, int]) -> tuple[np.ndarray, float | None]:
        """The rasterised instance map of an image (cached) and its micrometres per pixel."""
        if number not in self._instances:
            polygons, microns = parse_regions(self.pairs[number][1])
            if not self.cache:
                self._instances.clear()
            self._instances[number] = (self.note_labels(rasterize_instances(polygons, shape)), microns)
        instances, microns = self._instances[number]
        if instances.shape != shape:
            raise DiffSegError(
                f"{self.pairs[number][0]}: image size changed from {instances.shape} to {shape}"
            )
        return instances, microns

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        number, top, left = self.items[index]
        image_path, _ = self.pairs[number]
        image = check_channels(read_image(image_path), self.channels, image_path)
        height, width = image.shape[-2:]
        instances, microns = self.instances_of(number, (height, width))
        h, w = (height, width) if self.crop == "none" else self.crop_size
        if self.crop == "random":
            top = int(torch.randint(0, height - h + 1, ()).item())
            left = int(torch.randint(0, width - w + 1, ()).item())
        image_t = torch.from_numpy(np.ascontiguousarray(image[:, top : top + h, left : left + w]))
        ids = torch.from_numpy(instances[top : top + h, left : left + w].astype(np.int64))
        out_ids = resize_instances(ids, self.size)
        scale = torch.tensor([h / out_ids.shape[0], w / out_ids.shape[1]], dtype=torch.float32)
        return {
            "image": resize(image_t, self.size, "bilinear"),
            "instances": out_ids,
            "mask": (out_ids > 0).float()[None],
            "spacing": scale * (microns if microns is not None else float("nan")),
            "origin": torch.tensor([top, left]),
            "original_size": torch.tensor([h, w]),
            "case": str(image_path),
            "index": torch.tensor(index),
        }


__all__ = ["MoNuSeg", "parse_regions", "rasterize_instances", "resize_instances"]
