"""Leaderboard of several runs: reads their ``summary.json``, writes a markdown table and a PNG plot.

Usage:
    python experiments/compare.py <run dirs, multirun dirs or summary.json files> --out experiments/results/<name>

Writes ``<name>.md`` (rows sorted by Dice: overrides, cases, Dice and GED with 95% intervals,
HM-IoU and soft Dice where the runs have several annotators, steps, S, fusion, seconds per image) and ``<name>.png`` (Dice, and GED where the runs have
several annotators, against sampling steps and against seconds per image).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402


def find_summaries(paths: list[Path]) -> list[Path]:
    found = []
    for path in paths:
        found += [path] if path.is_file() else sorted(path.rglob("summary.json"))
    if not found:
        raise SystemExit(f"error: no summary.json under {', '.join(map(str, paths))}")
    return found


def load_row(path: Path) -> dict:
    summary = json.loads(path.read_text())
    overrides_file = path.parent / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    return {
        "run": str(path.parent),
        "label": " ".join(o for o in overrides if not o.startswith(("ckpt_path", "hydra.", "logger=")))
        or path.parent.name,
        "num_cases": summary.get("num_cases"),
        "mean": summary["mean"],
        "ci95": summary.get("ci95", {}),
        "sampler": summary["sampler"],
        "seconds_per_image": summary["seconds_per_image"],
    }


def _cell(row: dict, name: str) -> str:
    mean = row["mean"].get(name)
    if mean is None:
        return "n/a"
    low, high = row["ci95"].get(name) or (None, None)
    return f"{mean:.3f}" if low is None else f"{mean:.3f} [{low:.3f}, {high:.3f}]"


MULTI_ANNOTATOR = (("ged", "GED"), ("hm_iou", "HM-IoU"), ("soft_dice", "soft Dice"))


def leaderboard(rows: list[dict]) -> str:
    extra = [(key, name) for key, name in MULTI_ANNOTATOR if any(key in row["mean"] for row in rows)]
    head = [
        "run",
        "cases",
        "Dice [95% CI]",
        *(f"{name} [95% CI]" for _, name in extra),
        "HD95 (px)",
        "steps",
        "S",
        "fusion",
        "s/image",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in sorted(rows, key=lambda r: -(r["mean"].get("dice") or 0.0)):
        cells = [
            f"`{row['label']}`",
            str(row["num_cases"]),
            _cell(row, "dice"),
            *(_cell(row, key) for key, _ in extra),
            _cell(row, "hd95"),
            str(row["sampler"]["num_steps"]),
            str(row["sampler"]["num_samples"]),
            row["sampler"]["fusion"],
            f"{row['seconds_per_image']:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    metrics = ["dice"] + (["ged"] if any("ged" in r["mean"] for r in rows) else [])
    fig, axes = plt.subplots(len(metrics), 2, figsize=(10, 3.6 * len(metrics)), squeeze=False)
    for i, metric in enumerate(metrics):
        points = sorted(
            (r["sampler"]["num_steps"], r["seconds_per_image"], r["mean"][metric])
            for r in rows
            if r["mean"].get(metric) is not None
        )
        for j, (x_index, x_label) in enumerate(((0, "sampling steps"), (1, "seconds per image"))):
            ax = axes[i][j]
            xs = [p[x_index] for p in points]
            ax.plot(xs, [p[2] for p in points], "o-")
            ax.set_xscale("log")
            ax.minorticks_off()
            ax.set_xticks(xs, [f"{x:g}" if x_index == 0 else f"{x:.2g}" for x in xs])
            ax.set_xlabel(x_label)
            ax.set_ylabel(metric.upper() if metric == "ged" else "Dice")
            ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="writes <out>.md, <out>.png and <out>.json")
    args = parser.parse_args()
    rows = [load_row(p) for p in find_summaries(args.paths)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table = leaderboard(rows)
    args.out.with_suffix(".md").write_text(table)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    plot(rows, args.out.with_suffix(".png"))
    print(table)


if __name__ == "__main__":
    main()
