"""Fusion of S sampled masks into one prediction: mean, majority vote, STAPLE, MB-Diff's evolution fusion.

STAPLE is the expectation-maximisation label fusion of Warfield, Zou & Wells, "Simultaneous truth and
performance level estimation (STAPLE): an algorithm for the validation of image segmentation", IEEE
Transactions on Medical Imaging 23(7):903-921, 2004. The released MedSegDiff code calls a one-iteration
mean of the samples "STAPLE"; :func:`staple` runs the EM loop to convergence instead.

The evolution-uncertainty fusion is that of MB-Diff: Wang, Yang, Zhou & Wang, "Medical Boundary Diffusion Model
for Skin Lesion Segmentation", MICCAI 2023 (:func:`evolution_fusion`). It needs the mean and the learned
log-variance of the final reverse step of every sample, so the sampler computes them
(:func:`final_step_log_variance`) and :func:`fuse_samples` refuses it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import Enum

import torch

from diffseg_lightning.diffusion.base import NoiseKernel
from diffseg_lightning.diffusion.gaussian import GaussianKernel
from diffseg_lightning.exceptions import ConfigError, DiffSegError


class Fusion(str, Enum):
    """How S samples become one mask.

    MEAN: average the samples' foreground probabilities, then threshold.
    VOTE: binarise every sample at 0.5, then keep pixels where the fraction of votes exceeds the threshold
    (threshold 0.5 is the majority vote).
    STAPLE: binarise every sample at 0.5, fuse the S binary masks with :func:`staple` (Warfield et al.,
    IEEE TMI 2004), and threshold its foreground probability W.
    EVOLUTION: MB-Diff's evolution-uncertainty fusion (Wang et al., MICCAI 2023; :func:`evolution_fusion`):
    ``y_i = mu_i + exp(Sigma_i / 2) z_i`` from the mean and learned log-variance of every sample's final
    step, fused as ``sum_i y_i >= tau``. Only :class:`~diffseg_lightning.inference.DiffusionSampler` can run
    it (it needs the kernel's learned variance, not just the samples).
    """

    MEAN = "mean"
    VOTE = "vote"
    STAPLE = "staple"
    EVOLUTION = "evolution"

    @classmethod
    def parse(cls, value: str | Fusion) -> Fusion:
        """Validate a fusion name; raises ``ValueError`` naming the valid options."""
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"unknown fusion {value!r}; valid: {[f.value for f in cls]}") from None


def fuse_samples(
    samples: torch.Tensor, fusion: str | Fusion = Fusion.MEAN, threshold: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse samples of foreground probabilities.

    Args:
        samples: (B, S, C, H, W) foreground probabilities in [0, 1].
        fusion: a :class:`Fusion` name: ``mean``, ``vote`` or ``staple``.
        threshold: the cut on the fused probability (mean, staple) or on the vote fraction (vote).

    Returns:
        ``(probability, mask)``: the fused soft map (B, C, H, W) and its binary mask (B, C, H, W) float.
        For ``staple`` the soft map is STAPLE's posterior foreground probability W (:func:`staple`).

    Raises:
        ValueError: an unknown fusion, or ``evolution``, which needs more than the samples
            (:func:`evolution_fusion`; the sampler runs it).
    """
    fusion = Fusion.parse(fusion)
    if fusion is Fusion.EVOLUTION:
        raise ConfigError(
            "fusion 'evolution' needs the mean and learned log-variance of every sample's final step, not just "
            "the samples: use DiffusionSampler(fusion='evolution') or evolution_fusion()"
        )
    if fusion is Fusion.MEAN:
        probability = samples.mean(dim=1)
    elif fusion is Fusion.VOTE:
        probability = (samples > 0.5).float().mean(dim=1)
    else:
        dtype = samples.dtype if samples.is_floating_point() else torch.float32
        probability = staple(samples > 0.5).to(dtype)
    return probability, (probability > threshold).float()


def check_finite_fusion(probability: torch.Tensor, fusion: str, cases: Sequence[str]) -> None:
    """Refuse a fused map with NaN or infinite values, naming the cases and the fusion.

    Called on every method's output before it is scored or written, so a non-finite fusion stops the run
    with one line instead of an unrelated metric error (``diffseg-eval``) or empty masks (``diffseg-predict``).

    Args:
        probability: (B, C, *spatial) the fused foreground probability of a batch.
        fusion: the fusion's name, as in the sampler's settings (``sampler.fusion``).
        cases: the B case names of the batch.

    Raises:
        DiffSegError: a case's fused map holds a NaN or an infinite value.
    """
    bad = ~torch.isfinite(probability.flatten(1)).all(dim=1)
    if not bool(bad.any()):
        return
    rows = bad.nonzero().flatten().tolist()
    counts = (~torch.isfinite(probability[rows].flatten(1))).sum(dim=1).tolist()
    size = probability[0].numel()
    named = ", ".join(f"{cases[i]} ({n} of {size} values)" for i, n in zip(rows, counts, strict=True))
    if fusion in (None, "none"):
        raise DiffSegError(f"the method's probability (no fusion) is NaN or infinite for case {named}")
    raise DiffSegError(
        f"fusion {fusion!r} (sampler.fusion) gave a NaN or infinite probability for case {named}; if "
        f"sampler.fusion=mean gives finite values, the fusion is at fault: please report it"
    )


def staple(
    decisions: torch.Tensor,
    max_iter: int = 1000,
    tol: float = 1e-7,
    confidence_weight: float = 1.0,
    check_every: int = 8,
) -> torch.Tensor:
    """STAPLE fusion of S binary segmentations, batched over images and channels.

    Warfield, Zou & Wells, IEEE TMI 23(7):903-921, 2004, binary case. Each (image, channel) is one
    independent STAPLE problem over its pixels: rater ``j`` has a sensitivity ``p_j`` and a specificity
    ``q_j``, the hidden truth a fixed prior ``g``, and EM alternates

    - M-step: ``p_j = sum_i W_i D_ij / sum_i W_i``,  ``q_j = sum_i (1 - W_i)(1 - D_ij) / sum_i (1 - W_i)``;
    - E-step: ``W_i = g a_i / (g a_i + (1 - g) b_i)`` with ``a_i = prod_j p_j^D_ij (1 - p_j)^(1 - D_ij)``
      and ``b_i = prod_j (1 - q_j)^D_ij q_j^(1 - D_ij)``.

    Conventions, chosen to reproduce ITK's ``itk::STAPLEImageFilter`` (SimpleITK ``STAPLEImageFilter``;
    ITK source ``Modules/Segmentation/LabelVoting/include/itkSTAPLEImageFilter.hxx``), and checked
    against SimpleITK 2.5 to 1e-4 in ``tests/test_staple.py``:

    - Initialisation: not from initial p, q, but from ``W_i`` = the mean of the S decisions at pixel ``i``;
      each iteration is then an M-step followed by an E-step.
    - Prior: ``g = confidence_weight * mean_i(initial W_i)``, i.e. the mean foreground fraction of the
      raters over the image (ITK's ``ConfidenceWeight``, default 1), held fixed during EM (not re-estimated).
    - Foreground: a decision of 1 (ITK's ``ForegroundValue`` 1); everything else is background.
    - Convergence: from the second iteration on, a case stops when ``|p_j - p_j_prev| <= tol`` and
      ``|q_j - q_j_prev| <= tol`` for every rater (ITK: squared change <= 1e-14, i.e. ``tol = 1e-7``); the
      W of the iteration that converged is returned. ITK's ``MaximumIterations`` is unlimited by default;
      ``max_iter`` caps the loop here (1000 by default: on random 32x32 cases with 3-8 noisy raters SimpleITK
      needed 12-500 iterations, so a cap of 100 would stop short of ITK's answer on a few of them).
    - Output: the posterior foreground probability W (ITK's output image), not a binary mask.

    The E-step is evaluated in the log domain (``W = sigmoid(logit g + sum_j log(a_ij / b_ij))``), equal to
    ITK's products but free of their underflow for many raters; everything runs in float64 as in ITK.

    Raters that agree closely: EM drives their ``p`` and ``q`` to exactly 1 (and an all-empty or all-full
    rater's to 0 and 1). As in ITK, ``p`` and ``q`` stay in [0, 1] exactly and a factor ``1 - p = 0`` is an
    exact zero (here a log-term of -inf), so W is exactly 0 or 1 where ITK's is; ``1 - p`` and ``1 - q`` are
    computed from their own sums, never as ``1 - p``, so they are not rounded to 0 either. No clamping to
    ``[eps, 1 - eps]``: that would move W off ITK's answer for every degenerate rater. Checked against
    SimpleITK on low-diversity sample sets in ``tests/test_staple.py``.

    Batching and synchronisation: all cases, raters and pixels are updated together in each iteration;
    a per-case convergence mask freezes a case (its W, p, q) once it has converged, so a batched result
    equals the per-case result. The only host-device synchronisation is one ``converged.all()`` check
    every ``check_every`` iterations to stop early; ``check_every >= max_iter`` gives a sync-free fixed loop.

    Empty-mask policy (ITK returns NaN everywhere in both cases, from 0/0 in the M-step): a case where every
    rater is empty gives W = 0, and a case where every rater marks every pixel gives W = 1, the raters'
    unanimous decision. More generally, unanimous raters give W = their common decision (as ITK does
    wherever it is defined: p = q = 1 after one M-step).

    Args:
        decisions: (B, S, C, *spatial) binary decisions (bool, or numbers in {0, 1}) of S raters or
            samples, e.g. (B, S, C, H, W).
        max_iter: the most EM iterations per case (>= 1).
        tol: the convergence tolerance on the change of every sensitivity and specificity.
        confidence_weight: ITK's ``ConfidenceWeight`` that scales the prior ``g``; in (0, 1] here so that
            ``g`` stays a probability.
        check_every: how often (in iterations) to test whether every case has converged.

    Returns:
        (B, C, *spatial) foreground probabilities W in [0, 1]; float32, or float64 for float64 input.

    Raises:
        ValueError: ``decisions`` has fewer than 4 dimensions or values other than 0 and 1, or an option
            is out of range.
    """
    if decisions.dim() < 4:
        raise ConfigError(
            f"staple: decisions must be (B, S, C, *spatial), got shape {tuple(decisions.shape)}"
        )
    if max_iter < 1 or check_every < 1:
        raise ConfigError(f"staple: max_iter ({max_iter}) and check_every ({check_every}) must be >= 1")
    if tol < 0:
        raise ConfigError(f"staple: tol must be >= 0, got {tol}")
    if not 0.0 < confidence_weight <= 1.0:
        raise ConfigError(f"staple: confidence_weight must be in (0, 1], got {confidence_weight}")
    if decisions.dtype != torch.bool:
        if not bool(((decisions == 0) | (decisions == 1)).all()):
            raise ConfigError(
                "staple: decisions must be binary (0 or 1); binarise probabilities first, e.g. samples > 0.5"
            )
    out_dtype = torch.float64 if decisions.dtype == torch.float64 else torch.float32

    b, s, c = decisions.shape[:3]
    spatial = decisions.shape[3:]
    d = decisions.bool().movedim(1, 2).reshape(b, c, s, -1)  # (B, C, S, N)
    dd = d.to(torch.float64)

    w_init = dd.mean(dim=2)  # (B, C, N): the initial W, the mean decision
    fg_fraction = w_init.mean(dim=-1)  # (B, C)
    degenerate = (fg_fraction == 0) | (fg_fraction == 1)  # every rater empty, or every rater full
    g = torch.where(degenerate, 0.5, fg_fraction * confidence_weight)
    log_prior_odds = (torch.log(g) - torch.log1p(-g)).unsqueeze(-1)  # (B, C, 1)

    tiny = torch.finfo(torch.float64).tiny
    w = w_init
    last_p = torch.full((b, c, s), -10.0, dtype=torch.float64, device=d.device)
    last_q = last_p.clone()
    converged = degenerate.clone()
    for it in range(max_iter):
        # M-step: sensitivity p = w1 / (w1 + w0) and specificity q = v0 / (v0 + v1) of every rater, from sums
        # of non-negative terms: w1 = sum W D and w0 = sum W (1 - D) (the weight of W on the rater's 1s and
        # 0s), v0 = sum (1 - W)(1 - D) and v1 = sum (1 - W) D. Then w1 <= fl(w1 + w0), so p lies in [0, 1]
        # exactly (as ITK's, whose numerator is a sub-sum of its denominator), and 1 - p is w0 / (w1 + w0), not
        # 1 - fl(p): exactly 0 when the rater has no 0 where W > 0, else positive however close p is to 1.
        # (Dividing sum W D by a sum W computed in another order could round p one step above 1 and make
        # log1p(-p) NaN for the whole case.)
        w1 = torch.einsum("bcsn,bcn->bcs", dd, w)
        w0 = torch.einsum("bcsn,bcn->bcs", 1 - dd, w)
        v0 = torch.einsum("bcsn,bcn->bcs", 1 - dd, 1 - w)
        v1 = torch.einsum("bcsn,bcn->bcs", dd, 1 - w)
        fg, bg = (w1 + w0).clamp_min(tiny), (v0 + v1).clamp_min(tiny)
        p, not_p, q, not_q = w1 / fg, w0 / fg, v0 / bg, v1 / bg
        # E-step in the log domain: a rater saying 1 adds log(p / (1 - q)), saying 0 adds log((1 - p) / q).
        # A term is infinite only for a rater whose p or q is exactly 0 or 1 (ITK's product is then 0), and
        # no pixel gets both +inf and -inf: +inf from a rater saying 1 needs W = 1 wherever it says 1 (v1 = 0),
        # -inf from one saying 0 needs W = 0 wherever it says 0 (w0 = 0). A term that is inf - inf (p = 0 and
        # q = 1) belongs to a rater that never says 1 (or, for the other term, never says 0): never selected.
        says_one = (torch.log(p) - torch.log(not_q)).unsqueeze(-1)
        says_zero = (torch.log(not_p) - torch.log(q)).unsqueeze(-1)
        logit = log_prior_odds + torch.where(d, says_one, says_zero).sum(dim=2)
        w_new = torch.sigmoid(logit)

        active = ~converged
        step_converged = ((p - last_p).abs() <= tol).all(-1) & ((q - last_q).abs() <= tol).all(-1)
        w = torch.where(active.unsqueeze(-1), w_new, w)
        last_p = torch.where(active.unsqueeze(-1), p, last_p)
        last_q = torch.where(active.unsqueeze(-1), q, last_q)
        if it > 0:
            converged = converged | step_converged
        if (it + 1) % check_every == 0 and bool(converged.all()):
            break

    w = torch.where(degenerate.unsqueeze(-1), w_init, w)
    return w.reshape(b, c, *spatial).to(out_dtype)


def check_learned_variance(kernel: NoiseKernel) -> None:
    """Refuse a kernel without a learned variance for the evolution fusion, with the fix in the message.

    Raises:
        ConfigError: ``kernel`` is not a :class:`~diffseg_lightning.diffusion.GaussianKernel` with
            ``learn_variance=True`` (e.g. the Bernoulli kernel, which has no variance to learn).
    """
    if not (isinstance(kernel, GaussianKernel) and kernel.learn_variance):
        setting = (
            f"learn_variance={kernel.learn_variance}" if isinstance(kernel, GaussianKernel) else "no variance"
        )
        raise ConfigError(
            f"fusion 'evolution' (MB-Diff's evolution-uncertainty fusion) needs a kernel with a learned variance, "
            f"but {type(kernel).__name__} has none ({setting}); train and sample with "
            f"noise=gaussian noise.learn_variance=true, or choose another fusion (sampler.fusion=mean|vote|staple)"
        )


def final_step_log_variance(
    kernel: GaussianKernel, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """The learned log-variance ``Sigma`` of the reverse step at ``t``, from the network output already computed.

    Improved DDPM (Nichol & Dhariwal, ICML 2021, Eq. 15): ``Sigma = v' log beta_t + (1 - v') log beta~_t`` with
    ``v' = (v + 1) / 2`` and ``v`` the variance half of the output (``kernel.split_output``), ``beta~_t`` the
    clipped posterior variance (``beta~_1`` at ``t = 0``). These are the per-timestep tables of the training
    chain, i.e. the log-variance that the kernel's variational-bound loss (``GaussianKernel.vlb_terms``) trains
    at ``t``; at ``t = 0`` it is the variance of the decoder ``p(y_0 | y_1)``. A strided sampler's final step
    starts at ``t_0 = round(T / N) - 1`` (``t_0 = 0`` with ``N = T`` steps, as MB-Diff's full chain); we use
    the learned variance of ``t_0`` as trained rather than a respaced reinterpretation (the respaced chain's
    last step has posterior variance 0, so its "clipped" bounds are not defined there).

    Args:
        kernel: the Gaussian kernel with ``learn_variance`` true (its ``split_output`` and its ``log_betas`` and
            ``posterior_log_variance_clipped`` tables).
        model_output: (B, 2C, H, W) network output at ``t``.
        x_t: (B, C, H, W) the sample it was computed on.
        t: (B,) timesteps.

    Returns:
        (B, C, H, W) log-variances in kernel space.

    Raises:
        ValueError: the kernel has no learned variance (:func:`check_learned_variance`).
    """
    check_learned_variance(kernel)
    _, v = kernel.split_output(model_output, x_t)
    t = t.to(device=kernel.log_betas.device, dtype=torch.long)
    shape = (x_t.shape[0],) + (1,) * (x_t.ndim - 1)
    log_beta = kernel.log_betas.index_select(0, t).reshape(shape).to(v.device)
    log_tilde = kernel.posterior_log_variance_clipped.index_select(0, t).reshape(shape).to(v.device)
    frac = (v + 1.0) / 2.0
    return frac * log_beta + (1.0 - frac) * log_tilde


def evolution_fusion(
    mean: torch.Tensor,
    log_variance: torch.Tensor,
    noise: torch.Tensor,
    tau: float | None = None,
    threshold: float = 0.5,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """MB-Diff's evolution-uncertainty fusion of n evolutions (samples) of the same image.

    Wang, Yang, Zhou & Wang, "Medical Boundary Diffusion Model for Skin Lesion Segmentation", MICCAI 2023
    (Sec. "evolution uncertainty"; the formulas as in the project survey, Sec. 9.3.1): with ``mu_i`` and
    ``Sigma_i`` the mean and log-variance of the final reverse step of evolution ``i`` (from the learned
    variance of improved DDPM),

    - ``y_i = mu_i + exp(Sigma_i / 2) * z_i``, ``z_i ~ N(0, I)`` (here ``noise``);
    - the evolution uncertainty ``delta = sqrt(1/n sum_i (mu_i - mean_j mu_j)^2)``, the population std of
      the means;
    - the fused mask ``y* = (sum_i y_i) >= tau``, ``tau`` the voting threshold.

    Where the survey is silent (the paper could not be consulted here), our choices:

    - The sum runs over the evolutions mapped to the foreground-probability scale by the kernel's
      ``decode_mask`` (the Gaussian kernel: ``(y + 1) / 2`` clamped to [0, 1]), so every evolution casts a
      soft vote in [0, 1] and ``sum_i y_i`` lies in [0, n]; ``delta`` is computed on ``decode(mu_i)`` too
      (for the Gaussian kernel half the kernel-space std, as ``mu_i`` is clipped to [-1, 1]).
    - ``tau`` is in the units of that sum; the default ``tau = threshold * n`` is ``n / 2`` at the default
      threshold 0.5: a pixel is foreground when the evolutions' votes reach half of n (a majority vote
      of soft votes; with binary votes, at least half of the evolutions). ``>=`` as in the formula.
    - The votes are not binarised before summing (the formula sums ``y_i``).

    Args:
        mean: (B, n, C, H, W) ``mu_i`` in kernel space.
        log_variance: (B, n, C, H, W) ``Sigma_i``, natural-log variances in kernel space.
        noise: (B, n, C, H, W) standard normal draws ``z_i``.
        tau: the voting threshold on ``sum_i y_i`` (in [0, n]); ``None`` gives ``threshold * n``.
        threshold: the fraction of n that ``tau`` defaults to.
        decode: kernel space -> foreground probability (``kernel.decode_mask``); ``None`` for the identity.

    Returns:
        ``samples`` (B, n, C, H, W) the decoded evolutions ``y_i``; ``probability`` (B, C, H, W) their mean
        ``sum_i y_i / n``; ``mask`` (B, C, H, W) float ``sum_i y_i >= tau``; ``evolution_uncertainty``
        (B, C, H, W) ``delta``.

    Raises:
        ValueError: shapes differ or are not 5-D, or ``tau`` is negative.
    """
    if mean.ndim != 5 or log_variance.shape != mean.shape or noise.shape != mean.shape:
        raise ConfigError(
            "evolution_fusion: mean, log_variance and noise must share one (B, n, C, H, W) shape, got "
            f"{tuple(mean.shape)}, {tuple(log_variance.shape)}, {tuple(noise.shape)}"
        )
    n = mean.shape[1]
    if tau is None:
        tau = threshold * n
    if tau < 0:
        raise ConfigError(f"evolution_fusion: tau must be >= 0 (a threshold on a sum of n votes), got {tau}")
    decode = decode if decode is not None else (lambda x: x)
    y = decode(mean + torch.exp(0.5 * log_variance) * noise)
    votes = y.sum(dim=1)
    return {
        "samples": y,
        "probability": votes / n,
        "mask": (votes >= tau).to(y.dtype),
        "evolution_uncertainty": decode(mean).std(dim=1, unbiased=False),
    }
