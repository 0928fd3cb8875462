"""Loader throughput: images per second at 128 px for full-resolution ISIC-sized JPEGs, with and without the cache.

Writes an ISIC 2018 replica (``ISIC2018_Task1-2_Training_Input/ISIC_<id>.jpg`` at full resolution, with
``ISIC2018_Task1_Training_GroundTruth/ISIC_<id>_segmentation.png`` 0/255 masks) to a temporary folder, then
times one pass over it through the project's DataModule and DataLoader, for:

- ``full decode``: the ISIC loader with libjpeg's reduced-scale decoding turned off (decode every pixel,
  then the shared antialiased resize): what a plain PIL loader does;
- ``draft decode``: the ISIC loader as shipped (``Image.draft``: libjpeg decodes at 1/2, 1/4 or 1/8 scale);
- ``cache build``: the first pass with ``data.cache_dir`` (decode, check, write the memory-mapped arrays);
- ``cached epoch``: a later epoch, read from the memory maps (no decoding).

Usage:
    python experiments/bench_loader.py [--images 32] [--height 3000] [--width 4000] [--size 128]
Writes experiments/results/loader_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffseg_lightning.data import SegmentationDataModule
from diffseg_lightning.data import isic as isic_module
from diffseg_lightning.data.isic import ISIC

RESULTS = Path(__file__).resolve().parent / "results"


def write_replica(root: Path, count: int, height: int, width: int) -> None:
    """``count`` dermoscopy-like JPEGs (smooth skin, a darker lesion, sensor noise; quality 90) and masks."""
    images = root / "ISIC2018_Task1-2_Training_Input"
    masks = root / "ISIC2018_Task1_Training_GroundTruth"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for k in range(count):
        cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
        ry, rx = rng.uniform(0.1, 0.3) * height, rng.uniform(0.1, 0.3) * width
        lesion = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        skin = 190 + 30 * np.sin(xx / width * 3 + k) * np.cos(yy / height * 2)
        grey = np.where(lesion, skin - 90, skin) + rng.normal(0, 6, (height, width))
        rgb = np.stack([grey, grey * 0.8, grey * 0.7], -1).clip(0, 255).astype(np.uint8)
        name = f"ISIC_{k:07d}"
        Image.fromarray(rgb).save(images / f"{name}.jpg", quality=90)
        Image.fromarray((lesion * 255).astype(np.uint8)).save(masks / f"{name}_segmentation.png")


SHIPPED_READ_JPEG = isic_module.read_jpeg


def full_decode(path, size):
    """``read_jpeg`` without the reduced-scale decode: every pixel is decoded."""
    return SHIPPED_READ_JPEG(path, None)


def one_pass(module: SegmentationDataModule, workers: int) -> float:
    """Seconds for one pass over the train split through a DataLoader."""
    module.num_workers = workers
    start = time.perf_counter()
    for _ in module.train_dataloader():
        pass
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)  # the DataLoader's workers are the parallelism
    work = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        write_replica(work / "isic", args.images, args.height, args.width)
        factory = partial(
            ISIC, root=work / "isic", split="train", year=2018, size=args.size, val_fraction=0.0
        )
        rows = []

        def record(name: str, workers: int, seconds: float) -> None:
            rows.append(
                {"path": name, "workers": workers, "seconds": seconds, "images_per_s": args.images / seconds}
            )
            print(f"{name:>14} workers={workers}: {args.images / seconds:8.1f} images/s", flush=True)

        plain = SegmentationDataModule(train=factory, channels=3, batch_size=8, check=False)
        plain.setup("fit")
        isic_module.read_jpeg = full_decode  # forked DataLoader workers inherit the patch
        try:
            for workers in (0, 2):
                record("full decode", workers, one_pass(plain, workers))
        finally:
            isic_module.read_jpeg = SHIPPED_READ_JPEG
        for workers in (0, 2):
            record("draft decode", workers, one_pass(plain, workers))
        cached = SegmentationDataModule(
            train=factory, channels=3, batch_size=8, cache_dir=str(work / "cache")
        )
        start = time.perf_counter()
        cached.setup("fit")  # the check pass decodes every item once and writes the memory maps
        record("cache build", 0, time.perf_counter() - start)
        for workers in (0, 2):
            record("cached epoch", workers, one_pass(cached, workers))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "images": args.images,
        "stored_size": [args.height, args.width],
        "output_size": args.size,
        "rows": rows,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.processor() or 'cpu'}",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": "python " + " ".join(sys.argv),
    }


def table(result: dict) -> str:
    full = next(r["images_per_s"] for r in result["rows"] if r["path"] == "full decode" and r["workers"] == 0)
    lines = [
        f"ISIC-sized JPEGs ({result['stored_size'][0]}x{result['stored_size'][1]}, {result['images']} images) "
        f"to {result['output_size']} px; {result['machine']}; torch {result['torch']}.",
        f"Command: `{result['command']}`",
        "",
        "| path | DataLoader workers | images/s | vs full decode, 0 workers |",
        "|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['path']} | {r['workers']} | {r['images_per_s']:.1f} | {r['images_per_s'] / full:.1f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS / "loader_throughput")
    args = parser.parse_args()
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(table(result))
    print(table(result))


if __name__ == "__main__":
    main()
