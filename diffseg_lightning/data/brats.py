"""BraTS brain-tumour MRI in its official layouts (2021 and 2023-GLI naming), as 2D axial slices.

Datasets: Baid et al., "The RSNA-ASNR-MICCAI BraTS 2021 Benchmark on Brain Tumor Segmentation and
Radiogenomic Classification", arXiv:2107.02314, 2021; Menze et al., "The Multimodal Brain Tumor Image
Segmentation Benchmark (BRATS)", IEEE TMI 2015; Bakas et al., "Advancing The Cancer Genome Atlas glioma MRI
collections with expert segmentation labels and radiomic features", Scientific Data 2017. BraTS 2023 adult
glioma (GLI) is the 2021 cohort re-released with new names (Karargyris et al. / the BraTS 2023 organisers).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from diffseg_lightning.data.base import CaseDataset, split_message
from diffseg_lightning.data.splits import check_fold, check_fractions, check_split, seeded_split
from diffseg_lightning.data.transforms import as_size, resize
from diffseg_lightning.io.files import NIFTI_SUFFIXES
from diffseg_lightning.io.volumes import check_same_grid, read_nifti_data
from diffseg_lightning.utils.errors import ConfigError, DiffSegError

NAMINGS = ("auto", "2021", "2023")
TARGETS = ("wt", "tc", "et", "regions", "classes")
EMPTY_POLICIES = ("keep", "drop")
INTENSITIES = ("brain_zscore", "none")
MODALITIES = ("t1", "t1ce", "t2", "flair")  # the canonical names (BraTS 2021 spelling)
DEFAULT_MODALITIES = MODALITIES  # channel order of the image: t1, t1ce, t2, flair
ALIASES = {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair"}  # BraTS 2023 names -> canonical

# Per naming: how a file is named from its case folder, the file suffix of each modality, the label values
# the year's release uses, and the enhancing-tumour label (4 in 2021, 3 from 2023 on).
SCHEMES = {
    "2021": {
        "sep": "_",
        "files": {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"},
        "labels": (0, 1, 2, 4),
        "et": 4,
    },
    "2023": {
        "sep": "-",
        "files": {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"},
        "labels": (0, 1, 2, 3),
        "et": 3,
    },
}
CASE_NAME = re.compile(r"^brats", re.IGNORECASE)
# BraTS 2023+ folder names end in a timepoint: BraTS-GLI-00000-000, -001 are one patient.
PATIENT_NAME = re.compile(r"^(brats-[a-z]+-\d+)-\d+$", re.IGNORECASE)

# Label bits of the per-slice presence summary: NCR (label 1), ED (label 2), ET (label 4 or 3).
NCR, ED, ET = 1, 2, 4
TARGET_BITS = {
    "wt": NCR | ED | ET,
    "tc": NCR | ET,
    "et": ET,
    "regions": NCR | ED | ET,
    "classes": NCR | ED | ET,
}

# Per-slice label presence of a seg volume, memoised for the process by (path, size, mtime): the train,
# val and test datasets, and a dataset built again (a sweep, a re-run of setup), decode each seg once.
_PRESENCE: dict[tuple[str, int, int], np.ndarray] = {}


def canonical_modality(name: str) -> str:
    """``t1`` / ``t1ce`` / ``t2`` / ``flair`` for a 2021 or 2023 modality name, else a ``ValueError``."""
    key = str(name).lower()
    key = ALIASES.get(key, key)
    if key not in MODALITIES:
        names = ", ".join((*MODALITIES, *ALIASES))
        raise ConfigError(f"unknown BraTS modality {name!r}; expected one of {names}")
    return key


def target_channels(target: str) -> int:
    """Mask channels of a target: 1 for ``wt`` / ``tc`` / ``et``, 3 for ``regions`` and ``classes``."""
    return 3 if target in ("regions", "classes") else 1


def split_case(case: str) -> tuple[str, int]:
    """``(case folder, slice)`` of an item's ``case`` string ``<case folder>#<slice>``."""
    folder, _, number = case.rpartition("#")
    return folder, int(number)


