"""The nuclei structure of Yu et al. (MICCAI 2023) and its Hover-Net inversion to instance maps, batched.

Yu, Li, Lou, Liu, Wan, Chen & Li, "Diffusion-Based Data Augmentation for Nuclei Image Segmentation",
MICCAI 2023 (Nudiff): a *nuclei structure* is a 3-channel image, the pixel-level semantic map (+1 nucleus,
-1 background) and the horizontal and vertical distance maps of Hover-Net (Graham et al., "HoVer-Net:
Simultaneous segmentation and classification of nuclei in multi-tissue histology images", MedIA 58, 2019):
each nucleus pixel's offset from its nucleus centroid, normalised per nucleus and per side to [-1, 0) and
(0, 1] (0 on the background).

Encoding (:func:`hover_maps`, :func:`structure_from_instances`): the maps of MONAI's
:class:`monai.transforms.ComputeHoVerMaps` (one ``skimage.measure.regionprops`` loop per image), computed
here for a whole (B, H, W) batch at once with scatter reductions over the instance ids (``torch``, any
device), so the downstream network can build its targets on the fly. ``tests/test_nuclei_aug.py`` checks
the two against each other.

Inversion (:func:`instances_from_hover`, :func:`instances_from_structure`): the Hover-Net post-processing
as MONAI's :class:`~monai.apps.pathology.transforms.post.array.HoVerNetInstanceMapPostProcessing` performs
it (its defaults: foreground threshold 0.5, objects under 10 px removed, 5x5 Sobel kernels, Gaussian
smoothing sigma 1, marker threshold 0.4, marker opening with a disk of radius 2, watershed with
4-connectivity): min-max normalised maps, Sobel gradients (``d h / d x`` and ``d v / d y``), the
"uncertain" energy ``max(1 - norm(sobel_h), 1 - norm(sobel_v))`` inside the mask, markers = mask minus the
uncertain area (holes filled, opened, labelled, small ones removed), then a marker-controlled watershed of
the smoothed ``-(1 - energy) * mask``. MONAI's transform works on one image and also builds contours; here
the convolutions run on a (N, H, W) stack in torch (MONAI's own ``SobelGradients`` and ``GaussianSmooth``)
and the morphology and watershed run once on the (N, H, W) stack with 2-D-only structuring elements (no
connection between images), so N images cost one call each of scipy / scikit-image. The test checks the
result equals MONAI's transform image by image.

Here, below every layer that uses it (the HoVer-Net and nuclei-augmentation methods build their targets
and instance maps with it, and a dataset may), not in ``data/``: it is maths on label maps, not data loading.

The eight combinations (:func:`instances_from_structure`): a generated structure may come out with the two
distance maps swapped or with a sign flipped (the network only learns "an" offset field). Like the
authors, every structure is inverted under the 2 x 2 x 2 swap / sign-of-h / sign-of-v combinations, all
8 B of them in one batched call, and the instance map with the most instances is kept (ties: the first
combination in :data:`COMBINATIONS` order, the identity first).
"""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import GaussianSmooth, SobelGradients
from scipy import ndimage
from skimage.morphology import disk, opening
from skimage.segmentation import watershed

from diffseg_lightning.exceptions import ConfigError

#: The eight (swap, sign of h, sign of v) combinations tried per structure, the identity first.
COMBINATIONS: tuple[tuple[bool, int, int], ...] = tuple(
    (swap, sh, sv) for swap in (False, True) for sh in (1, -1) for sv in (1, -1)
)


