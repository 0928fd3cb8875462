"""M denoisers with separate weights run as one batched computation (EI-DDPM's parallel paths).

Zhao and Li, "Learning Reliability of Multi-modality Medical Images for Tumor Segmentation via
Evidence-Identified Denoising Diffusion Probabilistic Models", MICCAI 2023: one DDPM path per MRI
modality, each conditioned on its own modality only, sharing nothing but the noise schedule.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap
from torch.nn.utils.stateless import _reparametrize_module

from diffseg_lightning.exceptions import ConfigError

__all__ = ["ParallelDenoisers"]


class _ContiguousGroupNorm(nn.GroupNorm):
    """GroupNorm on a contiguous input: inside ``vmap``, ``group_norm`` queries ``is_contiguous`` with a
    non-default memory format on non-contiguous inputs (e.g. the sum of two features), which torch 2.x's
    vmap does not support ("NYI: querying is_contiguous inside of vmap"). Same parameters, same numbers."""

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)


def _contiguous_group_norms(module: nn.Module) -> None:
    for name, child in module.named_children():
        if type(child) is nn.GroupNorm:
            new = _ContiguousGroupNorm(child.num_groups, child.num_channels, child.eps, child.affine)
            setattr(module, name, new.to(child.weight.device if child.affine else "cpu"))
        else:
            _contiguous_group_norms(child)


class ParallelDenoisers(nn.Module):
    """M copies of one denoiser architecture with SEPARATE weights, evaluated in one vectorised pass.

    EI-DDPM's paths share nothing but the schedule, so each modality has its own weights. Rather than a
    Python loop over M networks, the M weight sets are stacked (``torch.func.stack_module_state``) into
    parameters with a leading axis M and the architecture runs once under ``torch.func.vmap`` over that
    axis (``functional_call`` on a weightless template on the ``meta`` device): every convolution is one
    batched call over the M paths. Why ``vmap`` and not grouped convolutions: it keeps any denoiser of
    ``nets/`` (here MedSegDiff's U-Net, with its dynamic conditional encoding and FF-Parser) unchanged,
    and the result equals M separate networks exactly (``tests/test_ei_ddpm.py``). Attention on CPU
    falls back to a per-path loop inside torch (a warning says so); on GPU it is batched.

    The denoiser contract is kept: ``encode_condition(image)`` takes the (B, M, H, W) image, gives path m
    its channel m only, and returns batch-first features (B, M, ...) (so the sampler's
    ``repeat_interleave`` over samples applies); ``forward(x_t, t, cond)`` feeds the SAME noisy mask x_t
    (B, C, H, W) and timesteps to every path and returns (B, M, C_out, H, W).

    Args:
        denoiser: a factory (e.g. a Hydra partial) called M times for M independently initialised
            paths, or one module (path 0; the others are deep copies re-initialised with each submodule's
            ``reset_parameters``, all-zero parameters kept zero).
        num_paths: M, the number of paths (modalities); each path's denoiser takes ONE image channel.
    """

    def __init__(self, denoiser: nn.Module | Callable[[], nn.Module], num_paths: int = 4) -> None:
        super().__init__()
        if num_paths < 1:
            raise ConfigError(f"num_paths must be >= 1, got {num_paths}")
        if isinstance(denoiser, nn.Module):
            copies = [denoiser] + [self._reinitialised(denoiser) for _ in range(num_paths - 1)]
        else:
            copies = [denoiser() for _ in range(num_paths)]
        denoiser = copies[0]
        image_channels = getattr(denoiser, "image_channels", 1)
        if image_channels != 1:
            raise ConfigError(
                f"each path is conditioned on one modality: the path denoiser must take image_channels=1, "
                f"got {image_channels}"
            )
        self.num_paths = int(num_paths)
        self.out_channels = int(getattr(denoiser, "out_channels", getattr(denoiser, "mask_channels", 1)))
        self.mask_channels = int(getattr(denoiser, "mask_channels", self.out_channels))
        params, buffers = stack_module_state(copies)
        self._param_names = list(params)
        self._buffer_names = list(buffers)
        self.weights = nn.ParameterList(nn.Parameter(params[n].detach().clone()) for n in self._param_names)
        for i, n in enumerate(self._buffer_names):
            self.register_buffer(f"buffer_{i}", buffers[n].detach().clone())
        template = copy.deepcopy(denoiser)
        _contiguous_group_norms(template)
        # not a submodule: no parameters, no state_dict entries, not moved by .to()
        self.__dict__["_template"] = template.to("meta")

    @staticmethod
    def _reinitialised(denoiser: nn.Module) -> nn.Module:
        other = copy.deepcopy(denoiser)
        for module in other.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset) and module is not other:
                reset()
        # keep zero-initialised output heads zero (the architecture's choice)
        for (_, p_new), (_, p_old) in zip(other.named_parameters(), denoiser.named_parameters(), strict=True):
            if not bool(p_old.detach().any()):
                with torch.no_grad():
                    p_new.zero_()
        return other

    def _state(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        params = dict(zip(self._param_names, self.weights, strict=True))
        buffers = {n: getattr(self, f"buffer_{i}") for i, n in enumerate(self._buffer_names)}
        return params, buffers

    def path_state_dict(self, m: int) -> dict[str, Tensor]:
        """The weights of path m, as a state_dict of the single-path denoiser."""
        params, buffers = self._state()
        return {n: v[m].detach() for n, v in {**params, **buffers}.items()}

    def encode_condition(self, image: Tensor) -> Any:
        """(B, M, H, W) images -> each path's ``encode_condition`` of its channel, batch-first (B, M, ...)."""
        if image.dim() != 4 or image.shape[1] != self.num_paths:
            raise ConfigError(
                f"expected a (B, {self.num_paths}, H, W) image, one channel per path (modality), got "
                f"{tuple(image.shape)}"
            )
        template = self._template

        def encode(params: dict, buffers: dict, channel: Tensor) -> Any:
            with _reparametrize_module(template, {**params, **buffers}):
                return template.encode_condition(channel)

        params, buffers = self._state()
        per_path = image.transpose(0, 1).unsqueeze(2)  # (M, B, 1, H, W)
        cond = vmap(encode, in_dims=(0, 0, 0))(params, buffers, per_path)
        return torch.utils._pytree.tree_map(lambda c: c.transpose(0, 1), cond)

    def forward(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        """The M paths on the same x_t (B, C, H, W) and t (B,), each with its cond; (B, M, C_out, H, W)."""
        template = self._template

        def run(params: dict, buffers: dict, c: Any) -> Tensor:
            return functional_call(template, (params, buffers), (x_t, t, c))

        params, buffers = self._state()
        cond_m = torch.utils._pytree.tree_map(lambda c: c.transpose(0, 1), cond)  # (M, B, ...)
        return vmap(run, in_dims=(0, 0, 0))(params, buffers, cond_m).transpose(0, 1)
