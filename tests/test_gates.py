"""Gates for issue 20 (the denoiser zoo learns): slow, short synthetic trainings that pin the measured wins.

Each gate compares a setting against its named baseline at the same budget and seed, and must hold for any
seed: the seed comes from the environment variable ``DIFFSEG_SEED`` (default 0) through ``zoo_seed``, and
each gate was checked for seeds 0, 1 and 2 (margins in its docstring). Run by ``make test-full``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import compose_config

pytestmark = pytest.mark.slow


@pytest.fixture
def zoo_seed() -> int:
    """The gate's seed: ``DIFFSEG_SEED`` from the environment, 0 when unset."""
    return int(os.environ.get("DIFFSEG_SEED", "0"))


# ------------------------------------------------------------------ the kernels' default objectives (item 1)
# One short synthetic training per arm: 32 px, batch 8, 200 AdamW steps at 2e-3 with 20 warm-up steps and
# cosine decay (pinned here, so the gates do not move with the models' optimiser defaults), EMA; one
# validation at the end on the 32 validation cases with the default sampler (S = 5 fused by the mean,
# 25 steps). The two arms of a gate differ only in the kernel option under test.
#: One epoch on the CPU, one validation at its end, no test, no logger or panels: what every gate's run shares.
ONE_EPOCH_NO_TEST = [
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "trainer.enable_model_summary=false",
    "logger=none",
    "~callbacks.lr_monitor",
    "~callbacks.progress_bar",
    "~callbacks.panels",
    "test=false",
]

KERNEL_GATE = [
    "data=synthetic",
    "data.size=32",
    "data.batch_size=8",
    "data.eval_batch_size=16",
    "data.num_train=1600",  # 200 steps of batch 8, one epoch, one validation
    "data.num_val=32",
    "data.num_test=8",
    *ONE_EPOCH_NO_TEST,
    "model.optimizer.lr=2e-3",
    "+model.scheduler._target_=diffseg_lightning.methods.warmup_cosine",
    "+model.scheduler._partial_=true",
    "+model.scheduler.warmup_steps=20",
]
# x0 over eps, measured at seeds 0 / 1 / 2 (val Dice 0.388 / 0.468 / 0.444 against 0.120 / 0.288 / 0.209): gaps
# 0.27 / 0.18 / 0.24; the gate asks for half the smallest one.
BERNOULLI_MARGIN = 0.09
# x0 over epsilon (MedSegDiff, head off), measured at seeds 0 / 1 / 2: gaps 0.041 / 0.267 / 0.197; half the smallest.
GAUSSIAN_MARGIN = 0.02
TINY_MEDSEGDIFF = [
    "model=medsegdiff",
    "model.denoiser.base_channels=16",
    "model.denoiser.channel_mults=[1,2,4]",
    "model.denoiser.attention_levels=[false,false,false]",
    "model.aux_seg.weight=0",  # the auxiliary head off (MedSegDiff's default): the diffusion alone
    "model.aux_seg.blend=0",
]
TINY_BERDIFF = [
    "model=berdiff",
    "model.denoiser.channels=[16,32,64]",
    "model.denoiser.attention_levels=[false,false,true]",
    "model.denoiser.num_head_channels=16",
]


def kernel_gate_dice(overrides: list[str], seed: int, out: Path) -> float:
    """Validation Dice (fused S = 5) after the short training of ``KERNEL_GATE`` with ``overrides``."""
    from diffseg_lightning.train import train

    metrics = train(compose_config("train", [*KERNEL_GATE, *overrides, f"seed={seed}"], out))
    dice = metrics["val/dice"]
    assert dice > 0.0, f"val Dice is exactly 0 for {overrides}: a bug until shown otherwise"
    return dice


def test_zoo_gaussian_x0_beats_epsilon(zoo_seed, tmp_path):
    """MedSegDiff (tiny, auxiliary head off: the diffusion alone) with the Gaussian kernel's default objective,
    x0, beats epsilon at the same budget and seed.

    Measured (val Dice, x0 / epsilon): seed 0 0.320 / 0.279, seed 1 0.567 / 0.300, seed 2 0.464 / 0.267.
    With the auxiliary head on (MedSegDiff's default, blend 0.8) the head carries the prediction and the two
    objectives tie (seed 0: 0.492 / 0.525), so the gate switches it off.
    """
    default = compose_config("train", [*KERNEL_GATE, *TINY_MEDSEGDIFF], tmp_path / "compose").noise
    assert default.objective == "x0"
    x0 = kernel_gate_dice(TINY_MEDSEGDIFF, zoo_seed, tmp_path / "x0")
    epsilon = kernel_gate_dice([*TINY_MEDSEGDIFF, "noise.objective=epsilon"], zoo_seed, tmp_path / "eps")
    print(f"gaussian gate, seed {zoo_seed}: val Dice x0 {x0:.3f}, epsilon {epsilon:.3f}")
    assert x0 > epsilon + GAUSSIAN_MARGIN, (x0, epsilon)


