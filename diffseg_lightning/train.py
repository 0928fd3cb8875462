"""``diffseg-train``: fit a method, then test its best checkpoint; everything lands in one run directory."""

from __future__ import annotations

import math
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffseg_lightning.entry import (
    build_all,
    build_module,
    check_resume,
    check_resume_weights,
    load_checkpoint,
    save_config,
)
from diffseg_lightning.exceptions import ConfigError
from diffseg_lightning.utils import CONFIG_DIR, run_cli, user_errors
from diffseg_lightning.validate import validate_config


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit and (optionally) test; returns the trainer's final metrics."""
    validate_config(cfg)  # the whole config, before anything is read, built or written
    L.seed_everything(cfg.seed, workers=True)
    if cfg.sampler.get("parallel", "data") == "sample":
        raise ConfigError(
            "sampler.parallel=sample is for diffseg-eval; validation during training splits the images"
        )
    resume = load_checkpoint(cfg.ckpt_path) if cfg.get("ckpt_path") else None  # fail early, clearly
    if resume is not None:
        check_resume(resume, cfg)  # a changed noise.objective, T or schedule: one line, before the data
    datamodule = instantiate(cfg.data)
    datamodule.setup()  # every split is checked here, before anything is written to the run directory
    module = build_module(cfg.model, cfg.noise, cfg.sampler)
    if resume is not None:
        check_resume_weights(resume, cfg, module)  # another width or method: one line, not a traceback
        del resume  # the trainer reads the checkpoint itself
    save_config(cfg, cfg.paths.output_dir)
    datamodule.save_splits(cfg.paths.output_dir)
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=build_all(cfg.get("callbacks")), logger=build_all(cfg.get("logger")) or False
    )
    # Our checkpoints carry RNG states (numpy) and the config: not loadable with weights_only=True.
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if best and Path(best).is_file():
            # Load the best (EMA) weights ourselves: Lightning's ckpt_path="best" would let the EMA
            # callback, still holding its fit-time state, restore the raw weights instead.
            module.load_state_dict(load_checkpoint(best)["state_dict"])
        trainer.test(module, datamodule=datamodule)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    with user_errors():
        metrics = train(cfg)
    name = cfg.get("optimized_metric")
    value = metrics.get(name) if name else None
    return None if value is None or math.isnan(value) else value


def main() -> None:
    """Console script: run with one-line reports of config errors."""
    run_cli(hydra_main)


if __name__ == "__main__":
    main()
