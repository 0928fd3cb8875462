"""Paired and unlabelled image folders, the DataModule's checks and its normalisation."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config
from hydra.utils import instantiate
from PIL import Image

from diffseg_lightning.data import ImageFolder, PairedFolder, SegmentationDataModule, zscore_per_channel
from diffseg_lightning.exceptions import ConfigError, DiffSegError


def write_pairs(root: Path, n: int = 10, size=(20, 30), mode: str = "RGB") -> list[np.ndarray]:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    masks = []
    for i in range(n):
        shape = (*size, 3) if mode == "RGB" else size
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(
            root / "images" / f"case{i:02d}.png"
        )
        mask = np.zeros(size, np.uint8)
        mask[2 : 5 + i, 3:9] = 255
        Image.fromarray(mask).save(root / "masks" / f"case{i:02d}.png")
        masks.append(mask > 0)
    return masks


def test_splits_partition_the_cases(tmp_path):
    write_pairs(tmp_path, n=20)
    cases = [
        set(PairedFolder(tmp_path, split, size=None, channels=3).pairs) for split in ("train", "val", "test")
    ]
    assert sum(len(c) for c in cases) == 20 and len(set().union(*cases)) == 20
    assert [len(c) for c in cases] == [14, 3, 3]


def test_items_keep_the_mask_exactly(tmp_path):
    masks = write_pairs(tmp_path, n=10)
    data = PairedFolder(tmp_path, "train", fractions=(1.0, 0.0, 0.0), size=None, channels=3)
    for i in range(len(data)):
        item = data[i]
        index = int(Path(item["case"]).stem[-2:])
        assert item["image"].shape == (3, 20, 30) and item["mask"].shape == (1, 20, 30)
        assert np.array_equal(item["mask"][0].numpy() > 0, masks[index])
        assert item["original_size"].tolist() == [20, 30]


def test_jpeg_mask_noise_is_binarised_at_127(tmp_path):
    write_pairs(tmp_path, n=3)
    mask = np.zeros((20, 30), np.uint8)
    mask[5:15, 5:25] = 255
    Image.fromarray(mask).convert("RGB").save(tmp_path / "masks" / "case00.jpg", quality=60)
    (tmp_path / "masks" / "case00.png").unlink()
    data = PairedFolder(tmp_path, "train", fractions=(1.0, 0.0, 0.0), size=None, channels=3)
    item = next(data[i] for i in range(len(data)) if data[i]["case"].endswith("case00.png"))
    assert torch.equal(item["mask"][0] > 0, torch.from_numpy(mask > 0))


def test_bad_layouts_name_the_problem(tmp_path):
    with pytest.raises(DiffSegError, match="does not exist"):
        PairedFolder(tmp_path / "nowhere")
    write_pairs(tmp_path, n=3)
    (tmp_path / "masks" / "case01.png").unlink()
    with pytest.raises(DiffSegError, match="case01"):
        PairedFolder(tmp_path)


def stems(data: PairedFolder) -> list[str]:
    return [image.stem for image, _ in data.pairs]


def test_skip_leaves_out_an_image_without_mask_and_keeps_the_split(tmp_path):
    write_pairs(tmp_path, n=20)
    before = {s: stems(PairedFolder(tmp_path, s)) for s in ("train", "val", "test")}
    victim = before["val"][1]
    (tmp_path / "masks" / f"{victim}.png").unlink()
    with pytest.raises(DiffSegError, match=rf"masks: no mask for 1 image\(s\), e\.g\. {victim}\.png"):
        PairedFolder(tmp_path, "train")  # "error": whatever split the image is in
    after = {s: PairedFolder(tmp_path, s, channels=3, on_bad_case="skip") for s in ("train", "val", "test")}
    expected = (
        str(tmp_path / "images" / f"{victim}.png"),
        f"no mask; expected {tmp_path / 'masks' / victim}.<ext>",
    )
    assert after["val"].skipped == [expected]
    assert after["train"].skipped == [] and after["test"].skipped == []
    assert stems(after["val"]) == [c for c in before["val"] if c != victim]
    assert stems(after["train"]) == before["train"] and stems(after["test"]) == before["test"]
    assert after["val"][0]["mask"].shape == (1, 64, 64)


def test_kfold_test_folds_partition_the_cases(tmp_path):
    write_pairs(tmp_path, n=10)
    everything = [f"case{i:02d}" for i in range(10)]
    tests = []
    for fold in range(5):
        parts = {s: stems(PairedFolder(tmp_path, s, folds=5, fold=fold)) for s in ("train", "val", "test")}
        assert [len(parts[s]) for s in ("train", "val", "test")] == [
            7,
            1,
            2,
        ]  # 8 others: 0.7 : 0.15 -> 6.6 : 1.4
        assert sorted(sum(parts.values(), [])) == everything
        assert stems(PairedFolder(tmp_path, "test", folds=5, fold=fold)) == parts["test"]
        tests += parts["test"]
    assert sorted(tests) == everything


def test_seen_labels_are_the_stored_mask_values(tmp_path):
    write_pairs(tmp_path, n=2)
    data = PairedFolder(tmp_path, "train", fractions=(1.0, 0.0, 0.0))
    data[0]
    assert data.seen_labels == {0, 255}


def test_config_passes_folds_and_the_bad_case_policy(tmp_path):
    write_pairs(tmp_path / "data", n=12)
    overrides = ["data=folder", f"data.root={tmp_path / 'data'}", "data.num_workers=0", "data.size=16"]
    overrides += ["data.folds=4", "data.fold=3", "data.batch_size=2"]
    dm = instantiate(compose_config("train", overrides, tmp_path / "run").data)
    dm.setup("test")
    assert dm.datasets["test"].pairs == PairedFolder(tmp_path / "data", "test", folds=4, fold=3).pairs
    assert len(dm.datasets["test"]) == 3
    assert next(iter(dm.test_dataloader()))["image"].shape == (3, 3, 16, 16)


def test_wrong_channel_count_names_the_file(tmp_path):
    write_pairs(tmp_path, n=4)
    data = PairedFolder(tmp_path, "train", fractions=(1.0, 0.0, 0.0), channels=1)
    with pytest.raises(
        DiffSegError, match=r"case0\d\.png: image has 3 channel\(s\) but the config expects 1"
    ):
        data[0]
    dm = SegmentationDataModule(train=partial(PairedFolder, tmp_path, "train", (1.0, 0.0, 0.0)), channels=1)
    with pytest.raises(DiffSegError, match="data.channels=1"):
        dm.setup("fit")


def test_corrupt_image_names_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DiffSegError, match="broken.png: not a readable image"):
        ImageFolder(tmp_path)[0]


def test_image_folder_resizes_and_remembers_the_size(tmp_path):
    write_pairs(tmp_path, n=2, mode="L")
    item = ImageFolder(tmp_path / "images", size=16, channels=1)[1]
    assert item["image"].shape == (1, 16, 16) and item["original_size"].tolist() == [20, 30]


def test_zscore_per_image_and_channel():
    image = torch.randn(3, 2, 8, 8) * torch.tensor([1.0, 5.0]).view(1, 2, 1, 1) + 3
    out = zscore_per_channel(image)
    assert torch.allclose(out.mean((-2, -1)), torch.zeros(3, 2), atol=1e-5)
    assert torch.allclose(out.std((-2, -1), unbiased=False), torch.ones(3, 2), atol=1e-4)


# ------------------------------------------------------------------------------------------- mask values
def disc(shape=(40, 52), centre=(19, 23), radius=13) -> np.ndarray:
    """A disc whose edge crosses 8 x 8 JPEG blocks (not aligned to them), bool (H, W)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius**2


