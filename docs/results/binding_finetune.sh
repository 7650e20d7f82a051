#!/bin/bash
# docs/results/binding_finetune.sh NAME CACHE [extra fit args]: fine-tune the demo U-Net 300 steps (batch 32, lr 5e-4) on CACHE, export, measure
set -e
# run from the repository root; OUT (default /tmp/binding) holds the runs; LDM the ldm command
OUT=${OUT:-/tmp/binding}; LDM=${LDM:-ldm}; DEMO=${DEMO:-checkpoints/shapes}; DATA=${DATA:-datasets/shapes}
export PYTHONPATH=$PWD OMP_WAIT_POLICY=PASSIVE
NAME=$1; CACHE=$2; shift 2
R=$OUT/$NAME
nice -n 10 /usr/bin/time -v $LDM fit --config configs/ldm/shapes.yaml \
  --model.init_args.init_from $DEMO/pipeline --model.init_args.vae_path null \
  --model.init_args.text_encoder_path null --model.init_args.denoiser null --model.init_args.noise_schedule null --model.init_args.optimizer '{lr: 5.0e-4}' \
  --model.init_args.lr_schedule '{warmup_steps: 20, min_lr_ratio: 0.05}' --model.init_args.sample_every_n_val 0 \
  --data.init_args.cache_dir $CACHE --trainer.default_root_dir $R --trainer.max_steps 300 \
  --trainer.max_time 00:00:30:00 --trainer.val_check_interval 300 --trainer.limit_val_batches 2 "$@" > $R.fit.log 2>&1
nice -n 10 $LDM export --ckpt $R/checkpoints/last.ckpt --out $R/pipeline >> $R.fit.log 2>&1
nice -n 10 $LDM adherence --pipeline $R/pipeline --probe $OUT/probe --data $DATA \
  --n 200 --pair-n 100 --out $R/adherence.json --pair-grid $R/pairs.png > $R.adh.log 2>&1
grep -v Warn $R.adh.log | tail -12
