#!/bin/bash
# reduced-budget openmoji VAE run: the measured config, fixed 3000 steps, one thread
cd "$(git rev-parse --show-toplevel)"
export PYTHONPATH=$PWD OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1
echo "start $(date -Is) load $(cat /proc/loadavg)"
/usr/bin/time -v .venv/bin/ldm fit --config configs/vae/openmoji.yaml --data.init_args.data_dir datasets/openmoji \
  --trainer.default_root_dir runs/openmoji/vae --trainer.max_steps 3000 --trainer.max_time 00:03:00:00 --trainer.enable_progress_bar false
.venv/bin/ldm export --ckpt runs/openmoji/vae/checkpoints/last.ckpt --out runs/openmoji/parts/vae
echo "end $(date -Is) load $(cat /proc/loadavg)"