def hover_maps(instances: torch.Tensor) -> torch.Tensor:
    """Hover-Net's horizontal and vertical maps of a batch of instance maps (MONAI's ``ComputeHoVerMaps``).

    For each instance with centroid (r_c, c_c) (mean pixel coordinate), a pixel at (r, c) gets
    ``h = (c - c_c) / max_k(c_k - c_c)`` where ``c > c_c`` and ``h = (c - c_c) / -min_k(c_k - c_c)`` where
    ``c < c_c`` (k over the instance's pixels), so h lies in [-1, 1] with -1 and 1 at its extreme columns;
    ``v`` likewise with rows. Background pixels are 0.

    Args:
        instances: (B, H, W) or (H, W) integer instance ids, 0 background (ids need not be consecutive).

    Returns:
        (B, 2, H, W) float32 (or (2, H, W) for one map): channel 0 horizontal, channel 1 vertical.
    """
    if instances.is_floating_point() or instances.dtype == torch.bool:
        raise ConfigError(f"hover_maps needs an integer instance map, got dtype {instances.dtype}")
    single = instances.dim() == 2
    if single:
        instances = instances[None]
    if instances.dim() != 3:
        raise ConfigError(f"hover_maps needs (B, H, W) or (H, W) instance maps, got {tuple(instances.shape)}")
    b, h, w = instances.shape
    device = instances.device
    ids = instances.long()
    if ids.numel() and int(ids.min()) < 0:
        raise ConfigError(f"instance ids must be >= 0 (0 is background), got a minimum of {int(ids.min())}")
    # one global id per (image, instance): compact them so the scatter buffers stay small
    flat = (
        ids + torch.arange(b, device=device)[:, None, None] * (int(ids.max()) + 1 if ids.numel() else 1)
    ).flatten()
    uniq, inverse = torch.unique(flat, return_inverse=True)
    n = uniq.numel()
    rows = torch.arange(h, device=device, dtype=torch.float64)[None, :, None].expand(b, h, w).flatten()
    cols = torch.arange(w, device=device, dtype=torch.float64)[None, None, :].expand(b, h, w).flatten()
    count = torch.zeros(n, dtype=torch.float64, device=device).index_add_(0, inverse, torch.ones_like(rows))
    out = []
    for coord in (cols, rows):  # h (columns) first, then v (rows), as ComputeHoVerMaps stacks them
        centre = torch.zeros(n, dtype=torch.float64, device=device).index_add_(0, inverse, coord) / count
        dist = coord - centre[inverse]
        low = torch.zeros(n, dtype=torch.float64, device=device).scatter_reduce_(
            0, inverse, dist, "amin", include_self=True
        )
        high = torch.zeros(n, dtype=torch.float64, device=device).scatter_reduce_(
            0, inverse, dist, "amax", include_self=True
        )
        scale = torch.where(dist < 0, -low[inverse], high[inverse])
        value = torch.where(dist != 0, dist / torch.where(scale > 0, scale, torch.ones_like(scale)), 0.0)
        out.append(torch.where(ids.flatten() > 0, value, 0.0).reshape(b, h, w))
    maps = torch.stack(out, 1).float()
    return maps[0] if single else maps


def structure_from_instances(instances: torch.Tensor) -> torch.Tensor:
    """The 3-channel nuclei structure of Yu et al.: (semantic +1/-1, horizontal, vertical).

    Args:
        instances: (B, H, W) or (H, W) integer instance ids, 0 background.

    Returns:
        (B, 3, H, W) float32 (or (3, H, W)) in [-1, 1]: channel 0 is +1 on nuclei and -1 elsewhere.
    """
    maps = hover_maps(instances)
    semantic = (instances > 0).float() * 2.0 - 1.0
    return torch.cat([semantic.unsqueeze(-3), maps], dim=-3)


def _labels_2d(stack: np.ndarray, connectivity: int) -> np.ndarray:
    """Connected components of every (H, W) slice of a (N, H, W) boolean stack, with ids unique over N."""
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = ndimage.generate_binary_structure(2, connectivity)
    return ndimage.label(stack, structure=structure)[0]


