"""nnU-Net raw datasets: replicas of v1 and v2 dataset.json, NIfTI volumes and PNG images, 1 to 3 channels."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import compose_config
from hydra.utils import instantiate
from PIL import Image

from diffseg_lightning.data.nnunet import NNUNetRaw, read_dataset_json
from diffseg_lightning.utils.errors import DiffSegError

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (12, 10, 4)  # (H, W, D): 4 axial slices
SPACING = (0.8, 1.5, 3.0)
V2_LABELS = {"background": 0, "PZ": 1, "TZ": 2}


def save_nifti(path: Path, array: np.ndarray, spacing=SPACING) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), path)


def image_volume(case: int, channel: int) -> np.ndarray:
    """Constant slices: value 100 * channel + case + 10 * slice."""
    return (np.zeros(SHAPE) + 100 * channel + case + 10 * np.arange(SHAPE[2])).astype(np.float32)


def label_volume() -> np.ndarray:
    """Slices 0 and 3 empty; slice 1: PZ 4 x 4; slice 2: PZ 4 x 4 and TZ 3 x 5."""
    label = np.zeros(SHAPE, np.uint8)
    label[2:6, 2:6, 1] = 1
    label[2:6, 2:6, 2] = 1
    label[7:10, 3:8, 2] = 2
    return label


def write_v2_nifti(
    root: Path, cases: int = 6, test_cases: int = 2, labels_ts: bool = False, labels=None
) -> Path:
    """nnU-Net v2 ``Dataset005_Prostate``: two channels (T2, ADC) per case, NIfTI volumes."""
    folder = root / "Dataset005_Prostate"
    for c in range(cases):
        case = f"prostate_{c:02d}"
        for k in range(2):
            save_nifti(folder / "imagesTr" / f"{case}_{k:04d}.nii.gz", image_volume(c, k))
        save_nifti(folder / "labelsTr" / f"{case}.nii.gz", label_volume())
    for c in range(cases, cases + test_cases):
        case = f"prostate_{c:02d}"
        for k in range(2):
            save_nifti(folder / "imagesTs" / f"{case}_{k:04d}.nii.gz", image_volume(c, k))
        if labels_ts:
            save_nifti(folder / "labelsTs" / f"{case}.nii.gz", label_volume())
    meta = {
        "channel_names": {"0": "T2", "1": "ADC"},
        "labels": labels or V2_LABELS,
        "numTraining": cases,
        "file_ending": ".nii.gz",
    }
    (folder / "dataset.json").write_text(json.dumps(meta, indent=4))
    return folder


def write_v1_nifti(root: Path, cases: int = 5) -> Path:
    """nnU-Net v1 ``Task003_Liver``: ``modality``, ``labels`` value -> name, a ``training`` list."""
    folder = root / "Task003_Liver"
    training = []
    for c in range(cases):
        save_nifti(folder / "imagesTr" / f"liver_{c}_0000.nii.gz", image_volume(c, 0) - 1000)  # CT-like
        save_nifti(folder / "labelsTr" / f"liver_{c}.nii.gz", (label_volume() > 0).astype(np.uint8))
        training.append({"image": f"./imagesTr/liver_{c}.nii.gz", "label": f"./labelsTr/liver_{c}.nii.gz"})
    meta = {
        "name": "Liver",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver"},
        "numTraining": cases,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    (folder / "dataset.json").write_text(json.dumps(meta, indent=4))
    return folder


def png_label(case: int) -> np.ndarray:
    label = np.zeros((16, 18), np.uint8)
    label[3 : 8 + case, 4:10] = 1  # 5 + case rows x 6 columns
    return label


def write_v2_png(root: Path, cases: int = 5, rgb: bool = True) -> Path:
    """nnU-Net v2 2D: an RGB ``_0000.png`` per case (as Dataset120_RoadSegmentation), or two grey PNGs."""
    folder = root / ("Dataset120_Roads" if rgb else "Dataset121_TwoGrey")
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for c in range(cases):
        if rgb:
            rgb_image = np.stack([np.full((16, 18), 10 * c + k, np.uint8) for k in range(3)], -1)
            Image.fromarray(rgb_image).save(folder / "imagesTr" / f"road_{c:03d}_0000.png")
        else:
            for k in range(2):
                Image.fromarray(np.full((16, 18), 50 * k + c, np.uint8)).save(
                    folder / "imagesTr" / f"road_{c:03d}_{k:04d}.png"
                )
        Image.fromarray(png_label(c)).save(folder / "labelsTr" / f"road_{c:03d}.png")
    channels = {"0": "R", "1": "G", "2": "B"} if rgb else {"0": "A", "1": "B"}
    meta = {
        "channel_names": channels,
        "labels": {"background": 0, "road": 1},
        "numTraining": cases,
        "file_ending": ".png",
    }
    (folder / "dataset.json").write_text(json.dumps(meta))
    return folder


def everything(root: Path, **kwargs) -> NNUNetRaw:
    return NNUNetRaw(root, "train", fractions=(1.0, 0.0, 0.0), size=None, **kwargs)


def test_both_dataset_json_versions_parse_alike(tmp_path):
    v2 = read_dataset_json(write_v2_nifti(tmp_path) / "dataset.json")
    v1 = read_dataset_json(write_v1_nifti(tmp_path) / "dataset.json")
    assert (v2.version, v2.channel_names, v2.labels, v2.file_ending) == (
        2, ["T2", "ADC"], {"background": (0,), "PZ": (1,), "TZ": (2,)}, ".nii.gz"
    )  # fmt: skip
    assert (v1.version, v1.channel_names, v1.labels) == (1, ["CT"], {"background": (0,), "liver": (1,)})
    assert sorted(v1.cases) == [f"liver_{c}" for c in range(5)] and v1.num_training == 5


def test_v2_nifti_slices_channels_targets_and_spacing(tmp_path):
    root = write_v2_nifti(tmp_path)
    data = everything(root, channels=2)
    assert data.case_ids == [f"prostate_{c:02d}" for c in range(6)] and len(data) == 6 * SHAPE[2]
    item = data[4 + 2]  # case 1, slice 2
    assert item["image"].shape == (2, 12, 10) and item["case"].endswith("imagesTr/prostate_01_0000.nii.gz#2")
    assert item["image"][0].unique().tolist() == [1 + 20] and item["image"][1].unique().tolist() == [
        100 + 1 + 20
    ]
    assert int(item["slice"]) == 2 and item["original_size"].tolist() == [12, 10]
    assert item["spacing"].tolist() == pytest.approx([0.8, 1.5]) and item[
        "original_spacing"
    ].tolist() == pytest.approx([0.8, 1.5])
    assert [int(data[4 + z]["mask"].sum()) for z in range(4)] == [0, 16, 31, 0]  # foreground
    assert int(everything(root, channels=2, target="PZ")[6]["mask"].sum()) == 16
    classes = everything(root, channels=2, target="classes")[6]["mask"]
    assert classes.shape == (2, 12, 10) and classes.sum((1, 2)).tolist() == [16, 15]
    assert data.seen_labels == {0, 1, 2}
    small = NNUNetRaw(root, "train", fractions=(1.0, 0.0, 0.0), size=6, channels=2)[6]
    assert small["image"].shape == (2, 6, 6) and small["spacing"].tolist() == pytest.approx(
        [0.8 * 2, 1.5 * 10 / 6]
    )
    with pytest.raises(ValueError, match=r"label of .*dataset\.json \(background, PZ, TZ\), got 'prostate'"):
        everything(root, target="prostate")


def test_empty_slices_drop_and_regions(tmp_path):
    root = write_v2_nifti(tmp_path, labels={"background": 0, "gland": [1, 2], "TZ": 2})
    dropped = everything(root, channels=2, empty_slices="drop")
    assert len(dropped) == 6 * 2 and [int(dropped[i]["slice"]) for i in range(2)] == [1, 2]
    by_tz = everything(root, channels=2, empty_slices="drop", target="TZ")
    assert len(by_tz) == 6 and int(by_tz[0]["slice"]) == 2  # emptiness is judged on the chosen target
    assert (
        int(dropped[1]["mask"].sum()) == 31
        and int(everything(root, channels=2, target="gland")[6]["mask"].sum()) == 31
    )
    with pytest.raises(ValueError, match="empty_slices must be one of"):
        everything(root, empty_slices="some")


def test_v1_training_list_and_missing_channel_file(tmp_path):
    root = write_v1_nifti(tmp_path)
    data = everything(root, window=(-1000, -985))
    assert data.case_ids == [f"liver_{c}" for c in range(5)]
    assert data[2]["image"].unique().tolist() == [-985.0]  # -1000 + 0 + 20, clipped at the window's top
    assert int(data[2]["mask"].sum()) == 31
    (root / "imagesTr" / "liver_3_0000.nii.gz").unlink()
    with pytest.raises(
        DiffSegError, match=r"imagesTr/liver_3_0000\.nii\.gz: missing: channel 0 \(CT\) of case liver_3"
    ):
        everything(root)
    skipping = everything(root, on_bad_case="skip")
    assert skipping.case_ids == ["liver_0", "liver_1", "liver_2", "liver_4"]
    assert [Path(p).name for p, _ in skipping.skipped] == ["liver_3_0000.nii.gz"]
    (root / "labelsTr" / "liver_4.nii.gz").unlink()
    assert [(Path(p).name, why) for p, why in everything(root, on_bad_case="skip").skipped] == [
        ("liver_3_0000.nii.gz", "missing: channel 0 (CT) of case liver_3"),
        ("liver_4.nii.gz", "missing: the label map of case liver_4"),
    ]


def test_png_rgb_in_one_file_and_two_grey_channels(tmp_path):
    rgb = everything(write_v2_png(tmp_path), channels=3)
    assert len(rgb) == 5
    item = rgb[2]
    assert item["image"].shape == (3, 16, 18) and item["image"][:, 0, 0].tolist() == [20.0, 21.0, 22.0]
    assert int(item["mask"].sum()) == (5 + 2) * 6 and int(item["slice"]) == -1
    assert item["case"].endswith("imagesTr/road_002_0000.png") and "spacing" not in item
    root = write_v2_png(tmp_path, rgb=False)
    grey = everything(root, channels=2)
    assert grey[3]["image"][:, 0, 0].tolist() == [3.0, 53.0]
    (root / "imagesTr" / "road_001_0001.png").unlink()
    with pytest.raises(
        DiffSegError, match=r"imagesTr/road_001_0001\.png: missing: channel 1 \(B\) of case road_001"
    ):
        everything(root, channels=2)
    stray = write_v2_png(tmp_path / "stray")
    Image.fromarray(np.zeros((16, 18), np.uint8)).save(
        stray / "imagesTr" / "road_000_0000.png"
    )  # grey, not RGB
    with pytest.raises(
        DiffSegError,
        match=r"road_000_0000\.png: case road_000 holds 1 channel\(s\) but dataset\.json lists 3",
    ):
        everything(stray, channels=3)[0]


def test_v2_explicit_dataset_lists(tmp_path):
    root = write_v2_png(tmp_path)
    meta = json.loads((root / "dataset.json").read_text())
    meta["dataset"] = {  # nnU-Net v2's optional explicit file lists, relative to the dataset folder
        "first": {"images": ["imagesTr/road_003_0000.png"], "label": "labelsTr/road_003.png"},
        "second": {"images": ["imagesTr/road_001_0000.png"], "label": "labelsTr/road_001.png"},
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    data = everything(root, channels=3)
    assert data.case_ids == ["first", "second"]
    assert [int(data[i]["mask"].sum()) for i in range(2)] == [(5 + 3) * 6, (5 + 1) * 6]


def test_label_values_must_be_in_dataset_json(tmp_path):
    root = write_v2_png(tmp_path)
    bad = png_label(1)
    bad[0, 0] = 3
    Image.fromarray(bad).save(root / "labelsTr" / "road_001.png")
    data = everything(root, channels=3)
    with pytest.raises(
        DiffSegError, match=r"labelsTr/road_001\.png: unexpected label value\(s\) 3; expected the values"
    ):
        data[1]
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "labelsTr" / "road_002.png")
    with pytest.raises(DiffSegError, match=r"road_002\.png: mask size \(5, 5\) .*differs"):
        data[2]
    nifti = write_v2_nifti(tmp_path)
    label = label_volume()
    label[0, 0, 0] = 7
    save_nifti(nifti / "labelsTr" / "prostate_02.nii.gz", label)
    (nifti / "imagesTr" / "prostate_03_0001.nii.gz").write_bytes(b"not gzip")
    save_nifti(nifti / "labelsTr" / "prostate_04.nii.gz", np.zeros((12, 10, 3), np.uint8))
    data = everything(nifti, channels=2, on_bad_case="skip")
    assert data.case_ids == ["prostate_00", "prostate_01", "prostate_02", "prostate_05"]
    reasons = dict(data.skipped)
    assert "not a readable NIfTI file" in reasons[str(nifti / "imagesTr" / "prostate_03_0001.nii.gz")]
    assert (
        "label shape (12, 10, 3) differs from the image shape (12, 10, 4)"
        in reasons[str(nifti / "labelsTr" / "prostate_04.nii.gz")]
    )
    with pytest.raises(DiffSegError, match=r"labelsTr/prostate_02\.nii\.gz: unexpected label value\(s\) 7"):
        data[8]


def test_seeded_splits_and_kfold_by_case(tmp_path):
    root = write_v2_nifti(tmp_path, cases=10)
    ids = {s: NNUNetRaw(root, s, channels=2).case_ids for s in ("train", "val", "test")}
    assert [len(ids[s]) for s in ("train", "val", "test")] == [7, 1, 2]
    assert sorted(sum(ids.values(), [])) == [f"prostate_{c:02d}" for c in range(10)]
    assert NNUNetRaw(root, "val", channels=2).case_ids == ids["val"]  # deterministic
    tests = [NNUNetRaw(root, "test", channels=2, folds=5, fold=k).case_ids for k in range(5)]
    assert sorted(sum(tests, [])) == [f"prostate_{c:02d}" for c in range(10)]
    train = NNUNetRaw(root, "train", channels=2, folds=5, fold=0)
    assert set(train.case_ids).isdisjoint(tests[0])
    assert {train[i]["case"].split("#")[0] for i in range(len(train))} == {
        str(root / "imagesTr" / f"{c}_0000.nii.gz") for c in train.case_ids
    }  # every slice of a case in one split


def test_splits_final_json_and_labelled_test_set(tmp_path):
    root = write_v2_nifti(tmp_path, labels_ts=True)
    ids = [f"prostate_{c:02d}" for c in range(6)]
    # with labelsTs: test = imagesTs + labelsTs, train / val share all training cases
    test = NNUNetRaw(root, "test", channels=2, size=None)
    assert test.case_ids == ["prostate_06", "prostate_07"] and int(test[1]["mask"].sum()) == 16
    train, val = (NNUNetRaw(root, s, channels=2).case_ids for s in ("train", "val"))
    assert sorted(train + val) == ids and len(val) == 1
    folds = [{"train": ids[2:], "val": ids[:2]}, {"train": ids[:4], "val": ids[4:]}]
    (root / "splits_final.json").write_text(json.dumps(folds))
    assert NNUNetRaw(root, "val", channels=2, fold=1).case_ids == ["prostate_04", "prostate_05"]
    assert NNUNetRaw(root, "train", channels=2, fold=1).case_ids == ids[:4]
    assert NNUNetRaw(root, "test", channels=2, fold=1).case_ids == ["prostate_06", "prostate_07"]
    with pytest.raises(ValueError, match=r"data\.folds=5 but .*splits_final\.json holds 2 folds"):
        NNUNetRaw(root, "train", channels=2, folds=5)
    with pytest.raises(ValueError, match=r"data\.fold must lie in \[0, 2\)"):
        NNUNetRaw(root, "train", channels=2, fold=2)
    # the preprocessed folder's file, given explicitly; without labelsTs the test split is the fold's val
    elsewhere = tmp_path / "splits.json"
    elsewhere.write_text(json.dumps([{"train": ids[1:], "val": ["prostate_00", "prostate_99"]}]))
    (root / "splits_final.json").unlink()
    with pytest.raises(
        DiffSegError, match=r"splits\.json: fold 0 val lists case\(s\) not in the dataset: prostate_99"
    ):
        NNUNetRaw(root, "val", channels=2, splits_file=str(elsewhere))
    elsewhere.write_text(json.dumps([{"train": ids[1:], "val": ids[:1]}]))
    for folder in ("labelsTs",):
        for path in (root / folder).iterdir():
            path.unlink()
        (root / folder).rmdir()
    with pytest.raises(DiffSegError, match="no labelsTs/.*set data.test_from_val=true"):
        NNUNetRaw(root, "test", channels=2, splits_file=str(elsewhere))
    with pytest.warns(UserWarning, match="the test split is fold 0's val cases"):
        test = NNUNetRaw(root, "test", channels=2, splits_file=str(elsewhere), test_from_val=True)
        assert test.case_ids == ["prostate_00"]


def test_predict_split_is_unlabelled_images_ts(tmp_path):
    root = write_v2_nifti(tmp_path)
    data = NNUNetRaw(root, "predict", channels=2, size=8)
    assert data.case_ids == ["prostate_06", "prostate_07"] and len(data) == 2 * SHAPE[2]
    item = data[5]
    assert "mask" not in item and item["image"].shape == (2, 8, 8)
    assert item["case"] == str(
        root / "imagesTs" / "prostate_07_0000.nii.gz"
    )  # a readable file, for the writer
    assert int(item["slice"]) == 1 and int(item["num_slices"]) == SHAPE[2]


def test_dataset_json_errors_name_the_file(tmp_path):
    with pytest.raises(DiffSegError, match=r"dataset\.json: not found"):
        NNUNetRaw(tmp_path)
    (tmp_path / "dataset.json").write_text('{"labels": {"background": 0}, "file_ending": ".png"}')
    with pytest.raises(
        DiffSegError, match=r"dataset\.json: neither 'channel_names' \(nnU-Net v2\) nor 'modality'"
    ):
        NNUNetRaw(tmp_path)
    (tmp_path / "dataset.json").write_text(
        '{"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1}, "file_ending": ".mha"}'
    )
    with pytest.raises(DiffSegError, match=r"file_ending '\.mha' is not supported"):
        NNUNetRaw(tmp_path)


def test_a_batch_through_the_hydra_config(tmp_path):
    root = write_v1_nifti(tmp_path, cases=10)
    cfg = compose_config(
        "train", ["data=nnunet", f"data.root={root}", "data.num_workers=0"], tmp_path / "run"
    )
    dm = instantiate(cfg.data)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (16, 1, 128, 128) and batch["mask"].shape == (16, 1, 128, 128)
    assert batch["spacing"].shape == (16, 2) and set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
    assert len(set(batch["case"])) == 16  # one item per slice, each named by file and slice


def test_a_malformed_dataset_json_entry_names_the_file(tmp_path):
    root = write_v2_nifti(tmp_path)
    meta = json.loads((root / "dataset.json").read_text())
    meta["dataset"] = {"prostate_00": {"label": "labelsTr/prostate_00.nii.gz"}}  # no "images"
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(
        DiffSegError, match=r"dataset\.json: malformed nnU-Net dataset\.json \(KeyError: 'images'\)"
    ):
        NNUNetRaw(root, "train", channels=2)


def test_a_label_off_the_images_voxel_grid_is_a_bad_case_naming_both_files(tmp_path):
    root = write_v2_nifti(tmp_path)
    label = root / "labelsTr" / "prostate_01.nii.gz"
    save_nifti(label, label_volume(), spacing=(0.8, 1.5, 6.0))  # slices twice as far apart as the images'
    message = (
        rf"labelsTr/prostate_01\.nii\.gz: voxel spacing \(0\.8, 1\.5, 6\) differs from \(0\.8, 1\.5, 3\) of "
        rf"{root / 'imagesTr' / 'prostate_01_0000.nii.gz'}; the volumes of a case must share one voxel grid"
    )
    with pytest.raises(DiffSegError, match=message):
        everything(root)
    skipping = everything(root, on_bad_case="skip")
    assert "prostate_01" not in skipping.case_ids and [p for p, _ in skipping.skipped] == [str(label)]
    save_nifti(label, label_volume())
    channel = root / "imagesTr" / "prostate_02_0001.nii.gz"
    nib.save(nib.Nifti1Image(image_volume(2, 1), np.diag([*SPACING, 1.0]) @ np.diag([1, -1, 1, 1])), channel)
    with pytest.raises(DiffSegError, match=r"prostate_02_0001\.nii\.gz: orientation RPS differs from RAS of"):
        everything(root)
