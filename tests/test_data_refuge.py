"""REFUGE in its official layout: a tiny replica with the release's names, formats and quirks."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config
from hydra.utils import instantiate
from PIL import Image

from diffseg_lightning.data.refuge import REFUGE, UNKNOWN_LABEL, read_table
from diffseg_lightning.io.images import read_grey, read_image
from diffseg_lightning.utils.errors import DiffSegError

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN_HW = (40, 42)  # 2056 x 2124 (H x W) in the release, scaled down
EVAL_HW = (32, 32)  # 1634 x 1634
DISC = (10, 22, 12, 26)  # rows 10..21, cols 12..25 of every mask: rim (128)
CUP = (13, 19, 15, 22)  # rows 13..18, cols 15..21: cup (0)
TRAIN = {"Glaucoma": ["g0001", "g0002"], "Non-Glaucoma": ["n0001", "n0002", "n0003", "n0004"]}
VAL_LABELS = {"V0001": 1, "V0002": 0, "V0003": 0}
TEST_LABELS = {"T0001": 1, "T0002": 0, "T0003": 0}


def disc_cup_mask(hw, shift: int = 0) -> np.ndarray:
    mask = np.full(hw, 255, np.uint8)
    r0, r1, c0, c1 = DISC
    mask[r0 + shift : r1 + shift, c0:c1] = 128
    r0, r1, c0, c1 = CUP
    mask[r0 + shift : r1 + shift, c0:c1] = 0
    return mask


def save_fundus(path: Path, hw, seed: int) -> None:
    """A smooth RGB JPEG (a gradient plus a bright disc), like a fundus photograph at tiny scale."""
    path.parent.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0 : hw[0], 0 : hw[1]]
    rgb = np.stack([100 + 80 * yy / hw[0], 60 + 40 * xx / hw[1], np.full(hw, 30.0 + seed)], -1)
    Image.fromarray(rgb.astype(np.uint8)).save(path, quality=95)


def save_mask(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path)  # 8-bit BMP with a grey colour table, as the release's


def write_xlsx(path: Path, rows: list[list]) -> None:
    """A minimal real XLSX (shared strings, numbers), as Excel writes the release's label tables."""
    strings: list[str] = []
    xml_rows = []
    for r, row in enumerate(rows, start=1):
        cells = []
        for c, value in enumerate(row):
            ref = f"{chr(ord('A') + c)}{r}"
            if isinstance(value, str):
                strings.append(value)
                cells.append(f'<c r="{ref}" t="s"><v>{len(strings) - 1}</v></c>')
            else:
                cells.append(f'<c r="{ref}"><v>{value}</v></c>')
        xml_rows.append(f'<row r="{r}">{"".join(cells)}</row>')
    main = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
    rel = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
    with zipfile.ZipFile(path, "w") as book:
        book.writestr("[Content_Types].xml", "<Types/>")
        book.writestr(
            "xl/workbook.xml",
            f'<workbook xmlns="{main}" xmlns:r="{rel}"><sheets><sheet name="Sheet1" sheetId="1" r:id="rId1"/>'
            "</sheets></workbook>",
        )
        book.writestr(
            "xl/_rels/workbook.xml.rels",
            '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
            '<Relationship Id="rId1" Type="worksheet" Target="worksheets/sheet1.xml"/></Relationships>',
        )
        book.writestr(
            "xl/worksheets/sheet1.xml",
            f'<worksheet xmlns="{main}"><sheetData>{"".join(xml_rows)}</sheetData></worksheet>',
        )
        shared = "".join(f"<si><t>{s}</t></si>" for s in strings)
        book.writestr("xl/sharedStrings.xml", f'<sst xmlns="{main}">{shared}</sst>')


