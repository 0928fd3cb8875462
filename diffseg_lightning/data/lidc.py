"""LIDC-IDRI lung nodules with four annotators, in the two processed forms the multi-annotator literature uses.

Dataset: Armato et al., "The Lung Image Database Consortium (LIDC) and Image Database Resource Initiative
(IDRI): a completed reference database of lung nodules on CT scans", Medical Physics 38(2), 2011. The 2D
lesion crops with the four radiologists' masks were released by Kohl et al. with the Probabilistic U-Net
(NeurIPS 2018) and the Hierarchical Probabilistic U-Net (2019); PHiSeg (MICCAI 2019) and BerDiff (MICCAI
2023) report on them.

The two forms, read as they are distributed:

1. The Probabilistic U-Net pickle (``data_lidc.pickle``, as read by the PyTorch Probabilistic U-Net of
   S. Knegt and by PHiSeg): one pickled dict ``{slice name: {"image": (128, 128) float in [0, 1],
   "masks": [4 x (128, 128) binary], "series_uid": str}}``, or several ``*.pickle`` parts in one folder
   that together form that dict.
2. The lesion crops of the hierarchical Probabilistic U-Net (``gs://hpunet-data/lidc_crops``), 180 x 180
   8-bit PNG. The release's archives ``lidc_crops_{train,val,test}.tar.gz`` extract to
   ``lidc_crops_<split>/<split>/...``; BerDiff's README lists the same tree without that outer folder::

       <root>/<split>/images/LIDC-IDRI-0001/z-105.0_c0.png
       <root>/<split>/gt/LIDC-IDRI-0001/z-105.0_c0_l0.png ... z-105.0_c0_l3.png   (one file per annotator)

   (``<split>`` = ``train``, ``val``, ``test``; ``z-105.0`` is the slice position, ``c0`` the crop.)
"""

from __future__ import annotations

import pickle
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from diffseg_lightning.data.base import CaseDataset, check_channels, check_same_size
from diffseg_lightning.data.masks import mask_foreground
from diffseg_lightning.data.splits import SPLITS, check_fold, check_fractions, check_split, seeded_split
from diffseg_lightning.data.transforms import as_size, resize
from diffseg_lightning.io.images import read_image, read_mask_file
from diffseg_lightning.utils.errors import ConfigError, DiffSegError

FORMATS = ("auto", "pickle", "png")
PICKLE_SUFFIXES = (".pickle", ".pkl")
PICKLE_KEYS = ("image", "masks", "series_uid")
GT_FILE = re.compile(r"^(?P<slice>.+)_l(?P<annotator>\d+)\.png$")

# One loaded set of pickle files, shared by the train / val / test datasets of a run (the release's pickle
# is about 1.3 GB; without this each split would load its own copy). Key: (path, size, mtime) of each file.
_PICKLE_CACHE: dict[tuple, list[tuple[Path, dict]]] = {}


def clear_pickle_cache() -> None:
    """Drop the pickle data held for reuse by the next :class:`LIDC` built from the same files."""
    _PICKLE_CACHE.clear()


def _load_pickle(path: Path) -> dict:
    """One pickle part: a non-empty dict, else a :class:`DiffSegError` naming the file."""
    try:
        with open(path, "rb") as stream:
            try:
                data = pickle.load(stream)  # noqa: S301 (the user's own file; see the class docstring)
            except UnicodeDecodeError:  # written by Python 2: its byte strings decode as latin-1
                stream.seek(0)
                data = pickle.load(stream, encoding="latin1")  # noqa: S301
    except Exception as err:  # unpickling can fail in many ways; all mean: this file cannot be read
        raise DiffSegError(f"{path}: not a readable pickle ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise DiffSegError(
            f"{path}: expected a pickled dict {{slice name: {{'image', 'masks', 'series_uid'}}}} "
            f"(the Probabilistic U-Net's data_lidc.pickle), found {type(data).__name__}"
        )
    if not data:
        raise DiffSegError(f"{path}: the pickled dict is empty")
    return data


