#!/usr/bin/env bash
# The GPU checks (issue 18's GPU half, `make gpu-check`, the CUDA tests) as one prepared run on a lent GPU machine.
#
#   here:   make device-wheels                     # what the machine's image lacks, as wheels in .whl/ (~10 MiB)
#   there:  the device tool's run(command="bash tools/device_check.sh", carry=[".whl"], timeout_s=590)
#           run(command="bash tools/device_check.sh bench", carry=[".whl"])   # one stage again
#
# Stages (default: tests bench gpu, in that order; name stages to run only those). Each runs under its own time
# limit, cut to what is left of BUDGET_S (default 560 s, under the tool's 600 s a call) so that a stuck stage
# leaves the run its end; a stage with under 30 s left is skipped and says so. All output goes to $OUT/log.txt too.
#   tests       the CUDA tests: samplers on CUDA, the sharded strategy on a GPU, LatentDiffusion under bf16-mixed
#   bench       ldm bench --device cuda --no-compile: ours vs diffusers and the fast-path switches on the GPU
#               -> $OUT/bench.json, $OUT/bench.md
#   gpu         ldm bench gpu: the SD-sized VAE, CLIP and U-Net a few bf16 steps each, then sampling
#               -> $OUT/gpu_check.json, $OUT/samples.png
#   compile     ldm bench --only compile on the GPU (minutes of compiling; not in the default run) -> compile.json
#   bench-tiny  ldm bench --tiny: the plumbing in seconds -> bench-tiny.json
# Environment: OUT (results folder; default checkpoints/device-check), LDM_DEVICE (default cuda; cpu: a dry run
# here), PYTHON (default python3), BUDGET_S, GPU_CHECK_STEPS (default 60).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-checkpoints/device-check}
DEVICE=${LDM_DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-560}
GPU_CHECK_STEPS=${GPU_CHECK_STEPS:-60}
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(tests bench gpu)
mkdir -p "$OUT"
LOG="$OUT/log.txt"
END=$((SECONDS + BUDGET_S))
export PYTHONUNBUFFERED=1

say() { echo "== $*" | tee -a "$LOG"; }

# run LIMIT_S NAME COMMAND...: the command under min(LIMIT_S, time left), its output to the log; its exit status
stage() {
  local limit=$1 name=$2; shift 2
  local left=$((END - SECONDS))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 30 ]; then say "$name: skipped, ${left} s of the budget left"; return 0; fi
  say "$name: $* (limit ${limit} s)"
  local start=$SECONDS
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  say "$name: exit $rc after $((SECONDS - start)) s"
  return 0
}

say "device check $(date -u +%FT%TZ), stages: ${STAGES[*]}, device $DEVICE, budget $BUDGET_S s"
if [ -d .whl ] && compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ldm-site \
    .whl/*.whl 2>&1 | tee -a "$LOG"
  export PYTHONPATH="/tmp/ldm-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  say "no .whl/ here: using the packages this Python has (make device-wheels makes them)"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
{ command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda',
torch.version.cuda, 'available', torch.cuda.is_available(), 'threads', torch.get_num_threads())"
} 2>&1 | tee -a "$LOG"

LDM=("$PYTHON" -m ldm.cli)
for s in "${STAGES[@]}"; do
  case $s in
    tests) stage 150 tests "$PYTHON" -m pytest -q -p no:cacheprovider -o addopts="" \
             tests/test_samplers.py::test_samplers_run_on_cuda \
             tests/test_gpu_check.py::test_sharded_strategy_shards_the_unet_and_its_ema_on_a_gpu \
             tests/test_latent_diffusion.py -k "cuda or sharded or mixed_precision" ;;
    bench) stage 300 bench "${LDM[@]}" bench --device "$DEVICE" --no-compile \
             --only kernels denoiser scaling vae generate fastpath --out "$OUT/bench.json" --markdown "$OUT/bench.md" ;;
    gpu) stage 240 gpu "${LDM[@]}" bench gpu --steps "$GPU_CHECK_STEPS" --warmup 20 --devices 1 \
           --work-dir /tmp/ldm-gpu-check --out "$OUT/gpu_check.json"
         [ -f /tmp/ldm-gpu-check/samples.png ] && cp /tmp/ldm-gpu-check/samples.png "$OUT/" ;;
    compile) stage 540 compile "${LDM[@]}" bench --device "$DEVICE" --only compile --out "$OUT/compile.json" ;;
    bench-tiny) stage 120 bench-tiny "${LDM[@]}" bench --tiny --device "$DEVICE" --only kernels denoiser generate \
                  --out "$OUT/bench-tiny.json" ;;
    *) say "unknown stage '$s' (tests, bench, gpu, compile, bench-tiny)"; exit 2 ;;
  esac
done
say "done after $SECONDS s; results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
