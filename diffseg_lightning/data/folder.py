"""Generic image folders: a paired 2D ``images/`` + ``masks/`` layout, and an unlabelled folder (2D images and
NIfTI files) for predict."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from diffseg_lightning.data.base import CaseDataset
from diffseg_lightning.data.masks import (
    Foreground,
    broken_link,
    check_foreground,
    mask_foreground,
    read_mask_file,
    unreadable,
)
from diffseg_lightning.data.splits import check_fractions, seeded_split
from diffseg_lightning.exceptions import read_all
from diffseg_lightning.utils.errors import ConfigError, DiffSegError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
PREDICT_SUFFIXES = IMAGE_SUFFIXES + NIFTI_SUFFIXES
CONVERTED_MODES = ("P", "CMYK", "YCbCr")  # read as RGB
SPLITS = ("train", "val", "test")


def read_image(path: Path) -> np.ndarray:
    """Read a 2D image file as float32 (C, H, W), with a clear error naming the file when it cannot be read."""
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB") if img.mode in CONVERTED_MODES else img)
    except (UnidentifiedImageError, OSError) as err:
        raise unreadable(path, err) from None
    return channels_first(array.astype(np.float32))


def check_channels(image: np.ndarray, channels: int | None, path: Path) -> np.ndarray:
    """Raise, naming the file, when an image's channel count is not the configured one."""
    if channels is not None and image.shape[0] != channels:
        raise DiffSegError(f"{path}: image has {image.shape[0]} channel(s) but the config expects {channels}")
    return image


def resize(image: torch.Tensor, size: Sequence[int] | None, mode: str) -> torch.Tensor:
    """Resize (C, H, W) to ``size`` (bilinear for images, nearest for masks); None keeps the size.

    Bilinear resizing is antialiased (a triangle filter as wide as the scale factor when shrinking, like
    PIL's and OpenCV's INTER_AREA-like resampling): without it, shrinking a 2000 px image to 128 px samples
    4 of every 16 pixels and aliases fine texture (17-39 grey levels off on ISIC-like texture, measured
    against an area average). Nearest keeps label values exact.
    """
    if size is None or tuple(image.shape[-2:]) == tuple(size):
        return image
    kwargs = {"align_corners": False, "antialias": True} if mode == "bilinear" else {}
    return F.interpolate(image[None], size=tuple(size), mode=mode, **kwargs)[0]


def list_images(folder: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Path]:
    """The files of ``folder`` with one of ``suffixes`` (any case), sorted by name, broken symbolic links
    included (so that the caller reports them: :func:`~diffseg_lightning.data.masks.broken_link`).

    Raises:
        DiffSegError: when the folder is missing or holds no such file.
    """
    if not folder.is_dir():
        raise DiffSegError(f"data root {folder} does not exist or is not a folder")
    files = sorted(
        p
        for p in folder.iterdir()
        if (p.is_file() or broken_link(p)) and p.name.lower().endswith(tuple(suffixes))
    )
    if not files:
        raise DiffSegError(f"{folder} holds no images ({', '.join(suffixes)})")
    return files


def same_stems(paths: Sequence[Path]) -> dict[Path, Path]:
    """``{path: another path of the same stem}`` for every path of ``paths`` whose stem is not unique.

    Two files of one stem (``a.png`` and ``a.jpg``) are one case stored twice: paired by stem, both would
    take the same partner file and could land in different splits.
    """
    groups: dict[str, list[Path]] = {}
    for path in paths:
        groups.setdefault(file_stem(path), []).append(path)
    return {p: next(q for q in group if q != p) for group in groups.values() if len(group) > 1 for p in group}


