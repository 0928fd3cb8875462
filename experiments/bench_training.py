"""Training throughput of every model of the zoo: images per second, and the share of each step spent waiting
for data, with the array cache on and off and 0 or 2 loader workers.

For each model config (``conf/model/<name>.yaml`` at its written widths), on the real Kvasir-SEG subset at
``--size`` px (the JPEG decode and antialiased resize are the loader's real work; ``--synthetic`` uses the
built-in generator instead, which has no files to cache), a Lightning ``Trainer.fit`` runs ``--warmup`` +
``--steps`` optimiser steps of batch ``--batch`` with validation and checkpoints off. A callback timestamps
every step: ``wait`` is the time from the end of one step to the start of the next (the loader's
``next()``, plus Lightning's bookkeeping), ``step`` the forward, backward and optimiser update. Only the
steps after the warm-up are counted:

    images / s = batch x steps / sum(wait + step),   data-wait share = sum(wait) / sum(wait + step).

The cache (``data.cache_dir``) is built once before the timed runs (its cost is in
``experiments/results/loader_throughput.md``).

Usage:
    python experiments/bench_training.py [--models medsegdiff unet ...] [--size 128] [--batch 8]
        [--steps 10] [--warmup 3] [--workers 0 2] [--cache off on] [--device cpu|cuda] [--out ...] [overrides]
Writes experiments/results/bench_training.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate

from diffseg_lightning.entry import build_module
from diffseg_lightning.utils.compose import compose_config

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
MODELS = ("medsegdiff", "medsegdiff_v2", "dtunet", "mbdiff", "berdiff", "unet")
NOISE = {"berdiff": "bernoulli"}  # every other model with the Gaussian kernel


class StepTimer(L.Callback):
    """Wall-clock timestamps of every training step's start and end (the batch is already fetched at start)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module)
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        self.ends.append(time.perf_counter())


def compose_run(model: str, overrides: list[str]):
    return compose_config("train", [f"model={model}", f"noise={NOISE.get(model, 'gaussian')}", *overrides])


def data_overrides(args: argparse.Namespace, workers: int, cache_dir: str | None) -> list[str]:
    common = [f"data.size={args.size}", f"data.batch_size={args.batch}", f"data.num_workers={workers}"]
    if args.synthetic:
        return [*common, f"data.num_train={args.batch * (args.steps + args.warmup + 1)}"]
    return [
        "data=kvasir",
        f"data.root={args.root}",
        *common,
        f"data.cache_dir={cache_dir if cache_dir else 'null'}",
        "data.check=false",  # the check pass is timed in loader_throughput, not here
    ]


def time_training(cfg, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg.model, cfg.noise, cfg.sampler)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator=args.device,
        devices=1,
        max_steps=args.warmup + args.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        precision=args.precision,
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=datamodule)
    first = args.warmup
    waits = [timer.starts[i] - timer.ends[i - 1] for i in range(first, len(timer.starts))]
    steps = [timer.ends[i] - timer.starts[i] for i in range(first, len(timer.starts))]
    total = sum(waits) + sum(steps)
    return {
        "images_per_second": args.batch * len(steps) / total,
        "data_wait_share": sum(waits) / total,
        "seconds_per_step": total / len(steps),
        "timed_steps": len(steps),
        "parameters": sum(p.numel() for p in module.parameters()),
        "macs_per_pass": (module.network_cost or {}).get("macs_per_pass"),
    }


def build_cache(args: argparse.Namespace, cache_dir: str) -> float:
    """Build the array cache of the train split once (not timed in the runs); returns its seconds."""
    cfg = compose_run(MODELS[0], [*data_overrides(args, 0, cache_dir), *args.overrides])
    start = time.perf_counter()
    instantiate(cfg.data).setup("fit")
    return time.perf_counter() - start


def markdown(result: dict) -> str:
    lines = [
        f"# Training throughput at {result['size']} px, batch {result['batch']}",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {result['machine']}. Data: {result['data']}. {result['steps']} timed steps after "
        f"{result['warmup']} warm-up steps per run; widths as in `conf/model/<name>.yaml`; precision "
        f"{result['precision']}. Run took {result['seconds']:.0f} s.",
        "",
        "| model | parameters | GMACs / pass | cache | workers | images / s | s / step | data wait |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        macs = row["macs_per_pass"]
        lines.append(
            f"| {row['model']} | {row['parameters'] / 1e6:.2f} M | "
            f"{'n/a' if macs is None else f'{macs / 1e9:.2f}'} | {row['cache']} | {row['workers']} | "
            f"{row['images_per_second']:.2f} | {row['seconds_per_step']:.3f} | {100 * row['data_wait_share']:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--cache", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "kvasir-seg"))
    parser.add_argument("--synthetic", action="store_true", help="built-in synthetic data (no cache)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--out", default=str(RESULTS / "bench_training"))
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for every run (e.g. widths)")
    args = parser.parse_args()
    if not args.synthetic and not Path(args.root).is_dir():
        sys.exit(f"error: {args.root} is not a folder: give --root (Kvasir-SEG) or --synthetic")
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = str(Path(tmp) / "cache")
        caches = ["off"] if args.synthetic else args.cache
        cache_seconds = build_cache(args, cache_dir) if "on" in caches else None
        for model in args.models:
            for cache in caches:
                for workers in args.workers:
                    cfg = compose_run(
                        model, data_overrides(args, workers, cache_dir if cache == "on" else None)
                    )
                    row = {"model": model, "cache": cache, "workers": workers, **time_training(cfg, args)}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    result = {
        "command": "python experiments/bench_training.py " + shlex.join(sys.argv[1:]),
        "machine": f"{platform.platform()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else " (no GPU was available)"),
        "data": "built-in synthetic" if args.synthetic else f"Kvasir-SEG subset ({args.root}), train split",
        "size": args.size,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "precision": args.precision,
        "cache_build_seconds": cache_seconds,
        "seconds": time.perf_counter() - start,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