def write_refuge(root: Path) -> Path:
    """The four unpacked zips: Training400 + Annotation-Training400, Validation400 (+GT), Test400 (+GT) with
    the release's wrapper folder around Test400 and G/N subfolders in the test GT."""
    for k, (cls, stems) in enumerate(TRAIN.items()):
        for i, stem in enumerate(stems):
            save_fundus(root / "Training400" / cls / f"{stem}.jpg", TRAIN_HW, 10 * k + i)
            save_mask(
                root / "Annotation-Training400" / "Disc_Cup_Masks" / cls / f"{stem}.bmp",
                disc_cup_mask(TRAIN_HW),
            )
    for i, stem in enumerate(VAL_LABELS):
        save_fundus(root / "REFUGE-Validation400" / f"{stem}.jpg", EVAL_HW, i)
        save_mask(
            root / "REFUGE-Validation400-GT" / "Disc_Cup_Masks" / f"{stem}.bmp", disc_cup_mask(EVAL_HW, i)
        )
    write_xlsx(
        root / "REFUGE-Validation400-GT" / "Fovea_locations.xlsx",
        [["ID", "ImgName", "Fovea_X", "Fovea_Y", "Glaucoma Label"]]
        + [[i + 1, f"{s}.jpg", 17.5, 16.25, g] for i, (s, g) in enumerate(VAL_LABELS.items())],
    )
    for i, (stem, glaucoma) in enumerate(TEST_LABELS.items()):
        save_fundus(root / "REFUGE-Test400" / "Test400" / f"{stem}.jpg", EVAL_HW, i)
        folder = "G" if glaucoma else "N"
        save_mask(root / "REFUGE-Test-GT" / "Disc_Cup_Masks" / folder / f"{stem}.bmp", disc_cup_mask(EVAL_HW))
    write_xlsx(
        root / "REFUGE-Test-GT" / "Glaucoma_label_and_Fovea_location.xlsx",
        [["ID", "ImgName", "Label(Glaucoma=1)", "Fovea_X", "Fovea_Y"]]
        + [[i + 1, f"{s}.jpg", g, 15.0, 16.0] for i, (s, g) in enumerate(TEST_LABELS.items())],
    )
    return root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return write_refuge(tmp_path / "REFUGE")


def test_replica_has_the_release_formats(root):
    mask = root / "Annotation-Training400" / "Disc_Cup_Masks" / "Glaucoma" / "g0001.bmp"
    with Image.open(mask) as img:
        assert img.format == "BMP" and img.mode == "L"
    with Image.open(root / "Training400" / "Glaucoma" / "g0001.jpg") as img:
        assert img.format == "JPEG" and img.size == TRAIN_HW[::-1]
    assert read_table(root / "REFUGE-Test-GT" / "Glaucoma_label_and_Fovea_location.xlsx")[1] == [
        "1", "T0001.jpg", "1", "15.0", "16.0"
    ]  # fmt: skip


def test_training_items_targets_and_labels(root):
    data = REFUGE(root, "train", size=None)
    assert [Path(image).stem for image, _, _ in data.cases] == [
        "g0001",
        "g0002",
        "n0001",
        "n0002",
        "n0003",
        "n0004",
    ]
    truth = disc_cup_mask(TRAIN_HW)
    for i in range(len(data)):
        item = data[i]
        assert item["image"].shape == (3, *TRAIN_HW) and item["image"].dtype == torch.float32
        assert torch.equal(
            item["image"], torch.from_numpy(read_image(Path(item["case"])))
        )  # 0..255, as stored
        assert torch.equal(item["mask"][0], torch.from_numpy((truth == 0).astype(np.float32)))
        assert int(item["mask"].sum()) == 6 * 7  # the cup rectangle
        assert item["label"].dtype == torch.int64 and int(item["label"]) == int(
            Path(item["case"]).stem[0] == "g"
        )
        assert item["original_size"].tolist() == list(TRAIN_HW)
        assert item["crop_box"].tolist() == [0, 0, *TRAIN_HW]
    disc = REFUGE(root, "train", size=None, target="disc")[0]["mask"]
    assert disc.shape == (1, *TRAIN_HW) and int(disc.sum()) == 12 * 14  # rim + cup
    both = REFUGE(root, "train", size=None, target="both")[0]["mask"]
    assert both.shape == (2, *TRAIN_HW) and torch.equal(both[0], disc[0]) and int(both[1].sum()) == 42
    assert data.seen_labels == {0, 128, 255}
    with pytest.raises(ValueError, match=r"target must be one of \('cup', 'disc', 'both'\)"):
        REFUGE(root, "train", target="rim")