def load_pickles(files: Sequence[Path]) -> list[tuple[Path, dict]]:
    """``(file, dict)`` for each pickle file, reusing the last set loaded when the files are unchanged."""
    key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if key not in _PICKLE_CACHE:
        parts = [(path, _load_pickle(path)) for path in files]
        _PICKLE_CACHE.clear()
        _PICKLE_CACHE[key] = parts
    return _PICKLE_CACHE[key]


def center_crop(array: np.ndarray, crop: int | None) -> tuple[np.ndarray, tuple[int, int]]:
    """The centre ``crop`` x ``crop`` window of (..., H, W) and its (top, left) offset.

    Each axis longer than ``crop`` is cut to ``crop`` (the extra pixels split evenly, the odd one at the
    bottom / right); an axis not longer is kept whole. None keeps the array.
    """
    if crop is None:
        return array, (0, 0)
    height, width = array.shape[-2:]
    top, left = max(height - crop, 0) // 2, max(width - crop, 0) // 2
    return array[..., top : top + min(crop, height), left : left + min(crop, width)], (top, left)


def _names(annotators: Sequence[int] | frozenset) -> str:
    return ", ".join(f"_l{k}.png" for k in sorted(annotators))


class LIDC(CaseDataset):
    """LIDC-IDRI lesion crops with every annotator's mask (Armato et al., Medical Physics 2011), from the
    Probabilistic U-Net pickle or the hierarchical Probabilistic U-Net's PNG crops (see the module docstring).

    ``format``: ``pickle``, ``png`` or ``auto``. ``auto`` reads ``root`` as a pickle when it is a file or a
    folder holding ``*.pickle`` / ``*.pkl`` files, and as the PNG crops when it holds the split folders
    (``train/images`` or ``lidc_crops_train/train/images``, ...); a folder holding both asks for
    ``data.format``. Note that unpickling runs code stored in the file: only point ``root`` at pickle files
    you trust (the release, or your own). A folder of pickle parts is read whole (every ``*.pickle`` /
    ``*.pkl`` file directly in it, in name order); the same slice name in two parts is an error naming both.

    Splits (deterministic, by patient, never by slice):
        - pickle: the patient is the ``series_uid`` (one CT series; the pickle has no other patient id).
          The sorted distinct series uids are split by :func:`seeded_split` with ``fractions`` (default
          0.7 / 0.15 / 0.15, train / val / test) and ``seed``; every slice follows its series. (PHiSeg split
          the same uids 0.64 / 0.16 / 0.2 with scikit-learn's unseeded ``train_test_split``: not
          reproducible, so not copied.)
        - png: the release's folders (``train`` / ``val`` / ``test``, 8843 / 1993 / 1980 crops in the
          public version); ``fractions`` and ``seed`` are not used.
        - ``folds`` = k (either form): k-fold cross-validation by patient: the patients (series uids, or for
          the PNG crops the ``LIDC-IDRI-NNNN`` folders of all three split folders pooled) are split with
          :func:`seeded_split` (``test`` = fold ``fold``; train / val carve the rest by ``fractions[0] :
          fractions[1]``).

    Annotators: their number is read from the data (4 in LIDC), never assumed: the mask count (pickle) or
    the ``_lK.png`` set (PNG) most slices have is the reference, and a slice with another count or set is a
    bad case (``on_bad_case``): named with the missing (or extra) ``_lK.png`` file, or as
    ``<pickle file>:<slice name>``. A crop whose image has no ``gt`` files, or whose ``gt`` files have no
    image, is a bad case too. Empty annotator masks are kept (an annotator who did not mark the lesion).

    Preprocessing (the papers' setting): the image and every mask are centre-cropped to ``crop`` x ``crop``
    (128: 180 -> 128 for the PNG crops, rows and columns 26..153; the pickle's slices are already 128 x 128
    and stay whole), then resized to ``size`` (bilinear for the image, nearest for the masks; a no-op at
    128). An image smaller than ``crop`` is not padded. Intensities are returned as stored: the pickle's
    floats in [0, 1], the PNGs' 8-bit values as 0..255 floats; the DataModule then z-scores each image
    (``normalize: zscore``), so both forms reach the model alike. Masks: PNG values 0 / 255 (or 0 / 1: the shared
    binary rule of :mod:`~diffseg_lightning.data.masks`) and pickle values 0 / 1 are binarised (> 0); any
    other value is an error naming the file.

    Items:
        ``image`` (1, H, W) float32; ``masks`` (A, H, W) float32 in {0, 1}, every annotator in file order
        (``l0``, ``l1``, ... / the pickle's list order); ``mask`` (1, H, W): the annotators' majority, a pixel
        marked by more than half of them (at least 3 of 4; a 2-2 tie is background), computed before the
        resize; ``case`` (str): the PNG image path, or ``<pickle file>:<slice name>``, unique per slice;
        ``patient`` (str): the ``LIDC-IDRI-NNNN`` folder or the series uid; ``index``; ``original_size``
        int64 (2,): the stored (H, W) (180 x 180 or 128 x 128); ``crop_offset`` int64 (2,): (top, left) of
        the crop in the stored image. The release gives no pixel spacing, so there is no ``spacing``.

    Args:
        root: a pickle file, a folder of pickle parts, or the folder holding the PNG split folders.
        split: ``train``, ``val`` or ``test``.
        format: ``auto``, ``pickle`` or ``png``.
        size: resize target (H, W) or one int, after the crop; None keeps the cropped size.
        crop: centre-crop size (see above); None keeps the stored size.
        channels: expected image channels (1); a PNG with another count is an error naming it.
        fractions: train / val / test shares of the patients (pickle, and the k-fold train / val carve).
        seed: seed of the split.
        folds: k for k-fold cross-validation by patient; None uses the split described above.
        fold: the held-out fold, in [0, folds).
        on_bad_case: ``error`` (raise at the first bad slice) or ``skip`` (leave it out, listed in
            ``skipped``).

    Raises:
        ValueError: for an unknown split or format, fractions that are not three shares summing to 1, a
            crop below 1, or a fold outside [0, folds).
        DiffSegError: naming the path, for a missing root or split folder, an unreadable pickle or one that
            is not the expected dict, a slice name in two pickle parts, no usable slice; and (under
            ``on_bad_case=error``) for the bad slices above. When an item is read: an unreadable or
            corrupt PNG, a mask whose size differs from its image, mask values other than 0 / 1 / 255
            (PNG) or 0 / 1 (pickle), NaN or infinite pixels, a wrong channel count.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        format: str = "auto",  # noqa: A002 (the config key's name)
        size: int | Sequence[int] | None = 128,
        crop: int | None = 128,
        channels: int | None = 1,
        fractions: Sequence[float] = (0.7, 0.15, 0.15),
        seed: int = 0,
        folds: int | None = None,
        fold: int = 0,
        on_bad_case: str = "error",
    ) -> None:
        super().__init__(on_bad_case)
        self.split = check_split(split, SPLITS, "LIDC")
        if format not in FORMATS:
            raise ConfigError(f"LIDC: format must be one of {FORMATS}, got {format!r}")
        if crop is not None and int(crop) < 1:
            raise ConfigError(f"LIDC: crop must be a positive size or null, got {crop}")
        check_fold(folds, fold)
        self.fractions = check_fractions(fractions)
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise DiffSegError(f"data root {self.root} does not exist")
        self.format = self.detect(self.root) if format == "auto" else format
        self.size = as_size(size)
        self.crop = None if crop is None else int(crop)
        self.channels = channels
        self.seed = seed
        self.folds = folds
        self.fold = fold
        # One entry per slice: (case, patient, payload); payload is (image, masks) arrays for the pickle
        # and (image path, [gt paths]) for the PNG crops.
        self.slices: list[tuple[str, str, tuple]] = []
        self.annotators = 0
        if self.format == "pickle":
            self.scan_pickle()
        else:
            self.scan_png()
        self.patients: list[str] = sorted({patient for _, patient, _ in self.slices})

    # ---------------------------------------------------------------------------------------- layout
    @staticmethod
    def pickle_files(root: Path) -> list[Path]:
        if root.is_file():
            return [root]
        return sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)

    @staticmethod
    def split_dir(root: Path, split: str) -> Path | None:
        """The folder holding ``images/`` and ``gt/`` of ``split``: ``lidc_crops_<split>/<split>`` (the
        release's archives extracted) or ``<split>``; None when neither exists."""
        for folder in (root / f"lidc_crops_{split}" / split, root / split):
            if (folder / "images").is_dir():
                return folder
        return None

    @classmethod
    def detect(cls, root: Path) -> str:
        """``pickle`` or ``png`` for ``format: auto`` (see the class docstring)."""
        if root.is_file():
            return "pickle"
        has_pickles = bool(cls.pickle_files(root))
        has_png = any(cls.split_dir(root, split) is not None for split in SPLITS)
        if has_pickles and has_png:
            raise DiffSegError(
                f"{root} holds both pickle files and PNG split folders; set data.format=pickle or data.format=png"
            )
        if has_pickles:
            return "pickle"
        if has_png:
            return "png"
        raise DiffSegError(
            f"{root}: no LIDC data found; expected a pickle file (data_lidc.pickle), a folder of *.pickle "
            f"parts, or the PNG crops {root}/<split>/images/<patient>/<slice>.png with "
            f"{root}/<split>/gt/<patient>/<slice>_l0.png ... (or lidc_crops_<split>/<split>/..., as the "
            "release's archives extract)"
        )

    def chosen_patients(self, patients: Sequence[str]) -> set[str]:
        """The patients of this split among ``patients`` (sorted first), by :func:`seeded_split`."""
        ordered = sorted(set(patients))
        picked = seeded_split(len(ordered), self.fractions, self.seed, self.split, self.folds, self.fold)
        return {ordered[i] for i in picked}

    # ---------------------------------------------------------------------------------------- pickle
    def scan_pickle(self) -> None:
        files = self.pickle_files(self.root)
        if not files:
            raise DiffSegError(
                f"{self.root}: no *.pickle or *.pkl files (expected data_lidc.pickle or its parts)"
            )
        owner: dict = {}
        entries = []  # (file, key, value)
        for path, data in load_pickles(files):
            for key, value in data.items():
                if key in owner:
                    raise DiffSegError(
                        f"{path}: slice {key!r} is also in {owner[key]}; the pickle parts must not overlap "
                        "(is the whole pickle in the folder beside its parts?)"
                    )
                owner[key] = path
                entries.append((path, key, value))
        entries.sort(key=lambda entry: str(entry[1]))

        def structure(value) -> str | None:
            if not isinstance(value, dict):
                return f"expected a dict with {', '.join(PICKLE_KEYS)}, found {type(value).__name__}"
            missing = [k for k in PICKLE_KEYS if k not in value]
            if missing:
                return f"missing key(s) {', '.join(missing)} (a slice holds {', '.join(PICKLE_KEYS)})"
            if not isinstance(value["masks"], (list, tuple, np.ndarray)):
                return f"'masks' is a {type(value['masks']).__name__}, expected a list of (H, W) arrays"
            return None

        problems = [structure(value) for _, _, value in entries]
        counts = Counter(
            len(v["masks"]) for (_, _, v), bad in zip(entries, problems, strict=True) if bad is None
        )
        if not counts:
            path, key, _ = entries[0]
            raise DiffSegError(f"{path}: no usable slice; e.g. slice {key!r}: {problems[0]}")
        self.annotators = counts.most_common(1)[0][0]
        patients = [str(v["series_uid"]) for _, _, v in entries if isinstance(v, dict) and "series_uid" in v]
        chosen = self.chosen_patients(patients)
        for (path, key, value), problem in zip(entries, problems, strict=True):
            case = f"{path}:{key}"
            patient = str(value["series_uid"]) if isinstance(value, dict) and "series_uid" in value else None
            if patient is not None and patient not in chosen:
                continue
            if problem is None:
                problem = self.pickle_slice_problem(value)
            if (
                problem is not None
            ):  # a slice without a series uid belongs to no split: every split reports it
                self.bad_case(case, problem)
                continue
            self.slices.append((case, patient, (value["image"], list(value["masks"]))))

    def pickle_slice_problem(self, value: dict) -> str | None:
        """Why a structurally complete pickle slice cannot be used (shapes, annotator count), or None."""
        image = np.asarray(value["image"])
        if image.ndim != 2:
            return f"image of shape {image.shape}, expected (H, W)"
        masks = value["masks"]
        if len(masks) != self.annotators:
            return (
                f"has {len(masks)} annotator mask(s); the other slices have {self.annotators} "
                "(every slice needs the same annotators)"
            )
        for k, mask in enumerate(masks):
            shape = np.shape(mask)
            if tuple(shape) != image.shape:
                return f"mask {k} of shape {tuple(shape)} differs from the image's {image.shape}"
        return None

    # ------------------------------------------------------------------------------------------- png
    def scan_png(self) -> None:
        if self.folds is None:
            folder = self.split_dir(self.root, self.split)
            if folder is None:
                raise DiffSegError(
                    f"{self.root}: no {self.split} folder; expected {self.root / self.split}/images/<patient>/"
                    f"<slice>.png (or {self.root}/lidc_crops_{self.split}/{self.split}/images/...)"
                )
            folders = [folder]
        else:
            folders = [f for f in (self.split_dir(self.root, s) for s in SPLITS) if f is not None]
        crops, orphans = [], []  # (patient, image path, {annotator: gt path}); (patient, image path, gts)
        for folder in folders:
            found, lost = self.scan_split_folder(folder)
            crops.extend(found)
            orphans.extend(lost)
        if not crops:
            raise DiffSegError(
                f"{', '.join(str(f / 'images') for f in folders)}: no <patient>/<slice>.png images"
            )
        sets = Counter(frozenset(gts) for _, _, gts in crops if gts)
        if not sets:
            raise DiffSegError(
                f"{', '.join(str(f / 'gt') for f in folders)}: no annotator masks <patient>/<slice>_l0.png ..."
            )
        reference = sets.most_common(1)[0][0]
        self.annotators = len(reference)
        chosen = self.chosen_patients([p for p, _, _ in crops]) if self.folds is not None else None
        for patient, image_path, gts in crops:
            if chosen is not None and patient not in chosen:
                continue
            gt_dir = image_path.parent.parent.parent / "gt" / patient
            if not gts:
                self.bad_case(
                    image_path, f"no annotator masks; expected {gt_dir / image_path.stem}{_names(reference)}"
                )
                continue
            if frozenset(gts) != reference:
                missing, extra = sorted(reference - set(gts)), sorted(set(gts) - reference)
                where = gt_dir / f"{image_path.stem}_l{missing[0]}.png" if missing else gts[extra[0]]
                what = "missing annotator mask" if missing else "unexpected annotator mask"
                self.bad_case(
                    where, f"{what} (every other slice has {_names(reference)}; this one has {_names(gts)})"
                )
                continue
            self.slices.append((str(image_path), patient, (image_path, [gts[k] for k in sorted(reference)])))
        for patient, image_path, gts in orphans:
            if chosen is None or patient in chosen:
                self.bad_case(image_path, f"missing image; its annotator masks ({_names(gts)}) exist")

    @staticmethod
    def scan_split_folder(folder: Path) -> tuple[list, list]:
        """The crops of one split folder, sorted, and the masks without an image (see :meth:`scan_png`)."""
        images_dir, gt_dir = folder / "images", folder / "gt"
        if not gt_dir.is_dir():
            raise DiffSegError(
                f"{folder}: no gt/ folder beside images/ (expected gt/<patient>/<slice>_l0.png ...)"
            )
        masks: dict[tuple[str, str], dict[int, Path]] = defaultdict(dict)
        for patient_dir in sorted(p for p in gt_dir.iterdir() if p.is_dir()):
            for path in patient_dir.iterdir():
                match = GT_FILE.match(path.name)
                if match and path.is_file():
                    masks[(patient_dir.name, match["slice"])][int(match["annotator"])] = path
        crops = []
        for patient_dir in sorted(p for p in images_dir.iterdir() if p.is_dir()):
            for path in sorted(patient_dir.glob("*.png")):
                crops.append((patient_dir.name, path, masks.pop((patient_dir.name, path.stem), {})))
        orphans = [
            (patient, images_dir / patient / f"{name}.png", gts)
            for (patient, name), gts in sorted(masks.items())
        ]
        return crops, orphans

    # ------------------------------------------------------------------------------------------ items
    def __len__(self) -> int:
        return len(self.slices)

    def __repr__(self) -> str:
        return (
            f"LIDC(root={str(self.root)!r}, format={self.format!r}, split={self.split!r}, slices={len(self)}, "
            f"patients={len(self.patients)}, annotators={self.annotators}, crop={self.crop}, size={self.size})"
        )

    def read_pickle_slice(self, case: str, payload: tuple) -> tuple[np.ndarray, np.ndarray]:
        image, masks = payload
        image = np.asarray(image, dtype=np.float32)[None]
        if not np.isfinite(image).all():
            raise DiffSegError(f"{case}: image holds NaN or infinite values")
        out = []
        for k, mask in enumerate(masks):
            raw = np.asarray(mask)
            raw = raw.astype(np.uint8) if raw.dtype == bool else raw
            self.note_labels(raw)
            self.check_labels(raw, {0, 1}, f"{case} (annotator {k})", "expected binary mask values")
            out.append(raw > 0)
        return image, np.stack(out)

    def read_png_slice(self, payload: tuple) -> tuple[np.ndarray, np.ndarray]:
        image_path, gt_paths = payload
        image = check_channels(read_image(image_path), self.channels, image_path)
        out = []
        for path in gt_paths:
            values, lossy = read_mask_file(path)
            self.note_labels(values)
            check_same_size(path, values.shape[:2], image_path, image.shape)
            out.append(mask_foreground(values, "binary", path, lossy, owner="LIDC"))
        return image, np.stack(out)

    def __getitem__(self, index: int) -> dict:
        case, patient, payload = self.slices[index]
        if self.format == "pickle":
            image, masks = self.read_pickle_slice(case, payload)
        else:
            image, masks = self.read_png_slice(payload)
        stored = image.shape[-2:]
        image, offset = center_crop(image, self.crop)
        masks, _ = center_crop(masks, self.crop)
        masks_t = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32))
        majority = (masks_t.sum(0, keepdim=True) * 2 > masks_t.shape[0]).float()  # more than half
        return {
            "image": resize(torch.from_numpy(np.ascontiguousarray(image)), self.size, "bilinear"),
            "mask": resize(majority, self.size, "nearest"),
            "masks": resize(masks_t, self.size, "nearest"),
            "case": case,
            "patient": patient,
            "index": torch.tensor(index),
            "original_size": torch.tensor(stored),
            "crop_offset": torch.tensor(offset),
        }


__all__ = ["LIDC", "center_crop", "clear_pickle_cache", "load_pickles"]
