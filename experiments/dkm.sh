#!/usr/bin/env bash
# Diffusion Kinetic Model (Lv et al., MICCAI 2023) on synthetic DCE-MRI: Dice of DKM (pre-contrast image +
# features of the pretrained pre -> post-contrast DDPM) against the same segmentation network without f_dm
# (the paper's ablation, pre-contrast image only) and against that network seeing all four phases.
# Two settings of the data: "faint" (conf/data/synthetic_dce.yaml as written: lesion contrast before
# injection U(0.05, 0.25)) and "visible" (data.pre_contrast=[0.2,0.5]).
# REDUCED budget for a busy 2-core CPU (about 7 minutes per setting): 32 px, DDPM pretrained for 250 steps,
# each segmentation network trained for one epoch of 3200 cases (200 steps of batch 16), 128 test cases.
# A full run: the experiments as written (64 px, 1500 DDPM steps, conf/experiment/dkm_synthetic*.yaml) with
# several epochs per segmentation network and several seeds.
#   SETTINGS="faint visible" RUNS="dkm no_fdm all_phases" experiments/dkm.sh   (the defaults)
# Writes experiments/results/dkm.{json,md} from every run found under experiments/runs/dkm.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=experiments/runs/dkm
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SEG_CASES=${SEG_CASES:-3200}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-250}
SETTINGS=${SETTINGS:-faint visible}
RUNS=${RUNS:-dkm no_fdm all_phases}
COMMON=(seed=42 data.size=32 data.num_train=$SEG_CASES data.num_val=16 data.num_test=128 trainer.max_epochs=1
        logger=csv '~callbacks.progress_bar' trainer.enable_model_summary=false trainer.accelerator=cpu)
declare -A DATA=([faint]="" [visible]="data.pre_contrast=[0.2,0.5]")
declare -A EXPERIMENT=([dkm]="experiment=dkm_synthetic model.pretrain_steps=$PRETRAIN_STEPS"
                       [no_fdm]="experiment=dkm_synthetic_nofdm" [all_phases]="experiment=dkm_synthetic_allphases")
for setting in $SETTINGS; do
  for name in $RUNS; do
    dir="$OUT/$setting/$name"
    rm -rf "$dir"
    mkdir -p "$dir"
    start=$SECONDS
    # shellcheck disable=SC2086  # the override strings are split on purpose
    .venv/bin/python -m diffseg_lightning.train "${COMMON[@]}" ${EXPERIMENT[$name]} ${DATA[$setting]} \
      hydra.run.dir="$dir" > "$dir.log" 2>&1
    echo "$((SECONDS - start))" > "$dir/wall_seconds.txt"
  done
done
.venv/bin/python experiments/dkm.py "$OUT" --out experiments/results/dkm --pretrain-steps "$PRETRAIN_STEPS"