def one_case(root: Path, mask: np.ndarray, name: str = "m.png", **save) -> Path:
    """``root/images/<stem>.png`` (random RGB) with ``root/masks/<name>`` holding ``mask`` as given."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    stem = Path(name).stem
    Image.fromarray(rng.integers(0, 255, (*mask.shape[:2], 3), dtype=np.uint8)).save(
        root / "images" / f"{stem}.png"
    )
    Image.fromarray(mask).save(root / "masks" / name, **save)
    return root / "masks" / name


def load_mask(root: Path, **kwargs) -> np.ndarray:
    data = PairedFolder(root, "train", fractions=(1.0, 0.0, 0.0), size=None, channels=3, **kwargs)
    return data[0]["mask"][0].numpy() > 0


def test_a_label_map_is_an_error_until_foreground_names_its_values(tmp_path):
    labels = disc().astype(np.uint8)
    labels[:, 40:] = 2  # {0, 1, 2}: used to read as an empty mask (> 127 since the maximum is above 1)
    path = one_case(tmp_path, labels)
    with pytest.raises(
        DiffSegError,
        match=rf"{path}: mask values 0, 1, 2 are not a binary mask \(0/1 or 0/255\); set data\.foreground "
        r"to the value\(s\) that mean foreground, e\.g\. data\.foreground=\[1,2\], or data\.foreground=nonzero",
    ):
        load_mask(tmp_path)
    assert np.array_equal(load_mask(tmp_path, foreground=[1, 2]), labels > 0)
    assert np.array_equal(load_mask(tmp_path, foreground=2), labels == 2)
    assert np.array_equal(load_mask(tmp_path, foreground="nonzero"), labels > 0)


def test_a_soft_mask_is_an_error_until_foreground_names_its_value(tmp_path):
    truth = disc()
    path = one_case(tmp_path, truth.astype(np.uint8) * 102)  # 0/102: used to read as empty
    with pytest.raises(
        DiffSegError, match=rf"{path}: mask values 0, 102 are not a binary mask.*foreground=102"
    ):
        load_mask(tmp_path)
    assert np.array_equal(load_mask(tmp_path, foreground=102), truth)
    assert np.array_equal(load_mask(tmp_path, foreground="nonzero"), truth)


def test_a_colour_mask_is_an_error_unless_nonzero_and_grey_as_rgb_is_grey(tmp_path):
    truth = disc()
    red = np.zeros((*truth.shape, 3), np.uint8)
    red[truth, 0] = 255  # red on black: used to average to 85 and read as empty
    path = one_case(tmp_path, red)
    with pytest.raises(
        DiffSegError,
        match=rf"{path}: colour mask \(2 colour\(s\): \(0, 0, 0\), \(255, 0, 0\)\); a mask must be grey .*"
        r"data\.foreground=nonzero to make every non-black pixel foreground",
    ):
        load_mask(tmp_path)
    assert np.array_equal(load_mask(tmp_path, foreground="nonzero"), truth)
    Image.fromarray(np.repeat(truth[..., None].astype(np.uint8) * 255, 3, axis=-1)).save(path)
    assert np.array_equal(load_mask(tmp_path), truth)  # grey stored as RGB
    alpha = np.dstack([red, np.where(truth, 255, 0).astype(np.uint8)])
    Image.fromarray(alpha).save(path)
    with pytest.raises(DiffSegError, match=rf"{path}: mask with varying transparency"):
        load_mask(tmp_path)


@pytest.mark.parametrize("high", [1, 255])
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_jpeg_masks_of_0_1_and_0_255_read_within_the_compression_noise(tmp_path, high, mode):
    truth = disc()
    stored = Image.fromarray(truth.astype(np.uint8) * high).convert(mode)
    (tmp_path / "masks").mkdir(parents=True)
    one_case(tmp_path, np.asarray(stored), "m.jpg", quality=90)
    values = np.asarray(Image.open(tmp_path / "masks" / "m.jpg"))
    assert values.max() > 1  # the noise that made the 0/1 mask read as empty (> 127) before
    mask = load_mask(tmp_path)
    # JPEG codes 8 x 8 blocks independently: a block that is uniform in the mask holds only a DC term, 8x its
    # value; at quality 90 the DC step is 3 (16 x 0.2), so the decoded value is off by at most 3 / 2 / 8 < 0.5
    # and rounds back to the stored value (the chroma of grey is a constant 128). Only blocks the disc's edge
    # crosses may differ.
    blocks = truth[:40, :48].reshape(5, 8, 6, 8).transpose(0, 2, 1, 3).reshape(5, 6, 64)
    uniform = np.repeat(np.repeat(blocks.min(-1) == blocks.max(-1), 8, 0), 8, 1)
    assert truth[:40, :48][uniform].any()  # whole blocks inside the disc, so this checks foreground too
    assert np.array_equal(mask[:40, :48][uniform], truth[:40, :48][uniform])


def test_a_soft_jpeg_mask_is_an_error_and_jpeg_takes_only_the_binary_rule(tmp_path):
    path = one_case(tmp_path, disc().astype(np.uint8) * 102, "m.jpg", quality=90)
    with pytest.raises(
        DiffSegError,
        match=rf"{path}: JPEG mask is neither 0/1 nor 0/255 with compression noise \(values 0\.\.\d+, 100% of "
        r"the non-background pixels between 64 and 191",
    ):
        load_mask(tmp_path)
    with pytest.raises(DiffSegError, match=rf"{path}: data\.foreground=102 needs exact mask values"):
        load_mask(tmp_path, foreground=102)


@pytest.mark.parametrize("bad", ["yes", True, [], [[1]], ["a"], None])
def test_foreground_settings_are_checked(tmp_path, bad):
    write_pairs(tmp_path, n=2)
    with pytest.raises(ConfigError, match=r"data\.foreground must be binary .*, got"):
        PairedFolder(tmp_path, foreground=bad)


def test_check_data_reports_the_mask_that_does_not_fit_the_rule(tmp_path):
    from diffseg_lightning.check_data import check_splits

    write_pairs(tmp_path / "data", n=10)
    bad = tmp_path / "data" / "masks" / "case03.png"
    Image.fromarray((np.asarray(Image.open(bad)) > 0).astype(np.uint8) * 2).save(bad)  # 0/2 labels
    cfg = compose_config("check_data", ["data=folder", f"data.root={tmp_path / 'data'}"], tmp_path / "out")
    problems = [p for report in check_splits(cfg).values() for p in report.problems]
    assert problems == [(str(bad), problems[0][1])]
    assert problems[0][1].startswith("mask values 0, 2 are not a binary mask (0/1 or 0/255)")
    with pytest.raises(DiffSegError, match=rf"{bad}: mask values 0, 2"):  # training stops before it starts
        instantiate(
            compose_config("train", ["data=folder", f"data.root={tmp_path / 'data'}"], tmp_path).data
        ).setup("fit")


# ------------------------------------------------------------------------------- duplicate stems, links
def test_two_images_or_two_masks_of_one_stem_are_an_error_naming_both(tmp_path):
    write_pairs(tmp_path, n=10)
    Image.open(tmp_path / "images" / "case04.png").save(tmp_path / "images" / "case04.jpg")
    with pytest.raises(DiffSegError, match=r"images/case04\.jpg: case04\.png has the same stem"):
        PairedFolder(tmp_path)
    splits = {s: PairedFolder(tmp_path, s, on_bad_case="skip") for s in ("train", "val", "test")}
    skipped = sorted(Path(p).name for data in splits.values() for p, _ in data.skipped)
    assert skipped == ["case04.jpg", "case04.png"]  # both left out, wherever they fell
    assert all("case04" not in image.name for data in splits.values() for image, _ in data.pairs)
    (tmp_path / "images" / "case04.jpg").unlink()
    Image.open(tmp_path / "masks" / "case07.png").save(tmp_path / "masks" / "case07.tif")
    with pytest.raises(DiffSegError, match=r"masks/case07\.tif: case07\.png has the same stem: which mask"):
        PairedFolder(tmp_path)


def test_a_broken_symlink_is_an_error_naming_its_target(tmp_path):
    write_pairs(tmp_path, n=4)
    (tmp_path / "images" / "case09.png").symlink_to(tmp_path / "gone" / "case09.png")
    with pytest.raises(
        DiffSegError, match=rf"images/case09\.png: broken symbolic link to {tmp_path / 'gone' / 'case09.png'}"
    ):
        PairedFolder(tmp_path)
    (tmp_path / "images" / "case09.png").unlink()
    (tmp_path / "masks" / "case02.png").unlink()
    (tmp_path / "masks" / "case02.png").symlink_to("nowhere.png")
    with pytest.raises(DiffSegError, match=r"masks/case02\.png: broken symbolic link to nowhere\.png"):
        PairedFolder(tmp_path)
    predict = ImageFolder(tmp_path / "masks", size=8, channels=1)
    assert (tmp_path / "masks" / "case02.png", "broken symbolic link to nowhere.png") in predict.skipped
    assert len(predict) == 3


def test_check_data_names_a_broken_symlink_as_the_problem_file(tmp_path):
    from diffseg_lightning.check_data import check_splits

    write_pairs(tmp_path / "data", n=10)
    link = tmp_path / "data" / "images" / "case11.png"
    link.symlink_to(tmp_path / "gone.png")
    cfg = compose_config("check_data", ["data=folder", f"data.root={tmp_path / 'data'}"], tmp_path / "out")
    problems = {p for report in check_splits(cfg).values() for p in report.problems}
    assert problems == {(str(link), f"broken symbolic link to {tmp_path / 'gone.png'}")}
