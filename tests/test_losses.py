"""The project's losses (diffseg_lightning/losses.py) against their formulas written out, and the MONAI
classes they wrap or match."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, FocalLoss, PatchAdversarialLoss

from diffseg_lightning.exceptions import ConfigError
from diffseg_lightning.losses import (
    lsgan_loss,
    sigmoid_focal_loss,
    smoothed_dice_loss,
    soft_dice_loss,
    squared_dice_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def _data(dtype: torch.dtype = F64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 6, 7, generator=g, dtype=dtype) * 3
    target = (torch.rand(5, 6, 7, generator=g) > 0.6).to(dtype)
    return logits, logits.sigmoid(), target


def test_squared_dice_loss_is_condinst_formula():
    _, p, g = _data()
    p, g = p.flatten(1), g.flatten(1)
    by_formula = 1 - 2 * (p * g).sum(1) / ((p * p).sum(1) + (g * g).sum(1) + 1e-5)
    # float64, one reduction of 42 terms: agreement to a few ulps
    torch.testing.assert_close(squared_dice_loss(p, g), by_formula, rtol=1e-12, atol=1e-14)
    # by hand: p = (1, 0.5), g = (1, 1): 1 - 2 * 1.5 / (1.25 + 2) = 1 - 12/13
    hand = squared_dice_loss(
        torch.tensor([[1.0, 0.5]], dtype=F64), torch.tensor([[1.0, 1.0]], dtype=F64), eps=0.0
    )
    assert float(hand) == pytest.approx(1 / 13, rel=1e-12)


def test_smoothed_dice_loss_is_mask2former_formula():
    logits, s, t = _data()
    logits, s, t = logits.flatten(1), s.flatten(1), t.flatten(1)
    by_formula = 1 - (2 * (s * t).sum(-1) + 1) / (s.sum(-1) + t.sum(-1) + 1)
    torch.testing.assert_close(smoothed_dice_loss(logits, t), by_formula, rtol=1e-12, atol=1e-14)
    # an empty mask predicted empty (logits -> -inf) has loss 1 - 1/1 = 0 thanks to the +1s
    assert (
        float(smoothed_dice_loss(torch.full((1, 4), -50.0, dtype=F64), torch.zeros(1, 4, dtype=F64))) < 1e-12
    )


def test_soft_dice_loss_is_the_discounted_dice_formula():
    _, p, g = _data()
    p, g = p[None], g[None]  # (B=1, K=5, 6, 7)
    inter = (p * g).sum((2, 3))
    by_formula = (1 - 2 * inter / (p.sum((2, 3)) + g.sum((2, 3)) + 1e-6)).mean()
    torch.testing.assert_close(soft_dice_loss(p, g), by_formula, rtol=1e-12, atol=1e-14)
    assert float(soft_dice_loss(p, g)) == pytest.approx(float(DiceLoss(smooth_nr=0.0, smooth_dr=1e-6)(p, g)))


def test_the_three_dice_losses_differ():
    """Squared vs linear denominator and the +1 smoothing give different numbers on the same masks, so they
    are three functions, not one."""
    logits, p, g = _data()
    p2, g2, l2 = p.flatten(1), g.flatten(1), logits.flatten(1)
    squared = squared_dice_loss(p2, g2)
    smoothed = smoothed_dice_loss(l2, g2)
    soft = torch.stack([soft_dice_loss(p2[i][None, None], g2[i][None, None]) for i in range(5)])
    assert (squared - soft).abs().min() > 1e-3 and (smoothed - soft).abs().min() > 1e-4


def test_sigmoid_focal_loss_is_lin_et_al_eq5():
    logits, p, y = _data()
    ce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    p_t = p * y + (1 - p) * (1 - y)
    by_formula = (0.25 * y + 0.75 * (1 - y)) * ce * (1 - p_t) ** 2
    # float64: MONAI's log-space (1 - p_t)^gamma agrees with the direct power to ~1e-15
    torch.testing.assert_close(sigmoid_focal_loss(logits, y), by_formula, rtol=1e-10, atol=1e-14)
    out32 = sigmoid_focal_loss(logits.float(), y.float(), alpha=0.4, gamma=1.5)
    assert out32.dtype == torch.float32
    expected = FocalLoss(gamma=1.5, alpha=0.4, use_softmax=False, reduction="none")(logits.float(), y.float())
    torch.testing.assert_close(out32, expected)  # MONAI's class on float32 logits: the same numbers
    assert sigmoid_focal_loss(logits.bfloat16(), y.bfloat16()).dtype == torch.float32  # cast up, not bf16
    with pytest.raises(ConfigError, match="differ"):
        sigmoid_focal_loss(logits, y[:1])


def test_lsgan_loss_matches_monai_least_squares():
    d = torch.randn(2, 1, 5, 5, generator=torch.Generator().manual_seed(1))
    monai = PatchAdversarialLoss(criterion="least_squares", no_activation_leastsq=True)
    assert float(lsgan_loss(d, True)) == pytest.approx(
        float(monai(d, target_is_real=True, for_discriminator=True))
    )
    assert float(lsgan_loss(d, False)) == pytest.approx(
        float(monai(d, target_is_real=False, for_discriminator=True))
    )


def test_dice_losses_name_a_shape_mismatch():
    with pytest.raises(ConfigError, match="squared_dice_loss"):
        squared_dice_loss(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ConfigError, match="smoothed_dice_loss"):
        smoothed_dice_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ConfigError, match="soft_dice_loss"):
        soft_dice_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 3, 3))
