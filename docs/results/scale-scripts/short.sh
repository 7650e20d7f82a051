#!/bin/bash
# reduced-budget openmoji sequence at fixed step counts (docs/results/scale.md): CLIP, cache, U-Net, evaluation;
# reuses the 3000-step VAE of vae.sh. STAGE picks one stage.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
export PYTHONPATH=$PWD OMP_WAIT_POLICY=PASSIVE
L=.venv/bin/ldm; R=runs/openmoji
S="--trainer.max_time 00:03:00:00 --trainer.enable_progress_bar false"
echo "$STAGE start $(date -Is) load $(cat /proc/loadavg)"
case $STAGE in
clip)
  rm -rf $R/clip
  /usr/bin/time -v $L fit --config configs/clip/openmoji.yaml --data.init_args.data_dir datasets/openmoji \
    --trainer.default_root_dir $R/clip --trainer.max_steps ${STEPS:-1000} --trainer.val_check_interval ${STEPS:-1000} $S
  $L export --ckpt $R/clip/checkpoints/last.ckpt --out $R/parts/text_encoder ;;
cache)
  /usr/bin/time -v $L cache --vae $R/parts/vae --text-encoder $R/parts/text_encoder --data datasets/openmoji --out $R/cache ;;
ldm)
  rm -rf $R/ldm
  /usr/bin/time -v $L fit --config configs/ldm/openmoji.yaml --model.init_args.vae_path $R/parts/vae \
    --model.init_args.text_encoder_path $R/parts/text_encoder --data.init_args.cache_dir $R/cache \
    --trainer.default_root_dir $R/ldm --trainer.max_steps ${STEPS:-600} --trainer.val_check_interval ${STEPS:-600} $S
  $L export --ckpt $R/ldm/checkpoints/last.ckpt --out $R/pipeline ;;
eval)
  $L generate --pipeline $R/pipeline --prompt "cactus emoji" --prompt "lemon emoji" --prompt "birthday cake emoji" \
    --prompt "blue heart emoji" --prompt "red heart emoji" --prompt "a large blue apple emoji in the centre" \
    --n 4 --steps 20 --guidance 4 --seed 0 --out $R/samples/grid.png
  /usr/bin/time -v $L fid --pipeline $R/pipeline --data datasets/openmoji --n 200 --steps 20 --guidance 4 \
    --cache-dir '' --out $R/fid/fid.json ;;
esac
echo "$STAGE end $(date -Is) load $(cat /proc/loadavg)"
