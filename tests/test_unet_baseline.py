"""The non-diffusion baseline (model=unet): its loss against MONAI's by hand, its one deterministic
prediction, and train / eval / predict end to end with the same summary.json as a diffusion run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config
from monai.losses import DiceCELoss, DiceLoss
from monai.networks.nets import UNet
from omegaconf import OmegaConf
from PIL import Image

from diffseg_lightning.entry import accepted_parameters, build_module
from diffseg_lightning.evaluate import evaluate
from diffseg_lightning.inference import DiffusionSampler
from diffseg_lightning.inference.uncertainty import binary_entropy
from diffseg_lightning.methods import DiceBCELoss, UNetSegmentationModule
from diffseg_lightning.predict import predict
from diffseg_lightning.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_UNET = ["model.net.channels=[8,16]", "model.net.strides=[2]", "model.net.num_res_units=1"]
TINY_MEDSEGDIFF = [
    "model.denoiser.base_channels=8",
    "model.denoiser.channel_mults=[1,2]",
    "model.denoiser.attention_levels=[false,false]",
]
RUN = [
    "data.size=32",
    "data.num_train=8",
    "data.num_val=2",
    "data.num_test=2",
    "data.batch_size=2",
    "data.eval_batch_size=2",
    "logger=csv",
    "~callbacks.progress_bar",
    "trainer.accelerator=cpu",
    "trainer.enable_model_summary=false",
]


def tiny_module(mask_channels: int = 1, threshold: float = 0.5) -> UNetSegmentationModule:
    torch.manual_seed(0)
    net = UNet(2, 1, mask_channels, channels=(4, 8), strides=(2,), num_res_units=1)
    return UNetSegmentationModule(
        net,
        optimizer=torch.optim.AdamW,
        mask_channels=mask_channels,
        sampler=DiffusionSampler(threshold=threshold),
    )


# ------------------------------------------------------------------------------------------------ loss
def test_loss_equals_monai_on_a_hand_case():
    """Logits 0 (p = 1/2) on 4 pixels, one of them foreground: BCE = ln 2,
    Dice loss = 1 - (2 * 1/2 + e) / (2 + 1 + e)."""
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    eps = 1e-5
    by_hand = math.log(2) + 1 - (1 + eps) / (3 + eps)
    terms = DiceBCELoss()(logits, target)
    assert terms["bce"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert terms["dice_loss"].item() == pytest.approx(1 - (1 + eps) / (3 + eps), abs=1e-6)
    assert terms["loss"].item() == pytest.approx(by_hand, abs=1e-6)
    assert terms["loss"].item() == pytest.approx(DiceCELoss(sigmoid=True)(logits, target).item(), abs=1e-6)
    weighted = DiceBCELoss(lambda_dice=0.3, lambda_bce=2.0)(logits, target)["loss"]
    assert weighted.item() == pytest.approx(0.3 * (1 - (1 + eps) / (3 + eps)) + 2 * math.log(2), abs=1e-6)


def test_multi_class_loss_is_per_channel_sigmoid_not_monai_dicece():
    """C = 2 independent sigmoid channels: DiceLoss(sigmoid) + BCEWithLogits, the mean of the per-channel
    losses; MONAI 1.6's DiceCELoss(sigmoid=True) would use a softmax CE over the channels here."""
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 8, 8)
    target = (torch.rand(2, 2, 8, 8) > 0.5).float()
    ours = DiceBCELoss()(logits, target)["loss"]
    reference = DiceLoss(sigmoid=True)(logits, target) + torch.nn.BCEWithLogitsLoss()(logits, target)
    assert ours.item() == pytest.approx(reference.item(), abs=1e-6)
    per_channel = [DiceBCELoss()(logits[:, c : c + 1], target[:, c : c + 1])["loss"] for c in range(2)]
    assert ours.item() == pytest.approx(float(sum(per_channel) / 2), abs=1e-6)
    assert abs(ours.item() - DiceCELoss(sigmoid=True)(logits, target).item()) > 1e-3


