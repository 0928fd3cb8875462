"""The training-throughput benchmark on a tiny network, timed by a scripted clock: every figure is checked."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("bench_training", REPO / "experiments" / "bench_training.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


class ScriptedClock:
    """``time.perf_counter`` for the bench: returns the scripted times in order (one read per hook)."""

    def __init__(self, times: list[float]) -> None:
        self.times = iter(times)

    def perf_counter(self) -> float:
        return next(self.times)


def test_time_training_counts_the_timed_steps_and_their_data_waits(monkeypatch):
    """A real tiny training run whose step timer reads a scripted clock: the warm-up step (100 s) is left
    out, a wait is the gap from one step's end to the next one's start, and the figures follow from them."""
    # (start, end) of the warm-up step and the two timed steps: waits 5 and 8, steps 7 and 8
    starts, ends = [0.0, 105.0, 120.0], [100.0, 112.0, 128.0]
    monkeypatch.setattr(
        bench, "time", ScriptedClock([t for pair in zip(starts, ends, strict=True) for t in pair])
    )
    args = argparse.Namespace(
        size=32, batch=2, steps=2, warmup=1, synthetic=True, device="cpu", precision="32-true"
    )
    cfg = bench.compose_run("unet", [*bench.data_overrides(args, 0, None), "model.net.channels=[4,8,8,8,8]"])
    row = bench.time_training(cfg, args)
    total = (5 + 8) + (7 + 8)  # 28 s for the two timed steps, waits included
    assert row["timed_steps"] == 2
    assert row["images_per_second"] == pytest.approx(2 * 2 / total, rel=1e-12)
    assert row["seconds_per_step"] == pytest.approx(total / 2, rel=1e-12)
    assert row["data_wait_share"] == pytest.approx(13 / total, rel=1e-12)
    assert row["parameters"] > 0 and row["macs_per_pass"] > 0
    text = bench.markdown(
        {"size": 32, "batch": 2, "command": "x", "machine": "m", "data": "d", "steps": 2, "warmup": 1,
         "precision": "32-true", "seconds": 1.0, "rows": [{"model": "unet", "cache": "off", "workers": 0, **row}]}
    )  # fmt: skip
    assert "| unet | " in text and "| 0.14 | 14.000 | 46.4% |" in text
