"""LIDC loader: tiny replicas of the Probabilistic U-Net pickle and of the hierarchical Probabilistic U-Net's
180x180 PNG crops, in their real names and formats."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config
from hydra.utils import instantiate
from PIL import Image

from diffseg_lightning.data.lidc import LIDC, center_crop
from diffseg_lightning.utils.errors import DiffSegError

pytestmark = pytest.mark.usefixtures("one_thread")

SIDE = 16  # pickle replica slices (the release's are 128 x 128)
UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.{:04d}"  # series-uid-like names
PNG_SIDE, CROP, OFFSET = 180, 128, 26  # (180 - 128) // 2
ALL = (1.0, 0.0, 0.0)  # every patient in train


def rater_masks(shape, top: int, left: int, annotators: int = 4) -> np.ndarray:
    """Annotator k marks rows top .. top + 3 + k and columns left .. left + 7: rows top .. top + 4 get at least
    3 of 4 votes (the majority), row top + 5 exactly 2 (a tie: background), row top + 6 one vote."""
    masks = np.zeros((annotators, *shape), np.uint8)
    for k in range(annotators):
        masks[k, top : top + 4 + k, left : left + 8] = 1
    return masks


def majority_truth(top: int, left: int, shape) -> np.ndarray:
    truth = np.zeros(shape, bool)
    truth[top : top + 5, left : left + 8] = True
    return truth


# ------------------------------------------------------------------------------------------- pickle replica
def pickle_slices(series: int = 3, per_series: int = 2, annotators: int = 4, seed: int = 0) -> dict:
    """``{slice name: {"image": float32 (16, 16) in [0, 1], "masks": [4 x uint8 (16, 16)], "series_uid"}}``."""
    rng = np.random.default_rng(seed)
    data = {}
    for s in range(series):
        for j in range(per_series):
            masks = rater_masks((SIDE, SIDE), 2 + j, 3 + s % 4, annotators)
            data[f"{UID.format(s)}_slice{j:03d}"] = {
                "image": rng.uniform(0, 1, (SIDE, SIDE)).astype(np.float32),
                "masks": list(masks),
                "series_uid": UID.format(s),
            }
    return data


def dump(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as stream:
        pickle.dump(data, stream)
    return path


def series_of(dataset: LIDC) -> list[str]:
    return [patient for _, patient, _ in dataset.slices]


def test_pickle_items_hold_every_annotator_and_their_majority(tmp_path):
    data = pickle_slices(series=2)
    path = dump(tmp_path / "data_lidc.pickle", data)
    dataset = LIDC(path, "train", size=None, fractions=ALL)
    assert dataset.format == "pickle" and dataset.annotators == 4 and len(dataset) == 4
    for index in range(len(dataset)):
        item = dataset[index]
        key = item["case"].split(":")[-1]
        stored = data[key]
        assert item["case"] == f"{path}:{key}" and item["patient"] == stored["series_uid"]
        assert item["image"].dtype == torch.float32 and item["image"].shape == (1, SIDE, SIDE)
        assert torch.equal(item["image"][0], torch.from_numpy(stored["image"]))  # as stored, in [0, 1]
        assert torch.equal(item["masks"], torch.from_numpy(np.stack(stored["masks"]).astype(np.float32)))
        j, s = int(key[-3:]), int(stored["series_uid"][-4:])
        assert np.array_equal(item["mask"][0].numpy() > 0, majority_truth(2 + j, 3 + s % 4, (SIDE, SIDE)))
        assert item["original_size"].tolist() == [SIDE, SIDE] and item["crop_offset"].tolist() == [0, 0]
        assert int(item["index"]) == index
    votes = dataset[0]["masks"].sum(0)
    assert (votes == 2).any() and not (dataset[0]["mask"][0][votes == 2]).any()  # a 2-2 tie is background


def test_pickle_split_into_parts_reads_every_part(tmp_path):
    data = pickle_slices(series=3)
    whole = LIDC(dump(tmp_path / "whole" / "data_lidc.pickle", data), "train", fractions=ALL, size=None)
    keys = sorted(data)
    dump(tmp_path / "parts" / "data_lidc_0.pickle", {k: data[k] for k in keys[:2]})
    dump(tmp_path / "parts" / "data_lidc_1.pickle", {k: data[k] for k in keys[2:5]})
    dump(tmp_path / "parts" / "data_lidc_2.pkl", {k: data[k] for k in keys[5:]})
    (tmp_path / "parts" / "README.txt").write_text("not a part")
    parts = LIDC(tmp_path / "parts", "train", fractions=ALL, size=None)  # format auto: a folder of pickles
    assert parts.format == "pickle" and len(parts) == len(whole) == 6
    assert [c.split(":")[-1] for c, _, _ in parts.slices] == keys
    assert Path(parts.slices[5][0].rsplit(":", 1)[0]).name == "data_lidc_2.pkl"
    for a, b in zip(whole.slices, parts.slices, strict=True):
        assert np.array_equal(a[2][0], b[2][0])

    dump(tmp_path / "parts" / "data_lidc_3.pickle", {keys[0]: data[keys[0]]})  # overlaps part 0
    with pytest.raises(
        DiffSegError, match=r"data_lidc_3\.pickle: slice '.*slice000' is also in .*data_lidc_0"
    ):
        LIDC(tmp_path / "parts", "train")


def test_pickle_splits_are_by_series_disjoint_and_deterministic(tmp_path):
    path = dump(tmp_path / "data_lidc.pickle", pickle_slices(series=6, per_series=2))
    splits = {s: LIDC(path, s, size=None) for s in ("train", "val", "test")}
    # 6 series, 0.7 / 0.15 / 0.15: cut at round(4.2), round(5.1) -> 4 / 1 / 1 series, 2 slices each
    assert [len(splits[s].patients) for s in splits] == [4, 1, 1]
    assert [len(splits[s]) for s in splits] == [8, 2, 2]
    patients = [set(splits[s].patients) for s in splits]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    assert set().union(*patients) == {UID.format(s) for s in range(6)}
    for dataset in splits.values():  # both slices of a series land in the same split
        assert sorted(series_of(dataset)) == sorted(p for p in dataset.patients for _ in range(2))
    assert LIDC(path, "test").patients == splits["test"].patients  # deterministic
    other = [LIDC(path, "test", seed=seed).patients for seed in range(1, 6)]
    assert any(p != splits["test"].patients for p in other)


def test_pickle_kfold_test_folds_partition_the_series(tmp_path):
    path = dump(tmp_path / "data_lidc.pickle", pickle_slices(series=6, per_series=2))
    tests = []
    for fold in range(3):
        parts = {s: set(LIDC(path, s, folds=3, fold=fold).patients) for s in ("train", "val", "test")}
        assert len(parts["test"]) == 2 and len(parts["train"]) + len(parts["val"]) == 4
        assert not (
            parts["train"] & parts["test"] or parts["val"] & parts["test"] or parts["train"] & parts["val"]
        )
        tests.append(parts["test"])
    assert sorted(p for t in tests for p in t) == [UID.format(s) for s in range(6)]
    with pytest.raises(ValueError, match=r"data\.fold must lie in \[0, data\.folds = 3\)"):
        LIDC(path, folds=3, fold=3)


def test_pickle_slice_with_three_masks_is_a_bad_case(tmp_path):
    data = pickle_slices(series=2)
    key = sorted(data)[1]
    data[key]["masks"] = data[key]["masks"][:3]
    path = dump(tmp_path / "data_lidc.pickle", data)
    with pytest.raises(
        DiffSegError, match=rf"data_lidc\.pickle:{key}: has 3 annotator mask\(s\); the other .* 4"
    ):
        LIDC(path, "train", fractions=ALL)
    dataset = LIDC(path, "train", fractions=ALL, on_bad_case="skip")
    assert len(dataset) == 3 and dataset.annotators == 4
    assert len(dataset.skipped) == 1
    assert dataset.skipped[0][0] == f"{path}:{key}" and "3 annotator mask(s)" in dataset.skipped[0][1]
    assert key not in [c.split(":")[-1] for c, _, _ in dataset.slices]
    # the bad slice belongs to one series, so only the split holding that series reports it
    others = LIDC(path, "train", fractions=(0.0, 0.0, 1.0), on_bad_case="skip")
    assert len(others) == 0 and others.skipped == []


def test_pickle_bad_files_name_the_file(tmp_path):
    not_a_dict = dump(tmp_path / "list.pickle", [1, 2, 3])
    with pytest.raises(DiffSegError, match=r"list\.pickle: expected a pickled dict .* found list"):
        LIDC(not_a_dict)
    truncated = tmp_path / "truncated.pickle"
    truncated.write_bytes(pickle.dumps(pickle_slices(series=1))[:200])
    with pytest.raises(DiffSegError, match=r"truncated\.pickle: not a readable pickle"):
        LIDC(truncated)
    odd = dump(tmp_path / "odd.pickle", {"a": {"image": np.zeros((4, 4))}})
    with pytest.raises(
        DiffSegError, match=r"odd\.pickle: no usable slice; e\.g\. slice 'a': missing key\(s\) masks"
    ):
        LIDC(odd)

    data = pickle_slices(series=1, per_series=1)
    key = next(iter(data))
    data[key]["masks"][2] = data[key]["masks"][2] * 2  # values 0 / 2
    path = dump(tmp_path / "values.pickle", data)
    dataset = LIDC(path, fractions=ALL)
    with pytest.raises(
        DiffSegError, match=rf"values\.pickle:{key} \(annotator 2\): unexpected label value\(s\) 2"
    ):
        dataset[0]
    data[key]["masks"][2] = data[key]["masks"][1]
    data[key]["image"][3, 4] = np.nan
    dataset = LIDC(dump(tmp_path / "nan.pickle", data), fractions=ALL)
    with pytest.raises(DiffSegError, match=rf"nan\.pickle:{key}: image holds NaN"):
        dataset[0]
    data[key]["masks"][0] = np.zeros((SIDE, SIDE + 1), np.uint8)
    with pytest.raises(DiffSegError, match=rf"shape\.pickle:{key}: mask 0 of shape \(16, 17\) differs"):
        LIDC(dump(tmp_path / "shape.pickle", data), fractions=ALL)


# ---------------------------------------------------------------------------------------------- PNG replica
def write_crops(root: Path, patients: dict[str, list[str]], slices: int = 2, annotators: int = 4) -> dict:
    """``<root>/<split>/images/<patient>/z-<pos>_c0.png`` (180x180 8-bit grey) and
    ``<root>/<split>/gt/<patient>/z-<pos>_c0_l<k>.png`` (0 / 255); returns {image path: (image, masks)}."""
    rng = np.random.default_rng(1)
    truth = {}
    for split, names in patients.items():
        for p, patient in enumerate(names):
            for j in range(slices):
                name = f"z{-105.0 + 2 * j}_c0"  # z-105.0_c0, z-103.0_c0, as in the release
                image = rng.integers(0, 256, (PNG_SIDE, PNG_SIDE), dtype=np.uint8)
                masks = rater_masks((PNG_SIDE, PNG_SIDE), 80 + j, 70 + p, annotators)
                masks[:, 2:12, 2:12] = 1  # a mark outside the centre crop: gone after cropping
                image_dir, gt_dir = root / split / "images" / patient, root / split / "gt" / patient
                image_dir.mkdir(parents=True, exist_ok=True)
                gt_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(image_dir / f"{name}.png")
                for k in range(annotators):
                    Image.fromarray(masks[k] * 255).save(gt_dir / f"{name}_l{k}.png")
                truth[image_dir / f"{name}.png"] = (image, masks)
    return truth


PATIENTS = {
    "train": ["LIDC-IDRI-0001", "LIDC-IDRI-0003", "LIDC-IDRI-0004"],
    "val": ["LIDC-IDRI-0002"],
    "test": ["LIDC-IDRI-0005", "LIDC-IDRI-0006"],
}


def test_replica_masks_are_0_255_greyscale_png(tmp_path):
    write_crops(tmp_path, {"train": ["LIDC-IDRI-0001"]}, slices=1)
    with Image.open(tmp_path / "train" / "gt" / "LIDC-IDRI-0001" / "z-105.0_c0_l3.png") as img:
        assert img.format == "PNG" and img.mode == "L" and img.size == (PNG_SIDE, PNG_SIDE)
        assert set(np.unique(np.asarray(img)).tolist()) == {0, 255}


def test_png_crops_are_centre_cropped_to_128_by_value(tmp_path):
    truth = write_crops(tmp_path, PATIENTS)
    dataset = LIDC(tmp_path, "train")  # format auto, crop 128, size 128
    assert dataset.format == "png" and dataset.annotators == 4 and len(dataset) == 6
    for index in range(len(dataset)):
        item = dataset[index]
        image, masks = truth[Path(item["case"])]
        window = (slice(OFFSET, OFFSET + CROP),) * 2
        assert item["image"].shape == (1, CROP, CROP) and item["masks"].shape == (4, CROP, CROP)
        assert torch.equal(item["image"][0], torch.from_numpy(image[window].astype(np.float32)))  # 0..255
        assert torch.equal(item["masks"], torch.from_numpy(masks[(slice(None), *window)].astype(np.float32)))
        assert item["image"][0, 0, 0] == image[26, 26] and item["image"][0, -1, -1] == image[153, 153]
        assert not item["masks"][:, :10, :10].any()  # the mark at rows / cols 2..11 lies outside the crop
        j = 0 if "z-105.0" in item["case"] else 1
        p = PATIENTS["train"].index(item["patient"])
        expected = majority_truth(80 + j - OFFSET, 70 + p - OFFSET, (CROP, CROP))
        assert np.array_equal(item["mask"][0].numpy() > 0, expected)
        assert item["original_size"].tolist() == [PNG_SIDE, PNG_SIDE] and item["crop_offset"].tolist() == [
            26,
            26,
        ]
        assert Path(item["case"]).parent.name == item["patient"]
    whole = LIDC(tmp_path, "train", crop=None, size=None)[0]
    assert whole["image"].shape == (1, PNG_SIDE, PNG_SIDE) and whole["crop_offset"].tolist() == [0, 0]
    assert center_crop(np.zeros((1, 181, 130)), 128)[1] == (26, 1)


def test_png_splits_come_from_the_folders_and_folds_pool_them(tmp_path):
    write_crops(tmp_path, PATIENTS, slices=1)
    for split, names in PATIENTS.items():
        dataset = LIDC(tmp_path, split, fractions=(0.2, 0.4, 0.4), seed=7)  # fractions unused
        assert dataset.patients == sorted(names) and len(dataset) == len(names)
    everyone = sorted(p for names in PATIENTS.values() for p in names)
    tests = [LIDC(tmp_path, "test", folds=2, fold=f).patients for f in (0, 1)]
    assert sorted(tests[0] + tests[1]) == everyone and len(tests[0]) == 3
    rest = LIDC(tmp_path, "train", folds=2, fold=0).patients + LIDC(tmp_path, "val", folds=2, fold=0).patients
    assert sorted(rest) == tests[1]


def test_release_archive_layout_is_read_as_extracted(tmp_path):
    """The release's lidc_crops_<split>.tar.gz extract to lidc_crops_<split>/<split>/{images,gt}."""
    for split, names in PATIENTS.items():
        write_crops(tmp_path / f"lidc_crops_{split}", {split: names}, slices=1)
    assert [len(LIDC(tmp_path, s)) for s in ("train", "val", "test")] == [3, 1, 2]
    assert "/lidc_crops_val/val/images/LIDC-IDRI-0002/" in LIDC(tmp_path, "val")[0]["case"]


