"""experiments/compare.py turns several summary.json files into a leaderboard and a plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_run(folder: Path, steps: int, dice: float, seconds: float, ged: float | None = None) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(f"- sampler.num_steps={steps}\n- ckpt_path=/x.ckpt\n")
    mean = {"dice": dice, "hd95": 2.0, **({"ged": ged} if ged is not None else {})}
    summary = {
        "mean": mean,
        "ci95": {k: [v - 0.01, v + 0.01] for k, v in mean.items()},
        "num_cases": 8,
        "sampler": {"num_steps": steps, "num_samples": 5, "fusion": "mean"},
        "seconds_per_image": seconds,
    }
    (folder / "summary.json").write_text(json.dumps(summary))


def test_leaderboard_and_plot(tmp_path):
    for steps, dice, seconds in [(5, 0.80, 0.1), (25, 0.90, 0.5), (100, 0.91, 2.0)]:
        write_run(tmp_path / "runs" / f"s{steps}", steps, dice, seconds, ged=1 - dice)
    out = tmp_path / "board"
    result = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "compare.py"), str(tmp_path / "runs"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    table = out.with_suffix(".md").read_text().splitlines()
    assert "GED [95% CI]" in table[0]
    assert [line.split("|")[1].strip() for line in table[2:]] == [
        "`sampler.num_steps=100`",
        "`sampler.num_steps=25`",
        "`sampler.num_steps=5`",
    ]  # sorted by Dice
    assert "0.900 [0.890, 0.910]" in table[3]
    assert out.with_suffix(".png").stat().st_size > 1000
