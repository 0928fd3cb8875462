"""The training-throughput benchmark on a tiny network: every figure is there, and the shares add up."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("bench_training", REPO / "experiments" / "bench_training.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def test_time_training_tiny_unet_on_synthetic_data():
    args = argparse.Namespace(
        size=32, batch=2, steps=2, warmup=1, synthetic=True, device="cpu", precision="32-true"
    )
    cfg = bench.compose_run("unet", [*bench.data_overrides(args, 0, None), "model.net.channels=[4,8,8,8,8]"])
    row = bench.time_training(cfg, args)
    assert row["timed_steps"] == 2 and 0 <= row["data_wait_share"] < 1
    assert abs(row["images_per_second"] * row["seconds_per_step"] - args.batch) < 1e-9
    assert row["parameters"] > 0 and row["macs_per_pass"] > 0
    text = bench.markdown(
        {"size": 32, "batch": 2, "command": "x", "machine": "m", "data": "d", "steps": 2, "warmup": 1,
         "precision": "32-true", "seconds": 1.0, "rows": [{"model": "unet", "cache": "off", "workers": 0, **row}]}
    )  # fmt: skip
    assert "| unet |" in text
