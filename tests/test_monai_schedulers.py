"""Why the Gaussian kernel does not lean on MONAI's schedulers for strided sampling (shared/DESIGN.md).

MONAI 1.6's ``DDPMScheduler.step`` uses the one-step posterior even on a strided grid, so its sample
after a 10-step stride does not have the marginal of q(x_{t_prev} | x_0); ours does, on the same
inputs. The schedules themselves agree, which makes the comparison fair.
"""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

from diffseg_lightning.diffusion import GaussianKernel


def residual_variance(x_prev, x0, abar_prev):
    return (x_prev - abar_prev.sqrt() * x0).var().item()


def test_strided_ddpm_marginal_ours_versus_monai():
    monai = DDPMScheduler(
        num_train_timesteps=1000, schedule="linear_beta", prediction_type="sample", clip_sample=False
    )
    ours = GaussianKernel(num_train_timesteps=1000, objective="x0", sampling="ddpm", clip_x0=False)
    assert torch.allclose(monai.alphas_cumprod.float(), ours.alphas_cumprod, atol=1e-6)
    abar = ours.alphas_cumprod
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.rand(8, 1, 64, 64, generator=gen) > 0.5).float() * 2 - 1
    t, t_prev = 555, 444  # one stride of MONAI's 10-step grid
    x_t = abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * torch.randn(x0.shape, generator=gen)
    want = (1 - abar[t_prev]).item()
    tolerance = 5 * want * (2 / x0.numel()) ** 0.5  # 5 standard errors of a variance estimate

    monai.set_timesteps(10)
    assert t in monai.timesteps.tolist() and t_prev in monai.timesteps.tolist()
    theirs, _ = monai.step(x0, t, x_t, generator=gen)
    mine, _ = ours.step(x0, torch.full((8,), t), torch.full((8,), t_prev), x_t, generator=gen)
    assert residual_variance(mine, x0, abar[t_prev]) == pytest.approx(want, abs=tolerance)
    assert abs(residual_variance(theirs, x0, abar[t_prev]) - want) > 3 * tolerance  # 15 standard errors off
