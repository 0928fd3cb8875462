"""Reading files as arrays, below the datasets: file names and listings (:mod:`~diffseg_lightning.io.files`),
2D images, label maps and mask files (:mod:`~diffseg_lightning.io.images`), NIfTI volumes
(:mod:`~diffseg_lightning.io.volumes`), and writers of PNG and NIfTI outputs. Every error names the file. This package imports nothing of
``diffseg_lightning`` but :mod:`~diffseg_lightning.exceptions`."""

from diffseg_lightning.io.files import (
    IMAGE_SUFFIXES,
    NIFTI_SUFFIXES,
    broken_link,
    file_stem,
    is_nifti,
    list_images,
    same_stems,
)
from diffseg_lightning.io.images import (
    channels_first,
    png_writer,
    read_grey,
    read_image,
    read_label_map,
    read_mask_file,
    unreadable,
)
from diffseg_lightning.io.volumes import (
    check_same_grid,
    load_nifti,
    nifti_layout,
    nifti_writer,
    read_nifti_array,
    read_nifti_data,
    read_nifti_item,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "NIFTI_SUFFIXES",
    "broken_link",
    "channels_first",
    "check_same_grid",
    "file_stem",
    "is_nifti",
    "list_images",
    "load_nifti",
    "nifti_layout",
    "nifti_writer",
    "png_writer",
    "read_grey",
    "read_image",
    "read_label_map",
    "read_mask_file",
    "read_nifti_array",
    "read_nifti_data",
    "read_nifti_item",
    "same_stems",
    "unreadable",
]
