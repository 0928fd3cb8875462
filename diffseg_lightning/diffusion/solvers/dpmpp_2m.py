"""DPM-Solver++(2M): the multistep second-order data-prediction solver of Lu, Zhou, Bao, Chen, Li & Zhu (2022),
"DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", Algorithm 2.

For the Gaussian kernel, with ``alpha = sqrt(abar)``, ``sigma = sqrt(1 - abar)``, the half log-SNR
``lambda = log(alpha / sigma)`` and ``h = lambda_prev - lambda_t``, from the noise level of ``t`` to that of
``t_prev``:

    x0_pred = the network's prediction at (x_t, t)
    D       = x0_pred                                              on the chain's first step, else
    D       = (1 + 1/(2r)) x0_pred - 1/(2r) x0_pred_last,   r = h_last / h,   h_last = lambda_t - lambda_last
    x_prev  = (sigma_prev / sigma_t) x_t - alpha_prev (e^{-h} - 1) D

where ``x0_pred_last`` and ``lambda_last`` are the previous step's (the per-chain ``state``). Deterministic;
a first-order step equals DDIM with ``eta = 0``. ``t_prev = -1`` (``lambda_prev = +inf``) returns
``x0_pred``. With ``clip_x0`` the prediction is clamped to ``[-1, 1]``; a learned variance is ignored.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffseg_lightning.diffusion.gaussian import GaussianKernel
from diffseg_lightning.diffusion.solvers.base import GaussianSolver


def _per_sample(values: Tensor, ndim: int) -> Tensor:
    """``(B,)`` as ``(B, 1, ..., 1)`` with ``ndim`` dims."""
    return values.reshape(values.shape[0], *([1] * (ndim - 1)))


class DPMSolverPP2M(GaussianSolver):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) for the :class:`GaussianKernel`.

    The memory of the multistep update lives in the per-chain ``state`` (keys ``"x0_pred"`` and ``"lambda"``)
    that :func:`~diffseg_lightning.diffusion.reverse.reverse` creates empty for each chain; ``state=None``
    gives first-order steps.

    Args:
        clip_x0: clamp the predicted ``x0`` to ``[-1, 1]``.
    """

    name = "dpmpp_2m"
    config_group = "dpmpp_2m"

    @property
    def is_deterministic(self) -> bool:
        """True: the update draws nothing."""
        return True

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
        """One DPM-Solver++(2M) step (see the module docstring); updates ``state`` in place.

        Coefficients are computed on ``(B,)`` vectors: ``alpha_prev (1 - e^{-h})`` as
        ``-alpha_prev expm1(-h)`` and ``sigma_prev / sigma_t`` from ``log abar`` with ``expm1``. On the final
        step ``lambda_prev = +inf`` gives exactly ``x_prev = x0_pred`` (coefficients 1 and 0, and the
        second-order correction is switched off with ``torch.where``).

        Args:
            kernel: the Gaussian kernel.
            model_output: ``(B, C, H, W)``, or ``(B, 2C, H, W)`` with learned variance (ignored).
            t: LongTensor ``(B,)``; an int or a 0-dim tensor is broadcast.
            t_prev: likewise, ``-1 <= t_prev < t``; ``-1`` is the final step.
            x_t: the current sample ``(B, C, H, W)``.
            generator: unused (deterministic).
            state: the chain's memory, read and written (``"x0_pred"``, ``"lambda"``); ``None``: first order.

        Returns:
            ``(x_prev, x0_pred)``, each ``(B, C, H, W)``.
        """
        b, nd = x_t.shape[0], x_t.ndim
        t = kernel.batch_timesteps(t, b)
        t_prev = kernel.batch_timesteps(t_prev, b, "t_prev")
        x0, _, _ = kernel.predict_x0_eps(model_output, x_t, t, clip=self.clip_x0)
        valid = t_prev >= 0
        la_t = kernel.log_alphas_cumprod_at(t)
        la_p = kernel.log_alphas_cumprod_at(t_prev)
        lam_t = kernel.log_snr(t)
        h = kernel.log_snr(t_prev) - lam_t  # +inf on the final step
        coef_x0 = -torch.exp(0.5 * la_p) * torch.expm1(-h)  # alpha_prev (1 - e^{-h}); 1 on the final step
        coef_xt = torch.exp(
            0.5 * (torch.log(-torch.expm1(la_p)) - torch.log(-torch.expm1(la_t)))
        )  # sigma ratio
        d = x0  # first order: D = x0_pred
        if state is not None and "x0_pred" in state:
            h_last = lam_t - state["lambda"]
            # 1 / (2 r) = h / (2 h_last); 0 on the final step, which returns x0_pred
            half_inv_r = torch.where(valid, h / (2.0 * h_last), torch.zeros_like(h))
            d = x0 + _per_sample(half_inv_r, nd) * (x0 - state["x0_pred"])
        if state is not None:
            state["x0_pred"] = x0
            state["lambda"] = lam_t
        return _per_sample(coef_xt, nd) * x_t + _per_sample(coef_x0, nd) * d, x0
