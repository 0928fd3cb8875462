"""The per-case report applies every metric that fits the case, and the summary's intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffseg_lightning.inference import describe_samples
from diffseg_lightning.metrics.report import bootstrap_interval, case_metrics, summarize


def batch_of(masks: torch.Tensor, annotators: torch.Tensor | None = None) -> dict:
    batch = {
        "mask": masks,
        "case": [f"c{i}" for i in range(masks.shape[0])],
        "index": torch.arange(masks.shape[0]),
    }
    if annotators is not None:
        batch["masks"] = annotators
    return batch


def test_single_annotator_rows_by_hand():
    reference = torch.zeros(2, 1, 4, 4)
    reference[0, 0, :2, :2] = 1  # case 0: 4 pixels; case 1: empty
    samples = torch.zeros(2, 2, 1, 4, 4)
    samples[0, :, 0, :2, :2] = 1  # both samples exact on case 0
    samples[1, 0, 0, 0, 0] = 1  # case 1: one sample marks one pixel -> mean 0.5, not above the threshold
    rows = case_metrics(describe_samples(samples), batch_of(reference))
    assert rows[0]["dice"] == 1.0 and rows[0]["ece"] == 0.0 and rows[0]["mean_std"] == 0.0
    assert math.isnan(rows[1]["dice"])  # both empty: NaN (nnU-Net)
    assert rows[1]["mean_entropy"] == pytest.approx(1 / 16)  # one pixel at p = 0.5 is 1 bit
    assert rows[1]["mean_mutual_information"] == pytest.approx(1 / 16)
    assert "ged" not in rows[0] and "hm_iou" not in rows[0]


def test_multi_annotator_metrics_appear_with_several_annotators():
    annotators = torch.zeros(1, 3, 4, 4)
    annotators[0, :, :2, :2] = 1
    annotators[0, 2, 2, 2] = 1  # the third annotator adds a pixel
    samples = annotators[:, :2].unsqueeze(2).clone()  # S = 2 samples equal to annotators 0 and 1
    rows = case_metrics(describe_samples(samples), batch_of(annotators[:, :1], annotators))
    row = rows[0]
    assert {"ged", "ged_1", "hm_iou", "soft_dice", "diversity"} <= row.keys()
    assert "ged_4" not in row  # more than S samples: left out
    assert row["diversity"] == 0.0
    # d(S, Y): 0 against annotators 0 and 1, 1 - 4/5 against annotator 2 -> E = 0.2/3; E d(S,S') = 0;
    # E d(Y,Y') over all 9 pairs = 4 * 0.2 / 9. GED = 2 * 0.2 / 3 - 0 - 0.8 / 9
    assert row["ged"] == pytest.approx(2 * 0.2 / 3 - 0.8 / 9, abs=1e-6)


def test_bootstrap_interval_brackets_the_mean_and_ignores_nan():
    values = np.array([0.9, 0.8, np.nan, 0.7, 1.0, 0.6])
    low, high = bootstrap_interval(values)
    assert low < np.nanmean(values) < high
    assert 0.6 <= low and high <= 1.0
    assert all(math.isnan(v) for v in bootstrap_interval(np.array([np.nan])))


def test_summary_has_means_intervals_and_versions():
    rows = [{"case": "a", "index": 0, "dice": 1.0}, {"case": "b", "index": 1, "dice": 0.5}]
    summary = summarize(rows)
    assert summary["mean"]["dice"] == 0.75 and summary["num_cases"] == 2
    assert summary["ci95"]["dice"][0] >= 0.5 and summary["ci95"]["dice"][1] <= 1.0
    assert {"torch", "lightning", "monai", "python"} <= summary["versions"].keys()


def test_field_of_view_restricts_every_metric():
    """Outside the FOV the prediction is wrong and unsure; inside it is exact: every score is perfect."""
    reference = torch.zeros(1, 1, 4, 4)
    reference[0, 0, 1:3, 1:3] = 1
    fov = torch.zeros(1, 1, 4, 4)
    fov[0, 0, :, :3] = 1  # the last column is outside
    samples = reference.unsqueeze(1).repeat(1, 2, 1, 1, 1)
    samples[:, 0, 0, :, 3] = 1  # one sample marks the outside column: wrong and uncertain there
    rows_fov = case_metrics(describe_samples(samples), {**batch_of(reference), "fov": fov})
    rows_all = case_metrics(describe_samples(samples), batch_of(reference))
    assert rows_fov[0]["dice"] == 1.0 and rows_fov[0]["ece"] == 0.0
    assert rows_all[0]["ece"] > 0.0  # the outside column counts without a FOV
    assert math.isnan(rows_fov[0]["auroc"])  # no wrong pixel inside the FOV
