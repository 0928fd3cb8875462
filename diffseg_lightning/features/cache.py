"""Disk cache of diffusion features, per dataset and extractor setting.

Probes on frozen diffusion features (FEDD, Carrion & Norouzi, MICCAI 2023; Baranchuk et al.,
ICLR 2022) train in seconds once the features exist: the backbone pass is the expensive
part. ``FeatureCache`` stores the features of each case in a folder whose name is a digest
of everything that determines them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffseg_lightning.exceptions import ConfigError
from diffseg_lightning.features.extractor import DiffusionFeatureExtractor

__all__ = ["FeatureCache", "dataset_identity", "extractor_setting", "state_digest"]


def state_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, shapes, dtypes and bytes), hex."""
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        tensor = value.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def extractor_setting(extractor: DiffusionFeatureExtractor) -> dict[str, Any]:
    """Everything about the extractor that determines its features (JSON-serialisable)."""
    kernel = extractor.kernel
    kernel_digest = None
    if kernel is not None:  # the schedule decides q_sample: digest its signal levels
        abar = kernel.sqrt_alphas_cumprod.detach().cpu().contiguous()
        kernel_digest = hashlib.sha256(abar.numpy().tobytes()).hexdigest()[:16]
    call = extractor.call
    return {
        "backbone": type(extractor.backbone).__qualname__,
        "weights": state_digest(extractor.backbone),
        "blocks": list(extractor.blocks),
        "timesteps": list(extractor.timesteps),
        "output_size": list(extractor.output_size) if extractor.output_size else None,
        "noise_seed": extractor.noise_seed,
        "kernel": kernel_digest,
        "call": f"{getattr(call, '__module__', '')}.{getattr(call, '__qualname__', repr(call))}",
    }


def dataset_identity(dataset: Any, **extra: Any) -> str:
    """A string naming a dataset: class, length and its ``root``/``split``/``size``/``seed``/...
    attributes when present, plus ``extra`` (e.g. the normalisation). Give ``extra`` whatever
    else changes the images the extractor sees."""
    parts: dict[str, Any] = {"class": f"{type(dataset).__module__}.{type(dataset).__qualname__}"}
    try:
        parts["len"] = len(dataset)
    except TypeError:
        pass
    for attr in ("root", "split", "size", "seed", "mode", "fold", "image_size", "num_cases"):
        value = getattr(dataset, attr, None)
        if isinstance(value, (str, int, float, bool, Path, tuple, list)):
            parts[attr] = str(value)
    parts.update({k: str(v) for k, v in extra.items()})
    return json.dumps(parts, sort_keys=True)


class FeatureCache:
    """Per-case feature files under ``root/<key>/``, the key a digest of setting and dataset.

    The key hashes the backbone's weights digest, blocks, timesteps, output size, noise seed,
    the kernel's schedule, the call function and ``dataset_id`` (see ``dataset_identity``):
    change any of them and the cache misses. Each case is one ``.pt`` file named by a digest
    of its case id, written atomically (temp file + rename), so concurrent writers (DDP
    ranks) cannot leave half a file. ``setting.json`` in the folder records what the key means.
    Used by FEDD (Carrion & Norouzi, MICCAI 2023) to train its probes on cached features.

    Args:
        root: cache folder (created on demand).
        extractor: the feature extractor whose output is cached.
        dataset_id: identity of the dataset and of its preprocessing.
        dtype: storage dtype (float32 keeps hits bit-identical to a recomputation; float16
            halves the disk use).
    """

    def __init__(
        self,
        root: str | Path,
        extractor: DiffusionFeatureExtractor,
        dataset_id: str,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.extractor = extractor
        self.dataset_id = str(dataset_id)
        self.dtype = dtype
        self.setting = {**extractor_setting(extractor), "dataset": self.dataset_id, "dtype": str(dtype)}
        self.key = hashlib.sha256(json.dumps(self.setting, sort_keys=True).encode()).hexdigest()[:24]
        self.directory = Path(root) / self.key
        self.hits = 0
        self.misses = 0

    def path(self, case_id: str) -> Path:
        """The file of one case."""
        return self.directory / f"{hashlib.sha1(str(case_id).encode()).hexdigest()}.pt"

    def load(self, case_id: str) -> Tensor | None:
        """The cached features (C_f, H, W) of a case, or None."""
        path = self.path(case_id)
        if not path.exists():
            return None
        entry = torch.load(path, map_location="cpu", weights_only=True)
        if entry.get("case") != str(case_id):  # a digest collision or a foreign file: recompute
            return None
        return entry["features"]

    def save(self, case_id: str, features: Tensor) -> None:
        """Store the features (C_f, H, W) of a case."""
        self.directory.mkdir(parents=True, exist_ok=True)
        setting_file = self.directory / "setting.json"
        if not setting_file.exists():
            setting_file.write_text(json.dumps(self.setting, indent=2, sort_keys=True))
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        os.close(fd)
        torch.save({"case": str(case_id), "features": features.detach().to("cpu", self.dtype).clone()}, tmp)
        os.replace(tmp, self.path(case_id))

    def __call__(self, images: Tensor, case_ids: Sequence[str], **kwargs: Any) -> Tensor:
        """Features (B, C_f, H_out, W_out) of a batch: hits from disk, misses in one extractor pass.

        Args:
            images: (B, C, H, W) images, in the order of ``case_ids``.
            case_ids: one id per image; the features of a case must depend on nothing else
                than the case (and ``kwargs`` must be a function of the case too).
            **kwargs: passed to the extractor for the misses (batched tensors are subset).
        """
        if len(case_ids) != images.shape[0]:
            raise ConfigError(f"{len(case_ids)} case ids for a batch of {images.shape[0]} images")
        cached = [self.load(c) for c in case_ids]
        miss = [i for i, f in enumerate(cached) if f is None]
        self.hits += len(case_ids) - len(miss)
        self.misses += len(miss)
        if miss:
            index = torch.tensor(miss, device=images.device)
            sub = {
                k: v.index_select(0, index)
                if isinstance(v, Tensor) and v.ndim and v.shape[0] == len(case_ids)
                else v
                for k, v in kwargs.items()
            }
            computed = self.extractor(images.index_select(0, index), **sub)
            for j, i in enumerate(miss):
                self.save(case_ids[i], computed[j])
                cached[i] = computed[j].detach().to("cpu", self.dtype)
        out = torch.stack([f for f in cached if f is not None])
        return out.to(device=images.device, dtype=torch.float32)
