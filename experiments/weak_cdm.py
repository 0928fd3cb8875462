"""CDM (Hu et al., MICCAI 2023) against Grad-CAM, and CDM's time per image against the full reverse process.

For each dataset (the built-in synthetic data; the real Kvasir-SEG subset as polyp / polyp-free crops):

1. train CDM (``experiment=weak_cdm_<data>``) and the Grad-CAM classifier (``model=gradcam``) for the same
   number of steps on the same image-level labels (masks withheld), and test both on the lesion images
   (Dice, IoU, HD95 of the per-image Otsu mask, from ``summary.json``), plus Dice after the
   largest-connected-component filter;
2. time CDM's saliency (Q = 400, R = 10) against the same saliency over the full reverse process
   (Q = T - 1, R = T single steps, both conditions batched as well) on the first ``--full-images`` test
   images, with the Dice of both on those images.

Also reports the all-foreground mask as the chance level. Writes ``experiments/results/weak_cdm.{json,md,png}``.
Usage: ``experiments/weak_cdm.sh`` (reduced budget, see its header); every setting is a command-line option.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate

from diffseg_lightning.entry import build_module, load_checkpoint
from diffseg_lightning.methods.weak_cdm import min_max_normalize, saliency_outputs
from diffseg_lightning.metrics.report import case_metrics
from diffseg_lightning.train import train
from diffseg_lightning.utils.compose import compose_config

REPO = Path(__file__).resolve().parents[1]
COMMON = [
    "logger=csv",
    "~callbacks.progress_bar",
    "~callbacks.panels",
    "trainer.accelerator=cpu",
    "trainer.enable_model_summary=false",
    "+trainer.limit_val_batches=0",  # no validation: model selection never looks at masks (last checkpoint)
    "trainer.max_epochs=1000",
]


def compose_run(overrides: list[str], out: Path):
    return compose_config("train", overrides, out)


def run(overrides: list[str], out: Path) -> tuple[dict, float, object]:
    shutil.rmtree(out, ignore_errors=True)
    cfg = compose_run(overrides, out)
    start = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - start
    return json.loads((out / "summary.json").read_text()), seconds, cfg


def lcc_dice(module, datamodule) -> float:
    """Mean Dice over the test split with the largest-connected-component filter switched on."""
    module.largest_component = True
    rows = []
    with torch.inference_mode():
        for batch in datamodule.test_dataloader():
            rows += case_metrics(module.sample(batch["image"], batch["index"]), batch, None)
    module.largest_component = False
    return float(np.nanmean([r["dice"] for r in rows]))


def load(cfg, run_dir: Path, **model_overrides):
    model_cfg = cfg.model.copy()
    for key, value in model_overrides.items():
        model_cfg[key] = value
    module = build_module(model_cfg, cfg.noise, cfg.sampler)
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    module.load_state_dict(load_checkpoint(ckpt)["state_dict"])
    return module.eval()


def full_reverse(cfg, run_dir: Path, images: int, full_steps: int | None) -> dict:
    """Seconds per image of the saliency with Q = 400, R = 10 and with Q = T - 1, R = T.

    ``full_steps`` < T runs only the first ``full_steps`` steps of the full chain (Q = T - 1) and extrapolates
    its time linearly to T steps (every step is one pass of the same 2B rows, so the cost per step is
    constant); its Dice is then not reported (the chain is not finished).
    """
    datamodule = instantiate(cfg.data)
    datamodule.setup("test")
    batch = datamodule.collate([datamodule.datasets["test"][i] for i in range(images)], split="test")
    T = int(cfg.noise.num_train_timesteps)
    steps = T if full_steps is None else min(T, full_steps)
    result = {}
    for name, q, r in (("cdm", int(cfg.model.noise_level), int(cfg.model.num_steps)), ("full", T - 1, steps)):
        module = load(cfg, run_dir, noise_level=q, num_steps=r)
        start = time.perf_counter()
        with torch.inference_mode():
            out = saliency_outputs(min_max_normalize(module.saliency(batch["image"], batch["index"])), False)
        seconds = (time.perf_counter() - start) / images
        dice = float(np.nanmean([row["dice"] for row in case_metrics(out, batch, None)]))
        result[name] = {"noise_level": q, "num_steps": r, "seconds_per_image": seconds, "dice": dice}
    full = result["full"]
    full["measured_steps"] = steps
    full["seconds_per_image"] *= T / steps
    if steps < T:
        full["dice"] = None
        full["extrapolated"] = f"timed {steps} of {T} steps, scaled by {T / steps:g}"
    result["speedup"] = full["seconds_per_image"] / result["cdm"]["seconds_per_image"]
    result["images"] = images
    return result


def all_foreground_dice(cfg) -> float:
    """Mean Dice of the trivial mask "everything is lesion" on the test split: the chance level that a
    saliency map without information reaches when Otsu splits it at random."""
    datamodule = instantiate(cfg.data)
    datamodule.setup("test")
    dice = []
    for item in datamodule.datasets["test"]:
        reference = item["mask"]
        dice.append(float(2 * reference.sum() / (reference.sum() + reference.numel())))
    return float(np.mean(dice))


def figure(out: Path, datasets: dict, path: Path, images: int = 4) -> None:
    """Image, reference, CDM saliency and mask, Grad-CAM and mask for the first test images of each dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for name, data in datasets.items():
        maps = {}
        for method, extra in (("cdm", []), ("gradcam", ["model=gradcam"])):
            cfg = compose_run([*data, *COMMON, *extra], out / f"{name}_{method}")
            datamodule = instantiate(cfg.data)
            datamodule.setup("test")
            items = [datamodule.datasets["test"][i] for i in range(images)]
            batch = datamodule.collate(items, split="test")
            with torch.inference_mode():
                maps[method] = load(cfg, out / f"{name}_{method}").sample(batch["image"], batch["index"])
        for i in range(images):
            image = batch["image"][i]
            image = (image - image.amin()) / (image.amax() - image.amin() + 1e-8)
            rows.append((f"{name} {i}", image.permute(1, 2, 0).squeeze(-1), batch["mask"][i, 0], maps, i))
    titles = ["image", "reference", "CDM saliency", "CDM mask", "Grad-CAM", "Grad-CAM mask"]
    fig, axes = plt.subplots(len(rows), 6, figsize=(9, 1.6 * len(rows)), squeeze=False)
    for r, (label, image, reference, maps, i) in enumerate(rows):
        panels = [image, reference]
        for method in ("cdm", "gradcam"):
            panels += [maps[method]["probability"][i, 0], maps[method]["mask"][i, 0]]
        for c, panel in enumerate(panels):
            kwargs = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0} if panel.dim() == 2 else {}
            axes[r, c].imshow(panel.numpy(), **kwargs)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(titles[c], fontsize=8)
        axes[r, 0].set_ylabel(label, fontsize=7)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300, help="training steps of each model")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--num-test", type=int, default=32, help="synthetic test images")
    parser.add_argument("--full-images", type=int, default=2, help="images for the full-reverse timing")
    parser.add_argument("--full-steps", type=int, default=None, help="time this many of the T full steps")
    parser.add_argument("--cdm-lr", type=float, default=1e-3)
    parser.add_argument("--kvasir", default=str(REPO.parent / "shared" / "data" / "kvasir-seg"))
    parser.add_argument("--out", default=str(REPO / "experiments" / "runs" / "weak_cdm"))
    parser.add_argument("--results", default=str(REPO / "experiments" / "results" / "weak_cdm"))
    parser.add_argument("--figure-only", action="store_true", help="only redraw the figure from --out's runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    datasets = {
        "synthetic": [
            "experiment=weak_cdm_synthetic",
            f"data.size={args.size}",
            f"data.num_test={args.num_test}",
        ],
    }
    if Path(args.kvasir).is_dir():
        datasets["kvasir"] = [
            "experiment=weak_cdm_kvasir",
            f"data.root={args.kvasir}",
            f"data.size={args.size}",
            f"data.context={2 * args.size}",
        ]
    else:
        print(f"Kvasir subset {args.kvasir} absent: synthetic data only", file=sys.stderr)
    if args.figure_only:
        results_path = Path(args.results)
        record = json.loads(results_path.with_suffix(".json").read_text())
        for name, data in datasets.items():
            cfg = compose_run([*data, *COMMON], out / f"{name}_cdm")
            record["results"][name]["all_foreground_dice"] = all_foreground_dice(cfg)
        results_path.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str))
        results_path.with_suffix(".md").write_text(markdown(record))
        figure(out, datasets, results_path)
        return
    budget = [f"+trainer.max_steps={args.steps}", "data.batch_size=16", "data.eval_batch_size=16"]
    results: dict = {}
    for name, data in datasets.items():
        rows = {}
        for method, extra in (("cdm", [f"model.optimizer.lr={args.cdm_lr}"]), ("gradcam", ["model=gradcam"])):
            summary, seconds, cfg = run([*data, *COMMON, *budget, *extra], out / f"{name}_{method}")
            datamodule = instantiate(cfg.data)
            datamodule.setup("test")
            module = load(cfg, out / f"{name}_{method}")
            rows[method] = {
                "dice": summary["mean"]["dice"],
                "iou": summary["mean"]["iou"],
                "hd95": summary["mean"]["hd95"],
                "dice_lcc": lcc_dice(module, datamodule),
                "seconds_per_image": summary["seconds_per_image"],
                "train_seconds": seconds,
                "test_cases": summary["num_cases"],
                "parameters": summary["network"]["parameters"] if summary.get("network") else None,
                "sampler": summary["sampler"],
            }
            if method == "cdm":
                rows["full_reverse"] = full_reverse(
                    cfg, out / f"{name}_{method}", args.full_images, args.full_steps
                )
                train_set = instantiate(cfg.data.train)()
                rows["train_cases"] = len(train_set)
                rows["all_foreground_dice"] = all_foreground_dice(cfg)
        results[name] = rows
        print(json.dumps({name: rows}, indent=1, default=str))
    record = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), "
        f"shared 2-core CPU",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": "experiments/weak_cdm.sh  (python experiments/weak_cdm.py " + " ".join(sys.argv[1:]) + ")",
        "settings": vars(args),
        "results": results,
    }
    results_path = Path(args.results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str))
    results_path.with_suffix(".md").write_text(markdown(record))
    figure(out, datasets, results_path)


