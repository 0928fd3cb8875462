"""Bernoulli noise kernel for binary mask diffusion (BerDiff): forward process, losses and the strided
posterior (its reverse update is the solver ``diffusion/solvers/bernoulli.py``).

Reference:
    Chen, Wang & Shan (2023), "BerDiff: Conditional Bernoulli Diffusion Model for Medical Image
    Segmentation", MICCAI 2023 (arXiv:2304.04429): the Bernoulli forward process
    ``q(y_t | y_0) = B(abar_t y_0 + (1 - abar_t) / 2)``, its reparameterisation
    ``y_t = y_0 XOR eps`` with ``eps ~ B((1 - abar_t) / 2)``, the posterior ``theta_post``, the
    calibration function ``F_C(y_t, eps_hat) = theta_post(y_t, |y_t - eps_hat|)``, and the loss
    ``L_Total = L_KL + lambda_BCE L_BCE`` with its ablations (KL only, BCE only, x_0 target).

Where the paper is silent we took the authors' released code (github.com/takimailto/BerDiff,
``diffusion/binomial_diffusion.py``, ``codes/scripts/script_util.py``, ``loss/losses.py``) as a
source of facts and wrote our own code:
    * ``T = 1000`` and the linear schedule of Ho et al. (2020), ``beta`` from 1e-4 to 0.02
      rescaled by ``1000 / T`` (the release's ``model_and_diffusion_defaults``:
      ``diffusion_steps=1000, noise_schedule="linear"``); ``"cosine"`` is Nichol & Dhariwal's
      ``cos^2`` schedule of ``schedules.make_beta_schedule`` (the release's ``"cosine2"``; its
      ``"cosine"`` uses ``cos`` without the square, which we do not offer);
    * ``lambda_bce = 1``: the release's ``LossType.MIX`` adds the two terms with equal weight
      (``loss = vb + bce``). We could not read the paper's own statement of the number in our
      sources; the value is an option;
    * the KL and BCE terms are in nats (the release divides both by ``log 2``, a common factor
      that leaves their ratio, hence ``lambda_bce``, unchanged);
    * the Bernoulli KL clamps the model's probabilities into ``[1e-7, 1 - 1e-7]`` (the release's
      ``binomial_kl`` / ``binomial_log_likelihood`` use the same epsilon);
    * at ``t = 0`` the loss is the decoder NLL ``-log B(y_0; x0_hat)``: the model's distribution of
      ``y_0`` given ``y_1`` is ``B(x0_hat)``, the predicted foreground probability (the release's
      ``p_mean`` returns ``pred_xstart`` as the mean at ``t = 0``), which is also what the final
      sampling step returns.

Not copied: the release's ``q_mean`` computes ``abar_t * y_0`` alone (the ``+ (1 - abar_t) / 2``
term is a separate, discarded statement), so its forward process never flips a background
pixel; ours is the paper's formula and a test pins it.

Indexing follows ``GaussianKernel``: timesteps ``t = 0 .. T-1``, ``y_t`` carries the noise level
``abar_t = prod_{i <= t} alpha_i`` with ``alpha_i = 1 - beta_i``, and ``t = -1`` denotes the
clean mask (``abar_{-1} = 1``). Masks live in ``{0, 1}`` (``encode_mask`` is the identity).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from diffseg_lightning.diffusion.base import NoiseKernel
from diffseg_lightning.diffusion.schedules import make_beta_schedule
from diffseg_lightning.exceptions import ConfigError

if TYPE_CHECKING:
    from diffseg_lightning.diffusion.solvers.base import Solver

__all__ = [
    "BERNOULLI_OBJECTIVES",
    "BernoulliKernel",
    "Strided",
    "bernoulli_kl",
    "bernoulli_posterior",
]

#: Valid values of the ``objective`` option: what the network predicts and which loss terms train it.
#: ``eps``: Bernoulli noise, ``L_KL + lambda_bce L_BCE`` (the paper's default); ``eps_kl``: noise,
#: ``L_KL`` only; ``eps_bce``: noise, ``L_BCE`` only; ``x0``: the foreground probability of ``y_0``,
#: ``L_KL + lambda_bce L_BCE(x0)`` (the paper's ablations of the loss and of the estimation target).
BERNOULLI_OBJECTIVES: tuple[str, ...] = ("eps", "eps_kl", "eps_bce", "x0")

#: Probability clamp of the Bernoulli KL and the decoder NLL.
PROB_EPS: float = 1e-7


class Strided(NamedTuple):
    """Coefficients of a (strided) step ``t -> s`` (:meth:`BernoulliKernel.strided`), each float32 ``(B, 1, ..., 1)``."""

    alpha: Tensor  # alpha_{t|s} = abar_t / abar_s
    half_one_minus_alpha: Tensor  # (1 - alpha_{t|s}) / 2
    abar_prev: Tensor  # abar_s (1 for s = -1)
    half_one_minus_abar_prev: Tensor  # (1 - abar_s) / 2
    final: Tensor  # 1.0 where s = -1


def bernoulli_kl(q: Tensor, p: Tensor, eps: float = PROB_EPS) -> Tensor:
    """Elementwise ``KL(B(q) || B(p))`` in nats, summed over the two outcomes.

    ``q log(q / p) + (1 - q) log((1 - q) / (1 - p))`` with ``0 log 0 = 0`` (``xlogy``) for the
    target ``q`` and the model probability ``p`` clamped into ``[eps, 1 - eps]`` so that the value
    and its gradient stay finite.

    Args:
        q: foreground probabilities of the first (target) Bernoulli, any shape.
        p: foreground probabilities of the second (model) Bernoulli, broadcastable to ``q``.
        eps: clamp of ``p``.

    Returns:
        The broadcast elementwise KL divergence.
    """
    pc = p.clamp(eps, 1.0 - eps)
    q0 = 1.0 - q
    return torch.special.xlogy(q, q) + torch.special.xlogy(q0, q0) - q * torch.log(pc) - q0 * torch.log1p(-pc)


def bernoulli_posterior(
    x_t: Tensor,
    x0: Tensor,
    alpha: Tensor | float,
    abar_prev: Tensor | float,
    half_one_minus_alpha: Tensor | float | None = None,
    half_one_minus_abar_prev: Tensor | float | None = None,
) -> Tensor:
    """Foreground probability of ``q(y_s | y_t, y_0)``: the paper's ``theta_post(y_t, y_0)``.

    ``Norm([alpha [1 - y_t, y_t] + (1 - alpha) / 2] * [abar_s [1 - y_0, y_0] + (1 - abar_s) / 2])``,
    normalised over the two channels, second channel (Chen et al. 2023, Eq. 5). For the one-step
    posterior ``alpha = alpha_t``, ``abar_s = abar_{t-1}``; for a strided step ``t -> s``,
    ``alpha = abar_t / abar_s``. ``y_0`` may be a probability (``x0_hat``); then the second factor
    is ``q(y_s | y_0 ~ B(x0_hat))``.

    Args:
        x_t: ``y_t`` in ``{0, 1}``, shape ``(B, C, H, W)`` (any shape).
        x0: ``y_0`` or its foreground probability, broadcastable to ``x_t``.
        alpha: ``alpha_{t|s}``, broadcastable (e.g. ``(B, 1, 1, 1)``).
        abar_prev: ``abar_s``, broadcastable.
        half_one_minus_alpha: ``(1 - alpha) / 2`` if known more precisely than from ``alpha``.
        half_one_minus_abar_prev: ``(1 - abar_s) / 2`` likewise.

    Returns:
        ``P(y_s = 1 | y_t, y_0)``, the broadcast shape.
    """
    na = (1.0 - alpha) / 2.0 if half_one_minus_alpha is None else half_one_minus_alpha
    nb = (1.0 - abar_prev) / 2.0 if half_one_minus_abar_prev is None else half_one_minus_abar_prev
    fg = (alpha * x_t + na) * (abar_prev * x0 + nb)
    bg = (alpha * (1.0 - x_t) + na) * (abar_prev * (1.0 - x0) + nb)
    return fg / (fg + bg)


class BernoulliKernel(NoiseKernel):
    """Bernoulli diffusion over binary masks (BerDiff, Chen, Wang & Shan, MICCAI 2023).

    Forward: ``q(y_t | y_0) = B(abar_t y_0 + (1 - abar_t) / 2)``, drawn as ``y_t = y_0 XOR eps``,
    ``eps ~ B((1 - abar_t) / 2)``. Reverse (the solver :class:`~diffseg_lightning.diffusion.solvers.BernoulliPosterior`):
    ``p(y_s | y_t) = B(theta_post(y_t, x0_hat))`` where the network output is a logit: of the Bernoulli
    noise ``eps_hat`` (``x0_hat = |y_t - eps_hat|``, the paper's calibration ``F_C``) or, with
    ``objective="x0"``, of ``y_0`` itself. Strided steps ``t -> s`` use ``alpha_{t|s} = abar_t / abar_s``
    and ``abar_s`` (``strided``), so a sample moves from the noise level of ``t`` to that of ``s``.
    Sampling starts from ``y_T ~ B(1/2)``; the final step returns the predicted foreground probability
    (``decode_mask`` gives it unchanged and the sampler's fusion thresholds it).

    Defaults (see the module docstring for sources): ``T = 1000``, linear schedule
    ``beta = 1e-4 .. 0.02`` (Ho et al. 2020), ``objective="eps"``, ``lambda_bce = 1``.

    The module has no parameters; its schedule tables are non-persistent float32 buffers
    (computed in float64) that follow ``.to(device)``.

    Args:
        num_train_timesteps: number of diffusion steps ``T``.
        schedule: ``"linear"`` or ``"cosine"`` (see ``make_beta_schedule``).
        beta_start: first beta of the linear schedule at T = 1000.
        beta_end: last beta of the linear schedule at T = 1000.
        objective: one of ``BERNOULLI_OBJECTIVES`` (``"eps"``, ``"eps_kl"``, ``"eps_bce"``, ``"x0"``).
        lambda_bce: weight of ``L_BCE`` in ``L_KL + lambda_bce L_BCE`` (objectives ``eps`` and ``x0``).

    Raises:
        ValueError: an unknown string option (the message lists the valid values) or an
            out-of-range number.
    """

    betas: Tensor
    alphas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor
    log_alphas_cumprod: Tensor

    #: The Bernoulli kernel has no variance to learn: the denoiser outputs one logit per mask channel.
    learn_variance: bool = False

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        objective: str = "eps",
        lambda_bce: float = 1.0,
    ) -> None:
        super().__init__(num_train_timesteps, schedule)
        if objective not in BERNOULLI_OBJECTIVES:
            raise ConfigError(
                f"unknown objective {objective!r}; valid values are {list(BERNOULLI_OBJECTIVES)}"
            )
        if isinstance(lambda_bce, bool) or not isinstance(lambda_bce, (int, float)) or not lambda_bce >= 0.0:
            raise ConfigError(f"lambda_bce must be a number >= 0, got {lambda_bce!r}")
        self.objective: str = objective
        self.lambda_bce: float = float(lambda_bce)

        betas = make_beta_schedule(schedule, num_train_timesteps, beta_start, beta_end)  # float64 (T,)
        alphas = 1.0 - betas
        log_abar = torch.cumsum(torch.log(alphas), 0)
        abar = torch.exp(log_abar)
        tables = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]]),
            "log_alphas_cumprod": log_abar,
        }
        for name, value in tables.items():
            self.register_buffer(name, value.to(torch.float32), persistent=False)

    #: ``sampler=bernoulli``: the posterior step, the only solver of this kernel.
    default_solver_group = "bernoulli"

    def default_solver(self) -> Solver:
        """The solver ``sampler=default`` uses: :class:`~diffseg_lightning.diffusion.solvers.BernoulliPosterior`."""
        from diffseg_lightning.diffusion.solvers import BernoulliPosterior  # the solvers import this module

        return BernoulliPosterior(binarize_final=False)

    def extra_repr(self) -> str:
        return (
            f"T={self.num_train_timesteps}, schedule={self.schedule!r}, objective={self.objective!r}, "
            f"lambda_bce={self.lambda_bce}"
        )

    # ------------------------------------------------------------------ helpers
    def model_output_channels(self, mask_channels: int) -> int:
        """Channels the denoiser must output: one logit per mask channel (``mask_channels``)."""
        return mask_channels

    def encode_mask(self, mask01: Tensor) -> Tensor:
        """Masks stay in ``{0, 1}``: the identity, as floating point ``(B, C, H, W)``."""
        return mask01 if mask01.is_floating_point() else mask01.to(torch.get_default_dtype())

    def decode_mask(self, x: Tensor) -> Tensor:
        """Foreground probability ``(B, C, H, W)``: ``x.clamp(0, 1)``."""
        return x.clamp(0.0, 1.0)

    def _check_output(self, model_output: Tensor, x_t: Tensor) -> None:
        if model_output.shape != x_t.shape:
            raise ConfigError(
                f"model_output has shape {tuple(model_output.shape)}; the Bernoulli kernel expects one logit "
                f"per mask channel, the shape of x_t {tuple(x_t.shape)}"
            )

    def strided(self, t: Tensor, t_prev: Tensor, ndim: int) -> Strided:
        """Coefficients of the strided step ``t -> t_prev``: ``alpha_{t|s} = abar_t / abar_s`` and ``abar_s``.

        Computed from ``log abar`` with ``expm1`` for the small complements ``1 - alpha``.

        Args:
            t: LongTensor ``(B,)`` in ``[0, T)`` (see :meth:`batch_timesteps`).
            t_prev: LongTensor ``(B,)``, ``-1 <= t_prev < t``; ``-1`` is the clean mask.
            ndim: dimensions of the sample the coefficients multiply (4 for ``(B, C, H, W)``).

        Returns:
            :class:`Strided`, every field float32 ``(B, 1, ..., 1)`` with ``ndim`` dims.
        """
        final = (t_prev < 0).to(self.log_alphas_cumprod.dtype)
        la_t = self.log_alphas_cumprod.index_select(0, t)
        la_p = self.log_alphas_cumprod.index_select(0, t_prev.clamp(min=0)) * (1.0 - final)
        fields = [
            torch.exp(la_t - la_p),
            -0.5 * torch.expm1(la_t - la_p),
            torch.exp(la_p),
            -0.5 * torch.expm1(la_p),
            final,
        ]
        table = torch.stack(fields, 1).reshape(t.shape[0], len(fields), *([1] * (ndim - 1)))
        return Strided(*table.unbind(1))

    def predict_x0(self, model_output: Tensor, x_t: Tensor, t: Tensor | int | None = None) -> Tensor:
        """Predicted foreground probability of ``y_0`` from the network's logits (``t`` is not needed).

        ``eps`` objectives: ``eps_hat = sigmoid(output)`` and ``x0_hat = |y_t - eps_hat|``, written
        ``y_t + (1 - 2 y_t) eps_hat`` (equal for ``y_t`` in ``{0, 1}``, and smooth); this is
        ``P(y_t XOR eps = 1)`` for ``eps ~ B(eps_hat)`` (the paper's calibration). ``x0``:
        ``sigmoid(output)``.

        Args:
            model_output: logits ``(B, C, H, W)``.
            x_t: ``y_t`` in ``{0, 1}``, ``(B, C, H, W)``.
            t: unused (the calibration does not depend on the noise level).

        Returns:
            ``x0_hat`` in ``[0, 1]``, ``(B, C, H, W)``.
        """
        self._check_output(model_output, x_t)
        p = torch.sigmoid(model_output)
        if self.objective == "x0":
            return p
        return x_t + (1.0 - 2.0 * x_t) * p

    # ------------------------------------------------------------------ forward process
    def sample_prior(
        self,
        shape: tuple[int, ...] | torch.Size,
        device: torch.device | str | None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Draw ``y_T ~ B(1/2)`` of ``shape`` (e.g. ``(B, C, H, W)``) as floats in ``{0, 1}``."""
        u = torch.rand(tuple(shape), generator=generator, device=device, dtype=dtype)
        return (u < 0.5).to(dtype)

    def q_probs(self, x0: Tensor, t: Tensor | int) -> Tensor:
        """Foreground probability of ``q(y_t | y_0)``: ``abar_t y_0 + (1 - abar_t) / 2`` (Chen et al., Eq. 2).

        Args:
            x0: ``y_0`` ``(B, C, H, W)``.
            t: LongTensor ``(B,)`` (a 0-dim tensor or int is broadcast).

        Returns:
            Probabilities of the shape of ``x0``.
        """
        t = self.batch_timesteps(t, x0.shape[0])
        la = self._gather(self.log_alphas_cumprod, t, x0.ndim)
        return torch.exp(la) * x0 - 0.5 * torch.expm1(la)

    def q_sample(
        self,
        x0: Tensor,
        t: Tensor | int,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw ``y_t = y_0 XOR eps``, ``eps ~ B((1 - abar_t) / 2)``: a draw of ``q(y_t | y_0)``.

        Args:
            x0: clean masks in ``{0, 1}``, ``(B, C, H, W)`` floating point.
            t: LongTensor ``(B,)`` (a 0-dim tensor or int is broadcast).
            noise: ``eps`` in ``{0, 1}`` of the shape of ``x0``; drawn with ``generator`` if ``None``.
            generator: random generator for ``noise``.

        Returns:
            ``y_t`` in ``{0, 1}`` of the shape and dtype of ``x0``.

        Raises:
            ValueError: ``noise`` has another shape than ``x0``.
        """
        t = self.batch_timesteps(t, x0.shape[0])
        if noise is None:
            flip = -0.5 * torch.expm1(self._gather(self.log_alphas_cumprod, t, x0.ndim))
            u = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            noise = (u < flip).to(x0.dtype)
        elif noise.shape != x0.shape:
            raise ConfigError(
                f"noise has shape {tuple(noise.shape)}; expected the shape of x0 {tuple(x0.shape)}"
            )
        return x0 + noise - 2.0 * x0 * noise  # XOR for {0, 1} values

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor | int, t_prev: Tensor | int) -> Tensor:
        """Foreground probability of ``q(y_{t_prev} | y_t, y_0)`` for any ``-1 <= t_prev < t``.

        ``bernoulli_posterior`` with ``alpha = abar_t / abar_{t_prev}`` and ``abar_{t_prev}``
        (``t_prev = t - 1`` is the paper's one-step posterior; ``t_prev = -1`` gives ``y_0``).

        Args:
            x0: ``y_0`` (or its foreground probability) ``(B, C, H, W)``.
            x_t: ``y_t`` in ``{0, 1}``, ``(B, C, H, W)``.
            t: LongTensor ``(B,)`` (or 0-dim / int).
            t_prev: LongTensor ``(B,)`` (or 0-dim / int).

        Returns:
            Probabilities ``(B, C, H, W)``.
        """
        b = x_t.shape[0]
        c = self.strided(self.batch_timesteps(t, b), self.batch_timesteps(t_prev, b, "t_prev"), x_t.ndim)
        return bernoulli_posterior(
            x_t, x0, c.alpha, c.abar_prev, c.half_one_minus_alpha, c.half_one_minus_abar_prev
        )

    # ------------------------------------------------------------------ training loss
    def kl_terms(self, model_output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor | int) -> Tensor:
        """Per-sample variational term ``L_t`` in nats, mean over pixels.

        ``KL(q(y_{t-1} | y_t, y_0) || p(y_{t-1} | y_t))`` for ``t > 0``, with
        ``p = B(theta_post(y_t, x0_hat))``; at ``t = 0`` the decoder NLL ``-log B(y_0; x0_hat)``;
        chosen per sample with ``torch.where``.

        Args:
            model_output: logits ``(B, C, H, W)``.
            x0: clean masks in ``{0, 1}``, ``(B, C, H, W)``.
            x_t: ``y_t`` in ``{0, 1}``, ``(B, C, H, W)``.
            t: LongTensor ``(B,)``.

        Returns:
            ``(B,)`` terms.
        """
        x0_hat = self.predict_x0(model_output, x_t)
        b, nd = x_t.shape[0], x_t.ndim
        tb = self.batch_timesteps(t, b)
        c = self.strided(tb, tb - 1, nd)
        coefs = (c.alpha, c.abar_prev, c.half_one_minus_alpha, c.half_one_minus_abar_prev)
        true_p = bernoulli_posterior(x_t, x0, *coefs)
        model_p = bernoulli_posterior(x_t, x0_hat, *coefs)
        dims = tuple(range(1, nd))
        kl = bernoulli_kl(true_p, model_p).mean(dim=dims)
        nll = bernoulli_kl(x0, x0_hat).mean(dim=dims)  # KL from a {0, 1} target is its NLL
        return torch.where(tb == 0, nll, kl)

    def loss(self, model_output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> dict[str, Tensor]:
        """Training loss terms (Chen et al. 2023, Sec. 2.3).

        ``bce``: binary cross-entropy between the target and the network's logits, mean over all
        elements; the target is the true noise ``eps = y_0 XOR y_t`` (recovered from ``x0`` and
        ``x_t``), or ``y_0`` for ``objective="x0"``. ``kl``: mean of ``kl_terms``. ``loss``:
        ``kl + lambda_bce * bce`` (``eps``, ``x0``), ``kl`` (``eps_kl``) or ``bce`` (``eps_bce``).

        Args:
            model_output: logits ``(B, C, H, W)``.
            x0: clean masks in ``{0, 1}``, ``(B, C, H, W)``.
            x_t: ``q_sample(x0, t)``, ``(B, C, H, W)``.
            t: LongTensor ``(B,)``.

        Returns:
            ``{"loss"}`` plus ``"kl"`` and / or ``"bce"`` as used; 0-dim tensors.
        """
        self._check_output(model_output, x_t)
        terms: dict[str, Tensor] = {}
        if self.objective != "eps_bce":
            terms["kl"] = self.kl_terms(model_output, x0, x_t, t).mean()
        if self.objective != "eps_kl":
            target = x0 if self.objective == "x0" else x0 + x_t - 2.0 * x0 * x_t  # eps = y_0 XOR y_t
            terms["bce"] = F.binary_cross_entropy_with_logits(model_output, target.to(model_output.dtype))
        if self.objective == "eps_kl":
            terms["loss"] = terms["kl"]
        elif self.objective == "eps_bce":
            terms["loss"] = terms["bce"]
        else:
            terms["loss"] = terms["kl"] + self.lambda_bce * terms["bce"]
        return terms
