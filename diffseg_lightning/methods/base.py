"""The base of every method: :class:`SegmentationMethod` (the evaluation protocol, ``summary.json`` results,
panels, checkpoints, speed options). Each method of ``methods/`` subclasses it."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

import lightning as L
import torch
import torch.distributed as dist
from hydra.errors import HydraException
from hydra.utils import get_class
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf
from torch import nn

from diffseg_lightning.inference.fusion import check_finite_fusion
from diffseg_lightning.inference.sampler import DiffusionSampler
from diffseg_lightning.methods.build import module_from_checkpoint
from diffseg_lightning.metrics.report import case_metrics, summarize
from diffseg_lightning.utils.checkpoints import load_checkpoint
from diffseg_lightning.utils.errors import DiffSegError, NonFiniteLossError
from diffseg_lightning.utils.speed import compile_in_place, count_macs

__all__ = ["SegmentationMethod"]


class SegmentationMethod(L.LightningModule):
    """What every method shares: the training target, the optimiser, the evaluation protocol, checkpoints.

    A subclass implements ``training_step``, :meth:`sample` (one image batch in, the fused mask, its
    probability and uncertainty maps out, as :func:`~diffseg_lightning.inference.sampler.describe_samples`
    returns them) and :meth:`inference_settings` (the ``sampler`` block of ``summary.json``). This class
    then scores validation and test batches with
    :func:`~diffseg_lightning.metrics.report.case_metrics`, gathers the per-case rows across processes,
    deduplicates them by case index (the distributed sampler pads), keeps them in ``self.results[stage]``
    in the ``summary.json`` layout (read by :class:`~diffseg_lightning.callbacks.SummaryJsonWriter`), keeps
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

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]  # Lightning's takes hparams_file / strict instead
        cls,
        checkpoint_path: str | Path,
        sampler: DiffusionSampler | DictConfig | None = None,
        map_location: torch.device | str | None = None,
        **overrides: Any,
    ) -> Self:
        """The trained method of a ``diffseg-train`` checkpoint, as ``diffseg-eval`` rebuilds it.

        Our equivalent of Lightning's ``save_hyperparameters`` + ``load_from_checkpoint``: a method is built
        from objects (a denoiser, a noise kernel, a sampler, partial optimisers) that are not
        hyperparameters, so none are saved; instead every checkpoint stores the run's resolved Hydra config
        (``checkpoint["diffseg_config"]``, see :meth:`on_save_checkpoint`). The module is rebuilt from it by
        :func:`diffseg_lightning.methods.build.module_from_checkpoint` (the stored ``model`` config and kernel, the
        weights checked, then loaded) and holds the checkpoint's ``state_dict``: the EMA weights when the
        run used the EMA callback, exactly the weights evaluation uses. The result works with Lightning's
        own loops (``Trainer.test(model=module, datamodule=...)``).

        Args:
            checkpoint_path: the ``.ckpt`` file.
            sampler: the inference recipe: a :class:`DiffusionSampler`, a ``sampler`` config node, or None
                for the one the run was trained with (its stored ``sampler`` config).
            map_location: device to move the module to (it is read on the CPU), or None to keep it there.
            **overrides: constructor arguments that replace the stored config's (e.g. ``compile=True``).

        Returns:
            The module, an instance of ``cls`` or of a subclass (the stored ``model._target_``).

        Raises:
            DiffSegError: the file is missing, unreadable or not ours (one line), or its method is not
                ``cls`` or a subclass of it.
        """
        checkpoint = load_checkpoint(checkpoint_path)
        config = checkpoint["diffseg_config"]
        target = str((config.get("model") or {}).get("_target_", ""))
        try:
            stored = get_class(target)
        except (HydraException, ImportError, ValueError) as err:
            raise DiffSegError(
                f"checkpoint {checkpoint_path}: its method {target!r} cannot be imported ({err})"
            ) from None
        if not (isinstance(stored, type) and issubclass(stored, cls)):
            name = getattr(stored, "__name__", target)
            raise DiffSegError(
                f"checkpoint {checkpoint_path} holds a {name} ({target}), not a {cls.__name__}: load it with "
                f"{name}.load_from_checkpoint or SegmentationMethod.load_from_checkpoint"
            )
        if sampler is None:
            sampler = OmegaConf.create(config["sampler"])
        module = module_from_checkpoint(checkpoint, sampler, **overrides)
        return module.to(map_location) if map_location is not None else module