def test_official_splits_and_their_labels(root):
    splits = {s: REFUGE(root, s, size=16) for s in ("train", "val", "test")}
    assert {s: len(d) for s, d in splits.items()} == {"train": 6, "val": 3, "test": 3}
    val = splits["val"]
    assert [Path(c).name for c, _, _ in val.cases] == ["V0001.jpg", "V0002.jpg", "V0003.jpg"]
    assert [label for _, _, label in val.cases] == list(VAL_LABELS.values())  # from Fovea_locations.xlsx
    # the validation masks differ per image (shifted down by i rows): each pairs with its own
    assert [int(val[i]["mask"].shape[-1]) for i in range(3)] == [16, 16, 16]
    raw_masks = [read_grey(m) for _, m, _ in val.cases]
    assert [int(np.argmax((m == 0).any(1))) for m in raw_masks] == [13, 14, 15]
    test = splits["test"]
    assert [label for _, _, label in test.cases] == list(TEST_LABELS.values())
    assert "Test400" in str(test.cases[0][0])  # found inside the REFUGE-Test400 wrapper folder
    batch = [test[i] for i in range(3)]
    assert all(b["image"].shape == (3, 16, 16) and b["mask"].shape == (1, 16, 16) for b in batch)


def test_labels_from_folders_csv_or_unknown(root):
    (root / "REFUGE-Test-GT" / "Glaucoma_label_and_Fovea_location.xlsx").unlink()
    assert [lab for _, _, lab in REFUGE(root, "test").cases] == [1, 0, 0]  # the G/ and N/ folders alone
    (root / "REFUGE-Validation400-GT" / "Fovea_locations.xlsx").unlink()
    assert [lab for _, _, lab in REFUGE(root, "val").cases] == [UNKNOWN_LABEL] * 3
    (root / "REFUGE-Validation400-GT" / "labels.csv").write_text("ImgName,Glaucoma Label\nV0002.jpg,1\n")
    assert [lab for _, _, lab in REFUGE(root, "val").cases] == [UNKNOWN_LABEL, 1, UNKNOWN_LABEL]
    (root / "REFUGE-Test-GT" / "labels.csv").write_text("ImgName,Label(Glaucoma=1)\nT0002.jpg,1\n")
    with pytest.raises(
        DiffSegError, match=r"labels\.csv: glaucoma label 1 of T0002 disagrees with its mask folder"
    ):
        REFUGE(root, "test")
    (root / "REFUGE-Test-GT" / "labels.csv").write_text("ImgName,Label(Glaucoma=1)\nT0002.jpg,yes\n")
    with pytest.raises(DiffSegError, match=r"labels\.csv, row 2: glaucoma label 'yes' is not 0 or 1"):
        REFUGE(root, "test")


def test_kfold_over_training400_partitions_it(root):
    names = lambda d: {Path(image).stem for image, _, _ in d.cases}  # noqa: E731
    vals = [names(REFUGE(root, "val", folds=3, fold=k)) for k in range(3)]
    assert [len(v) for v in vals] == [2, 2, 2]
    assert set().union(*vals) == {s for stems in TRAIN.values() for s in stems}
    for k in range(3):
        train = names(REFUGE(root, "train", folds=3, fold=k))
        assert train.isdisjoint(vals[k]) and len(train) == 4
    assert names(REFUGE(root, "val", folds=3, fold=1)) == vals[1]  # deterministic
    assert len({frozenset(names(REFUGE(root, "val", folds=3, fold=0, seed=s))) for s in range(4)}) > 1
    assert len(REFUGE(root, "test", folds=3)) == 3  # the test set stays the official one


