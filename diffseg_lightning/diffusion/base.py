"""What every noise kernel shares: the timestep bookkeeping of the kernel contract (``DESIGN.md``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffseg_lightning.diffusion.schedules import SCHEDULES
from diffseg_lightning.exceptions import ConfigError


class NoiseKernel(nn.Module):
    """Base of the noise kernels: validated ``num_train_timesteps`` and schedule, the strided inference
    grid, uniform training timesteps, and per-sample timestep helpers.

    An ``nn.Module`` only so that a subclass's (non-persistent) schedule buffers follow ``.to(device)``;
    it has no parameters. Subclasses register ``alphas_cumprod`` (T,) and implement ``q_sample``,
    ``loss``, ``step``, ``sample_prior``, ``encode_mask`` and ``decode_mask``.

    Args:
        num_train_timesteps: T.
        schedule: a name in ``SCHEDULES``.
    """

    alphas_cumprod: Tensor

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

    @property
    def update_rule(self) -> str:
        """The name of the reverse update ``step`` uses, reported in ``summary.json`` (``sampler.update``)."""
        return "posterior"

    def _batch_t(self, t: Tensor | int, batch: int, name: str = "t") -> Tensor:
        """Timesteps as a LongTensor ``(B,)`` on the buffers' device (a 0-dim or int is broadcast)."""
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
