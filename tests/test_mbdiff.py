"""MB-Diff (Wang et al., MICCAI 2023): the guided denoiser, the evolution-uncertainty fusion and its sampler path,
the model config with both kernels, and the ISIC 2016 experiment."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import compose_config
from test_data_isic import write_isic
from torch import nn

from diffseg_lightning.diffusion import BernoulliKernel, GaussianKernel
from diffseg_lightning.inference import DiffusionSampler, evolution_fusion, fuse_samples, repeat_condition
from diffseg_lightning.nets.mbdiff import MBDiffUNet
from diffseg_lightning.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(
    base_channels=8, channel_mults=(1, 2), attention_levels=(False, True), num_res_blocks=1, num_heads=2
)


def tiny_net(seed: int = 0, **kwargs) -> MBDiffUNet:
    torch.manual_seed(seed)
    return MBDiffUNet(**{**TINY, **kwargs})


def perturb(net: nn.Module, std: float = 0.05) -> None:
    """Move every weight (the zero-initialised output convolution included) off its initial value."""
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)


def inputs(batch: int, image_channels: int, mask_channels: int, h: int, w: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, mask_channels, h, w, generator=gen),
        torch.randint(0, 1000, (batch,), generator=gen),
        torch.randn(batch, image_channels, h, w, generator=gen),
    )


# ------------------------------------------------------------------------------------------ the denoiser
@pytest.mark.parametrize("size", [(32, 32), (16, 48)])
@pytest.mark.parametrize(
    ("image_channels", "mask_channels", "out_channels"), [(1, 1, 1), (3, 1, 2), (4, 3, 6)]
)
def test_output_and_guidance_shapes(size, image_channels, mask_channels, out_channels):
    net = tiny_net(image_channels=image_channels, mask_channels=mask_channels, out_channels=out_channels)
    x_t, t, image = inputs(2, image_channels, mask_channels, *size)
    cond = net.encode_condition(image)
    h, w = size
    assert [tuple(g.shape) for g in cond] == [(2, 8, h, w), (2, 16, h // 2, w // 2)]
    assert net(x_t, t, cond).shape == (2, out_channels, h, w)
    assert net(x_t, 5, cond).shape == (2, out_channels, h, w)  # a scalar t is broadcast


def test_bad_inputs_are_named():
    net = tiny_net(image_channels=3)
    x_t, t, image = inputs(2, 3, 1, 31, 32)
    with pytest.raises(ValueError, match=r"image size \(H, W\) = \(31, 32\).*factor 2"):
        net.encode_condition(image)
    with pytest.raises(ValueError, match="MBDiffUNet: expected 3 image channels, got 1"):
        net.encode_condition(torch.zeros(2, 1, 32, 32))
    good = net.encode_condition(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"x_t size \(H, W\) = \(31, 32\)"):
        net(x_t, t, good)
    with pytest.raises(ValueError, match="`cond` must be encode_condition"):
        net(torch.zeros(2, 1, 16, 16), t, good)
    with pytest.raises(ValueError, match="attention_levels needs one flag per level"):
        MBDiffUNet(channel_mults=(1, 2), attention_levels=(False,))
    with pytest.raises(ValueError, match="guidance_blocks must be >= 1"):
        MBDiffUNet(guidance_blocks=0)


def test_every_parameter_gets_a_gradient():
    net = tiny_net(image_channels=3, out_channels=2, guidance_blocks=2)
    perturb(net)
    x_t, t, image = inputs(2, 3, 1, 16, 16)
    net(x_t, t, net.encode_condition(image)).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_the_image_guides_the_output():
    net = tiny_net()
    perturb(net)
    x_t, t, image = inputs(1, 3, 1, 16, 16)
    a = net(x_t, t, net.encode_condition(image))
    b = net(x_t, t, net.encode_condition(-image))
    assert not torch.allclose(a, b)


def test_deterministic_under_a_seed():
    x_t, t, image = inputs(2, 3, 1, 16, 16)
    outs = []
    for _ in range(2):
        net = tiny_net(seed=7, image_channels=3)
        perturb(net)
        outs.append(net(x_t, t, net.encode_condition(image)))
    assert torch.equal(outs[0], outs[1])


def test_cached_guidance_equals_the_uncached_forward():
    net = tiny_net(image_channels=3)
    perturb(net)
    _, _, image = inputs(2, 3, 1, 16, 16)
    x_t, t, _ = inputs(6, 3, 1, 16, 16, seed=2)
    cached = net(x_t, t, repeat_condition(net.encode_condition(image), 3))  # once per image, 3 samples each
    uncached = net.forward_with_image(x_t, t, image.repeat_interleave(3, 0))
    assert torch.allclose(cached, uncached, atol=1e-6)


def test_forward_creates_no_module(monkeypatch):
    net = tiny_net(image_channels=3, out_channels=2)
    keys = set(net.state_dict())
    params = {id(p) for p in net.parameters()}
    inits = []
    original = nn.Module.__init__

    def counting_init(self, *args, **kwargs):
        inits.append(type(self).__name__)
        original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "__init__", counting_init)
    x_t, t, image = inputs(2, 3, 1, 16, 16)
    net(x_t, t, net.encode_condition(image))
    assert inits == []  # no module (e.g. an untrained conv, as the released MedSegDiff builds) in forward
    assert set(net.state_dict()) == keys and {id(p) for p in net.parameters()} == params


def test_default_parameter_count():
    assert sum(p.numel() for p in MBDiffUNet(image_channels=3, out_channels=2).parameters()) == 13_915_650


# ------------------------------------------------------------------------------------ evolution fusion
def test_evolution_fusion_by_hand():
    # one pixel, n = 3 evolutions (kernel space): mu = 0.8, -0.2, 0.4; std exp(Sigma/2) = 0.2, 0.1, 0.3;
    # z = 1, -2, 0.5 -> y = 1.0, -0.4, 0.55 -> votes (y + 1)/2 clamped = 1.0, 0.3, 0.775, sum 2.075 >= 1.5
    mu = torch.tensor([0.8, -0.2, 0.4]).reshape(1, 3, 1, 1, 1)
    log_var = torch.log(torch.tensor([0.04, 0.01, 0.09])).reshape(1, 3, 1, 1, 1)
    z = torch.tensor([1.0, -2.0, 0.5]).reshape(1, 3, 1, 1, 1)
    decode = GaussianKernel().decode_mask
    out = evolution_fusion(mu, log_var, z, decode=decode)
    assert out["samples"].flatten().tolist() == pytest.approx([1.0, 0.3, 0.775], abs=1e-6)
    assert out["probability"].item() == pytest.approx(2.075 / 3, abs=1e-6)
    assert out["mask"].item() == 1.0
    # delta: the population std of decode(mu) = 0.9, 0.4, 0.7
    assert out["evolution_uncertainty"].item() == pytest.approx(math.sqrt(0.12666667 / 3), abs=1e-6)
    assert evolution_fusion(mu, log_var, z, tau=2.1, decode=decode)["mask"].item() == 0.0
    votes = out["samples"].sum().item()  # 2.075 in float32
    assert evolution_fusion(mu, log_var, z, tau=votes, decode=decode)["mask"].item() == 1.0  # >= tau
    assert evolution_fusion(mu, log_var, z, threshold=0.7, decode=decode)["mask"].item() == 0.0  # tau = 2.1


class FixedVarianceDenoiser(nn.Module):
    """Outputs [x0 = the image, v]: a known mean and a known learned-variance channel; counts its passes."""

    def __init__(self, v: float) -> None:
        super().__init__()
        self.v = v
        self.calls = 0

    def encode_condition(self, image):
        return image

    def forward(self, x_t, t, cond):
        self.calls += 1
        return torch.cat([cond, torch.full_like(cond, self.v)], dim=1)


def test_sampler_evolution_fusion_against_a_hand_computation():
    kernel = GaussianKernel(num_train_timesteps=100, objective="x0", learn_variance=True)
    image = torch.linspace(-1.5, 1.5, 2 * 16).reshape(2, 1, 4, 4)  # x0 predictions, clipped to [-1, 1]
    denoiser, v, seed, s = FixedVarianceDenoiser(v=0.3), 0.3, 5, 4
    sampler = DiffusionSampler(num_steps=4, num_samples=s, fusion="evolution", seed=seed)
    out = sampler.sample(denoiser, kernel, image, mask_channels=1, case_ids=torch.tensor([10, 11]))
    assert denoiser.calls == 4  # mu_i and Sigma_i come from the passes the sampler makes anyway

    t0 = kernel.inference_timesteps(4)[-1]  # the final step: t_0 -> -1
    frac = (v + 1) / 2
    log_var = frac * kernel.log_betas[t0] + (1 - frac) * kernel.posterior_log_variance_clipped[t0]
    for b, case in enumerate((10, 11)):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + case)
        torch.randn(s, 1, 4, 4, generator=gen)  # the prior y_T
        z = torch.randn(s, 1, 4, 4, generator=gen)  # then the z_i of the evolutions
        mu = image[b].clamp(-1, 1).expand(s, 1, 4, 4)
        y = ((mu + torch.exp(log_var / 2) * z + 1) / 2).clamp(0, 1)
        assert torch.allclose(out["samples"][b], y, atol=1e-6)
        assert torch.equal(out["mask"][b], (y.sum(0) >= s / 2).float())
        assert torch.allclose(out["probability"][b], y.mean(0), atol=1e-6)
        assert out["evolution_uncertainty"][b].abs().max() < 1e-6  # every evolution has the same mean here
    assert {"std", "entropy", "mutual_information"} <= set(out)
    assert sampler.settings()["fusion"] == "evolution" and sampler.settings()["tau"] is None


@pytest.mark.parametrize(
    "kernel", [GaussianKernel(num_train_timesteps=50), BernoulliKernel(num_train_timesteps=50)]
)
def test_evolution_fusion_refuses_a_kernel_without_learned_variance(kernel):
    denoiser = FixedVarianceDenoiser(v=0.0)
    sampler = DiffusionSampler(num_steps=2, num_samples=2, fusion="evolution")
    with pytest.raises(
        ValueError, match=r"needs a kernel with a learned variance.*noise\.learn_variance=true"
    ):
        sampler.sample(denoiser, kernel, torch.zeros(1, 1, 4, 4), mask_channels=1)
    assert denoiser.calls == 0  # refused before sampling
    with pytest.raises(ValueError, match="use DiffusionSampler"):
        fuse_samples(torch.rand(1, 2, 1, 4, 4), "evolution")


def test_tau_is_validated():
    with pytest.raises(ValueError, match=r"sampler.tau must be null or a number in \[0, num_samples=3\]"):
        DiffusionSampler(num_samples=3, fusion="evolution", tau=4.0)
    assert DiffusionSampler(num_samples=3, fusion="evolution", tau=1.5).tau == 1.5


# ------------------------------------------------------------------------------------- configs, end to end
SMALL = [
    "model.denoiser.base_channels=8",
    "model.denoiser.channel_mults=[1,2]",
    "model.denoiser.attention_levels=[false,true]",
    "model.denoiser.num_res_blocks=1",
    "model.denoiser.num_heads=2",
]
FAST = ["debug=fast_dev_run", "logger=csv", "~callbacks.progress_bar"]  # 2 steps, 2 samples


@pytest.mark.parametrize(
    "noise", ["gaussian noise.learn_variance=true sampler.fusion=evolution", "bernoulli"]
)
def test_model_config_runs_with_both_kernels(noise, tmp_path):
    kernel, *extra = noise.split()
    cfg = compose_config(
        "train",
        [
            "model=mbdiff",
            f"noise={kernel}",
            *extra,
            *SMALL,
            *FAST,
            "data.size=32",
            "data.num_train=4",
            "data.num_val=2",
            "data.num_test=2",
            "data.batch_size=2",
            "data.eval_batch_size=2",
        ],
        tmp_path,
    )
    assert cfg.model.denoiser.out_channels == (2 if kernel == "gaussian" else 1)
    train(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["sampler"]["fusion"] == ("evolution" if kernel == "gaussian" else "mean")


def test_the_experiment_fusion_follows_the_kernel(tmp_path):
    def fusion(*overrides):
        cfg = compose_config("train", ["experiment=mbdiff_isic2016", *overrides], tmp_path)
        return cfg.sampler.fusion, cfg.model.denoiser.out_channels, cfg.data.year, cfg.data.size

    assert fusion("noise.learn_variance=true") == ("evolution", 2, 2016, 256)  # the paper
    assert fusion() == ("vote", 1, 2016, 256)
    assert fusion("noise=bernoulli") == ("vote", 1, 2016, 256)
    assert fusion("noise.learn_variance=true", "sampler.fusion=mean")[0] == "mean"


@pytest.mark.parametrize("noise", [["noise.learn_variance=true"], ["noise=bernoulli"]])
def test_the_isic2016_experiment_runs_with_both_kernels(noise, tmp_path):
    write_isic(tmp_path / "isic", 2016)
    cfg = compose_config(
        "train",
        [
            "experiment=mbdiff_isic2016",
            f"data.root={tmp_path / 'isic'}",
            *noise,
            *SMALL,
            *FAST,
            "data.size=32",
            "data.batch_size=2",
            "data.eval_batch_size=2",
            "data.num_workers=0",
        ],
        tmp_path / "run",
    )
    train(cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["sampler"]["num_samples"] == 2  # debug=fast_dev_run's; the experiment's n = 5
    assert summary["sampler"]["fusion"] == ("vote" if noise == ["noise=bernoulli"] else "evolution")
