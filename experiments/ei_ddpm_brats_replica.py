"""EI-DDPM against a single DDPM and against averaging the four paths, on a synthetic BraTS-layout replica.

NOT BraTS: the volumes are synthetic four-modality tumours
(:class:`diffseg_lightning.data.synthetic_multimodal.SyntheticMultiModal`) written in the BraTS 2021 layout,
so that the whole BraTS path (``data=brats``: NIfTI reading, label mapping, brain z-score, split by patient)
is exercised end to end by the three runs of ``experiments/ei_ddpm.py``. The replica:

- ``--patients`` case folders ``BraTS2021_XXXXX`` (ids 0, 2, 4, ...: with gaps, as released), each holding
  ``BraTS2021_XXXXX_{t1,t1ce,t2,flair,seg}.nii.gz``, shape (H, W, D) = (size, size, ``--slices``), 1 mm;
- axial slice k of patient p is generated case ``p * slices + k`` of one ``SyntheticMultiModal`` stream
  (split ``train``, seed ``--seed``): the slices of a volume are independent 2-D cases, not a coherent
  3-D tumour;
- images: each modality's (per case z-scored) channel + 8, times 100, int16, clipped to >= 1, so every
  voxel is brain (> 0) and the loader's 3-D brain z-score gives back the generator's image up to the
  0.01 quantisation (there is no background);
- seg (uint8): the nested generator regions mapped back to the BraTS 2021 labels: ET -> 4, TC \\ ET -> 1
  (NCR), WT \\ TC -> 2 (ED), 0 elsewhere; the loader's ``target=regions`` gives back (WT, TC, ET) exactly;
- the generator's one-modality corruption (``--corrupt``, ``--corrupt-modality``, default: FLAIR's lesion
  signal missing), in every slice of every patient.

Runs (the same replica, seed, budget, sampler, U-Net width and learning rate):

- ``ei_ddpm``: ``experiment=ei_ddpm_brats data.root=<replica>`` (four paths, EIL, contextual discounting,
  Dempster), reduced as ``experiment=ei_ddpm_synthetic`` is (base 16, mults 1-2, no attention, lr 2e-3,
  reliability lr 5e-2, KL annealed over the run's epochs);
- ``average``: the same with ``model.fusion=average`` (no evidence);
- ``single_ddpm``: ``data=brats data.target=regions data.mask_channels=3 model=medsegdiff`` (one U-Net on
  the 4 stacked modalities, 3 sigmoid region channels), x_0 prediction.

Scoring is ``experiments/ei_ddpm.py``'s (imported): the test split sampled once with the final weights,
Dice and HD95 (px = mm here) per region (WT, TC, ET), nan-mean over slices.

    nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python experiments/ei_ddpm_brats_replica.py

Writes the replica under ``--work`` (default experiments/runs/ei_ddpm_brats_replica/data), the runs beside
it, and experiments/results/ei_ddpm_brats_replica.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from diffseg_lightning.data.synthetic_multimodal import MODALITIES, SyntheticMultiModal
from diffseg_lightning.entry import build_module
from diffseg_lightning.train import train
from diffseg_lightning.utils.compose import compose_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ei_ddpm import result_tables, score  # noqa: E402  (experiments/ei_ddpm.py: the synthetic comparison)

REPO = Path(__file__).resolve().parents[1]
NCR, ED, ET = 1, 2, 4  # BraTS 2021 labels
OFFSET, SCALE = 8.0, 100.0  # stored voxel = round((z + OFFSET) * SCALE), >= 1


def regions_to_labels(regions: np.ndarray) -> np.ndarray:
    """(3, H, W) nested {0, 1} (WT, TC, ET) -> (H, W) BraTS 2021 labels (ED 2, NCR 1, ET 4)."""
    wt, tc, et = (regions > 0.5).astype(bool)
    labels = np.zeros(wt.shape, np.uint8)
    labels[wt] = ED
    labels[tc] = NCR
    labels[et] = ET
    return labels


def save(path: Path, array: np.ndarray) -> None:
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # 1 mm, the release's LPS-like flip
    nib.save(nib.Nifti1Image(array, affine), path)


def write_replica(root: Path, args: argparse.Namespace) -> dict:
    """The BraTS 2021 layout replica (see the module docstring); returns its description."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    source = SyntheticMultiModal(
        num_cases=args.patients * args.slices,
        size=args.size,
        split="train",
        seed=args.seed,
        corrupt=args.corrupt,
        corrupt_modality=args.corrupt_modality,
    )
    counts = np.zeros(5, np.int64)
    corrupted = 0
    for p in range(args.patients):
        name = f"BraTS2021_{2 * p:05d}"
        folder = root / name
        folder.mkdir()
        images = np.zeros((len(MODALITIES), args.size, args.size, args.slices), np.float32)
        seg = np.zeros((args.size, args.size, args.slices), np.uint8)
        for k in range(args.slices):
            item = source[p * args.slices + k]
            images[..., k] = item["image"].numpy()  # channels in MODALITIES order (the default)
            seg[..., k] = regions_to_labels(item["mask"].numpy())
            corrupted += int(item["corrupted"])
        stored = np.clip(np.round((images + OFFSET) * SCALE), 1, np.iinfo(np.int16).max).astype(np.int16)
        for c, modality in enumerate(MODALITIES):
            save(folder / f"{name}_{modality}.nii.gz", stored[c])
        save(folder / f"{name}_seg.nii.gz", seg)
        counts += np.bincount(seg.ravel(), minlength=5)
    total = counts.sum()
    return {
        "root": str(root),
        "layout": "BraTS 2021 (BraTS2021_XXXXX/BraTS2021_XXXXX_{t1,t1ce,t2,flair,seg}.nii.gz)",
        "patients": args.patients,
        "slices_per_patient": args.slices,
        "shape": [args.size, args.size, args.slices],
        "source": f"SyntheticMultiModal(split='train', seed={args.seed}, size={args.size}, "
        f"corrupt={args.corrupt!r}, corrupt_modality={args.corrupt_modality!r}); slice k of patient p = "
        "case p * slices + k",
        "corrupt": args.corrupt,
        "corrupt_modality": args.corrupt_modality,
        "corrupted_slices": corrupted,
        "image_storage": f"int16, round((z + {OFFSET}) * {SCALE}), clipped to >= 1 (all voxels brain)",
        "labels": "ET -> 4, TC minus ET -> 1 (NCR), WT minus TC -> 2 (ED), 0 background; seg uint8",
        "voxel_share": {
            "background": float(counts[0] / total),
            "NCR": float(counts[NCR] / total),
            "ED": float(counts[ED] / total),
            "ET": float(counts[ET] / total),
        },
    }


