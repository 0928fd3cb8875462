"""Sampling speed against the released MedSegDiff protocol, in one process, on one machine.

For one model config (``conf/model/<name>.yaml``; random weights: the cost of a pass does not depend on
them), one noise kernel and one image size, measures:

- **ours**: :class:`~diffseg_lightning.inference.sampler.DiffusionSampler` (the S samples of an image in
  one batched pass per step, the image branch encoded once), for every S and step count of the grid:
  seconds per fused prediction (one image), samples per second, peak memory, the share of the time spent
  outside the network (sampler, kernel steps, fusion, uncertainty maps), and the achieved MAC/s;
- **reference**: the released MedSegDiff protocol with the same network and weights: one sample at a
  time, 1000 ancestral steps (Gaussian: the DDPM solver; the Bernoulli kernel's step is ancestral), the
  image branch recomputed at every step. ``--ref-steps`` of them are timed and the cost is extrapolated
  linearly to ``1000 x S`` steps (every step costs the same network pass), unless ``--ref-steps 1000``;
- the network's multiply-accumulates per pass (``count_macs``), and the machine's matmul peak
  (best of several ``torch.matmul`` of two 2048 x 2048 float32 matrices) to put the MAC/s against.

Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU; on a CPU the peak resident set size (RSS,
``/proc/self/statm`` polled every 2 ms) during the call, minus the RSS before it.

Usage:
    python experiments/bench_sampling.py [--model medsegdiff] [--noise gaussian|bernoulli] [--size 64]
        [--full] [--samples 1 5] [--steps 5 10 25] [--ref-steps 50] [--device cpu|cuda]
Writes experiments/results/bench_sampling.{json,md} (``--out`` changes the stem).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import platform
import resource
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from diffseg_lightning.diffusion import DDPM, BernoulliPosterior, GaussianKernel, Solver
from diffseg_lightning.diffusion.reverse import reverse
from diffseg_lightning.entry import build_module
from diffseg_lightning.inference.sampler import DiffusionSampler
from diffseg_lightning.utils.compose import compose_config
from diffseg_lightning.utils.speed import count_macs

RESULTS = Path(__file__).resolve().parent / "results"
FULL_SAMPLES = (1, 5, 16)
FULL_STEPS = (5, 10, 25, 50, 100, 1000)
REDUCED_SAMPLES = (1, 5, 16)  # the default grid: ~2 minutes for MedSegDiff at 64 px on 2 CPU cores
REDUCED_STEPS = (5, 10, 25, 50, 100)
REFERENCE_STEPS = 1000  # the released MedSegDiff protocol: 1000 ancestral steps per sample


# --------------------------------------------------------------------------------------- timing helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedDenoiser:
    """Wrap a denoiser and add up the seconds spent in its network calls (forward and encode_condition)."""

    def __init__(self, denoiser: torch.nn.Module, device: torch.device) -> None:
        self.denoiser = denoiser
        self.device = device
        self.seconds = 0.0
        self.forward_calls = 0
        self.encode_calls = 0

    def _timed(self, fn, *args):
        sync(self.device)
        start = time.perf_counter()
        out = fn(*args)
        sync(self.device)
        self.seconds += time.perf_counter() - start
        return out

    def __call__(self, x_t, t, cond):
        self.forward_calls += 1
        return self._timed(self.denoiser, x_t, t, cond)

    def encode_condition(self, image):
        self.encode_calls += 1
        return self._timed(self.denoiser.encode_condition, image)

    def __getattr__(self, name: str) -> Any:  # anything else the sampler reads (e.g. attributes)
        return getattr(self.denoiser, name)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``), so an RSS peak measures this block."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name and platform.system() == "Linux":
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak on a GPU, polled RSS peak on a CPU (bytes above start)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            release_freed_memory()
            self.start = self._max = rss_bytes()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.002):
            self._max = max(self._max, rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, rss_bytes())
            self.peak = self._max - self.start


def matmul_peak(device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    """The machine's measured matmul peak, in MAC/s: best of ``repeats`` float32 ``n x n`` products."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return n**3 / best


# -------------------------------------------------------------------------------------------- protocols
def time_ours(module, kernel, solver, image, samples: int, steps: int, seed: int = 0) -> dict[str, Any]:
    """One fused prediction of one image with the project's sampler and ``solver`` (after one warm-up call)."""
    device = image.device
    sampler = DiffusionSampler(num_steps=steps, num_samples=samples, seed=seed, solver=solver)
    timed = TimedDenoiser(module.denoiser, device)
    warm_up = DiffusionSampler(num_steps=min(steps, 2), num_samples=samples, seed=seed, solver=solver)
    warm_up.sample(timed, kernel, image, module.mask_channels)  # same shapes, fewer steps
    timed.seconds, timed.forward_calls, timed.encode_calls = 0.0, 0, 0
    with PeakMemory(device) as memory:
        sync(device)
        start = time.perf_counter()
        sampler.sample(timed, kernel, image, module.mask_channels)
        sync(device)
        seconds = time.perf_counter() - start
    return {
        "samples": samples,
        "steps": steps,
        "seconds": seconds,
        "samples_per_second": samples / seconds,
        "network_seconds": timed.seconds,
        "outside_network_share": max(seconds - timed.seconds, 0.0) / seconds,
        "forward_calls": timed.forward_calls,
        "encode_calls": timed.encode_calls,
        "peak_memory_bytes": memory.peak,
    }


