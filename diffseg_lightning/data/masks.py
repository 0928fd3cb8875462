"""Which mask values mean foreground: the one rule every 2D loader reads its mask files with.

A mask file is read as stored (:func:`~diffseg_lightning.io.images.read_mask_file`, which also says whether
it is lossy) and turned into foreground (:func:`mask_foreground`) by a rule, ``data.foreground`` of the
generic folder (:func:`check_foreground`); the official-layout loaders use ``binary``:

- ``binary`` (the default): the values must be 0/1 or 0/255 (a subset of {0, 1} or of {0, 255}); the
  non-zero value is foreground. Anything else (a label map {0, 1, 2}, a soft 0/102 mask, 16-bit 0/65535) is
  an error naming the file and the values, which says which setting to pick.
- a value, e.g. ``2``, or a list of values, e.g. ``[1, 2]`` (the labels of a multi-class label map that
  make up the foreground): the pixels holding one of them are foreground, every other value background.
- ``nonzero``: every value but 0 is foreground (for a colour mask: every pixel that is not black).

Grey and colour: grey files (modes L, I;16, I, F), 1-bit files (as 0/255) and grey stored as colour
(RGB whose channels are equal; palette images, read by their colours) are grey values. A true-colour mask (e.g. red on
black) is an error unless ``nonzero`` says that every non-black pixel is foreground. An alpha channel is
ignored when it is constant and an error when it varies (transparency cannot say what is foreground).

Lossy (JPEG) masks: compression moves values near edges (a 0/255 mask gets 1..254, a 0/1 mask 0..2), so
only ``binary`` applies, with tolerance bands: a JPEG mask whose maximum is at most ``JPEG_LOW_MAX`` is a
0/1 mask (foreground: values >= 1); any other is a 0/255 mask (foreground: values > 127), which must hold a
value >= ``255 - JPEG_BAND`` and at most ``JPEG_AMBIGUOUS_SHARE`` of whose non-background pixels (values >
``JPEG_BAND``) may lie in the ambiguous middle (``JPEG_BAND`` < v < ``255 - JPEG_BAND``); else it is an
error naming the file (a soft or multi-valued mask saved as JPEG). Colour JPEGs are grey when their
channels differ by at most ``JPEG_BAND`` (read as luma, ITU-R 601, as PIL's "L"). Note that a 0/1 mask
saved as JPEG has already lost foreground when it is read (measured here with PIL: 2-10% of a disc's area
and 35-85% of 1-3 px vessels at quality 95-75, everything at quality <= 50): store 0/1 masks as PNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffseg_lightning.exceptions import ConfigError, DiffSegError

FOREGROUND_RULES = ("binary", "nonzero")
BINARY_ENCODINGS = ((0, 1), (0, 255))
# Measured on 0/1 masks saved by PIL at quality 30..95 (a disc, DRIVE vessels): the maximum is 0..2.
JPEG_LOW_MAX = 3
# Half of the 0..127 / 128..255 halves: Kvasir-SEG's real JPEG masks (300 here) hold at most 10% of their
# non-background pixels between 64 and 191, a 0/255 disc or vessel tree saved at quality >= 30 at most 10%.
JPEG_BAND = 64
JPEG_AMBIGUOUS_SHARE = 0.25  # 2.5x the largest share measured above; a soft mask has 100%
SHOWN_VALUES = 8

#: ``"binary"``, ``"nonzero"``, or the tuple of values that mean foreground.
Foreground = str | tuple[float, ...]


def check_foreground(foreground: Any) -> Foreground:
    """The ``data.foreground`` rule, checked: ``"binary"``, ``"nonzero"`` or a tuple of mask values.

    Raises:
        ConfigError: for anything else (another string, a boolean, an empty or nested list).
    """
    if isinstance(foreground, str):
        if foreground in FOREGROUND_RULES:
            return foreground
    elif isinstance(foreground, (int, float, np.number)) and not isinstance(foreground, (bool, np.bool_)):
        return (float(foreground),)
    elif hasattr(foreground, "__iter__"):
        values = list(foreground)
        if values and all(
            isinstance(v, (int, float, np.number)) and not isinstance(v, (bool, np.bool_)) for v in values
        ):
            return tuple(float(v) for v in values)
    raise ConfigError(
        "data.foreground must be binary (0/1 or 0/255 masks), nonzero (every value but 0), a mask value "
        f"(e.g. 2) or a list of mask values (e.g. [1, 2]), got {foreground!r}"
    )


def present_values(labels: np.ndarray) -> np.ndarray:
    """The sorted distinct values of a label array: ``np.bincount`` for 8-bit and boolean arrays (one linear
    pass, no sort: 31 ms against ``np.unique``'s 50 ms on a 4000 x 3000 mask), ``np.unique`` otherwise.

    Boolean arrays count as 0/1 whatever bytes hold them (PIL's mode "1" arrays are bool over bytes 0/255).
    """
    if labels.dtype == bool:  # astype, not view (see above)
        labels = labels.astype(np.uint8)
    if labels.dtype == np.uint8:
        return np.flatnonzero(np.bincount(labels.ravel(), minlength=256)).astype(np.uint8)
    return np.unique(labels)


def shown(values: Sequence | np.ndarray) -> str:
    """``0, 1, 2`` (at most ``SHOWN_VALUES`` values, then ``... (N values)``)."""
    values = [float(v) for v in np.asarray(values).ravel()]
    text = ", ".join(f"{v:g}" for v in values[:SHOWN_VALUES])
    return text + (f" ... ({len(values)} values)" if len(values) > SHOWN_VALUES else "")


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of 8-bit RGB (H, W, 3), rounded to integers exactly as PIL's ``convert("L")``.

    Rounded, not float: the float weights sum to 1 - 1e-16, so grey 1 stored as RGB would give 0.99999.
    """
    weights = np.array([19595, 38470, 7471], np.int64)  # 0.299, 0.587, 0.114 in 16-bit fixed point
    return ((rgb.astype(np.int64) @ weights + 0x8000) >> 16).astype(np.uint8)


def setting_text(foreground: Foreground) -> str:
    """A rule as it is written on the command line: ``binary``, ``2``, ``[1,2]``."""
    if isinstance(foreground, str):
        return foreground
    values = [f"{v:g}" for v in foreground]
    return values[0] if len(values) == 1 else "[" + ",".join(values) + "]"


def _colours(rgb: np.ndarray) -> str:
    colours = np.unique(rgb.reshape(-1, rgb.shape[-1]), axis=0)
    listed = ", ".join(str(tuple(int(c) for c in colour)) for colour in colours[:4])
    return f"{len(colours)} colour(s): {listed}{' ...' if len(colours) > 4 else ''}"


def mask_foreground(
    values: np.ndarray, foreground: Foreground, path: Path, lossy: bool = False, owner: str | None = None
) -> np.ndarray:
    """The foreground of a mask's stored values (:func:`~diffseg_lightning.io.images.read_mask_file`) under
    ``foreground``: bool (H, W).

    Args:
        values: (H, W) grey values or (H, W, 3) colour.
        foreground: a rule of :func:`check_foreground`.
        path: the mask file, named by every error.
        lossy: the file is JPEG (tolerance bands, ``binary`` only; see the module docstring).
        owner: the dataset whose official encoding fixes the rule (e.g. ``"ISIC"``); the errors then say
            what that dataset's masks hold instead of pointing at ``data.foreground``.

    Raises:
        DiffSegError: naming the file and the values found when they do not fit the rule.
    """
    setting = owner is None
    if values.ndim == 3:
        spread = values.max(axis=-1).astype(np.int64) - values.min(axis=-1)
        if int(spread.max(initial=0)) <= (JPEG_BAND if lossy else 0):
            values = luma(values) if lossy else values[..., 0]
        elif foreground == "nonzero" and not lossy:
            return values.any(axis=-1)
        else:
            fix = "save it as grey"
            if setting and not lossy:
                fix += ", or set data.foreground=nonzero to make every non-black pixel foreground"
            found = f"channels differ by up to {int(spread.max())}" if lossy else _colours(values)
            raise DiffSegError(
                f"{path}: {'JPEG ' if lossy else ''}colour mask ({found}); a mask must be grey (grey stored as "
                f"RGB is fine): {fix}"
            )
    if lossy:
        return _lossy_foreground(values, foreground, path, owner)
    if foreground == "nonzero":
        return values != 0
    if foreground != "binary":
        return np.isin(values, foreground)
    present = present_values(values)
    for encoding in BINARY_ENCODINGS:
        if np.isin(present, encoding).all():
            return values == encoding[1]
    if not setting:
        raise DiffSegError(
            f"{path}: mask values {shown(present)} are not those of a binary {owner} mask (0/255 or 0/1)"
        )
    message = f"{path}: mask values {shown(present)} are not a binary mask (0/1 or 0/255)"
    example = setting_text(tuple(float(v) for v in present[present != 0][:4]))
    raise DiffSegError(
        f"{message}; set data.foreground to the value(s) that mean foreground, e.g. data.foreground={example}, "
        "or data.foreground=nonzero (every value but 0)"
    )


def _lossy_foreground(
    values: np.ndarray, foreground: Foreground, path: Path, owner: str | None
) -> np.ndarray:
    """``binary`` on a JPEG mask, with the tolerance bands of the module docstring."""
    store = "store the masks losslessly (PNG) and set data.foreground"
    if foreground != "binary":
        raise DiffSegError(
            f"{path}: data.foreground={setting_text(foreground)} needs "
            f"exact mask values, but JPEG compression changes them: {store}, or use data.foreground=binary "
            "for 0/1 or 0/255 JPEG masks"
        )
    top = float(values.max(initial=0))
    if top <= JPEG_LOW_MAX:
        return values >= 1  # a 0/1 mask: noise 0..2 (see JPEG_LOW_MAX)
    clean = int((values >= 255 - JPEG_BAND).sum())
    above = int((values > JPEG_BAND).sum())
    middle = above - clean
    if clean == 0 or middle > JPEG_AMBIGUOUS_SHARE * above:
        found = f"values {float(values.min()):g}..{top:g}, {middle / max(above, 1):.0%} of the non-background pixels"
        raise DiffSegError(
            f"{path}: JPEG mask is neither 0/1 nor 0/255 with compression noise ({found} between "
            f"{JPEG_BAND} and {255 - JPEG_BAND}, at most {JPEG_AMBIGUOUS_SHARE:.0%} expected); a soft or "
            f"multi-valued mask: {store if owner is None else f'expected a 0/255 {owner} mask'}"
        )
    return values > 127
