"""The project's own training losses, in one place (the kernels' diffusion losses live with the kernels).

Three Dice losses that differ in what they take and how they smooth, each one paper's form and each
MONAI's :class:`~monai.losses.DiceLoss` with the options that make it so (``tests/test_losses.py`` checks
every one against its formula written out):

- :func:`soft_dice_loss`: probabilities, linear denominator, ``eps`` in the denominator only
  (Huang et al.'s discounted Dice loss, EI-DDPM); per image and class, averaged.
- :func:`squared_dice_loss`: probabilities, squared denominator (V-Net's, as CondInst uses it);
  per instance.
- :func:`smoothed_dice_loss`: logits (sigmoid inside), linear denominator, ``+1`` in the numerator
  and the denominator (Mask2Former's); per mask.

And :func:`sigmoid_focal_loss` (MONAI's), :func:`lsgan_loss` and the
evidential loss of subjective logic (:func:`evidential_loss`, with :func:`dirichlet_kl_uniform`).

This module sits at the bottom of the layers: it imports torch, MONAI and ``exceptions`` only.
"""

from __future__ import annotations

import torch
from monai.losses import DiceLoss
from monai.losses.focal_loss import sigmoid_focal_loss as _monai_sigmoid_focal_loss
from torch import Tensor

from diffseg_lightning.exceptions import ConfigError

__all__ = [
    "dirichlet_kl_uniform",
    "evidential_loss",
    "lsgan_loss",
    "sigmoid_focal_loss",
    "smoothed_dice_loss",
    "soft_dice_loss",
    "squared_dice_loss",
]


def _check_same_shape(output: Tensor, target: Tensor, name: str) -> None:
    if output.shape != target.shape:
        raise ConfigError(f"{name}: output {tuple(output.shape)} and target {tuple(target.shape)} differ")


# ------------------------------------------------------------------------------------------------ Dice
def soft_dice_loss(probability: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """``1 - 2 sum_n S_n G_n / (sum_n S_n + sum_n G_n + eps)`` per image and class, averaged.

    Huang et al. (MICCAI 2022)'s discounted Dice loss is this loss with ``S`` the fused, discounted
    plausibility (:func:`~diffseg_lightning.inference.evidence.discounted_plausibility`) and ``G`` the
    one-hot label. MONAI's ``DiceLoss(smooth_nr=0, smooth_dr=eps)``.

    Args:
        probability: (B, K, ...) segmentation output ``S``.
        target: (B, K, ...) one-hot ``G``.
        eps: added to the denominator (an absent class predicted absent gives a loss near 1 - 0).

    Returns:
        A scalar.
    """
    _check_same_shape(probability, target, "soft_dice_loss")
    return DiceLoss(smooth_nr=0.0, smooth_dr=eps)(probability, target)


def squared_dice_loss(probability: Tensor, target: Tensor, eps: float = 1e-5) -> Tensor:
    """Per instance ``1 - 2 sum p g / (sum p^2 + sum g^2 + eps)``: (K, H, W) -> (K,).

    The Dice loss with squared terms in the denominator (Milletari, Navab & Ahmadi, V-Net, 3DV 2016, Eq. 1)
    that CondInst (Tian, Shen & Chen, ECCV 2020) trains its instance masks with, on probabilities. MONAI's
    ``DiceLoss(squared_pred=True, smooth_nr=0, smooth_dr=eps)``.

    Args:
        probability: (K, ...) mask probabilities ``p``, one row per instance.
        target: (K, ...) reference masks ``g`` in [0, 1].
        eps: added to the denominator.

    Returns:
        (K,) losses.
    """
    _check_same_shape(probability, target, "squared_dice_loss")
    loss = DiceLoss(squared_pred=True, smooth_nr=0.0, smooth_dr=eps, reduction="none")
    return loss(probability.unsqueeze(1), target.unsqueeze(1)).reshape(probability.shape[0])


def smoothed_dice_loss(mask_logits: Tensor, targets: Tensor) -> Tensor:
    """Per mask ``1 - (2 sum s t + 1) / (sum s + sum t + 1)`` with ``s = sigmoid(logits)``: (M, P) -> (M,).

    Mask2Former's Dice loss (Cheng et al., CVPR 2022), smoothed by 1 in the numerator and the
    denominator, on logits. MONAI's ``DiceLoss(sigmoid=True, smooth_nr=1, smooth_dr=1)``.

    Args:
        mask_logits: (M, P) mask logits, one row per mask, P pixels.
        targets: (M, P) reference masks in [0, 1].

    Returns:
        (M,) losses.
    """
    _check_same_shape(mask_logits, targets, "smoothed_dice_loss")
    loss = DiceLoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0, reduction="none")
    return loss(mask_logits.unsqueeze(1), targets.unsqueeze(1)).reshape(mask_logits.shape[0])


