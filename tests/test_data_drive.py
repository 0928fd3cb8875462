"""DRIVE in its original layout: a tiny replica with the release's file formats and quirks, and the real subset."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config, shared_data
from hydra.utils import instantiate
from PIL import Image

from diffseg_lightning.data import SegmentationDataModule
from diffseg_lightning.data.drive import DRIVE
from diffseg_lightning.utils.errors import DiffSegError

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (22, 20)  # (H, W); the release is 584 x 565, taller than wide too
TRAINING = ["21", "22", "23", "24"]
TEST = ["01", "02"]
# the release's second-observer palette: index 0 near-black, index 1 near-white (RGB would read 4 / 252)
PALETTE = [4, 2, 4, 252, 254, 252] + [0] * (256 * 3 - 6)


def fov_disc() -> np.ndarray:
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    return (yy - SHAPE[0] / 2) ** 2 + (xx - SHAPE[1] / 2) ** 2 < (0.45 * SHAPE[1]) ** 2


def vessels(seed: int) -> np.ndarray:
    mask = np.zeros(SHAPE, bool)
    mask[:, 4 + seed % 5] = True
    mask[8 + seed % 4, 2:18] = True
    return mask & fov_disc()


def write_drive(root: Path, second: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """``root/DRIVE/{training,test}/...`` with TIFF images and GIF masks as released; returns the truth."""
    rng = np.random.default_rng(0)
    truth: dict[str, dict[str, np.ndarray]] = {}
    for subset, numbers in (("training", TRAINING), ("test", TEST)):
        base = root / "DRIVE" / subset
        for sub in ("images", "1st_manual", "mask", *(["2nd_manual"] if subset == "test" and second else [])):
            (base / sub).mkdir(parents=True)
        for k, number in enumerate(numbers):
            image = rng.integers(0, 255, (*SHAPE, 3), dtype=np.uint8)
            Image.fromarray(image).save(base / "images" / f"{number}_{subset}.tif")
            first = vessels(int(number))
            # grey GIFs with values 0/255 (optimize=False keeps PIL from re-indexing them into a 0/1 palette)
            Image.fromarray(first.astype(np.uint8) * 255).save(
                base / "1st_manual" / f"{number}_manual1.gif", optimize=False
            )
            Image.fromarray(fov_disc().astype(np.uint8) * 255).save(
                base / "mask" / f"{number}_{subset}_mask.gif", optimize=False
            )
            truth[number] = {"first": first, "fov": fov_disc()}
            if subset == "test" and second:
                other = vessels(int(number) + 1 + k)
                palette = Image.fromarray(other.astype(np.uint8))  # indices 0/1; putpalette makes it "P"
                palette.putpalette(PALETTE)
                palette.save(base / "2nd_manual" / f"{number}_manual2.gif")
                truth[number]["second"] = other
    return truth


def test_replica_quirks_are_real(tmp_path):
    write_drive(tmp_path)
    base = tmp_path / "DRIVE" / "test"
    with Image.open(base / "images" / "01_test.tif") as img:
        assert img.format == "TIFF" and img.mode == "RGB"
    with Image.open(base / "1st_manual" / "01_manual1.gif") as img:
        assert img.format == "GIF" and img.mode == "L" and np.unique(np.asarray(img)).tolist() == [0, 255]
    with Image.open(base / "2nd_manual" / "01_manual2.gif") as img:
        assert img.mode == "P" and np.unique(np.asarray(img)).tolist() == [0, 1]
        assert np.unique(np.asarray(img.convert("L"))).min() > 0  # as colours, the background is not 0


def test_items_carry_fov_and_both_observers(tmp_path):
    truth = write_drive(tmp_path)
    data = DRIVE(tmp_path, "test", size=None)
    assert len(data) == 2 and data.use_second_observer
    for i, number in enumerate(TEST):
        item = data[i]
        assert item["case"].endswith(f"test/images/{number}_test.tif")
        assert item["image"].shape == (3, *SHAPE) and item["image"].dtype == torch.float32
        for key in ("mask", "fov"):
            assert item[key].shape == (1, *SHAPE) and item[key].dtype == torch.float32
        assert torch.equal(item["mask"][0] > 0, torch.from_numpy(truth[number]["first"]))
        assert torch.equal(item["fov"][0] > 0, torch.from_numpy(truth[number]["fov"]))
        assert item["masks"].shape == (2, *SHAPE)
        assert torch.equal(item["masks"][0], item["mask"][0])
        assert torch.equal(
            item["masks"][1] > 0, torch.from_numpy(truth[number]["second"])
        )  # indices, not RGB
        assert set(item["masks"].unique().tolist()) == {0.0, 1.0}
    assert "masks" not in DRIVE(tmp_path, "test", second_observer=False)[0]
    assert "masks" not in DRIVE(tmp_path, "train")[0] and "fov" in DRIVE(tmp_path, "train")[0]


def test_splits(tmp_path):
    write_drive(tmp_path)
    cases = {s: [Path(c["image"]).name for c in DRIVE(tmp_path, s).cases] for s in ("train", "val", "test")}
    assert len(cases["train"]) == 3 and len(cases["val"]) == 1  # 0.25 of 4 training images
    assert sorted(cases["train"] + cases["val"]) == [f"{n}_training.tif" for n in TRAINING]
    assert cases["test"] == ["01_test.tif", "02_test.tif"]
    assert [Path(c["image"]).name for c in DRIVE(tmp_path / "DRIVE", "val").cases] == cases["val"]
    assert len(DRIVE(tmp_path, "val", val_fraction=0.5)) == 2


def test_a_batch_through_the_datamodule(tmp_path):
    write_drive(tmp_path)
    factory = partial(DRIVE, tmp_path, size=16)
    dm = SegmentationDataModule(
        train=partial(factory, "train"), test=partial(factory, "test"), channels=3, batch_size=2
    )
    dm.setup(None)
    train = next(iter(dm.train_dataloader()))
    assert train["fov"].shape == (2, 1, 16, 16) and "masks" not in train
    test = next(iter(dm.test_dataloader()))
    assert test["masks"].shape == (2, 2, 16, 16) and test["mask"].shape == (2, 1, 16, 16)
    for key in ("mask", "fov", "masks"):
        assert set(test[key].unique().tolist()) <= {0.0, 1.0}


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(DiffSegError, match="does not exist"):
        DRIVE(tmp_path / "absent")
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'val', 'test'\)"):
        DRIVE(tmp_path, "training")
    write_drive(tmp_path, second=False)
    base = tmp_path / "DRIVE" / "test"
    with pytest.raises(
        DiffSegError, match=r"01_test\.tif: no second observer; expected .*2nd_manual/01_manual2\.gif"
    ):
        DRIVE(tmp_path, "test", second_observer=True)
    Image.fromarray((np.arange(SHAPE[0] * SHAPE[1]) % 3 * 100).astype(np.uint8).reshape(SHAPE)).save(
        base / "1st_manual" / "01_manual1.gif", optimize=False
    )
    with pytest.raises(
        DiffSegError, match=r"01_manual1\.gif: mask values 0, 100, 200 are not those of a binary DRIVE mask"
    ):
        DRIVE(tmp_path, "test")[0]
    two = np.where(np.arange(SHAPE[0] * SHAPE[1]).reshape(SHAPE) % 2, 128, 255).astype(np.uint8)
    Image.fromarray(two).save(base / "1st_manual" / "01_manual1.gif", optimize=False)  # 2 values, not 0/255
    with pytest.raises(
        DiffSegError, match=r"01_manual1\.gif: mask values 128, 255 are not those of a binary"
    ):
        DRIVE(tmp_path, "test")[0]  # used to pass the two-value check and read as all vessel
    Image.new("L", (5, 5)).save(base / "mask" / "02_test_mask.gif")
    with pytest.raises(DiffSegError, match=r"02_test_mask\.gif: mask size \(5, 5\) .*differs"):
        DRIVE(tmp_path, "test")[1]
    (base / "images" / "02_test.tif").write_bytes(b"not a tiff")
    with pytest.raises(DiffSegError, match=r"02_test\.tif: not a readable image"):
        DRIVE(tmp_path, "test")[1]
    with pytest.raises(
        DiffSegError, match=r"_training\.tif: image has 3 channel\(s\) but the config expects 1"
    ):
        DRIVE(tmp_path, "train", channels=1)[0]
    (tmp_path / "DRIVE" / "training" / "mask" / "21_training_mask.gif").unlink()
    with pytest.raises(
        DiffSegError, match=r"21_training\.tif: no field-of-view mask; expected .*21_training_mask"
    ):
        DRIVE(tmp_path, "train", val_fraction=0.0)


def names(data: DRIVE) -> list[str]:
    return [Path(c["image"]).name for c in data.cases]


def test_skip_leaves_out_images_without_their_masks(tmp_path):
    write_drive(tmp_path)
    before = {s: names(DRIVE(tmp_path, s)) for s in ("train", "val")}
    victim = before["train"][1]
    number = victim.split("_")[0]
    training = tmp_path / "DRIVE" / "training"
    (training / "1st_manual" / f"{number}_manual1.gif").unlink()
    train = DRIVE(tmp_path, "train", on_bad_case="skip")
    reason = f"no manual annotation; expected {training / '1st_manual' / f'{number}_manual1.gif'}"
    assert train.skipped == [(str(training / "images" / victim), reason)]
    assert names(train) == [n for n in before["train"] if n != victim]
    assert names(DRIVE(tmp_path, "val", on_bad_case="skip")) == before["val"]  # the split is kept
    assert train[0]["fov"].shape == (1, 128, 128)

    test = tmp_path / "DRIVE" / "test"
    (test / "2nd_manual" / "02_manual2.gif").unlink()
    data = DRIVE(tmp_path, "test", size=None, on_bad_case="skip")
    reason = f"no second observer; expected {test / '2nd_manual' / '02_manual2.gif'}"
    assert data.skipped == [(str(test / "images" / "02_test.tif"), reason)]
    assert names(data) == ["01_test.tif"] and data[0]["masks"].shape == (2, *SHAPE)
    with pytest.raises(DiffSegError, match=r"02_test\.tif: no second observer"):
        DRIVE(tmp_path, "test")


def test_kfold_over_the_training_images(tmp_path):
    write_drive(tmp_path)
    vals = []
    for fold in range(4):
        train, val = (names(DRIVE(tmp_path, s, folds=4, fold=fold)) for s in ("train", "val"))
        assert len(train) == 3 and len(val) == 1 and not set(train) & set(val)
        assert sorted(train + val) == [f"{n}_training.tif" for n in TRAINING]
        assert names(DRIVE(tmp_path, "val", folds=4, fold=fold)) == val  # deterministic
        vals += val
    assert sorted(vals) == [f"{n}_training.tif" for n in TRAINING]  # the validation folds partition them
    assert names(DRIVE(tmp_path, "test", folds=4, fold=2)) == ["01_test.tif", "02_test.tif"]  # official
    with pytest.raises(ValueError, match=r"data\.folds must lie in \[2, number of cases = 4\], got 5"):
        DRIVE(tmp_path, "train", folds=5)


def test_seen_labels_are_the_stored_annotation_values(tmp_path):
    write_drive(tmp_path)
    train = DRIVE(tmp_path, "train")
    train[0]
    assert train.seen_labels == {0, 255}  # 1st_manual grey GIF
    test = DRIVE(tmp_path, "test")
    test[0]
    assert test.seen_labels == {0, 1, 255}  # plus 2nd_manual's palette indices


def test_config_passes_folds_and_the_bad_case_policy(tmp_path):
    write_drive(tmp_path)
    (tmp_path / "DRIVE" / "test" / "mask" / "01_test_mask.gif").unlink()
    overrides = [
        "data=drive",
        f"data.root={tmp_path}",
        "data.num_workers=0",
        "data.size=16",
        "data.batch_size=2",
    ]
    overrides += ["data.folds=2", "data.fold=1", "data.on_bad_case=skip"]
    dm = instantiate(compose_config("train", overrides, tmp_path / "run").data)
    dm.setup("fit")
    assert names(dm.datasets["val"]) == names(DRIVE(tmp_path, "val", folds=2, fold=1))
    assert len(dm.datasets["train"]) == 2 and len(dm.datasets["val"]) == 2
    assert next(iter(dm.train_dataloader()))["fov"].shape == (2, 1, 16, 16)
    with pytest.warns(UserWarning, match=r"left out 1 bad case\(s\) of the test split .*01_test\.tif"):
        dm.setup("test")
    assert names(dm.datasets["test"]) == ["02_test.tif"]


# ------------------------------------------------------------------------------------- the real subset
def test_real_subset_counts_and_values():
    root = shared_data("drive")
    sizes = {s: len(DRIVE(root, s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 6, "val": 2, "test": 6}  # 8 training, 6 test
    item = DRIVE(root / "DRIVE", "test", size=None)[0]
    assert item["image"].shape == (3, 584, 565) and item["masks"].shape == (2, 584, 565)
    first, second = item["masks"]
    for mask in (first, second, item["fov"][0]):
        assert set(mask.unique().tolist()) == {0.0, 1.0}
    # vessels cover ~10% of the image in both observers (palette indices read as such, not as colours)
    assert 0.05 < first.mean() < 0.15 and 0.05 < second.mean() < 0.15
    assert 0.6 < item["fov"].mean() < 0.75  # the round field of view
    dice = 2 * (first * second).sum() / (first.sum() + second.sum())
    assert 0.7 < dice < 0.9  # the two observers agree, but not perfectly
    small = DRIVE(root, "train", size=64)[0]
    assert small["image"].shape == (3, 64, 64) and small["fov"].shape == (1, 64, 64)
