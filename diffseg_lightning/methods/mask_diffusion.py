"""Conditional mask diffusion: the paradigm of MedSegDiff, MedSegDiff-V2, BerDiff, MB-Diff and DT-UNet.

:class:`SegmentationMethod` holds what every method shares (the evaluation protocol, ``summary.json``
results, panels, checkpoints); :class:`MaskDiffusionModule` adds the diffusion training and sampling.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from diffseg_lightning.inference.fusion import check_finite_fusion
from diffseg_lightning.inference.sampler import DiffusionSampler
from diffseg_lightning.metrics.report import case_metrics, summarize
from diffseg_lightning.utils.errors import NonFiniteLossError


def count_macs(module: nn.Module, args: tuple) -> int:
    """Multiply-accumulates of ``module(*args)``: torch's FLOP counter (matmuls and convolutions) / 2."""
    training = module.training
    module.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*args)
    module.train(training)
    return counter.get_total_flops() // 2


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, min_factor: float = 0.0
):
    """Linear warm-up, then cosine decay of the learning rate to ``min_factor`` times its base value."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def compile_in_place(net: nn.Module, owner: str) -> bool:
    """``torch.compile`` ``net``'s forward in place (``nn.Module.compile``: state_dict keys unchanged, no
    ``_orig_mod.``), with a fallback to eager and one warning naming the reason when the backend is missing
    or fails, at compile time or at the first call (e.g. no C++ compiler for inductor). Returns whether the
    network was compiled (a later failure at its first call still falls back)."""

    def fall_back(err: BaseException) -> None:
        while getattr(err, "inner_exception", None) is not None or err.__cause__ is not None:
            err = getattr(err, "inner_exception", None) or err.__cause__  # e.g. inside BackendCompilerFailed
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        net._compiled_call_impl = None
        warnings.warn(
            f"{owner}: model.compile=true but torch.compile is unavailable here ({reason}); "
            "running the network eagerly",
            UserWarning,
            stacklevel=3,
        )

    try:
        if not torch._dynamo.is_dynamo_supported():
            raise RuntimeError("TorchDynamo does not support this Python or platform")
        net.compile()
    except Exception as err:  # the backend's import and checks raise many types
        fall_back(err)
        return False
    compiled = net._compiled_call_impl
    checked = False

    def guarded(*args: Any, **kwargs: Any) -> Any:
        nonlocal checked
        if checked:
            return compiled(*args, **kwargs)
        try:
            out = compiled(*args, **kwargs)
        except Exception as err:
            # a real error in the network fails eagerly too, and is raised from there
            out = net._call_impl(*args, **kwargs)
            fall_back(err)
            return out
        checked = True
        return out

    net._compiled_call_impl = guarded
    return True


class SegmentationMethod(L.LightningModule):
    """What every method shares: the training target, the optimiser, the evaluation protocol, checkpoints.

    A subclass implements ``training_step``, :meth:`sample` (one image batch in, the fused mask, its
    probability and uncertainty maps out, as :func:`~diffseg_lightning.inference.sampler.describe_samples`
    returns them) and :meth:`inference_settings` (the ``sampler`` block of ``summary.json``). This class
    then scores validation and test batches with
    :func:`~diffseg_lightning.metrics.report.case_metrics`, gathers the per-case rows across processes,
    deduplicates them by case index (the distributed sampler pads), keeps them in ``self.results[stage]``
    in the ``summary.json`` layout (read by :class:`~diffseg_lightning.callbacks.SummaryWriter`), keeps
    the first validation batch in ``self.panel`` (read by
    :class:`~diffseg_lightning.callbacks.ImagePanelLogger`) and stores the resolved config
    (``self.run_config``) and the RNG states in checkpoints.

    Args:
        optimizer: a partial optimiser, called with the parameters.
        scheduler: a partial LR scheduler, called with ``(optimizer, total_steps=...)``, or None.
        mask_channels: C, channels of the mask.
        spacing: pixel spacing for HD95, or None for pixels.
        compile: ``torch.compile`` the network (``network_attr``) once, in :meth:`setup`, in place
            (checkpoint keys unchanged); eager, with one warning, when the backend is unavailable.
        channels_last: keep the convolution weights and the network's image inputs in
            ``torch.channels_last`` memory format (faster convolutions on tensor cores, same numbers).

    Mixed precision (``trainer.precision=bf16-mixed``): Lightning's precision plugin wraps every step,
    sampling included, in the same autocast as training. Sampling runs under ``torch.inference_mode``
    (Lightning's test and predict loops already do; its fit-time validation loop only disables gradients,
    so :meth:`validation_step` and :meth:`predict_step` enter it themselves). See
    ``tests/test_speed_options.py``.
    """

    network_attr = "net"  # the attribute holding the network that ``compile`` compiles
    row_only_columns: tuple[
        str, ...
    ] = ()  # per-case columns (e.g. a subgroup id) neither averaged nor logged

    def __init__(
        self,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        mask_channels: int = 1,
        spacing: Sequence[float] | None = None,
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.compile_network = bool(compile)
        self.channels_last = bool(channels_last)
        self._speed_applied = False
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.mask_channels = mask_channels
        self.spacing = spacing
        self.run_config: dict | None = None  # the resolved Hydra config, stored in checkpoints
        self.results: dict[str, dict] = {}
        self.panel: dict[str, torch.Tensor] | None = None
        self._rows: list[dict] = []
        self._sampling_seconds = 0.0
        self.network_cost: dict[str, Any] | None = (
            None  # parameters, MACs per network pass (measured in setup)
        )

    # ----------------------------------------------------------------------------- network cost
    def example_input(self, image: torch.Tensor) -> Any:
        """The arguments of one network pass (``self(*args)``) for one (1, C_img, H, W) image."""
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        """Measure the network once: parameters and multiply-accumulates per pass, at the data's image size.

        Lightning's model summary also shows FLOPs (= 2 MACs) once ``example_input_array`` is set here.
        """
        self._measure(stage)
        self.apply_speed_options()  # after the eager measurement (and after callbacks copied the model)

    def _measure(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        dataset = getattr(datamodule, "datasets", {}).get("train") if datamodule is not None else None
        if stage != "fit" or dataset is None or self.network_cost is not None:
            return
        image = dataset[0]["image"][None].float()
        self.example_input_array = self.example_input(image)
        self.network_cost = {
            "parameters": sum(p.numel() for p in self.parameters()),
            "macs_per_pass": count_macs(self, self.example_input_array),
            "image_size": list(image.shape[-2:]),
        }
        rank_zero_info(
            f"{type(self).__name__}: {self.network_cost['parameters']:,} parameters, "
            f"{self.network_cost['macs_per_pass'] / 1e9:.3f} GMACs per network pass at "
            f"{image.shape[-2]}x{image.shape[-1]}"
        )

    # ------------------------------------------------------------------------------ speed options
    def apply_speed_options(self) -> None:
        """Apply ``channels_last`` and ``compile`` once (called by :meth:`setup`, after the eager measurement).

        Not ``configure_model``: overriding it makes Lightning's ``WeightAveraging`` warn about sharding.
        """
        if self._speed_applied:
            return
        self._speed_applied = True
        if self.channels_last:  # convolution weights only: other 4-D parameters keep their layout
            for module in self.modules():
                if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
                    module.to(memory_format=torch.channels_last)
        if self.compile_network:
            compile_in_place(getattr(self, self.network_attr), type(self).__name__)

    def to_memory_format(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in channels-last memory format when ``channels_last`` is on and ``x`` is 4-D; else ``x``."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    # ----------------------------------------------------------------------------------- training
    def training_target(self, batch: dict) -> torch.Tensor:
        """The mask to learn: ``batch["mask"]``, or one random annotator per image when there are several."""
        masks = batch.get("masks")
        if masks is None or masks.shape[1] == 1 or self.mask_channels != 1:
            return batch["mask"]
        pick = torch.randint(masks.shape[1], (masks.shape[0],), device=masks.device)
        return masks[torch.arange(masks.shape[0], device=masks.device), pick].unsqueeze(1)

    def check_loss(self, loss: torch.Tensor, batch_idx: int) -> None:
        """Raise :class:`NonFiniteLossError` (one line, with the step) when the loss is NaN or inf."""
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"the training loss is {loss.item()} at global step {self.global_step} "
                f"(epoch {self.current_epoch}, batch {batch_idx}); lower the learning rate or check the data"
            )

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(
            optimizer, total_steps=int(self.trainer.estimated_stepping_batches)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------ sampling and metrics
    def sample(self, image: torch.Tensor, case_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The prediction for (B, C_img, H, W) images: ``samples`` (B, S, C, H, W), ``probability`` and
        ``mask`` (B, C, H, W), and the ``std``, ``entropy`` and ``mutual_information`` maps (B, C, H, W)."""
        raise NotImplementedError

    def inference_settings(self) -> dict[str, Any]:
        """The ``sampler`` block of ``summary.json``, with ``num_samples``, ``num_steps`` and ``fusion``."""
        raise NotImplementedError

    def use_sampler(self, sampler: DiffusionSampler | None) -> None:
        """Take what applies of the diffusion sampler, for a method that does not sample with it.

        Sets ``self.threshold`` (the sampler's, else 0.5), ``self.parallel`` (the sampler's, else
        ``"data"``) and ``self._sampler_keys``, the keys of the sampler's ``summary.json`` block
        (:meth:`DiffusionSampler.settings`), so that :meth:`single_pass_settings` reports them (null where
        they do not apply) and runs of every method tabulate side by side.

        Args:
            sampler: the configured sampler, or None.
        """
        self.threshold = sampler.threshold if sampler is not None else 0.5
        self.parallel = sampler.parallel if sampler is not None else "data"
        self._sampler_keys = list(sampler.settings()) if sampler is not None else []

    def single_pass_settings(self, **extra: Any) -> dict[str, Any]:
        """The ``sampler`` block of ``summary.json`` for a method that predicts in one deterministic pass.

        Every key of the diffusion sampler (see :meth:`use_sampler`) is present, null where it does not
        apply; ``update`` and ``seed`` are null, ``num_steps = num_samples = 1``, ``fusion = "none"``, and
        ``threshold`` and ``parallel`` are the method's.

        Args:
            **extra: keys to add or override (e.g. ``num_steps=R``, ``threshold="otsu"``, the method's own).

        Returns:
            The settings dict.
        """
        return {
            **dict.fromkeys(self._sampler_keys),
            "update": None,
            "num_steps": 1,
            "num_samples": 1,
            "fusion": "none",
            "threshold": self.threshold,
            "seed": None,
            "parallel": self.parallel,
            "deterministic": True,
            **extra,
        }

    def case_rows(self, out: dict[str, torch.Tensor], batch: dict) -> list[dict]:
        """One ``summary.json`` row per case of the batch: every metric of
        :func:`~diffseg_lightning.metrics.report.case_metrics`. A method with more outputs (instances,
        classes) extends the rows here, so its metrics land in the same summary, logs and interval tables."""
        return case_metrics(out, batch, self.spacing)

    def _evaluate_batch(self, batch: dict, batch_idx: int) -> None:
        start = time.perf_counter()
        with torch.inference_mode():  # Lightning's fit-time validation loop runs under no_grad only
            out = self.sample(batch["image"], batch["index"])
        check_finite_fusion(out["probability"], self.inference_settings().get("fusion"), batch["case"])
        if out["mask"].is_cuda:
            torch.cuda.synchronize()
        self._sampling_seconds += time.perf_counter() - start
        self._rows.extend(self.case_rows(out, batch))
        if batch_idx == 0:
            self.panel = {
                k: v.detach().float().cpu()
                for k, v in {
                    "image": batch["image"],
                    "mask": batch["mask"],
                    "prediction": out["mask"],
                    "probability": out["probability"],
                    "entropy": out["entropy"],
                }.items()
            }

    def _finish(self, stage: str) -> None:
        rows, seconds = self._rows, self._sampling_seconds
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (rows, seconds))
            rows = [row for part, _ in gathered for row in part]
            seconds = sum(s for _, s in gathered)
            num_processed = len(rows)
        else:
            num_processed = len(rows)
        unique = {row["index"]: row for row in rows}  # the distributed sampler pads with repeats
        rows = [unique[i] for i in sorted(unique)]
        summary = summarize(rows, exclude=self.row_only_columns)
        seconds_per_image = seconds / max(1, num_processed)
        settings = self.inference_settings()
        self.results[stage] = {
            "metric_per_case": rows,
            **summary,
            "sampler": settings,
            "seconds_per_image": seconds_per_image,
            "samples_per_second": settings["num_samples"] / seconds_per_image
            if seconds_per_image > 0
            else None,
            "network": self.network_cost,
        }
        for name, value in summary["mean"].items():
            self.log(f"{stage}/{name}", value, sync_dist=False, rank_zero_only=False)
        self._rows, self._sampling_seconds = [], 0.0

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate_batch(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._finish("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate_batch(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._finish("test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Any]:
        with torch.inference_mode():
            out = self.sample(batch["image"], batch["index"])
        check_finite_fusion(out["probability"], self.inference_settings().get("fusion"), batch["case"])
        return {"case": batch["case"], "original_size": batch.get("original_size"), **out}

    # ------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = _collect_rng_states()
        if self.run_config is not None:
            checkpoint["diffseg_config"] = self.run_config

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "rng_states" in checkpoint:
            _set_rng_states(checkpoint["rng_states"])
        self.run_config = checkpoint.get("diffseg_config", self.run_config)


class MaskDiffusionModule(SegmentationMethod):
    """Train a denoiser on masks with a noise kernel; sample, fuse and score S masks per image.

    Training: x_0 is the (kernel-encoded) mask, t ~ U[0, T), x_t ~ q(x_t | x_0), and the loss is the
    kernel's (``kernel.loss``). With several annotators per image (``batch["masks"]`` with A > 1 and a
    one-channel mask), each training step draws one annotator per image, as the LIDC literature does.

    Validation and test: the sampler draws S samples per image in one batched pass per step, fuses
    them, and every metric of the evaluation protocol that applies is computed per case
    (:func:`~diffseg_lightning.metrics.report.case_metrics`: Dice, IoU, HD95, calibration, and the
    multi-annotator metrics when ``batch["masks"]`` holds several annotators). The per-case rows are
    gathered across processes, deduplicated by case index (the distributed sampler pads), and kept in
    ``self.results[stage]`` in the ``summary.json`` layout. EMA weights are used for sampling through
    Lightning's ``EMAWeightAveraging`` callback (see ``conf/callbacks``).

    Args:
        denoiser: ``forward(x_t, t, cond)`` with ``cond = denoiser.encode_condition(image)``.
        kernel: a noise kernel (see ``shared/DESIGN.md``).
        sampler: the inference recipe.
        optimizer: a partial optimiser, called with the parameters.
        scheduler: a partial LR scheduler, called with ``(optimizer, total_steps=...)``, or None.
        mask_channels: C, channels of the mask.
        spacing: pixel spacing for HD95, or None for pixels.
        compile: ``torch.compile`` the denoiser (see :class:`SegmentationMethod`).
        channels_last: channels-last weights and images (see :class:`SegmentationMethod`).
    """

    network_attr = "denoiser"

    def __init__(
        self,
        denoiser: nn.Module,
        kernel: nn.Module,
        sampler: DiffusionSampler,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        mask_channels: int = 1,
        spacing: Sequence[float] | None = None,
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__(optimizer, scheduler, mask_channels, spacing, compile, channels_last)
        self.denoiser = denoiser
        self.kernel = kernel
        self.sampler = sampler

    # ----------------------------------------------------------------------------------- training
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """One network pass (image branch included): what each sampling step costs, per image."""
        image = self.to_memory_format(image)
        return self.denoiser(self.to_memory_format(x_t), t, self.denoiser.encode_condition(image))

    def example_input(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_t = torch.zeros(1, self.mask_channels, *image.shape[-2:])
        return x_t, torch.zeros(1, dtype=torch.long), image

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        target = self.training_target(batch).float()
        x0 = self.kernel.encode_mask(target)
        t = self.kernel.sample_timesteps(x0.shape[0], device=x0.device)
        x_t = self.to_memory_format(self.kernel.q_sample(x0, t))
        cond = self.denoiser.encode_condition(self.to_memory_format(batch["image"]))
        losses = self.kernel.loss(self.denoiser(x_t, t, cond).float(), x0, x_t, t)
        auxiliary = getattr(self.denoiser, "auxiliary_loss", None)  # a denoiser's own terms (MedSegDiff-V2)
        if auxiliary is not None:
            extra = auxiliary(cond, target, self.global_step)
            losses = {**losses, **extra, "loss": losses["loss"] + sum(extra.values())}
        self.check_loss(losses["loss"], batch_idx)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=x0.shape[0])
        return losses["loss"]

    # ------------------------------------------------------------------------ sampling and metrics
    def sample(self, image: torch.Tensor, case_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """S samples per image, fused, with uncertainty maps (see :class:`DiffusionSampler`)."""
        image = self.to_memory_format(image)
        return self.sampler.sample(self.denoiser, self.kernel, image, self.mask_channels, case_ids)

    def inference_settings(self) -> dict[str, Any]:
        """The sampler's settings (:meth:`DiffusionSampler.settings`) and the kernel's reverse ``update``."""
        return {**self.sampler.settings(), "update": self.kernel.update_rule}
