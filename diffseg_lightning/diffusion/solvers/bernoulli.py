"""The Bernoulli posterior step of BerDiff: Chen, Wang & Shan (2023), "BerDiff: Conditional Bernoulli Diffusion
Model for Medical Image Segmentation", MICCAI 2023 (arXiv:2304.04429).

For the Bernoulli kernel, from the noise level of ``t`` to that of ``s = t_prev`` (a strided step uses
``alpha_{t|s} = abar_t / abar_s``):

    x0_pred = F_C(y_t, eps_hat), the calibrated foreground probability of y_0             (Sec. 2.2)
    theta   = Norm([alpha_{t|s} [1 - y_t, y_t] + (1 - alpha_{t|s}) / 2]
                   * [abar_s [1 - x0_pred, x0_pred] + (1 - abar_s) / 2])                    (Eq. 5)
    y_s     ~ B(theta)

On the final step (``s = -1``) ``y_{-1} = x0_pred`` (the probability: the sampler's fusion thresholds it), or a
draw of ``B(x0_pred)`` with ``binarize_final``. One uniform draw per element on every step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diffseg_lightning.diffusion.bernoulli import BernoulliKernel, bernoulli_posterior
from diffseg_lightning.diffusion.solvers.base import Solver


class BernoulliPosterior(Solver):
    """Sampling ``p(y_s | y_t) = B(theta_post(y_t, x0_pred))`` (Chen et al. 2023, Eq. 5) for the
    :class:`BernoulliKernel`.

    ``name`` is ``"posterior"``, what ``summary.json``'s ``sampler.update`` has always said for this kernel.

    Args:
        binarize_final: the final step returns a Bernoulli draw of ``x0_pred`` instead of the probability.
    """

    name = "posterior"
    config_group = "bernoulli"
    kernel_type = BernoulliKernel

    def __init__(self, binarize_final: bool = False) -> None:
        self.binarize_final: bool = bool(binarize_final)

    @property
    def is_deterministic(self) -> bool:
        """False: every step draws."""
        return False

    def options(self) -> dict[str, Any]:
        return {"binarize_final": self.binarize_final}

    def step(
        self,
        kernel: BernoulliKernel,
        model_output: Tensor,
        t: Tensor | int,
        t_prev: Tensor | int,
        x_t: Tensor,
        generator: torch.Generator | None = None,
        state: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One posterior step (see the module docstring); ``state`` is unused (a one-step update).

        No host synchronisation: the final step is chosen per sample with ``torch.where``.

        Args:
            kernel: the Bernoulli kernel.
            model_output: logits ``(B, C, H, W)``.
            t: LongTensor ``(B,)``; an int or a 0-dim tensor is broadcast.
            t_prev: likewise, ``-1 <= t_prev < t``; ``-1`` is the final step.
            x_t: the current sample in ``{0, 1}``, ``(B, C, H, W)``.
            generator: the uniform draw of the step (on ``x_t``'s device).
            state: unused.

        Returns:
            ``(x_prev, x0_pred)``, each ``(B, C, H, W)``; ``x0_pred`` in ``[0, 1]``.
        """
        b = x_t.shape[0]
        c = kernel.strided(
            kernel.batch_timesteps(t, b), kernel.batch_timesteps(t_prev, b, "t_prev"), x_t.ndim
        )
        x0_pred = kernel.predict_x0(model_output, x_t)
        theta = bernoulli_posterior(
            x_t, x0_pred, c.alpha, c.abar_prev, c.half_one_minus_alpha, c.half_one_minus_abar_prev
        )  # Eq. 5
        u = torch.rand(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        final = c.final > 0.5
        if self.binarize_final:
            x_prev = (u < torch.where(final, x0_pred, theta)).to(x_t.dtype)
        else:
            x_prev = torch.where(final, x0_pred, (u < theta).to(x_t.dtype))
        return x_prev, x0_pred
