"""Variance (beta) schedules for Gaussian diffusion.

References:
    Ho, Jain & Abbeel (2020), "Denoising Diffusion Probabilistic Models" (DDPM): the linear
    schedule, beta_1 = 1e-4 to beta_T = 0.02 for T = 1000.
    Nichol & Dhariwal (2021), "Improved Denoising Diffusion Probabilistic Models": the cosine
    schedule (s = 0.008, betas clipped at 0.999) and the rule that rescales the linear
    schedule to other T (``beta * 1000 / T``) so that every T follows the same curve.
"""

from __future__ import annotations

import math

import torch

from diffseg_lightning.exceptions import ConfigError

__all__ = ["SCHEDULES", "MAX_BETA", "COSINE_S", "make_beta_schedule"]

#: Valid values of the ``schedule`` option.
SCHEDULES: tuple[str, ...] = ("linear", "cosine")

#: Upper bound on every beta (Nichol & Dhariwal 2021, Sec. 3.2): avoids singularities at t = T.
MAX_BETA: float = 0.999

#: Offset of the cosine schedule (Nichol & Dhariwal 2021, Eq. 17).
COSINE_S: float = 0.008


def make_beta_schedule(
    schedule: str,
    num_timesteps: int,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> torch.Tensor:
    """Build the noise schedule ``beta_0 .. beta_{T-1}``.

    ``"linear"`` (Ho et al. 2020): ``torch.linspace(beta_start * 1000 / T, beta_end * 1000 / T, T)``.
    The ``1000 / T`` factor is improved DDPM's rescaling (Nichol & Dhariwal 2021,
    ``get_named_beta_schedule``); it is 1 for the DDPM setting T = 1000.

    ``"cosine"`` (Nichol & Dhariwal 2021, Eq. 17): ``abar(t) = f(t) / f(0)`` with
    ``f(t) = cos^2(((t / T + s) / (1 + s)) * pi / 2)``, ``s = 0.008``, and
    ``beta_i = 1 - abar(i + 1) / abar(i)`` for ``i = 0 .. T-1``. ``beta_start`` and ``beta_end``
    are ignored.

    Both schedules clip every beta at 0.999 (improved DDPM clips the cosine schedule so;
    we apply the same bound to the rescaled linear schedule, which would otherwise reach
    ``beta >= 1``, i.e. ``abar = 0``, for ``T < 21`` with the default ``beta_end``).

    Args:
        schedule: ``"linear"`` or ``"cosine"``.
        num_timesteps: number of diffusion steps ``T`` (>= 1).
        beta_start: first beta of the linear schedule at T = 1000.
        beta_end: last beta of the linear schedule at T = 1000.

    Returns:
        float64 tensor of shape ``(T,)`` with values in ``(0, 0.999]``.

    Raises:
        ValueError: unknown ``schedule`` (the message lists the valid ones), ``T < 1``, or
            betas outside ``0 < beta_start <= beta_end < 1``.
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown beta schedule {schedule!r}; valid values are {list(SCHEDULES)}")
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ConfigError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
    T = num_timesteps
    if schedule == "linear":
        if not (0.0 < beta_start <= beta_end < 1.0):
            raise ConfigError(
                f"linear schedule needs 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}"
            )
        scale = 1000.0 / T
        betas = torch.linspace(beta_start * scale, beta_end * scale, T, dtype=torch.float64)
    else:
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + COSINE_S) / (1.0 + COSINE_S) * (math.pi / 2)) ** 2
        alphas_cumprod = f / f[0]
        betas = 1.0 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(max=MAX_BETA)
