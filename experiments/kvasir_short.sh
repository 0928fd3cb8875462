#!/usr/bin/env bash
# A short training on the real Kvasir-SEG subset (../shared/data/kvasir-seg: 300 images, seeded 240 / 30 / 30
# split) at 128 px, with the array cache: MedSegDiff (base width 16, no attention), Gaussian kernel, x_0
# objective, 20 epochs of batch 8 (600 steps), test with S = 5 at 25 DDIM steps.
# Writes experiments/results/kvasir_short.{md,png,json}. About 15 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${KVASIR_ROOT:-../shared/data/kvasir-seg}
OUT=experiments/runs/kvasir_short
rm -rf "$OUT"
.venv/bin/diffseg-train data=kvasir data.root="$ROOT" data.size=128 data.batch_size=8 data.num_workers=0 \
    data.cache_dir="$OUT/cache" noise.objective=x0 model.denoiser.base_channels=16 \
    'model.denoiser.attention_levels=[false,false,false]' model.optimizer.lr=2e-3 \
    trainer.max_epochs=20 trainer.check_val_every_n_epoch=5 logger=csv hydra.run.dir="$OUT/train"
.venv/bin/python experiments/compare.py "$OUT/train" --out experiments/results/kvasir_short
