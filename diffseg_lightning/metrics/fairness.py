"""Subgroup (fairness) metrics: every metric per group, its worst-group value and its largest gap.

Carrion & Norouzi (2023), "FEDD: Fair, Efficient, and Diverse Diffusion-based Lesion Segmentation
and Malignancy Classification" (MICCAI) report segmentation and classification per skin-tone group
(Fitzpatrick I-II, III-IV, V-VI of the DDI set; Daneshjou et al., Sci. Adv. 2022) to show that a
model is fair when no group is much worse than the others. This module computes, for any per-case
metric table (the ``metric_per_case`` rows of ``summary.json``):

* ``groups[g][metric]``: the metric averaged over the cases of group ``g`` (nan-mean, as the
  overall means of ``summary.json``), with ``n`` the group's case count;
* ``worst[metric]``: the worst group value (the minimum when higher is better, the maximum when
  lower is better; NaN groups are ignored) and ``worst_group[metric]`` the group that has it;
* ``gap[metric]``: the largest difference between two groups, ``max_g - min_g`` (>= 0).

Group-level metrics that are not means of per-case values (accuracy and AUROC of a classifier)
are given as ``aggregates``: functions of a group's rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from diffseg_lightning.exceptions import ConfigError

__all__ = ["LOWER_IS_BETTER", "subgroup_report"]

#: Metrics where a smaller value is better (every other numeric metric: larger is better).
LOWER_IS_BETTER: tuple[str, ...] = (
    "hd95",
    "hd95_mm",
    "ece",
    "ged",
    "ged_4",
    "ged_16",
    "loss",
    "brier",
    "error_rate",
)


def _nanmean(values: Sequence[float]) -> float:
    defined = [v for v in values if not math.isnan(v)]
    return sum(defined) / len(defined) if defined else float("nan")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def subgroup_report(
    rows: Sequence[Mapping[str, Any]],
    group_key: str = "group",
    metrics: Sequence[str] | None = None,
    aggregates: Mapping[str, Callable[[Sequence[Mapping[str, Any]]], float]] | None = None,
    lower_is_better: Sequence[str] = LOWER_IS_BETTER,
) -> dict[str, Any]:
    """Per-group values, worst-group value and largest gap of every metric.

    Args:
        rows: one dict per case with ``group_key`` and numeric metrics (NaN = undefined).
        group_key: the row key holding the group (any hashable; reported as a string).
        metrics: the per-case metrics to report; None = every numeric key of the rows except
            ``index`` and ``group_key``.
        aggregates: group-level metrics computed from a group's rows (e.g. accuracy, AUROC).
        lower_is_better: metric names where a smaller value is better.

    Returns:
        ``{"group_key", "groups": {g: {"n": count, metric: value}}, "worst": {metric: value},
        "worst_group": {metric: g}, "gap": {metric: value}}``; a metric undefined in every group
        has worst and gap NaN and worst_group None. With one group the gap is 0.

    Raises:
        ValueError: no rows, or a row without ``group_key``.
    """
    if not rows:
        raise ConfigError("subgroup_report needs at least one row")
    missing = [row.get("case", i) for i, row in enumerate(rows) if group_key not in row]
    if missing:
        raise ConfigError(f"rows without the group key {group_key!r}: {missing[:5]}")
    if metrics is None:
        names: list[str] = []
        for row in rows:
            for key, value in row.items():
                if key not in ("index", group_key) and _is_number(value) and key not in names:
                    names.append(key)
        metrics = names
    by_group: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_group.setdefault(str(row[group_key]), []).append(row)
    order = sorted(
        by_group, key=lambda g: (not g.lstrip("-").isdigit(), int(g) if g.lstrip("-").isdigit() else 0, g)
    )
    groups: dict[str, dict[str, float]] = {}
    for g in order:
        members = by_group[g]
        values: dict[str, float] = {"n": len(members)}
        for name in metrics:
            values[name] = _nanmean([float(r.get(name, float("nan"))) for r in members])
        for name, fn in (aggregates or {}).items():
            values[name] = float(fn(members))
        groups[g] = values
    names_all = [*metrics, *(aggregates or {})]
    worst: dict[str, float] = {}
    worst_group: dict[str, str | None] = {}
    gap: dict[str, float] = {}
    for name in names_all:
        defined = [(groups[g][name], g) for g in order if not math.isnan(groups[g][name])]
        if not defined:
            worst[name], worst_group[name], gap[name] = float("nan"), None, float("nan")
            continue
        low, high = min(defined), max(defined)
        pick = high if name in lower_is_better else low
        worst[name], worst_group[name] = pick
        gap[name] = high[0] - low[0]
    return {"group_key": group_key, "groups": groups, "worst": worst, "worst_group": worst_group, "gap": gap}