def test_png_missing_annotator_mask_is_a_bad_case(tmp_path):
    write_crops(tmp_path, PATIENTS)
    missing = tmp_path / "train" / "gt" / "LIDC-IDRI-0003" / "z-103.0_c0_l2.png"
    missing.unlink()
    with pytest.raises(DiffSegError, match=rf"{missing}: missing annotator mask \(every other slice has _l0"):
        LIDC(tmp_path, "train")
    dataset = LIDC(tmp_path, "train", on_bad_case="skip")
    assert len(dataset) == 5 and [p for p, _ in dataset.skipped] == [str(missing)]
    assert str(missing.parent.parent.parent / "images" / "LIDC-IDRI-0003" / "z-103.0_c0.png") not in [
        c for c, _, _ in dataset.slices
    ]
    assert len(LIDC(tmp_path, "test")) == 4  # other splits are untouched

    image = tmp_path / "val" / "images" / "LIDC-IDRI-0002" / "z-105.0_c0.png"
    image.unlink()
    with pytest.raises(DiffSegError, match=rf"{image}: missing image; its annotator masks \(_l0\.png"):
        LIDC(tmp_path, "val")
    for k in range(4):
        (tmp_path / "test" / "gt" / "LIDC-IDRI-0005" / f"z-105.0_c0_l{k}.png").unlink()
    with pytest.raises(DiffSegError, match=r"LIDC-IDRI-0005/z-105\.0_c0\.png: no annotator masks; expected"):
        LIDC(tmp_path, "test")


