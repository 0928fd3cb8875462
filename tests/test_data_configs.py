"""The data configs compose as they did before their split blocks were factored (YAML merge keys: ``val`` and
``test`` repeat ``train``'s loader with ``<<: *loader`` and set only what differs).

``fixtures/data_configs_pre_redesign.json`` holds ``cfg.data`` (unresolved) of ``diffseg-train data=<name>``
for every data config and of ``diffseg-train experiment=<name>`` for every experiment, composed from commit
868561c (before the redesign). When a data config changes on purpose, recompose the changed entries with
``OmegaConf.to_container(compose_config("train", [case]).data)`` and write them into the fixture.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from diffseg_lightning.utils.compose import compose_config

FIXTURE = Path(__file__).parent / "fixtures" / "data_configs_pre_redesign.json"
BEFORE = json.loads(FIXTURE.read_text())


def targets(node) -> list[str]:
    """Every ``_target_`` in a plain config tree."""
    if isinstance(node, dict):
        own = [node["_target_"]] if "_target_" in node else []
        return own + [t for value in node.values() for t in targets(value)]
    if isinstance(node, list):
        return [t for value in node for t in targets(value)]
    return []


@pytest.mark.parametrize("case", sorted(BEFORE))
def test_data_config_composes_as_before_the_split_blocks_were_factored(case):
    now = OmegaConf.to_container(compose_config("train", [case]).data, resolve=False)
    assert now == BEFORE[case]
    # the key order too (the saved config.yaml, and each loader's keyword order, read as before)
    assert json.dumps(now) == json.dumps(BEFORE[case])


def test_the_fixture_covers_every_data_config_and_its_split_loaders():
    from diffseg_lightning.utils import CONFIG_DIR

    names = {p.stem for p in (Path(CONFIG_DIR) / "data").glob("*.yaml")}
    assert {case.removeprefix("data=") for case in BEFORE if case.startswith("data=")} == names
    for name in names:
        assert {"train", "val", "test"} <= BEFORE[f"data={name}"].keys(), name


def test_every_dataset_target_of_the_old_configs_still_imports():
    """Old checkpoints store ``_target_: diffseg_lightning.data.<module>.<Class>`` in their config."""
    found = {t for data in BEFORE.values() for t in targets(data)}
    assert "diffseg_lightning.data.drive.DRIVE" in found and "diffseg_lightning.data.PairedFolder" in found
    for target in sorted(found):
        assert isinstance(get_class(target), type), target


def test_a_merged_split_takes_its_own_overrides_and_the_shared_ones():
    cfg = compose_config(
        "train",
        [
            "data=drive",
            "data.root=/nowhere",
            "data.size=32",
            "data.val.size=16",
            "data.test.second_observer=false",
        ],
    ).data
    assert cfg.val.size == 16 and cfg.val.split == "val"
    assert cfg.train.size == cfg.test.size == 32  # ${data.size}: the override of val stays in val
    assert (
        cfg.test.second_observer is False
        and "second_observer" not in cfg.train
        and "second_observer" not in cfg.val
    )
    assert [cfg[s].split for s in ("train", "val", "test")] == ["train", "val", "test"]


def test_train_val_and_test_loaders_of_a_factored_config_instantiate(tmp_path):
    cfg = compose_config(
        "train",
        [
            "data=synthetic",
            "data.size=16",
            "data.num_train=5",
            "data.num_val=3",
            "data.test.num_cases=4",
            "seed=1",
        ],
    )
    dm = instantiate(cfg.data)
    dm.setup("fit")
    dm.setup("test")
    assert {split: len(dm.datasets[split]) for split in ("train", "val", "test")} == {
        "train": 5,
        "val": 3,
        "test": 4,
    }
    assert dm.datasets["val"].split == "val" and dm.datasets["test"].split == "test"
    assert tuple(dm.datasets["test"][0]["image"].shape) == (1, 16, 16)
