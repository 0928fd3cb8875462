#!/usr/bin/env bash
# The quality-speed frontier (issue "Speed and scale", part 2): train once, then evaluate the same checkpoint at
# 5, 10, 25, 50, 100 and 1000 steps with three reverse updates of the Gaussian kernel (DDIM eta 0, ancestral DDPM
# on the respaced grid, DPM-Solver++(2M)), S = 5 samples per image, mean fusion, on the first $CASES test images.
#   synthetic: the default experiment (MedSegDiff, base 16, x_0 objective, 64 px) with 3 annotators (GED);
#   kvasir:    Kvasir-SEG (the real subset in ../shared/data) with the same network at 64 px, 600 steps of batch 8.
# A run directory that already holds a trained checkpoint is reused (delete it to retrain). The 1000-step points
# dominate the cost (3 x 1000 steps x $CASES images x S = 5). Writes experiments/results/frontier_<name>.{md,json,png}.
# Usage: CASES=8 bash experiments/frontier.sh [synthetic|kvasir|all]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
WHICH=${1:-all}
CASES=${CASES:-8}
GRID=(sampler=ddim,ddpm,dpmpp_2m sampler.num_steps=5,10,25,50,100,1000 sampler.num_samples=5)

frontier() {  # name, title, training overrides..., then -- and the eval's data overrides
    local name=$1 title=$2; shift 2
    local train=() data=()
    while [[ $1 != -- ]]; do train+=("$1"); shift; done; shift
    data=("$@")
    local out=experiments/runs/frontier_$name
    if [[ ! -f $out/train/checkpoints/best.ckpt ]]; then
        rm -rf "$out"
        "$BIN/diffseg-train" "${train[@]}" logger=csv paths.log_dir="$out" hydra.run.dir="$out/train"
    fi
    rm -rf "$out/eval"
    "$BIN/diffseg-eval" -m ckpt_path="$out/train/checkpoints/best.ckpt" "${GRID[@]}" "${data[@]}" \
        +trainer.limit_test_batches=1 logger=none hydra.sweep.dir="$out/eval"
    "$BIN/python" experiments/frontier.py "$out/eval" --out "experiments/results/frontier_$name" \
        --title "$title" --command "CASES=$CASES bash experiments/frontier.sh $name"
}

if [[ $WHICH == synthetic || $WHICH == all ]]; then
    frontier synthetic "Frontier: MedSegDiff (base 16), synthetic 64 px, 3 annotators, first $CASES test images" \
        experiment=medsegdiff_synthetic data.num_annotators=3 data.num_test=16 -- \
        data=synthetic data.num_annotators=3 data.num_test=16 data.eval_batch_size="$CASES"
fi

if [[ $WHICH == kvasir || $WHICH == all ]]; then
    ROOT=${KVASIR_ROOT:-../shared/data/kvasir-seg}
    OUT=experiments/runs/frontier_kvasir
    KVASIR=(data=kvasir data.root="$ROOT" data.size=64 data.num_workers=0 data.cache_dir="$OUT/cache")
    frontier kvasir "Frontier: MedSegDiff (base 16), Kvasir-SEG 64 px, first $CASES test images" \
        "${KVASIR[@]}" data.batch_size=8 noise.objective=x0 model.denoiser.base_channels=16 \
        'model.denoiser.attention_levels=[false,false,false]' model.optimizer.lr=2e-3 \
        trainer.max_epochs=20 trainer.check_val_every_n_epoch=5 -- \
        "${KVASIR[@]}" data.eval_batch_size="$CASES"
fi