def test_palette_bmp_masks_give_grey_values_not_indices(root):
    path = root / "Annotation-Training400" / "Disc_Cup_Masks" / "Glaucoma" / "g0001.bmp"
    indices = {0: 0, 128: 1, 255: 2}
    palette_img = Image.fromarray(
        np.vectorize(indices.get)(disc_cup_mask(TRAIN_HW)).astype(np.uint8), mode="P"
    )
    palette_img.putpalette([0, 0, 0, 128, 128, 128, 255, 255, 255])
    palette_img.save(path)
    with Image.open(path) as img:
        assert img.mode == "P" and set(np.unique(np.asarray(img)).tolist()) == {0, 1, 2}  # the quirk
    assert np.array_equal(read_grey(path), disc_cup_mask(TRAIN_HW))
    assert int(REFUGE(root, "train", size=None)[0]["mask"].sum()) == 42


def test_large_jpegs_are_decoded_at_reduced_scale(root, monkeypatch):
    from PIL import JpegImagePlugin

    big = (160, 168)
    for stem in TRAIN["Glaucoma"]:
        save_fundus(root / "Training400" / "Glaucoma" / f"{stem}.jpg", big, 0)
        mask = np.full(big, 255, np.uint8)
        mask[40:88, 48:104] = 128
        mask[52:76, 60:88] = 0
        save_mask(root / "Annotation-Training400" / "Disc_Cup_Masks" / "Glaucoma" / f"{stem}.bmp", mask)
    calls = []
    original = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(
        JpegImagePlugin.JpegImageFile, "draft", lambda self, *a: calls.append(a) or original(self, *a)
    )
    item = REFUGE(root, "train", size=(20, 21))[0]
    assert calls and item["image"].shape == (3, 20, 21)  # decoded at 1/8 scale: 20 x 21
    assert item["original_size"].tolist() == list(big)  # still the stored size
    full = torch.nn.functional.interpolate(
        torch.from_numpy(read_image(Path(item["case"])))[None], size=(20, 21), mode="area"
    )[0]
    assert (item["image"] - full).abs().mean() < 3.0  # the DCT scaling averages like an area resize
    assert int(item["mask"].sum()) == 3 * 3  # nearest samples rows / cols 8i: 56, 64, 72 and 64, 72, 80
    # disc-centred crop: side 2 x 56 = 112, centred on the disc (64, 76), snapped to the 1/4 decoder grid
    crop = REFUGE(root, "train", size=(16, 16), disc_crop=2.0)[0]
    top, left, bottom, right = crop["crop_box"].tolist()
    assert (top, left, bottom, right) == (8, 20, 120, 132) and crop["original_size"].tolist() == [112, 112]
    assert all(v % 4 == 0 for v in (top, left))
    cup_rows = torch.nonzero(crop["mask"][0].any(1)).flatten().tolist()
    assert cup_rows == [7, 8, 9]  # nearest samples crop rows 7i; the cup holds crop rows 44..67


def test_disc_crop_at_native_size_is_exact(root):
    item = REFUGE(root, "train", size=None, disc_crop=2.0)[0]
    # disc bbox rows 10..21, cols 12..25: extent 14, side 28, centre (16, 19) -> rows 2..29, cols 5..32
    assert item["crop_box"].tolist() == [2, 5, 30, 33] and item["original_size"].tolist() == [28, 28]
    stored = torch.from_numpy(read_image(Path(item["case"])))
    assert torch.equal(item["image"], stored[:, 2:30, 5:33])
    assert torch.equal(item["mask"][0], torch.from_numpy(disc_cup_mask(TRAIN_HW)[2:30, 5:33] == 0).float())
    with pytest.raises(ValueError, match="disc_crop must be None or a factor > 1"):
        REFUGE(root, "train", disc_crop=0.5)
    path = root / "Annotation-Training400" / "Disc_Cup_Masks" / "Glaucoma" / "g0001.bmp"
    save_mask(path, np.full(TRAIN_HW, 255, np.uint8))
    with pytest.raises(DiffSegError, match=r"g0001\.bmp: no optic disc"):
        REFUGE(root, "train", size=None, disc_crop=2.0)[0]


