"""CHAOS MR in its official layout: a tiny replica with real DICOM slices and grey-value PNG labels."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from conftest import compose_config
from hydra.utils import instantiate
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from diffseg_lightning.data.chaos import CHAOS
from diffseg_lightning.utils.errors import DiffSegError

pytestmark = pytest.mark.usefixtures("one_thread")

PATIENTS = (1, 2, 3, 5, 8, 10)  # numeric ids with gaps, as the release's 1, 2, 3, 5, 8, 10, 13, ...
SLICES = 3
HW = (20, 24)
PIXEL_SPACING = (1.5, 1.25)  # (row, column) mm
SLOPE, INTERCEPT = 2.0, -10.0  # patient 2's rescale; the others store values as they are


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    instance: int,
    slope: float = 1.0,
    intercept: float = 0.0,
    spacing=PIXEL_SPACING,
) -> None:
    """One MR slice as the release stores it: uint16 pixels, InstanceNumber, PixelSpacing, rescale tags."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.InstanceNumber = instance
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if spacing is not None:
        ds.PixelSpacing = [str(v) for v in spacing]
    ds.RescaleSlope, ds.RescaleIntercept = str(slope), str(intercept)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        ds.save_as(path, enforce_file_format=True)  # pydicom >= 3
    except TypeError:
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)


def ground_truth(k: int) -> np.ndarray:
    """Slice k's PNG: liver (63), right kidney (126), left kidney (189), spleen (252), with in-range values
    other than the nominal ones (60, 130, 250) at some pixels, as the ranges of the data description allow."""
    label = np.zeros(HW, np.uint8)
    label[2:8, 3 : 9 + k] = 63  # liver: 6 x (6 + k)
    label[2, 3] = 60
    label[10:13, 2:5] = 126  # right kidney: 3 x 3
    label[10, 2] = 130
    label[10:13, 15:19] = 189  # left kidney: 3 x 4
    label[15:17, 15:20] = 252  # spleen: 2 x 5
    label[16, 19] = 250
    return label


def volume(patient: int) -> np.ndarray:
    """(SLICES, H, W) stored uint16 values; slice 1 of every patient has one bright outlier pixel."""
    rng = np.random.default_rng(patient)
    vol = rng.integers(100, 1100, (SLICES, *HW)).astype(np.uint16)
    vol[1, 0, 0] = 4000
    return vol


def write_chaos(root: Path, patients=PATIENTS) -> Path:
    """``root/CHAOS_Train_Sets/Train_Sets/MR/<id>/T2SPIR/{DICOM_anon,Ground}`` (+ T1DUAL for patient 1)."""
    mr = root / "CHAOS_Train_Sets" / "Train_Sets" / "MR"
    for p in patients:
        slope, intercept = (SLOPE, INTERCEPT) if p == 2 else (1.0, 0.0)
        vol = volume(p)
        for k in range(SLICES):
            name = f"IMG-0004-{k + 1:05d}"
            # InstanceNumber runs opposite to the names: the release's rule is name order
            write_dicom(
                mr / str(p) / "T2SPIR" / "DICOM_anon" / f"{name}.dcm", vol[k], SLICES - k, slope, intercept
            )
            png = mr / str(p) / "T2SPIR" / "Ground" / f"{name}.png"
            png.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(ground_truth(k)).save(png)
    # T1DUAL of patient 1: in-phase IMG-0002-00002, 00004, ...; out-phase 00001, 00003, ...; one Ground
    for k in range(SLICES):
        base = mr / "1" / "T1DUAL"
        write_dicom(
            base / "DICOM_anon" / "InPhase" / f"IMG-0002-{2 * k + 2:05d}.dcm", np.full(HW, 10 + k), k + 1
        )
        write_dicom(
            base / "DICOM_anon" / "OutPhase" / f"IMG-0002-{2 * k + 1:05d}.dcm", np.full(HW, 20 + k), k + 1
        )
        (base / "Ground").mkdir(parents=True, exist_ok=True)
        Image.fromarray(ground_truth(k)).save(base / "Ground" / f"IMG-0002-{2 * k + 2:05d}.png")
    return root / "CHAOS_Train_Sets"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return write_chaos(tmp_path)


def everything(root: Path, **kwargs) -> CHAOS:
    return CHAOS(root, "train", fractions=(1.0, 0.0, 0.0), **kwargs)


def test_replica_is_real_dicom(root):
    path = root / "Train_Sets" / "MR" / "2" / "T2SPIR" / "DICOM_anon" / "IMG-0004-00001.dcm"
    ds = pydicom.dcmread(path)
    assert ds.pixel_array.dtype == np.uint16 and int(ds.InstanceNumber) == SLICES
    assert [float(v) for v in ds.PixelSpacing] == list(PIXEL_SPACING) and float(ds.RescaleSlope) == SLOPE
    with Image.open(path.parents[1] / "Ground" / "IMG-0004-00001.png") as img:
        assert img.mode == "L"


