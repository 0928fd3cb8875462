"""PH2 in its official layout: a tiny replica with the release's names, table format and quirks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config
from hydra.utils import instantiate
from PIL import Image

from diffseg_lightning.data.ph2 import PH2, read_ph2_table, table_cells
from diffseg_lightning.data.splits import kfold, split_by_fractions
from diffseg_lightning.data.transforms import resize
from diffseg_lightning.utils.errors import DiffSegError

pytestmark = pytest.mark.usefixtures("one_thread")

# name -> (clinical diagnosis code, histological diagnosis); numbers not contiguous, as in the release
CASES = {
    "IMD002": (1, ""),
    "IMD003": (0, ""),
    "IMD009": (0, ""),
    "IMD016": (0, "Dermal Nevus"),
    "IMD058": (1, ""),
    "IMD101": (1, "Dysplastic Nevus"),
    "IMD155": (2, "Melanoma"),
    "IMD168": (0, ""),
    "IMD405": (2, "Melanoma"),
    "IMD437": (2, "Melanoma"),
}
RGB_MASK = "IMD058"  # stored as 24-bit RGB with equal channels, as at least one mask of the release
ONE_BIT_MASK = "IMD101"  # stored as a 1-bit BMP (grey values 0 / 255)
SHAPE = (28, 36)  # (H, W); the release's are about 560 x 768
HEADER = (
    "||   Name || Histological Diagnosis || Clinical Diagnosis || Asymmetry | Pigment Network | "
    "Dots/Globules | Streaks | Regression Areas | Blue-Whitish Veil ||           Colors ||"
)


def table_row(name: str, code: int, histology: str) -> str:
    """A row as the release writes it: fixed-width cells, '||' between groups, '|' inside the criteria."""
    return (
        f"|| {name} || {histology:>22} || {code:>18} || {code:>9} | {'AT' if code else 'T':>15} | "
        f"{'A':>13} | {'P' if code == 2 else 'A':>7} | {'A':>16} | {'A':>17} "
        f"|| {'3  4' if code else '4':>16} ||"
    )


def write_table(path: Path, cases: dict[str, tuple[int, str]] = CASES) -> None:
    lines = [HEADER, *(table_row(name, code, histology) for name, (code, histology) in cases.items())]
    lines += ["", "Legends:", "Clinical Diagnosis: 0 - Common Nevus; 1 - Atypical Nevus; 2 - Melanoma"]
    path.write_text("\r\n".join(lines) + "\r\n", encoding="latin-1")


def lesion(number: int) -> np.ndarray:
    mask = np.zeros(SHAPE, np.uint8)
    y, x = 3 + number % 5, 4 + number % 7
    mask[y : y + 12, x : x + 15] = 255
    return mask


def write_ph2(root: Path) -> dict[str, np.ndarray]:
    """``root/PH2Dataset/PH2 Dataset images/IMDnnn/...`` + ``PH2_dataset.txt``; returns the masks (bool)."""
    images = root / "PH2Dataset" / "PH2 Dataset images"
    rng = np.random.default_rng(0)
    truth = {}
    for name in CASES:
        case = images / name
        for sub in ("Dermoscopic_Image", "lesion", "roi"):
            (case / f"{name}_{sub}").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (*SHAPE, 3), dtype=np.uint8)).save(
            case / f"{name}_Dermoscopic_Image" / f"{name}.bmp"
        )
        mask = lesion(int(name[3:]))
        truth[name] = mask > 0
        if name == RGB_MASK:
            stored = Image.fromarray(mask).convert("RGB")
        elif name == ONE_BIT_MASK:
            stored = Image.fromarray(mask > 0)  # mode "1": its grey values are 0 / 255
        else:
            stored = Image.fromarray(mask)
        stored.save(case / f"{name}_lesion" / f"{name}_lesion.bmp")
        # colour-class ROIs: colour BMPs that must never be read as masks
        Image.new("RGB", SHAPE[::-1], (200, 40, 40)).save(case / f"{name}_roi" / f"{name}_R1.bmp")
    write_table(root / "PH2Dataset" / "PH2_dataset.txt")
    return truth


def names(data: PH2) -> list[str]:
    return data.names


def test_replica_quirks_are_real(tmp_path):
    write_ph2(tmp_path)
    images = tmp_path / "PH2Dataset" / "PH2 Dataset images"
    with Image.open(images / RGB_MASK / f"{RGB_MASK}_lesion" / f"{RGB_MASK}_lesion.bmp") as img:
        assert img.format == "BMP" and img.mode == "RGB"
    with Image.open(images / ONE_BIT_MASK / f"{ONE_BIT_MASK}_lesion" / f"{ONE_BIT_MASK}_lesion.bmp") as img:
        assert img.mode == "1"
    assert (images / "IMD003" / "IMD003_roi" / "IMD003_R1.bmp").is_file()
    text = (tmp_path / "PH2Dataset" / "PH2_dataset.txt").read_text(encoding="latin-1")
    assert "||                        ||" in text  # blank Histological Diagnosis cells


def test_table_cells_keep_blank_cells():
    cells = table_cells(table_row("IMD003", 0, ""))
    assert cells[:4] == ["IMD003", "", "0", "0"] and cells[-1] == "4" and len(cells) == 10
    assert table_cells(HEADER)[:3] == ["Name", "Histological Diagnosis", "Clinical Diagnosis"]
    assert table_cells("Legends:") is None


def test_table_gives_the_clinical_diagnosis(tmp_path):
    write_ph2(tmp_path)
    records = read_ph2_table(tmp_path / "PH2Dataset" / "PH2_dataset.txt")
    assert {name: (r.label, r.histology) for name, r in records.items()} == CASES


def test_table_with_x_marked_class_columns(tmp_path):
    """The spreadsheet's layout (one column per class, 'X' in the right one), exported as a '||' table."""
    header = (
        "|| Image Name || Histological Diagnosis || Common Nevus | Atypical Nevus | Melanoma || Asymmetry ||"
    )
    rows = [
        "|| IMD003 ||  || X |  |  || 0 ||",
        "|| IMD155 || Melanoma ||  |  | X || 2 ||",
        "|| IMD002 ||  ||  | x |  || 0 ||",
    ]
    path = tmp_path / "PH2_dataset.txt"
    path.write_text("\n".join([header, *rows]))
    assert {n: r.label for n, r in read_ph2_table(path).items()} == {"IMD003": 0, "IMD155": 2, "IMD002": 1}
    path.write_text("\n".join([header, "|| IMD003 ||  || X |  | X || 0 ||"]))
    with pytest.raises(
        DiffSegError, match=r"PH2_dataset\.txt, line 2: IMD003 has 2 of the classes .* marked X"
    ):
        read_ph2_table(path)


