"""REFUGE optic disc and cup segmentation in its official layout (Orlando et al., "REFUGE Challenge: A unified
framework for evaluating automated methods for glaucoma assessment from fundus photographs", Medical Image
Analysis 2020).

Also home of :func:`read_table` (the rows of a CSV or XLSX sheet, the latter with the standard library only).
"""

from __future__ import annotations

import csv
import math
import re
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from diffseg_lightning.data.base import CaseDataset, check_channels, check_same_size
from diffseg_lightning.data.splits import check_split, train_val_split
from diffseg_lightning.data.transforms import as_size, resize
from diffseg_lightning.io.files import same_stems
from diffseg_lightning.io.images import read_grey
from diffseg_lightning.utils.errors import ConfigError, DiffSegError

TARGETS = ("cup", "disc", "both")
CUP, RIM, BACKGROUND = 0, 128, 255  # the grey values of Disc_Cup_Masks/*.bmp
MASK_VALUES = (CUP, RIM, BACKGROUND)
TRAIN_CLASSES = {"Glaucoma": 1, "Non-Glaucoma": 0}  # Training400/<class>/ and Disc_Cup_Masks/<class>/
GT_CLASSES = {"G": 1, "N": 0, "Glaucoma": 1, "Non-Glaucoma": 0}  # class subfolders some GT releases have
UNKNOWN_LABEL = -1  # a validation / test image whose glaucoma label is in no table the loader can read
DRAFT_MIN_REDUCTION = 2  # decode JPEGs at 1/2, 1/4 or 1/8 scale when the output is at least 2x smaller
_XLSX = "{http://schemas.openxmlformats.org/spreadsheetml/2006/main}"
_REL = "{http://schemas.openxmlformats.org/officeDocument/2006/relationships}"
_CELL = re.compile(r"^([A-Z]+)\d*$")


# ------------------------------------------------------------------------------------------ shared readers
def _column(ref: str) -> int:
    """``"C7"`` -> 2."""
    match = _CELL.match(ref or "")
    if not match:
        return -1
    number = 0
    for letter in match.group(1):
        number = number * 26 + ord(letter) - ord("A") + 1
    return number - 1


def _first_sheet(book: zipfile.ZipFile) -> str:
    """The archive path of the workbook's first sheet (from workbook.xml and its relationships)."""
    try:
        workbook = ET.fromstring(book.read("xl/workbook.xml"))
        rels = ET.fromstring(book.read("xl/_rels/workbook.xml.rels"))
        first = workbook.find(f"{_XLSX}sheets/{_XLSX}sheet")
        rid = first.get(f"{_REL}id") if first is not None else None
        for rel in rels:
            if rel.get("Id") == rid:
                target = rel.get("Target", "").lstrip("/")
                return target if target.startswith("xl/") else f"xl/{target}"
    except KeyError:
        pass
    sheets = sorted(n for n in book.namelist() if re.match(r"xl/worksheets/sheet\d+\.xml$", n))
    if not sheets:
        raise KeyError("no worksheet")
    return sheets[0]


def read_xlsx(path: Path) -> list[list[str]]:
    """The cells of an XLSX workbook's first sheet as rows of strings, read with ``zipfile`` and ElementTree.

    Shared strings, inline strings and numbers are supported (numbers as written, e.g. ``"1"``); formulas
    give their cached value. Enough for the flat tables challenges ship; no openpyxl needed.
    """
    with zipfile.ZipFile(path) as book:
        shared: list[str] = []
        if "xl/sharedStrings.xml" in book.namelist():
            for item in ET.fromstring(book.read("xl/sharedStrings.xml")).iter(f"{_XLSX}si"):
                shared.append("".join(t.text or "" for t in item.iter(f"{_XLSX}t")))
        sheet = ET.fromstring(book.read(_first_sheet(book)))
    rows = []
    for row in sheet.iter(f"{_XLSX}row"):
        cells: dict[int, str] = {}
        for position, cell in enumerate(row.iter(f"{_XLSX}c")):
            column = _column(cell.get("r", "")) if cell.get("r") else position
            kind, value = cell.get("t"), cell.find(f"{_XLSX}v")
            if kind == "s" and value is not None:
                text = shared[int(value.text)]
            elif kind == "inlineStr":
                text = "".join(t.text or "" for t in cell.iter(f"{_XLSX}t"))
            else:
                text = value.text or "" if value is not None else ""
            cells[column] = text
        rows.append([cells.get(i, "") for i in range(max(cells) + 1)] if cells else [])
    return rows


