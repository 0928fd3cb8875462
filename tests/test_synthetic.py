"""Tests of the embedded synthetic dataset (`diffseg_lightning.data.synthetic`)."""

from __future__ import annotations

import math
import multiprocessing as mp
import re

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch.utils.data import DataLoader

from diffseg_lightning.data.synthetic import SPLITS, SyntheticSegmentation

KEYS = {"image", "mask", "masks", "label", "instances", "case", "index"}


def _assert_items_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() == KEYS
    for key in KEYS - {"case"}:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key
    assert a["case"] == b["case"]


@pytest.fixture(scope="module")
def default_cases() -> list[dict]:
    """400 training cases with the default options (shared: generation is the cost here)."""
    ds = SyntheticSegmentation(num_cases=400)
    return [ds[i] for i in range(len(ds))]


@pytest.fixture(scope="module")
def annotator_cases() -> tuple[SyntheticSegmentation, list[dict]]:
    ds = SyntheticSegmentation(num_cases=120, num_annotators=3, seed=3)
    return ds, [ds[i] for i in range(len(ds))]


# ----------------------------------------------------------------------------- determinism
def test_same_index_twice_and_two_objects_are_identical() -> None:
    kwargs = dict(num_cases=20, channels=4, num_annotators=3, seed=7)
    ds1, ds2 = SyntheticSegmentation(**kwargs), SyntheticSegmentation(**kwargs)
    for i in (0, 3, 19):
        _assert_items_equal(ds1[i], ds1[i])
        _assert_items_equal(ds1[i], ds2[i])


def test_out_of_order_access_gives_the_same_items() -> None:
    ds = SyntheticSegmentation(num_cases=30)
    forward = {i: ds[i] for i in range(30)}
    fresh = SyntheticSegmentation(num_cases=30)
    for i in [29, 4, 17, 0, 4, 11]:
        _assert_items_equal(fresh[i], forward[i])
    _assert_items_equal(ds[-1], forward[29])
    _assert_items_equal(ds[torch.tensor(5)], forward[5])
    assert int(ds[-1]["index"]) == 29


def test_golden_anatomy_of_the_first_cases() -> None:
    # Pins the generator: the areas of the shapes of cases 0-7 (train, seed 0). A change
    # here changes every recorded result on the synthetic data, so it must be deliberate
    # (update these numbers and say so). Masks come from float64 geometry only, so they
    # do not depend on BLAS or thread counts.
    ds = SyntheticSegmentation(num_cases=8)
    areas = []
    for i in range(8):
        inst = ds[i]["instances"]
        areas.append([int((inst == k).sum()) for k in range(1, int(inst.max()) + 1)])
    assert areas == [[39, 39], [110], [256, 46], [120, 349, 90], [293, 398, 83], [217], [24], [456]]


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs the fork start method")
def test_items_are_the_same_in_worker_processes() -> None:
    ds = SyntheticSegmentation(num_cases=12, channels=3, num_annotators=2)
    loader = DataLoader(ds, batch_size=None, shuffle=False, num_workers=2, multiprocessing_context="fork")
    for item in loader:
        _assert_items_equal(item, ds[int(item["index"])])


def test_splits_and_seeds_give_disjoint_streams() -> None:
    n = 40

    def fingerprints(**kwargs: object) -> set[bytes]:
        ds = SyntheticSegmentation(num_cases=n, **kwargs)
        return {ds[i]["image"].numpy().tobytes() for i in range(n)}

    prints = {split: fingerprints(split=split) for split in SPLITS}
    prints["seed1"] = fingerprints(seed=1)
    assert all(len(p) == n for p in prints.values())
    names = list(prints)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not prints[a] & prints[b], (a, b)
    # The same index in two splits has different anatomy too, and the case names say which split.
    train, val = SyntheticSegmentation(num_cases=n), SyntheticSegmentation(num_cases=n, split="val")
    assert sum(not torch.equal(train[i]["mask"], val[i]["mask"]) for i in range(20)) >= 15
    assert train[17]["case"] == "synthetic-train-00017"
    assert val[3]["case"] == "synthetic-val-00003"


def test_anatomy_does_not_depend_on_channels_or_intensity_options() -> None:
    ref = SyntheticSegmentation(num_cases=15)
    others = [
        SyntheticSegmentation(num_cases=15, channels=3),
        SyntheticSegmentation(num_cases=15, channels=4, noise_std=0.3, bias_field=0.0, texture=0.5),
    ]
    for i in range(15):
        for ds in others:
            assert torch.equal(ds[i]["instances"], ref[i]["instances"])
            assert torch.equal(ds[i]["mask"], ref[i]["mask"])


