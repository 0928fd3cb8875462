"""One LightningDataModule for every 2D segmentation dataset."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from diffseg_lightning.utils.errors import DiffSegError

DatasetFactory = Callable[[], Dataset]
NORMALIZATIONS = ("zscore", "none")


def zscore_per_channel(image: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Zero mean, unit variance per image and channel: (B, C, H, W) -> (B, C, H, W)."""
    mean = image.mean(dim=(-2, -1), keepdim=True)
    std = image.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return (image - mean) / (std + eps)


class SegmentationDataModule(L.LightningDataModule):
    """Loads train / val / test / predict datasets built lazily by Hydra (``_partial_: true``).

    Every dataset item is a dict with at least ``image`` (C, H, W) float, ``case`` (str, the file or
    case name) and ``index`` (int); labelled datasets add ``mask`` (C_mask, H, W) in {0, 1} and, with
    several annotators, ``masks`` (A, H, W). Images are normalised per image and channel in the collate
    function (batched), so every loader shares one normalisation.

    Args:
        train, val, test, predict: zero-argument dataset factories (or None when the split is absent).
        channels: image channels the model expects; a dataset that yields another count is an error
            naming the offending case.
        mask_channels: channels of the mask.
        batch_size: training batch size (per process).
        eval_batch_size: batch size of val / test / predict (images per batch; each carries S samples).
        num_workers: DataLoader workers.
        normalize: ``zscore`` (per image and channel) or ``none``.
    """

    def __init__(
        self,
        train: DatasetFactory | None = None,
        val: DatasetFactory | None = None,
        test: DatasetFactory | None = None,
        predict: DatasetFactory | None = None,
        channels: int = 1,
        mask_channels: int = 1,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        normalize: str = "zscore",
        pin_memory: bool = False,
        **_: Any,  # dataset-level keys (size, root, ...) live beside these in the data config
    ) -> None:
        super().__init__()
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"data.normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        self.factories = {"train": train, "val": val, "test": test, "predict": predict}
        self.datasets: dict[str, Dataset] = {}
        self.channels = channels
        self.mask_channels = mask_channels
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.normalize = normalize
        self.pin_memory = pin_memory

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
        for split in wanted.get(stage, tuple(self.factories)) if stage else tuple(self.factories):
            if split in self.datasets or self.factories[split] is None:
                continue
            dataset = self.factories[split]()
            self.check_first_item(dataset, split)
            self.datasets[split] = dataset

    def check_first_item(self, dataset: Dataset, split: str) -> None:
        """Fail early, naming the case, when the data do not match the config."""
        if len(dataset) == 0:
            raise DiffSegError(f"the {split} split of {type(dataset).__name__} is empty")
        item = dataset[0]
        got = item["image"].shape[0]
        if got != self.channels:
            raise DiffSegError(
                f"{item['case']}: image has {got} channel(s) but the config expects data.channels={self.channels}"
            )
        if "mask" in item and item["mask"].shape[0] != self.mask_channels:
            raise DiffSegError(
                f"{item['case']}: mask has {item['mask'].shape[0]} channel(s) but the config expects "
                f"data.mask_channels={self.mask_channels}"
            )

    def collate(self, items: list[dict]) -> dict[str, Any]:
        batch = default_collate(items)
        if self.normalize == "zscore":
            batch["image"] = zscore_per_channel(batch["image"].float())
        return batch

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        if split not in self.datasets:
            self.setup(None)
        if split not in self.datasets:
            raise DiffSegError(f"the data config has no {split} split")
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(self.datasets[split]) >= batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            collate_fn=self.collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", False, self.eval_batch_size)