def as_size(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def is_nifti(path: str | Path) -> bool:
    """True for ``.nii`` and ``.nii.gz`` files."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def file_stem(path: str | Path) -> str:
    """The name without its image suffix: ``a.png`` -> ``a``, ``b.nii.gz`` -> ``b``."""
    name = Path(path).name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else Path(name).stem


def channels_first(array: np.ndarray) -> np.ndarray:
    """(H, W) -> (1, H, W); (H, W, C) -> (C, H, W)."""
    return array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)


def nifti_layout(shape: Sequence[int], channels: int | None) -> tuple[int, int]:
    """``(slices, channels)`` of a NIfTI array shape; 0 slices means one 2D image.

    (H, W): one single-channel image. (H, W, C) with C equal to the model's ``channels``: one
    C-channel image (so (H, W, 1) is a 2D image for a one-channel model). (H, W, D) with any other D:
    a volume of D single-channel axial slices (the last axis). (H, W, D, C): D slices of C channels.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) not in (2, 3, 4) or 0 in shape:
        raise DiffSegError(f"NIfTI of shape {shape} is not a 2D image or a 3D volume")
    if len(shape) == 2:
        return 0, 1
    if len(shape) == 3:
        return (0, shape[2]) if shape[2] == channels else (shape[2], 1)
    return shape[2], shape[3]


def read_nifti_item(path: Path, slice_index: int = -1) -> np.ndarray:
    """One item of a NIfTI file as float32 (C, H, W): the whole 2D image (-1) or axial slice ``slice_index``."""
    proxy = nib.load(path).dataobj
    return channels_first(
        np.asarray(proxy if slice_index < 0 else proxy[:, :, slice_index], dtype=np.float32)
    )


def _reason(err: Exception, path: Path) -> str:
    """Why a file cannot be used, without its path (the report names it)."""
    if isinstance(err, DiffSegError):
        return str(err).removeprefix(f"{path}: ")
    return f"not a readable image ({type(err).__name__}: {err})"


def describe_skipped(skipped: Sequence[tuple[str | Path, str]]) -> str:
    """``skipped 2 file(s): a.png (reason), b.nii.gz (reason)``."""
    return f"skipped {len(skipped)} file(s): " + ", ".join(f"{Path(p).name} ({why})" for p, why in skipped)


def nothing_usable(folder: str | Path, skipped: Sequence[tuple[str | Path, str]]) -> DiffSegError:
    """The error when no file of ``folder`` can be predicted; it names each file as ``name: reason``."""
    reasons = "; ".join(f"{Path(p).name}: {why}" for p, why in skipped)
    return DiffSegError(f"no usable image in {folder} ({len(skipped)} file(s) skipped): {reasons}")


