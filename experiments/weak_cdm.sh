#!/usr/bin/env bash
# CDM (Hu et al., MICCAI 2023) against Grad-CAM on synthetic data and on the real Kvasir-SEG subset (polyp
# against polyp-free crops), and CDM's time per image against the full reverse process.
# REDUCED budget for a shared 2-core CPU (about 10 minutes): 150 training steps of batch 16 per model at
# 32 px, 32 synthetic test images, the full reverse chain timed on its first 400 of 4000 steps on 2 images
# and extrapolated. A full run: --steps 20000 --size 64 --num-test 128 --full-images 8 (no --full-steps),
# on a GPU.
# Writes experiments/results/weak_cdm.{json,md,png} (the png: maps of the first test images); the runs go to
# experiments/runs/weak_cdm/. "--figure-only" redraws the md and png from the stored runs and json.
set -euo pipefail
cd "$(dirname "$0")/.."
OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python experiments/weak_cdm.py \
  --steps 150 --size 32 --num-test 32 --full-images 2 --full-steps 400 "$@"
