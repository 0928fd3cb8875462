"""GlaS / Warwick-QU in its official flat layout: a tiny replica with the release's quirks, and the real subset."""

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
from diffseg_lightning.data.glas import GlaS, read_grades
from diffseg_lightning.data.splits import split_by_fractions, train_val_split
from diffseg_lightning.utils.errors import DiffSegError

pytestmark = pytest.mark.usefixtures("one_thread")

# name -> (grade, patient); numbers chosen so that numeric and text order differ (2 < 10)
CASES = {
    "train_1": ("benign", 3),
    "train_2": ("malignant", 1),
    "train_10": ("malignant", 1),
    "train_11": ("benign", 4),
    "train_20": ("malignant", 2),
    "testA_2": ("benign", 5),
    "testA_10": ("malignant", 6),
    "testB_3": ("malignant", 7),
}
HEADER = "name,patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)"


def instance_map(seed: int, shape=(24, 30)) -> np.ndarray:
    """0 background and a few glands; ids as stored in the release, with a gap (id 3 unused)."""
    labels = np.zeros(shape, np.uint8)
    for k, gland in enumerate((1, 2, 4)):
        y, x = 2 + 7 * k, 2 + (seed + 5 * k) % 18
        labels[y : y + 5, x : x + 8] = gland
    return labels


def write_glas(root: Path, newline: str = "\r") -> dict[str, np.ndarray]:
    folder = root / "Warwick_QU_Dataset"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    truth = {}
    for i, name in enumerate(CASES):
        Image.fromarray(rng.integers(0, 255, (24, 30, 3), dtype=np.uint8)).save(folder / f"{name}.bmp")
        truth[name] = instance_map(i)
        Image.fromarray(truth[name]).save(folder / f"{name}_anno.bmp")
    rows = [HEADER] + [
        f"{n},{p}, {g}, {'healthy' if g == 'benign' else 'adenocarcinoma'}" for n, (g, p) in CASES.items()
    ]
    (folder / "Grade.csv").write_bytes(newline.join(rows).encode() + newline.encode())  # CR-only, as released
    return truth


def test_replica_quirks_are_real(tmp_path):
    write_glas(tmp_path)
    folder = tmp_path / "Warwick_QU_Dataset"
    assert b"\n" not in (folder / "Grade.csv").read_bytes()
    with Image.open(folder / "train_1_anno.bmp") as img:
        assert img.format == "BMP" and np.unique(np.asarray(img)).tolist() == [0, 1, 2, 4]


def test_grades_parse_with_cr_only_line_endings(tmp_path):
    write_glas(tmp_path)
    grades = read_grades(tmp_path / "Warwick_QU_Dataset" / "Grade.csv")
    assert len(grades) == len(CASES)
    assert grades["train_10"].grade == "malignant" and grades["train_10"].patient == 1
    assert grades["testA_2"].subtype == "healthy"


def test_splits_and_labels(tmp_path):
    write_glas(tmp_path)
    names = {s: GlaS(tmp_path, s, size=None).names for s in ("train", "val", "test", "testA", "testB")}
    assert names["testA"] == ["testA_2", "testA_10"]  # numeric order
    assert names["testB"] == ["testB_3"]
    assert names["test"] == names["testA"] + names["testB"]
    assert len(names["val"]) == 1 and len(names["train"]) == 4  # 0.2 of 5 train_* images
    assert sorted(names["train"] + names["val"]) == sorted(n for n in CASES if n.startswith("train"))
    assert GlaS(tmp_path, "val").names == names["val"]  # deterministic
    assert len(GlaS(tmp_path, "val", val_fraction=0.4).names) == 2
    data = GlaS(tmp_path, "test", size=None)
    for i, name in enumerate(data.names):
        assert int(data[i]["label"]) == {"benign": 0, "malignant": 1}[CASES[name][0]]
        assert data[i]["label"].dtype == torch.int64


def test_instances_keep_their_ids(tmp_path):
    truth = write_glas(tmp_path)
    data = GlaS(tmp_path, "testA", size=None)
    item = data[0]
    assert item["case"].endswith("testA_2.bmp")
    assert item["instances"].dtype == torch.int64 and item["instances"].shape == (24, 30)
    assert torch.equal(item["instances"], torch.from_numpy(truth["testA_2"]).long())
    assert torch.equal(item["mask"][0], (item["instances"] > 0).float())
    resized = GlaS(tmp_path, "testA", size=(48, 60))[0]  # nearest: every id survives, no new (blended) id
    assert resized["instances"].unique().tolist() == [0, 1, 2, 4]
    assert torch.equal(resized["instances"][::2, ::2], item["instances"])
    assert torch.equal(resized["mask"][0], (resized["instances"] > 0).float())