def test_table_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "PH2_dataset.txt"
    with pytest.raises(DiffSegError, match=r"PH2_dataset\.txt: not found"):
        read_ph2_table(path)
    path.write_text("\n".join([HEADER, table_row("IMD003", 0, ""), table_row("IMD004", 5, "")]))
    with pytest.raises(
        DiffSegError, match=r"PH2_dataset\.txt, line 3: clinical diagnosis '5' of IMD004 is not 0, 1 or 2"
    ):
        read_ph2_table(path)
    path.write_text("\n".join([HEADER, table_row("IMD003", 0, ""), table_row("IMD003", 1, "")]))
    with pytest.raises(DiffSegError, match=r"line 3: IMD003 is listed twice"):
        read_ph2_table(path)
    path.write_text(table_row("IMD003", 0, ""))
    with pytest.raises(
        DiffSegError, match=r"line 1: row IMD003 before a header naming 'Name' and 'Clinical Diagnosis'"
    ):
        read_ph2_table(path)
    path.write_text("Name;Diagnosis\nIMD003;0\n")
    with pytest.raises(DiffSegError, match=r"PH2_dataset\.txt: no IMD<nnn> rows"):
        read_ph2_table(path)


def test_items_masks_and_labels(tmp_path):
    truth = write_ph2(tmp_path)
    data = PH2(tmp_path, "train", size=None, fractions=(1.0, 0.0, 0.0))
    assert names(data) == list(CASES)  # numeric order, roi folders ignored
    for i, name in enumerate(names(data)):
        item = data[i]
        assert item["case"].endswith(f"PH2 Dataset images/{name}/{name}_Dermoscopic_Image/{name}.bmp")
        assert item["image"].dtype == torch.float32 and item["image"].shape == (3, *SHAPE)
        assert item["image"].max() > 1  # 0..255, not rescaled
        assert item["mask"].dtype == torch.float32 and item["mask"].shape == (1, *SHAPE)
        assert torch.equal(item["mask"][0], torch.from_numpy(truth[name]).float())  # RGB and 0/1 masks too
        assert item["label"].dtype == torch.int64 and int(item["label"]) == CASES[name][0]
        assert item["original_size"].tolist() == list(SHAPE) and int(item["index"]) == i
    assert data.seen_labels == {0, 255}  # grey values: the 1-bit mask reads as 0 / 255 too
    assert data.records["IMD016"].histology == "Dermal Nevus"
    resized = PH2(tmp_path / "PH2Dataset", "train", size=(14, 18), fractions=(1.0, 0.0, 0.0))[0]
    assert resized["image"].shape == (3, 14, 18)
    expected = resize(torch.from_numpy(truth["IMD002"]).float()[None], (14, 18), "nearest")
    assert torch.equal(resized["mask"], expected)


