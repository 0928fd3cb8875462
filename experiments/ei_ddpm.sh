#!/usr/bin/env bash
# EI-DDPM against a single DDPM on the stacked modalities and against averaging the four paths, on the
# synthetic four-modality tumours (reduced budget, about 10 minutes on 2 busy CPU cores); see
# experiments/ei_ddpm.py for the settings. Writes experiments/results/ei_ddpm_synthetic.{json,md}.
#   experiments/ei_ddpm.sh                       # the recorded reduced budget
#   experiments/ei_ddpm.sh --num-train 6400 --epochs 5 --num-test 256 --steps 25 --samples 5   # a full run
set -euo pipefail
cd "$(dirname "$0")/.."
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" .venv/bin/python experiments/ei_ddpm.py "$@"
