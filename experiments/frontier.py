"""The quality-speed frontier of one trained model: Dice (and GED) against sampling steps and seconds per image,
for every reverse update (DDIM, ancestral DDPM, DPM-Solver++(2M)).

Reads the ``summary.json`` files of a ``diffseg-eval -m sampler=ddim,ddpm,dpmpp_2m sampler.num_steps=...`` sweep and
writes ``<out>.md`` (one table row per update and step count; per update, the smallest step count whose Dice
reaches that update's Dice at the largest step count to within ``--tolerance``: Dice >= reference - tolerance,
so a step count that does better than the reference counts too), ``<out>.json`` and ``<out>.png``.

Usage:
    python experiments/frontier.py <sweep dir> --out experiments/results/<name> [--title ...] [--command ...]
"""

from __future__ import annotations

import argparse
import json
import platform
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from compare import find_summaries, load_row  # noqa: E402

UPDATES = {"ddim": "DDIM (eta 0)", "ddpm": "ancestral DDPM", "dpmpp_2m": "DPM-Solver++(2M)"}


def frontier(rows: list[dict], tolerance: float) -> dict:
    """Group rows by update; per update the points sorted by steps and the smallest step count whose Dice
    reaches the Dice at the update's largest step count (the reference) to within ``tolerance`` (one-sided:
    Dice >= reference - tolerance)."""
    by_update: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_update[row["sampler"]["update"]].append(row)
    result = {}
    for update, points in by_update.items():
        points.sort(key=lambda r: r["sampler"]["num_steps"])
        reference = points[-1]
        ref_dice = reference["mean"]["dice"]
        within = [p for p in points if p["mean"]["dice"] >= ref_dice - tolerance]
        result[update] = {
            "points": [
                {
                    "num_steps": p["sampler"]["num_steps"],
                    "dice": p["mean"]["dice"],
                    "dice_ci95": p["ci95"].get("dice"),
                    "ged": p["mean"].get("ged"),
                    "seconds_per_image": p["seconds_per_image"],
                    "num_cases": p["num_cases"],
                    "num_samples": p["sampler"]["num_samples"],
                }
                for p in points
            ],
            "reference_steps": reference["sampler"]["num_steps"],
            "reference_dice": ref_dice,
            "smallest_steps_within_tolerance": within[0]["sampler"]["num_steps"] if within else None,
        }
    return result


def table(result: dict, tolerance: float) -> str:
    has_ged = any(p["ged"] is not None for u in result.values() for p in u["points"])
    head = ["update", "steps", "Dice [95% CI]", *(["GED"] if has_ged else []), "s / image", "reaches ref."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for update, entry in result.items():
        for p in entry["points"]:
            low, high = p["dice_ci95"] or (None, None)
            dice = f"{p['dice']:.3f}" + ("" if low is None else f" [{low:.3f}, {high:.3f}]")
            within = p["dice"] >= entry["reference_dice"] - tolerance
            cells = [UPDATES.get(update, update), str(p["num_steps"]), dice]
            cells += [f"{p['ged']:.3f}"] if has_ged else []
            cells += [f"{p['seconds_per_image']:.3f}", "yes" if within else "no"]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for update, entry in result.items():
        lines.append(
            f"- {UPDATES.get(update, update)}: smallest step count whose Dice is at least its "
            f"{entry['reference_steps']}-step Dice ({entry['reference_dice']:.3f}) minus {tolerance}: "
            f"**{entry['smallest_steps_within_tolerance']}**"
        )
    return "\n".join(lines)


def plot(result: dict, path: Path, title: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for update, entry in result.items():
        steps = [p["num_steps"] for p in entry["points"]]
        seconds = [p["seconds_per_image"] for p in entry["points"]]
        dice = [p["dice"] for p in entry["points"]]
        label = UPDATES.get(update, update)
        axes[0].plot(steps, dice, marker="o", label=label)
        axes[1].plot(seconds, dice, marker="o", label=label)
    for ax, xlabel in zip(axes, ("sampling steps", "seconds per image (S samples fused)"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("Dice")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--title", default="quality-speed frontier")
    parser.add_argument("--command", default="", help="the command that produced the sweep (recorded)")
    parser.add_argument("--tolerance", type=float, default=0.01)
    args = parser.parse_args()
    rows = [load_row(p) for p in find_summaries(args.sweep)]
    result = frontier(rows, args.tolerance)
    machine = (
        f"{platform.platform()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"device cpu (no GPU was available)"
    )
    cases = {p["num_cases"] for u in result.values() for p in u["points"]}
    samples = {p["num_samples"] for u in result.values() for p in u["points"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    md = [
        f"# {args.title}",
        "",
        f"Command: `{args.command}`" if args.command else "",
        "",
        f"Machine: {machine}. Test cases: {sorted(cases)}; samples per image S = {sorted(samples)}, mean "
        "fusion; seconds per image = wall time of sampling and fusion per test image (batched), as "
        "summary.json reports it.",
        "",
        table(result, args.tolerance),
        "",
        f"![frontier]({args.out.name}.png)",
        "",
    ]
    args.out.with_suffix(".md").write_text("\n".join(md))
    record = {"title": args.title, "command": args.command, "machine": machine, "frontier": result}
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    plot(result, args.out.with_suffix(".png"), args.title)
    print("\n".join(md))


if __name__ == "__main__":
    main()