def test_splits_are_seeded_fractions_and_folds(tmp_path):
    write_ph2(tmp_path)
    everything = list(CASES)
    splits = {s: names(PH2(tmp_path, s)) for s in ("train", "val", "test")}
    assert {s: len(v) for s, v in splits.items()} == {
        "train": 7,
        "val": 1,
        "test": 2,
    }  # 0.7 / 0.1 / 0.2 of 10
    assert sorted(sum(splits.values(), [])) == everything
    parts = split_by_fractions(10, (0.7, 0.1, 0.2), 0)
    assert splits["test"] == [everything[i] for i in parts[2]]
    assert names(PH2(tmp_path, "test")) == splits["test"]  # deterministic
    assert names(PH2(tmp_path, "test", seed=5)) != splits["test"]
    tests = []
    for fold in range(5):
        split = {s: names(PH2(tmp_path, s, folds=5, fold=fold)) for s in ("train", "val", "test")}
        assert sorted(sum(split.values(), [])) == everything
        assert split["test"] == [everything[i] for i in kfold(10, 5, 0)[fold]]
        tests += split["test"]
    assert sorted(tests) == everything  # the test folds partition the cases


def test_bad_cases_are_named_or_skipped(tmp_path):
    write_ph2(tmp_path)
    images = tmp_path / "PH2Dataset" / "PH2 Dataset images"
    test = names(PH2(tmp_path, "test"))
    gone = test[0]
    (images / gone / f"{gone}_lesion" / f"{gone}_lesion.bmp").unlink()
    with pytest.raises(
        DiffSegError, match=rf"{gone}\.bmp: no lesion mask; expected .*{gone}_lesion/{gone}_lesion\.bmp"
    ):
        PH2(tmp_path, "train")  # found whatever split the case is in
    skipped = PH2(tmp_path, "test", on_bad_case="skip")
    assert names(skipped) == test[1:] and len(skipped.skipped) == 1
    assert skipped.skipped[0][0].endswith(f"{gone}.bmp") and "no lesion mask" in skipped.skipped[0][1]
    assert len(PH2(tmp_path, "train", on_bad_case="skip")) == 7  # the other splits keep their cases

    (images / gone / f"{gone}_Dermoscopic_Image" / f"{gone}.bmp").unlink()
    with pytest.raises(
        DiffSegError, match=rf"{gone}: no dermoscopic image; expected .*{gone}_Dermoscopic_Image/{gone}\.bmp"
    ):
        PH2(tmp_path, "test")
    (images / gone).rename(tmp_path / "away")
    kept = [n for n in CASES if n != test[1]]
    write_table(tmp_path / "PH2Dataset" / "PH2_dataset.txt", {n: CASES[n] for n in kept})
    with pytest.raises(DiffSegError, match=rf"{test[1]}\.bmp: no row for {test[1]} in .*PH2_dataset\.txt"):
        PH2(tmp_path, "train")