def test_bad_cases_and_bad_files_name_the_file(root, tmp_path):
    with pytest.raises(DiffSegError, match="does not exist"):
        REFUGE(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffSegError, match=r"no Training400/ folder with Glaucoma/ and Non-Glaucoma/"):
        REFUGE(tmp_path / "empty", "train")
    with pytest.raises(DiffSegError, match=r"no REFUGE-Validation400 or Validation400/ folder"):
        REFUGE(tmp_path / "empty", "val")
    masks = root / "Annotation-Training400" / "Disc_Cup_Masks"
    (masks / "Non-Glaucoma" / "n0002.bmp").unlink()
    with pytest.raises(DiffSegError, match=r"n0002\.jpg: no mask; expected .*Non-Glaucoma/n0002\.bmp"):
        REFUGE(root, "train")
    skipping = REFUGE(root, "train", on_bad_case="skip")
    assert len(skipping) == 5 and [Path(p).name for p, _ in skipping.skipped] == ["n0002.jpg"]

    bad = disc_cup_mask(TRAIN_HW)
    bad[0, 0] = 64  # a value the release never uses
    save_mask(masks / "Glaucoma" / "g0001.bmp", bad)
    save_mask(masks / "Glaucoma" / "g0002.bmp", disc_cup_mask((20, 20)))
    (masks / "Non-Glaucoma" / "n0001.bmp").write_bytes(b"BM not a bitmap")
    data = REFUGE(root, "train", on_bad_case="skip")
    with pytest.raises(
        DiffSegError, match=r"g0001\.bmp: unexpected label value\(s\) 64; expected the REFUGE"
    ):
        data[0]
    with pytest.raises(DiffSegError, match=r"g0002\.bmp: mask size \(20, 20\) .*differs .* g0002\.jpg"):
        data[1]
    with pytest.raises(DiffSegError, match=r"n0001\.bmp: not a readable image"):
        data[2]
    (root / "Training400" / "Non-Glaucoma" / "n0003.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DiffSegError, match=r"n0003\.jpg: not a readable image"):
        data[3]
    with pytest.raises(DiffSegError, match=r"n0004\.jpg: image has 3 channel\(s\) but the config expects 1"):
        REFUGE(root, "train", channels=1, on_bad_case="skip")[4]


def test_two_images_of_one_stem_are_a_bad_case_naming_both(root):
    folder = root / "REFUGE-Validation400"
    first = sorted(folder.glob("*.jpg"))[0]
    (folder / f"{first.stem}.jpeg").write_bytes(first.read_bytes())  # one case stored twice
    with pytest.raises(
        DiffSegError, match=rf"{first.stem}\.jpeg: {first.name} has the same stem: both would"
    ):
        REFUGE(root, "val")
    kept = REFUGE(root, "val", on_bad_case="skip")
    assert sorted(Path(p).name for p, _ in kept.skipped) == sorted([first.name, f"{first.stem}.jpeg"])
    assert all(image.stem != first.stem for image, _, _ in kept.cases)


def test_a_batch_through_the_hydra_config(root, tmp_path):
    cfg = compose_config(
        "train", ["data=refuge", f"data.root={root}", "data.num_workers=0"], tmp_path / "run"
    )
    dm = instantiate(cfg.data)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (6, 3, 128, 128) and batch["mask"].shape == (6, 1, 128, 128)
    assert sorted(batch["label"].tolist()) == [0, 0, 0, 0, 1, 1]
    assert set(batch["mask"].unique().tolist()) == {0.0, 1.0}
    assert torch.allclose(batch["image"].mean((-2, -1)), torch.zeros(6, 3), atol=1e-3)  # z-scored
    assert len(dm.datasets["val"]) == 3
