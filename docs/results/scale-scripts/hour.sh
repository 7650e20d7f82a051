#!/bin/bash
# The one-hour openmoji run of docs/results/scale.md §1, from a fresh clone: install, data, the VAE and the text
# encoder side by side (one core each, as `make demo` does), the latent cache, the U-Net in 2 DDP processes, the
# export, the grid and the FD/CLIP-score evaluation. Run it from the root of a fresh clone: bash docs/results/scale-scripts/hour.sh
set -euo pipefail
export OMP_WAIT_POLICY=PASSIVE
VAE_TIME=${VAE_TIME:-00:00:12:00}
CLIP_TIME=${CLIP_TIME:-00:00:15:00}
LDM_TIME=${LDM_TIME:-00:00:32:00}
Q="--trainer.enable_progress_bar false"
R=checkpoints/openmoji
mkdir -p $R/logs
stamp() { echo "$1 $(date +%s) $(date -Is) load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a $R/logs/hour-times.txt; }
stamp start
make install > $R/logs/install.log 2>&1
stamp installed
make data DATA=openmoji > $R/logs/data.log 2>&1
stamp data
# the two parts that need only the images, one core each
OMP_NUM_THREADS=1 make -j2 --no-print-directory DATA=openmoji train-vae train-clip \
  VAE_ARGS="--trainer.max_time $VAE_TIME $Q" CLIP_ARGS="--trainer.max_time $CLIP_TIME $Q" > $R/logs/vae-clip.log 2>&1
stamp parts
make --no-print-directory DATA=openmoji $R/cache/info.json > $R/logs/cache.log 2>&1
stamp cache
make --no-print-directory DATA=openmoji train-ldm \
  LDM_ARGS="--config configs/trainer/ddp-cpu.yaml --trainer.max_time $LDM_TIME $Q" > $R/logs/train-ldm.log 2>&1
stamp ldm
.venv/bin/ldm generate --pipeline $R/pipeline --prompt "cactus emoji" --prompt "lemon emoji" \
  --prompt "birthday cake emoji" --prompt "blue heart emoji" --prompt "red heart emoji" \
  --prompt "a large blue apple emoji in the centre" --n 4 --steps 20 --guidance 4 \
  --out $R/samples/grid.png > $R/logs/generate.log 2>&1
stamp grid
.venv/bin/ldm fid --pipeline $R/pipeline --data datasets/openmoji --n 200 --steps 20 --guidance 4 \
  --out $R/fid/fid.json > $R/logs/fid.log 2>&1
stamp end
