"""The shared data mechanisms: seeded / k-fold splits, the check pass (on_bad_case), the memory-mapped
cache, splits.json and diffseg-check-data."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config, run_cli
from PIL import Image
from torch.utils.data import Dataset

from diffseg_lightning.data import PairedFolder, SegmentationDataModule
from diffseg_lightning.data import folder as folder_module
from diffseg_lightning.data.cache import ArrayCache, cache_folder
from diffseg_lightning.data.splits import kfold, seeded_split, split_by_fractions, train_val_split
from diffseg_lightning.utils import DiffSegError


def write_pairs(root: Path, n: int = 8, size=(12, 16)) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / "images" / f"c{i}.png")
        mask = np.zeros(size, np.uint8)
        mask[1 : 3 + i, 2:7] = 255
        Image.fromarray(mask).save(root / "masks" / f"c{i}.png")
    return root


def module(root: Path, **kwargs) -> SegmentationDataModule:
    factory = partial(PairedFolder, root=root, split="train", fractions=(1.0, 0.0, 0.0), size=8, channels=3)
    return SegmentationDataModule(train=factory, channels=3, batch_size=2, **kwargs)


# ------------------------------------------------------------------------------------------------- splits
@pytest.mark.parametrize("count, folds", [(10, 5), (11, 3), (7, 7)])
def test_kfold_partitions_the_cases_into_near_equal_folds(count, folds):
    parts = kfold(count, folds, seed=3)
    assert sorted(i for p in parts for i in p) == list(range(count))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parts == kfold(count, folds, seed=3) and parts != kfold(count, folds, seed=4)


def test_kfold_test_folds_partition_and_train_val_test_cover_each_fold():
    tests = [seeded_split(23, (0.8, 0.2, 0.0), 0, "test", folds=4, fold=k) for k in range(4)]
    assert sorted(i for t in tests for i in t) == list(range(23))
    for k in range(4):
        train, val, test = (
            seeded_split(23, (0.8, 0.2, 0.0), 0, s, folds=4, fold=k) for s in ("train", "val", "test")
        )
        assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
        assert sorted(train + val + test) == list(range(23))
        assert len(val) == round(0.2 * (23 - len(test)))


def test_train_val_split_equals_the_fraction_split_without_folds_and_kfold_with():
    expected = split_by_fractions(17, (0.75, 0.25), seed=2)
    assert [train_val_split(17, s, 0.25, 2) for s in ("train", "val")] == expected
    vals = [train_val_split(17, "val", 0.25, 2, folds=3, fold=k) for k in range(3)]
    assert sorted(i for v in vals for i in v) == list(range(17))
    assert set(train_val_split(17, "train", 0.25, 2, folds=3, fold=1)) == set(range(17)) - set(vals[1])


@pytest.mark.parametrize("folds, fold", [(1, 0), (3, 3), (3, -1), (30, 0)])
def test_bad_fold_settings_are_value_errors(folds, fold):
    with pytest.raises(ValueError, match="data.fold"):
        seeded_split(20, (0.7, 0.1, 0.2), 0, "test", folds=folds, fold=fold)


# -------------------------------------------------------------------------------------------- check pass
def test_check_pass_names_a_corrupt_file_under_error(tmp_path):
    root = write_pairs(tmp_path)
    (root / "images" / "c3.png").write_bytes(b"not a png")
    dm = module(root)
    with pytest.raises(DiffSegError, match=r"1 bad case.*c3\.png.*on_bad_case=skip"):
        dm.setup("fit")


def test_check_pass_skips_and_counts_bad_cases_under_skip(tmp_path):
    root = write_pairs(tmp_path)
    (root / "images" / "c3.png").write_bytes(b"not a png")
    (root / "masks" / "c5.png").write_bytes(b"\x89PNG truncated")
    dm = module(root, on_bad_case="skip")
    with pytest.warns(UserWarning, match=r"left out 2 bad case\(s\) of the train split"):
        dm.setup("fit")
    cases = {Path(item["case"]).name for item in dm.datasets["train"]}
    assert cases == {f"c{i}.png" for i in (0, 1, 2, 4, 6, 7)}
    report = dm.reports["train"]
    assert report.items == 6 and len(report.problems) == 2 and report.sizes == {(12, 16): 6}


def test_check_pass_fails_on_nan_images(tmp_path):
    class WithNaN(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            image = torch.zeros(1, 4, 4)
            image[0, 0, 0] = float("nan") if i == 1 else 0.0
            return {
                "image": image,
                "mask": torch.zeros(1, 4, 4),
                "case": f"case{i}",
                "index": torch.tensor(i),
            }

    dm = SegmentationDataModule(train=WithNaN)
    with pytest.raises(DiffSegError, match="case1: image holds NaN"):
        dm.setup("fit")


# ------------------------------------------------------------------------------------------------- cache
def test_cache_returns_the_loaders_items_and_later_reads_decode_nothing(tmp_path, monkeypatch):
    root = write_pairs(tmp_path / "data")
    plain = module(root, check=False)
    plain.setup("fit")
    cached = module(root, cache_dir=str(tmp_path / "cache"))
    cached.setup("fit")
    assert isinstance(cached.datasets["train"], ArrayCache)
    assert len(cached.datasets["train"]) == len(plain.datasets["train"]) == 8
    for a, b in zip(plain.datasets["train"], cached.datasets["train"], strict=True):
        assert a.keys() == b.keys() and a["case"] == b["case"]
        for key in ("image", "mask", "index"):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key])

    def no_decoding(path):
        raise AssertionError(f"decoded {path} although the cache holds it")

    monkeypatch.setattr(folder_module, "read_image", no_decoding)
    again = module(root, cache_dir=str(tmp_path / "cache"))
    again.setup("fit")  # a cache hit: neither the check pass nor the loader reads a file
    batch = next(iter(again.train_dataloader()))
    assert batch["image"].shape == (2, 3, 8, 8)
    for field in ("cases", "sizes", "annotators", "problems"):
        assert getattr(again.reports["train"], field) == getattr(cached.reports["train"], field), field
    assert again.reports["train"].annotators == {1: 8}


def test_cache_pickles_as_its_folder_not_its_arrays(tmp_path):
    import pickle

    root = write_pairs(tmp_path / "data")
    dm = module(root, cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    cache = dm.datasets["train"]
    payload = pickle.dumps(cache)
    assert len(payload) < 2_000 < cache.arrays["image"].nbytes
    copy = pickle.loads(payload)
    assert torch.equal(copy[3]["image"], cache[3]["image"]) and copy.report.cases == cache.report.cases


def test_cache_key_changes_with_settings_and_files(tmp_path):
    root = write_pairs(tmp_path / "data")
    base = partial(PairedFolder, root=root, split="train", size=8)
    folder = cache_folder(tmp_path, "train", base)
    assert folder == cache_folder(tmp_path, "train", partial(PairedFolder, root=root, split="train", size=8))
    assert folder != cache_folder(tmp_path, "train", partial(PairedFolder, root=root, split="train", size=16))
    assert folder != cache_folder(tmp_path, "val", base)
    mask = root / "masks" / "c2.png"
    Image.fromarray(np.full((12, 16), 255, np.uint8)).save(mask)  # the data changed on disk
    assert folder != cache_folder(tmp_path, "train", base)


def test_cache_key_covers_every_path_argument_symlinked_folders_and_the_loader_code(tmp_path, monkeypatch):
    from diffseg_lightning.data import cache as cache_module

    root = write_pairs(tmp_path / "data")
    splits = tmp_path / "elsewhere" / "splits.json"
    splits.parent.mkdir()
    splits.write_text("[1]")
    keyed = partial(PairedFolder, root=root, split="train", splits_file=str(splits))
    before = cache_folder(tmp_path, "train", keyed)
    splits.write_text("[2, 3]")  # a file outside root that an argument names
    assert cache_folder(tmp_path, "train", keyed) != before

    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "images").symlink_to(root / "images")
    by_link = partial(PairedFolder, root=linked, split="train")
    before = cache_folder(tmp_path, "train", by_link)
    Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(root / "images" / "c0.png")
    after = cache_folder(tmp_path, "train", by_link)
    assert after != before

    monkeypatch.setattr(cache_module, "source_digest", lambda func: "another loader version")
    assert cache_folder(tmp_path, "train", by_link) != after


def test_cache_refuses_items_of_different_shapes(tmp_path):
    root = write_pairs(tmp_path / "data", n=2)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "images" / "c1.png")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(root / "masks" / "c1.png")
    factory = partial(
        PairedFolder, root=root, split="train", fractions=(1.0, 0.0, 0.0), size=None, channels=3
    )
    dm = SegmentationDataModule(train=factory, channels=3, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DiffSegError, match="set data.size"):
        dm.setup("fit")


def test_cache_refuses_datasets_with_random_reads(tmp_path):
    class RandomCrops(Dataset):
        deterministic_items = False

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return {"image": torch.rand(1, 4, 4), "case": "a", "index": torch.tensor(i)}

    dm = SegmentationDataModule(train=partial(RandomCrops), cache_dir=str(tmp_path))
    with pytest.raises(DiffSegError, match="caching would freeze"):
        dm.setup("fit")
    unkeyed = SegmentationDataModule(train=RandomCrops, cache_dir=str(tmp_path))  # no readable settings
    with pytest.raises(DiffSegError, match="needs each split given as a loader with its arguments"):
        unkeyed.setup("fit")


# ---------------------------------------------------------------------------------- splits.json and CLI
def test_training_writes_the_splits_of_its_run(tmp_path):
    from diffseg_lightning.train import train

    root = write_pairs(tmp_path / "data", n=10)
    overrides = [
        "data=folder", f"data.root={root}", "data.size=16", "data.num_workers=0", "data.batch_size=4",
        "model.denoiser.base_channels=8", "model.denoiser.channel_mults=[1]", "model.denoiser.attention_levels=[false]",
        "sampler.num_steps=1", "sampler.num_samples=1", "+trainer.max_steps=1", "trainer.accelerator=cpu",
        "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1", "trainer.enable_model_summary=false",
        "logger=csv", "~callbacks.progress_bar",
    ]  # fmt: skip
    train(compose_config("train", overrides, tmp_path / "run"))
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert set(splits) == {"train", "val", "test"}
    cases = {s: {Path(c).name for c in splits[s]["cases"]} for s in splits}
    assert sum(len(c) for c in cases.values()) == 10 and len(set().union(*cases.values())) == 10
    expected = [[f"c{i}.png" for i in idx] for idx in split_by_fractions(10, (0.7, 0.15, 0.15), 0)]
    assert [sorted(cases[s]) for s in ("train", "val", "test")] == [sorted(e) for e in expected]
    assert splits["train"]["settings"]["fractions"] == [0.7, 0.15, 0.15]


def test_check_data_cli_reports_problems_and_exits_1(tmp_path):
    root = write_pairs(tmp_path / "data", n=10)
    (root / "masks" / "c4.png").write_bytes(b"broken")
    result = run_cli(
        "diffseg-check-data",
        "data=folder",
        f"data.root={root}",
        f"hydra.run.dir={tmp_path / 'out'}",
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr
    assert "c4.png" in result.stdout and "1 problem(s)" in result.stdout
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert sum(r["items"] for r in report.values()) == 9
    assert [p["where"] for r in report.values() for p in r["problems"]] == [str(root / "masks" / "c4.png")]


def test_check_data_passes_on_clean_data(tmp_path):
    from diffseg_lightning.check_data import check_data

    root = write_pairs(tmp_path / "data", n=10)
    cfg = compose_config("check_data", ["data=folder", f"data.root={root}", "data.size=8"], tmp_path / "out")
    assert check_data(cfg) == 0
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    sizes = [len(part) for part in split_by_fractions(10, (0.7, 0.15, 0.15), 0)]
    assert [report[s]["items"] for s in ("train", "val", "test")] == sizes
    assert report["train"]["sizes"] == {"12x16": 7} and report["train"]["annotators"] == {"1": 7}


REAL_SUBSETS = {  # data option -> (folder under ../shared/data, extra overrides, items per split from its README)
    "kvasir": ("kvasir-seg", [], {"train": 240, "val": 30, "test": 30}),
    "glas": ("glas", [], {"train": 13, "val": 3, "test": 10}),
    "drive": ("drive", [], {"train": 6, "val": 2, "test": 6}),
    "monuseg": ("monuseg", ["splits=[test]"], {"test": 2}),  # the subset holds only MoNuSegTestData
    "qubiq": ("qubiq/kidney", [], {"train": 14, "val": 2, "test": 4}),
}


@pytest.mark.parametrize("name", sorted(REAL_SUBSETS))
def test_check_data_passes_on_every_real_subset(name, tmp_path):
    from conftest import shared_data

    from diffseg_lightning.check_data import check_data

    folder, extra, items = REAL_SUBSETS[name]
    root = shared_data(folder)
    cfg = compose_config("check_data", [f"data={name}", f"data.root={root}", *extra], tmp_path / "out")
    assert check_data(cfg) == 0
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert {split: r["items"] for split, r in report.items()} == items
    assert all(not r["problems"] for r in report.values())


def test_label_values_are_recorded_by_the_check_pass_only(tmp_path):
    root = write_pairs(tmp_path)
    dm = module(root)
    dm.setup("fit")
    dataset = dm.datasets["train"]
    assert dm.reports["train"].labels == [0, 255] and dataset.seen_labels == {0, 255}
    assert dataset.recording is False  # training reads skip the np.unique
    dataset.seen_labels.clear()
    dataset[0]
    assert dataset.seen_labels == set()
