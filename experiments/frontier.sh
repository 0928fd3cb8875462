#!/usr/bin/env bash
# The quality-speed frontier (issue "Speed and scale", part 2): train once, then evaluate the same checkpoint at
# 5, 10, 25, 50, 100 and 1000 steps with three reverse updates of the Gaussian kernel (DDIM eta 0, ancestral DDPM
# on the respaced grid, DPM-Solver++(2M)), S = 5 samples per image, mean fusion.
#   1. synthetic: the default experiment (MedSegDiff, base 16, x_0 objective, 64 px) with 3 annotators (GED),
#      16 test images;
#   2. Kvasir-SEG (the real subset in ../shared/data): the same network at 64 px, 600 steps of batch 8; the first
#      16 of its 30 test images (trainer.limit_test_batches=1 with eval batches of 16).
# The 1000-step points dominate the cost (3 x 2 x 1000 steps x 16 images x S = 5). Writes
# experiments/results/frontier_{synthetic,kvasir}.{md,json,png}. About 45 minutes on 2 idle CPU cores.
# Usage: bash experiments/frontier.sh [synthetic|kvasir|all]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
WHICH=${1:-all}
GRID=(noise.sampling=ddim,ddpm,dpmpp_2m sampler.num_steps=5,10,25,50,100,1000 sampler.num_samples=5)

if [[ $WHICH == synthetic || $WHICH == all ]]; then
    OUT=experiments/runs/frontier_synthetic
    rm -rf "$OUT"
    "$BIN/diffseg-train" experiment=medsegdiff_synthetic data.num_annotators=3 data.num_test=16 \
        logger=csv paths.log_dir="$OUT" hydra.run.dir="$OUT/train"
    "$BIN/diffseg-eval" -m ckpt_path="$OUT/train/checkpoints/best.ckpt" "${GRID[@]}" \
        logger=none hydra.sweep.dir="$OUT/eval"
    "$BIN/python" experiments/frontier.py "$OUT/eval" --out experiments/results/frontier_synthetic \
        --title "Frontier: MedSegDiff (base 16), synthetic 64 px, 3 annotators" \
        --command "bash experiments/frontier.sh synthetic"
fi

if [[ $WHICH == kvasir || $WHICH == all ]]; then
    ROOT=${KVASIR_ROOT:-../shared/data/kvasir-seg}
    OUT=experiments/runs/frontier_kvasir
    rm -rf "$OUT"
    "$BIN/diffseg-train" data=kvasir data.root="$ROOT" data.size=64 data.batch_size=8 data.eval_batch_size=16 \
        data.num_workers=0 data.cache_dir="$OUT/cache" noise.objective=x0 model.denoiser.base_channels=16 \
        'model.denoiser.attention_levels=[false,false,false]' model.optimizer.lr=2e-3 \
        trainer.max_epochs=20 trainer.check_val_every_n_epoch=5 logger=csv hydra.run.dir="$OUT/train"
    "$BIN/diffseg-eval" -m ckpt_path="$OUT/train/checkpoints/best.ckpt" "${GRID[@]}" \
        trainer.limit_test_batches=1 logger=none hydra.sweep.dir="$OUT/eval"
    "$BIN/python" experiments/frontier.py "$OUT/eval" --out experiments/results/frontier_kvasir \
        --title "Frontier: MedSegDiff (base 16), Kvasir-SEG 64 px, first 16 test images" \
        --command "bash experiments/frontier.sh kvasir"
fi