def test_zoo_bernoulli_default_beats_eps(zoo_seed, tmp_path):
    """BerDiff's U-Net (tiny) with the Bernoulli kernel's default (objective x0, linear schedule) beats the
    paper's objective eps (KL + BCE on the predicted noise) at the same budget.

    Measured (val Dice, default / eps): seed 0 0.388 / 0.120, seed 1 0.468 / 0.288, seed 2 0.444 / 0.209.
    """
    default = compose_config("train", [*KERNEL_GATE, *TINY_BERDIFF, "noise=bernoulli"], tmp_path / "c").noise
    assert (default.objective, default.schedule) == ("x0", "linear")
    chosen = kernel_gate_dice([*TINY_BERDIFF, "noise=bernoulli"], zoo_seed, tmp_path / "default")
    eps = kernel_gate_dice(
        [*TINY_BERDIFF, "noise=bernoulli", "noise.objective=eps"], zoo_seed, tmp_path / "eps"
    )
    print(f"bernoulli gate, seed {zoo_seed}: val Dice default {chosen:.3f}, eps {eps:.3f}")
    assert chosen > eps + BERNOULLI_MARGIN, (chosen, eps)


# ------------------------------------------------------------------ the auxiliary segmentation head (item 2)
AUX_MARGIN = 0.015  # on - off measured +0.213 / +0.045 / +0.132 (seeds 0 / 1 / 2): a third of the smallest


def test_zoo_aux_head_on_beats_off(zoo_seed, tmp_path):
    """MedSegDiff (tiny) with its auxiliary segmentation head (``model.aux_seg``: Dice + BCE at weight
    1, blend 0.8, the measured best) beats the same model with the head off (weight 0, blend 0), same budget and seed
    (``KERNEL_GATE``: 32 px, 200 steps).

    Measured (val Dice, on / off): seed 0 0.533 / 0.320, seed 1 0.612 / 0.567, seed 2 0.596 / 0.464 (margins
    +0.213, +0.045, +0.132). ``AUX_MARGIN`` is a third of the smallest margin: the validation Dice of 32 cases
    moves by a few hundredths between seeds of one arm.
    """
    on = [
        *TINY_MEDSEGDIFF[:-2],
        "model.aux_seg.weight=1",
        "model.aux_seg.blend=0.8",
    ]  # loss: dice_bce (config)
    assert compose_config("train", [*KERNEL_GATE, *on], tmp_path / "c").model.aux_seg.weight > 0
    dice_on = kernel_gate_dice(on, zoo_seed, tmp_path / "on")
    dice_off = kernel_gate_dice(TINY_MEDSEGDIFF, zoo_seed, tmp_path / "off")
    print(f"aux head gate, seed {zoo_seed}: val Dice on {dice_on:.3f}, off {dice_off:.3f}")
    assert dice_on > dice_off + AUX_MARGIN, (dice_on, dice_off)


# ------------------------------------------------------------------ DTUNet localises (item 3)
# DTUNet (tiny widths: embed 16, two levels, patch 4, windows 4 and 8, the default two image-encoder blocks) on
# the synthetic data at 64 px: batch 8, 600 AdamW steps at 2e-3 with 20 warm-up steps and cosine decay, EMA; one
# validation at the end on 16 cases, S = 5 fused by the mean, 10 DDIM steps (x0 objective).
DTUNET_GATE = [
    "model=dtunet",
    "data=synthetic",
    "noise=gaussian",
    "noise.objective=x0",
    "data.size=64",
    "data.batch_size=8",
    "data.eval_batch_size=16",
    "data.num_train=4800",  # 600 steps of batch 8, one epoch, one validation
    "data.num_val=16",
    "data.num_test=8",
    *ONE_EPOCH_NO_TEST,
    "sampler.num_steps=10",
    "model.denoiser.embed_dim=16",
    "model.denoiser.channel_mults=[1,2]",
    "model.denoiser.depths=[1,1]",
    "model.denoiser.head_channels=8",
    "model.optimizer.lr=2e-3",
    "model.scheduler={_target_: diffseg_lightning.methods.warmup_cosine, _partial_: true, warmup_steps: 20}",
]
DTUNET_DICE = 0.6  # the bar; the default measured 0.686-0.723 (seeds 0-2), the smallest margin 0.086
# Default - previous network (cross-attention alone, positions before the projections): measured >= 0.68; the
# previous network predicts (near) empty masks at this budget (0.009; 0.000 and 0.005 at 400 / 150 steps).
DTUNET_MARGIN = 0.2


def test_zoo_dtunet_localises(zoo_seed, tmp_path):
    """DTUNet with its default fusion (the aligned image path, positions after the projections) reaches
    validation Dice > 0.6 at 64 px in 150 steps, and the previous network (``fusion=cross_attention``,
    ``positions=input``: the cross-attention as the only path, the paper's literal reading) stays well below
    at the same budget and seed.

    Measured (val Dice, default / previous): seed 0 0.690 / -, seed 1 0.723 / 0.009, seed 2 0.686 / -
    (previous, seed 0: 0.000 at 400 steps with one image-encoder block, 0.005 at 150). One arm is about 70 CPU
    seconds on one thread (2026-12-08, the 2-core machine shared with other runs).
    """
    from diffseg_lightning.train import train

    default = compose_config("train", DTUNET_GATE, tmp_path / "c").model.denoiser
    assert (default.fusion, default.positions) == ("aligned", "projected")
    dice = {}
    for arm, extra in {
        "default": [],
        "previous": ["model.denoiser.fusion=cross_attention", "model.denoiser.positions=input"],
    }.items():
        cfg = compose_config("train", [*DTUNET_GATE, *extra, f"seed={zoo_seed}"], tmp_path / arm)
        dice[arm] = train(cfg)["val/dice"]
    print(
        f"dtunet gate, seed {zoo_seed}: val Dice default {dice['default']:.3f}, previous {dice['previous']:.3f}"
    )
    assert dice["default"] > DTUNET_DICE, dice
    assert dice["default"] > dice["previous"] + DTUNET_MARGIN, dice