def test_slices_in_name_order_with_rescale_spacing_and_targets(root):
    data = everything(root, size=None, clip_percentiles=None)
    assert data.patient_ids == ["1", "2", "3", "5", "8", "10"]  # numeric order
    assert len(data) == 6 * SLICES
    item = data[SLICES]  # patient 2, first file by name (its InstanceNumber is 3)
    assert item["case"].endswith("MR/2/T2SPIR/DICOM_anon/IMG-0004-00001.dcm") and int(item["slice"]) == 0
    expected = volume(2)[0].astype(np.float32) * SLOPE + INTERCEPT
    assert item["image"].shape == (1, *HW) and torch.equal(item["image"][0], torch.from_numpy(expected))
    assert item["original_spacing"].tolist() == list(PIXEL_SPACING) and item["spacing"].tolist() == list(
        PIXEL_SPACING
    )
    assert item["original_size"].tolist() == list(HW)
    liver = [int(data[SLICES + k]["mask"].sum()) for k in range(SLICES)]
    assert liver == [6 * 6, 6 * 7, 6 * 8]  # 63 and the in-range 60 alike
    by_target = {t: everything(root, size=None, target=t)[0]["mask"] for t in ("kidneys", "spleen", "all")}
    assert by_target["kidneys"].shape == (1, *HW) and int(by_target["kidneys"].sum()) == 9 + 12
    assert int(by_target["spleen"].sum()) == 10
    assert by_target["all"].shape == (4, *HW)
    assert by_target["all"].sum((1, 2)).tolist() == [
        36,
        9,
        12,
        10,
    ]  # liver, right kidney, left kidney, spleen
    assert data.seen_labels == {0, 60, 63, 126, 130, 189, 250, 252}  # the stored values, before mapping
    with pytest.raises(ValueError, match=r"target must be one of \('liver', .*'all'\)"):
        everything(root, target="kidney")


def test_resize_scales_the_spacing(root):
    item = everything(root, size=(10, 12))[0]
    assert item["image"].shape == (1, 10, 12) and item["mask"].shape == (1, 10, 12)
    assert item["spacing"].tolist() == [3.0, 2.5] and item["original_spacing"].tolist() == list(PIXEL_SPACING)


def test_per_volume_percentile_clip(root):
    data = everything(root, size=None)
    vol = volume(1).astype(np.float64)
    low, high = np.percentile(vol, [0.5, 99.5])
    assert high < 4000  # the outlier pixel lies above the volume's 99.5th percentile
    item = data[1]  # patient 1, slice 1: holds the outlier
    assert float(item["image"][0, 0, 0]) == pytest.approx(high, rel=1e-6)
    assert float(item["image"].min()) >= low - 1e-3 and float(data[0]["image"].max()) <= high + 1e-3
    raw = everything(root, size=None, clip_percentiles=None)[1]
    assert float(raw["image"][0, 0, 0]) == 4000.0
    with pytest.raises(ValueError, match="clip_percentiles must be"):
        everything(root, clip_percentiles=(99, 1))


def test_t1dual_pairs_both_phases_with_the_one_ground_folder(root):
    for sequence, base in (("T1DUAL_InPhase", 10), ("T1DUAL_OutPhase", 20)):
        data = CHAOS(
            root, "train", size=None, sequence=sequence, fractions=(1.0, 0.0, 0.0), on_bad_case="skip"
        )
        assert data.patient_ids == ["1"] and len(data.skipped) == 5  # the others have no T1DUAL
        for k in range(SLICES):
            item = data[k]
            assert float(item["image"].mean()) == base + k
            assert int(item["mask"].sum()) == 6 * (6 + k)
    with pytest.raises(ValueError, match="sequence must be one of"):
        everything(root, sequence="T1")


