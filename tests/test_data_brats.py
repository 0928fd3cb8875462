"""BraTS loader: tiny replicas of the 2021 and 2023 (GLI) layouts, with the official file names and dtypes."""

from __future__ import annotations

import gzip
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import compose_config
from hydra.utils import instantiate

from diffseg_lightning.data import brats as brats_module
from diffseg_lightning.data.brats import BraTS, patient_id, split_case
from diffseg_lightning.utils.errors import DiffSegError

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (16, 16, 6)  # (H, W, D): 240 x 240 x 155 in the release
FILES = {
    "2021": ("_", {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"}),
    "2023": ("-", {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}),
}
OFFSET = {"t1": 100, "t1ce": 200, "t2": 300, "flair": 400}  # tells the channels apart
ET_LABEL = {"2021": 4, "2023": 3}


def case_name(naming: str, number: int, timepoint: int = 0) -> str:
    return f"BraTS2021_{number:05d}" if naming == "2021" else f"BraTS-GLI-{number:05d}-{timepoint:03d}"


def label_volume(et: int, shape=SHAPE) -> np.ndarray:
    """Slices 0 and 5 empty; 1: ED; 2: ED + NCR; 3: ED + NCR + ET (nested boxes); 4: ET only."""
    seg = np.zeros(shape, np.int16)
    seg[4:8, 4:8, 1] = 2
    seg[4:10, 4:10, 2] = 2
    seg[6:8, 6:8, 2] = 1
    seg[3:12, 3:12, 3] = 2
    seg[5:9, 5:9, 3] = 1
    seg[6:8, 6:8, 3] = et
    seg[6:8, 6:8, 4] = et
    return seg


def box(rows: tuple[int, int], cols: tuple[int, int], shape=SHAPE[:2]) -> np.ndarray:
    out = np.zeros(shape, np.float32)
    out[rows[0] : rows[1], cols[0] : cols[1]] = 1
    return out


def modality_volume(modality: str, number: int, dtype, shape=SHAPE) -> np.ndarray:
    """Brain = rows / cols 2..13 (every slice), values > 0 around the modality's offset; background 0."""
    rng = np.random.default_rng(number * 10 + OFFSET[modality])
    volume = np.zeros(shape, np.float32)
    volume[2:14, 2:14] = OFFSET[modality] + rng.uniform(1, 40, (12, 12, shape[2])) + number
    return volume.astype(dtype)


def save(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> None:
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # the release's LPS-like flip
    nib.save(nib.Nifti1Image(array, affine), path)


def write_case(root: Path, naming: str, number: int, timepoint: int = 0, **kw) -> Path:
    """One case folder with the official names; 2021: int16 images + uint8 seg, 2023: float32 + int16."""
    image_dtype, seg_dtype = (np.int16, np.uint8) if naming == "2021" else (np.float32, np.int16)
    shape, spacing = kw.get("shape", SHAPE), kw.get("spacing", (1.0, 1.0, 1.0))
    name = case_name(naming, number, timepoint)
    folder = root / name
    folder.mkdir(parents=True)
    sep, files = FILES[naming]
    for modality, suffix in files.items():
        save(
            folder / f"{name}{sep}{suffix}.nii.gz",
            modality_volume(modality, number, image_dtype, shape),
            spacing,
        )
    save(folder / f"{name}{sep}seg.nii.gz", label_volume(ET_LABEL[naming], shape).astype(seg_dtype), spacing)
    return folder


def write_brats(root: Path, naming: str = "2021", cases: int = 3, **kw) -> list[Path]:
    return [write_case(root, naming, 2 * c, **kw) for c in range(cases)]  # ids with gaps, as released


ALL = {"fractions": (1.0, 0.0, 0.0), "crop": None}


def test_replica_has_the_official_names_and_dtypes(tmp_path):
    folder = write_case(tmp_path, "2021", 0)
    assert sorted(p.name for p in folder.iterdir()) == [
        f"BraTS2021_00000_{m}.nii.gz" for m in ("flair", "seg", "t1", "t1ce", "t2")
    ]
    assert nib.load(folder / "BraTS2021_00000_t1.nii.gz").get_data_dtype() == np.int16
    assert nib.load(folder / "BraTS2021_00000_seg.nii.gz").get_data_dtype() == np.uint8
    folder = write_case(tmp_path, "2023", 0)
    assert sorted(p.name for p in folder.iterdir()) == [
        f"BraTS-GLI-00000-000-{m}.nii.gz" for m in ("seg", "t1c", "t1n", "t2f", "t2w")
    ]
    assert nib.load(folder / "BraTS-GLI-00000-000-t2f.nii.gz").get_data_dtype() == np.float32


@pytest.mark.parametrize("naming", ["2021", "2023"])
def test_targets_by_hand(tmp_path, naming):
    write_brats(tmp_path, naming, cases=1)
    wt, tc, et = box((3, 12), (3, 12)), box((5, 9), (5, 9)), box((6, 8), (6, 8))  # slice 3
    expected = {
        "wt": [wt],
        "tc": [tc],
        "et": [et],
        "regions": [wt, tc, et],
        "classes": [tc - et, wt - tc, et],  # NCR, ED, ET one-hot
    }
    for target, channels in expected.items():
        data = BraTS(tmp_path, naming=naming, target=target, intensity="none", **ALL)
        assert len(data) == 6 and data.cases[0]["naming"] == naming
        mask = data[3]["mask"]
        assert mask.dtype == torch.float32 and mask.shape == (len(channels), 16, 16)
        assert np.array_equal(mask.numpy(), np.stack(channels)), target
        if target == "classes":
            assert mask.sum(0).max() == 1  # one-hot: the classes do not overlap
    # slice 4 holds ET only, slice 1 ED only, slice 0 nothing
    data = BraTS(tmp_path, naming=naming, target="regions", intensity="none", **ALL)
    assert [data[k]["mask"].sum((1, 2)).tolist() for k in (0, 1, 4)] == [[0, 0, 0], [16, 0, 0], [4, 4, 4]]


def test_modalities_stack_in_the_configured_order_for_both_namings(tmp_path):
    write_case(tmp_path / "a", "2021", 0)
    write_case(tmp_path / "b", "2023", 0)
    for root in (tmp_path / "a", tmp_path / "b"):
        image = BraTS(root, intensity="none", **ALL)[2]["image"]
        assert image.shape == (4, 16, 16)
        # channel order t1, t1ce, t2, flair (2023: t1n, t1c, t2w, t2f)
        assert [round(float(image[c, 8, 8]), -2) for c in range(4)] == [100, 200, 300, 400]
    expected = modality_volume("flair", 0, np.float32)[:, :, 2]
    two = BraTS(tmp_path / "b", modalities=["t2f", "t1n"], channels=2, intensity="none", **ALL)[2]["image"]
    assert torch.equal(two[0], torch.from_numpy(expected)) and float(two[1, 8, 8]) < 200


def test_brain_zscore_over_the_3d_volume_matches_numpy(tmp_path):
    write_brats(tmp_path, "2023", cases=1)
    data = BraTS(tmp_path, **ALL)
    for c, modality in enumerate(("t1", "t1ce", "t2", "flair")):
        volume = modality_volume(modality, 0, np.float32).astype(np.float64)
        brain = volume[volume > 0]
        expected = np.where(volume > 0, (volume - brain.mean()) / brain.std(), 0.0)
        for k in (0, 3, 5):
            assert np.allclose(data[k]["image"][c].numpy(), expected[:, :, k], atol=1e-5)
    stacked = torch.stack([data[k]["image"] for k in range(6)], -1)  # (C, H, W, D)
    brain = stacked[:, 2:14, 2:14]
    assert torch.allclose(brain.mean((1, 2, 3)), torch.zeros(4), atol=1e-5)  # per volume, not per slice
    assert torch.allclose(brain.std((1, 2, 3), unbiased=False), torch.ones(4), atol=1e-4)
    assert stacked[:, :2].abs().max() == 0 and stacked[:, :, 14:].abs().max() == 0  # background stays 0
    assert data[0]["image"][:, 2:14, 2:14].mean().abs() > 1e-3  # a slice alone is not centred


def test_slice_range_and_empty_slice_policy_counts(tmp_path, monkeypatch):
    write_brats(tmp_path, "2021", cases=3)
    load = partial(BraTS, tmp_path, intensity="none", **ALL)
    assert len(load()) == 18  # 3 cases x 6 slices
    assert [int(load(slice_range=[1, 5])[i]["slice"]) for i in range(4)] == [1, 2, 3, 4]
    assert len(load(slice_range=[1, 5])) == 12 and len(load(slice_range=[4, 99])) == 6
    assert len(load(empty_slices="drop")) == 12  # wt: slices 1-4
    assert len(load(empty_slices="drop", target="tc")) == 9  # slices 2-4
    et = load(empty_slices="drop", target="et")
    assert len(et) == 6 and sorted({int(et[i]["slice"]) for i in range(len(et))}) == [3, 4]
    assert len(load(empty_slices="drop", target="et", slice_range=[0, 4])) == 3
    half = load(empty_slices="drop", empty_fraction=0.5)  # 1 of each case's 2 empty slices kept
    slices = [(split_case(half[i]["case"])[0], int(half[i]["slice"])) for i in range(len(half))]
    assert len(half) == 15 and sum(k in (0, 5) for _, k in slices) == 3
    assert slices == [
        (split_case(item["case"])[0], int(item["slice"]))
        for item in (load(empty_slices="drop", empty_fraction=0.5)[i] for i in range(15))
    ]  # seeded
    assert len(load(empty_slices="drop", empty_fraction=1.0)) == 18
    # the per-slice summary is memoised: another dataset over the same cases decodes no seg at init
    reads = []
    original = BraTS.read_volume
    monkeypatch.setattr(BraTS, "read_volume", staticmethod(lambda p: reads.append(p) or original(p)))
    assert len(load(empty_slices="drop", target="tc", slice_range=[0, 3])) == 3 and reads == []
    assert sum(key[0].endswith("_seg.nii.gz") for key in brats_module._PRESENCE) >= 3


def test_case_key_groups_slices_and_the_last_case_is_kept(tmp_path, monkeypatch):
    folders = write_brats(tmp_path, "2021", cases=2)
    data = BraTS(tmp_path, **ALL)
    reads = []
    original = BraTS.read_volume
    monkeypatch.setattr(BraTS, "read_volume", staticmethod(lambda p: reads.append(p) or original(p)))
    items = [data[i] for i in range(len(data))]
    assert len(reads) == 10  # 2 cases x (4 modalities + seg): one decode per case in sequential order
    assert [split_case(it["case"]) for it in items[:2]] == [(str(folders[0]), 0), (str(folders[0]), 1)]
    assert items[7]["case"] == f"{folders[1]}#001" and int(items[7]["num_slices"]) == 6


def test_crop_resize_and_spacing(tmp_path):
    write_brats(tmp_path, "2021", cases=1, spacing=(0.9, 1.2, 1.0))
    item = BraTS(tmp_path, fractions=(1.0, 0.0, 0.0), crop=12, size=None, target="wt")[3]
    assert item["image"].shape == (4, 12, 12) and item["original_size"].tolist() == [16, 16]
    assert item["crop_box"].tolist() == [2, 2, 12, 12]
    assert np.array_equal(item["mask"][0].numpy(), box((3, 12), (3, 12))[2:14, 2:14])
    assert torch.allclose(item["spacing"], torch.tensor([0.9, 1.2])) and torch.equal(
        item["spacing"], item["original_spacing"]
    )
    small = BraTS(tmp_path, fractions=(1.0, 0.0, 0.0), crop=12, size=6)[3]
    assert small["image"].shape == (4, 6, 6) and small["mask"].shape == (1, 6, 6)
    assert set(small["mask"].unique().tolist()) == {0.0, 1.0}
    assert torch.allclose(small["spacing"], torch.tensor([1.8, 2.4]))
    with pytest.raises(DiffSegError, match=r"_seg\.nii\.gz: crop \(224, 224\) exceeds the stored slice"):
        BraTS(tmp_path, fractions=(1.0, 0.0, 0.0))[0]


def test_splits_by_patient_are_disjoint_deterministic_and_k_fold(tmp_path):
    for c in range(10):
        write_case(tmp_path, "2023", c)
    write_case(tmp_path, "2023", 3, timepoint=1)  # a follow-up of patient 00003
    assert patient_id("BraTS-GLI-00003-001") == "BraTS-GLI-00003" and patient_id("BraTS2021_00003") == (
        "BraTS2021_00003"
    )

    def ids(split, **kw):
        data = BraTS(tmp_path, split, crop=None, **kw)
        assert {split_case(data[i]["case"])[0] for i in range(len(data))} == {str(d) for d in data.case_dirs}
        return data.ids

    parts = [ids(s) for s in ("train", "val", "test")]
    assert [len({patient_id(n) for n in p}) for p in parts] == [7, 1, 2]  # 0.7 / 0.1 / 0.2 of 10 patients
    assert sorted(sum(parts, [])) == sorted(p.name for p in tmp_path.iterdir())  # a partition
    followup = [p for p in parts if "BraTS-GLI-00003-001" in p][0]
    assert "BraTS-GLI-00003-000" in followup  # both timepoints in one split
    assert parts == [ids(s) for s in ("train", "val", "test")]
    assert [ids(s, seed=1) for s in ("train", "val", "test")] != parts
    tests = [ids("test", folds=5, fold=f) for f in range(5)]
    assert sorted(sum(tests, [])) == sorted(sum(parts, []))
    for f in range(5):
        train, val = ids("train", folds=5, fold=f), ids("val", folds=5, fold=f)
        assert not set(train) & set(tests[f]) and not set(val) & set(tests[f]) and not set(train) & set(val)


def test_auto_naming_root_search_and_forced_naming(tmp_path):
    release = tmp_path / "BraTS2021_Training_Data"
    write_case(release, "2021", 0)
    write_case(release, "2023", 1)
    (release / "__MACOSX").mkdir()  # not a case folder: ignored
    data = BraTS(tmp_path, **ALL)  # the parent of the release folder
    assert data.root == release and data.ids == ["BraTS-GLI-00001-000", "BraTS2021_00000"]  # sorted by name
    assert [c["naming"] for c in data.cases] == ["2023", "2021"]
    with pytest.raises(DiffSegError, match=r"BraTS-GLI-00001-000_t1\.nii\.gz: missing \(modality t1 .*2021"):
        BraTS(release, naming="2021", **ALL)
    skipped = BraTS(release, naming="2023", on_bad_case="skip", **ALL)
    assert skipped.ids == ["BraTS-GLI-00001-000"] and "BraTS2021_00000-t1n" in skipped.skipped[0][0]
    with pytest.raises(DiffSegError, match="no BraTS case folders"):
        BraTS(tmp_path / "BraTS2021_Training_Data" / "__MACOSX")
    with pytest.raises(DiffSegError, match="does not exist"):
        BraTS(tmp_path / "absent")


def test_missing_modality_is_a_bad_case(tmp_path):
    folders = write_brats(tmp_path, "2021", cases=3)
    (folders[1] / "BraTS2021_00002_t1ce.nii.gz").unlink()
    with pytest.raises(DiffSegError, match=r"BraTS2021_00002/BraTS2021_00002_t1ce\.nii\.gz: missing"):
        BraTS(tmp_path, **ALL)
    data = BraTS(tmp_path, on_bad_case="skip", **ALL)
    assert data.ids == ["BraTS2021_00000", "BraTS2021_00004"] and len(data) == 12
    assert len(data.skipped) == 1 and data.skipped[0][0].endswith("BraTS2021_00002_t1ce.nii.gz")
    only_flair = BraTS(tmp_path, modalities=["flair"], channels=1, **ALL)  # t1ce is not needed
    assert len(only_flair.cases) == 3 and only_flair[0]["image"].shape == (1, 16, 16)
    (folders[2] / "BraTS2021_00004_seg.nii.gz").unlink()
    with pytest.raises(DiffSegError, match=r"BraTS2021_00004_seg\.nii\.gz: missing \(segmentation"):
        BraTS(tmp_path, modalities=["flair"], channels=1, **ALL)


@pytest.mark.parametrize(("naming", "wrong"), [("2021", 3), ("2023", 4)])
def test_a_label_outside_the_years_set_names_the_file(tmp_path, naming, wrong):
    folder = write_case(tmp_path, naming, 0)
    seg_path = next(folder.glob("*seg.nii.gz"))
    seg = label_volume(ET_LABEL[naming])
    seg[0, 0, 5] = wrong
    save(seg_path, seg.astype(np.uint8))
    data = BraTS(tmp_path, **ALL)
    with pytest.raises(
        DiffSegError, match=rf"{seg_path.name}: unexpected label value\(s\) {wrong}; BraTS {naming}"
    ):
        data[0]
    assert wrong in data.seen_labels  # the raw value was recorded before the check


def test_corrupt_files_name_the_file(tmp_path, monkeypatch):
    folders = write_brats(tmp_path, "2021", cases=2)
    image = folders[0] / "BraTS2021_00000_t2.nii.gz"
    whole = image.read_bytes()
    image.write_bytes(whole[:200])  # a truncated download, header cut: found by the header check at init
    with pytest.raises(DiffSegError, match=r"BraTS2021_00000_t2\.nii\.gz: not a readable NIfTI"):
        BraTS(tmp_path, **ALL)
    image.write_bytes(whole[:-200])  # header intact, voxels cut: found when the case is read
    data = BraTS(tmp_path, **ALL)
    reads = []
    original = BraTS.read_volume
    monkeypatch.setattr(BraTS, "read_volume", staticmethod(lambda p: reads.append(p) or original(p)))
    for k in range(SHAPE[2]):
        with pytest.raises(DiffSegError, match=r"BraTS2021_00000_t2\.nii\.gz: cannot read the NIfTI data"):
            data[k]
    assert len(reads) == 4  # seg, t1, t1ce and t2 (which fails): once for the case, not once per slice
    seg = folders[1] / "BraTS2021_00002_seg.nii.gz"
    seg.write_bytes(gzip.compress(b"not a nifti header"))
    with pytest.raises(DiffSegError, match=r"BraTS2021_00002_seg\.nii\.gz: not a readable NIfTI"):
        BraTS(tmp_path, **ALL)
    skipped = BraTS(tmp_path, on_bad_case="skip", empty_slices="drop", **ALL)
    assert skipped.ids == ["BraTS2021_00000"] and skipped.skipped[0][0] == str(seg)


def test_nan_names_the_file(tmp_path):
    folders = write_brats(tmp_path, "2023", cases=2)
    nan = folders[1] / "BraTS-GLI-00002-000-t2w.nii.gz"
    volume = modality_volume("t2", 2, np.float32)
    volume[3, 3, 3] = np.nan
    save(nan, volume)
    data = BraTS(tmp_path, **ALL)
    with pytest.raises(DiffSegError, match=r"t2w\.nii\.gz: image holds NaN"):
        data[6]


def flipped(affine: np.ndarray) -> np.ndarray:
    """The affine of the same voxels stored with axis 0 reversed (what a tool that re-orients writes)."""
    out = affine.copy()
    out[:, 0] *= -1
    out[:3, 3] -= out[:3, 0] * (SHAPE[0] - 1)
    return out


def shifted(affine: np.ndarray, by: float) -> np.ndarray:
    out = affine.copy()
    out[1, 3] += by
    return out


def resave(path: Path, change) -> None:
    """Rewrite a NIfTI file as ``change(voxels, affine) -> (voxels, affine)``."""
    image = nib.load(path)
    nib.save(nib.Nifti1Image(*change(np.asarray(image.dataobj), image.affine)), path)


# One file of a case off the grid of its other files, and the message that names it and its reference.
T1N = r"BraTS-GLI-00000-000-t1n\.nii\.gz"
MISALIGNED = {
    "flipped": (lambda v, a: (v, flipped(a)), rf"seg\.nii\.gz: orientation RPS differs from LPS of {T1N}"),
    "2 mm": (
        lambda v, a: (v, a @ np.diag([2.0, 2.0, 2.0, 1.0])),
        rf"seg\.nii\.gz: voxel spacing \(2, 2, 2\) differs from \(1, 1, 1\) of {T1N}",
    ),
    "half a voxel": (
        lambda v, a: (v, shifted(a, 0.5)),
        rf"seg\.nii\.gz: affine differs from {T1N}'s by up to 0\.5 \(origin or axis directions; tolerance 0\.001",
    ),
    "a slice short": (
        lambda v, a: (v[..., :-1], a),
        rf"seg\.nii\.gz: shape \(16, 16, 5\) differs from \(16, 16, 6\) of {T1N}",
    ),
}


@pytest.mark.parametrize("fault", sorted(MISALIGNED))
def test_a_seg_off_the_images_voxel_grid_is_a_bad_case_naming_both_files(tmp_path, fault):
    folders = write_brats(tmp_path, "2023", cases=2)
    seg = folders[0] / "BraTS-GLI-00000-000-seg.nii.gz"
    change, message = MISALIGNED[fault]
    resave(seg, change)
    with pytest.raises(DiffSegError, match=message + r".*one voxel grid, or image and mask are misaligned"):
        BraTS(tmp_path, **ALL)
    data = BraTS(tmp_path, on_bad_case="skip", **ALL)
    assert data.ids == ["BraTS-GLI-00002-000"] and [p for p, _ in data.skipped] == [str(seg)]


def test_the_odd_file_is_named_and_the_tolerance_is_relative_to_the_voxel(tmp_path):
    folders = write_brats(tmp_path, "2021", cases=1, spacing=(0.5, 0.5, 2.0))
    t1ce = folders[0] / "BraTS2021_00000_t1ce.nii.gz"
    resave(t1ce, lambda v, a: (v, flipped(a)))
    # the seg and three modalities agree, so the flipped modality is the one named, not the seg
    with pytest.raises(
        DiffSegError, match=r"BraTS2021_00000_t1ce\.nii\.gz: orientation RPS differs from LPS"
    ):
        BraTS(tmp_path, **ALL)
    resave(t1ce, lambda v, a: (v, flipped(a)))  # back on the grid
    seg = folders[0] / "BraTS2021_00000_seg.nii.gz"
    # The tolerance is 1e-3 of the smallest voxel (0.5 mm here): 4e-4 mm; float32 headers round an origin
    # 100 mm away by 6e-6 mm, far below it. 3e-4 mm passes, 6e-4 mm does not.
    resave(seg, lambda v, a: (v, shifted(a, 3e-4)))
    assert len(BraTS(tmp_path, **ALL).ids) == 1
    resave(seg, lambda v, a: (v, shifted(a, 3e-4)))
    with pytest.raises(
        DiffSegError, match=r"seg\.nii\.gz: affine differs .* by up to 0\.0006 .*tolerance 0\.0005"
    ):
        BraTS(tmp_path, **ALL)


def test_option_errors(tmp_path):
    write_brats(tmp_path, "2021", cases=1)
    for kwargs, message in [
        ({"split": "dev"}, "split must be one of"),
        ({"naming": "2019"}, "naming must be one of"),
        ({"target": "tumour"}, "target must be one of"),
        ({"empty_slices": "some"}, "empty_slices must be one of"),
        ({"intensity": "minmax"}, "intensity must be one of"),
        ({"modalities": ["t1", "dwi"]}, "unknown BraTS modality 'dwi'"),
        ({"modalities": ["t1", "t1n"], "channels": 2}, "distinct"),
        ({"channels": 3}, "data.channels must equal the number of data.modalities"),
        ({"slice_range": [5, 2]}, "slice_range"),
        ({"empty_fraction": 1.5}, "empty_fraction"),
        ({"fractions": (0.5, 0.5, 0.5)}, "fractions"),
        ({"folds": 3, "fold": 3}, "data.fold"),
    ]:
        with pytest.raises(ValueError, match=message):
            BraTS(tmp_path, **kwargs)


def test_hydra_config_loads_a_batch(tmp_path):
    root = tmp_path / "BraTS2021_Training_Data"
    write_brats(root, "2021", cases=10)
    overrides = [
        "data=brats",
        f"data.root={root}",
        "data.num_workers=0",
        "data.crop=null",
        "data.batch_size=4",
    ]
    cfg = compose_config(
        "train", [*overrides, "data.target=regions", "data.mask_channels=3"], tmp_path / "run"
    )
    dm = instantiate(cfg.data)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 4, 16, 16) and batch["mask"].shape == (4, 3, 16, 16)
    assert batch["spacing"].shape == (4, 2) and batch["slice"].shape == (4,)
    # normalize: none: the loader's brain z-score reaches the batch untouched (background exactly 0)
    assert batch["image"][:, :, :2].abs().max() == 0
    assert [len(dm.datasets[s].cases) for s in ("train", "val")] == [7, 1]
