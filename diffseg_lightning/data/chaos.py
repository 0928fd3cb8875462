"""CHAOS abdominal MR organ segmentation in its official layout (Kavur et al., "CHAOS Challenge - combined
(CT-MR) healthy abdominal organ segmentation", Medical Image Analysis 2021)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import torch

from diffseg_lightning.data.base import CaseDataset, check_channels, check_same_size
from diffseg_lightning.data.splits import check_fractions, check_split, seeded_split
from diffseg_lightning.data.transforms import as_size, resize
from diffseg_lightning.io.images import read_grey
from diffseg_lightning.utils.errors import ConfigError, DiffSegError

# The sequence folders of one MR patient: (DICOM folder, ground-truth folder), relative to MR/<id>/.
SEQUENCES = {
    "T2SPIR": ("T2SPIR/DICOM_anon", "T2SPIR/Ground"),
    "T1DUAL_InPhase": ("T1DUAL/DICOM_anon/InPhase", "T1DUAL/Ground"),
    "T1DUAL_OutPhase": ("T1DUAL/DICOM_anon/OutPhase", "T1DUAL/Ground"),
}
# The grey-value ranges of the ground-truth PNGs, inclusive, from the CHAOS data description ("Liver: 63
# (55<<<70), Right kidney: 126 (110<<<135), Left kidney: 189 (175<<<200), Spleen: 252 (240<<<255)").
ORGANS = {"liver": (55, 70), "right_kidney": (110, 135), "left_kidney": (175, 200), "spleen": (240, 255)}
# Values read as background: 0, and the "Torsal: 32 (28<<<35)" range the same description lists.
BACKGROUND = ((0, 0), (28, 35))
TARGETS = {
    "liver": ("liver",),
    "right_kidney": ("right_kidney",),
    "left_kidney": ("left_kidney",),
    "kidneys": (("right_kidney", "left_kidney"),),
    "spleen": ("spleen",),
    "all": ("liver", "right_kidney", "left_kidney", "spleen"),
}
ALLOWED_VALUES = frozenset(v for low, high in (*ORGANS.values(), *BACKGROUND) for v in range(low, high + 1))


def read_dicom(path: Path) -> tuple[np.ndarray, tuple[float, float]]:
    """One DICOM slice as float32 (H, W) in the scanner's units (RescaleSlope / RescaleIntercept applied)
    and its pixel spacing (row, column) in mm.

    Raises:
        DiffSegError: naming the file when it is not readable DICOM, holds no 2D pixel data, or has no
            valid PixelSpacing.
    """
    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except Exception as err:  # pydicom raises many types for truncated / foreign files
        raise DiffSegError(f"{path}: not a readable DICOM slice ({type(err).__name__}: {err})") from None
    if pixels.ndim != 2:
        raise DiffSegError(f"{path}: expected one 2D slice, found pixel data of shape {pixels.shape}")
    slope, intercept = float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))
    spacing = ds.get("PixelSpacing")
    try:
        row, col = (float(v) for v in spacing)
    except (TypeError, ValueError):
        raise DiffSegError(f"{path}: no valid PixelSpacing (found {spacing!r})") from None
    if not (np.isfinite([row, col]).all() and min(row, col) > 0):
        raise DiffSegError(f"{path}: PixelSpacing {[row, col]} is not positive")
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept), (row, col)


def organ_planes(raw: np.ndarray, organs: Sequence[str | tuple[str, ...]]) -> np.ndarray:
    """Binary (C, H, W) float32 planes of ``raw`` grey values, one per entry (a tuple: a union of organs)."""
    planes = []
    for entry in organs:
        names = entry if isinstance(entry, tuple) else (entry,)
        plane = np.zeros(raw.shape, bool)
        for name in names:
            low, high = ORGANS[name]
            plane |= (raw >= low) & (raw <= high)
        planes.append(plane)
    return np.stack(planes).astype(np.float32)


class CHAOS(CaseDataset):
    """CHAOS MR (Kavur et al., MedIA 2021), read from the official training release as it is.

    Layout (``root`` may be the folder holding ``Train_Sets/``, e.g. ``CHAOS_Train_Sets``, or
    ``Train_Sets``, or ``Train_Sets/MR`` itself)::

        Train_Sets/MR/<id>/T2SPIR/DICOM_anon/IMG-<series>-<n>.dcm          one axial slice per file
        Train_Sets/MR/<id>/T2SPIR/Ground/IMG-<series>-<n>.png               grey-value organ labels
        Train_Sets/MR/<id>/T1DUAL/DICOM_anon/{InPhase,OutPhase}/*.dcm + T1DUAL/Ground/*.png

    20 MR patients (ids 1 .. 39, not contiguous), sorted numerically. Only the training sets carry labels.

    Slices: ordered by file name, and the i-th DICOM file is paired with the i-th ground-truth PNG (both
    sorted by name), as the official evaluation (``CHAOS-evaluation``) reads them: "the orientation of the
    slices is determined by order of image names NOT by position tags in DICOM files". Order pairing also
    serves T1DUAL, whose single Ground folder is named after the in-phase files but serves out-phase too. A
    DICOM / PNG count mismatch is a bad case naming the folder. A patient is one case: all its slices go to
    the same split.

    Labels: grey-value ranges, inclusive, from the CHAOS data description: liver 55-70 (63), right kidney
    110-135 (126), left kidney 175-200 (189), spleen 240-255 (252); background 0, and 28-35 (the "torso"
    value 32 the description also lists) read as background. Any other value is an error naming the PNG.

    Targets (``target``): ``liver``, ``right_kidney``, ``left_kidney``, ``kidneys`` (both, one channel),
    ``spleen`` (1 channel each), or ``all`` (4 channels [liver, right kidney, left kidney, spleen]; set
    ``data.mask_channels=4``).

    Intensities: MR has no fixed scale, so each volume (patient and sequence) is clipped to its own
    ``clip_percentiles`` (default 0.5 / 99.5, computed over all its slices once, then kept) and the
    DataModule z-scores each slice (``normalize: zscore``). Clipping per volume, not per slice, keeps the
    bright outliers (fat, vessels) of one slice from rescaling that slice differently from its neighbours.
    DICOM values are read with RescaleSlope / RescaleIntercept applied.

    Splits (no official labelled test set): :func:`~diffseg_lightning.data.splits.seeded_split` of the
    patients by ``fractions`` (default 0.7 / 0.1 / 0.2, i.e. 14 / 2 / 4 patients), or k-fold with
    ``folds``; by patient, never by slice.

    Items:
        ``image`` float32 (1, H, W), clipped, bilinear to ``size``; ``mask`` float32 (C, H, W) in {0, 1},
        nearest; ``case`` (str, the DICOM file path); ``index``; ``slice`` int64 (the slice's place in name
        order); ``original_size`` (2,); ``spacing`` float32 (2,) mm of the returned arrays (PixelSpacing
        scaled by stored / returned size); ``original_spacing`` (2,) PixelSpacing (row, column).

    Args:
        root: see Layout.
        split: ``train``, ``val`` or ``test``.
        size: resize target (H, W) or one int; None keeps the stored size (256 x 256 per the CHAOS data
            description).
        channels: expected image channels (1).
        sequence: ``T2SPIR`` (the papers' choice), ``T1DUAL_InPhase`` or ``T1DUAL_OutPhase``.
        target: see Targets.
        clip_percentiles: ``(low, high)`` percentiles of each volume to clip to; None keeps raw values.
        fractions: train / val / test shares of the patients.
        seed: seed of the split.
        on_bad_case: ``error`` or ``skip`` (a patient without the sequence's folders, or with a count
            mismatch, is raised naming the folder, or left out and listed in ``skipped``).
        folds: k for k-fold cross-validation over patients (``test`` = fold ``fold``).
        fold: the held-out fold.

    Raises:
        ValueError: for an unknown split, sequence or target, or bad percentiles.
        DiffSegError: naming the folder or file, for a missing root / MR folder, no patients, a bad patient
            (see ``on_bad_case``); when an item is read, for an unreadable DICOM or PNG, a size mismatch,
            or label values outside the ranges above.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        size: int | Sequence[int] | None = 128,
        channels: int | None = 1,
        sequence: str = "T2SPIR",
        target: str = "liver",
        clip_percentiles: Sequence[float] | None = (0.5, 99.5),
        fractions: Sequence[float] = (0.7, 0.1, 0.2),
        seed: int = 0,
        on_bad_case: str = "error",
        folds: int | None = None,
        fold: int = 0,
    ) -> None:
        super().__init__(on_bad_case)
        self.split = check_split(split, name="CHAOS")
        if sequence not in SEQUENCES:
            raise ConfigError(f"CHAOS: sequence must be one of {tuple(SEQUENCES)}, got {sequence!r}")
        if target not in TARGETS:
            raise ConfigError(f"CHAOS: target must be one of {tuple(TARGETS)}, got {target!r}")
        if clip_percentiles is not None:
            low, high = (float(p) for p in clip_percentiles)
            if not 0.0 <= low < high <= 100.0:
                raise ConfigError(
                    f"CHAOS: clip_percentiles must be (low, high) in [0, 100], got {clip_percentiles}"
                )
            clip_percentiles = (low, high)
        check_fractions(fractions)
        self.size = as_size(size)
        self.channels = channels
        self.sequence, self.target = sequence, target
        self.clip_percentiles = clip_percentiles
        self.fractions = tuple(float(f) for f in fractions)
        self.seed, self.folds, self.fold = seed, folds, fold
        self.mr_dir = self.find_mr(Path(root).expanduser())
        patients = sorted(
            (p for p in self.mr_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
        )
        if not patients:
            raise DiffSegError(f"{self.mr_dir}: no patient folders (MR/<id>/ with numeric ids)")
        chosen = [patients[i] for i in seeded_split(len(patients), self.fractions, seed, split, folds, fold)]
        self.patients: list[tuple[str, list[tuple[Path, Path]]]] = []
        self.items: list[tuple[int, int]] = []  # (patient number, slice)
        for patient in chosen:
            pairs = self.scan_patient(patient)
            if pairs is None:
                continue
            self.items.extend((len(self.patients), k) for k in range(len(pairs)))
            self.patients.append((patient.name, pairs))
        self._clip: dict[int, tuple[float, float]] = {}  # per-volume percentiles, computed once each

    @staticmethod
    def find_mr(root: Path) -> Path:
        """The ``MR`` folder holding one folder per patient."""
        if not root.is_dir():
            raise DiffSegError(f"data root {root} does not exist or is not a folder")
        candidates = [root / "Train_Sets" / "MR", root / "MR"]
        candidates += [p / "Train_Sets" / "MR" for p in sorted(root.iterdir()) if p.is_dir()]
        for candidate in candidates:
            if candidate.is_dir():
                return candidate
        if root.name == "MR" or any(
            p.is_dir() and p.name.isdigit() and any(q.name in ("T2SPIR", "T1DUAL") for q in p.iterdir())
            for p in root.iterdir()
        ):
            return root
        raise DiffSegError(
            f"data root {root}: expected {root / 'Train_Sets' / 'MR'}/<id>/T2SPIR/{{DICOM_anon,Ground}} "
            "(the CHAOS training release; data.root may also be Train_Sets or Train_Sets/MR)"
        )

    def scan_patient(self, patient: Path) -> list[tuple[Path, Path]] | None:
        """The (DICOM, PNG) pairs of one patient's sequence, or None when it is a bad case (skipped)."""
        dicom_rel, ground_rel = SEQUENCES[self.sequence]
        dicom_dir, ground_dir = patient / dicom_rel, patient / ground_rel
        for folder in (dicom_dir, ground_dir):
            if not folder.is_dir():
                self.bad_case(
                    folder, f"missing (patient {patient.name} has no {self.sequence} {folder.name} folder)"
                )
                return None
        dicoms = sorted(p for p in dicom_dir.iterdir() if p.is_file() and p.suffix.lower() == ".dcm")
        pngs = sorted(p for p in ground_dir.iterdir() if p.is_file() and p.suffix.lower() == ".png")
        if not dicoms:
            self.bad_case(dicom_dir, "no .dcm slices")
            return None
        if len(dicoms) != len(pngs):
            self.bad_case(
                ground_dir,
                f"{len(pngs)} ground-truth PNG(s) for {len(dicoms)} DICOM slice(s) in {dicom_dir} "
                "(slices are paired with PNGs in name order, so the counts must match)",
            )
            return None
        return list(zip(dicoms, pngs, strict=True))

    # ------------------------------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return (
            f"CHAOS(root={str(self.mr_dir)!r}, split={self.split!r}, patients={len(self.patients)}, "
            f"slices={len(self)}, sequence={self.sequence!r}, target={self.target!r}, size={self.size}, "
            f"fractions={self.fractions}, seed={self.seed}, folds={self.folds}, fold={self.fold})"
        )

    @property
    def patient_ids(self) -> list[str]:
        """The patient ids (folder names) of this split."""
        return [name for name, _ in self.patients]

    def clip_range(self, number: int) -> tuple[float, float]:
        """The ``clip_percentiles`` of patient ``number``'s whole volume (read once, then kept)."""
        if number not in self._clip:
            _, pairs = self.patients[number]
            values = np.concatenate([read_dicom(dicom)[0].ravel() for dicom, _ in pairs])
            if not np.isfinite(values).all():
                raise DiffSegError(f"{pairs[0][0].parent}: the volume holds NaN or infinite values")
            low, high = np.percentile(values, self.clip_percentiles)
            self._clip[number] = (float(low), float(high))
        return self._clip[number]

    def __getitem__(self, index: int) -> dict:
        number, slice_index = self.items[index]
        dicom_path, png_path = self.patients[number][1][slice_index]
        image, spacing = read_dicom(dicom_path)
        if not np.isfinite(image).all():
            raise DiffSegError(f"{dicom_path}: slice holds NaN or infinite values")
        raw = self.note_labels(read_grey(png_path))
        unexpected = sorted(set(np.unique(raw).tolist()) - ALLOWED_VALUES)
        if unexpected:
            raise DiffSegError(
                f"{png_path}: unexpected label value(s) {', '.join(map(str, unexpected[:8]))}; expected 0 or "
                "the CHAOS ranges liver 55-70, right kidney 110-135, left kidney 175-200, spleen 240-255 "
                "(28-35: background)"
            )
        check_same_size(png_path, raw.shape, dicom_path, image.shape)
        if self.clip_percentiles is not None:
            image = np.clip(image, *self.clip_range(number))
        image = check_channels(image[None], self.channels, dicom_path)
        mask = torch.from_numpy(organ_planes(raw, TARGETS[self.target]))
        out_image = resize(torch.from_numpy(np.ascontiguousarray(image)), self.size, "bilinear")
        original_size = torch.tensor(image.shape[-2:], dtype=torch.int64)
        original_spacing = torch.tensor(spacing, dtype=torch.float32)
        scale = original_size.float() / torch.tensor(out_image.shape[-2:], dtype=torch.float32)
        return {
            "image": out_image,
            "mask": resize(mask, self.size, "nearest"),
            "case": str(dicom_path),
            "index": torch.tensor(index),
            "slice": torch.tensor(slice_index, dtype=torch.int64),
            "original_size": original_size,
            "spacing": original_spacing * scale,
            "original_spacing": original_spacing,
        }


__all__ = ["CHAOS", "ORGANS", "SEQUENCES", "TARGETS", "read_dicom"]