# --------------------------------------------------------------------- shapes and dtypes
@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("annotators", [1, 3])
@pytest.mark.parametrize("size", [64, (48, 80)])
def test_shapes_dtypes_and_values(channels: int, annotators: int, size: int | tuple[int, int]) -> None:
    h, w = (size, size) if isinstance(size, int) else size
    ds = SyntheticSegmentation(num_cases=6, size=size, channels=channels, num_annotators=annotators)
    assert len(ds) == 6
    non_empty = 0
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == KEYS
        image, mask, masks = item["image"], item["mask"], item["masks"]
        assert image.shape == (channels, h, w) and image.dtype == torch.float32
        assert torch.isfinite(image).all()
        # Documented normalisation: each channel z-scored over the image.
        assert torch.allclose(image.mean(dim=(1, 2)), torch.zeros(channels), atol=1e-4)
        assert torch.allclose(image.std(dim=(1, 2), unbiased=False), torch.ones(channels), atol=1e-3)
        assert mask.shape == (1, h, w) and mask.dtype == torch.float32
        assert masks.shape == (annotators, h, w) and masks.dtype == torch.float32
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert set(masks.unique().tolist()) <= {0.0, 1.0}
        if annotators == 1:
            assert torch.equal(masks, mask)
        assert item["label"].dtype == torch.int64 and item["label"].shape == ()
        assert item["index"].dtype == torch.int64 and item["index"].shape == () and int(item["index"]) == i
        assert item["instances"].dtype == torch.int64 and item["instances"].shape == (h, w)
        assert isinstance(item["case"], str) and re.fullmatch(r"synthetic-train-\d{5}", item["case"])
        non_empty += int(item["label"])
    assert non_empty > 0


def test_default_collate_batches_items() -> None:
    ds = SyntheticSegmentation(num_cases=8, channels=3, num_annotators=2)
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 64, 64)
    assert batch["mask"].shape == (4, 1, 64, 64) and batch["masks"].shape == (4, 2, 64, 64)
    assert batch["label"].shape == (4,) and batch["index"].tolist() == [0, 1, 2, 3]
    assert batch["case"] == [f"synthetic-train-{i:05d}" for i in range(4)]


def test_index_out_of_range_raises_index_error() -> None:
    ds = SyntheticSegmentation(num_cases=5)
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(IndexError):
        ds[-6]


# ------------------------------------------------------------------ empty cases and labels
def test_empty_fraction_and_labels(default_cases: list[dict]) -> None:
    # 400 cases at p = 0.1: the number of empty cases is Binomial(400, 0.1), mean 40 and
    # sd 6; we allow 4 sd (24), a false alarm rate below 1e-4 (and the stream is seeded).
    empties = sum(not bool(item["mask"].any()) for item in default_cases)
    assert abs(empties - 40) <= 24, empties
    for item in default_cases:
        assert int(item["label"]) == int(bool(item["mask"].any()))
        assert torch.equal(item["masks"], item["mask"])


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_empty_fraction_other_values(fraction: float) -> None:
    # 200 cases: Binomial(200, 0.5) has sd 7.1, 4 sd = 28.3; 0 and 1 are exact.
    n = 200 if fraction == 0.5 else 40
    ds = SyntheticSegmentation(num_cases=n, empty_fraction=fraction, max_shapes=1, seed=5)
    empties = sum(not bool(ds[i]["mask"].any()) for i in range(n))
    tolerance = 4.0 * math.sqrt(n * fraction * (1.0 - fraction))
    assert abs(empties - n * fraction) <= tolerance, empties


# ---------------------------------------------------------------------------- instances
def test_instances_are_clean_and_contiguous(default_cases: list[dict]) -> None:
    counts, areas = [], []
    for item in default_cases:
        inst = item["instances"].numpy()
        mask = item["mask"][0].numpy().astype(bool)
        assert np.array_equal(inst > 0, mask)
        n = int(inst.max())
        assert np.array_equal(np.unique(inst[inst > 0]), np.arange(1, n + 1))  # ids 1..N, none missing
        # Shapes neither overlap nor touch: even with 8-connectivity, one component per id.
        labels8, n8 = ndimage.label(mask, structure=np.ones((3, 3)))
        assert n8 == n
        for k in range(1, n8 + 1):
            assert len(np.unique(inst[labels8 == k])) == 1
        for k in range(1, n + 1):  # and each shape is one 4-connected piece
            assert ndimage.label(inst == k)[1] == 1
            areas.append(int((inst == k).sum()))
        counts.append(n)
    assert max(counts) <= 3
    assert set(counts) == {0, 1, 2, 3}  # every count from 0 to max_shapes occurs
    # Sizes vary from small to large (64 px images: radius about 3 to 16 px).
    assert min(areas) < 40 and max(areas) > 400


