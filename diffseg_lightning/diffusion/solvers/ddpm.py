"""Ancestral DDPM sampling on the respaced chain: Ho, Jain & Abbeel (2020), with the learned variance and the
respacing of Nichol & Dhariwal (2021), "Improved Denoising Diffusion Probabilistic Models".

For the Gaussian kernel, from the noise level of ``t`` to that of ``t_prev`` (Nichol & Dhariwal, Sec. 4: the
strided chain has ``beta = 1 - abar_t / abar_prev``, and its posterior is Ho et al.'s Eq. 6-7 with ``t - 1``
replaced by ``t_prev``):

    x0_pred = the network's prediction at (x_t, t)
    mean    = sqrt(abar_prev) beta / (1 - abar_t) x0_pred + sqrt(abar_t / abar_prev) (1 - abar_prev) / (1 - abar_t) x_t
    var     = (1 - abar_prev) / (1 - abar_t) beta                                  ("fixed small", beta_tilde)
    x_prev  = mean + sqrt(var_model) z,  z ~ N(0, I)

with ``var_model = var``, or, with a learned variance channel ``v`` in ``[-1, 1]``,
``log var_model = v' log beta + (1 - v') log var``, ``v' = (v + 1) / 2`` (Nichol & Dhariwal, Eq. 15) of the
respaced ``beta`` and ``var``. With ``clip_x0`` the prediction is clamped to ``[-1, 1]``. ``t_prev = -1``
(``abar_prev = 1``) gives mean ``x0_pred`` and no noise. This is the mean and variance of
:meth:`GaussianKernel.q_posterior` at ``x0_pred``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffseg_lightning.diffusion.gaussian import GaussianKernel
from diffseg_lightning.diffusion.solvers.base import GaussianSolver

#: Floor of a log-variance whose variance is exactly 0 (the final step, ``t_prev = -1``).
TINY_VARIANCE = 1e-20


class DDPM(GaussianSolver):
    """Ancestral sampling of the respaced posterior (Ho et al. 2020; Nichol & Dhariwal 2021, Eq. 15, Sec. 4).

    Args:
        clip_x0: clamp the predicted ``x0`` to ``[-1, 1]``.
    """

    name = "ddpm"
    config_group = "ddpm"

    @property
    def is_deterministic(self) -> bool:
        """False: every step but the last draws ``z``."""
        return False

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
        """One ancestral step (see the module docstring); ``state`` is unused (a one-step update).

        Args:
            kernel: the Gaussian kernel.
            model_output: ``(B, C, H, W)``, or ``(B, 2C, H, W)`` with learned variance.
            t: LongTensor ``(B,)``; an int or a 0-dim tensor is broadcast.
            t_prev: likewise, ``-1 <= t_prev < t``; ``-1`` is the final step.
            x_t: the current sample ``(B, C, H, W)``.
            generator: the draw of ``z`` (one draw per element, also on the final step, where it is unused).
            state: unused.

        Returns:
            ``(x_prev, x0_pred)``, each ``(B, C, H, W)``.
        """
        b = x_t.shape[0]
        t = kernel.batch_timesteps(t, b)
        c = kernel.respaced(t, kernel.batch_timesteps(t_prev, b, "t_prev"), x_t.ndim)
        x0, _, v = kernel.predict_x0_eps(model_output, x_t, t, clip=self.clip_x0)
        x_prev = c.coef_x0 * x0 + c.coef_xt * x_t  # the posterior mean (Ho et al., Eq. 7, respaced)
        z = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        if v is None:
            return x_prev + c.var.sqrt() * z, x0
        log_small = torch.log(c.var.clamp(min=TINY_VARIANCE))
        # Eq. 15: 0.5 log var_model = 0.5 log var + 0.5 v' (log beta - log var), v' = (v + 1) / 2
        half_gap = 0.25 * (torch.log(c.beta) - log_small)
        std = torch.exp((v + 1.0) * half_gap + 0.5 * log_small)
        return x_prev + (std * c.valid) * z, x0