def read_table(path: Path) -> list[list[str]]:
    """Rows of a ``.csv`` or ``.xlsx`` file as lists of stripped strings (empty rows dropped).

    Raises:
        DiffSegError: naming the file when it cannot be read.
    """
    try:
        if path.suffix.lower() == ".xlsx":
            rows = read_xlsx(path)
        else:
            text = path.read_text(encoding="utf-8-sig")
            rows = list(csv.reader(line for line in text.splitlines() if line.strip()))
    except (
        OSError,
        UnicodeDecodeError,
        zipfile.BadZipFile,
        ET.ParseError,
        KeyError,
        IndexError,
        ValueError,
    ) as err:
        raise DiffSegError(f"{path}: not a readable table ({type(err).__name__}: {err})") from None
    return [[cell.strip() for cell in row] for row in rows if any(cell.strip() for cell in row)]


def glaucoma_labels(path: Path) -> dict[str, int]:
    """``{image stem: 0 / 1}`` from a REFUGE table with an ``ImgName`` column and a glaucoma label column
    (``Label(Glaucoma=1)`` in the test GT, ``Glaucoma Label`` in the validation GT); {} for a table without
    them (e.g. fovea locations only).

    Raises:
        DiffSegError: naming the file and row for a label other than 0 / 1.
    """
    rows = read_table(path)
    if not rows:
        return {}
    header = [cell.lower().replace(" ", "") for cell in rows[0]]
    name_col = next(
        (i for i, h in enumerate(header) if h in ("imgname", "imagename", "image", "filename")), None
    )
    label_col = next((i for i, h in enumerate(header) if "glaucoma" in h and "label" in h), None)
    if name_col is None or label_col is None:
        return {}
    labels = {}
    for line, row in enumerate(rows[1:], start=2):
        if name_col >= len(row) or not row[name_col]:
            continue
        value = row[label_col] if label_col < len(row) else ""
        try:
            label = float(value)
        except ValueError:
            label = math.nan
        if label not in (0.0, 1.0):
            raise DiffSegError(f"{path}, row {line}: glaucoma label {value!r} is not 0 or 1")
        labels[Path(row[name_col]).stem] = int(label)
    return labels


def find_folder(root: Path, names: Sequence[str], usable: Callable[[Path], bool]) -> Path | None:
    """The first ``root/<name>`` or ``root/<any folder>/<name>`` (one wrapper level, as unzipping often adds)
    that ``usable`` accepts, trying ``names`` in order; None when there is none."""
    wrappers = sorted(p for p in root.iterdir() if p.is_dir())
    for name in names:
        for base in (root, *wrappers):
            candidate = base / name
            if candidate.is_dir() and usable(candidate):
                return candidate
    return None


def _has_jpg(folder: Path) -> bool:
    return any(p.suffix.lower() in (".jpg", ".jpeg") for p in folder.iterdir())


def _jpgs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg"))