def markdown(record: dict) -> str:
    s = record["settings"]
    lines = [
        "# CDM (Hu et al., MICCAI 2023) against Grad-CAM, weakly supervised (image-level labels only)",
        "",
        f"Command: `{record['command']}`. Machine: {record['machine']}; torch {record['torch']}, "
        f"Python {record['python']}.",
        "",
        f"REDUCED budget: {s['steps']} training steps of batch 16 per model (CDM AdamW lr {s['cdm_lr']}, "
        f"Grad-CAM classifier AdamW 1e-3), {s['size']} px, no validation (the last checkpoint, EMA weights, is "
        "tested: model selection never sees a mask). CDM: T = 4000 cosine, epsilon, DDIM eta 0, Q = 400, "
        "R = 10, tau = 0.95, Otsu per image. Grad-CAM: MONAI ResNet-10 (16-128 channels), CAM of layer4, "
        "same Otsu post-processing. Test: lesion images only (the paper's protocol); Dice NaN-free here "
        "because every test image has a lesion. A full run would train each model for tens of thousands of "
        "steps on a GPU at 64-128 px (the release: 128-192 channels, batch 4, lr 1e-4) and test all images.",
        "",
        "| data | method | train cases | test cases | Dice | Dice (largest component) | IoU | HD95 (px) "
        "| s / image | training s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for data, rows in record["results"].items():
        for method in ("cdm", "gradcam"):
            r = rows[method]
            lines.append(
                f"| {data} | {'CDM' if method == 'cdm' else 'Grad-CAM'} | {rows['train_cases']} | "
                f"{r['test_cases']} | {r['dice']:.3f} | {r['dice_lcc']:.3f} | {r['iou']:.3f} | "
                f"{r['hd95']:.1f} | {r['seconds_per_image']:.4f} | {r['train_seconds']:.0f} |"
            )
        if "all_foreground_dice" in rows:
            lines.append(
                f"| {data} | all-foreground mask (chance level) | - | {rows['cdm']['test_cases']} | "
                f"{rows['all_foreground_dice']:.3f} | - | - | - | - | - |"
            )
    lines += [
        "",
        "Time per image: CDM's saliency (Q = 400, R = 10) against the same saliency over the full reverse "
        "process (Q = T - 1 = 3999, R = T = 4000 single DDIM steps, both conditions batched in each pass), "
        "same trained network, on the first test images"
        + (
            f"; the full chain's time is extrapolated from its first {s['full_steps']} steps (constant cost per "
            "step: one pass of the same rows), so its Dice is not reported:"
            if s["full_steps"]
            else ":"
        ),
        "",
        "| data | images | CDM s / image | full reverse s / image | speed-up | CDM Dice | full reverse Dice |",
        "|---|---|---|---|---|---|---|",
    ]
    for data, rows in record["results"].items():
        f = rows["full_reverse"]
        full_dice = "n/a (chain not finished)" if f["full"]["dice"] is None else f"{f['full']['dice']:.3f}"
        lines.append(
            f"| {data} | {f['images']} | {f['cdm']['seconds_per_image']:.3f} | "
            f"{f['full']['seconds_per_image']:.2f} | {f['speedup']:.0f}x | {f['cdm']['dice']:.3f} | "
            f"{full_dice} |"
        )
    lines += ["", "Against the chance level (the all-foreground mask; see weak_cdm.png for the maps):", ""]
    for data, rows in record["results"].items():
        if "all_foreground_dice" not in rows:
            continue
        chance = rows["all_foreground_dice"]
        verdicts = [
            f"{label} {rows[m]['dice']:.3f} is {'above' if rows[m]['dice'] > chance else 'NOT above'} it"
            for m, label in (("cdm", "CDM"), ("gradcam", "Grad-CAM"))
        ]
        lines.append(f"- {data}: chance {chance:.3f}; " + "; ".join(verdicts) + ".")
    lines += [
        "",
        "Kvasir: the real subset (300 images, seeded 0.8 / 0.1 / 0.1 split) as crops "
        f"({s['size']} px windows of the image resized to {2 * s['size']} px): label 1 = the window centred "
        "on the polyp, label 0 = a window without any polyp pixel (images without one give no negative); "
        "test = the positive crops of the test images. Negatives come more often from the image border.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
