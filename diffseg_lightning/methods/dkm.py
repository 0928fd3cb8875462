"""The Diffusion Kinetic Model (Lv et al., MICCAI 2023): DDPM features of the pre-to-post-contrast
mapping fused into a segmentation network, so that only the pre-contrast image is needed at inference."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from diffseg_lightning.diffusion.gaussian import GaussianKernel
from diffseg_lightning.diffusion.reverse import diffusion_loss
from diffseg_lightning.features.extractor import DiffusionFeatureExtractor
from diffseg_lightning.inference.sampler import DiffusionSampler, describe_samples
from diffseg_lightning.methods.base import SegmentationMethod
from diffseg_lightning.methods.segmentation import DiceBCELoss
from diffseg_lightning.nets.dkm import group_by_block
from diffseg_lightning.utils.checkpoints import read_torch_file, sub_state_dict
from diffseg_lightning.utils.errors import ConfigError, DiffSegError

__all__ = ["DKMModule", "concat_condition"]


def concat_condition(backbone: nn.Module, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
    """One pass of a concatenated-condition denoiser: ``backbone(cat([x_t, cond], 1), t)``.

    Args:
        backbone: a denoiser ``f(x, t)`` (MONAI ``DiffusionModelUNet``) with ``K + C`` input channels.
        x_t: noised post-contrast phases (B, K, H, W).
        t: timesteps (B,).
        cond: the pre-contrast image (B, C, H, W).

    Returns:
        The denoiser's output (B, K, H, W) (``2 K`` channels with a learned variance).
    """
    return backbone(torch.cat([x_t, cond], dim=1), t)


class DKMModule(SegmentationMethod):
    """Diffusion Kinetic Model: a conditional DDPM (pre -> post contrast) whose features guide segmentation.

    Lv, Liu, Miao, Li & Pan, "Diffusion Kinetic Model for Breast Cancer Segmentation in Incomplete
    DCE-MRI", MICCAI 2023. Two modules:

    * **Diffusion module (DM)**: a DDPM that learns the hemodynamic response, i.e. generates the
      post-contrast phases ``x_0 = post`` (B, K, H, W) from the pre-contrast image ``pre`` (B, C, H, W):
      ``x_t = q_sample(post, t)`` with our :class:`~diffseg_lightning.diffusion.GaussianKernel` (the run's
      ``noise`` group), the denoiser is MONAI's ``DiffusionModelUNet`` on ``cat([x_t, pre])``
      (:func:`concat_condition`) and the loss is ``kernel.loss`` (Ho et al. 2020).
    * **Segmentation module (SM)**: :class:`~diffseg_lightning.nets.dkm.DKMSegNet`, four KineticBlocks
      ``Fusion(f_dm, f_sm) = Concat(ReLU(BN(W * f_dm)); f_sm)`` then four up-blocks, trained with
      Dice + BCE (:class:`~diffseg_lightning.methods.segmentation.DiceBCELoss`) while the DM is frozen.

    ``f_dm`` is read by the shared :class:`~diffseg_lightning.features.DiffusionFeatureExtractor`
    (forward hooks on ``feature_blocks`` at ``feature_timesteps``, one batched pass, fixed noise
    ``feature_noise_seed``, under ``torch.inference_mode``, backbone frozen); the maps of each block (all
    timesteps) feed one KineticBlock, finest first. At inference only the pre-contrast image is used.

    One command does both stages: ``on_fit_start`` pretrains the DM for ``pretrain_steps`` optimiser
    steps (its own optimiser ``ddpm_optimizer`` on the training loader's ``post`` phases), freezes it, and
    then Lightning's loop trains only the SM (every DM parameter has ``requires_grad=False`` and never
    gets a gradient). A persistent buffer ``ddpm_pretrained`` marks a trained DM, so a resumed run or a
    run started from ``ddpm_ckpt`` does not pretrain again. ``ddpm_ckpt`` loads the DM from a DKM
    checkpoint (its ``features.backbone.*`` weights) or from a plain state dict of the denoiser; with
    ``pretrain_steps=0`` and no ``ddpm_ckpt`` the DM stays random, with a loud warning (meant for
    fast_dev_run and tests only). Under ``debug=fast_dev_run`` pretraining is capped at one step.

    Choices (the paper leaves them open; ours):
        * ``x_t`` at feature extraction: the post-contrast phases are unknown at inference, so the
          forward process starts from the pre-contrast image (its first channel repeated K times), as
          the paper's figure pictures the DM noising the pre-contrast image; the denoiser sees the
          pre-contrast condition as in training. At a large ``t`` (default 500 of 1000) the starting
          image matters little (``sqrt(abar_500) = 0.28`` on the linear schedule) and with the ``x0``
          objective the decoder must draw the post-contrast phases from the condition.
        * Blocks: the DM's decoder (``up_blocks.2``, ``up_blocks.1``, ``up_blocks.0``) and middle block,
          finest first, for KineticBlocks 1..4 (decoder features segment best in Baranchuk et al., ICLR
          2022); each map is resized to the KineticBlock's resolution (see ``KineticBlock``).
        * The fusion convolution ``W`` is 1x1 (``model.net.kernel_size``).
        * Pretraining under DDP: every process trains its own copy, then rank 0's weights are broadcast.
        * EMA (``callbacks.ema``) averages the frozen DM too; its warm-up makes the average equal the
          pretrained weights to within ~1e-5 after ten steps.

    Args:
        net: a partial :class:`~diffseg_lightning.nets.dkm.DKMSegNet` (``_partial_: true``), called with
            ``dm_channels`` (the per-block feature channels, measured here).
        ddpm: the DM denoiser ``f(cat([x_t, pre]), t)``, or a partial one (``_partial_: true``, e.g. MONAI's
            ``DiffusionModelUNet``) called here with ``in_channels = post_channels + image_channels`` and
            ``out_channels = kernel.model_output_channels(post_channels)``.
        optimizer: a partial optimiser for the SM (called with the parameters; the frozen DM's are
            excluded).
        scheduler: a partial LR scheduler, or None.
        post_channels: K, the number of post-contrast phases.
        image_channels: C, the channels of ``image`` (1: the pre-contrast image).
        feature_blocks: four block names of the DM (``named_modules``), finest first.
        feature_timesteps: timesteps of the features (each block's maps at all of them go to its block).
        feature_noise_seed: seed of the extractor's fixed noise.
        ddpm_ckpt: path of a DKM checkpoint or of a denoiser state dict, or None.
        pretrain_steps: DM optimiser steps before the SM trains (0: none).
        ddpm_optimizer: partial optimiser for pretraining; None gives AdamW(lr=1e-4).
        mask_channels: C_mask.
        spacing: pixel spacing for HD95, or None.
        loss: ``loss(logits, target)``; None gives :class:`DiceBCELoss`.
        kernel: the Gaussian noise kernel (required).
        sampler: only ``threshold`` and ``parallel`` apply (one deterministic pass).
        compile: ``torch.compile`` the SM (``self.net``).
        channels_last: channels-last weights and images.
    """

    network_attr = "net"

    def __init__(
        self,
        net: Callable[..., nn.Module],
        ddpm: nn.Module | Callable[..., nn.Module],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        post_channels: int = 3,
        image_channels: int = 1,
        feature_blocks: Sequence[str] = ("up_blocks.2", "up_blocks.1", "up_blocks.0", "middle_block"),
        feature_timesteps: Sequence[int] = (500,),
        feature_noise_seed: int = 0,
        ddpm_ckpt: str | None = None,
        pretrain_steps: int = 0,
        ddpm_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        mask_channels: int = 1,
        spacing: Sequence[float] | None = None,
        loss: nn.Module | None = None,
        kernel: GaussianKernel | None = None,
        sampler: DiffusionSampler | None = None,
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__(optimizer, scheduler, mask_channels, spacing, compile, channels_last)
        if not isinstance(kernel, GaussianKernel):
            raise ConfigError(
                "DKMModule needs the Gaussian noise kernel (noise=gaussian) for its diffusion module, got "
                f"{type(kernel).__name__}"
            )
        if isinstance(net, nn.Module):
            raise ConfigError(
                "DKMModule: model.net must be a partial DKMSegNet (_partial_: true): its fusion widths are "
                "measured from the diffusion module here"
            )
        if len(feature_blocks) != 4:
            raise ConfigError(
                f"DKMModule: feature_blocks must name 4 blocks (one per KineticBlock), got {list(feature_blocks)}"
            )
        if int(pretrain_steps) < 0:
            raise ConfigError(f"DKMModule: pretrain_steps must be >= 0, got {pretrain_steps}")
        self.post_channels = int(post_channels)
        self.image_channels = int(image_channels)
        self.kernel = kernel
        if not isinstance(ddpm, nn.Module):
            ddpm = ddpm(
                in_channels=self.post_channels + self.image_channels,
                out_channels=kernel.model_output_channels(self.post_channels),
            )
        self.features = DiffusionFeatureExtractor(
            ddpm,
            list(feature_blocks),
            list(feature_timesteps),
            kernel=kernel,
            noise_seed=feature_noise_seed,
            call=concat_condition,
        )
        side = max(16, 2 ** (len(getattr(ddpm, "block_out_channels", (0, 0, 0, 0))) + 1))
        try:
            self.features(  # one dry run; the extractor records each block's channels
                torch.zeros(1, self.post_channels, side, side),
                cond=torch.zeros(1, self.image_channels, side, side),
            )
        except Exception as err:
            raise ConfigError(
                f"DKMModule: the diffusion module does not take cat([x_t ({self.post_channels} post-contrast "
                f"channels), pre ({self.image_channels} channel(s))]): {err}"
            ) from err
        channels = self.features.block_channels
        self.block_channels = [channels[b] for b in self.features.blocks]
        self.net = net(dm_channels=[c * len(self.features.timesteps) for c in self.block_channels])
        self.register_buffer("ddpm_pretrained", torch.tensor(False))
        self.ddpm_ckpt = ddpm_ckpt
        self.pretrain_steps = int(pretrain_steps)
        self.ddpm_optimizer_factory = ddpm_optimizer
        self.pretrain_record: dict[str, Any] | None = None
        self.loss = loss if loss is not None else DiceBCELoss()
        self.use_sampler(sampler)

    def freeze_ddpm(self) -> None:
        """Freeze the DM: no gradients, eval mode (the extractor keeps it in eval under ``train()``)."""
        self.ddpm.requires_grad_(False)
        self.ddpm.eval()

    @property
    def ddpm(self) -> nn.Module:
        """The diffusion module's denoiser (held, frozen, by the feature extractor)."""
        return self.features.backbone

    # ------------------------------------------------------------------------- the diffusion module
    def ddpm_loss(self, pre: Tensor, post: Tensor) -> dict[str, Tensor]:
        """The DM's training loss: ``kernel.loss(f(cat([q_sample(post, t), pre]), t), post, x_t, t)``.

        Args:
            pre: pre-contrast images (B, C, H, W).
            post: post-contrast phases (B, K, H, W), the DM's ``x_0``.
        """
        if post.shape[1] != self.post_channels:
            raise ConfigError(
                f"DKMModule: the batch has {post.shape[1]} post-contrast phases, model.post_channels is "
                f"{self.post_channels}"
            )
        expected = self.kernel.model_output_channels(self.post_channels)

        def denoise(x_t: Tensor, t: Tensor) -> Tensor:
            out = concat_condition(self.ddpm, x_t, t, pre)
            if out.shape[1] != expected:
                raise ConfigError(
                    f"DKMModule: the diffusion module outputs {out.shape[1]} channels; the kernel needs "
                    f"{expected}"
                )
            return out

        return diffusion_loss(self.kernel, post, denoise).terms

    def load_ddpm(self, path: str | Path) -> None:
        """Load the DM from a DKM checkpoint (``features.backbone.*``) or a plain denoiser state dict, read
        with the project's checkpoint reader (:mod:`diffseg_lightning.utils.checkpoints`; messages start with
        ``model.ddpm_ckpt``)."""
        key = "model.ddpm_ckpt"
        state = read_torch_file(path, key)
        if isinstance(state, dict) and "state_dict" in state:
            state = sub_state_dict(state, "features.backbone.", key, path)
        try:
            self.ddpm.load_state_dict(state)
        except RuntimeError as err:
            raise DiffSegError(f"model.ddpm_ckpt: {path} does not fit model.ddpm: {err}") from None
        self.ddpm_pretrained.fill_(True)

    def pretrain_ddpm(self, loader: Any, steps: int) -> dict[str, Any]:
        """Train the DM for ``steps`` optimiser steps on ``loader``'s ``image`` / ``post``, then freeze it."""
        factory = self.ddpm_optimizer_factory
        optimizer = (
            factory(self.ddpm.parameters())
            if factory is not None
            else torch.optim.AdamW(self.ddpm.parameters(), lr=1e-4)
        )
        self.ddpm.requires_grad_(True)
        self.ddpm.train()
        losses: list[float] = []
        start = time.perf_counter()
        every = max(1, steps // 10)
        try:
            with torch.enable_grad():
                while len(losses) < steps:
                    for batch in loader:
                        if "post" not in batch:
                            raise ConfigError(
                                "DKM pretraining needs batch['post'], the post-contrast phases (data=synthetic_dce)"
                            )
                        pre = batch["image"].to(self.device).float()
                        post = batch["post"].to(self.device).float()
                        loss = self.ddpm_loss(pre, post)["loss"]
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        losses.append(float(loss.detach()))
                        if len(losses) % every == 0 or len(losses) == steps:
                            rank_zero_info(
                                f"DKM diffusion module: step {len(losses)}/{steps}, loss {losses[-1]:.4f}"
                            )
                        if len(losses) >= steps:
                            break
        finally:
            self.ddpm.zero_grad(set_to_none=True)
            self.freeze_ddpm()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for tensor in self.ddpm.state_dict().values():
                dist.broadcast(tensor, src=0)
        self.ddpm_pretrained.fill_(True)
        return {
            "steps": steps,
            "first_loss": losses[0],
            "last_loss": losses[-1],
            "seconds": time.perf_counter() - start,
        }

    def on_fit_start(self) -> None:
        """Load or pretrain the DM once (not when resuming a run whose DM is trained), then freeze it."""
        if not bool(self.ddpm_pretrained) and self.ddpm_ckpt:
            self.load_ddpm(self.ddpm_ckpt)
        if bool(self.ddpm_pretrained):
            self.freeze_ddpm()
            return
        steps = self.pretrain_steps
        if steps == 0:
            warnings.warn(
                "DKMModule: NO PRETRAINED DIFFUSION MODULE (model.ddpm_ckpt=null, model.pretrain_steps=0): the "
                "segmentation network is fused with features of a RANDOM DDPM. Use this for fast_dev_run and "
                "tests only; set model.pretrain_steps or model.ddpm_ckpt for real runs.",
                UserWarning,
                stacklevel=2,
            )
            return
        if self.trainer.fast_dev_run:
            rank_zero_info(f"DKM diffusion module: fast_dev_run caps pretraining at 1 step (of {steps})")
            steps = 1
        loader = self.trainer.datamodule.train_dataloader()
        self.pretrain_record = self.pretrain_ddpm(loader, steps)

    # ----------------------------------------------------------------------- the segmentation module
    def configure_optimizers(self) -> Any:
        params = [p for name, p in self.named_parameters() if not name.startswith("features.")]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(
            optimizer, total_steps=int(self.trainer.estimated_stepping_batches)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def example_input(self, image: Tensor) -> tuple[Tensor]:
        return (image,)

    def diffusion_features(self, image: Tensor) -> list[Tensor]:
        """``f_dm^1..f_dm^4`` for pre-contrast images (B, C, H, W): one (B, T * C_b, H, W) map per block."""
        if image.shape[1] != self.image_channels:
            raise ConfigError(
                f"DKMModule: images have {image.shape[1]} channel(s), model.image_channels is {self.image_channels}"
            )
        start = image[:, :1].expand(-1, self.post_channels, -1, -1)  # the forward process starts at pre
        features = self.features(start, cond=image)
        return group_by_block(features, self.block_channels, len(self.features.timesteps))

    def forward(self, image: Tensor) -> Tensor:
        """(B, C, H, W) pre-contrast images -> (B, C_mask, H, W) logits."""
        image = self.to_memory_format(image)
        return self.net(image, self.diffusion_features(image))

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        target = self.training_target(batch).float()
        logits = self(batch["image"]).float()
        if logits.shape != target.shape:
            raise ConfigError(
                f"DKMSegNet returns {tuple(logits.shape)} but the masks are {tuple(target.shape)}: its output "
                f"channels must equal data.mask_channels ({self.mask_channels})"
            )
        out = self.loss(logits, target)
        losses = out if isinstance(out, dict) else {"loss": out}
        self.check_loss(losses["loss"], batch_idx)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=target.shape[0])
        return losses["loss"]

    @torch.no_grad()
    def sample(self, image: Tensor, case_ids: Tensor | None = None) -> dict[str, Tensor]:
        """One deterministic prediction from the pre-contrast image, in the layout every method returns."""
        probability = torch.sigmoid(self(image).float())
        return describe_samples(probability.unsqueeze(1), "mean", self.threshold)

    def inference_settings(self) -> dict[str, Any]:
        """One network pass (see :class:`~diffseg_lightning.methods.UNetSegmentationModule`), plus the
        features read."""
        return self.single_pass_settings(
            feature_blocks=list(self.features.blocks),
            feature_timesteps=list(self.features.timesteps),
            ddpm_pretrained=bool(self.ddpm_pretrained),
            ddpm_pretraining=self.pretrain_record,
        )
