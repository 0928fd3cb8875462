"""The DDPM solver's strided step on the Gaussian kernel lands on the marginal q(x_{t_prev} | x_0).

That is why the solvers do not lean on MONAI's schedulers for strided sampling: MONAI 1.6's
``DDPMScheduler.step`` uses the one-step posterior even on a strided grid. These tests assert our own
behaviour only; MONAI is used where it is right (its schedule, and its step on the full 1000-step grid),
so they do not depend on whether MONAI's strided step is ever fixed.
"""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

from diffseg_lightning.diffusion import DDPM, GaussianKernel

T = 1000


def kernel() -> GaussianKernel:
    return GaussianKernel(num_train_timesteps=T, objective="x0")


#: ancestral DDPM on the respaced chain, no clipping (the x_0 oracle is exact)
SOLVER = DDPM(clip_x0=False)


def noisy(abar_t: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A +-1 mask x_0 (8 x 64 x 64 values) and x_t ~ q(x_t | x_0)."""
    x0 = (torch.rand(8, 1, 64, 64, generator=gen) > 0.5).float() * 2 - 1
    return x0, abar_t.sqrt() * x0 + (1 - abar_t).sqrt() * torch.randn(x0.shape, generator=gen)


def assert_on_the_marginal(x_prev: torch.Tensor, x0: torch.Tensor, abar_prev: torch.Tensor) -> None:
    """x_prev - sqrt(abar_prev) x_0 must be N(0, 1 - abar_prev) noise, uncorrelated with x_0. Fixed seeds make
    this deterministic; 5 standard errors of each estimate over n = 32768 values leave room for any seed."""
    r = (x_prev - abar_prev.sqrt() * x0).double()
    want, n = (1 - abar_prev).item(), r.numel()
    assert r.var().item() == pytest.approx(want, abs=5 * want * (2 / n) ** 0.5)  # se of a variance
    assert abs((r * x0).mean().item()) < 5 * (want / n) ** 0.5  # a wrong x_0 coefficient shows here


def test_the_schedule_is_monais():
    monai = DDPMScheduler(num_train_timesteps=T, schedule="linear_beta")
    # MONAI builds the linear betas in float32 and takes their cumulative product: ~1e-7 relative per
    # factor over up to 1000 factors, i.e. well under 1e-6 on values in (0, 1]
    assert torch.allclose(monai.alphas_cumprod.float(), kernel().alphas_cumprod, rtol=0, atol=1e-6)


# strides of a 10-step grid (MONAI's one-step posterior misses the marginal on each by > 5 standard errors),
# a stride to t = 0, and the unit stride
@pytest.mark.parametrize("t, t_prev", [(888, 777), (555, 444), (222, 111), (111, 0), (555, 554)])
def test_a_strided_ddpm_step_lands_on_the_marginal(t, t_prev):
    ours = kernel()
    abar = ours.alphas_cumprod
    gen = torch.Generator().manual_seed(t)
    x0, x_t = noisy(abar[t], gen)
    x_prev, _ = SOLVER.step(ours, x0, torch.full((8,), t), torch.full((8,), t_prev), x_t, generator=gen)
    assert_on_the_marginal(x_prev, x0, abar[t_prev])


def test_one_step_agrees_with_monai_on_the_full_grid():
    """On the full 1000-step grid (t_prev = t - 1) MONAI's posterior is the right one: ours and theirs both
    land on the marginal, as ours does on any stride."""
    ours = kernel()
    monai = DDPMScheduler(
        num_train_timesteps=T, schedule="linear_beta", prediction_type="sample", clip_sample=False
    )
    monai.set_timesteps(T)
    abar = ours.alphas_cumprod
    t = 555
    gen = torch.Generator().manual_seed(1)
    x0, x_t = noisy(abar[t], gen)
    theirs, _ = monai.step(x0, t, x_t, generator=gen)
    mine, _ = SOLVER.step(ours, x0, torch.full((8,), t), torch.full((8,), t - 1), x_t, generator=gen)
    assert_on_the_marginal(theirs, x0, abar[t - 1])
    assert_on_the_marginal(mine, x0, abar[t - 1])
