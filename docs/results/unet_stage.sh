#!/bin/bash
# The demo's U-Net stage alone, on a finished demo's parts and cache, then its adherence figures (docs/results.md,
# 2026-12-07: batch 16 vs 32 per process). From the repository root, after `make demo`:
#   bash docs/results/unet_stage.sh b32 00:00:07:00
#   bash docs/results/unet_stage.sh b16 00:00:07:00 --data.init_args.batch_size 16
# RUN (default checkpoints/shapes) is the demo's run folder; results go to checkpoints/unet-stage/NAME/.
set -euo pipefail
NAME=$1; TIME=$2; shift 2
RUN=${RUN:-checkpoints/shapes}
OUT=checkpoints/unet-stage/$NAME
rm -rf "$OUT"; mkdir -p "$OUT"
OMP_NUM_THREADS=1 .venv/bin/ldm fit --config configs/ldm/shapes.yaml --config configs/trainer/ddp-cpu.yaml \
  --model.init_args.vae_path "$RUN/parts/vae" --model.init_args.text_encoder_path "$RUN/parts/text_encoder" \
  --data.init_args.cache_dir "$RUN/cache" --trainer.default_root_dir "$OUT/ldm" --export-to "$OUT/pipeline" \
  --trainer.max_time "$TIME" --trainer.max_steps 10000 "$@" > "$OUT/fit.log" 2>&1
.venv/bin/ldm adherence --pipeline "$OUT/pipeline" --probe "$RUN/parts/probe" --n 200 --pair-n 200 \
  --out "$OUT/adherence.json" | tail -8
