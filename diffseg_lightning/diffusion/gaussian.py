"""Gaussian noise kernel for mask diffusion: forward process, training losses and the respaced chain's
coefficients (the reverse updates are the solvers of ``diffusion/solvers``: DDIM, DDPM, DPM-Solver++(2M)).

References:
    Ho, Jain & Abbeel (2020), "Denoising Diffusion Probabilistic Models" (DDPM): forward
    process ``q(x_t | x_0)``, posterior ``q(x_{t-1} | x_t, x_0)``, the simple epsilon loss.
    Lu, Zhou, Bao, Chen, Li & Zhu (2022), "DPM-Solver++": the half log-SNR ``lambda_t`` (``log_snr``).
    Nichol & Dhariwal (2021), "Improved Denoising Diffusion Probabilistic Models": cosine
    schedule, learned variance ``log Sigma = v log beta + (1 - v) log beta_tilde`` (Eq. 15),
    the hybrid loss ``L_simple + lambda L_vlb`` with a stop-gradient on the mean for
    ``L_vlb`` (Sec. 3.1), the discretised Gaussian decoder, and respacing (strided
    sampling from the noise level of ``t`` to that of ``t_prev``, Sec. 4).

Where the papers are silent we followed the authors' released code (openai/improved-diffusion,
openai/guided-diffusion) as a source of facts and wrote our own code:
    * the vlb term is the per-timestep term ``L_t`` (no ``T`` factor), so ``vlb_weight = 1``
      equals the paper's ``lambda = 0.001`` at ``T = 1000``;
    * the lower log-variance bound at ``t = 0`` is ``log beta_tilde_1`` ("clipped");
    * no clipping of ``x0`` inside the training loss; clipping (and re-deriving ``eps`` from
      the clipped ``x0``) at sampling time, as guided-diffusion does for DDIM (``predict_x0_eps(clip=True)``,
      the solvers' ``clip_x0``);
    * the decoder uses bins of width ``2 / 255`` on ``[-1, 1]``; we evaluate the exact normal
      CDF (``log_ndtr``) instead of the released ``tanh`` approximation.

Masks live in kernel space ``[-1, 1]`` (``encode_mask``: ``x0 = 2 m - 1``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from diffseg_lightning.diffusion.base import NoiseKernel
from diffseg_lightning.diffusion.schedules import make_beta_schedule
from diffseg_lightning.exceptions import ConfigError

if TYPE_CHECKING:
    from diffseg_lightning.diffusion.solvers.base import Solver

__all__ = [
    "OBJECTIVES",
    "GaussianKernel",
    "Respaced",
    "discretized_gaussian_log_likelihood",
    "normal_kl",
]

#: Valid values of the ``objective`` option: what the network predicts.
OBJECTIVES: tuple[str, ...] = ("epsilon", "x0")

_LOG2 = math.log(2.0)


class Respaced(NamedTuple):
    """Per-sample coefficients of a strided step ``t -> t_prev`` (:meth:`GaussianKernel.respaced`), each
    float32 ``(B, 1, ..., 1)``; ``abar`` is ``abar_t``, ``abar_prev`` is ``abar_{t_prev}`` (1 for ``t_prev = -1``)."""

    sqrt_abar: Tensor
    sqrt_one_minus_abar: Tensor
    sqrt_abar_prev: Tensor
    one_minus_abar_prev: Tensor
    coef_x0: Tensor
    coef_xt: Tensor
    var: Tensor  # posterior ("fixed small") variance of the respaced chain
    beta: Tensor  # respaced beta, 1 - abar_t / abar_prev
    valid: Tensor  # 1.0 where t_prev >= 0, 0.0 on the final step


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise ``KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)))`` in nats.

    Nichol & Dhariwal (2021), the ``L_{t-1}`` terms of the variational bound (Eq. 6).

    Args:
        mean1: mean of the first Gaussian, any shape broadcastable with the others.
        logvar1: log variance of the first Gaussian.
        mean2: mean of the second Gaussian.
        logvar2: log variance of the second Gaussian.

    Returns:
        The broadcast elementwise KL divergence.
    """
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Log-likelihood of ``x`` in ``[-1, 1]`` under a Gaussian discretised into 256 bins.

    The decoder ``L_0 = -log p(x_0 | x_1)`` of Ho et al. (2020, Eq. 13) as used by Nichol &
    Dhariwal (2021): bin ``[x - 1/255, x + 1/255]``, with the edge bins extended to
    ``-inf`` (``x = -1``) and ``+inf`` (``x = 1``). For binary masks only the two edge bins
    occur. The normal CDF is evaluated exactly in log space (``torch.special.log_ndtr``).

    Args:
        x: targets in ``[-1, 1]``, shape ``(B, C, H, W)`` (any shape).
        means: Gaussian means, broadcastable to ``x``.
        log_scales: log standard deviations, broadcastable to ``x``.

    Returns:
        Elementwise log-probabilities in nats, shape of ``x``.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    plus_in = inv_std * (centered + 1.0 / 255.0)
    min_in = inv_std * (centered - 1.0 / 255.0)
    log_cdf_plus = torch.special.log_ndtr(plus_in)  # log P(X <= x + 1/255)
    log_one_minus_cdf_min = torch.special.log_ndtr(-min_in)  # log P(X >= x - 1/255)
    cdf_delta = torch.special.ndtr(plus_in) - torch.special.ndtr(min_in)
    log_mid = torch.log(cdf_delta.clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_mid))


