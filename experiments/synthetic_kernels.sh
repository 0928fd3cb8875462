#!/usr/bin/env bash
# Gaussian against Bernoulli (BerDiff) noise on synthetic multi-annotator data (3 annotators per image):
# the default experiment's MedSegDiff network, data (64 px), seed and budget (300 steps of batch 16),
# sampled with S=5 at 25 steps; the Bernoulli kernel with its paper objective (eps, KL + BCE), the
# Gaussian kernel with x_0 (the default experiment) and with epsilon.
# Writes experiments/results/synthetic_kernels.{md,png,json}. About 15 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=experiments/runs/synthetic_kernels
rm -rf "$OUT"
COMMON=(experiment=medsegdiff_synthetic data.num_annotators=3 data.num_train=4800 data.num_test=32 logger=csv)
.venv/bin/diffseg-train "${COMMON[@]}" noise=bernoulli noise.objective=eps hydra.run.dir="$OUT/bernoulli_eps"
.venv/bin/diffseg-train "${COMMON[@]}" noise=gaussian noise.objective=x0 hydra.run.dir="$OUT/gaussian_x0"
.venv/bin/diffseg-train "${COMMON[@]}" noise=gaussian noise.objective=epsilon hydra.run.dir="$OUT/gaussian_epsilon"
.venv/bin/python experiments/compare.py "$OUT" --out experiments/results/synthetic_kernels
