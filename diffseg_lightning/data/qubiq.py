"""QUBIQ: Quantification of Uncertainties in Biomedical Image Quantification (MICCAI 2020 / 2021 challenge).

Several raters segmented every image, so QUBIQ is a multi-annotator benchmark (GED, HM-IoU, soft Dice
against the raters' mean). Dataset: https://qubiq.grand-challenge.org (Menze, Joskowicz, Bakas,
Jakab, Konukoglu, Becker et al., "Quantification of Uncertainties in Biomedical Image Quantification
Challenge", MICCAI 2020 and 2021). Research use only.

Official on-disk layout, read as it is::

    <root>/<task>/Training/caseNN/image.nii.gz
    <root>/<task>/Training/caseNN/task01_seg01.nii.gz ... task01_segKK.nii.gz   (one file per rater)
    <root>/<task>/Validation/caseNN/...                                           (same layout)

Tasks: kidney (CT, 1 sub-task, 3 raters), brain-growth (MR), prostate (MR, 2 sub-tasks), brain-tumor
(multi-channel MR, 3 sub-tasks), pancreas and pancreatic-lesion (CT, QUBIQ 2021). The number of
sub-tasks (``task01``, ``task02``, ...) and of raters (``seg01``, ``seg02``, ...) is read from the file
names, never assumed.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from diffseg_lightning.data.base import CaseDataset, check_channels
from diffseg_lightning.data.splits import (
    check_fractions,
    check_split,
    pool_split,
    seeded_split,
    train_val_split,
)
from diffseg_lightning.data.transforms import as_size, resize
from diffseg_lightning.io.images import channels_first
from diffseg_lightning.io.volumes import check_same_grid, load_nifti, read_nifti_array
from diffseg_lightning.utils.errors import ConfigError, DiffSegError

TASKS = ("kidney", "brain-growth", "prostate", "brain-tumor", "pancreas", "pancreatic-lesion")
CT_TASKS = ("kidney", "pancreas", "pancreatic-lesion")
# Soft-tissue window in HU for the CT tasks. On the 20 kidney training cases, the 0.5 / 99.5
# percentiles of the HU values inside the raters' majority mask are -93 / 220 (measured); the window
# keeps them with room for perirenal fat (about -100 HU) and contrast-enhanced cortex, and removes air
# (-1024) and bone (> 300), which would otherwise dominate the per-image z-score.
CT_WINDOW = (-200.0, 300.0)
SPLITS = ("train", "val", "test")
IMAGE_NAMES = ("image.nii.gz", "image.nii")
RATER_FILE = re.compile(r"^(task\d+)_seg(\d+)\.nii(\.gz)?$")
OFFICIAL_FOLDERS = ("Training", "Validation")


def _names(keys: frozenset) -> str:
    """``task01_seg01.nii.gz, task01_seg02.nii.gz`` for a set of (subtask, rater) keys."""
    return ", ".join(f"{s}_seg{r:02d}.nii.gz" for s, r in sorted(keys))


def _subtask_name(subtask: int | str | None, found: Sequence[str], where: Path) -> str:
    if subtask is None:
        return found[0]
    name = f"task{int(subtask):02d}" if isinstance(subtask, int) or str(subtask).isdigit() else str(subtask)
    if name not in found:
        raise DiffSegError(f"{where}: no sub-task {name!r}; the cases hold {', '.join(found)}")
    return name


class QUBIQ(CaseDataset):
    """One QUBIQ task in its official layout: each item is an image, the raters' masks and their majority.

    Dataset: QUBIQ challenge (MICCAI 2020 / 2021), https://qubiq.grand-challenge.org.

    ``root`` is either the QUBIQ root (holding one folder per task; ``task`` picks it) or a task folder
    itself (holding ``Training`` and / or ``Validation``; its name is the task unless ``task`` is given).

    Raters: the files ``<subtask>_segKK.nii.gz`` of every case. ``subtask`` picks one sub-task (default the
    first, ``task01``). Every case must hold the same sub-tasks and, for each, the same raters; the rater
    set is the one most cases have, and a case that differs is an error naming the case and the files it
    lacks (or has in excess). Rater masks must hold only 0 and 1. (The challenge page says one prostate
    case has 5 of the 6 raters: that case is reported, not silently padded or dropped.)

    Bad cases: a case folder without ``image.nii.gz`` or without rater files, with two files for one
    rater, with a rater set unlike the other cases', or whose headers do not fit (a rater shape unlike the
    image's, a rater on another voxel grid: orientation, spacing or affine, see
    :func:`~diffseg_lightning.io.volumes.check_same_grid`; an unreadable header, a wrong channel count) is an
    error naming it. The folder checks cover
    every case of ``Training`` and ``Validation`` whatever the split, so they fail before training. Under
    ``on_bad_case="skip"`` such a case is left out of its split instead and listed in ``skipped`` (by the
    dataset of that split only), and the other cases keep their split. ``seen_labels`` collects the stored
    rater mask values read (0 and 1).

    Splits (deterministic):
        - With a ``Validation`` folder: ``test`` is every ``Validation`` case (the labelled held-out set
          that QUBIQ papers report on; the challenge's test labels were not released), and ``train`` /
          ``val`` split the ``Training`` cases by ``fractions[0] : fractions[1]`` (renormalised; see
          :func:`~diffseg_lightning.data.splits.pool_split`). With ``folds`` = k, ``val`` is fold ``fold``
          of a seeded k-fold of the ``Training`` cases and ``train`` the other folds
          (:func:`~diffseg_lightning.data.splits.train_val_split`).
        - With ``Training`` only: ``train`` / ``val`` / ``test`` split its cases by ``fractions``
          (default 0.7 / 0.1 / 0.2, so 14 / 2 / 4 of the 20 kidney cases). With ``folds`` = k, ``test``
          is fold ``fold`` of a seeded k-fold and the other folds are split into train / val by
          ``fractions[0] : fractions[1]`` (:func:`~diffseg_lightning.data.splits.seeded_split`).
        - Either way the split is seeded by ``seed`` over the case folders sorted by name, by case (never
          by slice), and depends only on the case folders found (bad cases included).

    Array layout: the NIfTI array as stored, axis 0 = H (rows), axis 1 = W; no reorientation, the same
    for the image and the masks, so they stay aligned. A 2D image is (H, W) or (H, W, C) (C channels,
    e.g. the MR modalities of brain-tumor); a 3D volume (H, W, D[, C]) with (H, W, D) rater masks gives
    one item per axial slice (the last spatial axis).

    Intensities: clipped to ``window``. ``"auto"`` clips the CT tasks (kidney, pancreas,
    pancreatic-lesion, in HU) to ``CT_WINDOW`` = [-200, 300] HU and leaves the MR tasks as they are; a
    pair ``[low, high]`` clips to it; ``None`` never clips. The DataModule then z-scores each image.

    Items:
        ``image`` (C, H, W) float32, clipped, resized to ``size`` (bilinear);
        ``mask`` (1, H, W) float32: the raters' majority, pixels marked by more than half of the raters
        (a tie with an even rater count is background), computed at native resolution, then nearest;
        ``masks`` (A, H, W) float32 in {0, 1}: every rater, nearest;
        ``spacing`` (2,) float32: the pixel spacing of the returned arrays (the header's pixdim of the
        image's first two axes, scaled by native size / returned size); ``original_spacing`` (2,) the
        header's; ``original_size`` (2,); ``case`` (str, the image file path); ``index``; ``slice``
        (the axial slice, -1 for a 2D image).

    Args:
        root: the QUBIQ root or one task folder.
        split: ``train``, ``val`` or ``test``.
        task: the task folder under ``root`` (one of ``TASKS``; any other existing folder name works too);
            None when ``root`` is the task folder.
        subtask: ``task01``, ``task02``, ... (or 1, 2, ...); None picks the first.
        size: resize target (H, W) or one int; None keeps the native size.
        channels: image channels the model expects; an image with another count is an error naming it.
        window: ``"auto"``, ``[low, high]`` or None (see above).
        fractions: train / val / test shares of the cases (see Splits).
        seed: seed of the split.
        on_bad_case: ``error`` or ``skip`` (see Bad cases).
        folds: k for k-fold cross-validation (see Splits; None: the fraction split).
        fold: the held-out fold, 0 .. k - 1.

    Raises:
        ValueError: for an unknown split or window, or fractions that are not three shares summing to 1.
        DiffSegError: naming the file or case, for a missing root / task / image / rater file, an
            inconsistent rater or sub-task set, an unreadable file, a rater mask whose shape differs from
            the image, label values other than 0 and 1, a wrong channel count, NaN or infinite pixels
            (``skip`` leaves out the cases whose problem shows while scanning: see Bad cases).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        task: str | None = None,
        subtask: int | str | None = None,
        size: int | Sequence[int] | None = 128,
        channels: int | None = 1,
        window: str | Sequence[float] | None = "auto",
        fractions: Sequence[float] = (0.7, 0.1, 0.2),
        seed: int = 0,
        on_bad_case: str = "error",
        folds: int | None = None,
        fold: int = 0,
    ) -> None:
        super().__init__(on_bad_case)
        self.split = check_split(split)
        self.fractions = check_fractions(fractions)
        self.root = Path(root)
        self.task_dir, self.task = self.find_task(self.root, task)
        self.window = self.resolve_window(window, self.task)
        self.size = as_size(size)
        self.channels = channels
        self.seed = seed
        self.folds, self.fold = folds, fold

        folders = {name: self.task_dir / name for name in OFFICIAL_FOLDERS if (self.task_dir / name).is_dir()}
        if not folders:
            raise DiffSegError(
                f"{self.task_dir}: no Training or Validation folder (the QUBIQ layout is <task>/Training/caseNN/)"
            )
        if "Training" not in folders and split != "test":
            raise DiffSegError(
                f"{self.task_dir}: no Training folder (the QUBIQ layout is <task>/Training/caseNN/)"
            )
        # every case folder of both folders, each with its files and its problem ("" when usable)
        cases = {name: self.scan(folder) for name, folder in folders.items()}
        all_cases = [case for name in folders for case in cases[name]]
        if not all_cases:
            raise DiffSegError(f"{self.task_dir}: no case folders in {' or '.join(folders)}")
        for case_dir, _, problem in all_cases:  # under "error", the first problem in folder order
            if problem and self.on_bad_case == "error":
                self.bad_case(case_dir, problem)
        usable = [case for case in all_cases if not case[2]]
        if not usable:
            reasons = "; ".join(f"{case_dir.name}: {problem}" for case_dir, _, problem in all_cases)
            raise DiffSegError(f"{self.task_dir}: no usable case ({reasons})")
        self.subtasks, rater_ids, odd = self.check_consistency(usable)
        for case_dir, reason in odd.items():  # raises under "error"; recorded below for this split
            if self.on_bad_case == "error":
                self.bad_case(case_dir, reason)
        self.subtask = _subtask_name(subtask, self.subtasks, self.task_dir)
        self.raters = rater_ids[self.subtask]

        if "Validation" in folders and split == "test":
            chosen = cases["Validation"]
        elif "Validation" in folders:
            training = cases["Training"]
            train_share, val_share = self.fractions[:2]
            if train_share + val_share <= 0:
                raise ConfigError(f"fractions {list(fractions)} leave no Training case for train or val")
            if folds is None:
                numbers = pool_split(list(range(len(training))), train_share, val_share, seed, split)
            else:
                numbers = train_val_split(len(training), split, val_share, seed, folds, fold)
            chosen = [training[i] for i in numbers]
        else:
            training = cases.get("Training", [])
            chosen = [
                training[i] for i in seeded_split(len(training), self.fractions, seed, split, folds, fold)
            ]

        self.cases: list[tuple[Path, list[Path]]] = []
        self.items: list[tuple[int, int]] = []  # (case number, slice; -1 for a 2D image)
        self.spacings: list[tuple[float, float]] = []  # header pixdim of the first two axes, per case
        for case_dir, files, problem in chosen:
            if problem or case_dir in odd:
                self.bad_case(case_dir, problem or odd[case_dir])
                continue
            image_path = files["image"]
            rater_paths = [files[(self.subtask, k)] for k in self.raters]
            try:
                slices, spacing = self.inspect(image_path, rater_paths)
            except DiffSegError as err:  # the message names the file; "skip" records it for the case
                if self.on_bad_case == "error":
                    raise
                self.bad_case(case_dir, str(err))
                continue
            self.items.extend((len(self.cases), k) for k in (range(slices) if slices else [-1]))
            self.cases.append((image_path, rater_paths))
            self.spacings.append(spacing)
        self._cached: tuple | None = (
            None  # the last case read: (number, image, masks) or (number, error, None)
        )

    @staticmethod
    def find_task(root: Path, task: str | None) -> tuple[Path, str]:
        """The task folder and the task name, from ``root`` and ``task`` (see the class docstring)."""
        if not root.is_dir():
            raise DiffSegError(f"data root {root} does not exist or is not a folder")
        if any((root / name).is_dir() for name in OFFICIAL_FOLDERS):
            if task is not None and root.name in TASKS and task != root.name:
                raise DiffSegError(f"{root} is the QUBIQ task folder {root.name!r} but data.task={task!r}")
            return root, task or root.name
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        if task is None:
            raise DiffSegError(
                f"{root} is not a QUBIQ task folder (no Training or Validation folder); pick a task with "
                f"data.task (one of {', '.join(found) or 'none: the folder is empty'}) or point data.root at it"
            )
        if not (root / task).is_dir():
            raise DiffSegError(
                f"{root / task}: no such QUBIQ task folder; {root} holds {', '.join(found) or 'nothing'}"
            )
        return root / task, task

    @staticmethod
    def resolve_window(window: str | Sequence[float] | None, task: str) -> tuple[float, float] | None:
        if window is None:
            return None
        if isinstance(window, str):
            if window != "auto":
                raise ConfigError(f"window must be 'auto', [low, high] or null, got {window!r}")
            return CT_WINDOW if task in CT_TASKS else None
        low, high = (float(v) for v in window)
        if not low < high:
            raise ConfigError(f"window must be [low, high] with low < high, got {list(window)}")
        return low, high

    @staticmethod
    def scan(folder: Path) -> list[tuple[Path, dict, str]]:
        """The case folders of ``Training`` or ``Validation``, sorted, each with ``{"image": path,
        (subtask, rater): path}`` and why it cannot be used ("" when it can: it has an image, at least one
        rater file and one file per rater)."""
        out = []
        for case_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            files: dict = {}
            problem = ""
            for path in sorted(case_dir.iterdir()):
                match = RATER_FILE.match(path.name)
                if match:
                    key = (match.group(1), int(match.group(2)))
                    if key in files and not problem:
                        problem = f"both {files[key].name} and {path.name} for one rater"
                    files[key] = path
                elif path.name in IMAGE_NAMES:
                    files["image"] = path
            if "image" not in files:
                problem = (
                    "no image.nii.gz (a QUBIQ case folder holds image.nii.gz and one taskNN_segKK.nii.gz per "
                    "rater)"
                )
            elif len(files) == 1:
                problem = "no rater masks (taskNN_segKK.nii.gz) beside image.nii.gz"
            out.append((case_dir, files, problem))
        return out

    @staticmethod
    def check_consistency(
        cases: list[tuple[Path, dict, str]],
    ) -> tuple[list[str], dict[str, list[int]], dict[Path, str]]:
        """The sub-tasks and each one's raters, and the cases whose rater files differ from them.

        The reference is the rater-file set most cases have (the first such set on a tie); each case that
        differs is returned (in case order) with the files it lacks and those it has in excess.
        """
        sets = [frozenset(k for k in files if k != "image") for _, files, _ in cases]
        reference, _ = Counter(sets).most_common(1)[0]
        odd = {}
        for (case_dir, _, _), keys in zip(cases, sets, strict=True):
            if keys != reference:
                missing, extra = reference - keys, keys - reference
                what = "; ".join(
                    [f"missing {_names(missing)}"] * bool(missing)
                    + [f"unexpected {_names(extra)}"] * bool(extra)
                )
                odd[case_dir] = (
                    f"{what} (the other cases have {len(reference)} rater file(s): {_names(reference)}); "
                    "every case needs the same sub-tasks and raters"
                )
        subtasks = sorted({s for s, _ in reference})
        return subtasks, {s: sorted(r for t, r in reference if t == s) for s in subtasks}, odd

    def inspect(self, image_path: Path, rater_paths: list[Path]) -> tuple[int, tuple[float, float]]:
        """(slices, spacing) from the headers (0 slices: a 2D image); checks that the raters' shapes match
        the image's, that the image and every rater lie on one voxel grid (orientation, spacing, affine:
        :func:`~diffseg_lightning.io.volumes.check_same_grid`) and the image's channel count."""
        header = load_nifti(image_path)
        shape = tuple(int(n) for n in header.shape)
        zooms = header.header.get_zooms()
        raters = [load_nifti(path) for path in rater_paths]
        for path, rater in zip(rater_paths, raters, strict=True):
            rater_shape = tuple(int(n) for n in rater.shape)
            if (
                len(rater_shape) not in (2, 3)
                or shape[: len(rater_shape)] != rater_shape
                or len(shape) - len(rater_shape) > 1
            ):
                raise DiffSegError(
                    f"{path}: rater mask of shape {rater_shape} does not match the image {image_path.name} of "
                    f"shape {shape} (expected the image's (H, W) for a 2D case, (H, W, D) for a volume)"
                )
        spatial = len(raters[0].shape)
        check_same_grid([image_path, *rater_paths], [header, *raters], spatial)
        channels = shape[spatial] if len(shape) > spatial else 1
        if self.channels is not None and channels != self.channels:
            raise DiffSegError(
                f"{image_path}: image has {channels} channel(s) but the config expects {self.channels}"
            )
        spacing = (float(zooms[0]), float(zooms[1]))
        if not all(np.isfinite(spacing)) or min(spacing) <= 0:
            raise DiffSegError(f"{image_path}: header pixel spacing (pixdim) {spacing} is not positive")
        return (shape[2] if spatial == 3 else 0), spacing

    def read_case(self, number: int) -> tuple[np.ndarray, np.ndarray]:
        """Image (H, W[, D][, C]) and raters (A, H, W[, D]) of a case, float32, checked; the last is cached."""
        if self._cached is not None and self._cached[0] == number:
            if isinstance(self._cached[1], DiffSegError):  # a bad case is decoded once, not once per slice
                raise DiffSegError(str(self._cached[1]))
            return self._cached[1], self._cached[2]
        try:
            image, masks = self._read_case(number)
        except DiffSegError as err:
            self._cached = (number, err, None)
            raise
        self._cached = (number, image, masks)
        return image, masks

    def _read_case(self, number: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, rater_paths = self.cases[number]
        image = read_nifti_array(image_path)
        if not np.isfinite(image).all():
            raise DiffSegError(f"{image_path}: image holds NaN or infinite values")
        raters = []
        for path in rater_paths:
            rater = self.note_labels(read_nifti_array(path))
            if rater.shape != image.shape[: rater.ndim]:
                raise DiffSegError(
                    f"{path}: rater mask of shape {rater.shape} does not match the image {image.shape}"
                )
            bad = ~((rater == 0) | (rater == 1))
            if bad.any():
                values = np.unique(rater[bad])[:5].tolist()
                raise DiffSegError(f"{path}: rater mask values must be 0 or 1, found {values}")
            raters.append(rater)
        return image, np.stack(raters)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        number, slice_index = self.items[index]
        image_path, _ = self.cases[number]
        image, masks = self.read_case(number)
        if slice_index >= 0:
            image, masks = image[:, :, slice_index], masks[:, :, :, slice_index]
        image = check_channels(channels_first(image), self.channels, image_path)
        if self.window is not None:
            image = np.clip(image, *self.window)
        image_t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        masks_t = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32))
        majority = (masks_t.mean(0, keepdim=True) > 0.5).float()
        original_size = torch.tensor(image_t.shape[-2:])
        out_image = resize(image_t, self.size, "bilinear")
        original_spacing = torch.tensor(self.spacings[number], dtype=torch.float32)
        scale = original_size.float() / torch.tensor(out_image.shape[-2:], dtype=torch.float32)
        return {
            "image": out_image,
            "mask": resize(majority, self.size, "nearest"),
            "masks": resize(masks_t, self.size, "nearest"),
            "spacing": original_spacing * scale,
            "original_spacing": original_spacing,
            "original_size": original_size,
            "case": str(image_path),
            "index": torch.tensor(index),
            "slice": torch.tensor(slice_index),
        }


__all__ = ["CT_TASKS", "CT_WINDOW", "QUBIQ", "TASKS"]