def locate_root(root: str | Path, folder: str, marker: str) -> Path:
    """The dataset folder: ``root/folder`` when it exists, else ``root`` itself when it holds ``marker``.

    Args:
        root: the folder the user gave (the one holding ``folder``, or ``folder`` itself).
        folder: the dataset's own folder name, e.g. ``Kvasir-SEG``.
        marker: a file or folder inside ``folder`` that identifies it, e.g. ``images``.

    Raises:
        DiffSegError: naming ``root`` and the layout expected when neither matches.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DiffSegError(f"data root {root} does not exist or is not a folder")
    if (root / folder / marker).exists():
        return root / folder
    if (root / marker).exists():
        return root
    if (root / folder).is_dir():  # the dataset folder, incomplete: the loader names the missing file
        return root / folder
    raise DiffSegError(
        f"data root {root}: expected {root / folder / marker} (or data.root pointing at the {folder} folder "
        f"itself, holding {marker})"
    )


def read_label_map(path: Path) -> np.ndarray:
    """A label image as stored, (H, W): grey values, or the palette INDICES of a palette ("P") image.

    Unlike :func:`~diffseg_lightning.data.folder.read_image`, a palette image is not converted to RGB, so a
    GIF whose indices are 0/1 (DRIVE's second observer) reads as 0/1, and instance ids stay ids. An RGB(A)
    file is accepted only when its colour channels are equal (grey stored as colour).

    Raises:
        DiffSegError: naming the file when it cannot be read or holds colour.
    """
    try:
        with Image.open(path) as img:
            array = np.asarray(img)
            mode = img.mode
    except (UnidentifiedImageError, OSError) as err:
        raise unreadable(path, err) from None
    return grey_channel(array, path, f"expected a grey or palette label image, found colour ({mode})")


def grey_channel(array: np.ndarray, path: Path, colour_error: str) -> np.ndarray:
    """(H, W) as it is, or the first channel of (H, W, C) grey stored as colour (its first three channels
    equal); true colour raises ``DiffSegError`` ``<path>: <colour_error>``."""
    if array.ndim == 3:
        colour = array[..., :3]
        if not (
            np.array_equal(colour[..., 0], colour[..., 1]) and np.array_equal(colour[..., 0], colour[..., 2])
        ):
            raise DiffSegError(f"{path}: {colour_error}")
        array = colour[..., 0]
    return array


def read_grey(path: Path) -> np.ndarray:
    """A label image's grey VALUES as uint8 (H, W), however the file stores them.

    An 8-bit BMP always carries a colour table: PIL reads it as "L" when that table is the identity grey
    ramp, but as "P" (palette INDICES) otherwise, e.g. a 3-entry table [0, 128, 255] gives indices 0, 1, 2.
    So palette images are looked up in their palette here (unlike
    :func:`read_label_map`, which keeps indices on purpose), "1" images
    become 0 / 255, and RGB(A) is accepted when its colour channels are equal.

    Raises:
        DiffSegError: naming the file when it is missing, unreadable, holds colour or more than 8 bits.
    """
    try:
        with Image.open(path) as img:
            if img.mode in ("P", "PA", "1"):
                img = img.convert("RGB")
            array = np.asarray(img)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise unreadable(path, err) from None
    array = grey_channel(array, path, "expected a grey label image, found colour")
    if array.dtype != np.uint8:
        raise DiffSegError(f"{path}: expected an 8-bit grey label image, found {array.dtype}")
    return array


def check_same_size(
    mask_path: Path, mask_shape: Sequence[int], image_path: Path, image_shape: Sequence[int]
) -> None:
    """Raise, naming the mask, when its (H, W) differs from the image's."""
    if tuple(mask_shape[-2:]) != tuple(image_shape[-2:]):
        raise DiffSegError(
            f"{mask_path}: mask size {tuple(mask_shape[-2:])} (H, W) differs from the size "
            f"{tuple(image_shape[-2:])} of its image {image_path.name}"
        )


class ImageFolder(Dataset):
    """Every image in one folder, unlabelled, for ``diffseg-predict``: 2D image files and NIfTI files.

    2D files (png, jpg, bmp, tif, gif) are one item each. A NIfTI file (``.nii``, ``.nii.gz``) is one
    item when it holds a 2D image, and one item per axial slice (its last spatial axis) when it holds a
    3D volume; see :func:`nifti_layout` for how its shape is read.

    Every file is checked when the dataset is built, from its header (and, for PNG, the chunk
    checksums), so that an unreadable file, a broken symbolic link, one with the wrong channel count, and one
    whose outputs would overwrite those of a file earlier in name order (same stem) never reach the
    DataLoader: they are listed in ``skipped`` as ``(path, reason)``. A file that passes this check but fails when its pixels are read
    (truncated data, NaN / inf values) gives an all-zero item whose ``error`` names the reason, so one bad
    file does not end a run; :class:`~diffseg_lightning.callbacks.MaskWriter` reports and skips it.

    Items: ``image`` (C, H, W) resized to ``size``, ``case`` (the file path), ``index``, ``slice`` (the
    axial slice, -1 for a 2D image), ``num_slices`` (0 for a 2D image), ``original_size`` (2,) so
    predictions can be resized back, and ``error`` ("" when the item was read).

    Args:
        root: the folder (not searched recursively).
        size: resize target (H, W) or one int; None keeps each file's size.
        channels: the model's image channels; None accepts any count.

    Raises:
        DiffSegError: when the folder is missing, holds no image files, or none of them is usable.
    """

    def __init__(
        self, root: str | Path, size: int | Sequence[int] | None = 64, channels: int | None = None
    ) -> None:
        self.root = Path(root)
        self.size = as_size(size)
        self.channels = channels
        self.skipped: list[tuple[Path, str]] = []
        self.files: list[Path] = []
        self.items: list[tuple[Path, int]] = []
        self.num_slices: dict[Path, int] = {}
        self.shapes: dict[Path, tuple[int, int]] = {}
        self._volume: tuple[Path, np.ndarray] | None = None  # the last volume read, for its next slices
        stems: dict[str, Path] = {}
        for path in list_images(self.root, PREDICT_SUFFIXES):
            try:
                link = broken_link(path)
                if link:
                    raise DiffSegError(link)
                if file_stem(path) in stems:
                    raise DiffSegError(f"same output names as {stems[file_stem(path)].name}")
                height, width, slices = self.inspect(path)
            except Exception as err:  # any failure to read a header means: skip this file, say why
                self.skipped.append((path, _reason(err, path)))
                continue
            stems[file_stem(path)] = path
            self.files.append(path)
            self.shapes[path], self.num_slices[path] = (height, width), slices
            self.items.extend((path, k) for k in (range(slices) if slices else [-1]))
        if not self.items:
            raise nothing_usable(self.root, self.skipped)

    def inspect(self, path: Path) -> tuple[int, int, int]:
        """``(height, width, slices)`` from a file's header; raises when the file cannot be used."""
        if is_nifti(path):
            shape = nib.load(path).shape
            slices, channels = nifti_layout(shape, self.channels)
            height, width = shape[:2]
        else:
            with Image.open(path) as img:
                channels = 3 if img.mode in CONVERTED_MODES else len(img.getbands())
                width, height = img.size
                img.verify()
            slices = 0
        if self.channels is not None and channels != self.channels:
            raise DiffSegError(f"image has {channels} channel(s) but the config expects {self.channels}")
        return int(height), int(width), slices

    def read(self, path: Path, slice_index: int) -> np.ndarray:
        """Float32 (C, H, W) of one item, checked for its channel count and finite values."""
        if not is_nifti(path):
            image = read_image(path)
        elif slice_index < 0:
            image = read_nifti_item(path)
        else:
            if self._volume is None or self._volume[0] != path:
                self._volume = (path, np.asarray(nib.load(path).dataobj, dtype=np.float32))
            image = channels_first(self._volume[1][:, :, slice_index])
        check_channels(image, self.channels, path)
        if not np.isfinite(image).all():
            raise DiffSegError(f"{path}: image holds NaN or infinite values")
        return image

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        path, slice_index = self.items[index]
        error = ""
        try:
            image = self.read(path, slice_index)
        except Exception as err:  # reported by the writer; the other items go on
            error = _reason(err, path)
            image = np.zeros((self.channels or 1, *self.shapes[path]), np.float32)
        image = torch.from_numpy(np.ascontiguousarray(image))
        return {
            "image": resize(image, self.size, "bilinear"),
            "case": str(path),
            "index": torch.tensor(index),
            "slice": torch.tensor(slice_index),
            "num_slices": torch.tensor(self.num_slices[path]),
            "original_size": torch.tensor(image.shape[-2:]),
            "error": error,
        }


class PairedFolder(CaseDataset):
    """``root/images/<name>.<ext>`` with ``root/masks/<name>.<ext>`` (same stem), split by a seeded shuffle.

    Mask values: ``foreground`` says which stored values are foreground (the rule of
    :mod:`~diffseg_lightning.data.masks`): ``binary`` (default) accepts exactly 0/1 and 0/255 masks (JPEG
    masks with tolerance bands for their compression noise) and makes any other mask an error naming the
    file, its values and the setting to choose; a value (``2``) or a list of values (``[1, 2]``, labels of a
    multi-class map that form the foreground); ``nonzero`` (every value but 0; for a colour mask, every
    non-black pixel). Grey stored as RGB is grey; true colour is an error unless ``nonzero``. The values
    are checked when an item is read, so the DataModule's check pass (and ``diffseg-check-data``) reports a
    misfit mask as a problem of its file before training. ``seen_labels`` collects the stored mask values
    read (every channel).

    Split: :func:`~diffseg_lightning.data.splits.seeded_split` of the images sorted by name (their masks
    present or not), by ``fractions``; with ``folds`` = k, ``test`` is fold ``fold`` of a seeded k-fold and
    the other folds are split into train / val by ``fractions[0] : fractions[1]``.

    Bad cases: images without a mask are an error naming the ``masks`` folder, their count and the first
    of them (whatever their split); so are two images of one stem (``a.png`` and ``a.jpg``: one case
    stored twice, which would fall into two splits) or two masks of one stem (which one is meant is
    unclear), naming both files, and a broken symbolic link in ``images/`` or ``masks/``, naming the link
    and its target. Under ``on_bad_case="skip"`` each such image is left out of its split instead and
    listed in ``skipped`` (by the dataset of that split only).

    Items: ``image`` float32 (C, H, W), bilinear to ``size``; ``mask`` float32 (1, H, W) in {0, 1},
    nearest; ``case`` (str, the image path); ``index``; ``original_size`` int64 (2,) the stored (H, W).

    Args:
        root: folder holding ``images/`` and ``masks/``.
        split: ``train``, ``val`` or ``test``.
        fractions: train / val / test shares of the sorted, seed-shuffled cases.
        size: resize target (H, W) or one int; None keeps each file's size.
        seed: shuffle seed of the split.
        channels: expected image channels (an image with another count is an error naming it).
        on_bad_case: ``error`` or ``skip`` (see Bad cases).
        folds: k for k-fold cross-validation (None: the fraction split).
        fold: the held-out fold, 0 .. k - 1.
        foreground: which mask values are foreground (see Mask values).

    Raises:
        ConfigError: for a ``foreground`` that is not one of the rules above.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        fractions: Sequence[float] = (0.7, 0.15, 0.15),
        size: int | Sequence[int] | None = 64,
        seed: int = 0,
        channels: int | None = None,
        on_bad_case: str = "error",
        folds: int | None = None,
        fold: int = 0,
        foreground: Foreground | float | Sequence[float] = "binary",
    ) -> None:
        super().__init__(on_bad_case)
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
        check_fractions(fractions)
        self.foreground = check_foreground(foreground)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DiffSegError(f"data root {self.root} does not exist or is not a folder")
        images = list_images(self.root / "images")
        mask_files = list_images(self.root / "masks")
        masks = {file_stem(p): p for p in mask_files}
        problems = self.pair_problems(images, masks, same_stems(images), same_stems(mask_files))
        if problems and self.on_bad_case == "error":  # whatever split the image is in
            missing = [images[i].name for i, (_, why) in problems.items() if why.startswith("no mask")]
            others = [problem for problem in problems.values() if not problem[1].startswith("no mask")]
            if others:
                self.bad_case(*others[0])
            self.bad_case(self.root / "masks", f"no mask for {len(missing)} image(s), e.g. {missing[0]}")
        self.pairs: list[tuple[Path, Path]] = []
        for i in seeded_split(len(images), fractions, seed, split, folds, fold):
            if i in problems:
                self.bad_case(*problems[i])
            else:
                self.pairs.append((images[i], masks[file_stem(images[i])]))
        self.size = as_size(size)
        self.channels = channels
        self.folds, self.fold = folds, fold

    def pair_problems(
        self,
        images: Sequence[Path],
        masks: dict[str, Path],
        twin_images: dict[Path, Path],
        twin_masks: dict[Path, Path],
    ) -> dict[int, tuple[Path, str]]:
        """``{image number: (where, reason)}`` of every image that cannot be paired with one mask."""
        problems = {}
        for i, image in enumerate(images):
            mask = masks.get(file_stem(image))
            if broken_link(image):
                problems[i] = (image, broken_link(image))
            elif image in twin_images:
                problems[i] = (
                    image,
                    f"{twin_images[image].name} has the same stem: one case stored twice would pair with one "
                    "mask and could fall into two splits; keep one of them",
                )
            elif mask is None:
                problems[i] = (image, f"no mask; expected {self.root / 'masks' / file_stem(image)}.<ext>")
            elif mask in twin_masks:
                why = f"{twin_masks[mask].name} has the same stem: which mask {image.name} has is unclear"
                problems[i] = (mask, f"{why}; keep one of them")
            elif broken_link(mask):
                problems[i] = (mask, broken_link(mask))
        return problems

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        image_path, mask_path = self.pairs[index]

        def read_mask() -> np.ndarray:
            values, lossy = read_mask_file(mask_path)
            self.note_labels(values)
            return mask_foreground(values, self.foreground, mask_path, lossy)

        image, foreground = read_all(  # a bad image does not hide a bad mask from the check
            lambda: torch.from_numpy(check_channels(read_image(image_path), self.channels, image_path)),
            read_mask,
        )
        check_same_size(mask_path, foreground.shape[:2], image_path, image.shape)
        mask = torch.from_numpy(foreground.astype(np.float32))[None]
        return {
            "image": resize(image, self.size, "bilinear"),
            "mask": resize(mask, self.size, "nearest"),
            "case": str(image_path),
            "index": torch.tensor(index),
            "original_size": torch.tensor(image.shape[-2:]),
        }
