#!/bin/bash
# A text-encoder variant end to end on a finished demo (docs/results/binding.md §10): train the encoder as the demo
# does (one thread, 2 min 45 s), write a latent cache with it and the demo's VAE, then the demo's U-Net stage and
# its adherence figures (docs/results/unet_stage.sh). From the repository root, after `make demo`:
#   bash docs/results/binding_te_stage.sh relneg_all \
#     --model.init_args.hard_negatives '{shape: [circle, square, triangle, star, diamond], relation: [left of, right of, above, below]}' \
#     --model.init_args.hard_negatives_per_caption null
# DEMO (default checkpoints/shapes) is the demo's run folder; results go to checkpoints/te-stage/NAME/.
set -euo pipefail
NAME=$1; shift
DEMO=${DEMO:-checkpoints/shapes}
OUT=checkpoints/te-stage/$NAME
rm -rf "$OUT"; mkdir -p "$OUT/run/parts"
OMP_NUM_THREADS=1 .venv/bin/ldm fit --config configs/clip/shapes.yaml --export-to "$OUT/run/parts/text_encoder" \
  --trainer.max_time 00:00:02:45 --trainer.max_steps 5000 --trainer.default_root_dir "$OUT/clip" "$@" > "$OUT/fit.log" 2>&1
ln -sfn "$(realpath "$DEMO/parts/vae")" "$OUT/run/parts/vae"
ln -sfn "$(realpath "$DEMO/parts/probe")" "$OUT/run/parts/probe"
.venv/bin/ldm cache --vae "$OUT/run/parts/vae" --text-encoder "$OUT/run/parts/text_encoder" --data datasets/shapes \
  --out "$OUT/run/cache" --max-samples 30000 > "$OUT/cache.log" 2>&1
RUN=$OUT/run bash docs/results/unet_stage.sh "te-$NAME" 00:00:08:50
