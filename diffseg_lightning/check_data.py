"""``diffseg-check-data data=<name> data.root=...``: check a dataset before training on it.

Reads every case of train / val / test once with the loader training would use (the DataModule's check
pass, with ``on_bad_case=skip`` so that no problem hides the others), prints what the data hold and every
problem found (missing partner files, size mismatches, volumes off one voxel grid, unexpected label values,
unreadable or truncated files, channel counts), each once: a file's problem found while scanning the folder
and again when its items are read, or by every slice of a volume, is one line (with the items it failed),
and a problem every split finds (a folder-level one) is one line naming the splits. Writes
``data_report.json`` in the run directory and exits 1 when there is any problem.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch.utils.data import Subset

from diffseg_lightning.data.base import split_message
from diffseg_lightning.data.check import READ_ERRORS, SplitReport, check_dataset, first_line
from diffseg_lightning.exceptions import ConfigError
from diffseg_lightning.utils import CONFIG_DIR, run_cli, user_errors
from diffseg_lightning.validate import validate_config

SPLITS = ("train", "val", "test")


def skipping(cfg: DictConfig) -> DictConfig:
    """A copy of the composed config whose ``data.on_bad_case`` is ``skip``.

    The loaders' ``on_bad_case: ${data.on_bad_case}`` resolves against the root of the config, so the
    setting is changed there (a copy of the ``data`` node alone keeps its parent, and its loaders would
    still raise at the first bad case).
    """
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.data.on_bad_case = "skip"
    return cfg


def check_splits(cfg: DictConfig, splits: Sequence[str] = SPLITS) -> dict[str, SplitReport]:
    """The check report of every configured split of ``cfg.data`` (the composed config); the loaders
    collect every problem (``on_bad_case=skip``) instead of stopping at the first."""
    datamodule = instantiate(skipping(cfg).data)
    reports = {}
    for split in splits:
        if split not in SPLITS:
            raise ConfigError(f"splits must be a subset of {list(SPLITS)}, got {split!r}")
        factory = datamodule.factories.get(split)
        if factory is None:
            continue
        try:
            dataset = factory()
        except READ_ERRORS as err:  # a folder-level problem (no images/ folder, ...): the whole split
            reports[split] = SplitReport(split=split, dataset="?")
            reports[split].add_problem(*split_message(first_line(err)))  # "" when it names no file
            continue
        good, report = check_dataset(dataset, split)
        if good:  # the config's channel counts, on an item that reads (a bad one is already listed)
            try:
                datamodule.check_first_item(Subset(dataset, good[:1]), split)
            except READ_ERRORS as err:
                report.add_problem(*split_message(first_line(err)))
        reports[split] = report
    return reports


def distinct_problems(reports: dict[str, SplitReport]) -> dict[str, list[str]]:
    """Every problem line once, with the splits that found it (a folder-level problem: all of them)."""
    found: dict[str, list[str]] = {}
    for split, report in reports.items():
        for number in range(len(report.problems)):
            found.setdefault(report.problem_line(number), []).append(split)
    return found


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
    for line, splits in distinct_problems(reports).items():
        console.print(f"[red]problem[/red] {', '.join(splits)}: {escape(line)}", markup=True, highlight=False)


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
            "problems": [
                {"where": where, "reason": why, "items": r.repeats.get(number, [])}
                for number, (where, why) in enumerate(r.problems)
            ],
        }
        for split, r in reports.items()
    }


def check_data(cfg: DictConfig) -> int:
    """Check, print, write ``data_report.json``; return the exit code (1 when anything is wrong)."""
    validate_config(cfg)  # the whole config, before anything is read or written
    reports = check_splits(cfg, cfg.get("splits", SPLITS))
    console = Console(width=160)
    print_reports(reports, console)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_report.json").write_text(json.dumps(as_json(reports), indent=1))
    problems = len(distinct_problems(reports))
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
