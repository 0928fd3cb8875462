"""Train, eval and predict end to end on tiny settings; run directories and summary.json."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from conftest import TINY, compose_config
from PIL import Image

from diffseg_lightning.evaluate import evaluate
from diffseg_lightning.predict import predict

SUMMARY_KEYS = {"metric_per_case", "mean", "sampler", "seconds_per_image"}


def test_train_run_directory_holds_everything(trained_run):
    assert (trained_run / "config.yaml").is_file()
    assert (trained_run / "checkpoints" / "best.ckpt").is_file()
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    assert (trained_run / "csv" / "metrics.csv").is_file()
    assert list((trained_run / "panels").glob("*.png"))
    summary = json.loads((trained_run / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys()
    rows = summary["metric_per_case"]
    assert [r["case"] for r in rows] == [f"synthetic-test-{i:05d}" for i in range(8)]
    assert {"case", "dice", "iou", "hd95"} <= rows[0].keys()
    dice = [r["dice"] for r in rows if r["dice"] is not None]
    assert summary["mean"]["dice"] == pytest.approx(float(np.mean(dice)))
    assert summary["sampler"]["num_samples"] == 2 and summary["sampler"]["num_steps"] == 2
    assert summary["seconds_per_image"] > 0
    network = summary["network"]  # the denoiser's size and cost per pass, measured at the data's size
    assert network["image_size"] == [32, 32] and network["parameters"] > 0 and network["macs_per_pass"] > 0


def test_checkpoint_stores_config_and_ema_weights(trained_run):
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["diffseg_config"]["model"]["denoiser"]["base_channels"] == 8
    assert "current_model_state" in ckpt and "averaging_state" in ckpt and "rng_states" in ckpt
    ema, current = ckpt["state_dict"], ckpt["current_model_state"]
    differs = [k for k in ema if k.startswith("denoiser") and not torch.equal(ema[k], current[k])]
    assert differs, "the checkpoint's state_dict should hold the EMA weights, not the raw ones"


def test_eval_reproduces_the_test_metrics(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    overrides = [
        f"ckpt_path={ckpt}",
        "sampler.num_steps=2",
        "sampler.num_samples=2",
        "trainer.accelerator=cpu",
        "logger=csv",
        "trainer.enable_model_summary=false",
    ]
    results = evaluate(compose_config("eval", overrides, tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    trained = json.loads((trained_run / "summary.json").read_text())
    assert summary["num_cases"] == 8 and results["num_cases"] == 8
    for a, b in zip(summary["metric_per_case"], trained["metric_per_case"], strict=True):
        assert a["case"] == b["case"]
        assert (a["dice"] is None and b["dice"] is None) or math.isclose(a["dice"], b["dice"], abs_tol=1e-6)


def test_eval_on_the_validation_split(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    evaluate(
        compose_config(
            "eval",
            [
                f"ckpt_path={ckpt}",
                "split=val",
                "sampler.num_steps=1",
                "logger=none",
                "trainer.accelerator=cpu",
            ],
            tmp_path,
        )
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["split"] == "val" and summary["metric_per_case"][0]["case"].startswith("synthetic-val-")


def resample_overrides(trained_run) -> list[str]:
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    return [f"ckpt_path={ckpt}", "sampler.num_steps=3", "sampler.num_samples=2", "logger=none", "trainer.accelerator=cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def ddim_summary(trained_run, tmp_path_factory) -> dict:
    """summary.json of an evaluation with the trained (DDIM) update, shared by the other updates' tests."""
    out = tmp_path_factory.mktemp("ddim")
    evaluate(compose_config("eval", resample_overrides(trained_run), out))
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("update", ["ddpm", "dpmpp_2m"])
def test_eval_resamples_the_trained_kernel_with_another_update(trained_run, ddim_summary, tmp_path, update):
    """sampler=<solver> at eval changes only the reverse update: the trained kernel's T, schedule and
    objective are kept, and summary.json says which update ran."""
    evaluate(compose_config("eval", [*resample_overrides(trained_run), f"sampler={update}"], tmp_path))
    other, ddim = json.loads((tmp_path / "summary.json").read_text()), ddim_summary
    assert other["sampler"]["update"] == update and ddim["sampler"]["update"] == "ddim"
    probs = [[r["mean_std"] for r in s["metric_per_case"]] for s in (other, ddim)]
    assert probs[0] != probs[1], "a different reverse update must give different samples"


def test_eval_refuses_to_change_what_the_network_was_trained_on(trained_run, tmp_path):
    from diffseg_lightning.utils import DiffSegError

    ckpt = trained_run / "checkpoints" / "best.ckpt"
    for override in ("+noise.objective=epsilon", "+noise.num_train_timesteps=100"):
        with pytest.raises(DiffSegError, match="cannot change at inference"):
            evaluate(compose_config("eval", [f"ckpt_path={ckpt}", override, "logger=none"], tmp_path))


