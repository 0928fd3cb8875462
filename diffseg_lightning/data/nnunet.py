"""Any dataset in nnU-Net's raw format, v1 or v2 (Isensee et al., "nnU-Net: a self-configuring method for deep
learning-based biomedical image segmentation", Nature Methods 2021)."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffseg_lightning.data.base import CaseDataset, check_same_size, split_message
from diffseg_lightning.data.splits import (
    check_fractions,
    check_split,
    pool_split,
    seeded_split,
    train_val_split,
)
from diffseg_lightning.data.transforms import as_size, resize
from diffseg_lightning.io.files import NIFTI_SUFFIXES
from diffseg_lightning.io.images import read_image, read_label_map
from diffseg_lightning.io.volumes import check_same_grid, load_nifti, read_nifti_array
from diffseg_lightning.utils.errors import ConfigError, DiffSegError

NNUNET_SPLITS = ("train", "val", "test", "predict")
IMAGE_ENDINGS = (".png", ".bmp", ".tif", ".tiff")  # nnU-Net v2's NaturalImage2DIO
EMPTY_SLICES = ("keep", "drop")
SPECIAL_TARGETS = ("foreground", "classes")
SPLITS_FILE = "splits_final.json"


@dataclass
class DatasetJson:
    """What the loader needs from a ``dataset.json`` (v1 or v2), normalised.

    Attributes:
        version: 1 or 2.
        channel_names: the input channels in order (v2 ``channel_names``, v1 ``modality``).
        labels: label name -> the stored values it covers (one value; several for a v2 region), in the
            json's order, background included.
        file_ending: ``.nii.gz``, ``.png``, ... (v1: always NIfTI).
        cases: explicit training cases ``{case: (channel files, label file)}`` (v1 ``training``, v2
            ``dataset``); None when they are found in ``imagesTr`` (v2's usual way).
        num_training: the json's ``numTraining`` (not enforced).
    """

    version: int
    channel_names: list[str]
    labels: dict[str, tuple[int, ...]]
    file_ending: str
    cases: dict[str, tuple[list[Path], Path]] | None = None
    num_training: int | None = None
    values: frozenset = field(default_factory=frozenset)

    @property
    def is_nifti(self) -> bool:
        return self.file_ending.lower() in NIFTI_SUFFIXES

    @property
    def foreground_labels(self) -> list[str]:
        """The label names other than background (those covering a value other than 0)."""
        return [name for name, values in self.labels.items() if values != (0,)]


def _label_values(value, where: Path, name: str) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [value]
    try:
        ints = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise DiffSegError(
            f"{where}: label {name!r} has value {value!r}; expected an integer (or a list)"
        ) from None
    if any(i != v for i, v in zip(ints, values, strict=True) if not isinstance(v, str)):
        raise DiffSegError(f"{where}: label {name!r} has non-integer value {value!r}")
    return ints


def read_dataset_json(path: Path) -> DatasetJson:
    """:func:`parse_dataset_json`, with a malformed entry (a missing key, a wrong type) named as the file's."""
    try:
        return parse_dataset_json(path)
    except (KeyError, TypeError, AttributeError) as err:
        raise DiffSegError(
            f"{path}: malformed nnU-Net dataset.json ({type(err).__name__}: {err}); see the v1 / v2 layouts"
        ) from None


def parse_dataset_json(path: Path) -> DatasetJson:
    """Parse an nnU-Net ``dataset.json``, v2 (``channel_names``, ``labels`` name -> value, ``file_ending``)
    or v1 (``modality``, ``labels`` value -> name, ``training`` list of ``{image, label}``).

    Raises:
        DiffSegError: naming the file when it is missing, not JSON, or lacks the keys of either version.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DiffSegError(f"{path}: not found (an nnU-Net raw dataset folder holds dataset.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DiffSegError(f"{path}: not a readable JSON file ({err})") from None
    if not isinstance(data, dict) or "labels" not in data or not isinstance(data["labels"], dict):
        raise DiffSegError(f"{path}: no 'labels' mapping (nnU-Net v1 or v2 dataset.json expected)")
    root = path.parent
    if "channel_names" in data:
        version, channels = 2, data["channel_names"]
        labels = {str(name): _label_values(value, path, str(name)) for name, value in data["labels"].items()}
        if "file_ending" not in data:
            raise DiffSegError(f"{path}: nnU-Net v2 dataset.json without 'file_ending'")
        file_ending = str(data["file_ending"])
        cases = None
        if isinstance(data.get("dataset"), dict):  # v2's optional explicit file lists
            cases = {
                str(case): ([root / p for p in entry["images"]], root / entry["label"])
                for case, entry in data["dataset"].items()
            }
    elif "modality" in data:
        version, channels = 1, data["modality"]
        labels = {str(name): _label_values(value, path, str(name)) for value, name in data["labels"].items()}
        file_ending = ".nii.gz"
        cases = {}
        for entry in data.get("training", []):
            image, label = root / entry["image"], root / entry["label"]
            case = image.name[: -len(".nii.gz")] if image.name.endswith(".nii.gz") else image.stem
            cases[case] = ([], label)  # channel files follow the imagesTr/<case>_XXXX naming
        if not cases:
            raise DiffSegError(f"{path}: nnU-Net v1 dataset.json with an empty 'training' list")
        if any(str(e.get("image", "")).endswith(".nii") for e in data.get("training", [])):
            file_ending = ".nii"
    else:
        raise DiffSegError(
            f"{path}: neither 'channel_names' (nnU-Net v2) nor 'modality' (v1); not an nnU-Net dataset.json"
        )
    if not isinstance(channels, dict) or not channels:
        raise DiffSegError(f"{path}: empty or malformed channel list ('channel_names' / 'modality')")
    names = [str(channels[k]) for k in sorted(channels, key=lambda k: int(k))]
    if file_ending.lower() not in IMAGE_ENDINGS + NIFTI_SUFFIXES:
        raise DiffSegError(
            f"{path}: file_ending {file_ending!r} is not supported; "
            f"supported: {IMAGE_ENDINGS + NIFTI_SUFFIXES}"
        )
    values = frozenset(v for vs in labels.values() for v in vs)
    num = data.get("numTraining")
    return DatasetJson(
        version, names, labels, file_ending, cases, int(num) if num is not None else None, values
    )


def channel_files(folder: Path, ending: str) -> dict[str, dict[int, Path]]:
    """``{case: {channel: path}}`` of the ``<case>_XXXX<ending>`` files of a folder (nnU-Net's naming)."""
    pattern = re.compile(rf"^(.+)_(\d{{4}}){re.escape(ending)}$", re.IGNORECASE)
    found: dict[str, dict[int, Path]] = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = pattern.match(path.name)
        if match and path.is_file():
            found.setdefault(match.group(1), {})[int(match.group(2))] = path
    return found


class NNUNetRaw(CaseDataset):
    """An nnU-Net raw dataset (Isensee et al., Nature Methods 2021), read as nnU-Net reads it, v1 or v2.

    Layout (``root`` is the dataset folder, e.g. ``nnUNet_raw/Dataset002_Heart`` or ``Task002_Heart``)::

        dataset.json
        imagesTr/<case>_0000<ending>, <case>_0001<ending>, ...   one file per input channel
        labelsTr/<case><ending>                                  integer label map
        imagesTs/<case>_0000<ending> ...                         optional, unlabelled (``split="predict"``)
        labelsTs/<case><ending>                                  optional (not nnU-Net's; used as ``test``)
        splits_final.json                                        optional (see Splits)

    ``dataset.json``: v2 (``channel_names`` {"0": "T2"}, ``labels`` {"background": 0, "liver": 1} (a list
    of values is a region), ``numTraining``, ``file_ending``, optional ``dataset``: explicit file lists) or v1
    (``modality``, ``labels`` {"0": "background", "1": "liver"}, ``training`` [{image, label}],
    ``tensorImageSize``; always NIfTI). v2 finds the training cases in ``imagesTr``, v1 takes them from
    ``training``; ``numTraining`` is not enforced (subsets stay usable).

    Files: 2D formats (``.png``, ``.bmp``, ``.tif``) give one item per case; as in nnU-Net, an RGB image is
    one file ``_0000`` holding three channels (then no case has a ``_0001`` file). NIfTI volumes give one item
    per axial slice (the last array axis; arrays as stored, axis 0 = H), a 2D NIfTI one item.
    ``empty_slices="drop"`` leaves out the slices whose target mask is empty (every label volume of the split
    is then read once when the dataset is built); ``keep`` (default) keeps all, as nnU-Net trains on them.

    Targets (``target``): a label name of dataset.json (binary: the pixels holding its value(s)),
    ``foreground`` (any label > 0), or ``classes`` (one channel per non-background label, in dataset.json's
    order; set ``data.mask_channels`` to their number). Stored label values not in dataset.json are an error
    naming the file.

    Splits (by case, never by slice):
        - ``splits_final.json`` beside dataset.json, or ``splits_file`` (nnU-Net writes it into its
          preprocessed folder): ``train`` / ``val`` are fold ``fold`` of it; ``folds`` must then be None or
          its number of folds.
        - without one: with ``labelsTs`` present, ``train`` / ``val`` split the training cases by
          ``fractions[0] : fractions[1]`` (or k-fold: ``val`` = fold ``fold``); otherwise ``train`` /
          ``val`` / ``test`` are :func:`~diffseg_lightning.data.splits.seeded_split` of the training cases
          (sorted ids) by ``fractions``, or k-fold with ``test`` = fold ``fold``.
        - ``test`` = imagesTs + labelsTs when labelsTs exists. With a splits file and no labelsTs there is
          no held-out labelled case: the test split is an error that says so, unless ``test_from_val``
          makes it the fold's ``val`` cases (nnU-Net's cross-validation protocol, with a warning). Those
          results are optimistic (the best checkpoint is chosen on the same cases): report them as
          cross-validation. (``diffseg-train test=false`` trains without a test split.)
        - ``predict`` = every imagesTs case, unlabelled.

    Intensities: as stored, clipped to ``window`` when given (e.g. a CT window in HU); the DataModule
    z-scores each image and channel. (nnU-Net's own CT scheme clips to dataset-wide foreground percentiles;
    that needs a pass over the whole dataset, so it is left to ``window``.)

    Items:
        ``image`` float32 (C, H, W) bilinear to ``size``; ``mask`` float32 (C_mask, H, W) nearest (not in
        ``predict``); ``case`` (str: the ``_0000`` file, plus ``#<slice>`` for a volume's slice, so unique per
        item; in ``predict`` the file alone, as the mask writer reads it); ``index``; ``slice`` int64 (-1 for
        a 2D file); ``original_size`` (2,); for NIfTI also ``spacing`` float32 (2,) of the returned arrays
        and ``original_spacing`` (the header's pixdim of the first two axes); ``predict`` adds
        ``num_slices`` (0 for a 2D file).

    Args:
        root: the dataset folder holding dataset.json.
        split: ``train``, ``val``, ``test`` or ``predict``.
        size: resize target (H, W) or one int; None keeps the stored size.
        channels: the model's image channels; an image with another count is an error naming it.
        target: a label name, ``foreground`` or ``classes``.
        empty_slices: ``keep`` or ``drop`` (volumes only).
        window: None or ``[low, high]`` to clip intensities to.
        fractions: train / val / test shares (see Splits).
        seed: seed of the split.
        splits_file: path to a ``splits_final.json``; None looks beside dataset.json.
        test_from_val: with a splits file and no labelsTs/, make the test split the fold's val cases.
        on_bad_case: ``error`` or ``skip``: a case missing a channel file or its label (or with files whose
            shapes or voxel grids differ: orientation, spacing, affine) is raised naming the file, or left out
            and listed in ``skipped``.
        folds: k for k-fold cross-validation (see Splits).
        fold: the held-out fold (or the fold of the splits file).

    Raises:
        ValueError: for an unknown split, target, ``empty_slices`` or window, or a fold out of range.
        DiffSegError: naming the file, for a missing / malformed dataset.json or splits file, unknown
            case ids in the splits file, a bad case (see ``on_bad_case``); when an item is
            read, for an unreadable file, a size or channel mismatch, NaN pixels, or label values not in
            dataset.json.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        size: int | Sequence[int] | None = 128,
        channels: int | None = 1,
        target: str = "foreground",
        empty_slices: str = "keep",
        window: Sequence[float] | None = None,
        fractions: Sequence[float] = (0.7, 0.1, 0.2),
        seed: int = 0,
        splits_file: str | Path | None = None,
        test_from_val: bool = False,
        on_bad_case: str = "error",
        folds: int | None = None,
        fold: int = 0,
    ) -> None:
        super().__init__(on_bad_case)
        self.test_from_val = bool(test_from_val)
        self.split = check_split(split, NNUNET_SPLITS, "NNUNetRaw")
        if empty_slices not in EMPTY_SLICES:
            raise ConfigError(f"NNUNetRaw: empty_slices must be one of {EMPTY_SLICES}, got {empty_slices!r}")
        check_fractions(fractions)
        self.window = None
        if window is not None:
            low, high = (float(v) for v in window)
            if not low < high:
                raise ConfigError(
                    f"NNUNetRaw: window must be [low, high] with low < high, got {list(window)}"
                )
            self.window = (low, high)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DiffSegError(f"data root {self.root} does not exist or is not a folder")
        self.info = read_dataset_json(self.root / "dataset.json")
        if target not in SPECIAL_TARGETS and target not in self.info.labels:
            raise ConfigError(
                "NNUNetRaw: target must be 'foreground', 'classes' or a label of "
                f"{self.root / 'dataset.json'} "
                f"({', '.join(self.info.labels)}), got {target!r}"
            )
        if target == "classes" and not self.info.foreground_labels:
            raise DiffSegError(
                f"{self.root / 'dataset.json'}: no label other than background for target=classes"
            )
        self.target = target
        self.planes = self.target_planes(target)
        self.size = as_size(size)
        self.channels = channels
        self.empty_slices = empty_slices
        self.fractions = tuple(float(f) for f in fractions)
        self.seed, self.folds, self.fold = seed, folds, fold
        self.splits_path = Path(splits_file).expanduser() if splits_file else None
        if self.splits_path is None and (self.root / SPLITS_FILE).is_file():
            self.splits_path = self.root / SPLITS_FILE

        self._cached: tuple | None = (
            None  # the last volume read: (number, image, labels) or (number, error, None)
        )
        labelled = split != "predict"
        if split == "predict" or (split == "test" and (self.root / "labelsTs").is_dir()):
            candidates = self.scan_folder("imagesTs", "labelsTs" if labelled else None)
        else:
            training = self.scan_training()
            ids = sorted(training)
            candidates = {case: training[case] for case in self.choose(ids)}
        self.cases: list[tuple[str, list[Path], Path | None]] = []
        self.items: list[tuple[int, int]] = []  # (case number, slice; -1 for a 2D file)
        self.spacings: list[tuple[float, float] | None] = []
        self.num_slices: list[int] = []
        for case, (images, label) in candidates.items():
            checked = self.check_case(case, images, label)
            if checked is None:
                continue
            slices, spacing = checked
            number = len(self.cases)
            self.cases.append((case, images, label))
            self.spacings.append(spacing)
            self.num_slices.append(slices)
            kept = None
            if labelled and slices and empty_slices == "drop":
                try:
                    kept = self.nonempty_slices(number, slices)
                except DiffSegError as err:  # a volume that cannot be read: a bad case, as a missing file
                    self.bad_case(*split_message(err))
                    del self.cases[number], self.spacings[number], self.num_slices[number]
                    self._cached = None
                    continue
            self.items.extend(
                (number, k) for k in (kept if kept is not None else range(slices) if slices else [-1])
            )

    # ------------------------------------------------------------------------------------------ scanning
    def target_planes(self, target: str) -> list[tuple[int, ...] | None]:
        """The stored values of each mask channel (None: any value > 0)."""
        if target == "foreground":
            return [None]
        if target == "classes":
            return [self.info.labels[name] for name in self.info.foreground_labels]
        return [self.info.labels[target]]

    def expected_channels(self, found: dict[str, dict[int, Path]]) -> list[int]:
        """The channel-file indices each case must have: one per channel name, except nnU-Net's RGB case (a 2D
        format where no file has an index above 0: one file holds all channels)."""
        if not self.info.is_nifti and not any(k > 0 for files in found.values() for k in files):
            return [0]
        return list(range(len(self.info.channel_names)))

    def case_files(self, folder: str, case: str, indices: Sequence[int]) -> list[Path]:
        ending = self.info.file_ending
        return [self.root / folder / f"{case}_{k:04d}{ending}" for k in indices]

    def scan_training(self) -> dict[str, tuple[list[Path], Path]]:
        """``{case: (channel files, label file)}`` of the training cases (files not yet checked to exist)."""
        ending = self.info.file_ending
        found = channel_files(self.root / "imagesTr", ending)
        if self.info.cases is None:
            if not (self.root / "imagesTr").is_dir():
                raise DiffSegError(
                    f"{self.root}: no imagesTr/ folder (nnU-Net raw layout: imagesTr/<case>_0000{ending})"
                )
            if not found:
                raise DiffSegError(f"{self.root / 'imagesTr'}: no <case>_XXXX{ending} files")
            indices = self.expected_channels(found)
            return {
                case: (self.case_files("imagesTr", case, indices), self.root / "labelsTr" / f"{case}{ending}")
                for case in found
            }
        if self.info.version == 2:  # explicit lists
            return dict(self.info.cases)
        indices = self.expected_channels(found)
        return {
            case: (self.case_files("imagesTr", case, indices), label)
            for case, (_, label) in self.info.cases.items()
        }

    def scan_folder(self, images: str, labels: str | None) -> dict[str, tuple[list[Path], Path | None]]:
        """``{case: (channel files, label file or None)}`` of ``imagesTs`` (``labelsTs`` for ``test``)."""
        ending = self.info.file_ending
        found = channel_files(self.root / images, ending)
        if not found:
            raise DiffSegError(
                f"{self.root / images}: no <case>_XXXX{ending} files for the {self.split} split"
            )
        indices = self.expected_channels(found)
        return {
            case: (
                self.case_files(images, case, indices),
                self.root / labels / f"{case}{ending}" if labels else None,
            )
            for case in sorted(found)
        }

    def read_splits(self) -> list[dict]:
        path = self.splits_path
        try:
            splits = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DiffSegError(f"{path}: splits file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DiffSegError(f"{path}: not a readable JSON file ({err})") from None
        if (
            not isinstance(splits, list)
            or not splits
            or not all(isinstance(s, dict) and "train" in s and "val" in s for s in splits)
        ):
            raise DiffSegError(f"{path}: expected nnU-Net's list of {{'train': [...], 'val': [...]}} folds")
        return splits

    def choose(self, ids: list[str]) -> list[str]:
        """The training-case ids of this split (see Splits in the class docstring)."""
        split = self.split
        if self.splits_path is not None:
            splits = self.read_splits()
            if self.folds is not None and self.folds != len(splits):
                raise ConfigError(
                    f"NNUNetRaw: data.folds={self.folds} but {self.splits_path} holds {len(splits)} folds; "
                    "set data.folds=null to use the file's folds"
                )
            if not 0 <= self.fold < len(splits):
                raise ConfigError(
                    f"NNUNetRaw: data.fold must lie in [0, {len(splits)}) for {self.splits_path}"
                )
            if split == "test" and not self.test_from_val:
                raise DiffSegError(
                    f"{self.root}: no labelsTs/, and {self.splits_path.name} leaves no labelled case outside "
                    f"fold {self.fold}'s train / val: set data.test_from_val=true to score its val cases "
                    "(cross-validation; optimistic, the best checkpoint is chosen on them), or train with test=false"
                )
            if split == "test":  # no labelsTs: nnU-Net's cross-validation protocol, the fold's val cases
                warnings.warn(
                    f"NNUNetRaw: {self.root} has no labelsTs/, so the test split is fold {self.fold}'s val "
                    f"cases of {self.splits_path.name} (cross-validation results; the best checkpoint is "
                    "chosen on them too)",
                    stacklevel=2,
                )
            chosen = [str(c) for c in splits[self.fold]["val" if split == "test" else split]]
            unknown = sorted(set(chosen) - set(ids))
            if unknown:
                raise DiffSegError(
                    f"{self.splits_path}: fold {self.fold} {split} lists case(s) not in the dataset: "
                    f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}"
                )
            return sorted(chosen)
        if (self.root / "labelsTs").is_dir():  # the official test set is labelsTs: train / val share the rest
            train, val = self.fractions[:2]
            if self.folds is None:
                chosen = pool_split(list(range(len(ids))), train, val, self.seed, split)
            else:
                chosen = train_val_split(len(ids), split, 0.0, self.seed, self.folds, self.fold)
        else:
            chosen = seeded_split(len(ids), self.fractions, self.seed, split, self.folds, self.fold)
        return [ids[i] for i in chosen]

    def check_case(
        self, case: str, images: list[Path], label: Path | None
    ) -> tuple[int, tuple | None] | None:
        """``(slices, spacing)`` of a case (0 slices: a 2D file; spacing None for 2D formats), or None when
        it is a bad case (a missing file, or NIfTI headers whose shapes or voxel grids differ: see
        :func:`~diffseg_lightning.io.volumes.check_same_grid`)."""
        for k, path in enumerate(images):
            if not path.is_file():
                name = self.info.channel_names[k] if k < len(self.info.channel_names) else f"channel {k}"
                self.bad_case(path, f"missing: channel {k} ({name}) of case {case}")
                return None
        if label is not None and not label.is_file():
            self.bad_case(label, f"missing: the label map of case {case}")
            return None
        if not self.info.is_nifti:
            return 0, None
        files = [*images, label] if label is not None else list(images)
        try:
            headers = [load_nifti(path) for path in files]
        except DiffSegError as err:
            self.bad_case(*split_message(err))
            return None
        shapes = [tuple(int(n) for n in h.shape) for h in headers[: len(images)]]
        label_shape = tuple(int(n) for n in headers[-1].shape)
        for path, shape in zip(images[1:], shapes[1:], strict=True):
            if shape != shapes[0]:
                self.bad_case(path, f"shape {shape} differs from {images[0].name}'s {shapes[0]}")
                return None
        if len(shapes[0]) not in (2, 3):
            self.bad_case(
                images[0], f"shape {shapes[0]}: expected a 2D image or a 3D volume per channel file"
            )
            return None
        if label is not None and label_shape != shapes[0]:
            self.bad_case(
                label, f"label shape {label_shape} differs from the image shape {shapes[0]} of case {case}"
            )
            return None
        try:  # shapes agree: orientation, spacing and affine too, or image and label are misaligned
            check_same_grid(files, headers)
        except DiffSegError as err:
            self.bad_case(*split_message(err))
            return None
        zooms = headers[0].header.get_zooms()
        spacing = (float(zooms[0]), float(zooms[1]))
        return (shapes[0][2] if len(shapes[0]) == 3 else 1), spacing

    def nonempty_slices(self, number: int, slices: int) -> list[int]:
        """The slices of volume ``number`` whose target mask holds foreground."""
        _, labels = self.read_case(number)
        planes = self.target_mask(labels, self.cases[number][2])
        return [k for k in range(slices) if planes[..., k].any()]

    # ------------------------------------------------------------------------------------------- reading
    def target_mask(self, labels: np.ndarray, path: Path) -> np.ndarray:
        """(C, ...) float32 target planes from stored labels, after checking them against dataset.json."""
        if not np.all(labels == np.round(labels)):
            raise DiffSegError(f"{path}: label map holds non-integer values; expected those of dataset.json")
        ints = labels.astype(np.int64)
        self.note_labels(ints)
        self.check_labels(ints, self.info.values, path, "expected the values of dataset.json's labels")
        planes = [ints > 0 if values is None else np.isin(ints, values) for values in self.planes]
        return np.stack(planes).astype(np.float32)

    def read_case(self, number: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Image (C, H, W[, D]) float32 and stored labels (H, W[, D]) (None in ``predict``) of a case; the
        last NIfTI case read is kept."""
        if self._cached is not None and self._cached[0] == number:
            if isinstance(self._cached[1], DiffSegError):  # a bad case is decoded once, not once per slice
                raise DiffSegError(str(self._cached[1]))
            return self._cached[1], self._cached[2]
        try:
            image, labels = self._read_case(number)
        except DiffSegError as err:
            if self.info.is_nifti:
                self._cached = (number, err, None)
            raise
        if self.info.is_nifti:
            self._cached = (number, image, labels)
        return image, labels

    def _read_case(self, number: int) -> tuple[np.ndarray, np.ndarray | None]:
        case, images, label = self.cases[number]
        expected = len(self.info.channel_names)
        if self.info.is_nifti:
            arrays = [read_nifti_array(path) for path in images]
            arrays = [a[..., None] if a.ndim == 2 else a for a in arrays]
            image = np.stack(arrays)
            labels = None
            if label is not None:
                labels = read_nifti_array(label)
                labels = labels[..., None] if labels.ndim == 2 else labels
        else:
            parts = [read_image(path) for path in images]
            for path, part in zip(images[1:], parts[1:], strict=True):
                check_same_size(path, part.shape, images[0], parts[0].shape)
            image = np.concatenate(parts)
            labels = None
            if label is not None:
                labels = read_label_map(label).astype(np.float32)
                check_same_size(label, labels.shape, images[0], image.shape)
        if image.shape[0] != expected:
            raise DiffSegError(
                f"{images[0]}: case {case} holds {image.shape[0]} channel(s) but dataset.json lists "
                f"{expected} "
                f"({', '.join(self.info.channel_names)})"
            )
        if self.channels is not None and image.shape[0] != self.channels:
            raise DiffSegError(
                f"{images[0]}: image has {image.shape[0]} channel(s) but the config expects {self.channels}"
            )
        if not np.isfinite(image).all():
            raise DiffSegError(f"{images[0]}: case {case} holds NaN or infinite values")
        return image, labels

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return (
            f"NNUNetRaw(root={str(self.root)!r}, split={self.split!r}, cases={len(self.cases)}, "
            f"items={len(self)}, target={self.target!r}, size={self.size}, seed={self.seed}, "
            f"folds={self.folds}, fold={self.fold})"
        )

    @property
    def case_ids(self) -> list[str]:
        """The case identifiers of this split."""
        return [case for case, _, _ in self.cases]

    def __getitem__(self, index: int) -> dict:
        number, slice_index = self.items[index]
        _, images, label = self.cases[number]
        image, labels = self.read_case(number)
        if slice_index >= 0:
            image = image[..., slice_index]
            labels = labels[..., slice_index] if labels is not None else None
        if self.window is not None:
            image = np.clip(image, *self.window)
        image_t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        original_size = torch.tensor(image_t.shape[-2:], dtype=torch.int64)
        out = {"image": resize(image_t, self.size, "bilinear")}
        if labels is not None:
            out["mask"] = resize(torch.from_numpy(self.target_mask(labels, label)), self.size, "nearest")
        volume = self.info.is_nifti
        out["case"] = str(images[0]) + (f"#{slice_index}" if volume and labels is not None else "")
        out["index"] = torch.tensor(index)
        out["slice"] = torch.tensor(slice_index if volume else -1, dtype=torch.int64)
        out["original_size"] = original_size
        if self.split == "predict":
            out["num_slices"] = torch.tensor(self.num_slices[number] if volume else 0, dtype=torch.int64)
        if volume:
            original_spacing = torch.tensor(self.spacings[number], dtype=torch.float32)
            scale = original_size.float() / torch.tensor(out["image"].shape[-2:], dtype=torch.float32)
            out["spacing"] = original_spacing * scale
            out["original_spacing"] = original_spacing
        return out


__all__ = ["DatasetJson", "NNUNetRaw", "channel_files", "read_dataset_json"]
