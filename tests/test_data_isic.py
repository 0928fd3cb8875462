"""ISIC 2016 / 2017 / 2018 in their official layouts: tiny replicas with the releases' names and quirks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config
from hydra.utils import instantiate
from PIL import Image

from diffseg_lightning.data.isic import ISIC, ISIC_LAYOUT, read_jpeg
from diffseg_lightning.data.masks import present_values
from diffseg_lightning.data.splits import kfold, split_by_fractions
from diffseg_lightning.data.transforms import resize
from diffseg_lightning.io.images import read_image
from diffseg_lightning.utils.errors import DiffSegError

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = [(24, 32), (30, 40), (28, 28)]  # (H, W): sizes vary per image, as in the releases
COUNTS = {
    2016: {"train": 10, "test": 3},
    2017: {"train": 6, "val": 2, "test": 3},
    2018: {"train": 5, "val": 2, "test": 3},
}
FIRST_ID = {"train": 0, "val": 1000, "test": 2000}  # ids are 7 digits; each set has its own


def lesion(case: int, shape) -> np.ndarray:
    """A 0/255 mask: a rectangle whose place depends on the case."""
    mask = np.zeros(shape, np.uint8)
    y, x = 2 + case % 4, 3 + case % 5
    mask[y : y + 9, x : x + 11] = 255
    return mask


def write_isic(root: Path, year: int, counts: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """The year's official folders under ``root``, with the extra files the releases hold; returns the true
    0/255 masks by image name (``ISIC_0000012``)."""
    rng = np.random.default_rng(year)
    truth = {}
    for split, count in (counts or COUNTS[year]).items():
        image_dir, mask_dir, suffix = (
            root / name if i < 2 else name for i, name in enumerate(ISIC_LAYOUT[year][split])
        )
        image_dir.mkdir(parents=True)
        mask_dir.mkdir(parents=True)
        (image_dir / "LICENSE.txt").write_text("CC-BY-NC")
        (image_dir / "ATTRIBUTION.txt").write_text("ISIC Archive contributors")
        (image_dir / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
        (mask_dir / "LICENSE.txt").write_text("CC-BY-NC")
        for k in range(count):
            number = FIRST_ID[split] + 3 * k + 1
            name = f"ISIC_{number:07d}"
            h, w = SIZES[k % len(SIZES)]
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(image_dir / f"{name}.jpg")
            truth[name] = lesion(number, (h, w))
            Image.fromarray(truth[name]).save(mask_dir / f"{name}{suffix}.png")
            if year == 2017:  # the 2017 data folders hold Part 2's superpixel maps beside the images
                sp = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
                Image.fromarray(sp).save(image_dir / f"{name}_superpixels.png")
        if year == 2017:
            (image_dir / f"{image_dir.name}_metadata.csv").write_text("image_id,age_approximate,sex\n")
    return truth


def ids(data: ISIC) -> list[str]:
    return [Path(image).stem for image, _ in data.cases]


def test_replica_quirks_are_real(tmp_path):
    write_isic(tmp_path, 2017)
    data_dir = tmp_path / "ISIC-2017_Training_Data"
    names = sorted(p.name for p in data_dir.iterdir())
    assert "ISIC_0000001_superpixels.png" in names and "LICENSE.txt" in names and ".DS_Store" in names
    assert len(names) == 6 * 2 + 4  # images, superpixels, LICENSE, ATTRIBUTION, .DS_Store, metadata
    with Image.open(
        tmp_path / "ISIC-2017_Training_Part1_GroundTruth" / "ISIC_0000001_segmentation.png"
    ) as img:
        assert img.format == "PNG" and img.mode == "L"
        assert np.unique(np.asarray(img)).tolist() == [0, 255]


@pytest.mark.parametrize("year", [2016, 2017, 2018])
def test_items_and_official_splits(tmp_path, year):
    truth = write_isic(tmp_path, year)
    sizes = {split: len(ISIC(tmp_path, split, year=year, size=None)) for split in ("train", "val", "test")}
    if year == 2016:  # no official validation set: a seeded 0.2 of the 10 Training images
        assert sizes == {"train": 8, "val": 2, "test": 3}
    else:
        assert sizes == COUNTS[year]
    data = ISIC(tmp_path, "test", year=year, size=None)
    assert ids(data) == ["ISIC_0002001", "ISIC_0002004", "ISIC_0002007"]  # numeric order, superpixels ignored
    for i in range(len(data)):
        item = data[i]
        name = Path(item["case"]).stem
        h, w = truth[name].shape
        assert item["case"].endswith(f"{ISIC_LAYOUT[year]['test'][0]}/{name}.jpg")
        assert item["image"].dtype == torch.float32 and item["image"].shape == (3, h, w)
        assert torch.equal(
            item["image"], torch.from_numpy(read_image(Path(item["case"])))
        )  # 0..255, full decode
        assert item["mask"].dtype == torch.float32 and item["mask"].shape == (1, h, w)
        assert torch.equal(item["mask"][0], torch.from_numpy(truth[name] == 255).float())
        assert item["original_size"].tolist() == [h, w] and int(item["index"]) == i
    assert data.seen_labels == {0, 255}


def test_resized_items_share_a_shape_and_masks_stay_binary(tmp_path):
    truth = write_isic(tmp_path, 2018)
    data = ISIC(tmp_path, "train", size=(12, 16))
    for i in range(len(data)):
        item = data[i]
        assert item["image"].shape == (3, 12, 16) and item["mask"].shape == (1, 12, 16)
        stored = torch.from_numpy(truth[data.ids[i]] == 255).float()[None]
        assert torch.equal(item["mask"], resize(stored, (12, 16), "nearest"))  # nearest on the stored mask
        assert item["original_size"].tolist() == list(truth[data.ids[i]].shape)


def test_year_selects_the_folders(tmp_path):
    write_isic(tmp_path, 2016)
    write_isic(tmp_path, 2017)
    assert ISIC(tmp_path, "test", year=2016).image_dir.name == "ISBI2016_ISIC_Part1_Test_Data"
    assert ISIC(tmp_path, "test", year=2017).image_dir.name == "ISIC-2017_Test_v2_Data"
    assert len(ISIC(tmp_path, "val", year=2017)) == 2  # the official validation folder
    with pytest.raises(DiffSegError, match=r"no ISIC2018_Task1-2_Training_Input folder .*expected "):
        ISIC(tmp_path, "train", year=2018)
    with pytest.raises(ValueError, match=r"year must be one of \(2016, 2017, 2018\), got 2019"):
        ISIC(tmp_path, year=2019)
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'val', 'test'\)"):
        ISIC(tmp_path, "validation", year=2017)


def test_folders_may_sit_in_one_folder_each(tmp_path):
    """Downloads kept as <root>/<zip name>/<folder>: each official folder is found one level down."""
    write_isic(tmp_path / "ISIC2018_Task1-2_Training_Input_zip", 2018, {"train": 3})
    (tmp_path / "ISIC2018_Task1-2_Training_Input_zip" / "ISIC2018_Task1_Training_GroundTruth").rename(
        tmp_path / "ISIC2018_Task1_Training_GroundTruth"
    )
    assert len(ISIC(tmp_path, "train")) == 3


def test_2016_val_is_carved_from_training(tmp_path):
    write_isic(tmp_path, 2016)
    train, val = (ids(ISIC(tmp_path, s, year=2016)) for s in ("train", "val"))
    everything = sorted(f"ISIC_{3 * k + 1:07d}" for k in range(10))
    assert sorted(train + val) == everything and not set(train) & set(val)
    expected = split_by_fractions(10, (0.8, 0.2), 0)[1]  # train_val_split's seeded shuffle
    assert val == [everything[i] for i in expected]
    assert ids(ISIC(tmp_path, "val", year=2016)) == val  # deterministic
    assert len(ISIC(tmp_path, "val", year=2016, val_fraction=0.5)) == 5
    assert ids(ISIC(tmp_path, "val", year=2016, seed=3)) != val


@pytest.mark.parametrize("year", [2016, 2017])
def test_kfold_partitions_the_training_images(tmp_path, year):
    write_isic(tmp_path, year)
    count = COUNTS[year]["train"]
    everything = sorted(f"ISIC_{3 * k + 1:07d}" for k in range(count))
    vals = []
    for fold in range(3):
        train, val = (ids(ISIC(tmp_path, s, year=year, folds=3, fold=fold)) for s in ("train", "val"))
        assert sorted(train + val) == everything and not set(train) & set(val)
        assert val == [everything[i] for i in kfold(count, 3, 0)[fold]]
        vals.append(val)
    assert sorted(sum(vals, [])) == everything  # the val folds partition Training
    assert len(ISIC(tmp_path, "test", year=year, folds=3, fold=1)) == 3  # test stays official
    with pytest.raises(ValueError, match=r"data.fold must lie in \[0, data.folds = 3\)"):
        ISIC(tmp_path, "val", year=year, folds=3, fold=3)


def test_missing_split_folders_are_named(tmp_path):
    write_isic(tmp_path, 2018, {"train": 3})  # only Training downloaded
    assert len(ISIC(tmp_path, "train")) == 3
    with pytest.raises(
        DiffSegError, match=r"no ISIC2018_Task1-2_Test_Input folder \(the test images of ISIC 2018"
    ):
        ISIC(tmp_path, "test")
    with pytest.raises(DiffSegError, match=r"ISIC2018_Task1-2_Validation_Input"):
        ISIC(tmp_path, "val")
    (tmp_path / "ISIC2018_Task1-2_Test_Input").mkdir()
    (tmp_path / "ISIC2018_Task1-2_Test_Input" / "LICENSE.txt").write_text("CC-BY-NC")
    with pytest.raises(DiffSegError, match=r"no ISIC2018_Task1_Test_GroundTruth folder \(the test masks"):
        ISIC(tmp_path, "test")
    (tmp_path / "ISIC2018_Task1_Test_GroundTruth").mkdir()
    with pytest.raises(DiffSegError, match=r"ISIC2018_Task1-2_Test_Input: no ISIC_<id>\.jpg images"):
        ISIC(tmp_path, "test")
    with pytest.raises(DiffSegError, match="does not exist"):
        ISIC(tmp_path / "absent")


def test_a_missing_mask_is_named_or_skipped(tmp_path):
    write_isic(tmp_path, 2016)
    gt = tmp_path / "ISBI2016_ISIC_Part1_Training_GroundTruth"
    val = ids(ISIC(tmp_path, "val", year=2016))
    (gt / f"{val[0]}_Segmentation.png").unlink()
    expected = (
        rf"ISBI2016_ISIC_Part1_Training_Data/{val[0]}\.jpg: no mask; expected .*{val[0]}_Segmentation\.png"
    )
    with pytest.raises(DiffSegError, match=expected):
        ISIC(tmp_path, "train", year=2016)  # the val image's missing mask is found when train is built
    skipped = ISIC(tmp_path, "val", year=2016, on_bad_case="skip")
    assert ids(skipped) == val[1:]
    assert len(skipped.skipped) == 1 and skipped.skipped[0][0].endswith(f"{val[0]}.jpg")
    assert "no mask" in skipped.skipped[0][1]
    train = ISIC(tmp_path, "train", year=2016, on_bad_case="skip")
    assert len(train) == 8 and train.skipped == []  # the other split keeps its cases
    with pytest.raises(ValueError, match=r"on_bad_case must be one of \('error', 'skip'\)"):
        ISIC(tmp_path, "train", year=2016, on_bad_case="ignore")


def test_corrupt_files_and_bad_masks_name_the_file(tmp_path):
    write_isic(tmp_path, 2018, {"test": 3})
    images, gt = tmp_path / "ISIC2018_Task1-2_Test_Input", tmp_path / "ISIC2018_Task1_Test_GroundTruth"
    first, second, third = ids(ISIC(tmp_path, "test"))
    data = (images / f"{first}.jpg").read_bytes()
    (images / f"{first}.jpg").write_bytes(data[: len(data) // 2])  # truncated download
    (images / f"{second}.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    mask = np.asarray(Image.open(gt / f"{third}_segmentation.png")).copy()
    mask[0, 0] = 128  # an "uncertain" border value: not in the official 0/255
    Image.fromarray(mask).save(gt / f"{third}_segmentation.png")
    for size in (None, 8):  # full decode and draft decode alike
        data = ISIC(tmp_path, "test", size=size)
        with pytest.raises(DiffSegError, match=rf"{first}\.jpg: not a readable image"):
            data[0]
        with pytest.raises(DiffSegError, match=rf"{second}\.jpg: not a readable image"):
            data[1]
        with pytest.raises(
            DiffSegError,
            match=rf"{third}_segmentation\.png: mask values 0, 128, 255 are not those of a binary ISIC mask",
        ):
            data[2]
    Image.new("L", (5, 7)).save(gt / f"{third}_segmentation.png")
    with pytest.raises(DiffSegError, match=rf"{third}_segmentation\.png: mask size \(7, 5\) .*differs"):
        ISIC(tmp_path, "test", size=8)[2]
    Image.new("L", (28, 28)).save(images / f"{third}.jpg")
    with pytest.raises(
        DiffSegError, match=rf"{third}\.jpg: image has 1 channel\(s\) but the config expects 3"
    ):
        ISIC(tmp_path, "test")[2]


def smooth_lesion_image(height: int, width: int) -> np.ndarray:
    """Skin-like gradients, a dark soft lesion, a gentle texture: dermoscopy as it looks at 1/8 scale."""
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    image = np.stack([190 - 40 * yy, 150 - 30 * xx, 130 + 20 * xx * yy], -1)
    blob = np.exp(-((yy - 0.4) ** 2 + (xx - 0.55) ** 2) / 0.25**2)
    image = image - blob[..., None] * np.array([110, 90, 70])
    image = image + 6 * (np.sin(25 * xx) * np.cos(19 * yy))[..., None]
    return np.clip(image, 0, 255).astype(np.uint8)


def test_draft_decoding_matches_full_decoding(tmp_path):
    """Decoding at 1/8 scale then resizing gives nearly what a full decode then resize gives.

    Tolerance: on 480 x 640 (a multiple of the 8-pixel block) the mean absolute difference measured 0.35-0.45
    grey levels and the maximum 2-3 (JPEG quality 75-95, four lesion positions), and on 300 x 400 (not a
    multiple of 8, so the last block row is half-filled) 0.7-0.8 and 3.5-6. The two paths sample the same
    positions (a 1/8-scale pixel is the mean of an 8 x 8 block centred where bilinear samples), so they
    differ only by the JPEG noise that a block mean averages away and a point sample keeps, plus the smooth
    image's curvature over a block: a mean of 1.5 (0.6 % of the range) and a max of 8 (3 %) hold that with
    margin while still failing for any shift of a block or a wrong channel order (tens of grey levels).
    """
    for (height, width), target in (((480, 640), 32), ((300, 400), 24)):
        path = tmp_path / f"big_{height}.jpg"
        Image.fromarray(smooth_lesion_image(height, width)).save(path, quality=90)
        drafted, stored = read_jpeg(path, (target, target))
        assert stored == (height, width)
        assert drafted.shape == (3, -(-height // 8), -(-width // 8))  # libjpeg decoded at 1/8 scale
        fast = resize(torch.from_numpy(drafted), (target, target), "bilinear")
        full = resize(torch.from_numpy(read_image(path)), (target, target), "bilinear")
        difference = (fast - full).abs()
        assert difference.mean() < 1.5 and difference.max() < 8
    assert read_jpeg(path, (200, 200))[0].shape == (3, 300, 400)  # < 2x the target: no reduced decode
    assert read_jpeg(path, None)[0].shape == (3, 300, 400)


def test_fine_texture_survives_both_decoding_paths_without_aliasing(tmp_path):
    """On fine texture a plain bilinear resize of the full image samples 2 x 2 pixels out of every 15 x 20 and
    aliases (17-39 grey levels off an antialiased resize, measured before ``folder.resize`` antialiased).
    Both paths now agree with the antialiased reference: the shared resize exactly, the draft decode (the DCT
    scaling averages each 8 x 8 block) within 0.5-3 grey levels (measured)."""
    yy, xx = np.mgrid[0:480, 0:640]
    texture = 128 + 100 * np.sin(2 * np.pi * xx / 5) * np.sin(2 * np.pi * yy / 7)
    path = tmp_path / "texture.jpg"
    Image.fromarray(np.repeat(texture[..., None], 3, -1).astype(np.uint8)).save(path, quality=95)
    full_image = torch.from_numpy(read_image(path))
    reference = F.interpolate(
        full_image[None], (32, 32), mode="bilinear", antialias=True, align_corners=False
    )[0]
    aliased = F.interpolate(full_image[None], (32, 32), mode="bilinear", align_corners=False)[0]
    fast = resize(torch.from_numpy(read_jpeg(path, (32, 32))[0]), (32, 32), "bilinear")
    assert torch.equal(resize(full_image, (32, 32), "bilinear"), reference)
    assert (fast - reference).abs().mean() < 4 < 10 < (aliased - reference).abs().mean()


def test_present_values_matches_unique():
    rng = np.random.default_rng(0)
    uint8 = rng.choice([0, 255], (40, 30)).astype(np.uint8)
    assert present_values(uint8).tolist() == [0, 255]
    assert present_values(rng.random((9, 9)) > 0.5).tolist() == [0, 1]
    assert present_values(np.array([[3.0, 1.5], [3.0, 0.0]])).tolist() == [0.0, 1.5, 3.0]
    one_bit = np.asarray(Image.fromarray(uint8 > 0))  # PIL's mode "1": a bool array over bytes 0/255
    assert one_bit.dtype == bool and one_bit.view(np.uint8).max() == 255
    assert present_values(one_bit).tolist() == [0, 1]


def test_hydra_config_loads_a_batch(tmp_path):
    root = tmp_path / "isic"
    write_isic(root, 2017)
    cfg = compose_config(
        "train",
        [
            "data=isic",
            f"data.root={root}",
            "data.num_workers=0",
            "data.year=2017",
            "data.size=16",
            "data.batch_size=4",
        ],
        tmp_path / "run",
    )
    assert (
        cfg.data.train.year == 2017 and cfg.data.train.on_bad_case == "error" and cfg.data.val.folds is None
    )
    dm = instantiate(cfg.data)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 6 and len(dm.datasets["val"]) == 2
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["mask"].shape == (4, 1, 16, 16)
    assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0} and batch["mask"].sum() > 0
    assert batch["original_size"].shape == (4, 2)
