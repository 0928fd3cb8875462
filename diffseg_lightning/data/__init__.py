"""Datasets in their official layouts, transforms, LightningDataModules and synthetic data."""

from diffseg_lightning.data.datamodule import SegmentationDataModule, zscore_per_channel
from diffseg_lightning.data.folder import ImageFolder, PairedFolder, read_image
from diffseg_lightning.data.synthetic import SyntheticSegmentation

__all__ = [
    "ImageFolder",
    "PairedFolder",
    "SegmentationDataModule",
    "SyntheticSegmentation",
    "read_image",
    "zscore_per_channel",
]
