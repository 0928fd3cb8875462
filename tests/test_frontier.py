"""experiments/frontier.py: per reverse update, the smallest step count whose Dice reaches the largest step
count's Dice to within the tolerance (one-sided: doing better counts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_eval(folder: Path, update: str, steps: int, dice: float, seconds: float) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(f"- sampler={update}\n- sampler.num_steps={steps}\n")
    summary = {
        "mean": {"dice": dice, "ged": 1 - dice},
        "ci95": {"dice": [dice - 0.02, dice + 0.02]},
        "num_cases": 16,
        "sampler": {"num_steps": steps, "num_samples": 5, "fusion": "mean", "update": update},
        "seconds_per_image": seconds,
    }
    (folder / "summary.json").write_text(json.dumps(summary))


def test_smallest_step_count_within_tolerance_per_update(tmp_path):
    curves = {
        "ddim": [(5, 0.70), (10, 0.795), (25, 0.81), (1000, 0.80)],  # 10 is within 0.01 of 0.80 (0.005)
        "ddpm": [(5, 0.40), (25, 0.60), (100, 0.78), (1000, 0.80)],  # only 1000 itself
        "dpmpp_2m": [(5, 0.815), (10, 0.78), (1000, 0.80)],  # 5 is above the reference: it reaches it
    }
    for update, points in curves.items():
        for steps, dice in points:
            write_eval(tmp_path / "sweep" / f"{update}_{steps}", update, steps, dice, steps * 0.01)
    out = tmp_path / "frontier"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "experiments" / "frontier.py"),
            str(tmp_path / "sweep"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO / "experiments",
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(out.with_suffix(".json").read_text())["frontier"]
    smallest = {u: record[u]["smallest_steps_within_tolerance"] for u in curves}
    assert smallest == {"ddim": 10, "ddpm": 1000, "dpmpp_2m": 5}
    assert [p["num_steps"] for p in record["ddpm"]["points"]] == [5, 25, 100, 1000]
    assert out.with_suffix(".png").stat().st_size > 0
    md = out.with_suffix(".md").read_text()
    assert "| DDIM (eta 0) | 10 | 0.795 [0.775, 0.815] | 0.205 | 0.100 | yes |" in md