def test_png_bad_files_name_the_file(tmp_path):
    write_crops(tmp_path, {"train": ["LIDC-IDRI-0001"]}, slices=1)
    folder = tmp_path / "train"
    gt = folder / "gt" / "LIDC-IDRI-0001" / "z-105.0_c0_l1.png"
    Image.fromarray(np.full((PNG_SIDE, PNG_SIDE), 128, np.uint8)).save(gt)
    with pytest.raises(DiffSegError, match=rf"{gt}: mask values 128 are not those of a binary LIDC mask"):
        LIDC(tmp_path, "train")[0]
    Image.fromarray(np.zeros((PNG_SIDE, 170), np.uint8)).save(gt)
    with pytest.raises(DiffSegError, match=rf"{gt}: mask size \(180, 170\) \(H, W\) differs"):
        LIDC(tmp_path, "train")[0]
    image = folder / "images" / "LIDC-IDRI-0001" / "z-105.0_c0.png"
    image.write_bytes(image.read_bytes()[:60])  # truncated PNG
    with pytest.raises(DiffSegError, match=rf"{image}: not a readable image"):
        LIDC(tmp_path, "train")[0]
    Image.fromarray(np.zeros((PNG_SIDE, PNG_SIDE, 3), np.uint8)).save(image)
    with pytest.raises(DiffSegError, match=rf"{image}: image has 3 channel\(s\) but the config expects 1"):
        LIDC(tmp_path, "train")[0]


