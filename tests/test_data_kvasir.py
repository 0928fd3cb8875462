"""Kvasir-SEG in its official layout: a tiny replica with the release's quirks, the real subset, and one run."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, compose_config, shared_data
from hydra.utils import instantiate
from PIL import Image

from diffseg_lightning.data import SegmentationDataModule
from diffseg_lightning.data.kvasir import KvasirSEG
from diffseg_lightning.data.splits import split_by_fractions
from diffseg_lightning.utils.errors import DiffSegError

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = [(24, 32), (30, 40), (28, 28), (36, 24)]  # (H, W): sizes vary per image, as in the release
SPLITS = ("train", "val", "test")


def write_kvasir(root: Path, n: int = 10) -> dict[str, np.ndarray]:
    """``root/Kvasir-SEG/{images,masks}/<id>.jpg`` + ``kavsir_bboxes.json``; returns the true masks by id."""
    folder = root / "Kvasir-SEG"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rng = np.random.default_rng(0)
    truth, boxes = {}, {}
    for i in range(n):
        case = f"cju{i:02d}x{rng.integers(1e6):06d}"  # id-like names
        h, w = SIZES[i % len(SIZES)]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            folder / "images" / f"{case}.jpg"
        )
        mask = np.zeros((h, w), np.uint8)
        y0, x0 = 2 + i % 3, 3 + i % 4
        mask[y0 : y0 + 10, x0 : x0 + 12] = 255
        # The release's masks are RGB JPEGs: edges carry compression noise
        Image.fromarray(mask).convert("RGB").save(folder / "masks" / f"{case}.jpg", quality=60)
        truth[case] = mask > 0
        bbox = [{"label": "polyp", "xmin": x0, "ymin": y0, "xmax": x0 + 12, "ymax": y0 + 10}]
        boxes[case] = {"height": h, "width": w, "bbox": bbox}
    (folder / "kavsir_bboxes.json").write_text(json.dumps(boxes))
    return truth


def test_replica_quirks_are_real(tmp_path):
    """The replica's masks are noisy RGB JPEGs, as in the release (so the next tests test the real thing)."""
    write_kvasir(tmp_path, n=1)
    mask_file = next((tmp_path / "Kvasir-SEG" / "masks").iterdir())
    with Image.open(mask_file) as img:
        assert img.format == "JPEG" and img.mode == "RGB"
        values = np.unique(np.asarray(img))
    assert len(values) > 2  # compression noise, not a clean 0/255 mask


def test_items_binarise_the_noisy_jpeg_masks(tmp_path):
    truth = write_kvasir(tmp_path, n=4)
    data = KvasirSEG(tmp_path, "train", size=None, fractions=(1.0, 0.0, 0.0))
    assert len(data) == 4
    for i in range(len(data)):
        item = data[i]
        case = Path(item["case"]).stem
        h, w = truth[case].shape
        assert item["case"].endswith(f"images/{case}.jpg")
        assert item["image"].dtype == torch.float32 and item["image"].shape == (3, h, w)
        assert item["mask"].dtype == torch.float32 and item["mask"].shape == (1, h, w)
        assert torch.equal(item["mask"][0] > 0, torch.from_numpy(truth[case]))
        assert item["original_size"].tolist() == [h, w] and int(item["index"]) == i


def test_splits_are_seeded_fractions_that_partition_the_ids(tmp_path):
    write_kvasir(tmp_path, n=10)
    ids = [KvasirSEG(tmp_path, split, size=None).ids for split in ("train", "val", "test")]
    assert [len(s) for s in ids] == [8, 1, 1]
    assert len(set().union(*ids)) == 10
    assert KvasirSEG(tmp_path, "train").ids == ids[0]  # deterministic
    other = [KvasirSEG(tmp_path, split, seed=1).ids for split in ("val", "test")]
    assert other != ids[1:]  # the seed moves cases between splits
    assert split_by_fractions(10, (0.5, 0.5), 0) == split_by_fractions(10, (0.5, 0.5), 0)