# ----------------------------------------------------------------------------- annotators
def test_annotators_disagree_only_near_the_boundary(
    annotator_cases: tuple[SyntheticSegmentation, list[dict]],
) -> None:
    ds, cases = annotator_cases
    # By construction a pixel can change only where |SDF| < max_shift, i.e. within
    # max_shift + 0.5 px of the reference; measured from the inner boundary pixels (one
    # more half pixel), every disagreement lies within max_shift + 1 = 3 px at 64 px.
    tolerance = ds.max_shift + 1.0
    assert tolerance == 3.0
    ious, areas = [], np.zeros(3)
    for item in cases:
        mask = item["mask"][0].numpy().astype(bool)
        masks = item["masks"].numpy().astype(bool)
        if not mask.any():
            assert not masks.any()
            continue
        boundary = mask & ~ndimage.binary_erosion(mask, border_value=1)
        dist_to_boundary = ndimage.distance_transform_edt(~boundary)
        disagree = (masks != mask[None]).any(0) | (masks != masks[:1]).any(0)
        assert disagree.any()
        assert dist_to_boundary[disagree].max() <= tolerance
        for a in range(3):
            for b in range(a + 1, 3):
                union = (masks[a] | masks[b]).sum()
                ious.append((masks[a] & masks[b]).sum() / union if union else 1.0)
        areas += masks.sum(axis=(1, 2))
    ious = np.array(ious)
    assert len(ious) >= 3 * 90
    assert ious.max() < 1.0  # annotators always differ on a non-empty case
    # High agreement (measured: mean 0.72, median 0.74; small shapes of radius ~3 px, where
    # one pixel ring is a third of the area, pull the mean down).
    assert ious.mean() > 0.65 and np.median(ious) > 0.68
    # Annotator styles: annotator 0 tends to erode, annotator 2 to dilate.
    assert areas[0] < areas[1] < areas[2]


def test_annotators_differ_from_the_reference_only_near_the_boundary_at_other_sizes() -> None:
    ds = SyntheticSegmentation(num_cases=10, size=(96, 128), num_annotators=4, empty_fraction=0.0)
    for i in range(len(ds)):
        item = ds[i]
        mask = item["mask"][0].numpy().astype(bool)
        masks = item["masks"].numpy().astype(bool)
        boundary = mask & ~ndimage.binary_erosion(mask, border_value=1)
        dist = ndimage.distance_transform_edt(~boundary)
        changed = (masks != mask[None]).any(0)
        assert changed.any() and dist[changed].max() <= ds.max_shift + 1.0


def test_coinciding_annotators_are_told_apart_by_one_boundary_pixel() -> None:
    # Case 147 of seed 3 (a 37 px shape) is one where annotators 0 and 1 draw the same level
    # set (measured with the tie-break disabled: 0 differing pixels). The tie-break flips
    # exactly one pixel of annotator 1, on the boundary ring.
    ds = SyntheticSegmentation(num_cases=300, num_annotators=3, seed=3)
    item = ds[147]
    mask = item["mask"][0].numpy().astype(bool)
    masks = item["masks"].numpy().astype(bool)
    assert mask.sum() == 37
    flipped = masks[0] != masks[1]
    assert flipped.sum() == 1
    ring = (mask & ~ndimage.binary_erosion(mask, border_value=1)) | (ndimage.binary_dilation(mask) & ~mask)
    assert ring[flipped].all()