def reference_step_seconds(module, kernel, solver, image, timed_steps: int, seed: int = 0) -> dict[str, Any]:
    """Seconds per step of the released protocol: one sample, 1000 ancestral steps (``solver``), the image
    branch recomputed at every step (``timed_steps`` of the 1000 are timed, after one warm-up step)."""
    device = image.device
    timesteps = kernel.inference_timesteps(REFERENCE_STEPS).tolist()
    assert len(timesteps) == REFERENCE_STEPS
    generator = torch.Generator(device=device).manual_seed(seed)
    x = kernel.sample_prior((1, module.mask_channels, *image.shape[-2:]), device=device, generator=generator)
    denoiser = module.denoiser

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return denoiser(x_t, t, denoiser.encode_condition(image))  # the image branch at every step

    def walk(first: int, last: int, x: torch.Tensor) -> torch.Tensor:
        """Steps ``first .. last - 1`` of the 1000, ending at the noise level of step ``last``; returns x_t there."""
        final_t_prev = timesteps[last] if last < len(timesteps) else -1
        kept: list[torch.Tensor] = []
        reverse(
            kernel,
            solver,
            denoise,
            x,
            timesteps[first:last],
            generator,
            final_t_prev,
            lambda r: kept.append(r.x_prev),
        )
        return kept[-1]

    x = walk(0, 1, x)  # warm-up, not timed
    with PeakMemory(device) as memory:
        sync(device)
        start = time.perf_counter()
        walk(1, 1 + timed_steps, x)
        sync(device)
        seconds = time.perf_counter() - start
    return {
        "timed_steps": timed_steps,
        "seconds_timed": seconds,
        "seconds_per_step": seconds / timed_steps,
        "peak_memory_bytes": memory.peak,
        "extrapolated": timed_steps < REFERENCE_STEPS,
    }


def update_name(solver: Solver) -> str:
    """The reverse update as the result files name it (``ddim``, ``ddpm``, ``bernoulli ancestral``)."""
    return "bernoulli ancestral" if isinstance(solver, BernoulliPosterior) else solver.name


# ------------------------------------------------------------------------------------------ the bench
def compose_bench(model: str, noise: str, size: int, overrides: list[str]) -> DictConfig:
    return compose_config("train", [f"model={model}", f"noise={noise}", f"data.size={size}", *overrides])


def measure(
    cfg: DictConfig,
    samples: list[int],
    steps: list[int],
    ref_steps: int,
    device: str = "cpu",
    matmul_n: int = 2048,
) -> dict[str, Any]:
    """Run the whole benchmark for a composed config; returns the result dict (what the JSON holds)."""
    dev = torch.device(device)
    torch.manual_seed(0)
    module = build_module(cfg.model, cfg.noise, cfg.sampler).to(dev).eval()
    kernel = module.kernel.to(dev)
    solver = instantiate(cfg.sampler).resolve_solver(kernel)  # sampler=ddim|ddpm|...: the update of ours
    # the released protocol's update: ancestral DDPM for the Gaussian kernel; the Bernoulli step is ancestral
    ref_solver = DDPM() if isinstance(kernel, GaussianKernel) else kernel.default_solver()
    size = int(cfg.data.size)
    image = torch.randn(1, int(cfg.data.channels), size, size, device=dev)

    with torch.inference_mode():
        x_t, t, img = module.example_input(image)
        x_t, t = x_t.to(dev), t.to(dev)
        macs_pass = count_macs(module, (x_t, t, img))  # image branch included: one reference step
        cond = module.denoiser.encode_condition(image)
        macs_denoiser = count_macs(module.denoiser, (x_t, t, cond))  # one step of ours, per sample
        macs_encode = max(macs_pass - macs_denoiser, 0)
        peak = matmul_peak(dev, matmul_n)

        reference = reference_step_seconds(module, kernel, ref_solver, image, ref_steps)
        reference["macs_per_step"] = macs_pass
        reference["mac_fraction_of_peak"] = macs_pass / reference["seconds_per_step"] / peak
        rows = []
        for s in samples:
            for k in steps:
                row = time_ours(module, kernel, solver, image, s, k)
                macs = macs_denoiser * s * k + macs_encode
                row["macs"] = macs
                row["mac_per_second"] = macs / row["seconds"]
                row["mac_fraction_of_peak"] = row["mac_per_second"] / peak
                row["reference_seconds"] = reference["seconds_per_step"] * REFERENCE_STEPS * s
                row["ratio_to_reference"] = row["seconds"] / row["reference_seconds"]
                rows.append(row)
                print(
                    f"S={s:3d} steps={k:5d}: {row['seconds']:.3f} s, {row['ratio_to_reference']:.2e} x reference, "
                    f"{100 * row['outside_network_share']:.1f}% outside the network",
                    flush=True,
                )
        peak = max(peak, matmul_peak(dev, matmul_n))  # again at the end: the best of both
        reference["mac_fraction_of_peak"] = macs_pass / reference["seconds_per_step"] / peak
        for row in rows:
            row["mac_fraction_of_peak"] = row["mac_per_second"] / peak
    return {
        "model": str(cfg.model.denoiser._target_).rsplit(".", 1)[-1],
        "noise": str(cfg.noise._target_).rsplit(".", 1)[-1],
        "sampling": update_name(solver),
        "reference_sampling": update_name(ref_solver),
        "size": size,
        "parameters": sum(p.numel() for p in module.denoiser.parameters()),
        "macs_per_forward": macs_denoiser,
        "macs_image_branch": macs_encode,
        "macs_per_reference_step": macs_pass,
        "matmul_peak_mac_per_second": peak,
        "matmul_n": matmul_n,
        "memory": "torch.cuda.max_memory_allocated" if dev.type == "cuda" else "peak RSS above start",
        "reference": reference,
        "rows": rows,
    }


