"""Fusion, uncertainty maps and the batched multi-sample sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import entropy as scipy_entropy
from torch import nn

from diffseg_lightning.diffusion import DPMSolverPP2M, GaussianKernel
from diffseg_lightning.inference import (
    DiffusionSampler,
    fuse_samples,
    predictive_entropy,
    repeat_condition,
    sample_std,
)


def test_mean_and_vote_fusion_by_hand():
    # one pixel, three samples: probabilities 0.9, 0.4, 0.45 -> mean 0.5833 (> 0.5), votes 1/3 (< 0.5)
    samples = torch.tensor([0.9, 0.4, 0.45]).reshape(1, 3, 1, 1, 1)
    prob, mask = fuse_samples(samples, "mean")
    assert prob.item() == pytest.approx(1.75 / 3) and mask.item() == 1.0
    prob, mask = fuse_samples(samples, "vote")
    assert prob.item() == pytest.approx(1 / 3) and mask.item() == 0.0
    _, mask = fuse_samples(samples, "vote", threshold=0.3)
    assert mask.item() == 1.0


def test_unknown_fusion_names_the_options():
    with pytest.raises(ValueError, match="mean"):
        fuse_samples(torch.rand(1, 2, 1, 2, 2), "median")
    with pytest.raises(ValueError, match="vote"):
        DiffusionSampler(fusion="staple!")


def test_uncertainty_against_numpy_and_scipy():
    samples = torch.rand(2, 7, 1, 3, 3)
    std = sample_std(samples)
    assert torch.allclose(std, torch.from_numpy(samples.numpy().std(axis=1)), atol=1e-6)
    p = samples.mean(1).numpy().ravel()
    expected = scipy_entropy(np.stack([p, 1 - p]), base=2, axis=0).reshape(2, 1, 3, 3)
    assert torch.allclose(predictive_entropy(samples), torch.from_numpy(expected).float(), atol=1e-5)
    certain = torch.ones(1, 3, 1, 2, 2)
    assert predictive_entropy(certain).abs().max() == 0


def test_repeat_condition_on_nested_structures():
    a, b = torch.arange(2).reshape(2, 1), torch.arange(4).reshape(2, 2)
    out = repeat_condition({"x": a, "y": (b, [a])}, 3)
    assert out["x"].ravel().tolist() == [0, 0, 0, 1, 1, 1]
    assert out["y"][0].shape == (6, 2) and out["y"][1][0].shape == (6, 1)


class OracleDenoiser(nn.Module):
    """Returns the true x_0 (kernel space) of its image, which *is* the mask; counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []
        self.encodes = 0

    def encode_condition(self, image):
        self.encodes += 1
        return image * 2 - 1  # the image is the {0,1} mask itself

    def forward(self, x_t, t, cond):
        self.calls.append(x_t.shape[0])
        return cond


def test_sampler_batches_samples_and_recovers_the_oracle_mask():
    kernel = GaussianKernel(num_train_timesteps=100, objective="x0")
    masks = (torch.rand(3, 1, 16, 16) > 0.5).float()
    denoiser = OracleDenoiser()
    out = DiffusionSampler(num_steps=7, num_samples=4).sample(denoiser, kernel, masks, mask_channels=1)
    assert denoiser.encodes == 1  # the image branch runs once, not once per step or sample
    assert denoiser.calls == [3 * 4] * 7  # one batched pass of B*S per step
    assert out["samples"].shape == (3, 4, 1, 16, 16)
    assert torch.equal(out["mask"], masks)
    assert out["entropy"].max() < 1e-6 and out["std"].max() < 1e-6


class ImageDependentDenoiser(nn.Module):
    """A fixed random network, to test that a case's result does not depend on its batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 3, padding=1)

    def encode_condition(self, image):
        return image

    def forward(self, x_t, t, cond):
        return torch.tanh(self.conv(torch.cat([x_t, cond], 1)) + t.float().view(-1, 1, 1, 1) / 100)


def test_case_results_do_not_depend_on_batch_composition():
    torch.manual_seed(0)
    kernel, net = GaussianKernel(num_train_timesteps=50, objective="x0"), ImageDependentDenoiser()
    images = torch.randn(4, 1, 8, 8)
    sampler = DiffusionSampler(num_steps=5, num_samples=3, seed=7)
    together = sampler.sample(net, kernel, images, 1, case_ids=torch.arange(4))
    alone = sampler.sample(net, kernel, images[2:3], 1, case_ids=torch.tensor([2]))
    assert torch.allclose(together["samples"][2], alone["samples"][0], atol=1e-6)
    other_seed = DiffusionSampler(num_steps=5, num_samples=3, seed=8).sample(
        net, kernel, images[2:3], 1, torch.tensor([2])
    )
    assert not torch.allclose(other_seed["samples"][0], alone["samples"][0])


class _StateSpy(DPMSolverPP2M):
    """Records the per-chain ``state`` object that each ``step`` receives."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def step(self, kernel, model_output, t, t_prev, x_t, generator=None, state=None):
        assert state is not None
        self.seen.append(id(state))
        return super().step(kernel, model_output, t, t_prev, x_t, generator=generator, state=state)


def test_sampler_threads_one_history_per_chain_for_dpmpp_2m():
    """The sampler passes one fresh state dict to every step of a chain (DPM-Solver++(2M) is multistep)."""
    torch.manual_seed(0)
    kernel, net, spy = (
        GaussianKernel(num_train_timesteps=50, objective="x0"),
        ImageDependentDenoiser(),
        _StateSpy(),
    )
    images = torch.randn(2, 1, 8, 8)
    sampler = DiffusionSampler(num_steps=5, num_samples=3, seed=7, solver=spy)
    first = sampler.sample(net, kernel, images, 1)
    assert len(spy.seen) == 5 and len(set(spy.seen)) == 1
    # the same chain by hand, with and without the state: the sampler used it
    x = torch.stack(
        [
            kernel.sample_prior(
                (3, 1, 8, 8), "cpu", generator=torch.Generator().manual_seed(7 * 1_000_003 + i)
            )
            for i in range(2)
        ]
    ).flatten(0, 1)
    cond = images.repeat_interleave(3, 0)
    ts = kernel.inference_timesteps(5).tolist()
    results = []
    for state in ({}, None):
        xi = x
        for i, t in enumerate(ts):
            tb = torch.full((6,), t)
            tp = torch.full((6,), ts[i + 1] if i + 1 < len(ts) else -1)
            with torch.no_grad():
                xi, _ = DPMSolverPP2M().step(kernel, net(xi, tb, cond), tb, tp, xi, state=state)
        results.append(kernel.decode_mask(xi).reshape(2, 3, 1, 8, 8))
    torch.testing.assert_close(first["samples"], results[0])
    assert not torch.allclose(results[0], results[1])


def test_dpmpp_2m_sampler_recovers_the_oracle_mask():
    kernel = GaussianKernel(num_train_timesteps=100, objective="x0")
    masks = (torch.rand(3, 1, 16, 16) > 0.5).float()
    out = DiffusionSampler(num_steps=7, num_samples=4, solver=DPMSolverPP2M()).sample(
        OracleDenoiser(), kernel, masks, mask_channels=1
    )
    assert torch.equal(out["mask"], masks)
