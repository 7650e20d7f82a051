#!/bin/bash
# tiny-budget smoke run of the documented openmoji make sequence (docs/results/scale.md), one scratch RUN_DIR
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
export PYTHONPATH=$PWD OMP_WAIT_POLICY=PASSIVE
R=runs/smoke/openmoji
rm -rf $R; touch /tmp/scale-stamp
M="make --no-print-directory VENV=.venv STAMP=/tmp/scale-stamp DATA=openmoji RUN_DIR=$R"
S="--trainer.val_check_interval 20 --trainer.limit_val_batches 1 --trainer.enable_progress_bar false"
echo "start $(date -Is) load $(cat /proc/loadavg)"
/usr/bin/time -v $M train-ldm VAE_ARGS="--trainer.max_steps 20 $S" CLIP_ARGS="--trainer.max_steps 20 $S" \
  CACHE_ARGS="--max-samples 256" LDM_ARGS="--config configs/trainer/ddp-cpu.yaml --trainer.max_steps 20 $S"
echo "trained $(date -Is) load $(cat /proc/loadavg)"
.venv/bin/ldm generate --pipeline $R/pipeline --prompt "cactus emoji" --prompt "lemon emoji" \
  --prompt "blue heart emoji" --prompt "red heart emoji" --n 2 --steps 5 --out $R/samples/grid.png
.venv/bin/ldm fid --pipeline $R/pipeline --data datasets/openmoji --n 20 --steps 5 --guidance 4 \
  --batch-size 20 --cache-dir '' --out $R/fid/fid.json
echo "end $(date -Is) load $(cat /proc/loadavg)"
