"""One LightningDataModule for every 2D segmentation dataset."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from diffseg_lightning.data.base import check_policy
from diffseg_lightning.data.cache import ArrayCache, CacheWriter, build_lock, cache_folder
from diffseg_lightning.data.check import SplitReport, check_dataset
from diffseg_lightning.data.resumable import EpochSampler, ResumableLoader
from diffseg_lightning.utils.errors import ConfigError, DiffSegError

DatasetFactory = Callable[[], Dataset]
NORMALIZATIONS = ("zscore", "none")
LABEL_SOURCES = (None, "from_masks")


def zscore_per_channel(image: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Zero mean, unit variance per image and channel: (B, C, H, W) -> (B, C, H, W)."""
    mean = image.mean(dim=(-2, -1), keepdim=True)
    std = image.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return (image - mean) / (std + eps)


def to_plain(value: Any) -> Any:
    """A config value as plain Python (OmegaConf lists and dicts become lists and dicts) for JSON."""
    return (
        OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value
    )


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
        check: read every item of train / val / test once in :meth:`setup` (the same check as
            ``diffseg-check-data``), so bad data fail before training starts, not mid-epoch.
        on_bad_case: what the check does with a case that cannot be used: ``error`` (raise, naming every
            problem up to five) or ``skip`` (leave it out, with a warning that counts and names them).
            Loaders receive the same value for the problems they find while scanning their folders.
        cache_dir: keep each split's preprocessed items in memory-mapped arrays under this folder
            (:mod:`~diffseg_lightning.data.cache`), so no epoch after the first, and no later run with the
            same settings and files, decodes an image; None disables it. Implies ``check``.
        labels: ``None`` (items keep what their loader gives) or ``from_masks``: an item without a
            ``label`` gets the image-level label ``label = int(mask.any())`` (int64 scalar; 1 = lesion
            present), derived in the collate function of every split (a loader's own label is kept).
        withhold: item keys removed from every TRAINING batch (e.g. ``[mask, masks, instances]`` for weakly
            supervised methods, which must never see a mask in training); removed per item before
            collation, after ``labels`` was derived. Validation, test and predict batches keep everything.
        **dataset_keys: the dataset-level keys of the data config (``root``, ``size``, ``year``, ...), which the
            split factories read through interpolations (``${data.size}``); unused here. A key that nothing
            reads is refused before the run starts (:func:`~diffseg_lightning.validate.data_keys`),
            so a typo (``data.bacth_size``) cannot pass silently.

    After :meth:`setup`, ``reports`` holds each checked split's :class:`SplitReport`.
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
        check: bool = True,
        on_bad_case: str = "error",
        cache_dir: str | None = None,
        labels: str | None = None,
        withhold: list[str] | None = None,
        **dataset_keys: Any,
    ) -> None:
        super().__init__()
        if normalize not in NORMALIZATIONS:
            raise ConfigError(f"data.normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        self.factories = {"train": train, "val": val, "test": test, "predict": predict}
        self.datasets: dict[str, Dataset] = {}
        self.channels = channels
        self.mask_channels = mask_channels
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.normalize = normalize
        self.pin_memory = pin_memory
        self.check = check
        self.on_bad_case = check_policy(on_bad_case)
        self.cache_dir = cache_dir
        self.reports: dict[str, SplitReport] = {}
        if labels not in LABEL_SOURCES:
            raise ConfigError(f"data.labels must be one of {list(LABEL_SOURCES)}, got {labels!r}")
        self.labels = labels
        self.withhold = tuple(to_plain(withhold) or ())
        if "image" in self.withhold:
            raise ConfigError("data.withhold cannot remove 'image' from the training batches")

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
        for split in wanted.get(stage, tuple(self.factories)) if stage else tuple(self.factories):
            if split in self.datasets or self.factories[split] is None:
                continue
            dataset = self.build(split)
            self.check_first_item(dataset, split)
            self.datasets[split] = dataset

    def build(self, split: str) -> Dataset:
        """The split's dataset: from its cache when one matches, else built, checked (and cached)."""
        factory = self.factories[split]
        checked = split != "predict" and (self.check or self.cache_dir is not None)
        if not checked:
            return factory()
        if self.cache_dir is None:
            dataset, report = self.checked(split, factory(), None)
        else:
            folder = cache_folder(self.cache_dir, split, factory)
            with build_lock(folder):  # one process of the node builds; the others then read its cache
                if ArrayCache.exists(folder):
                    dataset = ArrayCache(folder)
                    report = dataset.report
                else:
                    dataset, report = self.checked(split, factory(), folder)
        report.split = split
        if report.problems:
            rank_zero_warn(
                f"data.on_bad_case=skip: left out {len(report.problems)} bad case(s) of the {split} split "
                f"of {report.dataset}: {report.describe_problems()}"
            )
        self.reports[split] = report
        return dataset

    def checked(self, split: str, dataset: Dataset, folder: Path | None) -> tuple[Dataset, SplitReport]:
        """Run the check pass over ``dataset``; return the clean items (cached in ``folder`` when given)."""
        if folder is not None and not getattr(dataset, "deterministic_items", True):
            raise DiffSegError(
                f"data.cache_dir: the {split} split of {type(dataset).__name__} draws random crops or "
                "augmentations per read; caching would freeze one draw. Set data.cache_dir=null"
            )
        writer = CacheWriter(folder, len(dataset)) if folder is not None else None
        good, report = check_dataset(dataset, split, writer.add if writer else None)
        report.split = split
        self.enforce(report)
        if writer is not None:
            return writer.finish(report), report
        return (dataset if len(good) == len(dataset) else Subset(dataset, good)), report

    def enforce(self, report: SplitReport) -> None:
        """Raise under ``on_bad_case=error`` when the check found problems (all counted, five named)."""
        if report.problems and self.on_bad_case == "error":
            raise DiffSegError(
                f"{len(report.problems)} bad case(s) in the {report.split} split of {report.dataset}: "
                f"{report.describe_problems()}. Fix them, or set data.on_bad_case=skip to leave them out"
            )
        if report.items == 0:
            raise DiffSegError(f"no usable item in the {report.split} split of {report.dataset}")

    def splits_record(self) -> dict[str, Any]:
        """Each built split's loader settings, item count and case list (what ``splits.json`` holds)."""
        record = {}
        for split, dataset in self.datasets.items():
            factory = self.factories[split]
            settings = getattr(factory, "keywords", {})
            report = self.reports.get(split)
            record[split] = {
                "dataset": report.dataset if report else type(dataset).__name__,
                "settings": {k: to_plain(v) for k, v in settings.items()},
                "items": len(dataset),
                "cases": report.cases if report else None,  # unchecked (generated) data: counts only
            }
        return record

    @rank_zero_only
    def save_splits(self, output_dir: str | Path) -> Path:
        """Write ``<output_dir>/splits.json`` (rank 0 only) and return its path."""
        path = Path(output_dir) / "splits.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.splits_record(), indent=1, default=str))
        return path

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

    def prepare_item(self, item: dict, split: str | None = None) -> dict:
        """``item`` with its derived ``label`` (``labels=from_masks``) and, for ``split == "train"``, without
        the ``withhold`` keys. The dataset's own dict is never modified."""
        if self.labels == "from_masks" and "label" not in item:
            if "mask" not in item:
                raise DiffSegError(
                    f"{item.get('case', '?')}: data.labels=from_masks needs a mask to derive the label from"
                )
            item = {**item, "label": torch.as_tensor(int(bool(item["mask"].any())), dtype=torch.int64)}
        if split == "train" and self.withhold:
            item = {k: v for k, v in item.items() if k not in self.withhold}
        return item

    def collate(self, items: list[dict], split: str | None = None) -> dict[str, Any]:
        if self.labels is not None or (split == "train" and self.withhold):
            items = [self.prepare_item(item, split) for item in items]
        batch = default_collate(items)
        if self.normalize == "zscore":
            batch["image"] = zscore_per_channel(batch["image"].float())
        return batch

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        if split not in self.datasets:
            self.setup(None)
        if split not in self.datasets:
            raise DiffSegError(f"the data config has no {split} split")
        loader, order = DataLoader, {"shuffle": shuffle}
        if shuffle:  # training: an order that resume reproduces exactly, mid-epoch too (data/resumable.py)
            loader, order = ResumableLoader, {"sampler": self.epoch_sampler(self.datasets[split])}
        return loader(
            self.datasets[split],
            batch_size=batch_size,
            **order,
            drop_last=shuffle and len(self.datasets[split]) >= batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            collate_fn=partial(self.collate, split=split),
        )

    def epoch_sampler(self, dataset: Dataset) -> EpochSampler:
        """The training order: a permutation seeded with ``PL_GLOBAL_SEED`` (what ``seed_everything`` sets, the
        seed of Lightning's own distributed sampler) plus the epoch; this process's share under DDP."""
        shards = (self.trainer.distributed_sampler_kwargs if self.trainer is not None else None) or {}
        return EpochSampler(dataset, seed=int(os.environ.get("PL_GLOBAL_SEED", 0)), **shards)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", False, self.eval_batch_size)
