"""diffseg-check-data lists every problem of every file once: folders with several distinct faults at once."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import compose_config
from PIL import Image
from test_data_brats import flipped, resave, write_brats

from diffseg_lightning.check_data import check_data
from diffseg_lightning.data import PairedFolder, SegmentationDataModule
from diffseg_lightning.data.brats import BraTS
from diffseg_lightning.utils import DiffSegError

pytestmark = pytest.mark.usefixtures("one_thread")


def run_check(overrides: list[str], out: Path, capsys) -> tuple[int, dict, str]:
    """``check_data`` in this process: exit code, ``data_report.json`` and what it printed."""
    code = check_data(compose_config("check_data", overrides, out))
    return code, json.loads((out / "data_report.json").read_text()), capsys.readouterr().out


def problems_of(report: dict) -> list[tuple[str, str]]:
    return [(p["where"], p["reason"]) for split in report.values() for p in split["problems"]]


def write_faulty_folder(root: Path) -> dict[str, str]:
    """12 image / mask pairs, four of them broken in four different ways; returns {file: its fault}."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(root / "images" / f"c{i}.png")
        mask = np.zeros((12, 16), np.uint8)
        mask[2:6, 3:9] = 255
        Image.fromarray(mask).save(root / "masks" / f"c{i}.png")
    (root / "masks" / "c0.png").unlink()
    whole = (root / "images" / "c1.png").read_bytes()
    (root / "images" / "c1.png").write_bytes(whole[: len(whole) // 2])
    Image.fromarray(np.zeros((6, 6), np.uint8)).save(root / "masks" / "c2.png")
    (root / "masks" / "c3.png").write_bytes(b"not a png")
    return {
        str(root / "images" / "c0.png"): "no mask",
        str(root / "images" / "c1.png"): "not a readable image",
        str(root / "masks" / "c2.png"): "mask size (6, 6) (H, W) differs",
        str(root / "masks" / "c3.png"): "not a readable image",
    }


def test_every_fault_of_a_folder_is_listed_exactly_once(tmp_path, capsys):
    faults = write_faulty_folder(tmp_path / "data")
    code, report, out = run_check(["data=folder", f"data.root={tmp_path / 'data'}"], tmp_path / "out", capsys)
    assert code == 1
    found = problems_of(report)
    assert sorted(where for where, _ in found) == sorted(faults)  # each file once, no other problem
    for where, reason in found:
        assert reason.startswith(faults[where]), (where, reason)
    assert sum(r["items"] for r in report.values()) == 8  # the other eight pairs are read
    assert "4 problem(s)" in out
    for where in faults:
        assert sum(where in line for line in out.splitlines() if line.startswith("problem")) == 1


def test_a_bad_first_item_is_not_counted_again_by_the_channel_check(tmp_path, capsys):
    root = tmp_path / "data"
    write_faulty_folder(root)
    first = PairedFolder(root, "train", fractions=(1.0, 0.0, 0.0), on_bad_case="skip").pairs[0][0]
    first.write_bytes(b"broken")  # item 0 of the split: read by the check pass and by the channel check
    overrides = ["data=folder", f"data.root={root}", "data.fractions=[1,0,0]"]
    code, report, out = run_check(overrides, tmp_path / "out", capsys)
    assert code == 1 and [w for w, _ in problems_of(report)].count(str(first)) == 1


def test_a_folder_level_problem_of_every_split_is_one_line(tmp_path, capsys):
    write_faulty_folder(tmp_path / "data")
    for mask in (tmp_path / "data" / "masks").iterdir():
        mask.unlink()
    (tmp_path / "data" / "masks").rmdir()
    code, report, out = run_check(["data=folder", f"data.root={tmp_path / 'data'}"], tmp_path / "out", capsys)
    assert code == 1 and [len(r["problems"]) for r in report.values()] == [1, 1, 1]
    lines = [line for line in out.splitlines() if line.startswith("problem")]
    assert len(lines) == 1 and lines[0].startswith("problem train, val, test: ")
    assert "masks does not exist or is not a folder" in lines[0] and "1 problem(s)" in out


def write_faulty_brats(root: Path) -> tuple[dict[str, str], Path]:
    """Seven 2021 cases, four broken in four different ways; returns ({file: its fault}, the truncated file)."""
    folders = write_brats(root, "2021", cases=7)
    (folders[0] / "BraTS2021_00000_t1ce.nii.gz").unlink()  # found while scanning
    truncated = folders[1] / "BraTS2021_00002_flair.nii.gz"  # header intact, voxels cut: found when read
    truncated.write_bytes(truncated.read_bytes()[:-300])
    seg = folders[2] / "BraTS2021_00004_seg.nii.gz"  # stored flipped: off the images' grid, found at scan
    resave(seg, lambda v, a: (v, flipped(a)))
    labels = folders[3] / "BraTS2021_00006_seg.nii.gz"  # a label outside the 2021 set, in one slice
    image = nib.load(labels)
    values = np.asarray(image.dataobj).copy()
    values[0, 0, 5] = 3
    nib.save(nib.Nifti1Image(values, image.affine), labels)
    faults = {
        str(folders[0] / "BraTS2021_00000_t1ce.nii.gz"): "missing (modality t1ce",
        str(truncated): "cannot read the NIfTI data",
        str(seg): "orientation RPS differs from LPS of BraTS2021_00004_t1.nii.gz",
        str(labels): "unexpected label value(s) 3",
    }
    return faults, truncated


def test_every_fault_of_brats_is_listed_exactly_once(tmp_path, capsys):
    faults, truncated = write_faulty_brats(tmp_path / "brats")
    overrides = ["data=brats", f"data.root={tmp_path / 'brats'}", "data.crop=null", "data.fractions=[1,0,0]"]
    code, report, out = run_check(overrides, tmp_path / "out", capsys)
    assert code == 1
    found = problems_of(report)
    assert sorted(where for where, _ in found) == sorted(faults)
    for where, reason in found:
        assert reason.startswith(faults[where]), (where, reason)
    # every slice of a volume fails with its file's message: one problem, naming the six slices' items
    (read_error,) = [p for p in report["train"]["problems"] if p["where"] == str(truncated)]
    assert len(read_error["items"]) == 6
    assert report["train"]["items"] == 3 * 6 and "4 problem(s)" in out


def test_the_datamodule_counts_a_bad_volume_once_not_once_per_slice(tmp_path):
    faults, truncated = write_faulty_brats(tmp_path / "brats")
    factory = partial(BraTS, tmp_path / "brats", "train", fractions=(1.0, 0.0, 0.0), crop=None)
    skip = partial(factory, on_bad_case="skip")
    dm = SegmentationDataModule(train=skip, channels=4, normalize="none", on_bad_case="skip")
    with pytest.warns(UserWarning, match=r"left out 4 bad case\(s\) of the train split"):
        dm.setup("fit")
    assert len(dm.datasets["train"]) == 18
    only = tmp_path / "one"  # under error: the read-time fault alone (a scan-time one raises at once)
    write_brats(only, "2021", cases=2)
    flair = only / "BraTS2021_00000" / "BraTS2021_00000_flair.nii.gz"
    flair.write_bytes(truncated.read_bytes())
    factory = partial(BraTS, only, "train", fractions=(1.0, 0.0, 0.0), crop=None)
    dm = SegmentationDataModule(train=factory, channels=4, normalize="none")
    message = rf"^1 bad case\(s\) in the train split of BraTS: {flair}: cannot read .* \(6 items: 0-5\)\. Fix"
    with pytest.raises(DiffSegError, match=message):
        dm.setup("fit")


def test_spans_of_item_numbers():
    from diffseg_lightning.data.check import spans

    assert spans([9, 0, 1, 2, 3, 4, 5, 11, 12]) == "0-5, 9, 11-12"
    assert spans([7]) == "7"


def test_a_bad_image_does_not_hide_its_bad_mask(tmp_path, capsys):
    root = tmp_path / "data"
    write_faulty_folder(root)
    whole = (root / "images" / "c5.png").read_bytes()
    (root / "images" / "c5.png").write_bytes(whole[: len(whole) // 2])  # truncated image ...
    Image.fromarray(np.full((12, 16), 7, np.uint8)).save(
        root / "masks" / "c5.png"
    )  # ... and mask off the rule
    code, report, _ = run_check(["data=folder", f"data.root={root}"], tmp_path / "out", capsys)
    found = dict(problems_of(report))
    assert code == 1 and len(found) == 6  # the four faults of write_faulty_folder and both files of c5
    assert found[str(root / "images" / "c5.png")].startswith("not a readable image")
    assert found[str(root / "masks" / "c5.png")].startswith("mask values 7 are not a binary mask")


def test_read_all_raises_every_user_error_of_a_case():
    from diffseg_lightning.exceptions import CaseProblems, read_all

    def fail(message):
        def read():
            raise DiffSegError(message)

        return read

    assert read_all(lambda: 1, lambda: 2) == (1, 2)
    with pytest.raises(DiffSegError) as one:
        read_all(lambda: 1, fail("a.png: broken"))
    assert not isinstance(one.value, CaseProblems) and str(one.value) == "a.png: broken"
    with pytest.raises(CaseProblems) as both:
        read_all(fail("a.png: broken"), fail("b.png: values 7"))
    assert both.value.messages == ["a.png: broken", "b.png: values 7"]
    with pytest.raises(ZeroDivisionError):  # not a user error: propagates with its traceback
        read_all(lambda: 1 / 0, fail("b.png: values 7"))
