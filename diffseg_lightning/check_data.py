"""``diffseg-check-data data=<name> data.root=...``: check a dataset before training on it.

Reads every case of train / val / test once with the loader training would use (the DataModule's check
pass), prints what the data hold and every problem found (missing partner files, size mismatches,
unexpected label values, unreadable files, channel counts), writes ``data_report.json`` in the run
directory, and exits 1 when there is any problem.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from rich.console import Console
from rich.table import Table

from diffseg_lightning.data.check import READ_ERRORS, SplitReport, check_dataset, first_line
from diffseg_lightning.exceptions import ConfigError
from diffseg_lightning.utils import CONFIG_DIR, run_cli, user_errors

SPLITS = ("train", "val", "test")


def check_splits(data_cfg: DictConfig, splits: Sequence[str] = SPLITS) -> dict[str, SplitReport]:
    """The check report of every configured split; loaders collect every problem (``on_bad_case=skip``)."""
    data_cfg = data_cfg.copy()
    with open_dict(data_cfg):
        data_cfg.on_bad_case = "skip"  # collect every problem instead of stopping at the first
    datamodule = instantiate(data_cfg)
    reports = {}
    for split in splits:
        if split not in SPLITS:
            raise ConfigError(f"splits must be a subset of {list(SPLITS)}, got {split!r}")
        factory = datamodule.factories.get(split)
        if factory is None:
            continue
        try:
            dataset = factory()
        except READ_ERRORS as err:
            reports[split] = SplitReport(split=split, dataset="?", problems=[(split, first_line(err))])
            continue
        _, report = check_dataset(dataset, split)
        if report.items:
            try:
                datamodule.check_first_item(dataset, split)
            except READ_ERRORS as err:
                report.problems.append((split, first_line(err)))
        reports[split] = report
    return reports


def most_common(counter, limit: int = 3) -> str:
    shown = ", ".join(f"{'x'.join(str(v) for v in key)} ({n})" for key, n in counter.most_common(limit))
    return shown + (f", +{len(counter) - limit} more" if len(counter) > limit else "") if counter else "-"


def print_reports(reports: dict[str, SplitReport], console: Console) -> None:
    table = Table(title="diffseg-check-data")
    for column in (
        "split",
        "loader",
        "items",
        "cases",
        "sizes (H x W)",
        "spacing",
        "annotators",
        "labels",
        "problems",
    ):
        table.add_column(column)
    for split, r in reports.items():
        annotators = ", ".join(f"{a} ({n})" for a, n in sorted(r.annotators.items())) or "-"
        labels = ", ".join(f"{v:g}" for v in r.labels[:12]) + (" ..." if len(r.labels) > 12 else "") or "-"
        table.add_row(
            split, r.dataset, str(r.items), str(len(r.cases)), most_common(r.sizes), most_common(r.spacings),
            annotators, labels, str(len(r.problems)),
        )  # fmt: skip
    console.print(table)
    for split, r in reports.items():
        for where, reason in r.problems:
            console.print(f"[red]problem[/red] {split}: {where}: {reason}", markup=True, highlight=False)


def as_json(reports: dict[str, SplitReport]) -> dict:
    return {
        split: {
            "dataset": r.dataset,
            "items": r.items,
            "cases": len(r.cases),
            "sizes": {"x".join(map(str, k)): n for k, n in r.sizes.items()},
            "spacings": {"x".join(map(str, k)): n for k, n in r.spacings.items()},
            "annotators": {str(k): n for k, n in r.annotators.items()},
            "labels": r.labels,
            "problems": [{"where": w, "reason": why} for w, why in r.problems],
        }
        for split, r in reports.items()
    }


def check_data(cfg: DictConfig) -> int:
    """Check, print, write ``data_report.json``; return the exit code (1 when anything is wrong)."""
    reports = check_splits(cfg.data, cfg.get("splits", SPLITS))
    console = Console(width=160)
    print_reports(reports, console)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_report.json").write_text(json.dumps(as_json(reports), indent=1))
    problems = sum(len(r.problems) for r in reports.values())
    console.print(f"{problems} problem(s); report written to {out / 'data_report.json'}", highlight=False)
    return 1 if problems or not reports else 0


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="check_data")
def hydra_main(cfg: DictConfig) -> None:
    with user_errors():
        code = check_data(cfg)
    if code:
        raise SystemExit(code)


def main() -> None:
    """Console script."""
    run_cli(hydra_main)


if __name__ == "__main__":
    main()
