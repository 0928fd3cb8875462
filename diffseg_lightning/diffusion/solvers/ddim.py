"""DDIM: the non-Markovian reverse update of Song, Meng & Ermon (2021), "Denoising Diffusion Implicit Models".

For the Gaussian kernel, from the noise level of ``t`` to that of ``t_prev`` (any ``t_prev < t``: the update is
defined on any subsequence of the training chain, Sec. 4.2):

    x0_pred, eps_pred = the network's prediction at (x_t, t)                      (Eq. 12, "predicted x0")
    sigma^2 = eta^2 (1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev)        (Eq. 16)
    x_prev  = sqrt(abar_prev) x0_pred + sqrt(1 - abar_prev - sigma^2) eps_pred + sigma z,   z ~ N(0, I)   (Eq. 12)

``eta = 0`` is deterministic DDIM (no draw); ``eta = 1`` is the DDPM posterior variance of the respaced chain.
With ``clip_x0``, ``x0_pred`` is clamped to ``[-1, 1]`` and ``eps_pred`` re-derived from it (as guided-diffusion
does). A learned variance channel is ignored. ``t_prev = -1`` (``abar_prev = 1``, ``sigma = 0``) returns
``x_prev = x0_pred``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diffseg_lightning.diffusion.gaussian import GaussianKernel
from diffseg_lightning.diffusion.solvers.base import GaussianSolver
from diffseg_lightning.exceptions import ConfigError


class DDIM(GaussianSolver):
    """DDIM with stochasticity ``eta`` (Song et al. 2021, Eq. 12 and 16) for the :class:`GaussianKernel`.

    Args:
        eta: 0 = deterministic DDIM, 1 = the DDPM posterior variance; any number >= 0.
        clip_x0: clamp the predicted ``x0`` to ``[-1, 1]`` (and re-derive ``eps`` from it).

    Raises:
        ConfigError: ``eta`` is not a number >= 0.
    """

    name = "ddim"
    config_group = "ddim"

    def __init__(self, eta: float = 0.0, clip_x0: bool = True) -> None:
        if isinstance(eta, bool) or not isinstance(eta, int | float) or not eta >= 0.0:
            raise ConfigError(f"sampler.solver.eta (DDIM) must be a number >= 0, got {eta!r}")
        super().__init__(clip_x0)
        self.eta: float = float(eta)

    @property
    def is_deterministic(self) -> bool:
        """True for ``eta = 0``: the update draws nothing."""
        return self.eta == 0.0

    def options(self) -> dict[str, Any]:
        return {"eta": self.eta, **super().options()}

    def step(
        self,
        kernel: GaussianKernel,
        model_output: Tensor,
        t: Tensor | int,
        t_prev: Tensor | int,
        x_t: Tensor,
        generator: torch.Generator | None = None,
        state: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One DDIM step (see the module docstring); ``state`` is unused (a one-step update).

        Args:
            kernel: the Gaussian kernel.
            model_output: ``(B, C, H, W)``, or ``(B, 2C, H, W)`` with learned variance (ignored).
            t: LongTensor ``(B,)``; an int or a 0-dim tensor is broadcast.
            t_prev: likewise, ``-1 <= t_prev < t``; ``-1`` is the final step.
            x_t: the current sample ``(B, C, H, W)``.
            generator: the draw of ``z`` (only when ``eta > 0``).
            state: unused.

        Returns:
            ``(x_prev, x0_pred)``, each ``(B, C, H, W)``.
        """
        b = x_t.shape[0]
        t = kernel.batch_timesteps(t, b)
        c = kernel.respaced(t, kernel.batch_timesteps(t_prev, b, "t_prev"), x_t.ndim)
        x0, eps, _ = kernel.predict_x0_eps(model_output, x_t, t, clip=self.clip_x0)
        x_prev = c.sqrt_abar_prev * x0
        if self.eta > 0.0:
            sigma2 = self.eta**2 * c.var  # Eq. 16: eta^2 (1 - abar_prev)/(1 - abar_t) (1 - abar_t/abar_prev)
            x_prev = x_prev + (c.one_minus_abar_prev - sigma2).clamp(min=0.0).sqrt() * eps
            z = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
            x_prev = x_prev + sigma2.sqrt() * z
        else:
            x_prev = x_prev + c.one_minus_abar_prev.sqrt() * eps
        return x_prev, x0