def test_root_may_be_the_kvasir_folder_itself(tmp_path):
    write_kvasir(tmp_path, n=4)
    outer = KvasirSEG(tmp_path, "train", fractions=(1.0, 0.0, 0.0))
    inner = KvasirSEG(tmp_path / "Kvasir-SEG", "train", fractions=(1.0, 0.0, 0.0))
    assert outer.pairs == inner.pairs


def test_boxes_scale_with_the_item(tmp_path):
    write_kvasir(tmp_path, n=4)
    data = KvasirSEG(tmp_path, "train", size=(12, 16), fractions=(1.0, 0.0, 0.0))
    case = data.ids[0]
    entry = json.loads((tmp_path / "Kvasir-SEG" / "kavsir_bboxes.json").read_text())[case]
    native = data.boxes(case, native=True)
    box = entry["bbox"][0]
    assert native.tolist() == [[box["xmin"], box["ymin"], box["xmax"], box["ymax"]]]
    scale = torch.tensor([16 / entry["width"], 12 / entry["height"]] * 2)
    assert torch.allclose(data.boxes(0), native * scale)
    assert data.box_labels(0) == ["polyp"]


def test_a_batch_through_the_datamodule(tmp_path):
    write_kvasir(tmp_path, n=10)
    factory = partial(KvasirSEG, tmp_path, size=16, channels=3)
    dm = SegmentationDataModule(
        train=partial(factory, "train"), val=partial(factory, "val"), channels=3, batch_size=4
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["mask"].shape == (4, 1, 16, 16)
    assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(batch["image"].mean((-2, -1)), torch.zeros(4, 3), atol=1e-4)  # z-scored
    assert len(batch["case"]) == 4 and batch["original_size"].shape == (4, 2)


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(DiffSegError, match="does not exist"):
        KvasirSEG(tmp_path / "absent")
    with pytest.raises(DiffSegError, match=r"expected .*Kvasir-SEG/images"):
        KvasirSEG(tmp_path)
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'val', 'test'\)"):
        KvasirSEG(tmp_path, "training")
    truth = write_kvasir(tmp_path, n=4)
    first, second, third = sorted(truth)[:3]
    masks = tmp_path / "Kvasir-SEG" / "masks"

    Image.new("RGB", (5, 5)).save(masks / f"{first}.jpg")  # wrong size
    (masks / f"{second}.jpg").write_bytes(b"not a jpeg")  # unreadable
    data = KvasirSEG(tmp_path, "train", fractions=(1.0, 0.0, 0.0))
    with pytest.raises(DiffSegError, match=rf"masks/{first}\.jpg: mask size \(5, 5\) .*differs"):
        data[data.ids.index(first)]
    with pytest.raises(DiffSegError, match=rf"masks/{second}\.jpg: not a readable image"):
        data[data.ids.index(second)]
    with pytest.raises(
        DiffSegError, match=rf"{third}\.jpg: image has 3 channel\(s\) but the config expects 1"
    ):
        KvasirSEG(tmp_path, "train", fractions=(1.0, 0.0, 0.0), channels=1)[data.ids.index(third)]

    (masks / f"{third}.jpg").unlink()
    with pytest.raises(DiffSegError, match=rf"images/{third}\.jpg: no mask; expected .*masks/{third}\.jpg"):
        KvasirSEG(tmp_path)


def test_masks_off_the_binary_rule_duplicate_ids_and_broken_links_are_named(tmp_path):
    truth = write_kvasir(tmp_path, n=4)
    first, second, third = sorted(truth)[:3]
    folder = tmp_path / "Kvasir-SEG"
    soft = (truth[first] * 102).astype(np.uint8)  # a soft 0/102 mask: used to read as empty (> 127)
    Image.fromarray(soft).convert("RGB").save(folder / "masks" / f"{first}.jpg", quality=60)
    red = np.zeros((*truth[second].shape, 3), np.uint8)
    red[truth[second], 0] = 255  # red on black: its luma 76 used to read as empty
    Image.fromarray(red).save(folder / "masks" / f"{second}.jpg", quality=60)
    data = KvasirSEG(tmp_path, "train", fractions=(1.0, 0.0, 0.0), size=None)
    with pytest.raises(
        DiffSegError, match=rf"masks/{first}\.jpg: JPEG mask is neither 0/1 nor 0/255 .*Kvasir-SEG"
    ):
        data[data.ids.index(first)]
    with pytest.raises(
        DiffSegError, match=rf"masks/{second}\.jpg: JPEG colour mask \(channels differ by up to"
    ):
        data[data.ids.index(second)]

    Image.open(folder / "images" / f"{third}.jpg").save(folder / "images" / f"{third}.jpeg")
    with pytest.raises(DiffSegError, match=rf"images/{third}\.jpeg: {third}\.jpg has the same id"):
        KvasirSEG(tmp_path)
    (folder / "images" / f"{third}.jpeg").unlink()
    (folder / "images" / "cjuzz.jpg").symlink_to(tmp_path / "elsewhere.jpg")
    with pytest.raises(
        DiffSegError, match=rf"images/cjuzz\.jpg: broken symbolic link to {tmp_path}/elsewhere"
    ):
        KvasirSEG(tmp_path)


