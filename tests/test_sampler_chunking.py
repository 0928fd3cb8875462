"""``sampler.max_batch``: each step's (B*S) network pass split into chunks, with identical samples."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffseg_lightning.diffusion import DDIM, DDPM, BernoulliKernel, GaussianKernel
from diffseg_lightning.inference import DiffusionSampler, repeat_condition, slice_condition


def row_by_row(f, *tensors):
    """``f`` on one row at a time: float32 conv and tanh results depend on the batch they run in (another
    kernel path, a vectorised body vs a scalar tail), so a row-by-row net makes chunked and whole passes
    bitwise equal, and the tests below check the sampler's slicing and concatenation exactly."""
    return torch.cat([f(*(x[i : i + 1] for x in tensors)) for i in range(tensors[0].shape[0])])


class TinyDenoiser(nn.Module):
    """A fixed random conv net on [x_t, image], row by row; records the rows of every pass."""

    def __init__(self, out_channels: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, out_channels, 3, padding=1)
        self.rows: list[int] = []

    def encode_condition(self, image):
        return image

    def forward(self, x_t, t, cond):
        self.rows.append(x_t.shape[0])
        assert cond.shape[0] == x_t.shape[0] == t.shape[0]
        return row_by_row(
            lambda x, c, s: torch.tanh(self.conv(torch.cat([x, c], 1)) + s.float().view(-1, 1, 1, 1) / 100),
            x_t,
            cond,
            t,
        )


class DictDenoiser(nn.Module):
    """A condition as a dict of batch-first tensors, nested in a tuple; checks each chunk's rows agree."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, padding=1)
        self.rows: list[int] = []

    def encode_condition(self, image):
        return {"image": image, "extra": (image.flatten(1).mean(1), [image * 0.5])}

    def forward(self, x_t, t, cond):
        self.rows.append(x_t.shape[0])
        mean, (half,) = cond["extra"]
        assert cond["image"].shape[0] == mean.shape[0] == half.shape[0] == x_t.shape[0]
        return row_by_row(
            lambda x, c, h, m: torch.tanh(self.conv(torch.cat([x, c, h], 1)) + m.view(-1, 1, 1, 1)),
            x_t,
            cond["image"],
            half,
            mean,
        )


#: name -> (kernel, solver; None: the kernel's default)
KERNELS = {
    "ddim_eta0": lambda: (GaussianKernel(num_train_timesteps=50, objective="x0"), None),
    "ddpm": lambda: (GaussianKernel(num_train_timesteps=50, objective="x0"), DDPM()),
    "ddim_eta1": lambda: (GaussianKernel(num_train_timesteps=50, objective="epsilon"), DDIM(eta=1.0)),
    "bernoulli": lambda: (BernoulliKernel(num_train_timesteps=50), None),
}


def sample(max_batch, kernel, net, images, solver=None, **kwargs):
    sampler = DiffusionSampler(
        num_steps=5, num_samples=3, seed=3, max_batch=max_batch, solver=solver, **kwargs
    )
    return sampler.sample(net, kernel, images, 1, case_ids=torch.arange(images.shape[0]))


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("max_batch", [1, 4, 5, 11, 12, 100])
def test_chunked_sampling_equals_one_pass(name, max_batch):
    torch.manual_seed(0)
    (kernel, solver), net = KERNELS[name](), TinyDenoiser()
    images = torch.randn(4, 1, 8, 8)
    whole = sample(None, kernel, net, images, solver)
    assert net.rows == [12] * 5
    net.rows.clear()
    chunked = sample(max_batch, kernel, net, images, solver)
    assert max(net.rows) <= max_batch and sum(net.rows) == 12 * 5
    assert len(net.rows) == 5 * -(-12 // max_batch)
    for key in ("samples", "probability", "mask", "std", "entropy"):
        torch.testing.assert_close(chunked[key], whole[key], rtol=0, atol=0)


def test_stochastic_sampler_still_differs_across_seeds():
    torch.manual_seed(0)
    (kernel, _), net = KERNELS["bernoulli"](), TinyDenoiser()
    images = torch.randn(2, 1, 8, 8)
    a = sample(2, kernel, net, images)
    b = DiffusionSampler(num_steps=5, num_samples=3, seed=4, max_batch=2).sample(net, kernel, images, 1)
    assert not torch.equal(a["samples"], b["samples"])


def test_dict_condition_is_chunked_row_for_row():
    torch.manual_seed(0)
    (kernel, solver), net = KERNELS["ddpm"](), DictDenoiser()
    images = torch.randn(3, 1, 8, 8)
    whole = sample(None, kernel, net, images, solver)
    net.rows.clear()
    chunked = sample(4, kernel, net, images, solver)
    assert net.rows == [4, 4, 1] * 5
    torch.testing.assert_close(chunked["samples"], whole["samples"], rtol=0, atol=0)


def test_evolution_fusion_reads_the_final_step_through_the_chunks():
    torch.manual_seed(0)
    kernel = GaussianKernel(num_train_timesteps=50, objective="x0", learn_variance=True)
    net, images = TinyDenoiser(out_channels=2), torch.randn(3, 1, 8, 8)
    whole = sample(None, kernel, net, images, fusion="evolution")
    net.rows.clear()
    chunked = sample(2, kernel, net, images, fusion="evolution")
    assert max(net.rows) <= 2
    for key in ("samples", "mask", "evolution_uncertainty"):
        torch.testing.assert_close(chunked[key], whole[key], rtol=0, atol=0)


def test_slice_condition_on_nested_structures():
    a, b = torch.arange(3).reshape(3, 1), torch.arange(6).reshape(3, 2)
    cond = repeat_condition({"x": a, "y": (b, [a]), "none": None}, 2)
    out = slice_condition(cond, 1, 4)
    assert out["x"].ravel().tolist() == [0, 1, 1]
    assert isinstance(out["y"], tuple) and isinstance(out["y"][1], list)
    assert out["y"][0].tolist() == [[0, 1], [2, 3], [2, 3]] and out["y"][1][0].shape == (3, 1)
    assert out["none"] is None
    with pytest.raises(TypeError, match="cannot slice a condition of type str"):
        slice_condition("image", 0, 1)


@pytest.mark.parametrize("bad", [0, -2, 2.5, "8", True])
def test_max_batch_is_validated(bad):
    with pytest.raises(ValueError, match=r"sampler.max_batch must be null .* or a positive integer"):
        DiffusionSampler(max_batch=bad)


def test_max_batch_in_settings():
    assert DiffusionSampler().settings()["max_batch"] is None
    assert DiffusionSampler(max_batch=8).settings()["max_batch"] == 8
