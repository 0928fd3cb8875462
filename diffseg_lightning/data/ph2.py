"""PH2 dermoscopy in its official layout (Mendonça et al., "PH2 - A dermoscopic image database for research
and benchmarking", EMBC 2013)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from diffseg_lightning.data.base import CaseDataset, check_channels, locate_root
from diffseg_lightning.data.isic import read_binary_lesion_mask
from diffseg_lightning.data.splits import check_split, seeded_split
from diffseg_lightning.data.transforms import as_size, resize
from diffseg_lightning.io.images import read_image
from diffseg_lightning.utils.errors import ConfigError, DiffSegError

PH2_SPLITS = ("train", "val", "test")
PH2_CLASSES = ("common nevus", "atypical nevus", "melanoma")  # label 0, 1, 2
_CASE_NAME = re.compile(r"^IMD\d+$")


class PH2Record(NamedTuple):
    """One row of ``PH2_dataset.txt``: the clinical class (0 common nevus, 1 atypical nevus, 2 melanoma) and
    the histological diagnosis (empty for most rows)."""

    label: int
    histology: str


def table_cells(line: str) -> list[str] | None:
    """The cells of one ``||``-table line, stripped; None for a line that is not a table row.

    ``PH2_dataset.txt`` separates column groups with ``||`` and the dermoscopic criteria inside a group with
    ``|``; both separate cells here, and an empty cell (the blank Histological Diagnosis of most rows)
    stays a cell, so later columns keep their places.
    """
    text = line.strip()
    if not text.startswith("|"):
        return None
    text = re.sub(r"^\|\|?", "", text)
    text = re.sub(r"\|\|?$", "", text)
    return [cell.strip() for group in text.split("||") for cell in group.split("|")]


def read_ph2_table(path: Path) -> dict[str, PH2Record]:
    """Parse ``PH2_dataset.txt`` into ``{name: PH2Record}``.

    The release's table (one header row, then one row per image)::

        ||   Name || Histological Diagnosis || Clinical Diagnosis || Asymmetry | Pigment Network | ...
        || IMD003 ||                        ||                  0 ||         0 |               T | ...

    (the rows go on with the other criteria and ``|| Colors ||``). ``Clinical Diagnosis`` is a code: 0 common
    nevus, 1 atypical nevus, 2 melanoma. The spreadsheet version (``PH2_dataset.xlsx``) has one column per
    class (``Common Nevus``, ``Atypical Nevus``, ``Melanoma``) with an ``X`` in the right one; a text export
    of that layout is read too (the class columns win when a header has both). Columns are found by their
    header names, case-insensitively, so their order and spacing do not matter; lines that are not
    ``|``-table rows (blank lines, a legend) and rows whose name is not ``IMD<digits>`` are ignored.

    Raises:
        DiffSegError: naming the file (and line) when it is missing or unreadable, has no header with a name
            column and a clinical-diagnosis column (or the three class columns), lists a name twice, holds a
            code other than 0 / 1 / 2 or a row without exactly one class marked, or holds no image row.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DiffSegError(f"{path}: not found (PH2's clinical diagnoses, PH2_dataset.txt)") from None
    except OSError as err:
        raise DiffSegError(f"{path}: not readable ({err})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("latin-1")  # every byte decodes; the columns we read are ASCII
    columns: dict[str, int] | None = None
    records: dict[str, PH2Record] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        cells = table_cells(line)
        if not cells:
            continue
        lowered = [cell.lower() for cell in cells]
        if not _CASE_NAME.match(cells[0]) and ("name" in lowered or "image name" in lowered):
            columns = _header_columns(lowered)
            continue
        name = cells[0]
        if not _CASE_NAME.match(name):
            continue
        if columns is None or not _has_label_columns(columns):
            raise DiffSegError(
                f"{path}, line {number}: row {name} before a header naming 'Name' and 'Clinical Diagnosis' "
                f"(or 'Common Nevus', 'Atypical Nevus', 'Melanoma')"
            )
        if name in records:
            raise DiffSegError(f"{path}, line {number}: {name} is listed twice")
        records[name] = PH2Record(
            _row_label(cells, columns, path, number), _cell(cells, columns["histology"])
        )
    if not records:
        raise DiffSegError(f"{path}: no IMD<nnn> rows (expected the PH2 table with '||'-separated columns)")
    return records


def _header_columns(header: list[str]) -> dict[str, int]:
    def find(*names: str) -> int:
        return next((i for i, cell in enumerate(header) if cell in names), -1)

    return {
        "name": find("name", "image name"),
        "histology": find("histological diagnosis"),
        "clinical": find("clinical diagnosis"),
        **{f"class{k}": find(cls) for k, cls in enumerate(PH2_CLASSES)},
    }


def _has_label_columns(columns: dict[str, int]) -> bool:
    return columns["clinical"] >= 0 or all(columns[f"class{k}"] >= 0 for k in range(len(PH2_CLASSES)))


def _cell(cells: list[str], column: int) -> str:
    return cells[column] if 0 <= column < len(cells) else ""


def _row_label(cells: list[str], columns: dict[str, int], path: Path, number: int) -> int:
    name = cells[0]
    if all(columns[f"class{k}"] >= 0 for k in range(len(PH2_CLASSES))):
        marked = [k for k in range(len(PH2_CLASSES)) if _cell(cells, columns[f"class{k}"]).upper() == "X"]
        if len(marked) != 1:
            raise DiffSegError(
                f"{path}, line {number}: {name} has {len(marked)} of the classes {PH2_CLASSES} marked X; "
                f"expected exactly one"
            )
        return marked[0]
    code = _cell(cells, columns["clinical"])
    if code not in ("0", "1", "2"):
        raise DiffSegError(
            f"{path}, line {number}: clinical diagnosis {code!r} of {name} is not 0, 1 or 2 "
            f"(common nevus, atypical nevus, melanoma)"
        )
    return int(code)


class PH2(CaseDataset):
    """PH2 dermoscopic images (Mendonça et al., EMBC 2013), read from the official release as it is.

    Layout under ``<root>/PH2Dataset/`` (``root`` may also be that folder itself; note the spaces in
    ``PH2 Dataset images``)::

        PH2 Dataset images/IMDnnn/IMDnnn_Dermoscopic_Image/IMDnnn.bmp   768 x 560 (about) RGB
        PH2 Dataset images/IMDnnn/IMDnnn_lesion/IMDnnn_lesion.bmp       lesion mask, 0/255
        PH2 Dataset images/IMDnnn/IMDnnn_roi/...                        colour-class ROIs (ignored)
        PH2_dataset.txt                                                 clinical diagnoses (read_ph2_table)

    200 images: 80 common nevi, 80 atypical nevi, 40 melanomas. Lesion masks are 0/255 BMPs; at least one
    is stored as 24-bit RGB with equal channels (accepted as grey), and 0/1 masks (1-bit BMPs) are accepted
    too. Any other value is an error naming the file (see
    :func:`~diffseg_lightning.data.isic.read_binary_lesion_mask`).

    Split (there is no official one): the ``IMDnnn`` folders, in numeric order, are cut by
    :func:`~diffseg_lightning.data.splits.seeded_split` into ``fractions`` (train / val / test, default
    0.7 / 0.1 / 0.2, i.e. 140 / 20 / 40), or with ``folds`` = k the test set is fold ``fold`` and the rest
    is split into train / val by ``fractions[0] : fractions[1]``. The split is per image (one lesion per
    image in PH2), not stratified by class, and is drawn over every case folder before its files are
    checked, so a case skipped under ``on_bad_case="skip"`` does not move the others between splits.

    Bad cases: a case folder without its image or lesion mask, or a name without a table row, is an error
    naming the expected file whatever split the case falls in (so it is found before training); under
    ``on_bad_case="skip"`` the case is left out of its split and listed in ``skipped`` (by the dataset of
    that split only).

    Items (the :class:`~diffseg_lightning.data.SegmentationDataModule` contract):
        ``image`` float32 (3, H, W), 0..255, bilinear to ``size``; ``mask`` float32 (1, H, W) in {0, 1},
        nearest; ``label`` int64, the clinical diagnosis (0 common nevus, 1 atypical nevus, 2 melanoma);
        ``case`` (str, the image path); ``index`` int64; ``original_size`` int64 (2,). ``records`` maps each
        name to its :class:`PH2Record` (label and histological diagnosis).

    Args:
        root: folder holding ``PH2Dataset/``, or ``PH2Dataset/`` itself.
        split: ``train``, ``val`` or ``test``.
        size: resize target (H, W) or one int; None keeps each image's size (they differ by a few pixels).
        channels: expected image channels (3); another count is an error naming the file. None accepts any.
        fractions: train / val / test shares.
        seed: shuffle seed of the split.
        folds: k of k-fold cross-validation, or None.
        fold: which fold is the test set (0 .. folds - 1).
        on_bad_case: ``error`` (a case without its image, mask or table row raises) or ``skip`` (it is left
            out, listed in ``skipped``).

    Raises:
        DiffSegError: when the folders or ``PH2_dataset.txt`` are missing or malformed (naming them), or
            (under ``error``) a case lacks its image, its mask or its table row. Unreadable files, a wrong
            channel count, a mask whose size differs from its image's and mask values other than 0/255 (or
            0/1) raise when the item is read, naming the file.
    """

    FOLDER = "PH2Dataset"
    IMAGES = "PH2 Dataset images"
    TABLE = "PH2_dataset.txt"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        size: int | Sequence[int] | None = 128,
        channels: int | None = 3,
        fractions: Sequence[float] = (0.7, 0.1, 0.2),
        seed: int = 0,
        folds: int | None = None,
        fold: int = 0,
        on_bad_case: str = "error",
    ) -> None:
        super().__init__(on_bad_case)
        self.split = check_split(split, PH2_SPLITS, "PH2")
        if len(fractions) != 3:
            raise ConfigError(
                f"PH2: fractions must be three shares (train, val, test), got {list(fractions)}"
            )
        self.root = locate_root(root, self.FOLDER, self.IMAGES)
        images_dir = self.root / self.IMAGES
        if not images_dir.is_dir():
            raise DiffSegError(f"{self.root}: no '{self.IMAGES}' folder (expected {images_dir}/IMDnnn/...)")
        self.records = read_ph2_table(self.root / self.TABLE)
        folders = sorted(
            (int(p.name[3:]), p) for p in images_dir.iterdir() if p.is_dir() and _CASE_NAME.match(p.name)
        )
        if not folders:
            raise DiffSegError(f"{images_dir}: no IMDnnn case folders")
        chosen = set(seeded_split(len(folders), fractions, seed, split, folds, fold))
        self.cases: list[tuple[Path, Path, int]] = []
        for i, (_, folder) in enumerate(folders):
            name = folder.name
            image = folder / f"{name}_Dermoscopic_Image" / f"{name}.bmp"
            mask = folder / f"{name}_lesion" / f"{name}_lesion.bmp"
            if not image.is_file():
                problem = (folder, f"no dermoscopic image; expected {image}")
            elif not mask.is_file():
                problem = (image, f"no lesion mask; expected {mask}")
            elif name not in self.records:
                problem = (image, f"no row for {name} in {self.root / self.TABLE}")
            else:
                problem = None
            if problem is not None and (i in chosen or self.on_bad_case == "error"):
                self.bad_case(
                    *problem
                )  # any split's missing file raises under "error" (found before training)
            elif i in chosen:
                self.cases.append((image, mask, self.records[name].label))
        self.size = as_size(size)
        self.channels = channels
        self.fractions = tuple(float(f) for f in fractions)
        self.seed = seed
        self.folds = folds
        self.fold = fold

    @property
    def names(self) -> list[str]:
        """The case names of this split, e.g. ``["IMD002", ...]``."""
        return [image.stem for image, _, _ in self.cases]

    def __len__(self) -> int:
        return len(self.cases)

    def __repr__(self) -> str:
        return (
            f"PH2(root={str(self.root)!r}, split={self.split!r}, cases={len(self)}, size={self.size}, "
            f"fractions={self.fractions}, seed={self.seed}, folds={self.folds}, fold={self.fold})"
        )

    def __getitem__(self, index: int) -> dict:
        image_path, mask_path, label = self.cases[index]
        image = check_channels(read_image(image_path), self.channels, image_path)
        mask = read_binary_lesion_mask(self, mask_path, image_path, image.shape, "PH2")
        mask = resize(torch.from_numpy(mask.astype(np.uint8))[None], self.size, "nearest")
        return {
            "image": resize(torch.from_numpy(image), self.size, "bilinear"),
            "mask": mask.float(),
            "label": torch.tensor(label, dtype=torch.int64),
            "case": str(image_path),
            "index": torch.tensor(index),
            "original_size": torch.tensor(image.shape[-2:]),
        }