def test_a_batch_through_the_datamodule(tmp_path):
    write_glas(tmp_path)
    factory = partial(GlaS, tmp_path, size=16)
    dm = SegmentationDataModule(test=partial(factory, "test"), channels=3, eval_batch_size=3)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (3, 3, 16, 16) and batch["mask"].shape == (3, 1, 16, 16)
    assert batch["instances"].shape == (3, 16, 16) and batch["instances"].dtype == torch.int64
    assert batch["label"].tolist() == [0, 1, 1]  # testA_2 benign, testA_10 and testB_3 malignant


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(DiffSegError, match="does not exist"):
        GlaS(tmp_path / "absent")
    with pytest.raises(
        ValueError, match=r"split must be one of \('train', 'val', 'test', 'testA', 'testB'\)"
    ):
        GlaS(tmp_path, "testC")
    write_glas(tmp_path)
    folder = tmp_path / "Warwick_QU_Dataset"
    Image.new("L", (7, 7)).save(folder / "testA_2_anno.bmp")  # wrong size
    with pytest.raises(DiffSegError, match=r"testA_2_anno\.bmp: mask size \(7, 7\) .*differs"):
        GlaS(folder, "testA")[0]
    (folder / "testA_10_anno.bmp").write_bytes(b"BM broken")
    with pytest.raises(DiffSegError, match=r"testA_10_anno\.bmp: not a readable image"):
        GlaS(folder, "testA")[1]
    Image.new("RGB", (30, 24), (9, 200, 30)).save(folder / "testB_3_anno.bmp")  # colour, not labels
    with pytest.raises(DiffSegError, match=r"testB_3_anno\.bmp: expected a grey or palette label image"):
        GlaS(folder, "testB")[0]
    with pytest.raises(
        DiffSegError, match=r"testB_3\.bmp: image has 3 channel\(s\) but the config expects 1"
    ):
        GlaS(folder, "testB", channels=1)[0]
    (folder / "testB_3_anno.bmp").unlink()
    with pytest.raises(DiffSegError, match=r"testB_3\.bmp: no annotation; expected .*testB_3_anno\.bmp"):
        GlaS(folder, "test")

    grades = folder / "Grade.csv"
    text = grades.read_bytes()
    grades.write_bytes(text.replace(b"train_2,1, malignant", b"train_2,1, cancer"))
    with pytest.raises(DiffSegError, match=r"Grade\.csv, line \d+: grade 'cancer'"):
        GlaS(folder, "train")
    grades.write_bytes(b"\r".join(line for line in text.split(b"\r") if not line.startswith(b"train_11")))
    with pytest.raises(DiffSegError, match=r"train_11\.bmp: no grade for train_11 in .*Grade\.csv"):
        GlaS(folder, "train", val_fraction=0.0)
    grades.unlink()
    with pytest.raises(DiffSegError, match=r"Grade\.csv: not found"):
        GlaS(tmp_path, "train")


def test_train_val_split_is_the_former_fraction_split():
    """Without folds, train / val are what GlaS, DRIVE and MoNuSeg drew before k-fold existed."""
    for count in range(1, 41):
        for val_fraction in np.linspace(0.0, 1.0, 21).tolist():
            for seed in (0, 3):
                former = split_by_fractions(count, (1.0 - val_fraction, val_fraction), seed)
                assert [train_val_split(count, s, val_fraction, seed) for s in ("train", "val")] == former
                assert split_by_fractions(count, (1.0 - val_fraction, val_fraction, 0.0), seed)[:2] == former


def test_default_split_is_pinned(tmp_path):
    write_glas(tmp_path)
    train = ["train_1", "train_2", "train_10", "train_11", "train_20"]  # numeric order
    val = [train[i] for i in split_by_fractions(5, (0.8, 0.2), 0)[1]]
    assert GlaS(tmp_path, "val").names == val
    assert GlaS(tmp_path, "train").names == [n for n in train if n not in val]


