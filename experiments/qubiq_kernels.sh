#!/usr/bin/env bash
# Gaussian against Bernoulli (BerDiff) noise on the real QUBIQ kidney subset (3 raters per case):
# the same MedSegDiff network (base width 16, no attention), data (64 px), seed and budget (300 steps
# of batch 7), each kernel with its paper objective (noise=gaussian_epsilon, noise=bernoulli_eps: the defaults are
# x0 since issue 20), MedSegDiff's auxiliary head off (its default), plus the Gaussian kernel with the x_0 objective.
# Writes experiments/results/qubiq_kidney_kernels.{md,png,json}. About 10 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${QUBIQ_ROOT:-../shared/data/qubiq/kidney}
OUT=experiments/runs/qubiq_kernels
rm -rf "$OUT"
.venv/bin/diffseg-train -m data=qubiq data.root="$ROOT" data.size=64 data.batch_size=7 data.num_workers=0 \
    model.denoiser.base_channels=16 'model.denoiser.attention_levels=[false,false,false]' model.optimizer.lr=2e-3 \
    trainer.max_epochs=150 trainer.check_val_every_n_epoch=50 logger=csv \
    'noise=gaussian_epsilon,bernoulli_eps' hydra.sweep.dir="$OUT/kernels"
.venv/bin/diffseg-train data=qubiq data.root="$ROOT" data.size=64 data.batch_size=7 data.num_workers=0 \
    model.denoiser.base_channels=16 'model.denoiser.attention_levels=[false,false,false]' model.optimizer.lr=2e-3 \
    trainer.max_epochs=150 trainer.check_val_every_n_epoch=50 logger=csv noise=gaussian noise.objective=x0 \
    hydra.run.dir="$OUT/gaussian_x0"
.venv/bin/python experiments/compare.py "$OUT" --out experiments/results/qubiq_kidney_kernels
