"""The denoiser contract, checked the same way for every mask-diffusion denoiser of the zoo.

Each model is built from its own Hydra config (small widths), then: shapes at two sizes for 1, 3 and 4 image
channels and multi-class masks; a gradient reaching every parameter; determinism under a seed; the cached
image branch (``encode_condition`` once, repeated for S samples) equal to the uncached path; and no module
created inside ``forward`` (the released MedSegDiff builds an untrained convolution on every pass).
"""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config
from hydra.utils import instantiate

from diffseg_lightning.inference.sampler import repeat_condition

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {  # widths that keep one pass to milliseconds; every architectural part stays in
    "medsegdiff": ["model.denoiser.base_channels=8", "model.denoiser.channel_mults=[1,2]", "model.denoiser.attention_levels=[false,true]", "model.denoiser.num_heads=2"],
    "berdiff": ["model.denoiser.channels=[8,16]", "model.denoiser.attention_levels=[false,true]", "model.denoiser.norm_num_groups=4", "model.denoiser.num_head_channels=8"],
    "medsegdiff_v2": ["model.denoiser.base_channels=8", "model.denoiser.channel_mults=[1,2]", "model.denoiser.attention_levels=[false,true]", "model.denoiser.num_heads=2", "model.denoiser.ssformer_blocks=1", "model.denoiser.ssformer_heads=2", "model.denoiser.nbp_hidden=8"],
    "dtunet": ["model.denoiser.embed_dim=16", "model.denoiser.channel_mults=[1,2]", "model.denoiser.depths=[1,1]", "model.denoiser.window_sizes=[2,4]", "model.denoiser.head_channels=8", "model.denoiser.patch_size=2"],
    "mbdiff": ["model.denoiser.base_channels=8", "model.denoiser.channel_mults=[1,2]", "model.denoiser.num_res_blocks=1", "model.denoiser.attention_levels=[false,true]", "model.denoiser.num_heads=2"],
}  # fmt: skip
SIZES = ((32, 32), (16, 48))


def build(
    model: str, tmp_path, channels: int = 1, mask_channels: int = 1, noise: str = "gaussian"
) -> torch.nn.Module:
    overrides = [
        f"model={model}",
        f"noise={noise}",
        f"data.channels={channels}",
        f"data.mask_channels={mask_channels}",
        *SMALL[model],
    ]
    torch.manual_seed(0)
    net = instantiate(compose_config("train", overrides, tmp_path).model.denoiser)
    for p in net.parameters():  # zero-initialised output layers would hide the gradient of the rest
        p.data.add_(0.05 * torch.randn_like(p))
    return net


def test_every_diffusion_model_config_is_covered():
    from pathlib import Path

    import yaml

    from diffseg_lightning.utils import CONFIG_DIR

    configs = {
        p.stem
        for p in (Path(CONFIG_DIR) / "model").glob("*.yaml")
        if yaml.safe_load(p.read_text())["_target_"].endswith("MaskDiffusionModule")
    }
    assert {"medsegdiff", "berdiff"} <= configs
    assert configs == set(SMALL)  # a new mask-diffusion denoiser must join this contract test


@pytest.mark.parametrize("model", sorted(SMALL))
@pytest.mark.parametrize("channels, mask_channels", [(1, 1), (3, 2), (4, 3)])
def test_shapes_at_two_sizes(model, channels, mask_channels, tmp_path):
    net = build(model, tmp_path, channels, mask_channels).eval()
    for size in SIZES:
        image, x = torch.randn(2, channels, *size), torch.randn(2, mask_channels, *size)
        with torch.no_grad():
            out = net(x, torch.tensor([0, 999]), net.encode_condition(image))
        assert out.shape == (2, mask_channels, *size) and torch.isfinite(out).all()


@pytest.mark.parametrize("model", sorted(SMALL))
def test_gradient_reaches_every_parameter(model, tmp_path):
    net = build(model, tmp_path, channels=3)
    image, x = torch.randn(2, 3, 32, 32), torch.randn(2, 1, 32, 32)
    net(x, torch.tensor([5, 700]), net.encode_condition(image)).pow(2).mean().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"{model}: no gradient for {missing[:5]}"


@pytest.mark.parametrize("model", sorted(SMALL))
def test_deterministic_cached_and_builds_nothing_in_forward(model, tmp_path, monkeypatch):
    net = build(model, tmp_path, channels=3).eval()
    image, x, t = torch.randn(2, 3, 32, 32), torch.randn(6, 1, 32, 32), torch.tensor([3, 3, 3, 600, 600, 600])
    keys = list(net.state_dict())
    parameters = [id(p) for p in net.parameters()]

    def no_new_modules(self, *args, **kwargs):
        raise AssertionError(f"{model}: {type(self).__name__} created inside forward")

    with torch.no_grad():
        cond = net.encode_condition(image)
        cached = net(x, t, repeat_condition(cond, 3))  # the sampler: one image branch, S = 3 samples
        monkeypatch.setattr(torch.nn.Module, "__init__", no_new_modules)
        uncached = net(x, t, net.encode_condition(image.repeat_interleave(3, 0)))
        again = net(x, t, repeat_condition(net.encode_condition(image), 3))
    assert torch.allclose(cached, uncached, atol=1e-5) and torch.equal(cached, again)
    assert list(net.state_dict()) == keys and [id(p) for p in net.parameters()] == parameters


@pytest.mark.parametrize("model", sorted(SMALL))
def test_runs_with_the_bernoulli_kernel_too(model, tmp_path):
    net = build(model, tmp_path, noise="bernoulli").eval()  # out_channels from the kernel's config
    kernel = instantiate(compose_config("train", ["noise=bernoulli"], tmp_path).noise)
    x = kernel.sample_prior((2, 1, 32, 32), device="cpu", generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = net(x, torch.tensor([999, 999]), net.encode_condition(torch.randn(2, 1, 32, 32)))
        solver = kernel.default_solver()  # the Bernoulli posterior step
        x_prev, x0 = solver.step(kernel, out, torch.tensor([999, 999]), torch.tensor([500, 500]), x)
    assert set(x_prev.unique().tolist()) <= {0.0, 1.0} and ((x0 >= 0) & (x0 <= 1)).all()


def test_macs_count_matches_a_hand_count():
    from diffseg_lightning.utils.speed import count_macs

    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    linear = torch.nn.Linear(16, 4)
    assert count_macs(conv, (torch.zeros(1, 3, 32, 32),)) == 8 * 3 * 9 * 32 * 32  # out x in x kernel x pixels
    assert count_macs(linear, (torch.zeros(5, 16),)) == 5 * 16 * 4
