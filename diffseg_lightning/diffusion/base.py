"""The two contracts of the diffusion layer: the noise kernel (a noise process) and the denoiser.

A noise kernel is the noise process only: the forward marginal ``q(x_t | x_0)``, the training loss, the
prediction of ``x_0`` from a network output, and the posterior ``q(x_{t_prev} | x_t, x_0)`` between any two
kept steps. How a chain is walked backwards is a solver's job (``diffusion/solvers``); the loop that walks it
is ``diffusion/reverse.py``. See ``docs/architecture.md``.

Conventions: timesteps are LongTensors ``(B,)`` with values in ``[0, T)``; ``t_prev = -1`` is the clean
mask (``abar = 1``). Masks are float tensors ``(B, C, H, W)`` (any trailing spatial dims) in kernel space,
float32 unless said otherwise. Kernels have no parameters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from diffseg_lightning.diffusion.schedules import SCHEDULES
from diffseg_lightning.exceptions import ConfigError

if TYPE_CHECKING:
    from diffseg_lightning.diffusion.solvers.base import Solver


@runtime_checkable
class Denoiser(Protocol):
    """The denoiser contract: every mask-diffusion network (``nets/``) implements these two methods.

    ``encode_condition`` runs once per image batch; its result is reused at every step and, repeated
    (``inference.sampler.repeat_condition``), for every sample, so image features are not recomputed.
    """

    def encode_condition(self, image: Tensor) -> Any:
        """The image's condition: a tensor, or a tuple / list / dict of batch-first tensors, from
        ``image`` ``(B, C_img, H, W)``."""
        ...

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        """The output for noisy masks ``x_t`` ``(B, C, H, W)`` at timesteps ``t`` (LongTensor ``(B,)``) given
        ``cond``: ``(B, kernel.model_output_channels(C), H, W)``."""
        ...


class NoiseKernel(nn.Module, ABC):
    """Base of the noise kernels: validated ``num_train_timesteps`` and schedule, the strided inference
    grid, uniform training timesteps, per-sample timestep helpers, and the abstract noise process.

    An ``nn.Module`` only so that a subclass's (non-persistent) float32 schedule buffers follow
    ``.to(device)``; it has no parameters. Subclasses register ``alphas_cumprod`` (T,), implement the
    abstract methods below, and name their default solver (``default_solver``, and the ``sampler=`` config
    group that selects it, ``default_solver_group``).

    Args:
        num_train_timesteps: T.
        schedule: a name in ``SCHEDULES``.
    """

    alphas_cumprod: Tensor
    #: The ``sampler=<group>`` that selects this kernel's default solver (named in error messages).
    default_solver_group: ClassVar[str]

    def __init__(self, num_train_timesteps: int, schedule: str) -> None:
        super().__init__()
        if schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {schedule!r}; valid values are {list(SCHEDULES)}")
        if (
            isinstance(num_train_timesteps, bool)
            or not isinstance(num_train_timesteps, int)
            or num_train_timesteps < 1
        ):
            raise ConfigError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
        self.num_train_timesteps: int = num_train_timesteps
        self.schedule: str = schedule

    # ------------------------------------------------------------------ the noise process (abstract)
    @abstractmethod
    def model_output_channels(self, mask_channels: int) -> int:
        """Channels the denoiser must output for ``mask_channels`` mask channels."""

    @abstractmethod
    def encode_mask(self, mask01: Tensor) -> Tensor:
        """Map a ``{0, 1}`` mask ``(B, C, H, W)`` to kernel space ``x0`` (float)."""

    @abstractmethod
    def decode_mask(self, x: Tensor) -> Tensor:
        """Map kernel space ``(B, C, H, W)`` to a foreground probability in ``[0, 1]``."""

    @abstractmethod
    def sample_prior(
        self,
        shape: tuple[int, ...] | torch.Size,
        device: torch.device | str | None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Draw ``x_T`` of ``shape`` from the prior (the chain's start)."""

    @abstractmethod
    def q_sample(
        self,
        x0: Tensor,
        t: Tensor | int,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw ``x_t ~ q(x_t | x_0)`` for ``x0`` ``(B, C, H, W)`` and ``t`` (B,); ``noise`` fixes the draw."""

    @abstractmethod
    def loss(self, model_output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> dict[str, Tensor]:
        """Training loss terms, 0-dim tensors; ``"loss"`` is what to minimise."""

    @abstractmethod
    def predict_x0(self, model_output: Tensor, x_t: Tensor, t: Tensor | int) -> Tensor:
        """The ``x_0`` the network output implies at ``(x_t, t)``, in kernel space, shape of ``x_t``."""

    @abstractmethod
    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor | int, t_prev: Tensor | int) -> Any:
        """The posterior ``q(x_{t_prev} | x_t, x_0)`` for any ``-1 <= t_prev < t`` (its parameters)."""

    @abstractmethod
    def default_solver(self) -> Solver:
        """The solver ``sampler=default`` uses for this kernel."""

    def batch_timesteps(self, t: Tensor | int, batch: int, name: str = "t") -> Tensor:
        """Timesteps as a LongTensor ``(batch,)`` on the buffers' device (an int or a 0-dim tensor is broadcast).

        Raises:
            ConfigError: ``t`` is neither 0-dim nor of shape ``(batch,)`` (``name`` names it).
        """
        t = torch.as_tensor(t, dtype=torch.long, device=self.alphas_cumprod.device)
        if t.ndim == 0:
            return t.expand(batch)
        if t.shape != (batch,):
            raise ConfigError(
                f"{name} must be an int, a 0-dim tensor or a LongTensor of shape ({batch},), got shape {tuple(t.shape)}"
            )
        return t

    @staticmethod
    def _bcast(values: Tensor, ndim: int) -> Tensor:
        """Reshape per-sample values ``(B,)`` to ``(B, 1, ..., 1)`` with ``ndim`` dims."""
        return values.reshape(values.shape[0], *([1] * (ndim - 1)))

    def _gather(self, buf: Tensor, t: Tensor, ndim: int) -> Tensor:
        """Per-sample schedule values ``buf[t]`` shaped ``(B, 1, ..., 1)`` for broadcasting."""
        return self._bcast(buf.index_select(0, t), ndim)

    def sample_timesteps(
        self, batch_size: int, device: torch.device | str | None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Draw training timesteps uniformly from ``[0, T)``: LongTensor ``(batch_size,)`` (Ho et al. 2020, Alg. 1)."""
        return torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator, device=device)

    def inference_timesteps(self, num_steps: int, device: torch.device | str | None = None) -> Tensor:
        """The strided sequence ``t_K > ... > t_1`` for sampling with ``num_steps`` steps.

        "Trailing" spacing (Lin et al. 2024, "Common diffusion noise schedules and sample steps
        are flawed", Table 2): ``t_i = round(T (N - i) / N) - 1`` for ``i = 0 .. N-1``, computed in
        integers. The first step is always ``T - 1`` (sampling starts at the noise level the
        network was trained for at pure noise), the values are distinct and strictly
        decreasing, and ``N = T`` gives ``T-1, ..., 0``. The step after the last is ``-1``.

        Args:
            num_steps: ``N`` in ``[1, T]``.
            device: device of the result (CPU by default).

        Returns:
            LongTensor ``(N,)``.

        Raises:
            ValueError: ``num_steps`` outside ``[1, T]``.
        """
        T = self.num_train_timesteps
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= T:
            raise ConfigError(
                f"num_steps must be an int in [1, {T}] (num_train_timesteps), got {num_steps!r}"
            )
        i = torch.arange(num_steps, dtype=torch.long, device=device)
        # round(T (N - i) / N) with halves rounded up, exactly in integers
        return (2 * T * (num_steps - i) + num_steps) // (2 * num_steps) - 1