def runs(args: argparse.Namespace, root: Path) -> dict[str, list[str]]:
    data = [
        f"data.root={root}",
        "data.crop=null",
        f"data.size={args.size}",  # = the stored size: no resampling
        "data.batch_size=16",
        "data.eval_batch_size=16",
        "data.num_workers=0",
        f"data.fractions={args.fractions}",
    ]
    small = [  # the reduced paths / U-Net of experiment=ei_ddpm_synthetic
        "model.denoiser.base_channels=16",
        "model.denoiser.channel_mults=[1,2]",
        "model.denoiser.attention_levels=[false,false]",
        f"model.denoiser.ff_parser_size={args.size}",
        "model.optimizer.lr=2.0e-3",
    ]
    shared = [
        f"sampler.num_steps={args.steps}",
        f"sampler.num_samples={args.samples}",
        f"trainer.max_epochs={args.epochs}",
        f"trainer.check_val_every_n_epoch={args.epochs}",  # validate once, at the end
        "test=false",
        "logger=csv",
        "~callbacks.progress_bar",
        "trainer.enable_model_summary=false",
    ]
    ei = ["experiment=ei_ddpm_brats", *data, *small, f"model.anneal_epochs={args.epochs}"]
    ei += ["model.reliability_lr=5.0e-2"]
    return {
        "ei_ddpm": [*ei, *shared],
        "average": [*ei, "model.fusion=average", *shared],
        "single_ddpm": [
            "data=brats",
            "data.target=regions",
            "data.mask_channels=3",
            "data.channels=4",
            "model=medsegdiff",
            "noise.objective=x0",
            *data,
            *small,
            *shared,
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=80)
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=7, help="seed of the replica's generator")
    parser.add_argument("--corrupt", default="missing", choices=["missing", "noise", "none"])
    parser.add_argument("--corrupt-modality", default="flair", choices=list(MODALITIES))
    parser.add_argument("--fractions", default="[0.7,0.1,0.2]")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None, help="a subset of the runs")
    parser.add_argument("--work", default="experiments/runs/ei_ddpm_brats_replica")
    parser.add_argument("--out", default="experiments/results/ei_ddpm_brats_replica")
    args = parser.parse_args()
    if args.corrupt == "none":
        args.corrupt = None
    torch.set_num_threads(1)
    start = time.perf_counter()
    work = (REPO / args.work).resolve()
    root = work / "data"
    replica = write_replica(root, args)
    replica["write_seconds"] = time.perf_counter() - start
    print("replica", json.dumps(replica), flush=True)
    results = {}
    for name, overrides in runs(args, root).items():
        if args.only and name not in args.only:
            continue
        out_dir = work / name
        if out_dir.exists():
            shutil.rmtree(out_dir)
        cfg = compose_config("train", overrides, out_dir)
        t0 = time.perf_counter()
        train(cfg)
        train_seconds = time.perf_counter() - t0
        splits = (
            json.loads((out_dir / "splits.json").read_text()) if (out_dir / "splits.json").is_file() else {}
        )
        ckpt = torch.load(out_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        module = build_module(cfg.model, cfg.noise, cfg.sampler)
        module.load_state_dict(ckpt["state_dict"])
        row = score(module, cfg)
        row.update(
            {
                "train_seconds": train_seconds,
                "optimizer_steps": int(ckpt.get("global_step", 0)),
                "overrides": overrides,
                "parameters": sum(p.numel() for p in module.parameters()),
                "split_sizes": {
                    k: {"slices": v["items"], "patients": len({c.split("#")[0] for c in v["cases"]})}
                    for k, v in splits.items()
                },
            }
        )
        if hasattr(module, "reliability_table"):
            row["reliability"] = module.reliability_table()
        results[name] = row
        print(name, json.dumps(row["mean"]), flush=True)
    write(results, replica, args, time.perf_counter() - start)


def write(results: dict, replica: dict, args: argparse.Namespace, wall: float) -> None:
    meta = {
        "machine": f"{platform.node()} ({platform.processor() or platform.machine()}), "
        f"{torch.get_num_threads()} torch thread(s), {os.cpu_count()} CPU cores (shared), nice {os.nice(0)}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": vars(args),
        "wall_seconds": wall,
        "data": "SYNTHETIC data written in the BraTS 2021 layout; NOT BraTS",
    }
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "replica": replica, "runs": results}, indent=2)
    )
    first = next(iter(results.values()), {})
    steps = first.get("optimizer_steps", 0)
    corrupted = replica["corrupt_modality"] if replica["corrupt"] else "none"
    split = first.get("split_sizes", {})
    sizes = " / ".join(f"{v['slices']} ({v['patients']} patients)" for v in split.values()) or "?"
    lines = [
        "# EI-DDPM on a synthetic BraTS-layout replica (reduced budget) - NOT BraTS",
        "",
        "**The data is synthetic**: `SyntheticMultiModal` four-modality tumours written as NIfTI volumes in the "
        "BraTS 2021 layout and read by the BraTS loader (`data=brats`, `data.target=regions`). It tests the "
        "BraTS pipeline end to end; the scores say nothing about BraTS itself.",
        "",
        f"Machine: {meta['machine']}; torch {meta['torch']}; command: `{meta['command']}`; total wall time "
        f"(replica + 3 trainings + scoring): {wall:.0f} s.",
        "",
        f"Replica: {replica['patients']} patients `BraTS2021_XXXXX` (ids 0, 2, 4, ...), each "
        f"{replica['shape'][0]} x {replica['shape'][1]} px x {replica['slices_per_patient']} axial slices "
        "(1 mm); slice k of patient p is the generator's case p x slices + k "
        f"(`{replica['source']}`), so the slices of a volume are independent 2-D cases. Images "
        f"{replica['image_storage']}; seg: {replica['labels']}. Corrupted modality: **{corrupted}** "
        f"(`corrupt={replica['corrupt']}`: "
        + (
            "its lesion signal removed, texture and noise only"
            if replica["corrupt"] == "missing"
            else "white noise added"
            if replica["corrupt"] == "noise"
            else "none"
        )
        + f"; {replica['corrupted_slices']} of {replica['patients'] * replica['slices_per_patient']} slices). "
        "Voxel shares: " + ", ".join(f"{k} {v:.3f}" for k, v in replica["voxel_share"].items()) + ".",
        "",
        f"Budget (the same for the three runs): split by patient {args.fractions} "
        f"(train / val / test: {sizes} slices), {args.epochs} epochs of batch 16 "
        f"({steps} optimiser steps), no crop, {args.size} px; validation once at the end; test: the whole "
        f"test split ({first.get('num_cases', 0)} slices), DDIM {args.steps} steps, S = {args.samples}, mean "
        "fusion, threshold 0.5; seed 42. Dice: NaN when both masks are empty, nan-mean over slices; HD95 in "
        "pixels (= mm).",
        "",
    ]
    lines += result_tables(results)
    lines += [
        "",
        "Runs: `ei_ddpm` = `experiment=ei_ddpm_brats data.root=<replica>` with the reduced paths of "
        "`experiment=ei_ddpm_synthetic` (MedSegDiff U-Nets, base 16, mults 1-2, no attention, lr 2e-3, "
        f"reliability lr 5e-2, KL annealed over {args.epochs} epochs; EIL + contextual discounting + "
        "Dempster); `average` = the same with `model.fusion=average` (the paths' softmax averaged, no "
        "evidence); `single_ddpm` = `data=brats data.target=regions data.mask_channels=3 model=medsegdiff "
        "noise.objective=x0`, one U-Net of the same width on the four stacked modalities, 3 sigmoid region "
        "channels. The exact overrides are in the JSON.",
        "",
        "This is a REDUCED budget fitted to ~15 minutes on a shared 2-core CPU (short training, few sampling "
        "steps and samples), so the differences are indicative only; the paper's setting "
        "(`experiment=ei_ddpm_brats` as configured: 224 px, 20 epochs, 25 DDIM steps, S = 5) needs real "
        "BraTS 2021 data and a GPU.",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
