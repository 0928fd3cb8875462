"""Paired and unlabelled image folders, the DataModule's checks and its normalisation."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
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
