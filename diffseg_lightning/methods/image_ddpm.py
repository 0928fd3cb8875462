"""An image DDPM (no masks): the pretrained backbone whose features FEDD and its kin read."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from diffseg_lightning.diffusion.base import NoiseKernel
from diffseg_lightning.diffusion.gaussian import GaussianKernel
from diffseg_lightning.diffusion.reverse import diffusion_loss
from diffseg_lightning.exceptions import ConfigError, DiffSegError
from diffseg_lightning.methods.base import SegmentationMethod

__all__ = ["ImageDiffusionModule"]


class ImageDiffusionModule(SegmentationMethod):
    """Denoising diffusion on images (Ho, Jain & Abbeel, NeurIPS 2020), trained without labels.

    The first stage of FEDD (Carrion & Norouzi, MICCAI 2023) and of the label-efficient segmentation of
    Baranchuk et al. (ICLR 2022): an unconditional DDPM learns the training images; its frozen features
    are then read by :class:`~diffseg_lightning.features.DiffusionFeatureExtractor`. The network is MONAI's
    :class:`monai.networks.nets.DiffusionModelUNet` by default (``conf/model/image_ddpm.yaml``), the
    kernel the ``noise`` group's (:class:`~diffseg_lightning.diffusion.gaussian.GaussianKernel` in every
    config; the objective is the kernel's, epsilon in the FEDD configs).

    Training: ``x0 = batch[target_key]`` (the z-scored image by default; no mask is read),
    ``t ~ U[0, T)``, ``x_t = q_sample(x0, t)``, loss ``kernel.loss(net(x_t, t), x0, x_t, t)``
    (:func:`~diffseg_lightning.diffusion.reverse.diffusion_loss`). Options
    that other methods need (kept general, off by default):

    - class conditioning: with ``class_key`` (e.g. ``label``) the batch's int64 class ids go to the
      network's ``class_labels`` (a MONAI U-Net built with ``num_class_embeds``);
    - image conditioning: with ``condition_key`` the batch tensor (B, C_c, H, W) is concatenated to
      ``x_t`` along channels (the network's ``in_channels`` = C_target + C_c), e.g. a pre-contrast
      image conditioning a post-contrast target (the Diffusion Kinetic Model).

    Evaluation (validation, test, ``diffseg-eval``): there is no segmentation, so no Dice, and nothing is
    sampled, so the module takes no sampler (the ``sampler`` group is not built). Each case is
    scored by its denoising loss, the kernel's ``mse`` (its ``loss`` for a kernel without an ``mse`` term)
    averaged over ``eval_timesteps`` evenly spaced
    timesteps ``round(linspace(0, T - 1, K))`` with fixed noise (drawn once from ``eval_seed`` and shared
    by every case, so the number is deterministic and comparable across checkpoints); all K timesteps
    run in one batched pass. ``summary.json`` holds ``metric_per_case`` rows with ``loss`` and its mean.
    The checkpoint callback is replaced (``configure_callbacks``) by one that keeps the lowest
    ``val/loss`` (the default monitors ``val/dice``, which this module does not produce), in the same
    folder and file name. ``diffseg-predict`` is refused with a clear error (no mask to write).

    Args:
        net: ``net(x, t, class_labels=...)`` -> (B, C_target, H, W) (or 2 C_target with learned variance).
        kernel: the noise kernel (``noise`` group).
        optimizer: a partial optimiser, called with the parameters.
        scheduler: a partial LR scheduler, called with ``(optimizer, total_steps=...)``, or None.
        target_key: the batch key of the images to learn.
        condition_key: a batch key concatenated to ``x_t`` as a condition, or None.
        class_key: a batch key of int64 class ids passed as ``class_labels``, or None.
        eval_timesteps: K, timesteps of the evaluation loss (>= 1).
        eval_seed: seed of the evaluation noise.
        mask_channels: unused (kept for the shared interface).
        spacing: unused (kept for the shared interface).
        compile: ``torch.compile`` the network (see :class:`SegmentationMethod`).
        channels_last: channels-last weights and inputs (see :class:`SegmentationMethod`).
    """

    network_attr = "net"
    #: Why ``diffseg-predict`` refuses this method (read from the checkpoint's config before anything runs).
    cannot_predict = (
        "an image DDPM has no segmentation output to predict; score it with diffseg-eval (denoising loss) "
        "or use its checkpoint as a backbone (model=fedd model.backbone_ckpt=...)"
    )

    def __init__(
        self,
        net: nn.Module,
        kernel: NoiseKernel,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        target_key: str = "image",
        condition_key: str | None = None,
        class_key: str | None = None,
        eval_timesteps: int = 10,
        eval_seed: int = 0,
        mask_channels: int = 1,
        spacing: Sequence[float] | None = None,
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__(optimizer, scheduler, mask_channels, spacing, compile, channels_last)
        if not isinstance(kernel, NoiseKernel):
            raise ConfigError(
                f"ImageDiffusionModule needs a noise kernel (the noise group, e.g. noise=gaussian), got "
                f"{type(kernel).__name__}"
            )
        if int(eval_timesteps) < 1:
            raise ConfigError(f"eval_timesteps must be >= 1, got {eval_timesteps}")
        self.net = net
        self.kernel = kernel
        self.target_key = str(target_key)
        self.condition_key = condition_key
        self.class_key = class_key
        self.eval_seed = int(eval_seed)
        T = int(kernel.num_train_timesteps)
        grid = torch.linspace(0, T - 1, int(eval_timesteps)).round().long().unique()
        self.eval_timesteps: list[int] = grid.tolist()

    # ----------------------------------------------------------------------------------- network
    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        condition: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One network pass: ``x_t`` (B, C, H, W), ``t`` (B,), optional condition (B, C_c, H, W) and
        class ids (B,) -> (B, C_out, H, W)."""
        x = x_t if condition is None else torch.cat([x_t, condition.to(x_t.dtype)], dim=1)
        expected = getattr(self.net, "in_channels", None)
        if expected is not None and x.shape[1] != expected:
            raise ConfigError(
                f"the network takes {expected} input channels but gets {x.shape[1]} "
                f"({self.target_key}{' + ' + self.condition_key if self.condition_key else ''}); "
                "set model.net.in_channels to match"
            )
        kwargs = {} if class_labels is None else {"class_labels": class_labels}
        return self.net(self.to_memory_format(x), t, **kwargs)

    def example_input(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        channels = getattr(self.net, "in_channels", image.shape[1])
        args: tuple[torch.Tensor, ...] = (
            torch.zeros(1, channels, *image.shape[-2:]),
            torch.zeros(1, dtype=torch.long),
        )
        if self.class_key is not None:
            args = (*args, None, torch.zeros(1, dtype=torch.long))  # type: ignore[assignment]
        return args

    def _inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if self.target_key not in batch:
            raise KeyError(f"the batch has no {self.target_key!r} (model.target_key); keys: {sorted(batch)}")
        x0 = batch[self.target_key].float()
        condition = batch[self.condition_key].float() if self.condition_key else None
        labels = batch[self.class_key].long().reshape(-1) if self.class_key else None
        return x0, condition, labels

    # ----------------------------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x0, condition, labels = self._inputs(batch)
        losses = diffusion_loss(self.kernel, x0, lambda x_t, t: self(x_t, t, condition, labels)).terms
        self.check_loss(losses["loss"], batch_idx)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=x0.shape[0])
        return losses["loss"]

    # --------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def denoising_loss(self, batch: dict) -> torch.Tensor:
        """Per-case denoising loss (B,): the kernel's ``mse`` (else its ``loss``) averaged over the evaluation
        timesteps, all of them in one (K B)-batched pass, with the fixed evaluation noise. The kernel's loss
        averages over its batch, so it is computed per (timestep, case) slice of the one network pass."""
        x0, condition, labels = self._inputs(batch)
        B, K = x0.shape[0], len(self.eval_timesteps)
        generator = torch.Generator().manual_seed(self.eval_seed)
        noise = torch.randn((K, *x0.shape[1:]), generator=generator).to(x0)
        noise = noise.repeat_interleave(B, dim=0)  # (K B, C, H, W): the same noise for every case
        t = torch.tensor(self.eval_timesteps, device=x0.device).repeat_interleave(B)
        x0_k = x0.repeat(K, 1, 1, 1)
        x_t = self.kernel.q_sample(x0_k, t, noise=noise)
        cond_k = condition.repeat(K, 1, 1, 1) if condition is not None else None
        labels_k = labels.repeat(K) if labels is not None else None
        out = self(x_t, t, cond_k, labels_k).float()
        per_item = torch.stack(
            [
                self._score(self.kernel.loss(out[i : i + 1], x0_k[i : i + 1], x_t[i : i + 1], t[i : i + 1]))
                for i in range(K * B)
            ]
        )  # (K B,)
        return per_item.reshape(K, B).mean(0)

    @staticmethod
    def _score(terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """The evaluation score of one slice's loss terms: ``mse`` (the denoising error of the mean part,
        without a learned variance's ``vlb``), else ``loss``."""
        return terms.get("mse", terms["loss"])

    def _evaluate_batch(self, batch: dict, batch_idx: int) -> None:
        start = time.perf_counter()
        loss = self.denoising_loss(batch).cpu()
        self._sampling_seconds += time.perf_counter() - start
        for i in range(loss.shape[0]):
            self._rows.append(
                {"case": batch["case"][i], "index": int(batch["index"][i]), "loss": float(loss[i])}
            )

    def inference_settings(self) -> dict[str, Any]:
        """What evaluation did: one batched pass over the fixed timestep grid, no sampling."""
        return {
            "num_steps": 1,
            "num_samples": 1,
            "fusion": "none",
            "threshold": None,
            "seed": self.eval_seed,
            "parallel": "data",
            "deterministic": True,
            "evaluation": "denoising_loss",
            "objective": self.kernel.objective if isinstance(self.kernel, GaussianKernel) else None,
            "eval_timesteps": list(self.eval_timesteps),
        }

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Any]:
        raise DiffSegError(self.cannot_predict)

    def configure_callbacks(self) -> list[ModelCheckpoint]:
        """Keep the checkpoint with the lowest ``val/loss`` (replaces the configured ModelCheckpoint)."""
        trainer = self._trainer
        # exactly ModelCheckpoint: not diffseg's LastCheckpoint (a subclass that keeps last.ckpt)
        callbacks = trainer.callbacks if trainer is not None else []
        configured = [c for c in callbacks if type(c) is ModelCheckpoint]
        if not configured:
            return []
        old = configured[0]
        return [
            ModelCheckpoint(
                dirpath=old.dirpath,
                filename=old.filename,
                monitor="val/loss",
                mode="min",
                save_last=old.save_last,
                save_top_k=1,
                auto_insert_metric_name=False,
            )
        ]
