"""The sampling benchmark on a tiny network: with a scripted clock, every figure follows from the protocol."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from diffseg_lightning.diffusion.solvers import DDIM, DDPM

REPO = Path(__file__).resolve().parents[1]

SPEC = importlib.util.spec_from_file_location("bench_sampling", REPO / "experiments" / "bench_sampling.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)

TINY_NET = [
    "model.denoiser.base_channels=8",
    "model.denoiser.channel_mults=[1,2]",
    "model.denoiser.attention_levels=[false,true]",
]


class ScriptedClock:
    """A clock that only moves when told: the bench reads it through ``time.perf_counter``."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


# Simulated costs, in clock units (binary fractions, so every sum below is exact in float64).
FORWARD_PER_ROW, ENCODE, KERNEL_STEP = 1.0, 0.5, 0.25


def test_measure_attributes_time_to_the_network_and_extrapolates_the_reference(monkeypatch):
    """With a clock that moves only inside the network (per row of a forward pass, per image encoded) and the
    solver step, every figure of the bench follows from the protocol: ours runs k batched passes of S rows,
    one encode and k solver steps; the reference runs one row, one encode and one solver step per step."""
    clock = ScriptedClock()
    monkeypatch.setattr(bench, "time", clock)
    monkeypatch.setattr(bench, "matmul_peak", lambda device, n: 1e9)
    build = bench.build_module

    def build_with_costs(*args):
        module = build(*args)
        denoiser, encode = module.denoiser, module.denoiser.encode_condition

        def costly_encode(image):
            clock.now += ENCODE
            return encode(image)

        def forward_cost(net, inputs, output):
            clock.now += FORWARD_PER_ROW * inputs[0].shape[0]

        denoiser.encode_condition = costly_encode
        denoiser.register_forward_hook(forward_cost)
        return module

    def costly(step):
        def costly_step(self, *args, **kwargs):
            clock.now += KERNEL_STEP
            return step(self, *args, **kwargs)

        return costly_step

    monkeypatch.setattr(bench, "build_module", build_with_costs)
    for solver in (DDIM, DDPM):  # ours samples with DDIM, the released protocol with ancestral DDPM
        monkeypatch.setattr(solver, "step", costly(solver.step))
    cfg = bench.compose_bench("medsegdiff", "gaussian", 16, TINY_NET)
    result = bench.measure(cfg, samples=[1, 3], steps=[2, 4], ref_steps=3, matmul_n=256)

    assert result["reference_sampling"] == "ddpm" and result["sampling"] == "ddim"
    assert result["macs_per_forward"] > 0 and result["macs_image_branch"] > 0
    ref = result["reference"]
    reference_step = FORWARD_PER_ROW + ENCODE + KERNEL_STEP  # one row, the image branch every step
    assert ref["extrapolated"] and ref["timed_steps"] == 3
    assert ref["seconds_timed"] == 3 * reference_step and ref["seconds_per_step"] == reference_step
    assert [(row["samples"], row["steps"]) for row in result["rows"]] == [(1, 2), (1, 4), (3, 2), (3, 4)]
    for row in result["rows"]:
        s, k = row["samples"], row["steps"]
        network = k * s * FORWARD_PER_ROW + ENCODE  # S samples in one pass per step, the image encoded once
        assert row["forward_calls"] == k and row["encode_calls"] == 1
        assert row["network_seconds"] == network and row["seconds"] == network + k * KERNEL_STEP
        assert row["outside_network_share"] == pytest.approx(k * KERNEL_STEP / row["seconds"], rel=1e-12)
        assert row["samples_per_second"] == pytest.approx(s / row["seconds"], rel=1e-12)
        assert row["reference_seconds"] == 1000 * s * reference_step  # 1000 ancestral steps per sample
        assert row["ratio_to_reference"] == pytest.approx(
            row["seconds"] / (1000 * s * reference_step), rel=1e-12
        )
        assert row["peak_memory_bytes"] >= 0 and row["mac_fraction_of_peak"] > 0


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
