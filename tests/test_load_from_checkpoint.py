"""``SegmentationMethod.load_from_checkpoint``: the trained module as evaluation rebuilds it, usable with
Lightning's own loops; the class check; checkpoints written before a class was renamed still load and
evaluate.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import compose_config
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffseg_lightning.entry import build_module, load_checkpoint, module_from_checkpoint
from diffseg_lightning.evaluate import evaluate
from diffseg_lightning.exceptions import DiffSegError
from diffseg_lightning.inference import DiffusionSampler
from diffseg_lightning.methods import (
    MaskDiffusionModule,
    SegmentationMethod,
    UNetSegmentationModule,
)

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = ["trainer.accelerator=cpu", "logger=csv", "trainer.enable_model_summary=false"]


def best(run: Path) -> Path:
    return run / "checkpoints" / "best.ckpt"


def test_load_from_checkpoint_gives_the_weights_and_samples_of_evaluation(trained_run):
    """The loaded module holds exactly the (EMA) weights diffseg-eval loads and samples exactly as it does."""
    path = best(trained_run)
    checkpoint = load_checkpoint(path)
    module = MaskDiffusionModule.load_from_checkpoint(path)
    stored_sampler = OmegaConf.create(checkpoint["diffseg_config"]["sampler"])
    reference = module_from_checkpoint(checkpoint, stored_sampler)  # what diffseg-eval builds
    assert type(module) is MaskDiffusionModule and module.run_config == checkpoint["diffseg_config"]
    loaded, expected = module.state_dict(), reference.state_dict()
    assert loaded.keys() == expected.keys() == checkpoint["state_dict"].keys()
    for name, tensor in checkpoint[
        "state_dict"
    ].items():  # the EMA weights (test_entrypoints checks they are)
        assert torch.equal(loaded[name], tensor) and torch.equal(expected[name], tensor), name
    image = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    module.eval(), reference.eval()
    ids = torch.tensor([3, 5])
    with torch.inference_mode():
        out, ref = module.sample(image, ids), reference.sample(image, ids)
    assert out.keys() == ref.keys()
    for key in out:  # same weights, same per-case seeds, same float32 ops: bit-identical
        assert torch.equal(out[key], ref[key]), key
    assert module.inference_settings() == reference.inference_settings()


def test_load_from_checkpoint_takes_a_sampler_and_overrides(trained_run):
    sampler = DiffusionSampler(num_steps=1, num_samples=3, seed=7)
    module = SegmentationMethod.load_from_checkpoint(best(trained_run), sampler=sampler, spacing=[0.5, 0.5])
    assert isinstance(module, MaskDiffusionModule)  # the base class loads any method
    # the given recipe (a checkpoint that stores its reverse update in noise.sampling lends it its solver)
    assert dataclasses.replace(module.sampler, solver=None) == sampler and module.spacing == [0.5, 0.5]
    settings = module.inference_settings()
    assert settings["num_steps"] == 1 and settings["num_samples"] == 3 and settings["seed"] == 7
    config = compose_config("eval", ["sampler.num_steps=1"]).sampler
    assert SegmentationMethod.load_from_checkpoint(best(trained_run), sampler=config).sampler.num_steps == 1


def test_load_from_checkpoint_refuses_another_method(trained_run, tmp_path):
    with pytest.raises(
        DiffSegError,
        match=r"holds a MaskDiffusionModule \(diffseg_lightning\.methods\.MaskDiffusionModule\), not a "
        r"UNetSegmentationModule: load it with MaskDiffusionModule\.load_from_checkpoint",
    ):
        UNetSegmentationModule.load_from_checkpoint(best(trained_run))
    with pytest.raises(DiffSegError, match="does not exist"):
        MaskDiffusionModule.load_from_checkpoint(tmp_path / "missing.ckpt")


def test_trainer_test_runs_on_the_loaded_module(trained_run):
    """Lightning's own Trainer.test on the loaded module reproduces the run's test metrics (its summary.json,
    written by diffseg-train after testing the same best checkpoint with the same sampler)."""
    module = MaskDiffusionModule.load_from_checkpoint(best(trained_run))
    datamodule = instantiate(OmegaConf.create(module.run_config["data"]))
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.test(model=module, datamodule=datamodule)
    summary = json.loads((trained_run / "summary.json").read_text())
    results = module.results["test"]
    assert [r["case"] for r in results["metric_per_case"]] == [r["case"] for r in summary["metric_per_case"]]
    # per-case seeds make the samples independent of the batch and the process: the same Dice, up to the
    # JSON round trip of the float (exact) and NaN -> null
    for row, stored in zip(results["metric_per_case"], summary["metric_per_case"], strict=True):
        assert row["dice"] == pytest.approx(stored["dice"], abs=0, rel=0), row["case"]


# --------------------------------------------------------------------------------- renamed classes
def tiny_unet_checkpoint(tmp_path: Path, target: str) -> Path:
    """A checkpoint of an untrained tiny U-Net whose stored config names the method ``target``."""
    overrides = ["model=unet", "model.net.channels=[4,8]", "model.net.strides=[2]", "data.num_test=4", *QUIET]
    cfg = compose_config("train", overrides, tmp_path / "run")
    torch.manual_seed(0)
    module = build_module(cfg.model, cfg.noise, cfg.sampler)
    config = OmegaConf.to_container(cfg, resolve=True)
    config["model"]["_target_"] = target
    config["callbacks"]["summary"]["_target_"] = "diffseg_lightning.callbacks.SummaryWriter"  # the old name
    path = tmp_path / f"{target.rsplit('.', 1)[-1]}.ckpt"
    torch.save({"state_dict": module.state_dict(), "diffseg_config": config}, path)
    return path


def test_a_checkpoint_saved_before_the_renames_loads_and_evaluates(tmp_path):
    old = tiny_unet_checkpoint(tmp_path, "diffseg_lightning.methods.SegmentationModule")
    with pytest.warns(FutureWarning, match=r"written before a rename; mapped model\._target_="):
        checkpoint = load_checkpoint(old)
    assert (
        checkpoint["diffseg_config"]["model"]["_target_"]
        == "diffseg_lightning.methods.UNetSegmentationModule"
    )
    summary_target = checkpoint["diffseg_config"]["callbacks"]["summary"]["_target_"]
    assert summary_target == "diffseg_lightning.callbacks.SummaryJsonWriter"
    with pytest.warns(FutureWarning):
        module = UNetSegmentationModule.load_from_checkpoint(old)
    assert type(module) is UNetSegmentationModule
    for name, tensor in torch.load(old, weights_only=False)["state_dict"].items():
        assert torch.equal(module.state_dict()[name], tensor), name

    new = tiny_unet_checkpoint(tmp_path, "diffseg_lightning.methods.UNetSegmentationModule")
    summaries = {}
    for path in (old, new):
        out = tmp_path / f"eval-{path.stem}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            evaluate(compose_config("eval", [f"ckpt_path={path}", *QUIET], out))
        summaries[path] = json.loads((out / "summary.json").read_text())
    assert summaries[old]["num_cases"] == 4
    assert summaries[old]["metric_per_case"] == summaries[new]["metric_per_case"]  # one deterministic pass
