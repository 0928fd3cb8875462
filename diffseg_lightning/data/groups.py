"""Subgroup attributes for real data, read from a CSV (``case -> group``), for fairness reports."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from diffseg_lightning.utils.errors import ConfigError, DiffSegError

__all__ = ["GroupsFromCSV"]


class GroupsFromCSV(Dataset):
    """Adds ``group`` (int64) to the items of a dataset, from a CSV column keyed by case.

    For the subgroup reports of FEDD (Carrion & Norouzi, MICCAI 2023; DDI's skin-tone groups).
    The CSV has a header; ``case_column`` holds the case id (the item's ``case``, e.g. the file stem)
    and ``group_column`` the group. Groups may be integers or names; names are numbered in sorted
    order (``self.group_names[i]`` is the name of group ``i``).

    Args:
        dataset: the wrapped dataset (items with ``case``).
        csv_path: the CSV file.
        case_column: the column with the case ids.
        group_column: the column with the groups.
        missing: ``error`` (a case absent from the CSV is an error naming the file and the case) or
            an int group given to absent cases (e.g. -1 = unknown).

    Raises:
        DiffSegError: the file is absent, a column is missing, a case appears twice, or (with
            ``missing=error``) a case is not in the file.
    """

    def __init__(
        self,
        dataset: Dataset,
        csv_path: str | Path,
        case_column: str = "case",
        group_column: str = "group",
        missing: str | int = "error",
    ) -> None:
        self.dataset = dataset
        self.csv_path = Path(csv_path)
        if missing != "error" and not isinstance(missing, int):
            raise ConfigError(f"missing must be 'error' or an int group, got {missing!r}")
        self.missing = missing
        if not self.csv_path.is_file():
            raise DiffSegError(f"group CSV {self.csv_path} does not exist")
        with self.csv_path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            for column in (case_column, group_column):
                if column not in columns:
                    raise DiffSegError(
                        f"group CSV {self.csv_path} has no column {column!r} (columns: {columns})"
                    )
            raw: dict[str, str] = {}
            for line, row in enumerate(reader, start=2):
                case = row[case_column].strip()
                if case in raw:
                    raise DiffSegError(f"group CSV {self.csv_path}, line {line}: case {case!r} appears twice")
                raw[case] = row[group_column].strip()
        values = set(raw.values())
        if all(v.lstrip("-").isdigit() for v in values):
            self.group_names = sorted(values, key=int)
            self.groups = {case: int(v) for case, v in raw.items()}
        else:
            self.group_names = sorted(values)
            number = {name: i for i, name in enumerate(self.group_names)}
            self.groups = {case: number[v] for case, v in raw.items()}

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:  # root, split, size ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index])
        case = str(item["case"])
        group = self.groups.get(case)
        if group is None:
            if self.missing == "error":
                raise DiffSegError(f"case {case!r} is not in the group CSV {self.csv_path}")
            group = int(self.missing)
        item["group"] = torch.tensor(group, dtype=torch.int64)
        return item
