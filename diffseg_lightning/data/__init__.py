"""Datasets in their official layouts, transforms, LightningDataModules and synthetic data."""

from diffseg_lightning.data.base import CaseDataset
from diffseg_lightning.data.brats import BraTS
from diffseg_lightning.data.cache import ArrayCache
from diffseg_lightning.data.chaos import CHAOS
from diffseg_lightning.data.check import SplitReport, check_dataset
from diffseg_lightning.data.datamodule import SegmentationDataModule, zscore_per_channel
from diffseg_lightning.data.drive import DRIVE
from diffseg_lightning.data.folder import ImageFolder, PairedFolder
from diffseg_lightning.data.glas import GlaS
from diffseg_lightning.data.groups import GroupsFromCSV
from diffseg_lightning.data.isic import ISIC
from diffseg_lightning.data.kvasir import KvasirSEG
from diffseg_lightning.data.label_fraction import LabelFraction
from diffseg_lightning.data.lidc import LIDC
from diffseg_lightning.data.monuseg import MoNuSeg
from diffseg_lightning.data.negatives import KvasirPolypCrops
from diffseg_lightning.data.nnunet import NNUNetRaw
from diffseg_lightning.data.nuclei_aug import AugmentedNuclei, KMeansLabelFraction, kmeans_subset
from diffseg_lightning.data.ph2 import PH2
from diffseg_lightning.data.qubiq import QUBIQ
from diffseg_lightning.data.refuge import REFUGE
from diffseg_lightning.data.splits import check_split, split_by_fractions
from diffseg_lightning.data.synthetic import SyntheticSegmentation
from diffseg_lightning.data.synthetic_angio import SyntheticAngiography
from diffseg_lightning.data.synthetic_dce import SyntheticDCE
from diffseg_lightning.data.synthetic_groups import SyntheticGroupSegmentation
from diffseg_lightning.data.synthetic_multimodal import SyntheticMultiModal
from diffseg_lightning.data.synthetic_shapes import SyntheticShapes
from diffseg_lightning.data.vessels import UnpairedVessels, vessel_tree
from diffseg_lightning.data.xcad import XCAD

__all__ = [
    "ArrayCache",
    "AugmentedNuclei",
    "BraTS",
    "CHAOS",
    "CaseDataset",
    "DRIVE",
    "GlaS",
    "GroupsFromCSV",
    "ISIC",
    "ImageFolder",
    "KMeansLabelFraction",
    "KvasirPolypCrops",
    "KvasirSEG",
    "LIDC",
    "LabelFraction",
    "MoNuSeg",
    "NNUNetRaw",
    "PH2",
    "PairedFolder",
    "QUBIQ",
    "REFUGE",
    "SegmentationDataModule",
    "SplitReport",
    "SyntheticAngiography",
    "SyntheticDCE",
    "SyntheticGroupSegmentation",
    "SyntheticMultiModal",
    "SyntheticSegmentation",
    "SyntheticShapes",
    "UnpairedVessels",
    "XCAD",
    "check_dataset",
    "check_split",
    "kmeans_subset",
    "split_by_fractions",
    "vessel_tree",
    "zscore_per_channel",
]