def test_box_table_errors_name_the_json(tmp_path):
    write_kvasir(tmp_path, n=2)
    table = tmp_path / "Kvasir-SEG" / "kavsir_bboxes.json"
    data = KvasirSEG(tmp_path, "train", fractions=(1.0, 0.0, 0.0))
    entries = json.loads(table.read_text())
    entries[data.ids[0]]["height"] += 1
    del entries[data.ids[1]]
    table.write_text(json.dumps(entries))
    with pytest.raises(DiffSegError, match=r"kavsir_bboxes\.json: .* is \d+x\d+ \(HxW\) but"):
        data.boxes(0)
    with pytest.raises(DiffSegError, match=rf"kavsir_bboxes\.json: no entry with boxes for {data.ids[1]}"):
        KvasirSEG(tmp_path, "train", fractions=(1.0, 0.0, 0.0)).boxes(1)
    table.unlink()
    with pytest.raises(DiffSegError, match=r"kavsir_bboxes\.json: not found"):
        KvasirSEG(tmp_path, "train", fractions=(1.0, 0.0, 0.0)).boxes(0)


def test_skip_leaves_out_an_image_without_mask_and_keeps_the_other_splits(tmp_path):
    write_kvasir(tmp_path, n=10)
    before = {s: KvasirSEG(tmp_path, s, size=None).ids for s in SPLITS}
    missing = before["train"][2]
    image = tmp_path / "Kvasir-SEG" / "images" / f"{missing}.jpg"
    mask = tmp_path / "Kvasir-SEG" / "masks" / f"{missing}.jpg"
    mask.unlink()
    with pytest.raises(DiffSegError, match=rf"images/{missing}\.jpg: no mask"):
        KvasirSEG(tmp_path, "test")  # "error": found whatever split the case is in
    after = {s: KvasirSEG(tmp_path, s, size=None, on_bad_case="skip") for s in SPLITS}
    assert after["train"].skipped == [(str(image), f"no mask; expected {mask}")]
    assert after["val"].skipped == [] and after["test"].skipped == []  # each split lists its own
    assert after["train"].ids == [case for case in before["train"] if case != missing]
    assert after["val"].ids == before["val"] and after["test"].ids == before["test"]
    assert [Path(after["train"][i]["case"]).stem for i in range(len(after["train"]))] == after["train"].ids
    with pytest.raises(ValueError, match=r"on_bad_case must be one of \('error', 'skip'\)"):
        KvasirSEG(tmp_path, on_bad_case="ignore")


def test_kfold_test_folds_partition_the_ids(tmp_path):
    truth = write_kvasir(tmp_path, n=10)
    tests = []
    for fold in range(5):
        parts = {s: KvasirSEG(tmp_path, s, size=None, folds=5, fold=fold).ids for s in SPLITS}
        assert [len(parts[s]) for s in SPLITS] == [7, 1, 2]  # the 8 others cut 0.8 : 0.1 -> 7 / 1
        assert sorted(sum(parts.values(), [])) == sorted(truth)  # train, val, test: disjoint and complete
        assert KvasirSEG(tmp_path, "test", folds=5, fold=fold).ids == parts["test"]  # deterministic
        tests.append(parts["test"])
    assert sorted(sum(tests, [])) == sorted(truth)  # every id is tested in exactly one fold
    assert [KvasirSEG(tmp_path, "test", folds=5, fold=f, seed=1).ids for f in range(5)] != tests  # seeded
    with pytest.raises(ValueError, match=r"data\.fold must lie in \[0, data\.folds = 5\), got 5"):
        KvasirSEG(tmp_path, folds=5, fold=5)
    with pytest.raises(ValueError, match=r"data\.folds must lie in \[2, number of cases = 10\], got 11"):
        KvasirSEG(tmp_path, folds=11)


