"""Evidence theory for multi-source segmentation: Dirichlet evidence, Dempster's rule, contextual discounting.

The maths of EI-DDPM (Zhao and Li, "Learning Reliability of Multi-modality Medical Images for Tumor
Segmentation via Evidence-Identified Denoising Diffusion Probabilistic Models", MICCAI 2023), which
builds on:

- subjective logic / evidential deep learning (Sensoy, Kaplan and Kandemir, NeurIPS 2018; Han et al.,
  "Trusted multi-view classification", ICLR 2021): non-negative evidence ``e`` per class gives a
  Dirichlet ``alpha = e + 1`` with strength ``S = sum_k alpha_k``, belief masses ``b_k = e_k / S`` on the
  singletons and the uncertainty ``u = K / S`` on the whole frame Omega, ``sum_k b_k + u = 1``;
- Dempster's rule of combination (Shafer 1976), normalising away the conflict ``kappa = m(empty)``;
- contextual discounting (Mercier, Quost and Denoeux, Information Fusion 2008) as used for multi-modality
  segmentation by Huang, Denoeux, Vera and Ruan, "Evidence fusion with contextual discounting for
  multi-modality medical image segmentation", MICCAI 2022 (arXiv 2206.11739): a source with reliability
  vector ``beta = (beta_1, ..., beta_K)`` (``beta_k``: the degree of belief that the source is reliable
  when the true class is ``omega_k``) is replaced by ``m ∪ m_1 ∪ ... ∪ m_K`` (disjunctive rule) with
  ``m_k(empty) = beta_k`` and ``m_k({omega_k}) = 1 - beta_k``. Its contour function is
  ``pl'(omega_k) = 1 - beta_k + beta_k pl(omega_k)``; Dempster's rule multiplies contour functions, so the
  fused, normalised plausibility is ``prod_s pl'_s(omega_k) / sum_l prod_s pl'_s(omega_l)``
  (:func:`discounted_plausibility`), the segmentation output of Huang et al.'s discounted Dice loss.

The training losses of the EIL (the evidential loss and its Dirichlet KL term) and the discounted Dice loss
are in :mod:`diffseg_lightning.losses`.

Mass functions over a frame of K classes are tensors with a subset axis of length ``2**K``; subset ``A``
is the bitmask ``sum_{k in A} 2**k`` (index 0 is the empty set, ``2**K - 1`` is Omega). The general rules
(:func:`dempster`, :func:`contextual_discount`) work through the commonality ``q(A) = sum_{B ⊇ A} m(B)``
(conjunctive rule: ``q = prod_s q_s``) and the implicability ``b(A) = sum_{B ⊆ A} m(B)`` (disjunctive
rule: ``b = prod_s b_s``), each a (2^K, 2^K) matrix product and its Möbius inverse, batched over every
pixel with no Python loop over pixels or sources. They are exact for any K; ``2**K`` entries per pixel
keep them for small frames (``K <= 8`` is enforced).
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffseg_lightning.utils.errors import ConfigError, DiffSegError

MAX_CLASSES = 8  # 2**8 = 256 subsets per pixel


class TotalConflictError(DiffSegError, ValueError):
    """Dempster's rule met total conflict (``kappa = 1``): the sources support disjoint sets, so the
    normalised combination does not exist."""


# --------------------------------------------------------------------------------------- EIL (Dirichlet)
def dirichlet_opinion(evidence: Tensor, dim: int = 1, check: bool = True) -> dict[str, Tensor]:
    """Evidence -> Dirichlet parameters, belief masses and uncertainty (subjective logic).

    Args:
        evidence: non-negative evidence ``e`` with the K classes on axis ``dim``, e.g. (B, K, H, W).
        dim: the class axis.
        check: raise on negative evidence (a host synchronisation; off inside sampling loops, where the
            evidence comes from softplus / ReLU / exp).

    Returns:
        ``alpha = e + 1`` (same shape), ``strength`` ``S = sum_k alpha_k`` (class axis kept, size 1),
        ``belief`` ``b_k = e_k / S`` (same shape), ``uncertainty`` ``u = K / S`` (class axis size 1) and
        ``probability`` ``alpha / S`` (the Dirichlet mean). ``sum_k b_k + u = 1``.

    Raises:
        ValueError: negative evidence.
    """
    if check and evidence.numel() and bool((evidence < 0).any()):
        raise ConfigError("evidence must be non-negative (apply softplus / ReLU / exp first)")
    k = evidence.shape[dim]
    alpha = evidence + 1.0
    strength = alpha.sum(dim, keepdim=True)
    return {
        "alpha": alpha,
        "strength": strength,
        "belief": evidence / strength,
        "uncertainty": k / strength,
        "probability": alpha / strength,
    }


# ---------------------------------------------------------------------------- mass functions on 2^Omega
def _check_frame(num_classes: int) -> None:
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ConfigError(f"the frame must hold 1 to {MAX_CLASSES} classes (2^K subsets), got {num_classes}")


def _num_classes(num_subsets: int) -> int:
    k = num_subsets.bit_length() - 1
    if num_subsets != 2**k:
        raise ConfigError(f"a mass function over K classes has 2^K entries, got {num_subsets}")
    _check_frame(k)
    return k


def _subset_matrix(num_classes: int, device, dtype) -> Tensor:
    """``Z[B, A] = 1`` if ``A ⊆ B`` (bitmasks), else 0: (2^K, 2^K)."""
    idx = torch.arange(2**num_classes, device=device)
    return ((idx[:, None] & idx[None, :]) == idx[None, :]).to(dtype)


def _moebius_inverse(num_classes: int, device, dtype) -> Tensor:
    """Inverse of :func:`_subset_matrix`: ``(-1)^{|B - A|}`` if ``A ⊆ B``, else 0 (the Möbius function)."""
    idx = torch.arange(2**num_classes, device=device)
    inside = (idx[:, None] & idx[None, :]) == idx[None, :]
    diff = idx[:, None] ^ idx[None, :]
    parity = torch.zeros_like(diff)
    for bit in range(num_classes):  # popcount over at most 8 bits
        parity = parity + ((diff >> bit) & 1)
    sign = 1.0 - 2.0 * (parity % 2).to(dtype)
    return inside.to(dtype) * sign


def opinion_to_mass(belief: Tensor, uncertainty: Tensor, dim: int = 1) -> Tensor:
    """Belief masses on the singletons and ``u`` on Omega as a mass function over 2^Omega.

    Args:
        belief: (..., K, ...) with the classes on ``dim``.
        uncertainty: the same shape with size 1 on ``dim``.

    Returns:
        The mass function with the 2^K subsets on ``dim``: ``m({omega_k}) = b_k``, ``m(Omega) = u``, else 0.
    """
    k = belief.shape[dim]
    _check_frame(k)
    b = belief.movedim(dim, -1)
    mass = b.new_zeros(*b.shape[:-1], 2**k)
    mass[..., [2**i for i in range(k)]] = b
    mass[..., 2**k - 1] += uncertainty.movedim(dim, -1).squeeze(-1)
    return mass.movedim(-1, dim)


def contour_function(mass: Tensor, dim: int = 1) -> Tensor:
    """``pl(omega_k) = sum_{A ∋ omega_k} m(A)``: (..., 2^K, ...) -> (..., K, ...) on axis ``dim``."""
    k = _num_classes(mass.shape[dim])
    idx = torch.arange(2**k, device=mass.device)
    member = ((idx[:, None] >> torch.arange(k, device=mass.device)[None, :]) & 1).to(mass.dtype)  # (2^K, K)
    return (mass.movedim(dim, -1) @ member).movedim(-1, dim)


def dempster(masses: Tensor, dim: int = 2, check: bool = True) -> Tensor:
    """Dempster's rule: the normalised conjunctive combination of M mass functions, batched over pixels.

    ``m(A) = sum_{B_1 ∩ ... ∩ B_M = A} prod_s m_s(B_s) / (1 - kappa)`` for ``A != empty``, ``m(empty) = 0``,
    with the conflict ``kappa`` the unnormalised mass of the empty set. Computed through commonalities
    (``q = prod_s q_s``), exact for any M.

    Args:
        masses: (M, ..., 2^K, ...): the M sources on axis 0, the subsets on ``dim``.
        dim: the subset axis (of ``masses``; the result has one axis less, so it sits at ``dim - 1``).
        check: raise :class:`TotalConflictError` where ``kappa = 1`` (a host synchronisation); without it
            such pixels are NaN-free but meaningless (the denominator is clamped).

    Returns:
        The combined mass function (..., 2^K, ...).

    Raises:
        TotalConflictError: total conflict at some pixel (with ``check``).
    """
    if masses.dim() < 2 or dim == 0:
        raise ConfigError(
            "masses must be (M, ..., 2^K, ...) with the sources on axis 0 and subsets elsewhere"
        )
    k = _num_classes(masses.shape[dim])
    z = _subset_matrix(k, masses.device, masses.dtype)
    commonality = masses.movedim(dim, -1) @ z  # q(A) = sum_{B ⊇ A} m(B)
    joint = commonality.prod(0) @ _moebius_inverse(k, masses.device, masses.dtype)
    conflict = joint[..., :1]
    norm = 1.0 - conflict
    if check and bool((norm <= 1e-12).any()):
        raise TotalConflictError(
            "Dempster's rule: total conflict (the sources' focal sets do not intersect, kappa = 1); "
            "the combination is undefined"
        )
    combined = torch.cat([torch.zeros_like(conflict), joint[..., 1:]], -1) / norm.clamp_min(1e-12)
    return combined.movedim(-1, dim - 1)


def dempster_opinions(
    belief: Tensor, uncertainty: Tensor, dim: int = 2, check: bool = True
) -> dict[str, Tensor]:
    """Dempster's rule for M opinions (masses on the singletons and Omega only), in closed form.

    The conjunctive combination of such mass functions keeps the form: with ``q_s(omega_k) = b_sk + u_s``
    and ``q_s(Omega) = u_s``, ``m(Omega) = prod_s u_s`` and
    ``m({omega_k}) = prod_s (b_sk + u_s) - prod_s u_s``;
    the conflict is ``1 - sum_k m({omega_k}) - m(Omega)`` and is normalised away (for M = 2 this is Han
    et al.'s reduced rule ``b = (b1 b2 + b1 u2 + b2 u1) / (1 - C)``, ``u = u1 u2 / (1 - C)``).

    Args:
        belief: (M, ..., K, ...) with the sources on axis 0 and the classes on ``dim``.
        uncertainty: (M, ..., 1, ...).
        dim: the class axis of ``belief``.
        check: raise :class:`TotalConflictError` where the conflict is total.

    Returns:
        ``belief`` (..., K, ...), ``uncertainty`` (..., 1, ...), ``conflict`` (..., 1, ...) (before
        normalisation).
    """
    u = uncertainty.prod(0)
    singles = (belief + uncertainty).prod(0) - u
    total = singles.sum(dim - 1, keepdim=True) + u
    if check and bool((total <= 1e-12).any()):
        raise TotalConflictError(
            "Dempster's rule: total conflict (every pair of sources is certain of different classes); "
            "the combination is undefined"
        )
    total = total.clamp_min(1e-12)
    return {"belief": singles / total, "uncertainty": u / total, "conflict": 1.0 - total}


def contextual_discount(mass: Tensor, reliability: Tensor, dim: int = 1) -> Tensor:
    """Contextual discounting (Mercier et al. 2008; Huang et al., MICCAI 2022) of a mass function.

    ``beta m = m ∪ m_1 ∪ ... ∪ m_K`` with ``m_k(empty) = beta_k``, ``m_k({omega_k}) = 1 - beta_k``. In
    implicabilities ``b(A) = sum_{B ⊆ A} m(B)`` the disjunctive rule multiplies, and
    ``b_k(A) = beta_k + (1 - beta_k) [omega_k in A]``, so ``beta b(A) = b(A) prod_{k not in A} beta_k``.
    ``beta = 1`` leaves ``m`` unchanged; ``beta = 0`` gives the vacuous mass function ``m(Omega) = 1``.

    Args:
        mass: (..., 2^K, ...) with the subsets on ``dim``.
        reliability: ``beta`` in [0, 1], (K,) or (..., K) with the classes LAST, broadcastable against
            the mass's other axes in their order once the subset axis is moved last (e.g. (M, 1, 1, 1, K)
            for (M, B, 2^K, H, W) masses with ``dim=2``).
        dim: the subset axis.

    Returns:
        The discounted mass function, same shape.
    """
    k = _num_classes(mass.shape[dim])
    beta = reliability.to(mass.dtype)
    if beta.shape[-1] != k:
        raise ConfigError(f"reliability has {beta.shape[-1]} classes on its last axis for a frame of {k}")
    m = mass.movedim(dim, -1)
    idx = torch.arange(2**k, device=mass.device)
    outside = ((idx[:, None] >> torch.arange(k, device=mass.device)[None, :]) & 1) == 0  # (2^K, K)
    # prod_{k not in A} beta_k for every subset A: (..., 2^K)
    factor = torch.where(outside, beta.unsqueeze(-2), torch.ones_like(beta.unsqueeze(-2))).prod(-1)
    implicability = m @ _subset_matrix(k, mass.device, mass.dtype).T  # b(A) = sum_{B ⊆ A} m(B)
    discounted = (implicability * factor) @ _moebius_inverse(k, mass.device, mass.dtype).T
    return discounted.movedim(-1, dim)


def discounted_plausibility(
    belief: Tensor, uncertainty: Tensor, reliability: Tensor, dim: int = 2, check: bool = False
) -> Tensor:
    """The fused, normalised plausibility of M contextually discounted opinions (Huang et al. 2022).

    ``pl_s(omega_k) = b_sk + u_s``; discounted ``pl'_s = 1 - beta_sk + beta_sk pl_s``; Dempster's rule
    multiplies contour functions, so the output is ``prod_s pl'_s(omega_k) / sum_l prod_s pl'_s(omega_l)``.
    Equal to the normalised contour function of :func:`dempster` applied to :func:`contextual_discount`
    of :func:`opinion_to_mass` (``tests/test_ei_ddpm.py`` checks it), at the cost of K products.

    Args:
        belief: (M, ..., K, ...) with the sources on axis 0 and the classes on ``dim``.
        uncertainty: (M, ..., 1, ...).
        reliability: ``beta`` broadcastable to ``belief`` (e.g. (M, 1, K, 1, 1)), in [0, 1].
        dim: the class axis of ``belief``.
        check: raise :class:`TotalConflictError` where the normaliser is zero. With ``u > 0`` (finite
            evidence) it never is.

    Returns:
        (..., K, ...) fused class probabilities (summing to one over the class axis ``dim - 1``).
    """
    pl = 1.0 - reliability + reliability * (belief + uncertainty)
    joint = pl.prod(0)
    total = joint.sum(dim - 1, keepdim=True)
    if check and bool((total <= 1e-12).any()):
        raise TotalConflictError("Dempster's rule: total conflict between the discounted sources")
    return joint / total.clamp_min(1e-12)
