"""Collect the ``summary.json`` of runs (or of a multirun folder) into one markdown table and a JSON file.

Usage:
    python experiments/summarize_runs.py outputs/train/multiruns/<stamp> --out experiments/results/<name>

Each row names the run's overrides (from Hydra's ``.hydra/overrides.yaml``), its mean metrics, the
number of test cases, the sampler settings and the seconds per image.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def find_runs(paths: list[Path]) -> list[Path]:
    runs = []
    for path in paths:
        runs += sorted(p.parent for p in path.rglob("summary.json"))
    return runs


def row(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    overrides_file = run / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    return {"run": str(run), "overrides": " ".join(overrides), "num_cases": summary.get("num_cases"),
            **{f"mean_{k}": v for k, v in summary["mean"].items()}, "sampler": summary["sampler"],
            "seconds_per_image": summary["seconds_per_image"]}


def markdown(rows: list[dict]) -> str:
    lines = ["| overrides | cases | Dice | IoU | HD95 (px) | steps | S | s/image |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| `{r['overrides'] or '(defaults)'}` | {r['num_cases']} | {fmt(r['mean_dice'])} | "
                     f"{fmt(r['mean_iou'])} | {fmt(r['mean_hd95'])} | {r['sampler']['num_steps']} | "
                     f"{r['sampler']['num_samples']} | {r['seconds_per_image']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="write <out>.json and <out>.md")
    args = parser.parse_args()
    rows = [row(run) for run in find_runs(args.paths)]
    table = markdown(rows)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
        args.out.with_suffix(".md").write_text(table)


if __name__ == "__main__":
    main()
