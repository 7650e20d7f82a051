#!/bin/bash
# docs/results/binding_swap.sh NAME: the demo pipeline with the text encoder $OUT/NAME/text_encoder swapped in, its cache, then the
# demo U-Net fine-tuned 400 steps (lr 1e-3) on it and measured
set -e
# run from the repository root
export PYTHONPATH=$PWD OMP_WAIT_POLICY=PASSIVE
OUT=${OUT:-/tmp/binding}; LDM=${LDM:-ldm}; DEMO=${DEMO:-checkpoints/shapes}
NAME=$1; P=$OUT/pipe_$NAME
rm -rf $P && cp -r $DEMO/pipeline $P && rm -rf $P/text_encoder && cp -r $OUT/$NAME/text_encoder $P/text_encoder
nice -n 10 $LDM cache --vae $P/vae --text-encoder $P/text_encoder --data ${DATA:-datasets/shapes} --out $OUT/cache_$NAME --max-samples 10000 > $OUT/cache_$NAME.log 2>&1
R=$OUT/swap_$NAME
nice -n 10 /usr/bin/time -v $LDM fit --config configs/ldm/shapes.yaml \
  --model.init_args.init_from $P --model.init_args.vae_path null \
  --model.init_args.text_encoder_path null --model.init_args.denoiser null --model.init_args.noise_schedule null --model.init_args.optimizer '{lr: 1.0e-3}' \
  --model.init_args.lr_schedule '{warmup_steps: 20, min_lr_ratio: 0.05}' --model.init_args.sample_every_n_val 0 \
  --data.init_args.cache_dir $OUT/cache_$NAME --trainer.default_root_dir $R --trainer.max_steps 400 \
  --trainer.max_time 00:00:30:00 --trainer.val_check_interval 400 --trainer.limit_val_batches 2 > $R.fit.log 2>&1
nice -n 10 $LDM export --ckpt $R/checkpoints/last.ckpt --out $R/pipeline >> $R.fit.log 2>&1
nice -n 10 $LDM adherence --pipeline $R/pipeline --probe $OUT/probe --data ${DATA:-datasets/shapes} \
  --n 200 --pair-n 100 --out $R/adherence.json --pair-grid $R/pairs.png > $R.adh.log 2>&1
grep -v Warn $R.adh.log | tail -12
grep "Elapsed\|User time" $R.fit.log
