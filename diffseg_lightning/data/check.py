"""The data check: read every item of a split once, report what the data hold and every problem found.

One pass serves three callers: ``diffseg-check-data`` (prints the report, exits non-zero on problems), the
DataModule before training (raises under ``on_bad_case=error``, drops the bad items under ``skip``), and
the array cache (which stores the items the pass has read, so they are decoded once).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from diffseg_lightning.data.base import split_message
from diffseg_lightning.exceptions import CaseProblems
from diffseg_lightning.utils.errors import DiffSegError

# What a bad case raises while its files are read (loaders wrap library errors in DiffSegError, naming the
# file); anything else, ValueError included, is a bug and propagates instead of being skipped.
READ_ERRORS = (DiffSegError, OSError, EOFError)
SHOWN_PROBLEMS = 5


@dataclass
class SplitReport:
    """What the check pass found in one split.

    Attributes:
        split: train / val / test / predict.
        dataset: the dataset's class name.
        items: the number of items read without error.
        cases: the distinct ``case`` values of those items, in dataset order.
        sizes: stored image sizes (H, W) and their counts (``original_size`` where the item has it).
        spacings: pixel spacings and their counts (``original_spacing`` or ``spacing``), when known.
        annotators: annotators per item (``masks.shape[0]``, else 1) and their counts.
        labels: the raw label values the loader read (its ``seen_labels``), when it records them.
        problems: ``(where, reason)`` of every item or case that could not be used, each once: ``where`` is
            the file the problem names (the item when its message names no file; "" for a split that could
            not be built at all).
        repeats: for a problem found when items were read, the items that failed with it (several: the
            slices of one volume, which fail with one message).
    """

    split: str
    dataset: str
    items: int = 0
    cases: list[str] = field(default_factory=list)
    sizes: Counter = field(default_factory=Counter)
    spacings: Counter = field(default_factory=Counter)
    annotators: Counter = field(default_factory=Counter)
    labels: list = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    repeats: dict[int, list[int]] = field(default_factory=dict)
    _numbers: dict[str, int] = field(default_factory=dict, repr=False)  # "where: reason" -> its problem

    def add_problem(self, where: str, reason: str, item: int | None = None, key: str | None = None) -> None:
        """Record a problem once: the same ``key`` (default ``"where: reason"``) again only adds ``item``."""
        key = key or f"{where}: {reason}"
        number = self._numbers.get(key)
        if number is None:
            number = self._numbers[key] = len(self.problems)
            self.problems.append((str(where), reason))
        if item is not None:
            self.repeats.setdefault(number, []).append(item)

    def problem_line(self, number: int) -> str:
        """``where: reason``, with the items of the split that failed with it when there are several."""
        where, reason = self.problems[number]
        items = self.repeats.get(number, [])
        line = f"{where}: {reason}" if where else reason
        return line + (f" ({len(items)} items: {spans(items)})" if len(items) > 1 else "")

    def note_item(self, item: dict[str, Any]) -> None:
        self.items += 1
        case = str(item.get("case", ""))
        if not self.cases or self.cases[-1] != case:
            self.cases.append(case)
        size = item.get("original_size", item["image"].shape[-2:])
        self.sizes[tuple(int(v) for v in size)] += 1
        spacing = item.get("original_spacing", item.get("spacing"))
        if spacing is not None:
            self.spacings[tuple(round(float(v), 4) for v in spacing)] += 1
        masks = item.get("masks")
        self.annotators[int(masks.shape[0]) if masks is not None else int("mask" in item)] += 1

    def describe_problems(self, limit: int = SHOWN_PROBLEMS) -> str:
        shown = "; ".join(self.problem_line(n) for n in range(min(limit, len(self.problems))))
        more = len(self.problems) - limit
        return shown + (f"; and {more} more (run diffseg-check-data for the full list)" if more > 0 else "")


def spans(numbers: list[int]) -> str:
    """``0-5, 9`` for ``[0, 1, 2, 3, 4, 5, 9]`` (sorted runs of consecutive numbers)."""
    runs: list[list[int]] = []
    for n in sorted(numbers):
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)


def first_line(err: BaseException) -> str:
    """An error as one line: DiffSeg's own messages as they are, others with their type."""
    text = " ".join(str(err).split())
    return text if isinstance(err, DiffSegError) else f"{type(err).__name__}: {text}"


def check_dataset(
    dataset: Dataset,
    split: str,
    on_item: Callable[[int, dict[str, Any]], None] | None = None,
) -> tuple[list[int], SplitReport]:
    """Read every item of ``dataset`` once; return the indices that read cleanly and the report.

    Cases the loader left out while scanning (its ``skipped`` list, under ``on_bad_case=skip``) are
    problems too. An item whose image holds NaN or infinite values is a problem naming the case. Every
    problem is listed once: an error that several items raise with one message (the slices of a truncated
    volume; a file both skipped at scan and failing when read) is one problem, with the failing items in
    ``report.repeats``.

    Args:
        dataset: any map-style dataset of the DataModule contract.
        split: the split's name, for the report.
        on_item: called as ``on_item(index, item)`` for every clean item (the cache writes it).
    """
    report = SplitReport(split=split, dataset=type(dataset).__name__)
    for where, reason in getattr(dataset, "skipped", []):
        report.add_problem(str(where), reason)
    good: list[int] = []
    for index in range(len(dataset)):
        try:
            item = dataset[index]
        except READ_ERRORS as err:
            messages = err.messages if isinstance(err, CaseProblems) else [first_line(err)]
            for message in messages:
                message = " ".join(message.split())
                where, reason = split_message(message, f"{split} item {index}")
                report.add_problem(where, reason, index, key=message)
            continue
        image = item["image"]
        if isinstance(image, torch.Tensor) and not torch.isfinite(image).all():
            report.add_problem(str(item.get("case", index)), "image holds NaN or infinite values", index)
            continue
        report.note_item(item)
        good.append(index)
        if on_item is not None:
            on_item(index, item)
    if hasattr(dataset, "recording"):
        dataset.recording = False  # recorded once for the report: later (training) reads skip it
    seen = getattr(dataset, "seen_labels", None)
    report.labels = sorted(seen) if seen else []
    return good, report


def as_row(value: Any) -> np.ndarray | None:
    """An item field as a numpy array for the cache, or None for a field that is not an array (a string)."""
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (bool, int, float)):
        return np.asarray(value)
    return None
