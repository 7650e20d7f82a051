#!/bin/bash
# docs/results/binding_text_encoder.sh NAME [extra fit args]: train the shapes text encoder 600 steps from scratch, export, probe its token states
set -e
# run from the repository root; OUT (default /tmp/binding) holds the runs; LDM the ldm command
OUT=${OUT:-/tmp/binding}; LDM=${LDM:-ldm}; DEMO=${DEMO:-checkpoints/shapes}; DATA=${DATA:-datasets/shapes}
export PYTHONPATH=$PWD OMP_WAIT_POLICY=PASSIVE
NAME=$1; shift
R=$OUT/$NAME
nice -n 10 /usr/bin/time -v $LDM fit --config configs/clip/shapes.yaml \
  --data.init_args.data_dir $DATA --trainer.default_root_dir $R --trainer.max_steps 600 \
  --trainer.max_time 00:00:30:00 --trainer.val_check_interval 600 "$@" > $R.fit.log 2>&1
nice -n 10 $LDM export --ckpt $R/checkpoints/last.ckpt --out $R/text_encoder >> $R.fit.log 2>&1
OMP_NUM_THREADS=1 nice -n 10 python docs/results/binding_token_probe.py $R/text_encoder 2>&1 | grep -v Warn | tail -1
grep "Elapsed\|User time" $R.fit.log
