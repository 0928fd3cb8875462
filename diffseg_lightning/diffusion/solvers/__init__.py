"""Solvers: one reverse update a file (DDIM, ancestral DDPM, DPM-Solver++(2M), the Bernoulli posterior step).

A solver owns every sampling choice (``eta``, ``clip_x0``, a multistep memory); the noise kernel owns the noise
process. ``sampler=ddim|ddpm|dpmpp_2m|bernoulli`` (``conf/sampler``) chooses one; ``sampler=default`` the kernel's
:meth:`~diffseg_lightning.diffusion.base.NoiseKernel.default_solver`.
"""

from __future__ import annotations

from diffseg_lightning.diffusion.solvers.base import GaussianSolver, Solver
from diffseg_lightning.diffusion.solvers.bernoulli import BernoulliPosterior
from diffseg_lightning.diffusion.solvers.ddim import DDIM
from diffseg_lightning.diffusion.solvers.ddpm import DDPM
from diffseg_lightning.diffusion.solvers.dpmpp_2m import DPMSolverPP2M

#: The solvers by their ``name`` (``summary.json``'s ``sampler.update``).
SOLVERS: dict[str, type[Solver]] = {s.name: s for s in (DDIM, DDPM, DPMSolverPP2M, BernoulliPosterior)}

__all__ = ["DDIM", "DDPM", "SOLVERS", "BernoulliPosterior", "DPMSolverPP2M", "GaussianSolver", "Solver"]