def test_loss_rejects_bad_weights():
    with pytest.raises(ValueError, match="lambda_dice"):
        DiceBCELoss(lambda_dice=-1.0)
    with pytest.raises(ValueError, match="not both 0"):
        DiceBCELoss(lambda_dice=0.0, lambda_bce=0.0)


# ----------------------------------------------------------------------------------------- prediction
def test_one_deterministic_prediction_with_bernoulli_entropy():
    module = tiny_module(mask_channels=2, threshold=0.3).eval()
    image = torch.randn(3, 1, 16, 16)
    out = module.sample(image, torch.arange(3))
    probability = torch.sigmoid(module(image))
    assert out["samples"].shape == (3, 1, 2, 16, 16)
    torch.testing.assert_close(out["probability"], probability)
    torch.testing.assert_close(out["samples"][:, 0], probability)
    assert torch.equal(out["mask"], (probability > 0.3).float())  # the sampler's threshold
    torch.testing.assert_close(out["entropy"], binary_entropy(probability))
    assert not out["std"].any() and not out["mutual_information"].any()
    again = module.sample(image, torch.tensor([7, 8, 9]))  # case ids change nothing
    assert torch.equal(again["probability"], out["probability"])
    settings = module.inference_settings()
    assert settings["num_samples"] == 1 and settings["num_steps"] == 1 and settings["fusion"] == "none"
    assert settings["threshold"] == 0.3 and settings["deterministic"] is True


def test_size_not_divisible_by_the_strides_is_a_clear_error():
    module = tiny_module()
    with pytest.raises(ValueError, match=r"downsamples by 2x2.*got 15x16"):
        module(torch.randn(1, 1, 15, 16))


def test_loss_terms_multi_class_and_channel_mismatch():
    module = tiny_module(mask_channels=2)
    image, target = torch.randn(2, 1, 16, 16), (torch.rand(2, 2, 16, 16) > 0.5).float()
    logits = module(image)
    assert module.loss_terms(logits, target).keys() == {"loss", "dice_loss", "bce"}
    with pytest.raises(ValueError, match="data.mask_channels"):
        module.loss_terms(logits, target[:, :1])


def test_no_kernel_is_built_or_taken(tmp_path):
    """build_module passes kernel= only to a method that takes one (not the U-Net, which takes the sampler);
    the checkpoint holds only the network."""
    cfg = compose_config("train", ["model=unet", "noise=bernoulli", "sampler.threshold=0.4"], tmp_path)
    module = build_module(cfg.model, cfg.noise, cfg.sampler)
    assert isinstance(module, UNetSegmentationModule)
    assert all(key.startswith("net.") for key in module.state_dict())
    assert not hasattr(module, "kernel") and module.threshold == 0.4
    accepted = accepted_parameters(UNetSegmentationModule)
    assert "sampler" in accepted and "kernel" not in accepted
    # the noise group is not even built: a target that does not exist is never imported
    unbuildable = OmegaConf.create({"_target_": "no_such_package.Kernel"})
    assert build_module(cfg.model, unbuildable, cfg.sampler).threshold == 0.4
    assert sum(p.numel() for p in module.parameters()) == 6_494_716  # the default U-Net, 1 -> 1 channel


