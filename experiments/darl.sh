#!/usr/bin/env bash
# DARL (Kim, Oh & Ye, ICLR 2023) on the real DRIVE subset (../shared/data/drive: 8 training, 6 test images),
# next to Frangi vesselness (threshold tuned on the training images) and the second observer; Dice, IoU and
# accuracy inside the field of view. Reduced budget: MINUTES (default 6) of CPU training at 256 px with tiny
# widths. Writes experiments/results/darl_drive.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${MINUTES:-6}
rm -rf experiments/runs/darl_drive
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=offline nice -n 10 .venv/bin/python experiments/darl.py \
    --root "${DRIVE_ROOT:-../shared/data/drive}" --minutes "$MINUTES"