# ----------------------------------------------------------------------------------------------- focal
def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Elementwise focal loss on sigmoid logits (Lin et al., ICCV 2017, Eq. 5); the caller reduces.

    ``FL = alpha_t (1 - p_t)^gamma CE(p, y)`` with ``p = sigmoid(logit)``, ``p_t = p y + (1 - p)(1 - y)``,
    ``alpha_t = alpha y + (1 - alpha)(1 - y)`` and ``CE`` the binary cross-entropy. MONAI's
    ``monai.losses.focal_loss.sigmoid_focal_loss`` (what ``FocalLoss(use_softmax=False)`` computes, without
    its cast of float64 to float32), which evaluates ``(1 - p_t)^gamma`` in log space; computed in float32
    (bf16 / fp16 logits are cast up) or float64.

    Args:
        logits: logits, any shape.
        targets: the same shape, in [0, 1].
        alpha: weight of the positives.
        gamma: focusing parameter.

    Returns:
        Elementwise losses, the shape of ``logits``.
    """
    _check_same_shape(logits, targets, "sigmoid_focal_loss")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return _monai_sigmoid_focal_loss(logits.to(dtype), targets.to(dtype), gamma=gamma, alpha=alpha)


# ------------------------------------------------------------------------------------------------- GAN
def lsgan_loss(prediction: Tensor, real: bool) -> Tensor:
    """Least-squares GAN loss (Mao et al., ICCV 2017): ``mean((D(.) - target)^2)``, target 1 (real) or 0.

    The number of MONAI's ``PatchAdversarialLoss(criterion="least_squares", no_activation_leastsq=True)``
    (``tests/test_losses.py``); kept as one line here because MONAI's class also flips the target for a
    generator (``for_discriminator``) and warns, where DARL's terms name the target directly.
    """
    return ((prediction - (1.0 if real else 0.0)) ** 2).mean()


# ------------------------------------------------------------------------------------------ evidential
def dirichlet_kl_uniform(alpha: Tensor, dim: int = 1) -> Tensor:
    """``KL(Dir(alpha) || Dir(1, ..., 1))``, the class axis reduced (Sensoy et al. 2018, Eq. 5 of Han et al.).

    ``lnGamma(S) - lnGamma(K) - sum_k lnGamma(alpha_k) + sum_k (alpha_k - 1)(psi(alpha_k) - psi(S))``.
    """
    k = alpha.shape[dim]
    strength = alpha.sum(dim, keepdim=True)
    return (
        torch.lgamma(strength).squeeze(dim)
        - torch.lgamma(torch.tensor(float(k), dtype=alpha.dtype, device=alpha.device))
        - torch.lgamma(alpha).sum(dim)
        + ((alpha - 1.0) * (torch.digamma(alpha) - torch.digamma(strength))).sum(dim)
    )


def evidential_loss(alpha: Tensor, target: Tensor, annealing: float, dim: int = 1) -> dict[str, Tensor]:
    """The EIL's evidential loss: the Bayes risk of cross-entropy plus the annealed KL regulariser.

    ``L_ace = sum_k y_k (psi(S) - psi(alpha_k))`` and ``L_KL = KL(Dir(alpha_tilde) || Dir(1))`` with
    ``alpha_tilde = y + (1 - y) * alpha`` (the evidence of the true class removed), weighted by the
    annealing coefficient ``lambda_t = min(1, t / T_anneal)`` (Sensoy et al., NeurIPS 2018; Han et al.,
    ICLR 2021, Eq. 4-6), averaged over every other axis.

    Args:
        alpha: Dirichlet parameters (..., K, ...) with the classes on ``dim``.
        target: one-hot labels, same shape.
        annealing: ``lambda_t`` in [0, 1].
        dim: the class axis.

    Returns:
        ``loss = ace + annealing * kl``, ``ace`` and ``kl`` (scalars).
    """
    if alpha.shape != target.shape:
        raise ConfigError(f"alpha {tuple(alpha.shape)} and the one-hot target {tuple(target.shape)} differ")
    if not 0.0 <= annealing <= 1.0:
        raise ConfigError(f"the annealing coefficient must lie in [0, 1], got {annealing}")
    strength = alpha.sum(dim, keepdim=True)
    ace = (target * (torch.digamma(strength) - torch.digamma(alpha))).sum(dim).mean()
    alpha_tilde = target + (1.0 - target) * alpha
    kl = dirichlet_kl_uniform(alpha_tilde, dim).mean()
    return {"loss": ace + annealing * kl, "ace": ace, "kl": kl}
