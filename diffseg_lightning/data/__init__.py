"""Datasets in their official layouts, transforms, LightningDataModules and synthetic data."""

from diffseg_lightning.data.base import CaseDataset
from diffseg_lightning.data.brats import BraTS
from diffseg_lightning.data.cache import ArrayCache
from diffseg_lightning.data.chaos import CHAOS
from diffseg_lightning.data.check import SplitReport, check_dataset
from diffseg_lightning.data.datamodule import SegmentationDataModule, zscore_per_channel
from diffseg_lightning.data.drive import DRIVE
from diffseg_lightning.data.folder import ImageFolder, PairedFolder, read_image
from diffseg_lightning.data.glas import GlaS
from diffseg_lightning.data.isic import ISIC
from diffseg_lightning.data.kvasir import KvasirSEG
from diffseg_lightning.data.lidc import LIDC
from diffseg_lightning.data.monuseg import MoNuSeg
from diffseg_lightning.data.nnunet import NNUNetRaw
from diffseg_lightning.data.ph2 import PH2
from diffseg_lightning.data.qubiq import QUBIQ
from diffseg_lightning.data.refuge import REFUGE
from diffseg_lightning.data.splits import check_split, split_by_fractions
from diffseg_lightning.data.synthetic import SyntheticSegmentation

__all__ = [
    "CHAOS",
    "DRIVE",
    "ISIC",
    "LIDC",
    "PH2",
    "QUBIQ",
    "REFUGE",
    "ArrayCache",
    "BraTS",
    "CaseDataset",
    "GlaS",
    "ImageFolder",
    "KvasirSEG",
    "MoNuSeg",
    "NNUNetRaw",
    "PairedFolder",
    "SegmentationDataModule",
    "SplitReport",
    "check_dataset",
    "SyntheticSegmentation",
    "check_split",
    "read_image",
    "split_by_fractions",
    "zscore_per_channel",
]
