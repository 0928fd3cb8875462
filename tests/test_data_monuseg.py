"""MoNuSeg loader: XML polygons to instance maps, a tiny replica of the official layout, the real test images."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config, shared_data
from hydra.utils import instantiate
from PIL import Image

from diffseg_lightning.data import SegmentationDataModule
from diffseg_lightning.data.monuseg import MoNuSeg, parse_regions, rasterize_instances
from diffseg_lightning.utils.errors import DiffSegError

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (40, 50)  # (H, W)
# (x, y) vertices on half-pixel boundaries, so the covered pixel centres are unambiguous:
SQUARE = [(9.5, 9.5), (19.5, 9.5), (19.5, 19.5), (9.5, 19.5)]  # rows 10..19, cols 10..19: 100 px
WIDE = [(29.5, 20.5), (44.5, 20.5), (44.5, 25.5), (29.5, 25.5)]  # rows 21..25, cols 30..44: 5 x 15 px
OVERLAP = [(14.5, 14.5), (24.5, 14.5), (24.5, 24.5), (14.5, 24.5)]  # rows/cols 15..24, over SQUARE's corner


def region_xml(regions, microns: str | None = "0.252700") -> str:
    """Aperio ImageScope XML as MoNuSeg ships it (attribute headers, Attributes, Plots included)."""
    body = []
    for k, vertices in enumerate(regions, start=1):
        points = "\n".join(f'\t\t\t\t\t\t<Vertex X="{x:.6f}" Y="{y:.6f}"/>' for x, y in vertices)
        body.append(
            f'\t\t\t<Region Id="{k}" Type="0" Zoom="1" Selected="0" Length="40.0" Area="100.0" Text="">\n'
            f"\t\t\t\t<Attributes/>\n\t\t\t\t<Vertices>\n{points}\n\t\t\t\t</Vertices>\n\t\t\t</Region>"
        )
    head = f'<Annotations MicronsPerPixel="{microns}">' if microns else "<Annotations>"
    return (
        f'{head}\n\t<Annotation Id="1" Name="" Type="4" LineColor="65280" Visible="1">\n\t\t<Attributes/>\n'
        '\t\t<Regions>\n\t\t\t<RegionAttributeHeaders>\n\t\t\t\t<AttributeHeader Id="9999" Name="Region"/>\n'
        "\t\t\t</RegionAttributeHeaders>\n" + "\n".join(body) + "\n\t\t</Regions>\n\t\t<Plots/>\n"
        "\t</Annotation>\n</Annotations>\n"
    )


def write_pair(image_path: Path, xml_path: Path, regions, seed: int = 0, shape=SHAPE) -> None:
    image_path.parent.mkdir(parents=True, exist_ok=True)
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*shape, 3), dtype=np.uint8)).save(image_path)  # TIFF by suffix
    xml_path.write_text(region_xml(regions))


def write_monuseg(root: Path, train: int = 10, test: int = 2, regions=(SQUARE, WIDE)) -> None:
    for i in range(train):
        name = f"TCGA-{i:02d}-TRAIN-01Z-00-DX1"
        write_pair(root / "Tissue Images" / f"{name}.tif", root / "Annotations" / f"{name}.xml", regions, i)
    for i in range(test):
        name = f"TCGA-{i:02d}-TEST-01Z-00-DX1"
        write_pair(
            root / "MoNuSegTestData" / f"{name}.tif", root / "MoNuSegTestData" / f"{name}.xml", regions, i
        )


def expected_instances() -> np.ndarray:
    """SQUARE and WIDE drawn by slicing, independently of any polygon filling."""
    out = np.zeros(SHAPE, np.int64)
    out[10:20, 10:20] = 1
    out[21:26, 30:45] = 2
    return out


def test_polygons_fill_pixel_centres_with_x_as_column(tmp_path):
    write_pair(tmp_path / "a.tif", tmp_path / "a.xml", [SQUARE, WIDE])
    polygons, microns = parse_regions(tmp_path / "a.xml")
    assert len(polygons) == 2 and microns == pytest.approx(0.2527)
    instances = rasterize_instances(polygons, SHAPE)
    assert (instances == 1).sum() == 100 and (instances == 2).sum() == 75
    assert np.array_equal(instances, expected_instances())


def test_overlapping_nuclei_later_region_wins():
    instances = rasterize_instances([np.array(SQUARE), np.array(OVERLAP)], SHAPE)
    assert (instances[15:20, 15:20] == 2).all()  # the 5 x 5 overlap
    assert (instances == 1).sum() == 100 - 25 and (instances == 2).sum() == 100


def test_items_through_the_datamodule(tmp_path):
    write_monuseg(tmp_path, train=6)
    factories = {
        s: partial(MoNuSeg, tmp_path, s, size=None, val_fraction=0.5) for s in ("train", "val", "test")
    }
    dm = SegmentationDataModule(**factories, channels=3, batch_size=2, eval_batch_size=2)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (2, 3, *SHAPE) and batch["image"].dtype == torch.float32
    assert batch["instances"].shape == (2, *SHAPE) and batch["instances"].dtype == torch.int64
    assert batch["mask"].shape == (2, 1, *SHAPE) and batch["mask"].dtype == torch.float32
    for i in range(2):
        assert np.array_equal(batch["instances"][i].numpy(), expected_instances())
        assert torch.equal(batch["mask"][i, 0], (batch["instances"][i] > 0).float())
    assert torch.allclose(batch["spacing"], torch.full((2, 2), 0.2527))
    assert all("MoNuSegTestData" in case and case.endswith(".tif") for case in batch["case"])


def test_resize_keeps_instance_ids(tmp_path):
    write_monuseg(tmp_path, train=1, test=1, regions=(SQUARE, WIDE, [(1.5, 30.5), (8.5, 30.5), (8.5, 38.5)]))
    item = MoNuSeg(tmp_path, "test", size=(20, 25))[0]
    assert item["instances"].shape == (20, 25) and item["instances"].dtype == torch.int64
    assert set(item["instances"].unique().tolist()) == {0, 1, 2, 3}
    assert torch.equal(item["mask"][0], (item["instances"] > 0).float())
    assert item["image"].shape == (3, 20, 25)
    assert torch.allclose(item["spacing"], torch.tensor([0.2527 * 2, 0.2527 * 2]))


def test_splits_are_seeded_partitions(tmp_path):
    write_monuseg(tmp_path, train=10, test=3)

    def names(split, seed=0):
        return [p.name for p, _ in MoNuSeg(tmp_path, split, seed=seed).pairs]

    train, val = names("train"), names("val")
    assert (len(train), len(val)) == (8, 2) and len(set(train + val)) == 10
    assert (train, val) == (names("train"), names("val"))
    assert any(names("val", seed=s) != val for s in (1, 2, 3))
    assert len(names("test")) == 3 and all("TEST" in n for n in names("test"))
    assert names("test") == [p.name for p, _ in MoNuSeg(tmp_path / "MoNuSegTestData", "test").pairs]


def test_tiles_cover_the_image_and_random_crops_stay_inside(tmp_path):
    write_monuseg(tmp_path, train=1, test=1)
    whole = MoNuSeg(tmp_path, "test", size=None)[0]
    tiles = MoNuSeg(tmp_path, "test", size=None, crop="tile", crop_size=16)
    origins = [tuple(tiles[i]["origin"].tolist()) for i in range(len(tiles))]
    assert origins == [(t, left) for t in (0, 16, 24) for left in (0, 16, 32, 34)]
    assert whole["original_size"].tolist() == list(SHAPE) and tiles[5]["original_size"].tolist() == [16, 16]
    assert MoNuSeg(tmp_path, "test", size=8)[0]["original_size"].tolist() == list(SHAPE)
    for i, (t, left) in enumerate(origins):
        assert torch.equal(tiles[i]["instances"], whole["instances"][t : t + 16, left : left + 16])
        assert torch.equal(tiles[i]["image"], whole["image"][:, t : t + 16, left : left + 16])
    torch.manual_seed(0)
    crops = MoNuSeg(tmp_path, "train", size=None, crop="random", crop_size=(16, 20), val_fraction=0.0)
    for _ in range(5):
        item = crops[0]
        t, left = item["origin"].tolist()
        assert 0 <= t <= SHAPE[0] - 16 and 0 <= left <= SHAPE[1] - 20
        assert torch.equal(item["instances"], whole["instances"][t : t + 16, left : left + 20])
    with pytest.raises(DiffSegError, match=r"smaller than data\.crop_size \(64, 64\)"):
        MoNuSeg(tmp_path, "test", crop="tile", crop_size=64)


def test_bad_annotations_name_the_file(tmp_path):
    write_monuseg(tmp_path, train=3, test=0)
    annotations = tmp_path / "Annotations"
    first = sorted(annotations.iterdir())[0]
    load = partial(MoNuSeg, tmp_path, "train", val_fraction=0.0, size=None)

    first.write_text(region_xml([SQUARE])[:-40])  # truncated
    data = load()
    with pytest.raises(DiffSegError, match=rf"{first.name}: not a readable MoNuSeg XML annotation"):
        data[0]
    first.write_text("<Annotations><Annotation Id='1'/></Annotations>")
    with pytest.raises(DiffSegError, match=rf"{first.name}: expected the MoNuSeg XML layout"):
        load()[0]
    first.write_text(region_xml([SQUARE]).replace('X="9.500000"', 'X="left"', 1))
    with pytest.raises(DiffSegError, match=rf"{first.name}: Region Id='1' has a Vertex without a numeric X"):
        load()[0]
    first.write_text(region_xml([SQUARE[:2]]))
    with pytest.raises(DiffSegError, match=rf"{first.name}: Region Id='1' has 2 finite vertices"):
        load()[0]
    first.unlink()
    with pytest.raises(DiffSegError, match=rf"TRAIN-01Z-00-DX1\.tif: no annotation .*{first.name}"):
        load()


def test_bad_options_and_layouts(tmp_path):
    with pytest.raises(DiffSegError, match="does not exist"):
        MoNuSeg(tmp_path / "nowhere", "test")
    with pytest.raises(DiffSegError, match="Tissue Images: no MoNuSeg training folder"):
        MoNuSeg(tmp_path, "train")
    with pytest.raises(DiffSegError, match="MoNuSegTestData: no MoNuSeg test folder"):
        MoNuSeg(tmp_path, "test")
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'val', 'test'\), got 'valid'"):
        MoNuSeg(tmp_path, "valid")
    with pytest.raises(ValueError, match=r"crop must be one of \('none', 'random', 'tile'\)"):
        MoNuSeg(tmp_path, "test", crop="centre")
    write_monuseg(tmp_path, train=1, test=1)
    data = MoNuSeg(tmp_path, "test", channels=1)
    with pytest.raises(
        DiffSegError, match=r"TEST-01Z-00-DX1\.tif: image has 3 channel\(s\) but the config expects 1"
    ):
        data[0]


def test_skip_leaves_out_images_without_xml_or_too_small_for_the_crop(tmp_path):
    write_monuseg(tmp_path, train=10, test=2)

    def stems(data):
        return [p.stem for p, _ in data.pairs]

    before = {s: stems(MoNuSeg(tmp_path, s)) for s in ("train", "val")}
    victim = before["val"][0]
    xml = tmp_path / "Annotations" / f"{victim}.xml"
    xml.unlink()
    with pytest.raises(DiffSegError, match=rf"{victim}\.tif: no annotation"):
        MoNuSeg(tmp_path, "train")  # "error": found whatever split the image is in
    val = MoNuSeg(tmp_path, "val", on_bad_case="skip")
    reason = f"no annotation {xml} (MoNuSeg pairs <id>.tif with <id>.xml)"
    assert val.skipped == [(str(tmp_path / "Tissue Images" / f"{victim}.tif"), reason)]
    assert stems(val) == before["val"][1:] and len(val[0]["case"]) > 0
    train = MoNuSeg(tmp_path, "train", on_bad_case="skip")
    assert train.skipped == [] and stems(train) == before["train"]  # the other cases keep their split

    small = tmp_path / "MoNuSegTestData" / "TCGA-09-SMALL-01Z-00-DX1"
    write_pair(small.with_suffix(".tif"), small.with_suffix(".xml"), [SQUARE], shape=(20, 50))
    with pytest.raises(DiffSegError, match=r"SMALL-01Z-00-DX1\.tif: image of size \(20, 50\) is smaller"):
        MoNuSeg(tmp_path, "test", crop="tile", crop_size=32)
    tiles = MoNuSeg(tmp_path, "test", size=None, crop="tile", crop_size=32, on_bad_case="skip")
    assert [Path(p).name for p, _ in tiles.skipped] == ["TCGA-09-SMALL-01Z-00-DX1.tif"]
    assert len(tiles.pairs) == 2 and len(tiles) == 2 * 2 * 2  # 40 x 50: 2 x 2 tiles of 32 each
    assert {tiles[i]["case"] for i in range(len(tiles))} == {str(p) for p, _ in tiles.pairs}


def test_two_images_of_one_stem_are_a_bad_case_naming_both(tmp_path):
    write_monuseg(tmp_path, train=6, test=1)
    name = "TCGA-03-TRAIN-01Z-00-DX1"
    Image.open(tmp_path / "Tissue Images" / f"{name}.tif").save(tmp_path / "Tissue Images" / f"{name}.png")
    with pytest.raises(DiffSegError, match=rf"{name}\.png: {name}\.tif has the same stem: both would pair"):
        MoNuSeg(tmp_path, "train")
    kept = [MoNuSeg(tmp_path, s, on_bad_case="skip") for s in ("train", "val")]
    assert sorted(Path(p).name for k in kept for p, _ in k.skipped) == [f"{name}.png", f"{name}.tif"]
    assert all(p.stem != name for k in kept for p, _ in k.pairs)


def test_kfold_over_the_training_images(tmp_path):
    write_monuseg(tmp_path, train=10, test=2)

    def stems(split, **kwargs):
        return [p.stem for p, _ in MoNuSeg(tmp_path, split, **kwargs).pairs]

    everything = sorted(stems("train", val_fraction=0.0))
    vals = []
    for fold in range(5):
        train, val = stems("train", folds=5, fold=fold), stems("val", folds=5, fold=fold)
        assert (len(train), len(val)) == (8, 2) and sorted(train + val) == everything
        assert stems("val", folds=5, fold=fold) == val  # deterministic
        vals += val
    assert sorted(vals) == everything  # the validation folds partition the training images
    assert stems("test", folds=5, fold=1) == stems("test")  # official


def test_random_crops_are_not_deterministic_items(tmp_path):
    write_monuseg(tmp_path, train=2, test=1)
    assert MoNuSeg(tmp_path, "test").deterministic_items
    assert MoNuSeg(tmp_path, "test", crop="tile", crop_size=16).deterministic_items
    assert not MoNuSeg(tmp_path, "train", crop="random", crop_size=16).deterministic_items


def test_seen_labels_are_the_rasterised_ids(tmp_path):
    write_monuseg(tmp_path, train=1, test=1)
    data = MoNuSeg(tmp_path, "test", size=8)  # small output: ids can vanish from the item, not the record
    data[0]
    assert data.seen_labels == {0, 1, 2}


def test_config_passes_folds_and_the_bad_case_policy(tmp_path):
    write_monuseg(tmp_path, train=6, test=2)
    overrides = ["data=monuseg", f"data.root={tmp_path}", "data.num_workers=0", "data.size=16"]
    overrides += ["data.folds=3", "data.fold=2", "data.on_bad_case=skip", "data.batch_size=2"]
    dm = instantiate(compose_config("train", overrides, tmp_path / "run").data)
    dm.setup("fit")
    expected = MoNuSeg(tmp_path, "val", folds=3, fold=2)
    assert dm.datasets["val"].pairs == expected.pairs and len(dm.datasets["train"]) == 4
    assert dm.datasets["train"].on_bad_case == "skip"
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 16, 16) and batch["instances"].shape == (2, 16, 16)


# -- the real subset ---------------------------------------------------------------------------------


def test_real_monuseg_test_images():
    root = shared_data("monuseg")
    data = MoNuSeg(root, "test", size=None)
    assert len(data) == 2 and all(p.suffix == ".tif" for p, _ in data.pairs)
    for image_path, _ in data.pairs:
        with Image.open(image_path) as img:
            assert img.size == (1000, 1000) and img.mode == "RGB"
    polygons, microns = parse_regions(data.pairs[1][1])
    assert len(polygons) > 100 and 0.2 < microns < 0.3
    item = data[0]  # one full read: TIFF decode, XML parse, rasterisation
    assert item["image"].shape == (3, 1000, 1000) and item["instances"].shape == (1000, 1000)
    assert item["instances"].unique().numel() - 1 > 100
    assert 0.05 < item["mask"].mean() < 0.6
