"""GlaS / Warwick-QU gland segmentation in its official layout (Sirinukunwattana et al., "Gland segmentation in
colon histology images: The GlaS challenge contest", Medical Image Analysis 2017)."""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from diffseg_lightning.data.base import CaseDataset, check_channels, check_same_size, locate_root
from diffseg_lightning.data.splits import check_split, train_val_split
from diffseg_lightning.data.transforms import as_size, resize
from diffseg_lightning.io.images import read_image, read_label_map
from diffseg_lightning.utils.errors import ConfigError, DiffSegError

GLAS_SPLITS = ("train", "val", "test", "testA", "testB")
GRADES = {"benign": 0, "malignant": 1}
_IMAGE_NAME = re.compile(r"^(train|testA|testB)_(\d+)\.bmp$")


class GlaSGrade(NamedTuple):
    """One row of ``Grade.csv``: the patient, the GlaS grade and the finer grade of Sirinukunwattana et al. 2015."""

    patient: int
    grade: str  # "benign" or "malignant"
    subtype: str  # e.g. "healthy", "adenomatous", "moderately differentiated"


def read_grades(path: Path) -> dict[str, GlaSGrade]:
    """Parse ``Grade.csv``: ``name, patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)``.

    The release writes it with CR-only line endings (old Mac style), so lines are split with
    ``str.splitlines()`` (CR, LF and CRLF alike) before the CSV parser sees them; cells are stripped (the
    release puts a space after each comma).

    Raises:
        DiffSegError: naming the file (and line) when it is missing, lacks a GlaS grade column, or holds a grade
            other than benign / malignant.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DiffSegError(f"{path}: not found (GlaS's image-level grades, Grade.csv)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DiffSegError(f"{path}: not readable ({err})") from None
    rows = [
        [cell.strip() for cell in row]
        for row in csv.reader(line for line in text.splitlines() if line.strip())
    ]
    if not rows:
        raise DiffSegError(f"{path}: empty")
    header = [cell.lower() for cell in rows[0]]
    try:
        name_col = header.index("name")
        grade_col = next(i for i, cell in enumerate(header) if cell.startswith("grade") and "glas" in cell)
    except (ValueError, StopIteration):
        raise DiffSegError(
            f"{path}: expected a header with 'name' and 'grade (GlaS)' columns, got {rows[0]}"
        ) from None
    patient_col = next((i for i, cell in enumerate(header) if "patient" in cell), None)
    subtype_col = next((i for i, cell in enumerate(header) if "sirinukunwattana" in cell), None)
    grades = {}
    for line, row in enumerate(rows[1:], start=2):
        grade = row[grade_col].lower() if grade_col < len(row) else ""
        if grade not in GRADES:
            raise DiffSegError(f"{path}, line {line}: grade {grade!r} is not one of {tuple(GRADES)}")
        patient = row[patient_col] if patient_col is not None and patient_col < len(row) else ""
        grades[row[name_col]] = GlaSGrade(
            patient=int(patient) if patient.isdigit() else -1,
            grade=grade,
            subtype=row[subtype_col] if subtype_col is not None and subtype_col < len(row) else "",
        )
    return grades


class GlaS(CaseDataset):
    """GlaS colon histology glands (Sirinukunwattana et al., MedIA 2017), read from the official release as it is.

    Layout: one flat folder ``<root>/Warwick_QU_Dataset/`` (``root`` may also be that folder itself) with
    ``<split>_<n>.bmp`` (RGB) and ``<split>_<n>_anno.bmp``, ``<split>`` one of ``train``, ``testA``,
    ``testB`` (85 / 60 / 20 images in the release), and ``Grade.csv`` (CR-only line endings, see
    :func:`read_grades`). Annotations are instance label maps: 0 background, one id per gland. Ids are kept
    as stored, gaps included (not relabelled to 1..N).

    Splits (``split``):
        ``train``: the ``train_*`` images minus the validation ones; ``val``: a seeded ``val_fraction`` of
        the ``train_*`` images (default 0.2; numeric-sorted names shuffled with
        ``numpy.random.default_rng(seed)``, see :func:`~diffseg_lightning.data.splits.train_val_split`),
        drawn per image, not per patient; ``testA`` and ``testB``: the challenge's two test sets;
        ``test``: testA followed by testB. Images are in numeric order of ``<n>`` within each set.
        With ``folds`` = k, ``val`` is fold ``fold`` of a seeded k-fold of the ``train_*`` images and
        ``train`` the other folds (``val_fraction`` is then unused); the test sets stay the official ones.
        The split depends only on the ``train_*`` image files found (annotated or not).

    Bad cases: an image of the split without its ``_anno.bmp`` or its grade in ``Grade.csv`` is an error
    naming it; under ``on_bad_case="skip"`` it is left out and listed in ``skipped``. ``seen_labels``
    collects the stored instance ids read (at most 64 distinct values are recorded).

    Items (the :class:`~diffseg_lightning.data.SegmentationDataModule` contract, plus extras):
        ``image`` float32 (C, H, W), 0..255, bilinear to ``size``; ``instances`` int64 (H, W), resized with
        nearest so ids stay intact (a gland smaller than a pixel of the target grid can vanish);
        ``mask`` float32 (1, H, W) = ``instances > 0``; ``label`` int64, the image-level GlaS grade
        (0 benign, 1 malignant); ``case`` (str, the image path); ``index`` int64; ``original_size`` int64
        (2,). ``grades`` maps each name (``train_1``) to its :class:`GlaSGrade` (patient, grade, subtype).

    Args:
        root: folder holding ``Warwick_QU_Dataset/``, or that folder itself.
        split: ``train``, ``val``, ``test``, ``testA`` or ``testB``.
        size: resize target (H, W) or one int; None keeps each image's size (two sizes in the release).
        channels: expected image channels (3); another count is an error naming the file. None accepts any.
        val_fraction: share of the ``train_*`` images held out as ``val``.
        seed: shuffle seed of the train / val split.
        on_bad_case: ``error`` or ``skip`` (see Bad cases).
        folds: k for k-fold cross-validation on the ``train_*`` images (None: ``val_fraction``).
        fold: the validation fold, 0 .. k - 1.

    Raises:
        DiffSegError: when the folder or ``Grade.csv`` is missing, an image has no ``_anno.bmp`` or no
            grade (``skip`` leaves it out instead), or a split holds no image. Unreadable files, a wrong channel count and an annotation whose
            size differs from its image's raise when the item is read, naming the file.
    """

    FOLDER = "Warwick_QU_Dataset"
    GRADE_FILE = "Grade.csv"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        size: int | Sequence[int] | None = 128,
        channels: int | None = 3,
        val_fraction: float = 0.2,
        seed: int = 0,
        on_bad_case: str = "error",
        folds: int | None = None,
        fold: int = 0,
    ) -> None:
        super().__init__(on_bad_case)
        self.split = check_split(split, GLAS_SPLITS, "GlaS")
        if not 0.0 <= val_fraction <= 1.0:
            raise ConfigError(f"GlaS: val_fraction must lie in [0, 1], got {val_fraction}")
        self.root = locate_root(root, self.FOLDER, self.GRADE_FILE)
        self.grades = read_grades(self.root / self.GRADE_FILE)
        by_set: dict[str, list[tuple[int, Path]]] = {"train": [], "testA": [], "testB": []}
        for path in self.root.iterdir():
            match = _IMAGE_NAME.match(path.name)
            if match and path.is_file():
                by_set[match.group(1)].append((int(match.group(2)), path))
        sets = {name: [p for _, p in sorted(files)] for name, files in by_set.items()}
        if split in ("train", "val"):
            chosen = train_val_split(len(sets["train"]), split, val_fraction, seed, folds, fold)
            images = [sets["train"][i] for i in chosen]
        elif split == "test":
            images = sets["testA"] + sets["testB"]
        else:
            images = sets[split]
        if not images and not (split == "val" and val_fraction == 0):
            source = "train" if split in ("train", "val") else split
            raise DiffSegError(f"{self.root}: no {source}_<n>.bmp images for the {split} split")
        self.cases: list[tuple[Path, Path, int]] = []
        for image in images:
            anno = image.with_name(f"{image.stem}_anno.bmp")
            if not anno.is_file():
                self.bad_case(image, f"no annotation; expected {anno}")
                continue
            if image.stem not in self.grades:
                self.bad_case(image, f"no grade for {image.stem} in {self.root / self.GRADE_FILE}")
                continue
            self.cases.append((image, anno, GRADES[self.grades[image.stem].grade]))
        self.size = as_size(size)
        self.channels = channels
        self.val_fraction = float(val_fraction)
        self.seed = seed
        self.folds, self.fold = folds, fold

    @property
    def names(self) -> list[str]:
        """The case names of this split, e.g. ``["train_1", ...]``."""
        return [image.stem for image, _, _ in self.cases]

    def __len__(self) -> int:
        return len(self.cases)

    def __repr__(self) -> str:
        return (
            f"GlaS(root={str(self.root)!r}, split={self.split!r}, cases={len(self)}, size={self.size}, "
            f"val_fraction={self.val_fraction}, seed={self.seed}, folds={self.folds}, fold={self.fold})"
        )

    def __getitem__(self, index: int) -> dict:
        image_path, anno_path, label = self.cases[index]
        image = check_channels(read_image(image_path), self.channels, image_path)
        labels = self.note_labels(read_label_map(anno_path))
        check_same_size(anno_path, labels.shape, image_path, image.shape)
        # float64 keeps every integer id exact through the nearest-neighbour resize
        instances = resize(torch.from_numpy(labels.astype(np.float64))[None], self.size, "nearest")[0].long()
        return {
            "image": resize(torch.from_numpy(image), self.size, "bilinear"),
            "mask": (instances > 0).float()[None],
            "instances": instances,
            "label": torch.tensor(label, dtype=torch.int64),
            "case": str(image_path),
            "index": torch.tensor(index),
            "original_size": torch.tensor(image.shape[-2:]),
        }
