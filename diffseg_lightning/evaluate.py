"""``diffseg-eval ckpt_path=...``: sample, fuse and score a split with a trained checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from rich.table import Table

from diffseg_lightning.callbacks import SummaryJsonWriter
from diffseg_lightning.entry import build_all, load_checkpoint, module_from_checkpoint, save_config
from diffseg_lightning.exceptions import ConfigError
from diffseg_lightning.utils import CONFIG_DIR, DiffSegError, run_cli, user_errors
from diffseg_lightning.validate import check_inference, validate_config

SPLITS = ("test", "val")


def evaluate(cfg: DictConfig) -> dict:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.split`` of the checkpoint's data (or of ``data=...``)."""
    validate_config(cfg)  # the whole config, before anything is read or written
    if cfg.split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {cfg.split!r}")
    L.seed_everything(cfg.seed, workers=True)
    checkpoint = load_checkpoint(cfg.ckpt_path)
    check_inference(cfg, checkpoint["diffseg_config"])  # the sampler against the trained kernel
    save_config(cfg, cfg.paths.output_dir)
    data_cfg = (
        cfg.data if cfg.get("data") is not None else OmegaConf.create(checkpoint["diffseg_config"]["data"])
    )
    if cfg.split != "test":
        data_cfg = data_cfg.copy()
        with open_dict(data_cfg):
            data_cfg.test = data_cfg[cfg.split]
    if data_cfg.get("test") is None:
        raise DiffSegError(f"the data config has no {cfg.split} split to evaluate")
    datamodule = instantiate(data_cfg)
    module = module_from_checkpoint(checkpoint, cfg.sampler)
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        # sample-parallel: every process sees every image and draws its share of the S samples
        use_distributed_sampler=cfg.sampler.get("parallel", "data") != "sample",
        callbacks=[SummaryJsonWriter(cfg.paths.output_dir, split=cfg.split)],
        logger=build_all(cfg.get("logger")) or False,
    )
    trainer.test(module, datamodule=datamodule)
    summary_path = Path(cfg.paths.output_dir) / "summary.json"
    if trainer.is_global_zero and summary_path.is_file():  # under ddp_spawn the results live in the workers
        print_summary(json.loads(summary_path.read_text()), str(summary_path))
    return module.results.get("test", {})


def print_summary(summary: dict, title: str) -> None:
    """A rich table of the mean of every metric with its bootstrap 95% interval."""
    table = Table(title=title, caption=f"{summary['num_cases']} cases, sampler {summary['sampler']}")
    for column in ("metric", "mean", "95% interval"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name, mean in summary["mean"].items():
        low, high = summary.get("ci95", {}).get(name) or (None, None)
        interval = "n/a" if low is None else f"[{low:.4f}, {high:.4f}]"
        table.add_row(name, "n/a" if mean is None else f"{mean:.4f}", interval)
    Console().print(table)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def hydra_main(cfg: DictConfig) -> None:
    with user_errors():
        evaluate(cfg)


def main() -> None:
    """Console script: run with one-line reports of config errors."""
    run_cli(hydra_main)


if __name__ == "__main__":
    main()