def machine(device: str) -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def markdown(result: dict[str, Any]) -> str:
    ref = result["reference"]
    mib = 2**20
    m = result["machine"]
    lines = [
        f"# Sampling speed: {result['model']}, {result['noise']} ({result['sampling']}), "
        f"{result['size']} px, batch of one image",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads), "
        f"torch {m['torch']}, device `{m['device']}`{', ' + m['gpu'] if 'gpu' in m else ''}. "
        f"Run took {result['wall_seconds']:.0f} s.",
        "",
        f"Network: {result['parameters'] / 1e6:.2f} M parameters, {result['macs_per_forward'] / 1e6:.1f} M MACs "
        f"per forward pass (per sample), {result['macs_image_branch'] / 1e6:.2f} M MACs for the image branch (run once per image). "
        f"Measured matmul peak ({result['matmul_n']}^2 float32): "
        f"{result['matmul_peak_mac_per_second'] / 1e9:.1f} GMAC/s.",
        "",
        f"Reference (released MedSegDiff protocol, {result['reference_sampling']}): one sample at a time, "
        f"{REFERENCE_STEPS} steps, image branch every step: {ref['seconds_per_step'] * 1e3:.1f} ms per step "
        f"({100 * ref['mac_fraction_of_peak']:.1f}% of peak), i.e. "
        f"{ref['seconds_per_step'] * REFERENCE_STEPS:.1f} s per sample"
        + (
            f" -- **extrapolated linearly** from {ref['timed_steps']} timed steps to {REFERENCE_STEPS} x S."
            if ref["extrapolated"]
            else f" ({REFERENCE_STEPS} steps timed)."
        ),
        "",
        f"Peak memory: {result['memory']}. Fractions of the matmul peak use torch's FLOP counter (matmuls "
        "and convolutions, as written); above 100% means the convolutions ran faster than the counted MACs "
        "at the matmul rate would allow (e.g. oneDNN's Winograd/fast kernels), not a timing error.",
        "",
        "| S | steps | s / fused prediction | samples / s | ratio to reference | outside network "
        "| GMAC/s | % of matmul peak | peak memory (MiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['samples']} | {r['steps']} | {r['seconds']:.3f} | {r['samples_per_second']:.2f} "
            f"| {r['ratio_to_reference']:.2e} (1/{1 / r['ratio_to_reference']:.0f}) "
            f"| {100 * r['outside_network_share']:.1f}% | {r['mac_per_second'] / 1e9:.2f} "
            f"| {100 * r['mac_fraction_of_peak']:.1f}% | {r['peak_memory_bytes'] / mib:.1f} |"
        )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="medsegdiff", help="a conf/model/*.yaml diffusion model")
    parser.add_argument("--noise", default="gaussian", choices=["gaussian", "bernoulli"])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--full", action="store_true", help="S in {1, 5, 16}, steps in {5, ..., 1000}")
    parser.add_argument("--samples", type=int, nargs="+", help="S values (default: reduced grid)")
    parser.add_argument("--steps", type=int, nargs="+", help="step counts (default: reduced grid)")
    parser.add_argument("--ref-steps", type=int, default=100, help="reference steps timed (<= 1000)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(RESULTS / "bench_sampling"), help="output path stem")
    parser.add_argument(
        "overrides", nargs="*", help="extra Hydra overrides (e.g. model.denoiser.base_channels=16)"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.ref_steps <= REFERENCE_STEPS:
        parser.error(f"--ref-steps must lie in [1, {REFERENCE_STEPS}]")
    samples = args.samples or list(FULL_SAMPLES if args.full else REDUCED_SAMPLES)
    steps = args.steps or list(FULL_STEPS if args.full else REDUCED_STEPS)

    start = time.perf_counter()
    cfg = compose_bench(args.model, args.noise, args.size, args.overrides)
    result = measure(cfg, samples, steps, args.ref_steps, args.device)
    result["wall_seconds"] = time.perf_counter() - start
    result["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["machine"] = machine(args.device)
    argv_shown = sys.argv[1:] if argv is None else argv
    result["command"] = shlex.join(["python", "experiments/bench_sampling.py", *argv_shown])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
