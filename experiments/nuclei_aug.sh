#!/usr/bin/env bash
# Yu et al. (MICCAI 2023) diffusion-based augmentation for nuclei on the real MoNuSeg subset, reduced CPU budget
# (about 10 minutes on a shared 2-core machine): generators, synthetic pairs, and the downstream network with and
# without them at label fractions 1.0 and 0.2. Writes experiments/results/nuclei_aug.{json,md}.
# Larger budgets: pass e.g. --steps-gen 20000 --steps-seg 5000 --pairs 200 --sample-steps 100 --fractions 1 0.5 0.2 0.1
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec nice -n 10 .venv/bin/python experiments/nuclei_aug.py "$@"
