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
from diffseg_lightning.utils import DiffSegError


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
