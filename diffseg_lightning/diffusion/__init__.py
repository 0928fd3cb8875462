"""Noise kernels and schedules (no networks, no Lightning, no Hydra).

Every kernel follows the noise-kernel contract of ``DESIGN.md``: ``num_train_timesteps``,
``q_sample``, ``loss``, ``inference_timesteps`` and ``step``.
"""

from __future__ import annotations

from diffseg_lightning.diffusion.base import NoiseKernel
from diffseg_lightning.diffusion.bernoulli import BernoulliKernel
from diffseg_lightning.diffusion.gaussian import GaussianKernel
from diffseg_lightning.diffusion.schedules import make_beta_schedule

__all__ = ["BernoulliKernel", "GaussianKernel", "NoiseKernel", "make_beta_schedule"]