def test_splits_by_patient_seeded_and_kfold(root):
    splits = {s: CHAOS(root, s) for s in ("train", "val", "test")}
    ids = {s: d.patient_ids for s, d in splits.items()}
    assert [len(ids[s]) for s in ("train", "val", "test")] == [4, 1, 1]
    assert sorted(sum(ids.values(), []), key=int) == ["1", "2", "3", "5", "8", "10"]
    for s, d in splits.items():  # every slice of a patient stays with the patient
        assert len(d) == SLICES * len(ids[s])
        assert {Path(d[i]["case"]).parents[2].name for i in range(len(d))} == set(ids[s])
    assert CHAOS(root, "train").patient_ids == ids["train"]  # deterministic
    assert len({tuple(CHAOS(root, "test", seed=s).patient_ids) for s in range(5)}) > 1
    tests = [CHAOS(root, "test", folds=3, fold=k).patient_ids for k in range(3)]
    assert sorted(sum(tests, []), key=int) == ["1", "2", "3", "5", "8", "10"] and all(
        len(t) == 2 for t in tests
    )
    for k in range(3):
        train, val = (
            CHAOS(root, "train", folds=3, fold=k).patient_ids,
            CHAOS(root, "val", folds=3, fold=k).patient_ids,
        )
        assert (
            set(train).isdisjoint(tests[k]) and set(val).isdisjoint(tests[k]) and len(train) + len(val) == 4
        )


def test_root_may_be_train_sets_or_mr(root):
    for where in (root, root / "Train_Sets", root / "Train_Sets" / "MR"):
        assert everything(where).patient_ids == ["1", "2", "3", "5", "8", "10"]


def test_bad_cases_and_files_name_them(root, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffSegError, match=r"expected .*Train_Sets/MR/<id>/T2SPIR"):
        CHAOS(tmp_path / "empty")
    mr = root / "Train_Sets" / "MR"
    (mr / "3" / "T2SPIR" / "Ground" / "IMG-0004-00002.png").unlink()
    with pytest.raises(
        DiffSegError, match=r"MR/3/T2SPIR/Ground: 2 ground-truth PNG\(s\) for 3 DICOM slice\(s\)"
    ):
        everything(root)
    skipping = everything(root, on_bad_case="skip")
    assert "3" not in skipping.patient_ids and len(skipping) == 5 * SLICES
    assert [Path(p).parts[-3:] for p, _ in skipping.skipped] == [("3", "T2SPIR", "Ground")]

    ground = mr / "5" / "T2SPIR" / "Ground"
    bad = ground_truth(0)
    bad[0, 0] = 90  # between the liver and right-kidney ranges
    Image.fromarray(bad).save(ground / "IMG-0004-00001.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(ground / "IMG-0004-00002.png")
    dicoms = mr / "8" / "T2SPIR" / "DICOM_anon"
    (dicoms / "IMG-0004-00001.dcm").write_bytes(b"DICM but not really")
    write_dicom(dicoms / "IMG-0004-00002.dcm", volume(8)[1], 2, spacing=None)
    data = everything(root, on_bad_case="skip", clip_percentiles=None)
    first = {pid: SLICES * n for n, pid in enumerate(data.patient_ids)}
    with pytest.raises(
        DiffSegError, match=r"5/T2SPIR/Ground/IMG-0004-00001\.png: unexpected label value\(s\) 90"
    ):
        data[first["5"]]
    with pytest.raises(
        DiffSegError, match=r"IMG-0004-00002\.png: mask size \(8, 8\) .*differs .*IMG-0004-00002\.dcm"
    ):
        data[first["5"] + 1]
    with pytest.raises(
        DiffSegError, match=r"8/T2SPIR/DICOM_anon/IMG-0004-00001\.dcm: not a readable DICOM slice"
    ):
        data[first["8"]]
    with pytest.raises(DiffSegError, match=r"IMG-0004-00002\.dcm: no valid PixelSpacing"):
        data[first["8"] + 1]
    # the per-volume clip reads the whole volume: a corrupt slice fails every slice of it, naming the file
    with pytest.raises(DiffSegError, match=r"8/T2SPIR/DICOM_anon/IMG-0004-00001\.dcm"):
        everything(root, on_bad_case="skip")[first["8"] + 2]
    shutil.rmtree(mr / "10" / "T2SPIR" / "Ground")
    skipped = everything(root, on_bad_case="skip").skipped
    assert [Path(p).parts[-3:] for p, _ in skipped] == [("3", "T2SPIR", "Ground"), ("10", "T2SPIR", "Ground")]
    assert skipped[1][1].startswith("missing (patient 10 has no T2SPIR Ground folder)")


def test_a_batch_through_the_hydra_config(root, tmp_path):
    cfg = compose_config("train", ["data=chaos", f"data.root={root}", "data.num_workers=0"], tmp_path / "run")
    dm = instantiate(cfg.data)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (12, 1, 128, 128) and batch["mask"].shape == (12, 1, 128, 128)
    assert batch["spacing"].shape == (12, 2) and torch.allclose(
        batch["spacing"][0], torch.tensor([1.5 * 20 / 128, 1.25 * 24 / 128])
    )
    assert set(batch["mask"].unique().tolist()) == {0.0, 1.0}
    assert torch.allclose(batch["image"].mean((-2, -1)), torch.zeros(12, 1), atol=1e-3)
