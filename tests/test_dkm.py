"""Diffusion Kinetic Model (Lv et al., MICCAI 2023): the kinetic curve and the synthetic DCE-MRI generator,
the KineticBlock fusion formula, the frozen diffusion module, and the method end to end (train, predict)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import compose_config
from PIL import Image
from scipy import ndimage, stats

from diffseg_lightning.data.synthetic_dce import SyntheticDCE, gamma_variate
from diffseg_lightning.entry import build_module
from diffseg_lightning.methods.dkm import DKMModule
from diffseg_lightning.nets.dkm import DKMSegNet, KineticBlock, KineticFusion, group_by_block

pytestmark = pytest.mark.usefixtures("one_thread")

# a DKM small enough for seconds on 2 CPU cores: the method and code paths are the real ones
TINY_DKM = [
    "data.size=32",
    "data.num_train=8",
    "data.num_val=4",
    "data.num_test=4",
    "data.batch_size=4",
    "data.eval_batch_size=4",
    "model.ddpm.channels=[8,8,16,16]",
    "model.ddpm.norm_num_groups=8",
    "model.net.features=[4,4,8,8,16,4]",
    "logger=csv",
    "~callbacks.progress_bar",
    "trainer.enable_model_summary=false",
    "trainer.accelerator=cpu",
]


# ------------------------------------------------------------------------------------- kinetic curve
def test_gamma_variate_peaks_at_t_peak_and_is_a_scaled_gamma_density():
    amplitude, t_peak, alpha = 1.3, 1.7, 2.4
    t = np.linspace(0.05, 8.0, 200)
    g = gamma_variate(t, amplitude, t_peak, alpha)
    # independent computation: the gamma density of shape alpha + 1 and scale t_p / alpha, scaled to A at t_p
    dist = stats.gamma(a=alpha + 1.0, scale=t_peak / alpha)
    np.testing.assert_allclose(g, amplitude * dist.pdf(t) / dist.pdf(t_peak), rtol=1e-10)
    assert gamma_variate(t_peak, amplitude, t_peak, alpha) == pytest.approx(amplitude, rel=1e-12)
    # hand value at t = 2 t_p: A 2^alpha e^{-alpha}
    assert gamma_variate(2 * t_peak, amplitude, t_peak, alpha) == pytest.approx(
        amplitude * 2**alpha * math.exp(-alpha), rel=1e-12
    )
    assert np.all(np.diff(g[t < t_peak]) > 0) and np.all(np.diff(g[t > t_peak]) < 0)
    np.testing.assert_array_equal(gamma_variate(np.array([-1.0, 0.0]), amplitude, t_peak, alpha), [0.0, 0.0])
    with pytest.raises(ValueError, match="t_peak > 0"):
        gamma_variate(1.0, 1.0, 0.0, 2.0)


# ------------------------------------------------------------------------------------- DCE generator
def test_dce_generator_follows_the_kinetic_curves_of_its_drawn_parameters():
    """Without texture, bias and noise, the enhancement of a pixel deep inside a lesion (and of one far from
    any lesion) over the phases is the lesion's (normal tissue's) gamma variate at the phase times."""
    ds = SyntheticDCE(num_cases=20, size=48, noise_std=0.0, bias_field=0.0, texture=0.0, empty_fraction=0.0)
    times = np.asarray(ds.phase_times)
    checked = 0
    for index in range(len(ds)):
        item = ds[index]
        rng = np.random.default_rng((ds.seed, ds.split_id, index))  # replay the case's stream
        instances, _ = ds._draw_shapes(rng)
        kin = ds.kinetics(rng)
        inside = instances > 0
        # the whole 7x7 square around the pixel on one side: no partial volume (the blur's radius is 3 px)
        square = np.ones((7, 7), dtype=bool)
        deep = ndimage.binary_erosion(inside, square)
        far = ndimage.binary_erosion(~inside, square, border_value=1)
        if not deep.any() or not far.any():
            continue
        series = torch.cat([item["image"], item["post"]]).numpy()
        enhancement = series[1:] - series[:1]  # (K, H, W), in the pre-contrast z-score scale
        lesion = gamma_variate(times, 1.0, kin["lesion"]["t_peak"], kin["lesion"]["alpha"])
        normal = gamma_variate(times, 1.0, kin["normal"]["t_peak"], kin["normal"]["alpha"])
        for where, curve in ((deep, lesion), (far, normal)):
            y, x = np.argwhere(where)[0]
            # float32 rounding of the z-scored series, relative to this pixel's first enhancement
            atol = 8 * np.finfo(np.float32).eps * np.abs(series).max() / abs(enhancement[0, y, x])
            np.testing.assert_allclose(
                enhancement[:, y, x] / enhancement[0, y, x], curve / curve[0], rtol=1e-5, atol=atol
            )
        checked += 1
    assert checked >= 5


def test_dce_lesions_wash_in_fast_and_out_while_normal_tissue_rises_slowly():
    ds = SyntheticDCE(num_cases=40, size=32, phases="all", split="val")
    lesion_curves, normal_curves, pre_gap, post_gap = [], [], [], []
    for item in (ds[i] for i in range(len(ds))):
        mask = item["mask"][0].bool()
        if not mask.any():
            continue
        enhancement = item["image"][1:] - item["image"][:1]
        lesion_curves.append(enhancement[:, mask].mean(1))
        normal_curves.append(enhancement[:, ~mask].mean(1))
        pre_gap.append(item["image"][0][mask].mean() - item["image"][0][~mask].mean())
        post_gap.append(item["image"][1][mask].mean() - item["image"][1][~mask].mean())
    lesion, normal = torch.stack(lesion_curves), torch.stack(normal_curves)
    assert (lesion[:, -1] < lesion.max(1).values).all()  # every lesion washes out by the last phase
    assert (lesion[:, 0] > normal[:, 0]).all()  # and washes in faster
    assert (normal.diff(dim=1) > 0).all()  # normal tissue: persistent enhancement
    assert torch.stack(post_gap).mean() > 5 * torch.stack(pre_gap).mean() > 0  # faint before contrast


def test_dce_generator_is_deterministic_and_validates_options():
    a, b = SyntheticDCE(num_cases=6, size=32), SyntheticDCE(num_cases=6, size=32)
    full = SyntheticDCE(num_cases=6, size=32, phases="all")
    for i in (0, 5, 2):
        x, y, z = a[i], b[i], full[i]
        for key in ("image", "post", "mask", "instances"):
            assert torch.equal(x[key], y[key]), key
        assert torch.equal(a[-1]["image"], a[5]["image"])
        assert (
            x["image"].shape == (1, 32, 32)
            and x["post"].shape == (3, 32, 32)
            and z["image"].shape == (4, 32, 32)
        )
        assert torch.equal(z["image"], torch.cat([x["image"], x["post"]]))
        assert x["image"].mean().abs() < 1e-4 and (x["image"].std(unbiased=False) - 1).abs() < 1e-3
    other = SyntheticDCE(num_cases=6, size=32, split="test")
    assert not torch.equal(other[0]["image"], a[0]["image"])
    assert a.case_name(3) == "dce-train-00003"
    for bad, match in (
        ({"phases": "post"}, "phases must be one of"),
        ({"phase_times": [3.0, 1.5]}, "increase strictly"),
        ({"num_phases": 2}, "num_phases=2"),
        ({"pre_contrast": [0.3, 0.1]}, "low <= high"),
    ):
        with pytest.raises(ValueError, match=match):
            SyntheticDCE(num_cases=2, size=32, **bad)


# -------------------------------------------------------------------------------------------- network
def test_kinetic_fusion_matches_a_hand_computation():
    torch.manual_seed(0)
    fusion = KineticFusion(dm_channels=2, out_channels=3, kernel_size=1)
    with torch.no_grad():
        fusion.norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        fusion.norm.bias.copy_(torch.tensor([0.0, -0.3, 0.2]))
    f_dm, f_sm = torch.randn(2, 2, 3, 4), torch.randn(2, 5, 3, 4)
    w = fusion.conv.weight[:, :, 0, 0].detach()  # (3, 2)
    # W * f_dm for a 1x1 kernel: per pixel w @ f_dm; BN (train mode): batch mean and biased variance
    y = torch.einsum("oc,bchw->bohw", w, f_dm)
    mean = y.mean(dim=(0, 2, 3), keepdim=True)
    var = ((y - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    gamma, beta = fusion.norm.weight.detach().view(1, 3, 1, 1), fusion.norm.bias.detach().view(1, 3, 1, 1)
    expected = torch.cat([torch.clamp((y - mean) / torch.sqrt(var + 1e-5) * gamma + beta, min=0), f_sm], 1)
    out = fusion(f_dm, f_sm)
    assert out.shape == (2, 8, 3, 4)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # eval mode: the running statistics instead of the batch's
    fusion.eval()
    rm, rv = fusion.norm.running_mean.view(1, 3, 1, 1), fusion.norm.running_var.view(1, 3, 1, 1)
    expected_eval = torch.clamp((y - rm) / torch.sqrt(rv + 1e-5) * gamma + beta, min=0)
    torch.testing.assert_close(fusion(f_dm, f_sm)[:, :3], expected_eval, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="share batch and size"):
        fusion(f_dm, f_sm[..., :2])
    with pytest.raises(ValueError, match="odd"):
        KineticFusion(2, 3, kernel_size=2)


def test_group_by_block_follows_the_extractor_layout():
    # channels labelled by (timestep, block, channel): layout [t0: b0 (2 ch), b1 (1 ch), t1: b0, b1]
    labels = [100 * t + 10 * b + c for t in range(2) for b, n in enumerate((2, 1)) for c in range(n)]
    features = torch.tensor(labels, dtype=torch.float32).view(1, -1, 1, 1).expand(2, -1, 3, 3)
    groups = group_by_block(features, [2, 1], num_timesteps=2)
    assert [g[0, :, 0, 0].tolist() for g in groups] == [[0, 1, 100, 101], [10, 110]]
    with pytest.raises(ValueError, match="do not hold"):
        group_by_block(features, [2, 2], num_timesteps=2)


def test_segnet_shapes_and_errors():
    net = DKMSegNet(1, 2, features=(4, 4, 8, 8, 16, 4), dm_channels=(3, 5, 6, 7))
    image = torch.randn(2, 1, 32, 32)
    f_dm = [torch.randn(2, c, 32, 32) for c in (3, 5, 6, 7)]  # any resolution: resized in the blocks
    assert net(image, f_dm).shape == (2, 2, 32, 32)
    assert net(image, [f[..., :4, :4] for f in f_dm]).shape == (2, 2, 32, 32)  # coarser maps: interpolated
    block = KineticBlock(4, 8, dm_channels=3, fused_channels=6)
    assert block(torch.randn(2, 4, 16, 16), torch.randn(2, 3, 16, 16)).shape == (2, 8, 8, 8)
    assert block.convs.conv_0.conv.in_channels == 4 + 6
    with pytest.raises(ValueError, match="diffusion features are needed"):
        net(image)
    with pytest.raises(ValueError, match="multiples of 16"):
        net(torch.randn(2, 1, 24, 24), f_dm)
    plain = DKMSegNet(4, 1, features=(4, 4, 8, 8, 16, 4))
    assert plain(torch.randn(1, 4, 32, 32)).shape == (1, 1, 32, 32)
    with pytest.raises(ValueError, match="4 values"):
        DKMSegNet(1, 1, dm_channels=(3, 3))


# --------------------------------------------------------------------------------------------- method
def dkm_module(tmp_path, *overrides: str) -> DKMModule:
    cfg = compose_config("train", ["experiment=dkm_synthetic", *TINY_DKM, *overrides], tmp_path)
    return build_module(cfg.model, cfg.noise, cfg.sampler)


def dce_batch(n: int = 4, phases: str = "pre") -> dict:
    ds = SyntheticDCE(num_cases=n, size=32, phases=phases)
    items = [ds[i] for i in range(n)]
    return {k: torch.stack([it[k] for it in items]) for k in ("image", "post", "mask")}


def test_the_diffusion_module_gets_no_gradient_while_the_segmentation_network_trains(tmp_path):
    module = dkm_module(tmp_path)
    module.train()
    assert module.block_channels == [8, 16, 16, 16]  # up_blocks.2, .1, .0, middle of channels 8-8-16-16
    assert [b.fusion.conv.in_channels for b in module.net.kinetic] == [8, 16, 16, 16]  # one timestep each
    batch = dce_batch()
    loss = module.loss(module(batch["image"]), batch["mask"])["loss"]
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in module.ddpm.parameters())
    assert all(p.grad is not None for p in module.net.parameters())
    assert not module.ddpm.training  # the extractor keeps the frozen DDPM in eval mode
    module.scheduler_factory = None
    optimised = {id(p) for group in module.configure_optimizers().param_groups for p in group["params"]}
    assert optimised == {id(p) for p in module.net.parameters()}


def test_pretraining_trains_then_freezes_the_diffusion_module_and_load_ddpm_restores_it(tmp_path):
    module = dkm_module(tmp_path)
    batch = dce_batch()
    before = {k: v.clone() for k, v in module.ddpm.state_dict().items()}
    features_before = module.diffusion_features(batch["image"])
    record = module.pretrain_ddpm([batch], steps=2)
    assert record["steps"] == 2 and bool(module.ddpm_pretrained)
    assert any(not torch.equal(before[k], v) for k, v in module.ddpm.state_dict().items())
    assert all(not p.requires_grad and p.grad is None for p in module.ddpm.parameters())
    assert not torch.equal(features_before[0], module.diffusion_features(batch["image"])[0])
    path = tmp_path / "ddpm.pt"
    torch.save(
        {"state_dict": {f"features.backbone.{k}": v for k, v in module.ddpm.state_dict().items()}}, path
    )
    fresh = dkm_module(tmp_path)
    fresh.load_ddpm(path)
    assert bool(fresh.ddpm_pretrained)
    assert all(torch.equal(v, fresh.ddpm.state_dict()[k]) for k, v in module.ddpm.state_dict().items())
    with pytest.raises(ValueError, match="post-contrast phases"):
        module.ddpm_loss(batch["image"], batch["post"][:, :2])


def test_fast_dev_run_with_a_random_ddpm_warns_and_writes_the_summary(tmp_path):
    from diffseg_lightning.train import train

    overrides = ["experiment=dkm_synthetic", *TINY_DKM, "debug=fast_dev_run", "model.pretrain_steps=0"]
    with pytest.warns(UserWarning, match="NO PRETRAINED DIFFUSION MODULE"):
        train(compose_config("train", overrides, tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_cases"] == 4 and summary["sampler"]["ddpm_pretrained"] is False
    assert summary["sampler"]["feature_timesteps"] == [500] and "dice" in summary["mean"]


def test_train_then_predict_from_the_pre_contrast_image(tmp_path):
    from diffseg_lightning.predict import predict
    from diffseg_lightning.train import train

    run = tmp_path / "run"
    overrides = ["experiment=dkm_synthetic", *TINY_DKM, "model.pretrain_steps=2", "trainer.max_epochs=1"]
    train(compose_config("train", overrides, run))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["sampler"]["ddpm_pretrained"] is True
    assert summary["sampler"]["ddpm_pretraining"]["steps"] == 2
    assert len(summary["metric_per_case"]) == 4 and summary["metric_per_case"][0]["case"].startswith(
        "dce-test"
    )
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    ds = SyntheticDCE(num_cases=2, size=32, split="predict")
    for i in range(2):
        pre = ds[i]["image"][0].numpy()
        pre = (255 * (pre - pre.min()) / (pre.max() - pre.min())).astype(np.uint8)
        Image.fromarray(pre).save(inputs / f"case{i}.png")
    out = tmp_path / "pred"
    ckpt = run / "checkpoints" / "best.ckpt"
    result = predict(
        compose_config(
            "predict",
            [f"ckpt_path={ckpt}", f"input_dir={inputs}", f"output_dir={out}", "trainer.accelerator=cpu",
             "progress_bar=false"],
            tmp_path,
        )
    )  # fmt: skip
    assert len(result["written"]) == 2 and not result["skipped"]
    mask = np.asarray(Image.open(out / "case0_mask.png"))
    assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 255}


def test_a_run_started_from_ddpm_ckpt_loads_it_and_does_not_pretrain_again(tmp_path):
    from diffseg_lightning.train import train
    from diffseg_lightning.utils.errors import DiffSegError

    module = dkm_module(tmp_path)
    path = tmp_path / "ddpm_state.pt"
    torch.save(module.ddpm.state_dict(), path)  # a plain denoiser state dict
    overrides = ["experiment=dkm_synthetic", *TINY_DKM, "debug=fast_dev_run", f"model.ddpm_ckpt={path}"]
    train(compose_config("train", overrides, tmp_path / "run"))
    sampler = json.loads((tmp_path / "run" / "summary.json").read_text())["sampler"]
    assert sampler["ddpm_pretrained"] is True and sampler["ddpm_pretraining"] is None
    with pytest.raises(DiffSegError, match="does not exist"):
        module.load_ddpm(tmp_path / "missing.ckpt")


def test_bad_dkm_settings_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="4 blocks"):
        dkm_module(tmp_path, "model.feature_blocks=[up_blocks.2]")
    with pytest.raises(ValueError, match="valid blocks are"):
        dkm_module(tmp_path, "model.feature_blocks=[up_blocks.2,up_blocks.1,up_blocks.0,nope]")
    with pytest.raises(ValueError, match="partial DKMSegNet"):
        dkm_module(tmp_path, "~model.net._partial_", "+model.net.dm_channels=[8,16,16,16]")