def _remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Zero the labels covering fewer than ``min_size`` pixels (skimage's ``remove_small_objects`` on labels)."""
    if min_size <= 0:
        return labels
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    return np.where(small[labels], 0, labels)


def _minmax(x: torch.Tensor) -> torch.Tensor:
    """Per-image min-max normalisation of a (N, H, W) stack to [0, 1] (a constant image gives 0)."""
    low = x.amin(dim=(-2, -1), keepdim=True)
    span = x.amax(dim=(-2, -1), keepdim=True) - low
    return (x - low) / torch.where(span > 0, span, torch.ones_like(span))


def instances_from_hover(
    foreground: torch.Tensor,
    hv: torch.Tensor,
    threshold: float = 0.5,
    min_object_size: int = 10,
    sobel_kernel_size: int = 5,
    marker_threshold: float = 0.4,
    marker_radius: int = 2,
    smooth_sigma: float = 1.0,
) -> torch.Tensor:
    """Hover-Net post-processing of N images at once: foreground probability + hv maps -> instance maps.

    The steps and defaults of MONAI's ``HoVerNetInstanceMapPostProcessing`` (see the module docstring),
    on a stack. An image whose maps are constant (no gradient: e.g. no nucleus) gives no instance rather
    than MONAI's ``ValueError``.

    Args:
        foreground: (N, H, W) foreground probability; ``>= threshold`` is nucleus.
        hv: (N, 2, H, W) horizontal and vertical maps.
        threshold: foreground threshold.
        min_object_size: foreground components and markers smaller than this (pixels) are removed.
        sobel_kernel_size: Sobel kernel size (odd).
        marker_threshold: energy above which a pixel is "uncertain" (not a marker).
        marker_radius: radius of the disk opening the markers.
        smooth_sigma: sigma of the Gaussian smoothing of the distance map.

    Returns:
        (N, H, W) int64 instance maps (ids 1..K per image, consecutive from 1; 0 background), on the input's
        device.
    """
    if foreground.dim() != 3 or hv.dim() != 4 or hv.shape[1] != 2 or hv.shape[0] != foreground.shape[0]:
        raise ConfigError(
            f"instances_from_hover needs foreground (N, H, W) and hv (N, 2, H, W); got "
            f"{tuple(foreground.shape)} and {tuple(hv.shape)}"
        )
    device = foreground.device
    n = foreground.shape[0]
    fg = (foreground.detach().float().cpu() >= threshold).numpy()
    blobs = _remove_small(_labels_2d(fg, 1), min_object_size) > 0  # GenerateWatershedMask
    mask = torch.from_numpy(blobs.astype(np.float32))
    hv = hv.detach().float().cpu()
    sobel = SobelGradients(kernel_size=sobel_kernel_size)
    grad_h = sobel(_minmax(hv[:, 0]))[n:]  # SobelGradients stacks d/d(row) of every image, then d/d(col)
    grad_v = sobel(_minmax(hv[:, 1]))[:n]
    energy = torch.maximum(1.0 - _minmax(grad_h), 1.0 - _minmax(grad_v))  # GenerateInstanceBorder
    flat = (grad_h.flatten(1).amax(1) == grad_h.flatten(1).amin(1)) | (
        grad_v.flatten(1).amax(1) == grad_v.flatten(1).amin(1)
    )
    energy = (energy - (1.0 - mask)).clamp(min=0.0)
    distance = -GaussianSmooth(sigma=smooth_sigma)((1.0 - energy) * mask).numpy()  # GenerateDistanceMap
    # GenerateWatershedMarkers: certain foreground, holes filled (8-connected background), opened, labelled
    marker = (mask.numpy() - (energy.numpy() >= marker_threshold)).clip(min=0) > 0
    background = np.zeros((3, 3, 3), bool)
    background[1] = ndimage.generate_binary_structure(2, 2)
    outside = ndimage.binary_dilation(
        np.zeros_like(marker), structure=background, iterations=-1, mask=~marker, border_value=1
    )
    marker = ~outside
    marker = opening(marker.astype(np.float32), disk(marker_radius)[None]) > 0
    markers = _remove_small(_labels_2d(marker, 1), min_object_size)
    connectivity = np.zeros((3, 3, 3), bool)
    connectivity[1] = ndimage.generate_binary_structure(2, 1)
    labels = watershed(distance, markers=markers, mask=blobs, connectivity=connectivity)
    labels[flat.numpy()] = 0
    # consecutive ids per image
    out = np.zeros_like(labels, dtype=np.int64)
    for i in range(n):  # one relabelling per image (np.unique), never per pixel
        _, inverse = np.unique(labels[i], return_inverse=True)
        out[i] = (
            inverse.reshape(labels[i].shape) if labels[i].min() == 0 else inverse.reshape(labels[i].shape) + 1
        )
    return torch.from_numpy(out).to(device)


def combination_variants(structure: torch.Tensor) -> torch.Tensor:
    """The 8 swap / sign variants of the distance maps of a (B, 3, H, W) structure: (B, 8, 3, H, W).

    Variant k applies :data:`COMBINATIONS` ``[k] = (swap, sign_h, sign_v)``: the maps are swapped first
    when ``swap``, then multiplied by ``sign_h`` and ``sign_v``; the semantic channel is unchanged.
    """
    h, v = structure[:, 1], structure[:, 2]
    variants = []
    for swap, sign_h, sign_v in COMBINATIONS:
        first, second = (v, h) if swap else (h, v)
        variants.append(torch.stack([structure[:, 0], sign_h * first, sign_v * second], 1))
    return torch.stack(variants, 1)


def instances_from_structure(
    structure: torch.Tensor, try_combinations: bool = True, **kwargs: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert (B, 3, H, W) nuclei structures to instance maps, keeping the best of 8 swap / sign variants.

    Args:
        structure: (B, 3, H, W): semantic map in [-1, 1] (nucleus where ``(s + 1) / 2 >= threshold``, i.e.
            ``s >= 0`` at the default 0.5), horizontal and vertical maps.
        try_combinations: try the 8 combinations (Yu et al.); False inverts the structure as it is.
        **kwargs: options of :func:`instances_from_hover`.

    Returns:
        ``(instances, combination)``: (B, H, W) int64 instance maps and (B,) int64 index into
        :data:`COMBINATIONS` of the variant kept (the one with most instances; ties: the lowest index).
    """
    if structure.dim() != 4 or structure.shape[1] != 3:
        raise ConfigError(f"a nuclei structure is (B, 3, H, W), got {tuple(structure.shape)}")
    b, _, h, w = structure.shape
    variants = combination_variants(structure) if try_combinations else structure[:, None]
    k = variants.shape[1]
    flat = variants.flatten(0, 1)  # (B k, 3, H, W): every variant of every structure in one call
    labels = instances_from_hover((flat[:, 0] + 1.0) / 2.0, flat[:, 1:], **kwargs).reshape(b, k, h, w)
    counts = labels.flatten(2).amax(2)  # ids are consecutive, so the largest id is the count
    best = counts.argmax(1)  # first maximum: the identity wins ties
    return labels[torch.arange(b, device=labels.device), best], best


__all__ = [
    "COMBINATIONS",
    "combination_variants",
    "hover_maps",
    "instances_from_hover",
    "instances_from_structure",
    "structure_from_instances",
]