def patient_id(case_name: str) -> str:
    """The patient of a case folder: ``BraTS-GLI-00000`` for ``BraTS-GLI-00000-001``, else the name itself."""
    match = PATIENT_NAME.match(case_name)
    return match.group(1) if match else case_name


def _find(case_dir: Path, stem: str) -> Path | None:
    for ending in NIFTI_SUFFIXES:
        path = case_dir / f"{stem}{ending}"
        if path.is_file():
            return path
    return None


def _detect_naming(case_dir: Path, names: set[str]) -> str | None:
    """The naming a case folder's files follow: the scheme with more of its files present (None: no file)."""
    counts = {}
    for year, scheme in SCHEMES.items():
        stems = {f"{case_dir.name}{scheme['sep']}{suffix}" for suffix in scheme["files"].values()}
        counts[year] = sum(any(f"{s}{e}" in names for e in NIFTI_SUFFIXES) for s in stems)
    best = max(counts, key=counts.get)
    if counts[best] == 0:
        return None
    if counts["2021"] == counts["2023"]:  # as many files of each scheme: the folder name decides
        return "2023" if case_dir.name.lower().startswith("brats-") else "2021"
    return best


def slice_presence(seg: np.ndarray, et_label: int) -> np.ndarray:
    """Per axial slice, the bits (``NCR | ED | ET``) of the tumour labels present: (H, W, D) -> (D,) uint8."""
    bits = np.zeros(seg.shape[-1], np.uint8)
    for value, bit in ((1, NCR), (2, ED), (et_label, ET)):
        bits |= np.where((seg == value).any(axis=(0, 1)), bit, 0).astype(np.uint8)
    return bits