def test_predict_writes_masks_and_uncertainty(trained_run, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, size in [("a", (40, 40)), ("b", (32, 48))]:
        Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(images / f"{name}.png")
    out = tmp_path / "pred"
    predict(
        compose_config(
            "predict",
            [
                f"ckpt_path={trained_run / 'checkpoints' / 'best.ckpt'}",
                f"input_dir={images}",
                f"output_dir={out}",
                "sampler.num_steps=2",
                "trainer.accelerator=cpu",
            ],
            tmp_path,
        )
    )
    for name, size in [("a", (40, 40)), ("b", (32, 48))]:
        mask = np.asarray(Image.open(out / f"{name}_mask.png"))
        unc = np.asarray(Image.open(out / f"{name}_uncertainty.png"))
        prob = np.asarray(Image.open(out / f"{name}_prob.png"))
        assert mask.shape == size and unc.shape == size and prob.shape == size
        assert set(np.unique(mask)) <= {0, 255}
        decided = prob != 128  # p = 0.5 exactly stores as 128 but is not above the 0.5 threshold
        assert np.array_equal(
            (mask == 255)[decided], (prob > 127)[decided]
        )  # the mask is the thresholded fused probability


def config_leaves(node, prefix: str = "") -> dict:
    """Every leaf of a resolved config container, by its dotted key."""
    if not isinstance(node, dict):
        return {prefix: node}
    return {
        k: v
        for key, child in node.items()
        for k, v in config_leaves(child, f"{prefix}.{key}" if prefix else str(key)).items()
    }


def test_tiny_settings_are_the_real_pipeline(tmp_path):
    """The tests' TINY run builds every component of the default run (same ``_target_`` everywhere) and
    changes only sizes and counts (plus a CPU trainer, a CSV logger and no progress bar)."""
    from omegaconf import OmegaConf

    def leaves(overrides: list[str]) -> dict:
        cfg = OmegaConf.to_container(compose_config("train", overrides, tmp_path), resolve=True)
        swapped = ("logger.", "callbacks.progress_bar.")  # TINY's CSV logger, and no progress bar
        return {k: v for k, v in config_leaves(cfg).items() if not k.startswith(swapped)}

    default, tiny = leaves([]), leaves(TINY)
    assert default.keys() == tiny.keys()
    targets = {k: v for k, v in default.items() if k.endswith("_target_")}
    assert len(targets) > 5 and targets == {k: tiny[k] for k in targets}
    changed = {k for k in default if default[k] != tiny[k]}
    assert {"model.denoiser.base_channels", "sampler.num_steps", "data.num_train"} <= changed
    modes = {"trainer.accelerator", "trainer.enable_model_summary"}  # cpu, and no summary
    # every other change is a size or a count (not a rate, a mode or a component)
    size_like = re.compile(r"(size|num_\w+|channels|channel_mults|attention_levels|max_epochs)$")
    odd = {k: (default[k], tiny[k]) for k in changed - modes if not size_like.search(k.rsplit(".", 1)[-1])}
    assert not odd, odd


def test_wandb_logs_offline_without_a_key(tmp_path, monkeypatch):
    from diffseg_lightning.train import train

    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, so no key
    monkeypatch.setenv("WANDB_SILENT", "true")
    overrides = [o for o in TINY if o != "logger=csv"] + ["logger=wandb", "test=false"]
    train(compose_config("train", overrides, tmp_path / "run"))
    (offline,) = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert list(offline.glob("*.wandb")), "the offline run holds no history file"
    assert list((offline / "files" / "media" / "images").glob("**/*.png")), "no validation panel was logged"


@pytest.mark.parametrize(
    ("model", "takes_kernel", "takes_sampler"),
    [
        ("unet", False, True),
        ("gland_unet", False, True),  # its __init__ forwards **kwargs to the U-Net's: followed up the MRO
        ("gradcam", False, True),
        ("hovernet", False, True),
        ("image_ddpm", True, False),
        ("medsegdiff", True, True),
        ("dkm", True, True),
    ],
)
def test_build_module_passes_a_kernel_and_a_sampler_only_to_a_method_that_takes_them(
    model, takes_kernel, takes_sampler
):
    from hydra.utils import get_class

    from diffseg_lightning.entry import accepted_parameters

    accepted = accepted_parameters(get_class(compose_config("train", [f"model={model}"]).model._target_))
    assert ("kernel" in accepted, "sampler" in accepted) == (takes_kernel, takes_sampler)


def test_the_image_ddpm_builds_without_its_sampler_group(tmp_path):
    """A group the method does not take is not even built: a sampler target that does not exist is fine."""
    from omegaconf import OmegaConf

    from diffseg_lightning.entry import build_module

    cfg = compose_config("train", ["model=image_ddpm", "data=synthetic_groups"], tmp_path)
    module = build_module(cfg.model, cfg.noise, OmegaConf.create({"_target_": "no_such_package.Sampler"}))
    assert not hasattr(module, "sampler") and module.inference_settings()["objective"] == "x0"  # the default