# ------------------------------------------------------------------------------------------------- REFUGE
class REFUGE(CaseDataset):
    """REFUGE fundus photographs (Orlando et al., MedIA 2020), read from the official release as it is.

    Layout (each zip of the release unpacked under ``root``; one extra wrapper folder per zip, e.g.
    ``REFUGE-Training400/Training400/``, is found too)::

        Training400/{Glaucoma,Non-Glaucoma}/{g,n}NNNN.jpg                    2124 x 2056 (W x H), Zeiss
        Annotation-Training400/Disc_Cup_Masks/{Glaucoma,Non-Glaucoma}/<stem>.bmp
        REFUGE-Validation400/VNNNN.jpg                                       1634 x 1634, Canon
        REFUGE-Validation400-GT/Disc_Cup_Masks/VNNNN.bmp  (+ Fovea_locations.xlsx, with the glaucoma label)
        REFUGE-Test400/TNNNN.jpg (or Test400/)                               1634 x 1634, Canon
        REFUGE-Test400-GT/ or REFUGE-Test-GT/Disc_Cup_Masks/[G/|N/]TNNNN.bmp
                                            (+ Glaucoma_label_and_Fovea_location.xlsx)

    Masks: grey 0 = optic cup, 128 = neuroretinal rim (disc minus cup), 255 = background, as the official
    evaluation (``refuge-evaluation``) reads them: cup = ``mask == 0``, disc = ``mask < 255``. The BMPs are
    lossless, so any other value is an error naming the file (the evaluation's thresholds would hide it).
    Values are read with :func:`read_grey` (a palette BMP gives grey values, not palette indices).

    Targets (``target``): ``cup`` (1 channel), ``disc`` (cup + rim, 1 channel), or ``both`` (2 channels:
    [disc, cup]; set ``data.mask_channels=2``).

    Glaucoma label (``label``, int64: 1 glaucoma, 0 not): training from the class folder; validation / test
    from the release's tables in the GT folder: every ``.csv`` or ``.xlsx`` there with an ``ImgName`` column
    and a glaucoma label column (XLSX read with the standard library, :func:`read_xlsx`), else from a
    ``G/`` / ``N/`` subfolder of ``Disc_Cup_Masks``; a table and a folder that disagree are an error;
    ``-1`` (``UNKNOWN_LABEL``) when neither gives one.

    Splits: ``train`` = Training400, ``val`` = REFUGE-Validation400, ``test`` = REFUGE-Test400 (the
    challenge's own). With ``folds`` = k: ``val`` is fold ``fold`` of a seeded k-fold of the Training400
    images (sorted by name) and ``train`` the other folds; Validation400 is then unused, Test400 stays the
    test set. The split depends only on the image files found; only the folders of the requested split are
    read.

    Preprocessing (choices of ours; the paper fixes none):
        Whole fundus, resized to ``size`` (default 128; MedSegDiff / MedSegDiff-V2 train at 256). The
        MedSegDiff papers report REFUGE(-2) without giving their crop, and the survey in /work/shared/papers
        says nothing; their released code reads the REFUGE-MultiRater re-release, disc-centred crops. At 128
        px the whole fundus leaves the cup ~8 px wide, so ``disc_crop`` = s crops a square of side s times
        the disc's larger extent (bounding box of ``mask < 255``), centred on the disc and clamped inside the
        image, from the ground truth: oracle localisation, as those crops are; s = 2 gives a disc about half
        the crop. Training (Zeiss) and validation / test (Canon) images differ in scale; a disc-relative crop
        removes most of that difference. ``original_size`` is the size of the region returned (the crop, or
        the stored image), so predictions resize back onto it; ``crop_box`` gives where it lies.
        Large JPEGs are decoded at reduced scale (PIL's ``Image.draft``, the JPEG decoder's DCT scaling
        to 1/2, 1/4 or 1/8) when the output is at least ``DRAFT_MIN_REDUCTION`` times smaller than the
        region, then resized bilinearly: a 2124 x 2056 JPEG decodes at 1/8 scale in 10 ms instead of 22 ms
        (measured here; entropy decoding remains) and the resize gets 64x fewer pixels; the DCT scaling
        averages 8 x 8 blocks, so the bilinear step no longer aliases. The crop box is snapped to the
        decoder's scale grid, so image and mask cover exactly the same native pixels.
        Intensities: 0..255 as stored (the DataModule z-scores per image and channel).

    Items:
        ``image`` float32 (3, H, W) bilinear to ``size``; ``mask`` float32 (1 or 2, H, W) in {0, 1}, nearest;
        ``label`` int64; ``case`` (str, the image path); ``index`` int64; ``original_size`` int64 (2,);
        ``crop_box`` int64 (4,) ``[top, left, bottom, right]`` of the returned region in stored pixels.

    Args:
        root: the folder holding the unpacked release.
        split: ``train``, ``val`` or ``test``.
        size: resize target (H, W) or one int; None keeps the native size (two sizes in the release).
        channels: expected image channels (3); None accepts any.
        target: ``cup``, ``disc`` or ``both``.
        disc_crop: None (whole fundus) or the crop side in multiples of the disc's extent (> 1).
        seed: seed of the k-fold split.
        on_bad_case: ``error`` or ``skip``: an image without its mask (naming the expected mask), or one
            whose stem another image shares (``V0001.jpg`` and ``V0001.jpeg``, naming both), is an error,
            or (``skip``) left out and listed in ``skipped``.
        folds: k for k-fold cross-validation on Training400 (None: the official Validation400 is ``val``).
        fold: the validation fold, 0 .. k - 1.

    Raises:
        ValueError: for an unknown split or target, or ``disc_crop`` <= 1.
        DiffSegError: naming the folder when the split's image or mask folder is missing or empty, naming the
            file for an image without its mask; when an item is read, naming the file, for an unreadable
            image or mask, a size mismatch, mask values other than 0 / 128 / 255, or no disc to crop around.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        size: int | Sequence[int] | None = 128,
        channels: int | None = 3,
        target: str = "cup",
        disc_crop: float | None = None,
        seed: int = 0,
        on_bad_case: str = "error",
        folds: int | None = None,
        fold: int = 0,
    ) -> None:
        super().__init__(on_bad_case)
        self.split = check_split(split, name="REFUGE")
        if target not in TARGETS:
            raise ConfigError(f"REFUGE: target must be one of {TARGETS}, got {target!r}")
        if disc_crop is not None and not float(disc_crop) > 1.0:
            raise ConfigError(
                f"REFUGE: disc_crop must be None or a factor > 1 of the disc extent, got {disc_crop}"
            )
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DiffSegError(f"data root {self.root} does not exist or is not a folder")
        self.size = as_size(size)
        self.channels = channels
        self.target = target
        self.disc_crop = None if disc_crop is None else float(disc_crop)
        self.seed, self.folds, self.fold = seed, folds, fold
        if split == "test" or (split == "val" and folds is None):
            candidates = scanned = self.scan_official(split)
        else:
            scanned = self.scan_training()
            chosen = (
                train_val_split(len(scanned), split, 0.0, seed, folds, fold)
                if folds is not None
                else range(len(scanned))
            )
            candidates = [scanned[i] for i in chosen]
        twins = same_stems([image for image, _, _ in scanned])
        self.cases: list[tuple[Path, Path, int]] = []
        for image, mask, label in candidates:
            if image in twins:
                self.bad_case(
                    image, f"{twins[image].name} has the same stem: both would pair with {mask.name}"
                )
            elif not mask.is_file():
                self.bad_case(image, f"no mask; expected {mask}")
            else:
                self.cases.append((image, mask, label))

    # ----------------------------------------------------------------------------------------- scanning
    def scan_training(self) -> list[tuple[Path, Path, int]]:
        """``(image, expected mask, label)`` of every Training400 image, sorted by file name."""
        images_dir = find_folder(
            self.root, ("Training400",), lambda p: any((p / c).is_dir() for c in TRAIN_CLASSES)
        )
        if images_dir is None:
            raise DiffSegError(
                f"{self.root}: no Training400/ folder with Glaucoma/ and Non-Glaucoma/ (the REFUGE training "
                "images, Training400/{Glaucoma,Non-Glaucoma}/*.jpg)"
            )
        masks_dir = find_folder(self.root, ("Annotation-Training400/Disc_Cup_Masks",), lambda p: True)
        if masks_dir is None:
            raise DiffSegError(
                f"{self.root}: no Annotation-Training400/Disc_Cup_Masks/ folder (the training masks, "
                "Disc_Cup_Masks/{Glaucoma,Non-Glaucoma}/<stem>.bmp)"
            )
        cases = [
            (image, masks_dir / cls / f"{image.stem}.bmp", label)
            for cls, label in TRAIN_CLASSES.items()
            if (images_dir / cls).is_dir()
            for image in _jpgs(images_dir / cls)
        ]
        if not cases:
            raise DiffSegError(f"{images_dir}: no .jpg images in Glaucoma/ or Non-Glaucoma/")
        return sorted(cases, key=lambda case: case[0].name)

    def scan_official(self, split: str) -> list[tuple[Path, Path, int]]:
        """``(image, expected mask, label)`` of Validation400 or Test400, sorted by file name."""
        image_names = (
            ("REFUGE-Validation400", "Validation400") if split == "val" else ("REFUGE-Test400", "Test400")
        )
        gt_names = ("REFUGE-Validation400-GT",) if split == "val" else ("REFUGE-Test400-GT", "REFUGE-Test-GT")
        images_dir = find_folder(self.root, image_names, _has_jpg)
        if images_dir is None:
            raise DiffSegError(f"{self.root}: no {' or '.join(image_names)}/ folder holding .jpg images")
        gt_dir = find_folder(self.root, gt_names, lambda p: (p / "Disc_Cup_Masks").is_dir())
        if gt_dir is None:
            raise DiffSegError(
                f"{self.root}: no {' or '.join(gt_names)}/Disc_Cup_Masks/ folder (the {split} masks)"
            )
        masks: dict[str, Path] = {}
        for path in sorted((gt_dir / "Disc_Cup_Masks").rglob("*")):
            if path.is_file() and path.suffix.lower() == ".bmp":
                if path.stem in masks:
                    raise DiffSegError(f"{path}: a second mask for {path.stem} (first: {masks[path.stem]})")
                masks[path.stem] = path
        tables = {}
        for table in sorted(
            p for p in gt_dir.iterdir() if p.is_file() and p.suffix.lower() in (".csv", ".xlsx")
        ):
            for stem, label in glaucoma_labels(table).items():
                tables.setdefault(stem, (label, table))
        cases = []
        for image in _jpgs(images_dir):
            mask = masks.get(image.stem, gt_dir / "Disc_Cup_Masks" / f"{image.stem}.bmp")
            folder_label = GT_CLASSES.get(mask.parent.name)
            label, table = tables.get(image.stem, (None, None))
            if label is not None and folder_label is not None and label != folder_label:
                raise DiffSegError(
                    f"{table}: glaucoma label {label} of {image.stem} disagrees with its mask folder "
                    f"{mask.parent}"
                )
            label = label if label is not None else folder_label
            cases.append((image, mask, UNKNOWN_LABEL if label is None else label))
        return cases

    # ------------------------------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self.cases)

    def __repr__(self) -> str:
        return (
            f"REFUGE(root={str(self.root)!r}, split={self.split!r}, cases={len(self)}, size={self.size}, "
            f"target={self.target!r}, disc_crop={self.disc_crop}, folds={self.folds}, fold={self.fold})"
        )

    def crop_box(self, raw: np.ndarray, mask_path: Path) -> tuple[int, int, int, int]:
        """``(top, left, bottom, right)`` of the region to return, in stored pixels."""
        height, width = raw.shape
        if self.disc_crop is None:
            return 0, 0, height, width
        rows, cols = np.nonzero(raw < BACKGROUND)
        if rows.size == 0:
            raise DiffSegError(f"{mask_path}: no optic disc (no value < 255) to centre disc_crop on")
        extent = max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
        side = min(int(round(self.disc_crop * extent)), height, width)
        centre_y, centre_x = (rows.min() + rows.max() + 1) / 2, (cols.min() + cols.max() + 1) / 2
        top = int(np.clip(round(centre_y - side / 2), 0, height - side))
        left = int(np.clip(round(centre_x - side / 2), 0, width - side))
        return top, left, top + side, left + side

    def read_fundus(
        self, path: Path, mask_path: Path, raw: np.ndarray
    ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
        """The image region (3, h, w) float32, decoded at reduced scale where that helps, and its box in
        stored pixels (snapped to the decoder's scale grid)."""
        try:
            with Image.open(path) as img:
                width, height = img.size
                check_same_size(mask_path, raw.shape, path, (height, width))
                top, left, bottom, right = self.crop_box(raw, mask_path)
                if self.size is not None and img.format == "JPEG":
                    reduction = min((bottom - top) / self.size[0], (right - left) / self.size[1])
                    if reduction >= DRAFT_MIN_REDUCTION:
                        img.draft("RGB", (math.ceil(width / reduction), math.ceil(height / reduction)))
                scale = max(1, round(width / img.size[0]))  # 1, 2, 4 or 8
                array = np.asarray(img.convert("RGB"))
        except DiffSegError:
            raise
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise DiffSegError(f"{path}: not a readable image ({err})") from None
        t, lft = top // scale, left // scale
        b, r = math.ceil(bottom / scale), math.ceil(right / scale)
        region = np.moveaxis(array[t:b, lft:r], -1, 0).astype(np.float32)
        return region, (t * scale, lft * scale, min(b * scale, height), min(r * scale, width))

    def __getitem__(self, index: int) -> dict:
        image_path, mask_path, label = self.cases[index]
        raw = self.note_labels(read_grey(mask_path))
        self.check_labels(
            raw, MASK_VALUES, mask_path, "expected the REFUGE values (0 cup, 128 rim, 255 background)"
        )
        image, box = self.read_fundus(image_path, mask_path, raw)
        check_channels(image, self.channels, image_path)
        raw = raw[box[0] : box[2], box[1] : box[3]]
        cup, disc = raw == CUP, raw < BACKGROUND
        planes = {"cup": [cup], "disc": [disc], "both": [disc, cup]}[self.target]
        mask = torch.from_numpy(np.stack(planes).astype(np.float32))
        return {
            "image": resize(torch.from_numpy(image), self.size, "bilinear"),
            "mask": resize(mask, self.size, "nearest"),
            "label": torch.tensor(label, dtype=torch.int64),
            "case": str(image_path),
            "index": torch.tensor(index),
            "original_size": torch.tensor(raw.shape, dtype=torch.int64),
            "crop_box": torch.tensor(box, dtype=torch.int64),
        }


__all__ = ["MASK_VALUES", "REFUGE", "TARGETS", "UNKNOWN_LABEL", "find_folder", "read_table"]