# ------------------------------------------------------------------------------------------ end to end
def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.mark.parametrize("annotators", [1, 3])
def test_fast_dev_run_writes_the_metrics_of_a_diffusion_run(annotators, tmp_path):
    data = [*RUN, f"data.num_annotators={annotators}"]
    train(compose_config("train", ["model=unet", "debug=fast_dev_run", *data, *TINY_UNET], tmp_path / "unet"))
    unet = summary(tmp_path / "unet")
    assert unet["sampler"]["num_samples"] == 1 and unet["num_cases"] == 2
    assert unet["mean"]["mean_std"] == 0 and unet["mean"]["mean_mutual_information"] == 0
    if annotators == 1:  # the same keys as a diffusion run
        overrides = ["model=medsegdiff", "debug=fast_dev_run", *data, *TINY_MEDSEGDIFF]
        train(compose_config("train", overrides, tmp_path / "diffusion"))
        diffusion = summary(tmp_path / "diffusion")
        assert unet.keys() == diffusion.keys()
        assert unet["sampler"].keys() == {*diffusion["sampler"], "deterministic"}
        assert unet["mean"].keys() == diffusion["mean"].keys()
        assert unet["metric_per_case"][0].keys() == diffusion["metric_per_case"][0].keys()
    else:  # several annotators: the multi-annotator metrics of one sample (GED with S = 1)
        assert {"ged", "hm_iou", "soft_dice"} <= unet["mean"].keys()
        assert "ged_4" not in unet["mean"] and unet["mean"]["diversity"] is None  # NaN: one sample


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory) -> Path:
    """One epoch (4 steps) so that checkpoints exist (fast_dev_run writes none)."""
    out = tmp_path_factory.mktemp("unet_run")
    train(compose_config("train", ["model=unet", *RUN, *TINY_UNET, "trainer.max_epochs=1"], out))
    return out


def test_eval_on_the_checkpoint_reproduces_the_test_metrics(unet_run, tmp_path):
    ckpt = unet_run / "checkpoints" / "best.ckpt"
    assert ckpt.is_file()
    overrides = [f"ckpt_path={ckpt}", "trainer.accelerator=cpu", "logger=none", "sampler.num_samples=4"]
    results = evaluate(compose_config("eval", overrides, tmp_path))
    written, trained = summary(tmp_path), summary(unet_run)
    assert results["num_cases"] == written["num_cases"] == 2
    assert written["sampler"]["num_samples"] == 1  # what was done, whatever sampler.num_samples says
    for a, b in zip(written["metric_per_case"], trained["metric_per_case"], strict=True):
        assert a["case"] == b["case"]
        for name in ("dice", "ece", "mean_entropy"):
            assert (a[name] is None and b[name] is None) or math.isclose(a[name], b[name], abs_tol=1e-6)


def test_predict_writes_masks_from_the_probability(unet_run, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(inputs / f"{name}.png")
    overrides = [
        f"ckpt_path={unet_run / 'checkpoints' / 'best.ckpt'}",
        f"input_dir={inputs}",
        f"output_dir={tmp_path / 'pred'}",
        "trainer.accelerator=cpu",
        "progress_bar=false",
        "overlay=false",
    ]
    result = predict(compose_config("predict", overrides, tmp_path))
    assert len(result["written"]) == 2 and not result["skipped"]
    mask = np.asarray(Image.open(tmp_path / "pred" / "a_mask.png"))
    prob = np.asarray(Image.open(tmp_path / "pred" / "a_prob.png"))
    decided = prob != 128
    assert np.array_equal((mask == 255)[decided], (prob > 127)[decided])


def test_kvasir_experiment_runs_at_its_size(tmp_path):
    """experiment=unet_kvasir (the default U-Net at 128 px) on a replica of the official layout."""
    from test_data_kvasir import write_kvasir

    write_kvasir(tmp_path / "kvasir", n=10)
    overrides = [
        "experiment=unet_kvasir",
        f"data.root={tmp_path / 'kvasir'}",
        "debug=fast_dev_run",
        "data.batch_size=2",
        "data.eval_batch_size=2",
        "logger=csv",
        "~callbacks.progress_bar",
        "trainer.enable_model_summary=false",
    ]
    cfg = compose_config("train", overrides, tmp_path / "run")
    assert cfg.data.size == 128 and cfg.model.net.in_channels == 3
    train(cfg)
    written = summary(tmp_path / "run")
    assert written["sampler"]["num_samples"] == 1 and written["num_cases"] >= 1
    assert {"dice", "iou", "hd95", "ece"} <= written["mean"].keys()
