"""The sampling benchmark's measurement on a tiny network: every figure is there and positive."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SPEC = importlib.util.spec_from_file_location("bench_sampling", REPO / "experiments" / "bench_sampling.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)

TINY_NET = [
    "model.denoiser.base_channels=8",
    "model.denoiser.channel_mults=[1,2]",
    "model.denoiser.attention_levels=[false,true]",
]


def test_measure_tiny_network():
    cfg = bench.compose_bench("medsegdiff", "gaussian", 16, TINY_NET)
    result = bench.measure(cfg, samples=[1], steps=[2], ref_steps=2, matmul_n=256)
    assert result["reference_sampling"] == "ddpm" and result["sampling"] == "ddim"
    assert result["macs_per_forward"] > 0 and result["matmul_peak_mac_per_second"] > 0
    ref = result["reference"]
    assert ref["extrapolated"] and ref["timed_steps"] == 2 and ref["seconds_per_step"] > 0
    (row,) = result["rows"]
    assert {
        "samples",
        "steps",
        "seconds",
        "samples_per_second",
        "outside_network_share",
        "peak_memory_bytes",
        "mac_fraction_of_peak",
        "ratio_to_reference",
    } <= row.keys()
    assert row["forward_calls"] == 2 and row["encode_calls"] == 1
    assert row["ratio_to_reference"] > 0 and row["mac_fraction_of_peak"] > 0 and row["seconds"] > 0
    assert 0 <= row["outside_network_share"] < 1
    assert row["reference_seconds"] == ref["seconds_per_step"] * 1000


def test_main_writes_tables(tmp_path):
    out = tmp_path / "bench"
    args = ["--size", "16", "--samples", "1", "--steps", "2", "--ref-steps", "2", "--noise", "bernoulli"]
    bench.main([*args, "--out", str(out), *TINY_NET])
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["machine"]["cpu_count"] and result["command"].startswith(
        "python experiments/bench_sampling.py"
    )
    assert result["noise"] == "BernoulliKernel" and result["rows"][0]["ratio_to_reference"] > 0
    assert "extrapolated linearly" in out.with_suffix(".md").read_text()
