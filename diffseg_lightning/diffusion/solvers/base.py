"""The solver contract: one reverse update of a noise kernel's chain, from the noise level of ``t`` to that of
``t_prev``. A solver owns every sampling choice (``eta``, ``clip_x0``, a multistep memory); the kernel owns the
noise process (``diffusion/base.py``). See ``docs/architecture.md``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor

from diffseg_lightning.diffusion.base import NoiseKernel
from diffseg_lightning.diffusion.gaussian import GaussianKernel
from diffseg_lightning.exceptions import ConfigError


class Solver(ABC):
    """A reverse update for one kind of noise kernel.

    Subclasses set ``name`` (what ``summary.json`` reports as ``sampler.update``), ``config_group`` (the
    ``sampler=`` that selects them) and ``kernel_type`` (the kernel class they fit), implement
    :attr:`is_deterministic` and :meth:`step`, and report their constructor's arguments in :meth:`options`. A
    solver keeps no state between calls: a multistep update keeps its memory in the per-chain ``state`` dict that
    :func:`~diffseg_lightning.diffusion.reverse.reverse` creates empty for each chain and passes to every step.

    Adding a solver: a file in ``diffusion/solvers/`` with the class (the paper's update, with its equation
    numbers), an export in ``diffusion/solvers/__init__.py`` (and ``SOLVERS``), and ``conf/sampler/<group>.yaml``
    (``defaults: [default]`` and ``solver: {_target_: ..., options}``).
    """

    name: ClassVar[str]
    #: the ``sampler=<group>`` config (``conf/sampler/<group>.yaml``) that selects this solver
    config_group: ClassVar[str]
    kernel_type: ClassVar[type[NoiseKernel]]

    @property
    @abstractmethod
    def is_deterministic(self) -> bool:
        """True when :meth:`step` draws no random numbers (the chain is a function of its prior draw)."""

    def check_kernel(self, kernel: NoiseKernel) -> None:
        """Raise a one-line :class:`ConfigError` naming both and the fix when this solver cannot sample ``kernel``'s
        chain (e.g. ``noise=bernoulli sampler=ddim``)."""
        if not isinstance(kernel, self.kernel_type):
            raise ConfigError(
                f"sampler={self.config_group} (the {type(self).__name__} solver) samples a "
                f"{self.kernel_type.__name__}, but the noise kernel is a {type(kernel).__name__}; choose a solver "
                f"of it, e.g. sampler={kernel.default_solver_group}, or sampler=default (the kernel's default solver)"
            )

    def timesteps(self, kernel: NoiseKernel, num_steps: int) -> Tensor:
        """The strided steps this solver walks ``kernel``'s chain on: ``kernel.inference_timesteps(num_steps)``
        (``t_K = T - 1 > ... > t_1``, LongTensor ``(num_steps,)``), after :meth:`check_kernel`."""
        self.check_kernel(kernel)
        return kernel.inference_timesteps(num_steps)

    def options(self) -> dict[str, Any]:
        """The solver's own options (its constructor's arguments, e.g. ``eta`` and ``clip_x0``); ``{}`` by default."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"

    def settings(self) -> dict[str, Any]:
        """The solver's settings: ``update`` (the name), ``deterministic`` and its :meth:`options`."""
        return {"update": self.name, "deterministic": self.is_deterministic, **self.options()}

    @abstractmethod
    def step(
        self,
        kernel: NoiseKernel,
        model_output: Tensor,
        t: Tensor | int,
        t_prev: Tensor | int,
        x_t: Tensor,
        generator: torch.Generator | None = None,
        state: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One reverse step ``x_t -> x_{t_prev}``.

        Args:
            kernel: the noise process (an instance of ``kernel_type``).
            model_output: the denoiser's output for ``(x_t, t)``, float32, ``(B, C_out, ...)``.
            t: LongTensor ``(B,)``, the current timesteps (an int or a 0-dim tensor is broadcast:
                :meth:`~diffseg_lightning.diffusion.base.NoiseKernel.batch_timesteps`).
            t_prev: likewise, ``-1 <= t_prev < t``; ``-1`` is the final step (the clean mask).
            x_t: the current sample ``(B, C, ...)``, float32.
            generator: random generator for the step's draws (on ``x_t``'s device).
            state: the chain's memory for multistep solvers, updated in place; ``None``: first-order steps.

        Returns:
            ``(x_prev, x0_pred)``, each of the shape of ``x_t``.
        """


class GaussianSolver(Solver):
    """A solver of the :class:`~diffseg_lightning.diffusion.gaussian.GaussianKernel`, with the option every
    Gaussian update shares.

    Args:
        clip_x0: clamp the predicted ``x0`` to ``[-1, 1]`` (and re-derive ``eps`` from it).
    """

    kernel_type = GaussianKernel

    def __init__(self, clip_x0: bool = True) -> None:
        self.clip_x0: bool = bool(clip_x0)

    def options(self) -> dict[str, Any]:
        return {"clip_x0": self.clip_x0}
