#!/usr/bin/env bash
# Every model of the zoo on the real Kvasir-SEG subset (../shared/data/kvasir-seg: 300 images, seeded
# 240 / 30 / 30 split) for the same budget: 128 px, batch 8, 300 optimiser steps (10 epochs), AdamW 2e-3 with
# warm-up and cosine decay, EMA; one validation at the end picks nothing (one checkpoint); test on the 30
# test images with S = 5 samples at 25 steps (DDIM for the Gaussian kernel), mean fusion, except the U-Net
# baseline (one deterministic prediction). Widths are cut to CPU scale (about 1-5 M parameters each) and
# stated in the table's overrides. Writes experiments/results/zoo_kvasir.{md,png,json}.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${KVASIR_ROOT:-../shared/data/kvasir-seg}
OUT=experiments/runs/zoo_kvasir
rm -rf "$OUT"
COMMON=(data=kvasir data.root="$ROOT" data.size=128 data.batch_size=8 data.eval_batch_size=8 data.num_workers=0
    data.cache_dir="$OUT/cache" trainer.max_epochs=10 trainer.check_val_every_n_epoch=10 +trainer.limit_val_batches=1
    model.optimizer.lr=2e-3 +model.scheduler._target_=diffseg_lightning.methods.warmup_cosine
    +model.scheduler._partial_=true +model.scheduler.warmup_steps=30 sampler.num_samples=5 sampler.num_steps=25
    logger=csv)
run() { local name=$1; shift; .venv/bin/diffseg-train "${COMMON[@]}" "$@" hydra.run.dir="$OUT/$name"; }
run unet model=unet 'model.net.channels=[16,32,64,128,256]' model.optimizer.lr=1e-3
run medsegdiff model=medsegdiff noise.objective=x0 model.denoiser.base_channels=16 'model.denoiser.attention_levels=[false,false,false]'
# berdiff and dtunet: the settings the README table was measured with, before issue 20 changed their defaults
# (Bernoulli objective x0; DTUNet's aligned image path); re-measured with the new defaults under issue 20
run berdiff model=berdiff noise=bernoulli_eps 'model.denoiser.channels=[16,32,64]'
run medsegdiff_v2 model=medsegdiff_v2 noise.objective=x0 model.denoiser.base_channels=16 model.denoiser.ssformer_blocks=1
run mbdiff model=mbdiff noise.objective=x0 noise.learn_variance=true sampler.fusion=evolution model.denoiser.base_channels=16
run dtunet model=dtunet noise.objective=x0 model.denoiser.embed_dim=32 model.denoiser.fusion=cross_attention \
    model.denoiser.positions=input
.venv/bin/python experiments/compare.py "$OUT" --out experiments/results/zoo_kvasir
