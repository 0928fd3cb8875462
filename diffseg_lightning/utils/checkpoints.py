"""The one checkpoint reader of the project: every entry point and every method that loads trained weights
(FEDD's backbone, DKM's diffusion module) reads a file with :func:`load_checkpoint` or
:func:`read_torch_file`, so a missing, damaged or foreign file is always the same one-line error.

At the bottom layer (``utils``) so that ``methods/`` can use it; ``diffseg_lightning.entry`` re-exports
:func:`load_checkpoint` and builds modules from what it returns (``module_from_checkpoint``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.errors import HydraException
from hydra.utils import get_class
from lightning.pytorch.utilities import rank_zero_warn

from diffseg_lightning.exceptions import DiffSegError

__all__ = [
    "RENAMED_TARGETS",
    "LoadedCheckpoint",
    "load_checkpoint",
    "read_torch_file",
    "sub_state_dict",
]

#: Classes renamed since checkpoints were first written: ``old _target_ -> new _target_``. A checkpoint's
#: stored config (``checkpoint["diffseg_config"]``) naming an old one is mapped on reading, with one warning.
RENAMED_TARGETS: dict[str, str] = {
    "diffseg_lightning.methods.SegmentationModule": "diffseg_lightning.methods.UNetSegmentationModule",
    "diffseg_lightning.methods.segmentation.SegmentationModule": (
        "diffseg_lightning.methods.segmentation.UNetSegmentationModule"
    ),
    "diffseg_lightning.callbacks.SummaryWriter": "diffseg_lightning.callbacks.SummaryJsonWriter",
}


class LoadedCheckpoint(dict):
    """A checkpoint's content (a plain dict) and the ``path`` it was read from, for messages that name it."""

    path: Path


def _where(path: Path, key: str | None) -> str:
    return f"{key}: checkpoint {path}" if key else f"checkpoint {path}"


def read_torch_file(path: str | Path, key: str | None = None) -> Any:
    """``torch.load`` a file on the CPU (any pickled content: a Lightning checkpoint, a plain state dict).

    Args:
        path: the file.
        key: the config key that named the file (``model.ddpm_ckpt``), to start the messages with.

    Raises:
        DiffSegError: the file is missing or unreadable (one line naming it).
    """
    path = Path(path)
    if not path.is_file():
        raise DiffSegError(f"{_where(path, key)} does not exist")
    try:
        # our checkpoints carry RNG states (numpy) and the config: not loadable with weights_only=True
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a damaged file
        raise DiffSegError(
            f"{_where(path, key)} is not a readable checkpoint ({type(err).__name__}: {err})"
        ) from None


def _rename_targets(node: Any, prefix: str, renamed: list[str]) -> None:
    """Replace every renamed ``_target_`` (:data:`RENAMED_TARGETS`) in a nested dict, in place."""
    if isinstance(node, dict):
        for name, value in node.items():
            where = f"{prefix}.{name}" if prefix else str(name)
            if name == "_target_" and isinstance(value, str) and value in RENAMED_TARGETS:
                node[name] = RENAMED_TARGETS[value]
                renamed.append(f"{where}={value} is now {RENAMED_TARGETS[value]}")
            else:
                _rename_targets(value, where, renamed)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _rename_targets(value, f"{prefix}[{i}]", renamed)


def load_checkpoint(path: str | Path, predict: bool = False, key: str | None = None) -> LoadedCheckpoint:
    """Read a DiffSeg checkpoint (written by ``diffseg-train``): its ``state_dict`` and stored run config.

    Classes renamed since the checkpoint was written (:data:`RENAMED_TARGETS`) are mapped in its stored
    config, with one ``FutureWarning`` line.

    Args:
        path: the ``.ckpt`` file.
        predict: also refuse a method that cannot predict masks (its class attribute ``cannot_predict``
            gives the reason), for ``diffseg-predict``.
        key: the config key that named the file (``model.backbone_ckpt``), to start the messages with.

    Raises:
        DiffSegError: one line, when the file is missing, unreadable or not ours, or (``predict``) its
            method has no masks to predict.
    """
    path = Path(path)
    checkpoint = read_torch_file(path, key)
    where = _where(path, key)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise DiffSegError(f"{where} has no state_dict: not a Lightning checkpoint")
    if "diffseg_config" not in checkpoint:
        raise DiffSegError(f"{where} has no diffseg_config: it was not written by diffseg-train")
    renamed: list[str] = []
    _rename_targets(checkpoint["diffseg_config"], "", renamed)
    if renamed:
        rank_zero_warn(
            f"{where} was written before a rename; mapped {'; '.join(renamed)}", category=FutureWarning
        )
    if predict:
        target = str((checkpoint["diffseg_config"].get("model") or {}).get("_target_", ""))
        try:
            reason = getattr(get_class(target), "cannot_predict", None)
        except (HydraException, ImportError, ValueError):
            reason = None  # an unknown method fails with its own message when it is built
        if reason:
            raise DiffSegError(f"{where} cannot be used by diffseg-predict: {reason}")
    loaded = LoadedCheckpoint(checkpoint)
    loaded.path = path
    return loaded


def sub_state_dict(
    checkpoint: dict[str, Any], prefix: str, key: str | None = None, path: str | Path | None = None
) -> dict[str, torch.Tensor]:
    """The weights of one submodule: ``checkpoint["state_dict"]`` entries under ``prefix`` (e.g. ``"net."``),
    with the prefix removed.

    Args:
        checkpoint: a Lightning checkpoint (a dict with ``state_dict``).
        prefix: the submodule's attribute path and a dot.
        key, path: the config key and the file, for the message (``path`` defaults to ``checkpoint.path``).

    Raises:
        DiffSegError: when the checkpoint holds no weights under ``prefix``.
    """
    weights = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    if not weights:
        path = Path(path if path is not None else getattr(checkpoint, "path", "(in memory)"))
        raise DiffSegError(f"{_where(path, key)} has no {prefix}* weights in its state_dict")
    return weights