# ----------------------------------------------------------------------------- difficulty
def _best_threshold_dice(images: np.ndarray, masks: np.ndarray) -> float:
    """Best pooled Dice of one global cut, over 161 thresholds in [-4, 4] and both polarities.

    Exact for every threshold of the grid: histograms of the foreground and background
    values on the grid's bins give the true and false positives of every cut at once.

    Args:
        images: ``(N, H, W)`` channel-0 images (z-scored).
        masks: bool ``(N, H, W)``.

    Returns:
        The best Dice.
    """
    edges = np.concatenate([[-np.inf], np.linspace(-4.0, 4.0, 161), [np.inf]])
    fg = np.histogram(images[masks], edges)[0]
    bg = np.histogram(images[~masks], edges)[0]
    ref = masks.sum()
    # Predict "x > t" for t = edges[k]: everything in bins k.. (values equal to t are measure zero).
    tp_above, fp_above = np.cumsum(fg[::-1])[::-1], np.cumsum(bg[::-1])[::-1]
    tp_below, fp_below = ref - tp_above, (~masks).sum() - fp_above  # predict "x < t"
    dice_above = 2.0 * tp_above / (tp_above + fp_above + ref)
    dice_below = 2.0 * tp_below / (tp_below + fp_below + ref)
    return float(max(dice_above.max(), dice_below.max()))


def test_not_thresholdable_by_one_global_cut(default_cases: list[dict]) -> None:
    images = np.stack([item["image"][0].numpy() for item in default_cases[:200]])
    masks = np.stack([item["mask"][0].numpy() > 0.5 for item in default_cases[:200]])
    best = _best_threshold_dice(images, masks)
    # Measured 0.54 with the defaults. Bound 0.75: well above the measurement (no flakiness
    # from small changes) and well below the ~0.9 + that a single cut reaches when the
    # lesion contrast is not hidden by texture and bias field (next test), so this test
    # fails if the background stops competing with the lesions.
    assert best < 0.75, best


def test_threshold_metric_detects_an_easy_dataset() -> None:
    # Control for the test above: no texture, no bias field, little noise -> a cut works.
    ds = SyntheticSegmentation(num_cases=100, noise_std=0.02, bias_field=0.0, texture=0.0)
    items = [ds[i] for i in range(len(ds))]
    images = np.stack([item["image"][0].numpy() for item in items])
    masks = np.stack([item["mask"][0].numpy() > 0.5 for item in items])
    assert _best_threshold_dice(images, masks) > 0.85


def test_lesion_contrast_has_the_documented_sign_per_channel() -> None:
    # Learnable: the lesion is brighter (ch 0, 2) or darker (ch 1) than its surroundings
    # in nearly every case, and channel 3 has a bright rim around a darker core.
    ds = SyntheticSegmentation(num_cases=80, channels=4, empty_fraction=0.0)
    signs = []
    for i in range(len(ds)):
        item = ds[i]
        image, mask = item["image"].numpy(), item["mask"][0].numpy().astype(bool)
        ring = ndimage.binary_dilation(mask, iterations=4) & ~ndimage.binary_dilation(mask, iterations=1)
        inside = image[:, mask].mean(1)
        around = image[:, ring].mean(1)
        core = ndimage.binary_erosion(mask, iterations=3)
        rim = mask & ~ndimage.binary_erosion(mask, iterations=2, border_value=1)
        rim_vs_core = image[3, rim].mean() - image[3, core].mean() if core.any() else np.nan
        signs.append([inside[0] > around[0], inside[1] < around[1], inside[2] > around[2], rim_vs_core])
    signs = np.array(signs, dtype=float)
    assert signs[:, 0].mean() > 0.95 and signs[:, 1].mean() > 0.95 and signs[:, 2].mean() > 0.75
    assert np.nanmean(signs[:, 3] > 0) > 0.9


# ----------------------------------------------------------------------------- bad options
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"channels": 2}, "channels"),
        ({"channels": 0}, "channels"),
        ({"size": 0}, "size"),
        ({"size": -64}, "size"),
        ({"size": (64, 0)}, "size"),
        ({"size": (64,)}, "size"),
        ({"size": 64.0}, "size"),
        ({"split": "training"}, "split"),
        ({"split": "Train"}, "split"),
        ({"empty_fraction": -0.1}, "empty_fraction"),
        ({"empty_fraction": 1.5}, "empty_fraction"),
        ({"empty_fraction": float("nan")}, "empty_fraction"),
        ({"num_cases": 0}, "num_cases"),
        ({"num_annotators": 0}, "num_annotators"),
        ({"max_shapes": 0}, "max_shapes"),
        ({"noise_std": -1.0}, "noise_std"),
        ({"bias_field": -0.1}, "bias_field"),
        ({"texture": -0.1}, "texture"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_options_raise_value_error_naming_the_option(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        SyntheticSegmentation(**kwargs)
