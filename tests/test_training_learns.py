"""The default experiment must actually learn: the `make train` run reaches fused test Dice >= 0.85."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

pytestmark = pytest.mark.slow


def test_default_experiment_reaches_dice(tmp_path):
    result = run_cli(
        "diffseg-train",
        "experiment=medsegdiff_synthetic",
        "logger=csv",
        "paths.log_dir=logs",
        cwd=tmp_path,
        timeout=1500,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = list((tmp_path / "logs" / "train" / "runs").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["sampler"]["num_samples"] == 5 and summary["sampler"]["num_steps"] == 25
    assert summary["mean"]["dice"] >= 0.85, summary["mean"]