def test_options_and_layout_errors(tmp_path):
    with pytest.raises(ValueError, match=r"format must be one of \('auto', 'pickle', 'png'\), got 'nii'"):
        LIDC(tmp_path, format="nii")
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'val', 'test'\), got 'dev'"):
        LIDC(tmp_path, "dev")
    with pytest.raises(DiffSegError, match="does not exist"):
        LIDC(tmp_path / "nowhere")
    with pytest.raises(DiffSegError, match=r"no LIDC data found; expected a pickle file"):
        LIDC(tmp_path)
    write_crops(tmp_path, {"train": ["LIDC-IDRI-0001"]}, slices=1)
    with pytest.raises(DiffSegError, match=r"no val folder; expected .*/val/images/<patient>/<slice>\.png"):
        LIDC(tmp_path, "val")
    dump(tmp_path / "data_lidc.pickle", pickle_slices(series=1))
    with pytest.raises(DiffSegError, match=r"both pickle files and PNG split folders; set data\.format"):
        LIDC(tmp_path)
    assert LIDC(tmp_path, format="png").format == "png"
    assert len(LIDC(tmp_path, format="pickle", fractions=ALL)) == 2


# ------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("form", ["pickle", "png"])
def test_hydra_config_loads_a_batch_with_every_annotator(tmp_path, form):
    if form == "png":
        root = tmp_path / "lidc_crops"
        write_crops(root, PATIENTS)
    else:
        root = dump(tmp_path / "data_lidc.pickle", pickle_slices(series=6))
    overrides = ["data=lidc", f"data.root={root}", "data.num_workers=0", "data.batch_size=4"]
    cfg = compose_config("train", overrides, tmp_path / "run")
    assert (cfg.data.size, cfg.data.crop, cfg.data.channels, cfg.data.format) == (128, 128, 1, "auto")
    dm = instantiate(cfg.data)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 128, 128) and batch["masks"].shape == (4, 4, 128, 128)
    assert batch["mask"].shape == (4, 1, 128, 128)
    assert torch.allclose(batch["image"].mean(dim=(-2, -1)), torch.zeros(4, 1), atol=1e-4)  # z-scored
    assert len(batch["patient"]) == 4 and len(batch["case"]) == 4
    train, val = (set(dm.datasets[s].patients) for s in ("train", "val"))
    assert train and val and not train & val
