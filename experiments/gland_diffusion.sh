#!/usr/bin/env bash
# Instance-aware gland diffusion (Sun, Huang & Zheng, MICCAI 2023) against the U-Net + connected components
# baseline on the real GlaS subset (../shared/data/glas: 16 train_* images, 20% held out for validation, so 13
# for training and 3 for validation; tested on all 6 testA and 4 testB images at half resolution).
# REDUCED budget for a 2-core CPU (about 10 minutes in all): 128 x 128 images, batch 4, 60 epochs (180 steps: 3 batches per epoch)
# for both methods, the last checkpoint tested; the U-Net at widths 16-256; the diffusion model with a small network (ResNet-10-like widths
# 16-128, FPN 64, 3 decoder stages of width 64, 100 proposals, RoIAlign with 1 sample per bin) and lr 5e-4, 4 DDIM
# steps at test time. A full run uses the experiments as written: experiment=gland_diffusion_glas (ResNet-50-FPN,
# 500 proposals, 6 stages, 256 px, 300 epochs, on a GPU) and experiment=gland_unet_glas.
# Writes experiments/results/gland_diffusion_glas.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${GLAS_ROOT:-../shared/data/glas}
OUT=experiments/runs/gland_diffusion
rm -rf "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
COMMON=(data.root="$ROOT" data.size=128 data.batch_size=4 data.eval_batch_size=4 data.num_workers=0
        trainer.max_epochs=60 trainer.check_val_every_n_epoch=30 trainer.accelerator=cpu
        callbacks.model_checkpoint.monitor=null logger=csv '~callbacks.progress_bar')
SMALL=(model.num_proposals=100 model.net.fpn_channels=64 model.net.num_stages=3 model.net.nhead=4
       model.net.dim_feedforward=256 model.net.dim_dynamic=16 model.net.sampling_ratio=1
       model.net.mask_branch_channels=32 model.net.mask_branch_convs=2 model.net.backbone.block=basic
       'model.net.backbone.layers=[1,1,1,1]' 'model.net.backbone.block_inplanes=[16,32,64,128]'
       model.optimizer.lr=5e-4)
start=$(date +%s)
nice -n 10 .venv/bin/diffseg-train experiment=gland_unet_glas "${COMMON[@]}" 'model.net.channels=[16,32,64,128,256]' hydra.run.dir="$OUT/unet"
nice -n 10 .venv/bin/diffseg-train experiment=gland_diffusion_glas "${COMMON[@]}" "${SMALL[@]}" hydra.run.dir="$OUT/diffusion"
.venv/bin/python experiments/gland_diffusion.py --runs "$OUT" --seconds $(( $(date +%s) - start )) \
    --command "bash experiments/gland_diffusion.sh" --out experiments/results/gland_diffusion_glas
