"""DARL (Kim, Oh & Ye, ICLR 2023): the switchable SPADE, the loss terms against hand computations, alpha's real
effect on the gradient, the vessel-tree generator, synthetic angiography, the XCAD layout on a replica, and both
experiments end to end (train, test, predict)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config
from hydra.utils import instantiate
from PIL import Image
from scipy import ndimage
from test_data_drive import write_drive
from torch import nn

from diffseg_lightning.data.synthetic_angio import SyntheticAngiography
from diffseg_lightning.data.vessels import UnpairedVessels, vessel_background, vessel_tree
from diffseg_lightning.data.xcad import XCAD
from diffseg_lightning.diffusion import BernoulliKernel
from diffseg_lightning.entry import build_module
from diffseg_lightning.exceptions import ConfigError
from diffseg_lightning.losses import lsgan_loss
from diffseg_lightning.methods.darl import (
    DARLModule,
    darl_discriminator_losses,
    darl_generator_losses,
    to_unit_range,
)
from diffseg_lightning.nets.darl import DARLGenerator, SwitchableSPADE, one_hot_mask
from diffseg_lightning.predict import predict
from diffseg_lightning.train import train
from diffseg_lightning.utils.errors import DiffSegError

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = [
    "logger=csv",
    "~callbacks.progress_bar",
    "trainer.enable_model_summary=false",
    "trainer.accelerator=cpu",
]
TINY_DARL = [
    "model.diffusion.channels=[4,8]",
    "model.diffusion.attention_levels=[false,false]",
    "model.diffusion.norm_num_groups=4",
    "model.diffusion.num_head_channels=4",
    "model.generator.base_channels=4",
    "model.generator.num_downsamplings=1",
    "model.generator.num_middle_blocks=1",
    "model.generator.spade_hidden_channels=4",
    "model.discriminator_mask.channels=4",
    "model.discriminator_mask.num_layers=2",
    "model.discriminator_image.channels=4",
    "model.discriminator_image.num_layers=2",
]


# ------------------------------------------------------------------------------------- switchable SPADE
def test_spade_without_mask_is_torch_affine_instance_norm():
    torch.manual_seed(0)
    layer = SwitchableSPADE(4, label_channels=2, hidden_channels=8)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(4))
        layer.bias.copy_(torch.randn(4))
    reference = nn.InstanceNorm2d(4, affine=True)
    reference.load_state_dict({"weight": layer.weight.detach(), "bias": layer.bias.detach()})
    x = torch.randn(3, 4, 8, 6) * 3 + 1
    torch.testing.assert_close(layer(x), reference(x))


def test_spade_with_mask_is_a_spatial_scale_and_shift():
    torch.manual_seed(1)
    layer = SwitchableSPADE(3, label_channels=2, hidden_channels=5)
    x = torch.randn(2, 3, 8, 8) * 2 + 0.5
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:5, 1:7] = 1
    segmap = one_hot_mask(mask)
    # by hand: biased variance per image and channel, eps 1e-5; gamma / beta from SPADE's own convolutions
    mean = x.mean(dim=(2, 3), keepdim=True)
    var = x.var(dim=(2, 3), keepdim=True, unbiased=False)
    hidden = layer.spade.mlp_shared(segmap)
    gamma, beta = layer.spade.mlp_gamma(hidden), layer.spade.mlp_beta(hidden)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * (1 + gamma) + beta
    torch.testing.assert_close(layer(x, segmap), expected)
    assert gamma[0, 0, 3, 3] != gamma[0, 0, 0, 0]  # the scale varies across the image with the mask
    with torch.no_grad():
        layer.weight.mul_(3.0)  # the instance-norm branch's affine does not enter the SPADE branch
    torch.testing.assert_close(layer(x, segmap), expected)
    with pytest.raises(ValueError, match=r"\(B=2, 2, H, W\) one-hot"):
        layer(x, mask)


def test_one_hot_mask_and_generator_switch():
    mask = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]])
    assert torch.equal(one_hot_mask(mask), torch.stack([1 - mask[:, 0], mask[:, 0]], dim=1))
    torch.manual_seed(2)
    generator = DARLGenerator(
        base_channels=4, num_downsamplings=1, num_middle_blocks=1, spade_hidden_channels=4
    )
    x = torch.randn(2, 2, 16, 16)
    plain = generator(x)
    masked = generator(x, one_hot_mask((torch.rand(2, 1, 16, 16) > 0.7).float()))
    assert plain.shape == masked.shape == (2, 1, 16, 16)
    assert plain.abs().max() <= 1 and not torch.allclose(plain, masked)
    with pytest.raises(ValueError, match="divisible by it, got 15x16"):
        generator(torch.randn(1, 2, 15, 16))


# ------------------------------------------------------------------------------------------ the losses
def test_generator_loss_terms_by_hand():
    d_s = torch.tensor([[[[0.5, 1.5]]]])  # (1, 1, 1, 2)
    d_a = torch.tensor([[[[2.0, 0.0]]]])
    recon = torch.tensor([[[[0.5, -1.0]]]])
    target = torch.tensor([[[[1.0, -1.0]]]])
    terms = darl_generator_losses(torch.tensor(0.3), d_s, d_a, recon, target, alpha=0.2, beta=5.0)
    adv_s = ((0.5 - 1) ** 2 + (1.5 - 1) ** 2) / 2  # 0.25
    adv_a = ((2.0 - 1) ** 2 + (0.0 - 1) ** 2) / 2  # 1.0
    cyc = (0.5 + 0.0) / 2  # L1
    assert terms["adv_s"].item() == pytest.approx(adv_s) and terms["adv_a"].item() == pytest.approx(adv_a)
    assert terms["cyc"].item() == pytest.approx(cyc)
    assert terms["loss"].item() == pytest.approx(0.3 + 0.2 * (adv_s + adv_a) + 5.0 * cyc)


def test_discriminator_loss_terms_by_hand():
    terms = darl_discriminator_losses(
        torch.tensor([0.0, 2.0]),
        torch.tensor([1.0, 3.0]),
        torch.tensor([1.0]),
        torch.tensor([-2.0]),
        weight=0.5,
    )
    d_s = 0.5 * (1.0 + 1.0) / 2 + 0.5 * (1.0 + 9.0) / 2  # 0.5 E[(D(s^f)-1)^2] + 0.5 E[D(fake)^2] = 3.0
    d_a = 0.5 * 0.0 + 0.5 * 4.0
    assert terms["d_s"].item() == pytest.approx(d_s) and terms["d_a"].item() == pytest.approx(d_a)
    assert terms["loss"].item() == pytest.approx(0.5 * (d_s + d_a))
    assert (
        lsgan_loss(torch.tensor([3.0]), True).item() == 4.0
        and lsgan_loss(torch.tensor([3.0]), False).item() == 9.0
    )


def test_to_unit_range():
    x = torch.tensor([[[[2.0, 4.0], [6.0, 10.0]]]])
    torch.testing.assert_close(to_unit_range(x, eps=0.0), torch.tensor([[[[-1.0, -0.5], [0.0, 1.0]]]]))


@pytest.fixture(scope="module")
def tiny_module():
    cfg = compose_config("train", ["experiment=darl_synthetic", *TINY_DARL], Path("/tmp/unused"))
    return build_module(cfg.model, cfg.noise, cfg.sampler), cfg


def test_schedule_is_the_papers(tiny_module):
    module, cfg = tiny_module
    kernel = module.kernel
    assert kernel.num_train_timesteps == 2000 and kernel.objective == "epsilon"
    expected = torch.linspace(1e-6, 1e-2, 2000, dtype=torch.float64).float()
    torch.testing.assert_close(kernel.betas, expected)
    assert module.alpha == 0.2 and module.beta == 5.0 and module.angiogram_max_t == 200


def _batch(size: int = 16, b: int = 2) -> dict:
    g = torch.Generator().manual_seed(3)
    return {
        "image": torch.rand(b, 1, size, size, generator=g),
        "background": torch.rand(b, 1, size, size, generator=g),
        "fake_mask": (torch.rand(b, 1, size, size, generator=g) > 0.8).float(),
    }


def _grad(module, batch, side: str, **weights) -> torch.Tensor:
    for name, value in weights.items():
        setattr(module, name, value)
    module.zero_grad()
    torch.manual_seed(4)  # the same noise and timesteps every call
    g_terms, d_terms = module.compute_losses(batch)
    (g_terms if side == "G" else d_terms)["loss"].backward()
    params = module.generator.parameters() if side == "G" else module.discriminator_image.parameters()
    return torch.cat([p.grad.flatten() for p in params if p.grad is not None]).clone(), g_terms, d_terms


def test_alpha_really_scales_the_adversarial_gradient(tiny_module):
    # float64: the gradient differences below subtract nearly equal float32 sums otherwise
    module = copy.deepcopy(tiny_module[0]).double()
    module.eval()  # spectral norm's power iteration would otherwise change the weights between calls
    batch = {k: v.double() for k, v in _batch().items()}
    base, g_terms, _ = _grad(module, batch, "G", alpha=0.0, beta=5.0)
    small, small_terms, _ = _grad(module, batch, "G", alpha=0.2, beta=5.0)
    large, _, _ = _grad(module, batch, "G", alpha=0.4, beta=5.0)
    adv_only, _, _ = _grad(module, batch, "G", alpha=1.0, beta=0.0)
    diff_cyc = base  # alpha = 0: L_diff + beta L_cyc only
    assert (small - diff_cyc).abs().max() > 1e-6  # alpha changes the generator's gradient
    torch.testing.assert_close(large - base, 2 * (small - base), rtol=1e-4, atol=1e-7)
    cyc_only_grad, _, _ = _grad(module, batch, "G", alpha=0.0, beta=0.0)  # L_diff alone (no G grad: None)
    torch.testing.assert_close(small - base, 0.2 * (adv_only - cyc_only_grad), rtol=1e-4, atol=1e-7)
    assert small_terms["loss"].item() == pytest.approx(
        (small_terms["diff"] + 0.2 * small_terms["adv"] + 5.0 * small_terms["cyc"]).item(), rel=1e-6
    )
    one, _, _ = _grad(module, batch, "D", discriminator_weight=1.0, alpha=0.2)
    three, _, _ = _grad(module, batch, "D", discriminator_weight=3.0)
    torch.testing.assert_close(three, 3 * one, rtol=1e-4, atol=1e-7)


def test_paths_and_diffusion_loss_by_hand(tiny_module):
    module = copy.deepcopy(tiny_module[0]).eval()
    batch = _batch()
    torch.manual_seed(7)
    paths = module.forward_paths(batch)
    # the same draws, in the same order, then every path recomputed step by step
    torch.manual_seed(7)
    x_a, x_b = to_unit_range(batch["image"]), to_unit_range(batch["background"])
    noise = torch.randn_like(x_a)
    t_a = torch.randint(0, 200, (2,))
    t_b = torch.randint(0, 2000, (2,))
    abar = module.kernel.alphas_cumprod
    x_b_t = abar[t_b].sqrt().view(2, 1, 1, 1) * x_b + (1 - abar[t_b]).sqrt().view(2, 1, 1, 1) * noise
    eps_b = module.diffusion(x_b_t, t_b)
    torch.testing.assert_close(paths["diffusion_loss"], ((eps_b - noise) ** 2).mean(), rtol=1e-4, atol=1e-6)
    x_a_t = abar[t_a].sqrt().view(2, 1, 1, 1) * x_a + (1 - abar[t_a]).sqrt().view(2, 1, 1, 1) * noise
    segmentation = module.generator(torch.cat([x_a_t, module.diffusion(x_a_t, t_a)], 1), None)
    torch.testing.assert_close(paths["segmentation"], segmentation, rtol=1e-4, atol=1e-5)
    synthetic = module.generator(torch.cat([x_b_t, eps_b], 1), one_hot_mask(batch["fake_mask"]))
    torch.testing.assert_close(paths["synthetic"], synthetic, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(paths["fake_mask"], batch["fake_mask"] * 2 - 1)


def test_bad_training_batch_and_kernel_are_named(tiny_module):
    module, cfg = tiny_module
    with pytest.raises(ValueError, match=r"lacks \['background', 'fake_mask'\]"):
        module.compute_losses({"image": torch.rand(1, 1, 16, 16)})
    bad = cfg.noise.copy()
    bad.objective = "x0"
    with pytest.raises(ValueError, match="objective=epsilon"):
        build_module(cfg.model, bad, cfg.sampler)
    nets = (module.diffusion, module.generator, module.discriminator_mask, module.discriminator_image)
    for kernel in (None, BernoulliKernel()):  # no kernel, or one that is not Gaussian
        with pytest.raises(ConfigError, match="noise=gaussian noise.objective=epsilon"):
            DARLModule(*nets, torch.optim.Adam, kernel=kernel)


def test_inference_is_one_pass_and_tiles_large_images(tiny_module):
    module, _ = tiny_module
    module.eval()
    image = torch.rand(1, 1, 32, 48)
    out = module.sample(image)
    assert out["samples"].shape == (1, 1, 1, 32, 48)
    assert torch.equal(out["mask"], (module(image) > 0).float())  # tanh(out) > 0
    module.tile_size = (16, 16)
    tiled = module.sample(image)
    assert tiled["mask"].shape == (1, 1, 32, 48)
    module.tile_size = None
    settings = module.inference_settings()
    assert settings["num_steps"] == 1 and settings["timestep"] == 0 and settings["num_samples"] == 1
    module.train()


# ----------------------------------------------------------------------------------------- vessel trees
def test_vessel_tree_is_deterministic_and_its_options_act():
    a = vessel_tree(64, seed=5, depth=5, width=3)
    assert a.dtype == bool and a.shape == (64, 64) and a.any()
    assert np.array_equal(a, vessel_tree(64, seed=5, depth=5, width=3))
    assert not np.array_equal(a, vessel_tree(64, seed=6, depth=5, width=3))
    trunk = vessel_tree(64, seed=5, depth=1, width=3)
    assert (trunk <= a).all() and trunk.sum() < a.sum()  # deeper trees add branches to the same trunk
    thin = vessel_tree(64, seed=5, depth=5, width=1, width_ratio=1.0)
    thick = vessel_tree(64, seed=5, depth=5, width=5, width_ratio=1.0)
    # width w = the centre line (width 1) dilated to distance (w - 1) / 2
    assert np.array_equal(thick, ndimage.distance_transform_edt(~thin) <= 2)
    assert vessel_tree((32, 48), seed=0).shape == (32, 48)
    assert vessel_tree(64, seed=5, roots=3).sum() > 0
    for bad in ({"depth": 0}, {"width": 0.0}, {"roots": 0}, {"size": 4}):
        with pytest.raises(ValueError, match="vessel_tree"):
            vessel_tree(**{"size": 64, **bad})


def test_synthetic_angiography_items():
    train_set = SyntheticAngiography(3, 32, "train", seed=1, motion=0, noise=0.0)
    item = train_set[0]
    assert set(item) == {"image", "background", "fake_mask", "case", "index"}  # no label in training
    darkening = item["background"] - item["image"]
    assert darkening.min() >= -1e-6 and 0.1 < darkening.max() <= 0.35 + 1e-6  # vessels darkened into it
    assert torch.equal(
        train_set[0]["image"], SyntheticAngiography(3, 32, "train", seed=1, motion=0, noise=0.0)[0]["image"]
    )
    test_item = SyntheticAngiography(2, 32, "test", seed=1)[0]
    mask = test_item["mask"][0] > 0
    assert test_item["image"][0][mask].mean() < test_item["image"][0][~mask].mean()
    with pytest.raises(ValueError, match="channels must be 1"):
        SyntheticAngiography(2, 32, channels=3)


def test_unpaired_vessels_drop_labels_and_close_vessels(tmp_path):
    write_drive(tmp_path)
    from diffseg_lightning.data.drive import DRIVE

    data = UnpairedVessels(DRIVE(tmp_path, "train", size=16), repeats=2, closing_radius=2, depth=3, width=1.0)
    assert len(data) == 6
    item = data[4]
    assert set(item) == {"image", "background", "fake_mask", "case", "index"}
    assert (item["background"] >= item["image"] - 1e-4).all()  # a closing is extensive
    assert torch.equal(item["fake_mask"], data[4]["fake_mask"]) and not torch.equal(
        data[1]["fake_mask"], data[4]["fake_mask"]
    )
    cropped = UnpairedVessels(DRIVE(tmp_path, "train", size=16), crop=8, depth=2)[0]
    assert cropped["image"].shape == (3, 8, 8) and cropped["fake_mask"].shape == (1, 8, 8)
    line = torch.ones(1, 9, 9)
    line[0, 4] = 0.0  # a dark one-pixel vessel
    assert torch.equal(vessel_background(line, 2), torch.ones(1, 9, 9))


# ------------------------------------------------------------------------------------------- XCAD replica
def write_xcad(root: Path, missing_mask: bool = False) -> Path:
    """``root/XCAD/{train/{trainA,trainB,trainC},test/{images,masks}}`` with grey PNGs as released."""
    rng = np.random.default_rng(0)
    base = root / "XCAD"
    for sub in ("train/trainA", "train/trainB", "train/trainC", "test/images", "test/masks"):
        (base / sub).mkdir(parents=True)
    for i in range(2):
        Image.fromarray(vessel_tree(24, seed=i).astype(np.uint8) * 255).save(
            base / "train/trainA" / f"{i:05d}.png"
        )
    for name in ("000_PPA_44_PSA_00_8", "003_PPA_-29_PSA_29_2", "004_PPA_10_PSA_12_3"):
        for sub in ("trainB", "trainC"):
            Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8)).save(
                base / "train" / sub / f"{name}.png"
            )
    for i, name in enumerate(("01251_32", "02208_30", "03001_11", "04100_05")):
        Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8)).save(
            base / "test/images" / f"{name}.png"
        )
        if not (missing_mask and i == 2):
            Image.fromarray(vessel_tree(24, seed=10 + i).astype(np.uint8) * 255).save(
                base / "test/masks" / f"{name}.png"
            )
    return base


def test_xcad_replica_layout(tmp_path):
    base = write_xcad(tmp_path)
    train_set = XCAD(tmp_path, "train", size=16)
    assert len(train_set) == 3
    item = train_set[2]
    assert item["image"].shape == item["background"].shape == item["fake_mask"].shape == (1, 16, 16)
    assert "mask" not in item and set(item["fake_mask"].unique().tolist()) <= {0.0, 1.0}
    assert train_set.cases[2]["fake"].name == "00000.png"  # unpaired: mask i mod len(trainA)
    val, test = XCAD(base, "val", size=None, val_count=1), XCAD(tmp_path, "test", size=None, val_count=1)
    names = {Path(c["image"]).name for c in val.cases} | {Path(c["image"]).name for c in test.cases}
    assert len(val) == 1 and len(test) == 3 and len(names) == 4  # disjoint, together every labelled image
    item = test[0]
    truth = np.asarray(Image.open(base / "test/masks" / Path(item["case"]).name)) > 127
    assert torch.equal(item["mask"][0] > 0, torch.from_numpy(truth)) and item["image"].shape == (1, 24, 24)
    assert test.seen_labels <= {0, 255}


def test_xcad_bad_cases_are_named(tmp_path):
    base = write_xcad(tmp_path, missing_mask=True)
    with pytest.raises(
        DiffSegError, match=r"03001_11\.png: no vessel mask; expected .*test/masks/03001_11\.png"
    ):
        for split in ("val", "test"):
            XCAD(tmp_path, split, val_count=2)
    kept = [XCAD(tmp_path, s, val_count=2, on_bad_case="skip") for s in ("val", "test")]
    assert sum(len(k) for k in kept) == 3 and sum(len(k.skipped) for k in kept) == 1
    with pytest.raises(DiffSegError, match="expected XCAD's layout"):
        XCAD(tmp_path / "XCAD" / "train" / "trainA")
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(base / "train/trainB" / "000_PPA_44_PSA_00_8.png")
    with pytest.raises(DiffSegError, match=r"000_PPA_44_PSA_00_8\.png: image has 3 channel"):
        XCAD(tmp_path, "train")[0]
    with pytest.raises(ValueError, match="val_count must lie in"):
        XCAD(tmp_path, "val", val_count=4)


def test_xcad_masks_follow_the_binary_rule(tmp_path):
    base = write_xcad(tmp_path)
    name = "01251_32"
    vessels = vessel_tree(24, seed=10)
    Image.fromarray(vessels.astype(np.uint8)).save(base / "test/masks" / f"{name}.png")  # 0/1: was empty
    test = XCAD(tmp_path, "test", size=None, val_count=0)
    item = next(test[i] for i in range(len(test)) if name in test[i]["case"])
    assert vessels.any() and torch.equal(item["mask"][0] > 0, torch.from_numpy(vessels > 0))
    Image.fromarray((vessels * 128).astype(np.uint8)).save(base / "test/masks" / f"{name}.png")
    with pytest.raises(
        DiffSegError, match=rf"{name}\.png: mask values 0, 128 are not those of a binary XCAD"
    ):
        test[[Path(c["image"]).name for c in test.cases].index(f"{name}.png")]


def test_xcad_config_composes(tmp_path):
    write_xcad(tmp_path)
    cfg = compose_config(
        "train",
        ["data=xcad", f"data.root={tmp_path}", "data.size=16", "data.val_count=1", "data.num_workers=0"],
        tmp_path / "run",
    )
    dm = instantiate(cfg.data)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["fake_mask"].shape == (3, 1, 16, 16) and "mask" not in batch
    assert len(dm.datasets["val"]) == 1


# ---------------------------------------------------------------------------------------- end to end
def test_synthetic_experiment_trains_tests_and_predicts(tmp_path):
    overrides = ["experiment=darl_synthetic", *TINY_DARL, *RUN, "data.size=16", "data.num_train=8", "data.num_val=4", "data.num_test=4", "data.batch_size=4", "data.eval_batch_size=4"]  # fmt: skip
    run = tmp_path / "run"
    train(compose_config("train", overrides, run))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["num_cases"] == 4 and summary["sampler"]["num_steps"] == 1 and "dice" in summary["mean"]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 28), dtype=np.uint8)).save(
        inputs / "a.png"
    )
    predicted = predict(compose_config("predict", [f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}", f"input_dir={inputs}", f"output_dir={tmp_path / 'pred'}", "trainer.accelerator=cpu", "progress_bar=false"], tmp_path))  # fmt: skip
    assert len(predicted["written"]) == 1
    mask = np.asarray(Image.open(tmp_path / "pred" / "a_mask.png"))
    assert mask.shape == (20, 28) and set(np.unique(mask)) <= {0, 255}


def test_drive_experiment_fast_dev_run_on_a_replica(tmp_path):
    write_drive(tmp_path / "drive")
    overrides = ["experiment=darl_drive", f"data.root={tmp_path / 'drive'}", "debug=fast_dev_run", *TINY_DARL, *RUN, "data.size=32", "data.crop=16", "model.tile_size=16", "data.repeats=1", "data.batch_size=2", "data.eval_batch_size=2"]  # fmt: skip
    train(compose_config("train", overrides, tmp_path / "run"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["sampler"]["tile_size"] == [16, 16] and summary["num_cases"] >= 1
    assert (
        "ged" in summary["mean"] and "hm_iou" in summary["mean"]
    )  # the second observer reaches the test rows
