"""QUBIQ loader: a tiny replica of the official layout, the real kidney subset, and one training run."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, compose_config, shared_data
from hydra.utils import instantiate

from diffseg_lightning.data import SegmentationDataModule
from diffseg_lightning.data.qubiq import CT_WINDOW, QUBIQ
from diffseg_lightning.data.splits import split_by_fractions
from diffseg_lightning.utils.errors import DiffSegError

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (24, 20)
SPACING = (0.8, 1.5)


def save_nifti(path: Path, array: np.ndarray, spacing=SPACING) -> None:
    affine = np.diag([*spacing, 1.0, 1.0])
    nib.save(nib.Nifti1Image(array.astype(np.float32), affine), path)


def rater_mask(case: int, rater: int, shape=SHAPE) -> np.ndarray:
    """Rater k of case c marks rows 2 .. 8 + k + c (so raters disagree on the lower rows), cols 3 .. 12."""
    mask = np.zeros(shape, np.float32)
    mask[2 : 8 + rater + case % 3, 3:12] = 1
    return mask


def write_qubiq(
    task_dir: Path,
    cases: int = 5,
    raters: int = 3,
    subtasks: dict[str, int] | None = None,
    folder: str = "Training",
    shape=SHAPE,
    first: int = 1,
) -> None:
    """``task_dir/<folder>/caseNN/image.nii.gz`` + ``taskMM_segKK.nii.gz``, NIfTI float32 with SPACING."""
    subtasks = subtasks or {"task01": raters}
    rng = np.random.default_rng(0)
    for c in range(first, first + cases):
        case_dir = task_dir / folder / f"case{c:02d}"
        case_dir.mkdir(parents=True)
        save_nifti(case_dir / "image.nii.gz", rng.uniform(-1024, 1500, shape))
        for subtask, count in subtasks.items():
            for k in range(1, count + 1):
                save_nifti(case_dir / f"{subtask}_seg{k:02d}.nii.gz", rater_mask(c, k, shape))


def qubiq_module(root: Path, **kwargs) -> SegmentationDataModule:
    splits = {s: partial(QUBIQ, root, s, channels=1, **kwargs) for s in ("train", "val", "test")}
    return SegmentationDataModule(**splits, channels=1, batch_size=4, eval_batch_size=4)


def case_number(item: dict) -> int:
    return int(Path(item["case"]).parent.name[-2:])


def test_datamodule_batches_all_raters_majority_and_spacing(tmp_path):
    write_qubiq(tmp_path / "kidney", cases=10)
    dm = qubiq_module(tmp_path, task="kidney", size=None)
    dm.setup("fit")
    assert [len(dm.datasets[s]) for s in ("train", "val")] == [7, 1]
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, *SHAPE) and batch["image"].dtype == torch.float32
    assert batch["masks"].shape == (4, 3, *SHAPE) and batch["mask"].shape == (4, 1, *SHAPE)
    assert torch.equal(batch["spacing"], torch.tensor([SPACING] * 4, dtype=torch.float32))
    for i, case in enumerate(batch["case"]):
        c = int(Path(case).parent.name[-2:])
        raters = np.stack([rater_mask(c, k) for k in (1, 2, 3)])
        assert np.array_equal(batch["masks"][i].numpy(), raters)
        assert np.array_equal(batch["mask"][i, 0].numpy(), (raters.sum(0) >= 2).astype(np.float32))


def test_resize_scales_spacing_and_keeps_masks_binary(tmp_path):
    write_qubiq(tmp_path / "kidney", cases=3)
    data = QUBIQ(tmp_path / "kidney", "train", size=(12, 10), fractions=(1.0, 0.0, 0.0))
    item = data[0]
    assert item["image"].shape == (1, 12, 10) and item["masks"].shape == (3, 12, 10)
    assert set(item["masks"].unique().tolist()) <= {0.0, 1.0} and set(item["mask"].unique().tolist()) == {
        0,
        1,
    }
    assert torch.allclose(item["spacing"], torch.tensor([SPACING[0] * 2, SPACING[1] * 2]))
    assert torch.allclose(item["original_spacing"], torch.tensor(SPACING))
    assert item["original_size"].tolist() == list(SHAPE)


def test_majority_needs_more_than_half_of_the_raters(tmp_path):
    write_qubiq(tmp_path / "prostate", cases=2, raters=4)
    data = QUBIQ(tmp_path / "prostate", "train", size=None, fractions=(1.0, 0.0, 0.0))
    item = data[0]
    votes = np.stack([rater_mask(case_number(item), k) for k in range(1, 5)]).sum(0)
    assert data.raters == [1, 2, 3, 4] and item["masks"].shape[0] == 4
    assert (votes == 2).any() and (votes == 3).any()  # a tie and a majority both occur
    assert np.array_equal(item["mask"][0].numpy() > 0, votes >= 3)  # 2 of 4 is background


def test_subtasks_and_raters_are_discovered(tmp_path):
    write_qubiq(tmp_path / "brain-tumor", cases=2, subtasks={"task01": 3, "task02": 2})
    first = QUBIQ(tmp_path, "train", task="brain-tumor", fractions=(1.0, 0.0, 0.0), window=None)
    assert first.subtasks == ["task01", "task02"] and first.subtask == "task01" and first.raters == [1, 2, 3]
    second = QUBIQ(tmp_path / "brain-tumor", "train", subtask=2, fractions=(1.0, 0.0, 0.0))
    assert second.subtask == "task02" and second[0]["masks"].shape[0] == 2
    assert QUBIQ(tmp_path / "brain-tumor", "train", subtask="task02", fractions=(1.0, 0.0, 0.0)).raters == [
        1,
        2,
    ]
    with pytest.raises(DiffSegError, match=r"no sub-task 'task03'.*task01, task02"):
        QUBIQ(tmp_path / "brain-tumor", "train", subtask=3)


def test_splits_partition_the_training_cases_deterministically(tmp_path):
    write_qubiq(tmp_path / "kidney", cases=20)

    def cases(split, seed=0):
        return [p.parent.name for p, _ in QUBIQ(tmp_path / "kidney", split, seed=seed).cases]

    parts = [cases(s) for s in ("train", "val", "test")]
    assert [len(p) for p in parts] == [14, 2, 4]
    assert sorted(sum(parts, [])) == [f"case{c:02d}" for c in range(1, 21)]
    assert parts == [cases(s) for s in ("train", "val", "test")]
    assert cases("test", seed=1) != parts[2]


def test_validation_folder_is_the_test_split(tmp_path):
    write_qubiq(tmp_path / "kidney", cases=8)
    write_qubiq(tmp_path / "kidney", cases=3, folder="Validation", first=21)

    def cases(split):
        return [p.parent.name for p, _ in QUBIQ(tmp_path / "kidney", split).cases]

    assert cases("test") == ["case21", "case22", "case23"]
    train, val = cases("train"), cases("val")
    assert (len(train), len(val)) == (7, 1)  # 0.7 : 0.1 of the 8 Training cases
    assert sorted(train + val) == [f"case{c:02d}" for c in range(1, 9)]


def test_volumes_give_one_item_per_axial_slice(tmp_path):
    write_qubiq(tmp_path / "pancreas", cases=2, shape=(16, 12, 5))
    data = QUBIQ(tmp_path / "pancreas", "train", size=None, fractions=(1.0, 0.0, 0.0))
    assert len(data) == 10 and [data[i]["slice"].item() for i in range(5)] == [0, 1, 2, 3, 4]
    item = data[3]
    expected = rater_mask(case_number(item), 2, (16, 12, 5))[:, :, 3]
    assert item["image"].shape == (1, 16, 12) and np.array_equal(item["masks"][1].numpy(), expected)


def test_hu_window(tmp_path):
    write_qubiq(tmp_path / "kidney", cases=2)
    write_qubiq(tmp_path / "prostate", cases=2)

    def extremes(task_dir, **kw):
        image = QUBIQ(tmp_path / task_dir, "train", size=None, fractions=(1.0, 0.0, 0.0), **kw)[0]["image"]
        return image.min().item(), image.max().item()

    assert extremes("kidney") == CT_WINDOW == (-200.0, 300.0)
    assert extremes("kidney", window=[-100, 50]) == (-100.0, 50.0)
    low, high = extremes("kidney", window=None)
    assert low < -900 and high > 1000
    low, high = extremes("prostate")  # MR: auto does not clip
    assert low < -900 and high > 1000
    with pytest.raises(ValueError, match="window"):
        QUBIQ(tmp_path / "kidney", window="soft")


def test_options_and_layout_errors(tmp_path):
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'val', 'test'\), got 'dev'"):
        QUBIQ(tmp_path, "dev")
    with pytest.raises(DiffSegError, match="does not exist"):
        QUBIQ(tmp_path / "nowhere")
    write_qubiq(tmp_path / "kidney", cases=3)
    with pytest.raises(DiffSegError, match=r"data\.task.*kidney"):
        QUBIQ(tmp_path)
    with pytest.raises(DiffSegError, match=r"prostate: no such QUBIQ task folder.*kidney"):
        QUBIQ(tmp_path, task="prostate")
    with pytest.raises(DiffSegError, match=r"task folder 'kidney' but data\.task='prostate'"):
        QUBIQ(tmp_path / "kidney", task="prostate")


def test_missing_rater_file_names_the_case_and_file(tmp_path):
    write_qubiq(tmp_path / "kidney", cases=5)
    (tmp_path / "kidney" / "Training" / "case04" / "task01_seg03.nii.gz").unlink()
    with pytest.raises(DiffSegError, match=r"case04: missing task01_seg03\.nii\.gz \(the other cases have 3"):
        QUBIQ(tmp_path / "kidney")
    (tmp_path / "kidney" / "Training" / "case02" / "image.nii.gz").unlink()
    with pytest.raises(DiffSegError, match=r"case02: no image\.nii\.gz"):
        QUBIQ(tmp_path / "kidney")


def test_bad_files_name_the_file(tmp_path):
    write_qubiq(tmp_path / "kidney", cases=3)
    case = tmp_path / "kidney" / "Training" / "case02"
    load = partial(QUBIQ, tmp_path / "kidney", "train", fractions=(1.0, 0.0, 0.0), size=None)

    save_nifti(case / "task01_seg02.nii.gz", rater_mask(2, 2) * 255)
    data = load()
    with pytest.raises(
        DiffSegError, match=r"case02/task01_seg02\.nii\.gz: rater mask values must be 0 or 1, found \[255"
    ):
        data[1]

    save_nifti(case / "task01_seg02.nii.gz", np.zeros((10, 10), np.float32))
    with pytest.raises(
        DiffSegError, match=r"case02/task01_seg02\.nii\.gz: rater mask of shape \(10, 10\) does not"
    ):
        load()

    (case / "task01_seg02.nii.gz").write_bytes(b"not a nifti file")
    with pytest.raises(DiffSegError, match=r"case02/task01_seg02\.nii\.gz: not a readable NIfTI"):
        load()

    save_nifti(case / "task01_seg02.nii.gz", rater_mask(2, 2))
    save_nifti(case / "image.nii.gz", np.zeros((*SHAPE, 3), np.float32))
    with pytest.raises(
        DiffSegError, match=r"case02/image\.nii\.gz: image has 3 channel\(s\) but the config expects 1"
    ):
        load()


def names(data: QUBIQ) -> list[str]:
    return [p.parent.name for p, _ in data.cases]


def test_skip_leaves_out_bad_case_folders_and_keeps_the_split(tmp_path):
    write_qubiq(tmp_path / "kidney", cases=20)
    task = tmp_path / "kidney"
    before = {s: names(QUBIQ(task, s)) for s in ("train", "val", "test")}
    no_rater, no_image = before["test"][0], before["train"][3]
    (task / "Training" / no_rater / "task01_seg03.nii.gz").unlink()
    (task / "Training" / no_image / "image.nii.gz").unlink()
    with pytest.raises(DiffSegError, match=rf"{no_image}: no image\.nii\.gz"):
        QUBIQ(task, "val")  # "error": any case folder, whatever its split
    after = {s: QUBIQ(task, s, on_bad_case="skip") for s in ("train", "val", "test")}
    assert after["test"].skipped == [
        (
            str(task / "Training" / no_rater),
            "missing task01_seg03.nii.gz (the other cases have 3 rater file(s): task01_seg01.nii.gz, "
            "task01_seg02.nii.gz, task01_seg03.nii.gz); every case needs the same sub-tasks and raters",
        )
    ]
    assert [p for p, _ in after["train"].skipped] == [str(task / "Training" / no_image)]
    assert after["train"].skipped[0][1].startswith("no image.nii.gz")
    assert after["val"].skipped == []
    for split, data in after.items():
        assert names(data) == [c for c in before[split] if c not in (no_rater, no_image)]
    assert after["test"].raters == [1, 2, 3] and after["test"][0]["masks"].shape[0] == 3


def test_skip_leaves_out_a_case_whose_header_does_not_fit(tmp_path):
    write_qubiq(tmp_path / "kidney", cases=3)
    case = tmp_path / "kidney" / "Training" / "case02"
    save_nifti(case / "task01_seg02.nii.gz", np.zeros((10, 10), np.float32))
    data = QUBIQ(tmp_path / "kidney", "train", fractions=(1.0, 0.0, 0.0), on_bad_case="skip")
    assert names(data) == ["case01", "case03"]
    assert data.skipped[0][0] == str(case)
    assert "task01_seg02.nii.gz: rater mask of shape (10, 10) does not match" in data.skipped[0][1]


def test_kfold_without_validation_folder_partitions_the_cases(tmp_path):
    write_qubiq(tmp_path / "kidney", cases=20)
    everything = [f"case{c:02d}" for c in range(1, 21)]
    tests = []
    for fold in range(5):
        parts = {
            s: names(QUBIQ(tmp_path / "kidney", s, folds=5, fold=fold)) for s in ("train", "val", "test")
        }
        assert [len(parts[s]) for s in ("train", "val", "test")] == [14, 2, 4]  # 16 others: 0.7 : 0.1
        assert sorted(sum(parts.values(), [])) == everything  # disjoint and complete
        assert names(QUBIQ(tmp_path / "kidney", "test", folds=5, fold=fold)) == parts["test"]
        tests += parts["test"]
    assert sorted(tests) == everything  # every case is tested in exactly one fold


def test_kfold_with_validation_folder_folds_the_training_cases(tmp_path):
    write_qubiq(tmp_path / "kidney", cases=6)
    write_qubiq(tmp_path / "kidney", cases=2, folder="Validation", first=21)
    training = [f"case{c:02d}" for c in range(1, 7)]
    vals = []
    for fold in range(3):
        train, val = (names(QUBIQ(tmp_path / "kidney", s, folds=3, fold=fold)) for s in ("train", "val"))
        assert len(val) == 2 and sorted(train + val) == training
        vals += val
        assert names(QUBIQ(tmp_path / "kidney", "test", folds=3, fold=fold)) == ["case21", "case22"]
    assert sorted(vals) == training
    # without folds: the former train / val cut of the Training cases, 0.7 : 0.1 renormalised
    former = split_by_fractions(6, (0.7 / 0.8, 0.1 / 0.8, 0.0), 0)
    assert names(QUBIQ(tmp_path / "kidney", "val")) == [training[i] for i in former[1]]
    assert names(QUBIQ(tmp_path / "kidney", "train")) == [training[i] for i in former[0]]


def test_seen_labels_are_the_stored_rater_values(tmp_path):
    write_qubiq(tmp_path / "kidney", cases=2)
    data = QUBIQ(tmp_path / "kidney", "train", size=8, fractions=(1.0, 0.0, 0.0))
    assert data.seen_labels == set()
    data[0]
    assert data.seen_labels == {0, 1}
    save_nifti(tmp_path / "kidney" / "Training" / "case02" / "task01_seg01.nii.gz", rater_mask(2, 1) * 255)
    with pytest.raises(DiffSegError, match="rater mask values must be 0 or 1"):
        data[1]
    assert data.seen_labels == {0, 1, 255}  # recorded before the check, for the data report


def test_config_passes_folds_and_the_bad_case_policy(tmp_path):
    write_qubiq(tmp_path / "kidney", cases=10)
    (tmp_path / "kidney" / "Training" / "case05" / "image.nii.gz").unlink()
    overrides = ["data=qubiq", f"data.root={tmp_path / 'kidney'}", "data.num_workers=0", "data.size=16"]
    overrides += ["data.folds=5", "data.fold=3", "data.on_bad_case=skip", "data.batch_size=2"]
    dm = instantiate(compose_config("train", overrides, tmp_path / "run").data)
    with pytest.warns(UserWarning, match=r"left out 1 bad case\(s\) .*case05: no image\.nii\.gz"):
        dm.setup(None)
    for split in ("train", "val", "test"):
        expected = QUBIQ(tmp_path / "kidney", split, folds=5, fold=3, on_bad_case="skip")
        assert names(dm.datasets[split]) == names(expected) and dm.datasets[split].fold == 3
        assert dm.reports[split].problems == expected.skipped
    assert sum(len(dm.reports[s].problems) for s in ("train", "val", "test")) == 1
    batch = next(iter(dm.train_dataloader()))
    assert batch["masks"].shape == (2, 3, 16, 16)


# -- the real subset ---------------------------------------------------------------------------------


def test_real_kidney_subset():
    root = shared_data("qubiq") / "kidney"
    data = QUBIQ(root, "train", size=None, fractions=(1.0, 0.0, 0.0))
    assert len(data) == 20 and data.subtasks == ["task01"] and data.raters == [1, 2, 3]
    assert [p.parent.name for p, _ in data.cases] == [f"case{c:02d}" for c in range(1, 21)]
    assert set(data.spacings) == {(1.0, 1.0)}
    header = nib.load(data.cases[0][0])
    assert header.shape == (497, 497) and header.get_data_dtype() == np.float32
    item = data[0]
    assert item["image"].shape == (1, 497, 497) and item["masks"].shape == (3, 497, 497)
    assert item["image"].min() == CT_WINDOW[0] and item["image"].max() == CT_WINDOW[1]
    assert 1000 < item["mask"].sum() < item["masks"].sum(0).gt(0).sum()  # a kidney; the union is larger
    assert [len(QUBIQ(root, s)) for s in ("train", "val", "test")] == [14, 2, 4]


def test_train_on_real_kidney_reports_multi_annotator_metrics(tmp_path):
    from diffseg_lightning.train import train

    root = shared_data("qubiq") / "kidney"
    overrides = [
        *TINY_MODEL,
        "data=qubiq",
        f"data.root={root}",
        "data.size=32",
        "data.channels=1",
        "data.num_workers=0",
        "+trainer.limit_train_batches=2",  # `+`: the trainer config does not define the limit_* keys
        "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1",
    ]
    train(compose_config("train", overrides, tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {"ged", "hm_iou", "soft_dice"} <= set(summary["mean"])
    assert all("/kidney/Training/case" in row["case"] for row in summary["metric_per_case"])


def test_a_rater_on_another_voxel_grid_is_a_bad_case_naming_both_files(tmp_path):
    write_qubiq(tmp_path / "kidney", cases=3)
    case = tmp_path / "kidney" / "Training" / "case02"
    rater = case / "task01_seg03.nii.gz"
    # the same voxels, stored with axis 0 reversed: the rater's box would land on the other side
    affine = np.diag([-SPACING[0], SPACING[1], 1.0, 1.0])
    affine[0, 3] = SPACING[0] * (SHAPE[0] - 1)
    nib.save(nib.Nifti1Image(rater_mask(2, 3)[::-1].copy(), affine), rater)
    message = (
        r"case02/task01_seg03\.nii\.gz: orientation LAS differs from RAS of image\.nii\.gz \(an axis is "
        r"flipped or swapped\); the volumes of a case must share one voxel grid"
    )
    with pytest.raises(DiffSegError, match=message):
        QUBIQ(tmp_path / "kidney", "train", fractions=(1.0, 0.0, 0.0))
    data = QUBIQ(tmp_path / "kidney", "train", fractions=(1.0, 0.0, 0.0), on_bad_case="skip")
    assert names(data) == ["case01", "case03"] and data.skipped[0][0] == str(case)
    save_nifti(rater, rater_mask(2, 3), spacing=(0.8, 3.0))  # another pixel spacing
    with pytest.raises(
        DiffSegError, match=r"task01_seg03\.nii\.gz: voxel spacing \(0\.8, 3, 1\) differs from"
    ):
        QUBIQ(tmp_path / "kidney", "train", fractions=(1.0, 0.0, 0.0))
