#!/usr/bin/env bash
# Train the default experiment with 3 annotators per synthetic image, then evaluate its best
# checkpoint at several DDIM step counts and write the leaderboard
# (experiments/results/synthetic_3annotators_steps.{md,png,json}).
# Usage: bash experiments/steps_leaderboard.sh   (after `make install`; about 12 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=experiments/runs/steps_leaderboard
rm -rf "$OUT"
"$BIN/diffseg-train" experiment=medsegdiff_synthetic data.num_annotators=3 logger=csv paths.log_dir="$OUT" hydra.run.dir="$OUT/train"
"$BIN/diffseg-eval" -m ckpt_path="$OUT/train/checkpoints/best.ckpt" sampler.num_steps=5,10,25,50 \
    logger=none hydra.sweep.dir="$OUT/eval"
"$BIN/python" experiments/compare.py "$OUT/eval" --out experiments/results/synthetic_3annotators_steps