def test_corrupt_files_and_bad_masks_name_the_file(tmp_path):
    write_ph2(tmp_path)
    images = tmp_path / "PH2Dataset" / "PH2 Dataset images"
    first, second, third, fourth = list(CASES)[:4]
    (images / first / f"{first}_Dermoscopic_Image" / f"{first}.bmp").write_bytes(b"BM\x00 broken")
    mask = lesion(int(second[3:]))
    mask[0, 0] = 128
    Image.fromarray(mask).save(images / second / f"{second}_lesion" / f"{second}_lesion.bmp")
    colour = np.zeros((*SHAPE, 3), np.uint8)
    colour[..., 0] = 255  # red: colour, not a grey mask stored as RGB
    Image.fromarray(colour).save(images / third / f"{third}_lesion" / f"{third}_lesion.bmp")
    Image.new("L", (5, 7)).save(images / fourth / f"{fourth}_lesion" / f"{fourth}_lesion.bmp")
    data = PH2(tmp_path, "train", fractions=(1.0, 0.0, 0.0))
    with pytest.raises(DiffSegError, match=rf"{first}\.bmp: not a readable image"):
        data[0]
    with pytest.raises(
        DiffSegError,
        match=rf"{second}_lesion\.bmp: mask values 0, 128, 255 are not those of a binary PH2 mask",
    ):
        data[1]
    with pytest.raises(
        DiffSegError, match=rf"{third}_lesion\.bmp: colour mask \(1 colour\(s\): \(255, 0, 0\)\)"
    ):
        data[2]
    with pytest.raises(DiffSegError, match=rf"{fourth}_lesion\.bmp: mask size \(7, 5\) .*differs"):
        data[3]
    with pytest.raises(
        DiffSegError, match=rf"{list(CASES)[4]}\.bmp: image has 3 channel\(s\) but the config expects 1"
    ):
        PH2(tmp_path, "train", fractions=(1.0, 0.0, 0.0), channels=1)[4]


def test_bad_roots_and_options(tmp_path):
    with pytest.raises(DiffSegError, match="does not exist"):
        PH2(tmp_path / "absent")
    with pytest.raises(DiffSegError, match=r"expected .*PH2Dataset/PH2 Dataset images"):
        PH2(tmp_path)
    write_ph2(tmp_path)
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'val', 'test'\)"):
        PH2(tmp_path, "training")
    with pytest.raises(ValueError, match=r"fractions must be three shares"):
        PH2(tmp_path, fractions=(0.5, 0.5))
    (tmp_path / "PH2Dataset" / "PH2_dataset.txt").unlink()
    with pytest.raises(DiffSegError, match=r"PH2_dataset\.txt: not found"):
        PH2(tmp_path)


def test_hydra_config_loads_a_batch(tmp_path):
    root = tmp_path / "ph2 data"
    write_ph2(root)
    cfg = compose_config(
        "train",
        [
            "data=ph2",
            f"data.root={root}",
            "data.num_workers=0",
            "data.size=16",
            "data.batch_size=4",
            "data.fractions=[0.6,0.2,0.2]",
        ],
        tmp_path / "run",
    )
    assert cfg.data.test.fold == 0 and cfg.data.test.on_bad_case == "error"
    dm = instantiate(cfg.data)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 6 and len(dm.datasets["val"]) == 2
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["mask"].shape == (4, 1, 16, 16)
    assert batch["label"].dtype == torch.int64 and set(batch["label"].tolist()) <= {0, 1, 2}
    assert set(batch["mask"].unique().tolist()) == {0.0, 1.0}


def test_a_palette_mask_reads_by_its_grey_values_not_its_indices(tmp_path):
    """A mask whose palette is [white, black] stores index 1 for the black background: reading indices would
    invert the lesion; reading grey values cannot."""
    truth = write_ph2(tmp_path)
    name = next(iter(CASES))
    path = tmp_path / "PH2Dataset" / "PH2 Dataset images" / name / f"{name}_lesion" / f"{name}_lesion.bmp"
    inverted = Image.fromarray((truth[name] == 0).astype(np.uint8), mode="P")  # index 0 = lesion
    inverted.putpalette([255, 255, 255, 0, 0, 0] + [0, 0, 0] * 254)  # index 0 white, index 1 black
    inverted.save(path)
    data = PH2(tmp_path, "train", size=None, fractions=(1.0, 0.0, 0.0))
    item = data[names(data).index(name)]
    assert torch.equal(item["mask"][0], torch.from_numpy(truth[name]).float())
