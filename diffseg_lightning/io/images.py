"""2D image files as arrays: images (float32, channels first), label maps and grey label images as stored,
and mask files with their stored values; every error is one line naming the file. And a PNG writer.

Which stored mask values mean foreground is not decided here: that rule (``data.foreground``) is
:mod:`~diffseg_lightning.data.masks`'s, applied to what :func:`read_mask_file` returns.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from diffseg_lightning.exceptions import DiffSegError
from diffseg_lightning.io.files import broken_link

CONVERTED_MODES = ("P", "CMYK", "YCbCr")  # read as RGB
LOSSY_FORMATS = ("JPEG", "MPO")  # PIL's format names of lossy files


def unreadable(path: Path, err: BaseException) -> DiffSegError:
    """The error for a file PIL cannot open, naming it (and a broken link's target)."""
    link = broken_link(path)
    if link:
        return DiffSegError(f"{path}: {link}")
    if isinstance(err, FileNotFoundError):
        return DiffSegError(f"{path}: file not found")
    return DiffSegError(f"{path}: not a readable image ({err})")


def channels_first(array: np.ndarray) -> np.ndarray:
    """(H, W) -> (1, H, W); (H, W, C) -> (C, H, W)."""
    return array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)


def read_image(path: Path) -> np.ndarray:
    """Read a 2D image file as float32 (C, H, W), with a clear error naming the file when it cannot be read."""
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB") if img.mode in CONVERTED_MODES else img)
    except (UnidentifiedImageError, OSError) as err:
        raise unreadable(path, err) from None
    return channels_first(array.astype(np.float32))


def read_label_map(path: Path) -> np.ndarray:
    """A label image as stored, (H, W): grey values, or the palette INDICES of a palette ("P") image.

    Unlike :func:`read_image`, a palette image is not converted to RGB, so a
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


def read_mask_file(path: Path) -> tuple[np.ndarray, bool]:
    """A mask file's stored values and whether its format is lossy (JPEG).

    Returns:
        ``(values, lossy)``: values (H, W) for grey files (1-bit files as 0/255), or (H, W, 3) for
        colour (RGB, and palette images by their colours); a constant alpha channel is dropped.

    Raises:
        DiffSegError: naming the file when it is missing, a broken link, unreadable, or its alpha varies.
    """
    try:
        with Image.open(path) as img:
            lossy = img.format in LOSSY_FORMATS
            if img.mode in ("P", "PA"):
                img = img.convert("RGBA")
            elif img.mode == "1":
                img = img.convert("L")  # 0 / 255, its grey values
            elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                img = img.convert("RGB")
            values = np.asarray(img)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise unreadable(path, err) from None
    if values.ndim == 3:
        if values.shape[-1] in (2, 4):
            alpha = values[..., -1]
            if alpha.min() != alpha.max():
                raise DiffSegError(
                    f"{path}: mask with varying transparency (alpha {alpha.min()}..{alpha.max()}); "
                    "transparency cannot say what is foreground: save the mask without alpha"
                )
            values = values[..., :-1]
        if values.shape[-1] == 1:
            values = values[..., 0]
    return values, lossy


def png_writer(array: np.ndarray) -> Callable[[Path], None]:
    """A writer of ``array`` (H, W) or (H, W, 3), uint8 or uint16, as a PNG at the path it is given (for
    :func:`~diffseg_lightning.utils.atomic.atomic_write`)."""
    return lambda tmp: Image.fromarray(array).save(tmp, format="PNG")


__all__ = [
    "CONVERTED_MODES",
    "LOSSY_FORMATS",
    "channels_first",
    "grey_channel",
    "png_writer",
    "read_grey",
    "read_image",
    "read_label_map",
    "read_mask_file",
    "unreadable",
]