def test_skip_leaves_out_images_without_annotation_or_grade(tmp_path):
    write_glas(tmp_path)
    folder = tmp_path / "Warwick_QU_Dataset"
    before = {s: GlaS(folder, s).names for s in ("train", "val")}
    (folder / "testA_10_anno.bmp").unlink()
    with pytest.raises(DiffSegError, match=r"testA_10\.bmp: no annotation"):
        GlaS(folder, "test")
    data = GlaS(folder, "test", size=None, on_bad_case="skip")
    expected = f"no annotation; expected {folder / 'testA_10_anno.bmp'}"
    assert data.skipped == [(str(folder / "testA_10.bmp"), expected)]
    assert data.names == ["testA_2", "testB_3"] and data[1]["case"].endswith("testB_3.bmp")

    victim = before["train"][0]  # drop its grade
    text = (folder / "Grade.csv").read_bytes()
    (folder / "Grade.csv").write_bytes(
        b"\r".join(r for r in text.split(b"\r") if not r.startswith(victim.encode() + b","))
    )
    train = GlaS(folder, "train", on_bad_case="skip")
    assert train.skipped == [
        (str(folder / f"{victim}.bmp"), f"no grade for {victim} in {folder / 'Grade.csv'}")
    ]
    assert train.names == before["train"][1:]
    assert GlaS(folder, "val", on_bad_case="skip").names == before["val"]  # the others keep their split


def test_kfold_over_the_training_images(tmp_path):
    write_glas(tmp_path)
    train_names = {n for n in CASES if n.startswith("train")}
    vals = []
    for fold in range(5):
        train, val = (GlaS(tmp_path, s, folds=5, fold=fold).names for s in ("train", "val"))
        assert len(val) == 1 and set(train) | set(val) == train_names and not set(train) & set(val)
        assert GlaS(tmp_path, "val", folds=5, fold=fold).names == val  # deterministic
        vals += val
    assert sorted(vals) == sorted(train_names)  # the validation folds partition the train_* images
    halves = [GlaS(tmp_path, "val", folds=2, fold=f).names for f in (0, 1)]
    assert sorted(map(len, halves)) == [2, 3] and not set(halves[0]) & set(halves[1])
    assert GlaS(tmp_path, "test", folds=5, fold=3).names == ["testA_2", "testA_10", "testB_3"]  # official


def test_seen_labels_are_the_stored_instance_ids(tmp_path):
    write_glas(tmp_path)
    data = GlaS(tmp_path, "testA", size=16)
    data[0]
    assert data.seen_labels == {0, 1, 2, 4}  # as stored, id 3 absent; not the binarised mask


def test_config_passes_folds_and_the_bad_case_policy(tmp_path):
    write_glas(tmp_path)
    (tmp_path / "Warwick_QU_Dataset" / "testB_3_anno.bmp").unlink()
    overrides = [
        "data=glas",
        f"data.root={tmp_path}",
        "data.num_workers=0",
        "data.size=16",
        "data.batch_size=2",
    ]
    overrides += ["data.folds=5", "data.fold=4", "data.on_bad_case=skip"]
    dm = instantiate(compose_config("train", overrides, tmp_path / "run").data)
    dm.setup("fit")
    assert dm.datasets["val"].names == GlaS(tmp_path, "val", folds=5, fold=4).names
    assert len(dm.datasets["train"]) == 4 and dm.datasets["train"].fold == 4
    assert next(iter(dm.train_dataloader()))["image"].shape == (2, 3, 16, 16)
    with pytest.warns(UserWarning, match=r"left out 1 bad case\(s\) of the test split .*testB_3\.bmp"):
        dm.setup("test")
    assert len(dm.datasets["test"]) == 2


# ------------------------------------------------------------------------------------- the real subset
def test_real_subset_counts_and_values():
    root = shared_data("glas")
    sizes = {s: len(GlaS(root, s, size=None)) for s in ("train", "val", "test", "testA", "testB")}
    assert sizes == {"train": 13, "val": 3, "test": 10, "testA": 6, "testB": 4}  # 16 train, 6 testA, 4 testB
    data = GlaS(root / "Warwick_QU_Dataset", "testA", size=None)
    assert len(data.grades) == 26  # Grade.csv (CR-only) lists every image of the subset
    for i in (0, len(data) - 1):
        item = data[i]
        name = data.names[i]
        with Image.open(Path(item["case"]).with_name(f"{name}_anno.bmp")) as img:
            stored = np.array(img)
        assert torch.equal(item["instances"], torch.from_numpy(stored).long())  # ids as stored
        assert item["instances"].max() >= 1 and item["image"].shape[0] == 3
        assert int(item["label"]) == {"benign": 0, "malignant": 1}[data.grades[name].grade]
    assert GlaS(root, "testB", size=32)[0]["instances"].shape == (32, 32)
