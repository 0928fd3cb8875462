"""DDP on 2 CPU processes (gloo): gathered metrics equal one process; one run directory per run."""

from __future__ import annotations

import json

import pytest
from conftest import TINY, compose_config, run_cli

from diffseg_lightning.evaluate import evaluate

pytestmark = pytest.mark.ddp

# 7 test cases over 2 processes: the distributed sampler pads one duplicate, which must be dropped.
EVAL = [
    "data=synthetic",
    "data.size=32",
    "data.num_test=7",
    "data.eval_batch_size=2",
    "sampler.num_steps=3",
    "sampler.num_samples=2",
    "logger=none",
    "trainer.enable_model_summary=false",
]


def per_case(folder):
    rows = json.loads((folder / "summary.json").read_text())["metric_per_case"]
    return {row["case"]: row["dice"] for row in rows}


def test_ddp_evaluation_equals_one_process(trained_run, tmp_path):
    ckpt = f"ckpt_path={trained_run / 'checkpoints' / 'best.ckpt'}"
    evaluate(compose_config("eval", [ckpt, *EVAL, "trainer=cpu"], tmp_path / "one"))
    evaluate(
        compose_config(
            "eval", [ckpt, *EVAL, "trainer=ddp_cpu", "trainer.strategy=ddp_spawn"], tmp_path / "two"
        )
    )
    one, two = per_case(tmp_path / "one"), per_case(tmp_path / "two")
    assert len(one) == 7 and sorted(two) == sorted(one)
    for case, dice in one.items():
        assert two[case] == pytest.approx(dice, abs=1e-6, nan_ok=True), case


def test_sample_parallel_evaluation_equals_one_process(trained_run, tmp_path):
    """S = 3 samples over 2 processes (2 + 1, the padding repeat dropped): same fused result per case."""
    ckpt = f"ckpt_path={trained_run / 'checkpoints' / 'best.ckpt'}"
    overrides = [ckpt, *EVAL, "sampler.num_samples=3", "data.num_test=3"]
    evaluate(compose_config("eval", [*overrides, "trainer=cpu"], tmp_path / "one"))
    evaluate(
        compose_config(
            "eval",
            [*overrides, "trainer=ddp_cpu", "trainer.strategy=ddp_spawn", "sampler.parallel=sample"],
            tmp_path / "two",
        )
    )
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["sampler"]["parallel"] == "sample" and two["num_cases"] == 3
    for a, b in zip(one["metric_per_case"], two["metric_per_case"], strict=True):
        assert a["case"] == b["case"]
        for name in ("dice", "mean_std", "mean_entropy"):
            assert b[name] == pytest.approx(a[name], abs=1e-6, nan_ok=True), (a["case"], name)


def test_ddp_training_run_leaves_one_run_directory(tmp_path):
    result = run_cli(
        "diffseg-train",
        *TINY,
        "trainer=ddp_cpu",
        "sampler.num_steps=1",
        "data.num_test=5",
        "paths.log_dir=logs",
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 1, runs
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert [r["case"] for r in summary["metric_per_case"]] == [f"synthetic-test-{i:05d}" for i in range(5)]
    assert (runs[0] / "checkpoints" / "best.ckpt").is_file()
