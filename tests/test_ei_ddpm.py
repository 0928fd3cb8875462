"""EI-DDPM: evidence maths pinned by hand, the parallel paths, the method end to end (BraTS replica, DDP,
predict) and the learned reliabilities (slow)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import assert_close, compose_config
from hydra.utils import instantiate
from monai.losses import DiceLoss
from scipy.special import digamma
from test_data_brats import write_brats

from diffseg_lightning.data.synthetic_multimodal import SyntheticMultiModal
from diffseg_lightning.diffusion import BernoulliKernel, GaussianKernel
from diffseg_lightning.exceptions import ConfigError
from diffseg_lightning.inference.evidence import (
    TotalConflictError,
    contextual_discount,
    contour_function,
    dempster,
    dempster_opinions,
    dirichlet_opinion,
    discounted_plausibility,
    opinion_to_mass,
)
from diffseg_lightning.inference.sampler import DiffusionSampler
from diffseg_lightning.losses import dirichlet_kl_uniform, evidential_loss, soft_dice_loss
from diffseg_lightning.methods.ei_ddpm import EIDDPMModule
from diffseg_lightning.nets.ei_ddpm import ParallelDenoisers
from diffseg_lightning.nets.medsegdiff import MedSegDiffUNet

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def mass2(a: float, b: float, omega: float) -> torch.Tensor:
    """A mass function on {a, b}: entries for the subsets (empty, {a}, {b}, Omega) (bitmask order)."""
    return torch.tensor([0.0, a, b, omega], dtype=F64)


# ------------------------------------------------------------------------------------------ Dempster
def test_dempster_two_sources_by_hand():
    # m1 = (0.6, 0.1, Omega 0.3), m2 = (0.2, 0.5, Omega 0.3): conflict 0.6*0.5 + 0.1*0.2 = 0.32
    # {a}: 0.12 + 0.18 + 0.06 = 0.36, {b}: 0.05 + 0.03 + 0.15 = 0.23, Omega: 0.09; / 0.68
    out = dempster(torch.stack([mass2(0.6, 0.1, 0.3), mass2(0.2, 0.5, 0.3)]), dim=1)
    assert_close(out, torch.tensor([0.0, 9 / 17, 23 / 68, 9 / 68], dtype=F64), "two sources")
    closed = dempster_opinions(
        torch.tensor([[0.6, 0.1], [0.2, 0.5]], dtype=F64), torch.tensor([[0.3], [0.3]], dtype=F64), dim=1
    )
    assert_close(closed["belief"], torch.tensor([9 / 17, 23 / 68], dtype=F64), "closed form")
    assert_close(closed["uncertainty"], torch.tensor([9 / 68], dtype=F64), "closed form u")
    assert_close(closed["conflict"], torch.tensor([0.32], dtype=F64), "conflict")


def test_dempster_three_sources_by_hand_and_order_free():
    # m12 = (36, 23, 9) / 68 with m3 = (0.5, 0, Omega 0.5): conflict 11.5/68; {a} 40.5, {b} 11.5, Omega 4.5
    # -> normalised by 56.5: (81, 23, 9) / 113
    m = [mass2(0.6, 0.1, 0.3), mass2(0.2, 0.5, 0.3), mass2(0.5, 0.0, 0.5)]
    expected = torch.tensor([0.0, 81 / 113, 23 / 113, 9 / 113], dtype=F64)
    assert_close(dempster(torch.stack(m), dim=1), expected, "three sources")
    assert_close(dempster(torch.stack(m[::-1]), dim=1), expected, "reversed order")
    b = torch.tensor([[0.6, 0.1], [0.2, 0.5], [0.5, 0.0]], dtype=F64)
    u = torch.tensor([[0.3], [0.3], [0.5]], dtype=F64)
    assert_close(dempster_opinions(b, u, dim=1)["belief"], expected[1:3], "closed form, three")


def test_dempster_total_conflict_is_a_clear_error_not_nan():
    certain_a, certain_b = mass2(1.0, 0.0, 0.0), mass2(0.0, 1.0, 0.0)
    with pytest.raises(TotalConflictError, match="total conflict"):
        dempster(torch.stack([certain_a, certain_b]), dim=1)
    with pytest.raises(ValueError, match="total conflict"):  # also a ValueError
        dempster_opinions(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.zeros(2, 1), dim=1)
    # one conflicting pixel among many is found
    masses = torch.stack([mass2(0.5, 0.2, 0.3)] * 5 + [certain_a]).T.reshape(1, 4, 6).expand(2, 4, 6).clone()
    masses[1, :, 5] = certain_b
    with pytest.raises(TotalConflictError):
        dempster(masses, dim=1)


def test_dempster_is_batched_over_pixels():
    torch.manual_seed(0)
    raw = torch.rand(3, 2, 8, 5, 4, dtype=F64)  # (M, B, 2^3, H, W)
    raw[:, :, 0] = 0  # no mass on the empty set
    masses = raw / raw.sum(2, keepdim=True)
    out = dempster(masses, dim=2)
    assert out.shape == (2, 8, 5, 4)
    assert_close(out.sum(1), torch.ones(2, 5, 4, dtype=F64), "sums to one")
    one = dempster(masses[:, 1, :, 3, 2].unsqueeze(-1), dim=1).squeeze(-1)
    assert_close(out[1, :, 3, 2], one, "pixel alone")


# ----------------------------------------------------------------------------------------------- EIL
def test_eil_by_hand_and_masses_sum_to_one():
    e = torch.tensor([2.0, 0.0, 1.0], dtype=F64).reshape(1, 3, 1, 1)
    op = dirichlet_opinion(e, dim=1)
    assert_close(op["alpha"].flatten(), torch.tensor([3.0, 1.0, 2.0], dtype=F64), "alpha")
    assert_close(op["belief"].flatten(), torch.tensor([2 / 6, 0.0, 1 / 6], dtype=F64), "belief")
    assert_close(op["uncertainty"].flatten(), torch.tensor([3 / 6], dtype=F64), "u = K / S")
    torch.manual_seed(1)
    e = torch.nn.functional.softplus(torch.randn(2, 4, 6, 6) * 5)
    op = dirichlet_opinion(e, dim=1)
    assert_close(op["belief"].sum(1, keepdim=True) + op["uncertainty"], torch.ones(2, 1, 6, 6), "sum")
    with pytest.raises(ValueError, match="non-negative"):
        dirichlet_opinion(-e)


def test_evidential_loss_by_hand_and_kl_against_torch():
    alpha = torch.tensor([3.0, 1.0, 2.0], dtype=F64).reshape(1, 3, 1, 1)
    y = torch.tensor([0.0, 0.0, 1.0], dtype=F64).reshape(1, 3, 1, 1)
    out = evidential_loss(alpha, y, annealing=0.25)
    ace = digamma(6.0) - digamma(2.0)
    assert float(out["ace"]) == pytest.approx(ace, rel=1e-10)
    # alpha_tilde = y + (1 - y) * alpha = (3, 1, 1): KL(Dir(3, 1, 1) || Dir(1, 1, 1))
    reference = torch.distributions.kl_divergence(
        torch.distributions.Dirichlet(torch.tensor([3.0, 1.0, 1.0], dtype=F64)),
        torch.distributions.Dirichlet(torch.ones(3, dtype=F64)),
    )
    assert float(out["kl"]) == pytest.approx(float(reference), rel=1e-10)
    assert float(out["loss"]) == pytest.approx(ace + 0.25 * float(reference), rel=1e-10)
    torch.manual_seed(2)
    a = torch.rand(5, 4, dtype=F64) * 7 + 0.5
    ref = torch.distributions.kl_divergence(
        torch.distributions.Dirichlet(a), torch.distributions.Dirichlet(torch.ones_like(a))
    )
    assert_close(dirichlet_kl_uniform(a, dim=1), ref, "KL, batch")


def test_soft_dice_loss_against_monai():
    torch.manual_seed(3)
    p = torch.softmax(torch.randn(2, 4, 8, 8), 1)
    g = torch.nn.functional.one_hot(torch.randint(0, 4, (2, 8, 8)), 4).permute(0, 3, 1, 2).float()
    ours = soft_dice_loss(p, g, eps=0.0)
    monai = DiceLoss(include_background=True, smooth_nr=0.0, smooth_dr=0.0)(p, g)
    assert float(ours) == pytest.approx(float(monai), rel=1e-5)
    # by hand: S = (1, 0.5, 0), G = (1, 1, 0): 1 - 2 * 1.5 / (1.5 + 2) = 1/7
    s = torch.tensor([1.0, 0.5, 0.0]).reshape(1, 1, 1, 3)
    gg = torch.tensor([1.0, 1.0, 0.0]).reshape(1, 1, 1, 3)
    assert float(soft_dice_loss(s, gg, eps=0.0)) == pytest.approx(1 / 7)


# ------------------------------------------------------------------------------ contextual discounting
def test_contextual_discount_by_hand_and_limits():
    m = mass2(0.6, 0.1, 0.3)
    # beta = (0.5, 0.8): b'({a}) = 0.6 * 0.8, b'({b}) = 0.1 * 0.5 -> m' = (0.48, 0.05, Omega 0.47)
    out = contextual_discount(m, torch.tensor([0.5, 0.8], dtype=F64), dim=0)
    assert_close(out, torch.tensor([0.0, 0.48, 0.05, 0.47], dtype=F64), "by hand")
    # its contour function is 1 - beta + beta pl (Huang et al. 2022)
    pl = contour_function(m, dim=0)
    assert_close(contour_function(out, dim=0), 1 - torch.tensor([0.5, 0.8], dtype=F64) * (1 - pl), "contour")
    torch.manual_seed(4)
    raw = torch.rand(3, 16, 5, dtype=F64)  # K = 4, subsets on dim 1
    raw[:, 0] = 0
    masses = raw / raw.sum(1, keepdim=True)
    assert_close(contextual_discount(masses, torch.ones(4, dtype=F64), dim=1), masses, "beta = 1: unchanged")
    vacuous = torch.zeros(3, 16, 5, dtype=F64)
    vacuous[:, 15] = 1
    assert_close(contextual_discount(masses, torch.zeros(4, dtype=F64), dim=1), vacuous, "beta = 0: vacuous")
    beta = torch.rand(4, dtype=F64)
    assert_close(
        contour_function(contextual_discount(masses, beta, dim=1), dim=1),
        1 - beta[None, :, None] + beta[None, :, None] * contour_function(masses, dim=1),
        "contour, K = 4",
    )


def test_discounted_plausibility_equals_full_discount_then_dempster():
    torch.manual_seed(5)
    m_, b_, k = 4, 2, 3
    e = torch.nn.functional.softplus(torch.randn(m_, b_, k, 3, 3, dtype=F64) * 3)
    op = dirichlet_opinion(e, dim=2)
    beta = torch.rand(m_, k, dtype=F64)
    fast = discounted_plausibility(op["belief"], op["uncertainty"], beta[:, None, :, None, None], dim=2)
    masses = opinion_to_mass(op["belief"], op["uncertainty"], dim=2)  # (M, B, 8, 3, 3)
    discounted = contextual_discount(masses, beta[:, None, None, None, :], dim=2)
    pl = contour_function(dempster(discounted, dim=2), dim=1)
    assert_close(fast, pl / pl.sum(1, keepdim=True), "fast path = power-set path")
    ones = discounted_plausibility(op["belief"], op["uncertainty"], torch.ones(1, dtype=F64), dim=2)
    plain = dempster_opinions(op["belief"], op["uncertainty"], dim=2)
    pl_plain = plain["belief"] + plain["uncertainty"]
    assert_close(ones, pl_plain / pl_plain.sum(1, keepdim=True), "beta = 1: plain Dempster")


# ---------------------------------------------------------------------------------- parallel paths
def tiny_path(k: int = 4) -> MedSegDiffUNet:
    return MedSegDiffUNet(
        image_channels=1,
        mask_channels=k,
        base_channels=8,
        channel_mults=(1, 2),
        attention_levels=(False, False),
        ff_parser_size=16,
    )


def test_parallel_paths_equal_separate_networks():
    torch.manual_seed(6)
    paths = ParallelDenoisers(tiny_path, num_paths=3)
    with torch.no_grad():  # the zero-initialised heads make every output 0: give them weights
        for p in paths.weights:
            p.add_(0.05 * torch.randn_like(p))
    x, t, image = torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.randn(2, 3, 16, 16)
    out = paths(x, t, paths.encode_condition(image))
    assert out.shape == (2, 3, 4, 16, 16)
    for m in range(3):
        net = tiny_path()
        net.load_state_dict(paths.path_state_dict(m))
        assert_close(out[:, m], net(x, t, net.encode_condition(image[:, m : m + 1])), f"path {m}")
    assert not torch.allclose(out[:, 0], out[:, 1])  # separate weights
    out.square().mean().backward()
    assert all(p.grad is not None for p in paths.weights)
    with pytest.raises(ValueError, match="one channel per path"):
        paths.encode_condition(torch.randn(2, 4, 16, 16))
    # from one module: path 0 keeps its weights, the others are re-initialised, zero heads stay zero
    net = tiny_path()
    copies = ParallelDenoisers(net, num_paths=2)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in copies.path_state_dict(0).items())
    other = copies.path_state_dict(1)
    assert not torch.equal(other["mask_stem.conv.weight"], net.state_dict()["mask_stem.conv.weight"])
    assert all(not v.any() for k, v in other.items() if not net.state_dict()[k].any())


# ------------------------------------------------------------------------------------------ data
def test_synthetic_multimodal_regions_nested_and_corruption():
    data = SyntheticMultiModal(num_cases=4, size=32, split="test")
    item = data[1]
    assert item["image"].shape == (4, 32, 32) and item["mask"].shape == (3, 32, 32)
    wt, tc, et = item["mask"]
    assert bool((tc <= wt).all()) and bool((et <= tc).all()) and et.sum() > 0
    assert torch.equal(data[1]["image"], item["image"])  # deterministic
    noisy = SyntheticMultiModal(num_cases=4, size=32, split="test", corrupt="noise", corrupt_level=4.0)[1]
    gone = SyntheticMultiModal(num_cases=4, size=32, split="test", corrupt="missing")[1]
    assert torch.equal(noisy["mask"], item["mask"]) and bool(noisy["corrupted"])
    assert torch.equal(noisy["image"][:3], item["image"][:3])  # only flair changes

    def contrast(image, region):  # mean inside minus outside
        return float(image[region > 0].mean() - image[region == 0].mean())

    assert contrast(item["image"][3], wt) > 1.0  # flair shows WT
    assert abs(contrast(gone["image"][3], wt)) < 0.5  # missing: no lesion signal
    assert contrast(item["image"][2], tc) > 1.0  # t2 shows TC
    with pytest.raises(ValueError, match="corrupt must be"):
        SyntheticMultiModal(corrupt="blur")


# ------------------------------------------------------------------------------------------ method
TINY_EI = [
    "model.denoiser.base_channels=8",
    "model.denoiser.channel_mults=[1,2]",
    "model.denoiser.attention_levels=[false,false]",
    "sampler.num_steps=2",
    "sampler.num_samples=2",
    "trainer.accelerator=cpu",
    "trainer.enable_model_summary=false",
    "logger=csv",
    "~callbacks.progress_bar",
]


def test_method_labels_round_trip_and_errors(tmp_path):
    cfg = compose_config(
        "train", ["model=ei_ddpm", "data=synthetic_multimodal", "noise.objective=x0", *TINY_EI], tmp_path
    )
    from diffseg_lightning.entry import build_module

    module = build_module(cfg.model, cfg.noise, cfg.sampler)
    mask = SyntheticMultiModal(num_cases=2, size=32)[0]["mask"][None]
    classes = module.regions_to_classes(mask)
    assert bool((classes.sum(1) == 1).all()) and classes.shape == (1, 4, 32, 32)
    assert torch.equal(module.classes_to_regions(classes), mask)
    with pytest.raises(ValueError, match="not nested"):
        module.regions_to_classes(mask.flip(1))
    assert module.reliability.shape == (4, 4) and float(module.reliability.detach().mean()) == pytest.approx(
        0.5
    )
    with pytest.raises(ValueError, match="fusion must be one of"):
        instantiate(cfg.model, _partial_=True)(
            kernel=instantiate(cfg.noise), sampler=instantiate(cfg.sampler), fusion="max"
        )


def brats_overrides(root: Path) -> list[str]:
    return [
        "experiment=ei_ddpm_brats",
        f"data.root={root}",
        "data.crop=null",
        "data.size=16",
        "data.fractions=[0.34,0.33,0.33]",
        "data.batch_size=4",
        "data.eval_batch_size=4",
        "data.num_workers=0",
        "model.denoiser.ff_parser_size=16",
        "debug=fast_dev_run",
        *TINY_EI,
    ]


def check_summary(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    assert summary["num_cases"] > 0
    table = summary["reliability"]
    assert list(table) == ["t1", "t1ce", "t2", "flair"]
    assert list(table["t1"]) == ["background", "ED", "NCR", "ET"]
    assert all(0 < v < 1 for row in table.values() for v in row.values())
    assert {"dice_WT", "dice_TC", "dice_ET", "hd95_ET"} <= set(summary["mean"])
    return summary


def test_fast_dev_run_brats_replica_then_predict(tmp_path):
    from diffseg_lightning.predict import predict
    from diffseg_lightning.train import train

    write_brats(tmp_path / "brats", cases=3)
    run = tmp_path / "run"
    train(compose_config("train", brats_overrides(tmp_path / "brats"), run))
    summary = check_summary(run)
    rows = summary["metric_per_case"]
    assert all(set(row) >= {"dice", "dice_WT", "hd95_TC"} for row in rows)
    ckpts = list(run.rglob("*.ckpt"))
    assert ckpts, "no checkpoint"
    # predict on one 4-channel NIfTI slice (H, W, 4), the modalities stacked on the last axis
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    image = np.random.default_rng(0).normal(size=(16, 16, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.eye(4)), inputs / "slice.nii.gz")
    out = tmp_path / "pred"
    predict(
        compose_config(
            "predict",
            [
                f"ckpt_path={ckpts[0]}",
                f"input_dir={inputs}",
                f"output_dir={out}",
                "sampler.num_steps=2",
                "sampler.num_samples=2",
                "trainer.accelerator=cpu",
                "progress_bar=false",
            ],
            tmp_path,
        )
    )
    written = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert any("slice" in name for name in written), written


@pytest.mark.ddp
def test_fast_dev_run_brats_replica_ddp_cpu(tmp_path):
    from diffseg_lightning.train import train

    write_brats(tmp_path / "brats", cases=6)  # 2 training cases: one batch on each of the 2 ranks
    run = tmp_path / "run"
    train(
        compose_config(
            "train",
            [*brats_overrides(tmp_path / "brats"), "trainer=ddp_cpu", "trainer.strategy=ddp_spawn"],
            run,
        )
    )
    check_summary(run)


def test_epsilon_kernel_gets_the_noise_of_the_fused_x0(tmp_path):
    from diffseg_lightning.entry import build_module

    cfg = compose_config(
        "train", ["model=ei_ddpm", "data=synthetic_multimodal", "noise.objective=epsilon", *TINY_EI], tmp_path
    )
    module = build_module(cfg.model, cfg.noise, cfg.sampler)
    torch.manual_seed(7)
    p = torch.softmax(torch.randn(2, 4, 8, 8), 1)
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    x0, _, _ = module.kernel.predict_x0_eps(module.model_output(p, x_t, t), x_t, t, clip=False)
    # float32 round trip through 1 / sqrt(abar_t) (about 6 at t = 900): 1e-4
    assert float((x0 - (2 * p - 1)).abs().max()) < 1e-4


def test_sample_layout_and_bad_image(tmp_path):
    from diffseg_lightning.entry import build_module

    cfg = compose_config(
        "train", ["model=ei_ddpm", "data=synthetic_multimodal", "noise.objective=x0", *TINY_EI], tmp_path
    )
    module = build_module(cfg.model, cfg.noise, cfg.sampler).eval()
    image = torch.stack([SyntheticMultiModal(num_cases=2, size=32)[i]["image"] for i in range(2)])
    with torch.inference_mode():
        out = module.sample(image, torch.tensor([0, 1]))
        again = module.sample(image[1:], torch.tensor([1]))
    assert out["samples"].shape == (2, 2, 3, 32, 32) and out["mask"].shape == (2, 3, 32, 32)
    assert_close(out["class_probability"].sum(1), torch.ones(2, 32, 32), "classes sum to one")
    # nested regions: P(WT) >= P(TC) >= P(ET) at every pixel
    assert bool((out["samples"][:, :, 0] >= out["samples"][:, :, 1] - 1e-6).all())
    assert bool((out["samples"][:, :, 1] >= out["samples"][:, :, 2] - 1e-6).all())
    assert_close(again["probability"][0], out["probability"][1], "per-case seeds: batch-independent")
    with pytest.raises(ValueError, match="one channel per modality"):
        module.sample(image[:, :3])


@pytest.mark.slow
def test_corrupted_modality_reliability_ends_lowest(tmp_path):
    """FLAIR without its lesion signal (the experiment's data.corrupt=missing): after the experiment's
    training (1024 cases x 2 epochs), its mean learned reliability over the classes is the lowest."""
    from diffseg_lightning.train import train

    run = tmp_path / "run"
    train(
        compose_config(
            "train",
            [
                "experiment=ei_ddpm_synthetic",
                "data.num_test=8",
                "sampler.num_steps=2",
                "sampler.num_samples=1",
                "trainer.accelerator=cpu",
                "trainer.enable_model_summary=false",
                "logger=csv",
                "~callbacks.progress_bar",
            ],
            run,
        )
    )
    table = json.loads((run / "summary.json").read_text())["reliability"]
    mean = {modality: float(np.mean(list(row.values()))) for modality, row in table.items()}
    assert min(mean, key=mean.get) == "flair", mean


def test_the_kernel_must_be_gaussian_without_learned_variance():
    sampler = DiffusionSampler(num_steps=2)
    with pytest.raises(ConfigError, match="noise=gaussian.*got a BernoulliKernel"):
        EIDDPMModule(tiny_path, BernoulliKernel(), sampler, torch.optim.Adam)
    with pytest.raises(ConfigError, match="noise.learn_variance=false"):
        EIDDPMModule(tiny_path, GaussianKernel(learn_variance=True), sampler, torch.optim.Adam)


def test_training_step_is_the_fused_kernel_loss_at_one_draw():
    """diffusion_loss's draws (t, then the noise), the paths on x_t, and the kernel's x0 loss of the fused
    prediction ``2 p - 1``, recomputed by hand."""
    torch.manual_seed(0)
    factory = functools.partial(
        MedSegDiffUNet,
        base_channels=8,
        channel_mults=(1, 2),
        attention_levels=(False, False),
        ff_parser_size=16,
    )  # the module sets image, mask and output channels
    module = EIDDPMModule(
        factory, GaussianKernel(100, objective="x0"), DiffusionSampler(num_steps=2), torch.optim.Adam,
        mask_channels=3, num_modalities=2,
    )  # fmt: skip
    module.log_dict = lambda *args, **kwargs: None
    mask = torch.zeros(2, 3, 16, 16)
    mask[:, 0, 2:12, 2:12], mask[:, 1, 4:10, 4:10], mask[:, 2, 5:8, 5:8] = 1, 1, 1
    batch = {"image": torch.randn(2, 2, 16, 16), "mask": mask}
    torch.manual_seed(3)
    loss = module.training_step(batch, 0)
    torch.manual_seed(3)
    classes = module.regions_to_classes(mask)
    x0 = 2 * classes - 1
    t = torch.randint(0, 100, (2,))
    x_t = module.kernel.q_sample(x0, t, noise=torch.randn(x0.shape))
    output = module(x_t, t, batch["image"]).float()
    fused = module.fuse(output)
    ddpm = ((2 * fused["probability"] - 1 - x0) ** 2).mean()  # the x0 objective's MSE (lambda_ddpm = 1)
    expected = module.losses(output, fused, classes, ddpm)["loss"]
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)  # float32, the same operations