def test_seen_labels_are_the_stored_mask_values(tmp_path):
    write_kvasir(tmp_path, n=2)
    data = KvasirSEG(tmp_path, "train", size=16, fractions=(1.0, 0.0, 0.0))
    assert data.seen_labels == set()
    data[1]
    with Image.open(data.pairs[1][1]) as img:
        stored = np.unique(np.asarray(img))  # the JPEG's values, noise included, before binarising
    assert len(stored) > 2 and data.seen_labels == set(stored[:64].tolist())  # at most 64 are recorded


def test_config_passes_folds_and_the_bad_case_policy(tmp_path):
    truth = write_kvasir(tmp_path / "data", n=10)
    missing = sorted(truth)[0]
    (tmp_path / "data" / "Kvasir-SEG" / "masks" / f"{missing}.jpg").unlink()
    overrides = ["data=kvasir", f"data.root={tmp_path / 'data'}", "data.num_workers=0", "data.size=16"]
    overrides += ["data.folds=3", "data.fold=1", "data.on_bad_case=skip", "data.batch_size=2"]
    cfg = compose_config("train", overrides, tmp_path / "run")
    dm = instantiate(cfg.data)
    with pytest.warns(UserWarning, match=rf"left out 1 bad case\(s\) .*{missing}\.jpg: no mask"):
        dm.setup(None)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 16, 16) and batch["mask"].shape == (2, 1, 16, 16)
    for split in SPLITS:
        expected = KvasirSEG(tmp_path / "data", split, folds=3, fold=1, on_bad_case="skip")
        assert dm.datasets[split].ids == expected.ids and dm.datasets[split].folds == 3
        assert [p for p, _ in dm.reports[split].problems] == [p for p, _ in expected.skipped]
    assert sum(len(dm.reports[s].problems) for s in SPLITS) == 1  # the one image without a mask


# ------------------------------------------------------------------------------------- the real subset
def test_real_subset_counts_and_values():
    root = shared_data("kvasir-seg")
    splits = {split: KvasirSEG(root, split, size=None) for split in ("train", "val", "test")}
    assert {s: len(d) for s, d in splits.items()} == {"train": 240, "val": 30, "test": 30}  # 300 pairs
    assert len(set().union(*(d.ids for d in splits.values()))) == 300
    data = splits["test"]
    for i in (0, 1):
        item = data[i]
        h, w = item["original_size"].tolist()
        assert max(h, w) <= 320 and item["image"].shape == (3, h, w)
        assert set(item["mask"].unique().tolist()) == {0.0, 1.0}
        # the polyp lies inside its boxes (the json is rescaled to the stored size)
        ys, xs = torch.nonzero(item["mask"][0], as_tuple=True)
        boxes = data.boxes(i, native=True)
        assert xs.min() >= boxes[:, 0].min() - 1 and xs.max() <= boxes[:, 2].max()
        assert ys.min() >= boxes[:, 1].min() - 1 and ys.max() <= boxes[:, 3].max()
    assert KvasirSEG(root / "Kvasir-SEG", "test", size=32)[0]["image"].shape == (3, 32, 32)


def test_train_runs_end_to_end_on_the_real_subset(tmp_path):
    from diffseg_lightning.train import train

    root = shared_data("kvasir-seg")
    overrides = [
        *TINY_MODEL,
        "data=kvasir",
        f"data.root={root}",
        "data.size=32",
        "data.channels=3",
        "data.num_workers=0",
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1",
    ]
    train(compose_config("train", overrides, tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["metric_per_case"] and "kvasir-seg" in summary["metric_per_case"][0]["case"]
