"""What every official-layout loader shares: the bad-case policy and a record of the label values it read.

A loader subclasses :class:`CaseDataset` and, while scanning its folder, reports a case that cannot be
used (an image without its mask, an unreadable header) with :meth:`CaseDataset.bad_case`: under
``on_bad_case="error"`` (the default) that raises a :class:`DiffSegError` naming the file at once; under
``"skip"`` the case is left out and listed in ``skipped``, which the DataModule counts in a warning and
``diffseg-check-data`` reports. Problems found only when a case's pixels are read (a truncated file,
unexpected label values) raise from ``__getitem__``; the DataModule's check pass
(:func:`~diffseg_lightning.data.check.check_dataset`) catches those per item under the same policy.

Also shared: finding the dataset folder under the root the user gave (:func:`locate_root`), and the checks of
what was read against the config (:func:`check_channels`) and of an image against its mask
(:func:`check_same_size`). Reading the files is :mod:`diffseg_lightning.io`'s.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from diffseg_lightning.utils.errors import ConfigError, DiffSegError

BAD_CASE_POLICIES = ("error", "skip")
MAX_RECORDED_LABELS = 64  # instance maps hold hundreds of ids; the report needs only a glimpse


def split_message(err: BaseException | str, default: str | Path = "") -> tuple[str, str]:
    """``(file, reason)`` of a DiffSeg message ``<file>: <reason>`` (our checks name the file first).

    The file is the text before the first ``": "`` when it names an existing file or folder, or a broken
    symbolic link (a ``#<slice>`` suffix allowed); otherwise the message is all reason and the file is ``default``.
    """
    message = " ".join(str(err).split())
    head, sep, reason = message.partition(": ")
    if sep and head and os.path.lexists(head.partition("#")[0]):
        return head, reason
    return str(default), message


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


def check_channels(image: np.ndarray, channels: int | None, path: Path) -> np.ndarray:
    """Raise, naming the file, when an image's channel count is not the configured one."""
    if channels is not None and image.shape[0] != channels:
        raise DiffSegError(f"{path}: image has {image.shape[0]} channel(s) but the config expects {channels}")
    return image


def check_same_size(
    mask_path: Path, mask_shape: Sequence[int], image_path: Path, image_shape: Sequence[int]
) -> None:
    """Raise, naming the mask, when its (H, W) differs from the image's."""
    if tuple(mask_shape[-2:]) != tuple(image_shape[-2:]):
        raise DiffSegError(
            f"{mask_path}: mask size {tuple(mask_shape[-2:])} (H, W) differs from the size "
            f"{tuple(image_shape[-2:])} of its image {image_path.name}"
        )


def check_policy(on_bad_case: str) -> str:
    if on_bad_case not in BAD_CASE_POLICIES:
        raise ConfigError(f"data.on_bad_case must be one of {BAD_CASE_POLICIES}, got {on_bad_case!r}")
    return on_bad_case


class CaseDataset(Dataset):
    """Base of the official-layout loaders: ``on_bad_case`` handling and the label values seen.

    Attributes:
        on_bad_case: ``error`` or ``skip``.
        skipped: ``(path, reason)`` of every case left out while scanning (``skip`` only).
        seen_labels: the raw label values read so far (stored values, before any target mapping).
    """

    def __init__(self, on_bad_case: str = "error") -> None:
        self.on_bad_case = check_policy(on_bad_case)
        self.skipped: list[tuple[str, str]] = []
        self.seen_labels: set[int | float] = set()
        # The check pass reads every item once and then turns this off, so training reads (every epoch, in
        # every worker) skip the np.unique that only the data report needs.
        self.recording = True

    def bad_case(self, path: str | Path, reason: str) -> None:
        """Report an unusable case found while scanning: raise (``error``) or record it (``skip``)."""
        if self.on_bad_case == "error":
            raise DiffSegError(f"{path}: {reason}")
        self.skipped.append((str(path), reason))

    def note_labels(self, labels: np.ndarray) -> np.ndarray:
        """Record the distinct stored values of a label array (for the data report) while ``recording``;
        returns it unchanged."""
        if self.recording and len(self.seen_labels) < MAX_RECORDED_LABELS:
            values = np.unique(labels)
            for value in values[: MAX_RECORDED_LABELS - len(self.seen_labels)].tolist():
                self.seen_labels.add(int(value) if float(value).is_integer() else value)  # 255.0 -> 255
        return labels

    @staticmethod
    def check_labels(
        labels: np.ndarray, allowed: set | tuple, path: str | Path, what: str = ""
    ) -> np.ndarray:
        """Raise, naming the file, when ``labels`` holds values outside ``allowed``; returns ``labels``."""
        present = np.unique(labels)
        unexpected = sorted(set(present.tolist()) - set(allowed))
        if unexpected:
            shown = ", ".join(str(v) for v in unexpected[:8]) + (" ..." if len(unexpected) > 8 else "")
            raise DiffSegError(
                f"{path}: unexpected label value(s) {shown}; {what or 'expected'} {sorted(allowed)}"
            )
        return labels