class GaussianKernel(NoiseKernel):
    """Gaussian diffusion over masks: ``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)``.

    Implements the noise-kernel contract (:class:`~diffseg_lightning.diffusion.base.NoiseKernel`): forward
    noising (Ho et al. 2020), the simple loss with an epsilon or x_0 target, optionally the hybrid loss with
    learned variance (Nichol & Dhariwal 2021), the prediction of ``x0`` and ``eps``, and the posterior and
    coefficients of the respaced chain between any two kept steps (``respaced``, ``log_snr``), which the
    solvers (DDIM, DDPM, DPM-Solver++(2M)) use to move a sample from the noise level of ``t`` to that of
    ``t_prev``.

    The module has no parameters; it is an ``nn.Module`` only so that its (non-persistent)
    float32 buffers follow ``.to(device)``. All schedule quantities are computed in float64
    and stored as float32.

    Args:
        num_train_timesteps: number of diffusion steps ``T``.
        schedule: ``"linear"`` or ``"cosine"`` (see ``make_beta_schedule``).
        beta_start: first beta of the linear schedule at T = 1000.
        beta_end: last beta of the linear schedule at T = 1000.
        objective: what the network predicts, ``"epsilon"`` or ``"x0"``.
        learn_variance: the network outputs ``2 C`` channels ``[mean-part, v]`` with ``v`` in
            ``[-1, 1]`` interpolating the log-variance between ``beta_tilde`` and ``beta``; the
            loss becomes ``mse + vlb_weight * vlb`` (Nichol & Dhariwal 2021).
        vlb_weight: weight of the vlb term (1.0 = the paper's ``lambda = 0.001`` at T = 1000).

    Raises:
        ValueError: an unknown string option (the message lists the valid values) or an
            out-of-range number.
    """

    betas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor
    log_alphas_cumprod: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    log_betas: Tensor
    posterior_variance: Tensor
    posterior_log_variance_clipped: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        objective: str = "epsilon",
        learn_variance: bool = False,
        vlb_weight: float = 1.0,
    ) -> None:
        super().__init__(num_train_timesteps, schedule)
        if objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {objective!r}; valid values are {list(OBJECTIVES)}")
        if not (isinstance(vlb_weight, (int, float)) and vlb_weight >= 0.0):
            raise ConfigError(f"vlb_weight must be a number >= 0, got {vlb_weight!r}")
        self.objective: str = objective
        self.learn_variance: bool = bool(learn_variance)
        self.vlb_weight: float = float(vlb_weight)

        betas = make_beta_schedule(schedule, num_train_timesteps, beta_start, beta_end)  # float64 (T,)
        alphas = 1.0 - betas
        log_abar = torch.cumsum(torch.log(alphas), 0)
        abar = torch.exp(log_abar)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        one_minus_abar = -torch.expm1(log_abar)
        post_var = betas * (1.0 - abar_prev) / one_minus_abar
        # log(beta_tilde) is -inf at t = 0; use beta_tilde_1 there (improved DDPM's "clipped" log variance)
        post_log_var = (
            torch.log(torch.cat([post_var[1:2], post_var[1:]]))
            if num_train_timesteps > 1
            else torch.log(betas)
        )
        tables = {
            "betas": betas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "log_alphas_cumprod": log_abar,
            "sqrt_alphas_cumprod": abar.sqrt(),
            "sqrt_one_minus_alphas_cumprod": one_minus_abar.sqrt(),
            "log_betas": torch.log(betas),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": post_log_var,
            "posterior_mean_coef1": betas * abar_prev.sqrt() / one_minus_abar,
            "posterior_mean_coef2": (1.0 - abar_prev) * alphas.sqrt() / one_minus_abar,
        }
        for name, value in tables.items():
            self.register_buffer(name, value.to(torch.float32), persistent=False)

    #: ``sampler=ddim``: DDIM with eta = 0 and clipping, the default solver.
    default_solver_group = "ddim"

    def default_solver(self) -> Solver:
        """The solver ``sampler=default`` uses: :class:`~diffseg_lightning.diffusion.solvers.DDIM` with
        ``eta = 0`` and ``clip_x0`` (the deterministic DDIM of Song et al. 2021)."""
        from diffseg_lightning.diffusion.solvers.ddim import DDIM  # the solvers import this module

        return DDIM(eta=0.0, clip_x0=True)

    def predict_x0(self, model_output: Tensor, x_t: Tensor, t: Tensor | int) -> Tensor:
        """The ``x0`` the network output implies at ``(x_t, t)`` (not clipped), ``(B, C, H, W)``: the first
        result of :meth:`predict_x0_eps` with ``clip=False``."""
        return self.predict_x0_eps(model_output, x_t, t, clip=False)[0]

    def extra_repr(self) -> str:
        return (
            f"T={self.num_train_timesteps}, schedule={self.schedule!r}, objective={self.objective!r}, "
            f"learn_variance={self.learn_variance}, vlb_weight={self.vlb_weight}"
        )

    # ------------------------------------------------------------------ helpers
    def model_output_channels(self, mask_channels: int) -> int:
        """Channels the denoiser must output for ``mask_channels`` mask channels.

        Args:
            mask_channels: channels ``C`` of the mask ``x_t``.

        Returns:
            ``2 C`` with learned variance (Nichol & Dhariwal 2021), else ``C``.
        """
        return mask_channels * (2 if self.learn_variance else 1)

    def encode_mask(self, mask01: Tensor) -> Tensor:
        """Map a ``{0, 1}`` mask ``(B, C, H, W)`` to kernel space ``x0 = 2 m - 1`` in ``{-1, 1}``."""
        m = mask01 if mask01.is_floating_point() else mask01.to(torch.get_default_dtype())
        return m * 2.0 - 1.0

    def decode_mask(self, x0: Tensor) -> Tensor:
        """Map kernel space ``(B, C, H, W)`` to a foreground probability ``((x0 + 1) / 2).clamp(0, 1)``."""
        return ((x0 + 1.0) / 2.0).clamp(0.0, 1.0)

    def split_output(self, model_output: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor | None]:
        """Split the network output into its mean part and (with learned variance) ``v``.

        Args:
            model_output: ``(B, C, H, W)``, or ``(B, 2C, H, W)`` with learned variance.
            x_t: the noisy sample ``(B, C, H, W)``.

        Returns:
            ``(mean_part, v)``, each ``(B, C, H, W)``; ``v`` is ``None`` without learned variance.

        Raises:
            ValueError: the channel count does not match ``model_output_channels``.
        """
        c = x_t.shape[1]
        want = self.model_output_channels(c)
        if model_output.shape[1] != want or model_output.shape[0] != x_t.shape[0]:
            raise ConfigError(
                f"model_output has shape {tuple(model_output.shape)}; expected (B={x_t.shape[0]}, {want}, ...) "
                f"for x_t with {c} channel(s) (learn_variance={self.learn_variance})"
            )
        if self.learn_variance:
            return model_output[:, :c], model_output[:, c:]
        return model_output, None

    def predict_x0_eps(
        self, model_output: Tensor, x_t: Tensor, t: Tensor | int, clip: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Derive ``(x0, eps, v)`` from the network output according to ``objective``.

        ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (Ho et al. 2020, Eq. 4) links the two.
        With ``clip``, ``x0`` is clamped to ``[-1, 1]`` and ``eps`` re-derived from the clamped
        ``x0`` (as guided-diffusion does for DDIM).

        Args:
            model_output: ``(B, C, H, W)`` or ``(B, 2C, H, W)`` with learned variance.
            x_t: ``(B, C, H, W)``.
            t: LongTensor ``(B,)``, 0-dim or int.
            clip: clamp ``x0`` to ``[-1, 1]`` and re-derive ``eps`` (a solver's ``clip_x0``).

        Returns:
            ``x0_pred`` and ``eps_pred``, each ``(B, C, H, W)``, and ``v`` (or ``None``).
        """
        out, v = self.split_output(model_output, x_t)
        t = self.batch_timesteps(t, x_t.shape[0])
        sa = self._gather(self.sqrt_alphas_cumprod, t, x_t.ndim)
        s1 = self._gather(self.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
        x0, eps = self._x0_eps(out, x_t, sa, s1, clip)
        return x0, eps, v

    def _x0_eps(self, out: Tensor, x_t: Tensor, sa: Tensor, s1: Tensor, clip: bool) -> tuple[Tensor, Tensor]:
        if self.objective == "epsilon":
            eps = out
            x0 = (x_t - s1 * eps) / sa
        else:
            x0 = out
            eps = (x_t - sa * x0) / s1
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
            eps = (x_t - sa * x0) / s1
        return x0, eps

    # ------------------------------------------------------------------ forward process
    def sample_prior(
        self,
        shape: tuple[int, ...] | torch.Size,
        device: torch.device | str | None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Draw ``x_T ~ N(0, I)`` of ``shape`` (e.g. ``(B, C, H, W)``)."""
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)

    def q_sample(
        self,
        x0: Tensor,
        t: Tensor | int,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (Ho et al. 2020, Eq. 4).

        Args:
            x0: clean masks in kernel space ``(B, C, H, W)``.
            t: LongTensor ``(B,)`` (a 0-dim tensor or int is broadcast).
            noise: ``eps`` of the shape of ``x0``; drawn from ``N(0, I)`` with ``generator`` if ``None``.
            generator: random generator for ``noise``.

        Returns:
            ``x_t`` of the shape of ``x0``.
        """
        t = self.batch_timesteps(t, x0.shape[0])
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        sa = self._gather(self.sqrt_alphas_cumprod, t, x0.ndim)
        s1 = self._gather(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
        return sa * x0 + s1 * noise

    # ------------------------------------------------------------------ training loss
    def vlb_terms(self, model_output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor | int) -> Tensor:
        """Per-sample variational-bound term ``L_t`` in bits per dimension.

        ``KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))`` for ``t > 0`` and the discretised
        Gaussian decoder NLL ``-log p(x0 | x_1)`` for ``t = 0`` (Nichol & Dhariwal 2021, Eq. 4-6),
        chosen per sample with ``torch.where``. The model mean is the posterior mean at the
        predicted ``x0`` (not clipped); the model log-variance is
        ``v' log beta_t + (1 - v') log beta_tilde_t`` with ``v' = (v + 1) / 2`` (Eq. 15), or
        ``log beta_tilde_t`` without learned variance. Callers that want the stop-gradient of
        the hybrid loss pass a detached mean part (``loss`` does).

        Args:
            model_output: ``(B, C, H, W)`` or ``(B, 2C, H, W)`` with learned variance.
            x0: clean masks in kernel space ``(B, C, H, W)``.
            x_t: noisy masks ``(B, C, H, W)``.
            t: LongTensor ``(B,)``.

        Returns:
            ``(B,)`` vlb terms in bits per dimension.
        """
        x0_pred, _, v = self.predict_x0_eps(model_output, x_t, t, clip=False)
        t = self.batch_timesteps(t, x_t.shape[0])
        nd = x_t.ndim
        c1 = self._gather(self.posterior_mean_coef1, t, nd)
        c2 = self._gather(self.posterior_mean_coef2, t, nd)
        true_mean = c1 * x0 + c2 * x_t
        true_logvar = self._gather(self.posterior_log_variance_clipped, t, nd)
        model_mean = c1 * x0_pred + c2 * x_t
        if v is None:
            model_logvar = true_logvar.expand_as(x_t)
        else:
            frac = (v + 1.0) / 2.0
            model_logvar = frac * self._gather(self.log_betas, t, nd) + (1.0 - frac) * true_logvar
        dims = tuple(range(1, nd))
        kl = normal_kl(true_mean, true_logvar, model_mean, model_logvar).mean(dim=dims) / _LOG2
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar).mean(dim=dims) / _LOG2
        return torch.where(t == 0, nll, kl)

    def loss(self, model_output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> dict[str, Tensor]:
        """Training loss terms.

        ``mse``: ``|target - prediction|^2`` averaged over all elements, where the target is the
        true ``eps`` (recovered from ``x_t``, ``x0`` and ``t``; Ho et al. 2020, Eq. 14) or ``x0``
        per ``objective``. With ``learn_variance``: ``vlb`` = mean of ``vlb_terms`` on the
        output with its mean part detached, and ``loss = mse + vlb_weight * vlb`` (the hybrid
        loss of Nichol & Dhariwal 2021, Sec. 3.1).

        Args:
            model_output: ``(B, C, H, W)``, or ``(B, 2C, H, W)`` with learned variance.
            x0: clean masks in kernel space ``(B, C, H, W)``.
            x_t: ``q_sample(x0, t)``, ``(B, C, H, W)``.
            t: LongTensor ``(B,)``.

        Returns:
            ``{"loss", "mse"}`` and ``"vlb"`` with learned variance; 0-dim tensors.
        """
        out, v = self.split_output(model_output, x_t)
        tb = self.batch_timesteps(t, x_t.shape[0])
        if self.objective == "epsilon":
            sa = self._gather(self.sqrt_alphas_cumprod, tb, x_t.ndim)
            s1 = self._gather(self.sqrt_one_minus_alphas_cumprod, tb, x_t.ndim)
            target = (x_t - sa * x0) / s1
        else:
            target = x0
        mse = ((out - target) ** 2).mean()
        terms: dict[str, Tensor] = {"mse": mse}
        if v is None:
            terms["loss"] = mse
            return terms
        frozen = torch.cat([out.detach(), v], dim=1)
        vlb = self.vlb_terms(frozen, x0, x_t, tb).mean()
        terms["vlb"] = vlb
        terms["loss"] = mse + self.vlb_weight * vlb
        return terms

    # ------------------------------------------------------------------ the strided chain
    def q_posterior(
        self, x0: Tensor, x_t: Tensor, t: Tensor | int, t_prev: Tensor | int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Posterior ``q(x_{t_prev} | x_t, x0)`` of the respaced chain, for any ``t_prev < t``.

        With ``a = abar_t / abar_prev`` and ``beta = 1 - a`` (the respaced beta of Nichol &
        Dhariwal 2021, Sec. 4; Ho et al. 2020, Eq. 6-7 with ``t - 1`` replaced by ``t_prev``):
        ``mean = sqrt(abar_prev) beta / (1 - abar_t) x0 + sqrt(a) (1 - abar_prev) / (1 - abar_t) x_t``,
        ``var = (1 - abar_prev) / (1 - abar_t) beta``. ``t_prev = -1`` means ``abar_prev = 1``
        (mean ``x0``, variance 0). Ratios are computed from ``log abar`` with ``expm1`` for accuracy.

        Args:
            x0: ``(B, C, H, W)``.
            x_t: ``(B, C, H, W)``.
            t: LongTensor ``(B,)`` (or 0-dim / int).
            t_prev: LongTensor ``(B,)`` (or 0-dim / int), ``-1 <= t_prev < t``.

        Returns:
            ``(mean, variance, beta)``: mean ``(B, C, H, W)``, variance and respaced beta ``(B, 1, 1, 1)``.
        """
        b = x_t.shape[0]
        c = self.respaced(self.batch_timesteps(t, b), self.batch_timesteps(t_prev, b, "t_prev"), x_t.ndim)
        return c.coef_x0 * x0 + c.coef_xt * x_t, c.var, c.beta

    def respaced(self, t: Tensor, t_prev: Tensor, ndim: int) -> Respaced:
        """Coefficients of the strided step ``t -> t_prev`` of the respaced chain (Nichol & Dhariwal 2021, Sec. 4).

        Computed on ``(B,)`` vectors from ``log abar`` (ratios with ``expm1`` for accuracy). For
        ``t_prev = -1``, ``log abar_prev = 0`` makes the coefficients exactly those of
        ``x_prev = x0`` (``coef_x0 = 1``, ``coef_xt = 0``, ``var = 0``, ``sqrt_abar_prev = 1``),
        so no full-size ``where`` is needed.

        Args:
            t: LongTensor ``(B,)`` in ``[0, T)`` (see :meth:`batch_timesteps`).
            t_prev: LongTensor ``(B,)``, ``-1 <= t_prev < t``.
            ndim: dimensions of the sample the coefficients multiply (4 for ``(B, C, H, W)``).

        Returns:
            :class:`Respaced`, every field float32 ``(B, 1, ..., 1)`` with ``ndim`` dims.
        """
        valid = (t_prev >= 0).to(self.log_alphas_cumprod.dtype)
        la_t = self.log_alphas_cumprod.index_select(0, t)
        la_p = self.log_alphas_cumprod.index_select(0, t_prev.clamp(min=0)) * valid
        one_m_at = -torch.expm1(la_t)
        one_m_ap = -torch.expm1(la_p)
        beta = -torch.expm1(la_t - la_p)  # 1 - abar_t / abar_prev; equals one_m_at bitwise when la_p = 0
        sqrt_ap = torch.exp(0.5 * la_p)
        coef_x0 = sqrt_ap * beta / one_m_at
        coef_xt = torch.exp(0.5 * (la_t - la_p)) * (one_m_ap / one_m_at)
        var = one_m_ap / one_m_at * beta
        fields = [
            self.sqrt_alphas_cumprod.index_select(0, t),
            self.sqrt_one_minus_alphas_cumprod.index_select(0, t),
            sqrt_ap,
            one_m_ap,
            coef_x0,
            coef_xt,
            var,
            beta,
            valid,
        ]
        table = torch.stack(fields, 1).reshape(t.shape[0], len(fields), *([1] * (ndim - 1)))
        return Respaced(*table.unbind(1))

    def log_alphas_cumprod_at(self, t: Tensor) -> Tensor:
        """``log abar_t`` for timesteps ``t`` (LongTensor ``(B,)``), float32 ``(B,)``; 0 at ``t = -1`` (``abar = 1``)."""
        valid = (t >= 0).to(self.log_alphas_cumprod.dtype)
        return self.log_alphas_cumprod.index_select(0, t.clamp(min=0)) * valid

    def log_snr(self, t: Tensor) -> Tensor:
        """Half log-SNR ``lambda_t = log(alpha_t / sigma_t)``, ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)``
        (Lu et al. 2022, Sec. 2), for timesteps ``t`` (LongTensor ``(B,)``): float32 ``(B,)``, ``+inf`` at ``t = -1``."""
        la = self.log_alphas_cumprod_at(t)
        return 0.5 * (la - torch.log(-torch.expm1(la)))
