"""Datasets in their official layouts, transforms, LightningDataModules and synthetic data."""

from diffseg_lightning.data.datamodule import SegmentationDataModule, zscore_per_channel
from diffseg_lightning.data.drive import DRIVE
from diffseg_lightning.data.folder import ImageFolder, PairedFolder, read_image
from diffseg_lightning.data.glas import GlaS
from diffseg_lightning.data.kvasir import KvasirSEG
from diffseg_lightning.data.monuseg import MoNuSeg
from diffseg_lightning.data.qubiq import QUBIQ
from diffseg_lightning.data.splits import check_split, split_by_fractions
from diffseg_lightning.data.synthetic import SyntheticSegmentation

__all__ = [
    "DRIVE",
    "QUBIQ",
    "GlaS",
    "ImageFolder",
    "KvasirSEG",
    "MoNuSeg",
    "PairedFolder",
    "SegmentationDataModule",
    "SyntheticSegmentation",
    "check_split",
    "read_image",
    "split_by_fractions",
    "zscore_per_channel",
]