class BraTS(CaseDataset):
    """BraTS multi-modal brain MRI (2021, and 2023 GLI naming) as 2D axial slices with tumour-region masks.

    Datasets: Baid et al., arXiv:2107.02314 (BraTS 2021: 1251 labelled training cases); Menze et al., IEEE
    TMI 2015; Bakas et al., Scientific Data 2017.

    Official layout, read as it is (``root`` holds one folder per case; a folder holding exactly one such
    release folder, e.g. the parent of ``BraTS2021_Training_Data``, works too)::

        BraTS 2021:      <root>/BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz
        BraTS 2023 GLI:  <root>/BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz

    Volumes are 240 x 240 x 155 at 1 mm, co-registered, skull-stripped (background exactly 0). The naming
    is detected per case folder (``naming="auto"``: the scheme whose file names are present; BraTS 2020's
    ``BraTS20_Training_001_flair.nii.gz`` follows the 2021 scheme) or forced (``"2021"`` / ``"2023"``).
    2023 modalities map to the 2021 names: t1n = t1, t1c = t1ce, t2w = t2, t2f = flair. ``.nii`` files
    are accepted beside ``.nii.gz``.

    Labels: 2021: 0 background, 1 necrotic / non-enhancing core (NCR), 2 peritumoural edema (ED), 4
    enhancing tumour (ET); 2023: the same with ET = 3. Any other value (e.g. a 3 in a 2021-named seg) is an
    error naming the file. Targets (``target``):
        ``wt`` whole tumour (1, 2, ET), ``tc`` tumour core (1, ET), ``et`` enhancing tumour (ET), each one
        channel; ``regions`` the three nested regions (WT, TC, ET) as 3 channels (the challenge's
        evaluation regions); ``classes`` the three labels one-hot (NCR, ED, ET), 3 channels.

    Image: the ``modalities`` stacked on the channel axis in the given order, default
    ``[t1, t1ce, t2, flair]`` (``channels`` = their number; 2023 names are accepted too).
    Intensities (``intensity``): ``brain_zscore`` (default) z-scores each modality of each case over its
    brain voxels (the voxels > 0 of that modality, over the whole 3D volume, not per slice, so every slice
    of a case shares one scale; nnU-Net's MR normalisation restricted to the brain), and every voxel <= 0
    (the background) is 0; a modality with no brain voxel stays all 0, one with a constant brain is only
    centred. Set ``normalize: none`` in the data config so the DataModule does not z-score again.
    ``none`` returns the stored values.

    Slices: the last array axis (155 axial slices), taken as ``array[:, :, k]`` with no reorientation (H =
    array axis 0, W = axis 1), the same for the image and the label. ``slice_range = [lo, hi]`` keeps
    slices lo <= k < hi (default None: all). ``[80, 129]`` drops the lowest 80 and the top 26 slices, the
    exclusion Wolleb et al. (MICCAI 2022) describe for their 2D BraTS slices; the sample slices of that
    preprocessing in MedSegDiff's repository are numbered from 080 (checked), the exclusion itself is not
    stated in the BerDiff / MedSegDiff papers, so it is an option, not the default.
    ``empty_slices``: ``keep`` every slice of the range (the default; MedSegDiff's released 3D loader reads
    all 155 slices of every volume and merges the labels into one whole-tumour mask, i.e. ``target=wt``),
    or ``drop`` the slices whose target is empty (no voxel of the target's
    labels), keeping a seeded ``empty_fraction`` of them (default 0: none); which ones is drawn per case by
    ``numpy.random.default_rng([seed, crc32(case name)])``, so it does not depend on the split. ``drop``
    needs every seg volume of the split when the dataset is built: measured on a full-size 240 x 240 x 155
    replica, decoding one seg takes 8 ms and the per-slice label summary 1.4 ms, about 12 s for the 1251
    cases, so the summary (which labels each slice holds) is computed at init, only under ``drop``, and
    memoised for the process by file path, size and mtime (train / val / test and a rebuilt dataset share
    it). ``keep`` reads only the headers at init.

    Alignment: the slices are taken as stored, so every file of a case must lie on one voxel grid: the
    headers of the modalities and the seg are checked at init (shape, orientation codes, voxel spacing and
    affine, to 1e-3 of a voxel: :func:`~diffseg_lightning.io.volumes.check_same_grid`), and a case whose
    seg is stored flipped or at another spacing is a bad case naming both files. Reading and checking the five headers
    takes 3 ms per case on a full-size replica (measured), 4 s for the 1251 cases.

    Size: ``crop`` centre-crops each slice (default 224: 240 -> 224, rows and columns 8 .. 231; BerDiff
    reports 224 x 224 BraTS inputs, and MedSegDiff's released 2D BraTS loader crops ``[8:-8, 8:-8]``; None
    keeps 240), then ``size`` resizes (bilinear image, nearest mask;
    None keeps the crop). ``original_size`` is the stored (H, W) and ``crop_box`` (top, left, height,
    width) the crop in it, so a prediction can be put back in place.

    Splits (no official labelled validation or test set exists: the challenge withholds their labels): a
    seeded split by patient (:func:`seeded_split` over the sorted patient ids; ``fractions`` train / val /
    test, default 0.7 / 0.1 / 0.2, or ``folds`` = k for k-fold cross-validation). A patient is a case folder,
    except that 2023-style names ending in a timepoint (``BraTS-GLI-00000-000``, ``-001``) share the patient
    ``BraTS-GLI-00000``, so the timepoints of one patient never straddle splits (:func:`patient_id`). The
    split is drawn over every case folder before any file is checked, so a broken case never moves the
    others between splits; only the split's own cases are then checked. Every slice of a case stays in its
    split.

    Reading: a slice of a ``.nii.gz`` needs the whole volume decoded, so the last case read (its stacked
    modalities, label volume and intensity statistics) stays in memory, and consecutive slices of one
    case (val / test order) cost one decode. A shuffled training order decodes a case per item: use the
    DataModule's ``cache_dir`` (memory-mapped items).

    Items:
        ``image`` (C, H, W) float32; ``mask`` (1 or 3, H, W) float32 in {0, 1}; ``case`` (str,
        ``<case folder>#<slice>``, see :func:`split_case`); ``slice`` int64 (the axial slice);
        ``num_slices`` int64 (the case's number of axial slices, 155); ``index``; ``original_size`` (2,) the
        stored (H, W); ``crop_box`` (4,) int64; ``spacing`` (2,) float32, the pixel spacing of the returned
        arrays (header pixdim of the first two axes, scaled by crop size / returned size);
        ``original_spacing`` (2,) the header's.

    Args:
        root: the folder holding the case folders (or a folder holding exactly one such folder).
        split: ``train``, ``val`` or ``test``.
        naming: ``auto``, ``2021`` or ``2023``.
        modalities: the image channels, in order (2021 or 2023 names).
        target: ``wt``, ``tc``, ``et``, ``regions`` or ``classes``.
        crop: centre crop (H, W) or one int; None: no crop.
        size: resize target (H, W) or one int after the crop; None keeps the crop size.
        slice_range: ``[lo, hi]`` (half-open) of the axial slices; None: all.
        empty_slices: ``keep`` or ``drop``.
        empty_fraction: the share of empty slices kept under ``drop`` (seeded).
        intensity: ``brain_zscore`` or ``none``.
        channels: image channels the config expects (must equal the number of modalities); None: any.
        fractions: train / val / test shares of the cases.
        seed: seed of the split and of the empty-slice draw.
        folds: k for k-fold cross-validation (``fold`` is the test fold), None for ``fractions``.
        fold: the held-out fold.
        on_bad_case: ``error`` or ``skip`` (a case folder that misses a file, has an unreadable header or
            files off one voxel grid is left out and listed in ``skipped``).

    Raises:
        ValueError: for an unknown split, naming, modality, target, policy or intensity option, or a bad crop,
            slice range or fraction.
        DiffSegError: naming the folder or file, for a missing root or no case folder (at init), a case
            without one of its files, with an unreadable header or with volumes off one voxel grid (at init,
            per ``on_bad_case``), and, when an item is read, a truncated file, NaN or infinite voxels, or label
            values outside the year's set.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        naming: str = "auto",
        modalities: Sequence[str] = DEFAULT_MODALITIES,
        target: str = "wt",
        crop: int | Sequence[int] | None = 224,
        size: int | Sequence[int] | None = None,
        slice_range: Sequence[int] | None = None,
        empty_slices: str = "keep",
        empty_fraction: float = 0.0,
        intensity: str = "brain_zscore",
        channels: int | None = 4,
        fractions: Sequence[float] = (0.7, 0.1, 0.2),
        seed: int = 0,
        folds: int | None = None,
        fold: int = 0,
        on_bad_case: str = "error",
    ) -> None:
        super().__init__(on_bad_case)
        self.split = check_split(split)
        self.naming = self._choice("naming", str(naming), NAMINGS)
        self.target = self._choice("target", target, TARGETS)
        self.empty_slices = self._choice("empty_slices", empty_slices, EMPTY_POLICIES)
        self.intensity = self._choice("intensity", intensity, INTENSITIES)
        self.modalities = [canonical_modality(m) for m in modalities]
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ConfigError(f"modalities must be distinct BraTS modalities, got {list(modalities)}")
        if channels is not None and channels != len(self.modalities):
            raise ConfigError(
                f"channels={channels} but {len(self.modalities)} modalities are stacked ({self.modalities}); "
                "data.channels must equal the number of data.modalities"
            )
        if not 0.0 <= float(empty_fraction) <= 1.0:
            raise ConfigError(f"empty_fraction must lie in [0, 1], got {empty_fraction}")
        self.empty_fraction = float(empty_fraction)
        self.slice_range = self._check_range(slice_range)
        self.crop = as_size(crop)
        if self.crop is not None and min(self.crop) <= 0:
            raise ConfigError(f"crop must be positive, got {crop}")
        self.size = as_size(size)
        self.fractions = check_fractions(fractions)
        check_fold(folds, fold)
        self.seed = seed
        self.mask_channels = target_channels(self.target)

        self.root = self.find_root(Path(root).expanduser())
        all_dirs = self.case_folders(self.root)
        patients = sorted({patient_id(d.name) for d in all_dirs})
        chosen = {patients[i] for i in seeded_split(len(patients), self.fractions, seed, split, folds, fold)}

        self.cases: list[dict] = []  # per case: dir, naming, files {modality / seg: path}, shape, spacing
        self.items: list[tuple[int, int]] = []  # (case number, slice)
        for case_dir in all_dirs:
            if patient_id(case_dir.name) not in chosen:
                continue
            case = self.scan_case(case_dir)
            if case is None:
                continue
            slices = self.select_slices(case)
            if slices is None:
                continue
            self.items.extend((len(self.cases), int(k)) for k in slices)
            self.cases.append(case)
        # the last case read: (number, image, labels, stats), or (number, error) when it failed
        self._cached: tuple | None = None

    # ------------------------------------------------------------------------------------------ options
    @staticmethod
    def _choice(name: str, value: str, allowed: Sequence[str]) -> str:
        if value not in allowed:
            raise ConfigError(f"BraTS: {name} must be one of {tuple(allowed)}, got {value!r}")
        return value

    @staticmethod
    def _check_range(slice_range: Sequence[int] | None) -> tuple[int, int] | None:
        if slice_range is None:
            return None
        values = [int(v) for v in slice_range]
        if len(values) != 2 or not 0 <= values[0] < values[1]:
            raise ConfigError(f"slice_range must be [lo, hi] with 0 <= lo < hi, got {list(slice_range)}")
        return values[0], values[1]

    @property
    def case_dirs(self) -> list[Path]:
        """The case folders of this split (sorted by name), without the skipped ones."""
        return [case["dir"] for case in self.cases]

    @property
    def ids(self) -> list[str]:
        """The case folder names of this split."""
        return [case["dir"].name for case in self.cases]

    def __repr__(self) -> str:
        return (
            f"BraTS(root={str(self.root)!r}, split={self.split!r}, cases={len(self.cases)}, slices={len(self)}, "
            f"target={self.target!r}, modalities={self.modalities}, crop={self.crop}, size={self.size})"
        )

    # --------------------------------------------------------------------------------------------- scan
    @staticmethod
    def _is_case(folder: Path) -> bool:
        """A folder named ``BraTS...`` that does not itself hold ``BraTS...`` folders (as a release folder
        such as ``BraTS2021_Training_Data`` does)."""
        return (
            folder.is_dir()
            and CASE_NAME.match(folder.name) is not None
            and not any(p.is_dir() and CASE_NAME.match(p.name) for p in folder.iterdir())
        )

    @classmethod
    def _holds_cases(cls, folder: Path) -> bool:
        return any(cls._is_case(p) for p in folder.iterdir())

    @classmethod
    def find_root(cls, root: Path) -> Path:
        """``root`` when it holds case folders, else its one subfolder that does."""
        if not root.is_dir():
            raise DiffSegError(f"data root {root} does not exist or is not a folder")
        if cls._holds_cases(root):
            return root
        inner = [p for p in sorted(root.iterdir()) if p.is_dir() and cls._holds_cases(p)]
        if len(inner) == 1:
            return inner[0]
        if inner:
            raise DiffSegError(
                f"data root {root}: several folders hold BraTS cases ({', '.join(p.name for p in inner)}); "
                "point data.root at one of them"
            )
        raise DiffSegError(
            f"data root {root}: no BraTS case folders (expected e.g. {root}/BraTS2021_00000/"
            "BraTS2021_00000_t1.nii.gz or BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz)"
        )

    @classmethod
    def case_folders(cls, root: Path) -> list[Path]:
        """The case folders of ``root`` (names starting with ``BraTS``), sorted by name."""
        return sorted(p for p in root.iterdir() if cls._is_case(p))

    def scan_case(self, case_dir: Path) -> dict | None:
        """The files, naming, depth and spacing of one case; a missing file, an unreadable header or files off
        one voxel grid make a bad case (raised or skipped)."""
        names = {p.name for p in case_dir.iterdir() if p.is_file()}
        naming = self.naming if self.naming != "auto" else _detect_naming(case_dir, names)
        if naming is None:
            self.bad_case(
                case_dir,
                f"no BraTS files in the case folder (expected {case_dir.name}_t1.nii.gz ... (2021 naming) "
                f"or {case_dir.name}-t1n.nii.gz ... (2023 naming))",
            )
            return None
        scheme = SCHEMES[naming]
        files = {}
        for key in (*self.modalities, "seg"):
            stem = f"{case_dir.name}{scheme['sep']}{scheme['files'][key]}"
            path = _find(case_dir, stem)
            if path is None:
                what = "segmentation" if key == "seg" else f"modality {key}"
                self.bad_case(
                    case_dir / f"{stem}.nii.gz",
                    f"missing ({what} of case {case_dir.name}, {naming} naming)",
                )
                return None
            files[key] = path
        try:  # headers only: every modality and the seg on one voxel grid (shape, orientation, affine)
            header = check_same_grid(list(files.values()))[-1]
        except DiffSegError as err:
            self.bad_case(*split_message(err))
            return None
        shape = tuple(int(n) for n in header.shape)
        zooms = header.header.get_zooms()
        if len(shape) != 3:
            self.bad_case(files["seg"], f"expected a 3D label volume (H, W, D), found shape {shape}")
            return None
        spacing = (float(zooms[0]), float(zooms[1]))
        if not all(np.isfinite(spacing)) or min(spacing) <= 0:
            self.bad_case(files["seg"], f"header pixel spacing (pixdim) {spacing} is not positive")
            return None
        return {"dir": case_dir, "naming": naming, "files": files, "shape": shape, "spacing": spacing}

    def select_slices(self, case: dict) -> np.ndarray | None:
        """The axial slices of a case under ``slice_range`` and ``empty_slices`` (None: a bad case, skipped)."""
        depth = case["shape"][2]
        lo, hi = self.slice_range or (0, depth)
        slices = np.arange(lo, min(hi, depth))
        if self.empty_slices == "keep" or not len(slices):
            return slices
        try:
            presence = self.presence(case)
        except DiffSegError as err:
            self.bad_case(*split_message(err))
            return None
        empty = (presence[slices] & TARGET_BITS[self.target]) == 0
        kept = slices[~empty]
        if self.empty_fraction > 0 and empty.any():
            pool = slices[empty]
            rng = np.random.default_rng([self.seed, zlib.crc32(case["dir"].name.encode())])
            count = int(round(self.empty_fraction * len(pool)))
            kept = np.sort(np.concatenate([kept, rng.choice(pool, size=count, replace=False)]))
        return kept

    @staticmethod
    def presence(case: dict) -> np.ndarray:
        """Per-slice label bits of a case's seg (see :func:`slice_presence`), memoised for the process."""
        path = case["files"]["seg"]
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in _PRESENCE:
            seg = BraTS.read_volume(path)
            _PRESENCE[key] = slice_presence(seg, SCHEMES[case["naming"]]["et"])
        return _PRESENCE[key]

    # --------------------------------------------------------------------------------------------- read
    @staticmethod
    def read_volume(path: Path) -> np.ndarray:
        """All voxels of a NIfTI volume in their stored dtype (scaled to float when the header says so)."""
        return read_nifti_data(path)

    def read_labels(self, path: Path, naming: str) -> np.ndarray:
        """The label volume as int16, checked against the year's label set (an error names the file)."""
        seg = self.read_volume(path)
        if seg.ndim != 3:
            raise DiffSegError(f"{path}: expected a 3D label volume (H, W, D), found shape {seg.shape}")
        if not np.issubdtype(seg.dtype, np.integer):
            if not np.isfinite(seg).all():
                raise DiffSegError(f"{path}: label volume holds NaN or infinite values")
            if not np.array_equal(seg, np.round(seg)):
                values = np.unique(seg[seg != np.round(seg)])[:5].tolist()
                raise DiffSegError(f"{path}: label values must be integers, found {values}")
        low, high = seg.min(), seg.max()
        if 0 <= low and high < 256:
            present = np.flatnonzero(np.bincount(seg.astype(np.int64, copy=False).ravel(), minlength=1))
        else:
            present = np.unique(seg)
        self.note_labels(present)  # the distinct stored values (the same set as the whole volume's)
        allowed = SCHEMES[naming]["labels"]
        self.check_labels(present, allowed, path, f"BraTS {naming} labels are")
        return seg.astype(np.int16, copy=False)

    def read_case(self, number: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stacked modalities (C, H, W, D), labels (H, W, D) int16 and per-modality (mean, std) (C, 2); the last
        case read is kept."""
        if self._cached is not None and self._cached[0] == number:
            if isinstance(self._cached[1], DiffSegError):  # a bad case is decoded once, not once per slice
                raise DiffSegError(str(self._cached[1]))
            return self._cached[1:]
        try:
            out = self._read_case(number)
        except DiffSegError as err:
            self._cached = (number, err)
            raise
        self._cached = (number, *out)
        return out

    def _read_case(self, number: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        case = self.cases[number]
        files = case["files"]
        labels = self.read_labels(files["seg"], case["naming"])
        volumes = []
        for modality in self.modalities:  # their shapes and grids were checked against the seg's at scan
            path = files[modality]
            volume = self.read_volume(path)
            if not np.issubdtype(volume.dtype, np.integer) and not np.isfinite(volume).all():
                raise DiffSegError(f"{path}: image holds NaN or infinite values")
            volumes.append(volume)
        dtype = np.result_type(*volumes)
        image = np.stack(volumes).astype(
            dtype if np.issubdtype(dtype, np.integer) else np.float32, copy=False
        )
        stats = np.zeros((len(volumes), 2), np.float64)
        stats[:, 1] = 1.0
        if self.intensity == "brain_zscore":
            for c, volume in enumerate(image):  # one pass per modality (4), over its 3D volume
                brain = volume[volume > 0].astype(np.float64)
                if brain.size:
                    std = brain.std()
                    stats[c] = brain.mean(), std if std > 0 else 1.0
        return image, labels, stats

    def target_mask(self, labels: np.ndarray, naming: str) -> np.ndarray:
        """(H, W) labels -> (1 or 3, H, W) float32 in {0, 1} for ``target`` (see the class docstring)."""
        et = SCHEMES[naming]["et"]
        groups = {
            "wt": [(1, 2, et)],
            "tc": [(1, et)],
            "et": [(et,)],
            "regions": [(1, 2, et), (1, et), (et,)],
            "classes": [(1,), (2,), (et,)],
        }[self.target]
        return np.stack([np.isin(labels, group) for group in groups]).astype(np.float32)

    def _crop_box(self, height: int, width: int, path: Path) -> tuple[int, int, int, int]:
        if self.crop is None:
            return 0, 0, height, width
        ch, cw = self.crop
        if ch > height or cw > width:
            raise DiffSegError(f"{path}: crop {self.crop} exceeds the stored slice size {(height, width)}")
        return (height - ch) // 2, (width - cw) // 2, ch, cw

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        number, k = self.items[index]
        case = self.cases[number]
        image, labels, stats = self.read_case(number)
        height, width = labels.shape[:2]
        top, left, ch, cw = self._crop_box(height, width, case["files"]["seg"])
        window = (slice(top, top + ch), slice(left, left + cw))
        plane = image[:, window[0], window[1], k].astype(np.float32)
        if self.intensity == "brain_zscore":
            mean = stats[:, 0, None, None].astype(np.float32)
            std = stats[:, 1, None, None].astype(np.float32)
            plane = np.where(plane > 0, (plane - mean) / std, np.float32(0.0))
        mask = self.target_mask(labels[window[0], window[1], k], case["naming"])
        out_image = resize(torch.from_numpy(np.ascontiguousarray(plane)), self.size, "bilinear")
        original_spacing = torch.tensor(case["spacing"], dtype=torch.float32)
        scale = torch.tensor([ch, cw], dtype=torch.float32) / torch.tensor(
            out_image.shape[-2:], dtype=torch.float32
        )
        return {
            "image": out_image,
            "mask": resize(torch.from_numpy(mask), self.size, "nearest"),
            "case": f"{case['dir']}#{k:03d}",
            "slice": torch.tensor(k),
            "num_slices": torch.tensor(case["shape"][2]),
            "index": torch.tensor(index),
            "original_size": torch.tensor([height, width]),
            "crop_box": torch.tensor([top, left, ch, cw]),
            "spacing": original_spacing * scale,
            "original_spacing": original_spacing,
        }


__all__ = [
    "DEFAULT_MODALITIES",
    "MODALITIES",
    "TARGETS",
    "BraTS",
    "canonical_modality",
    "patient_id",
    "split_case",
    "target_channels",
]
