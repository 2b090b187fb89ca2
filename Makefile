# Two commands on a fresh machine:  `make demo`  and  `make test`  (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build to install. The default is what runs on a CPU-only machine and on a
# CUDA 13 GPU alike; pick another build with e.g.
#   make install TORCH="torch==2.14.1 torchvision==0.29.1" TORCH_INDEX=<PyTorch wheel index for your CUDA>
TORCH ?= torch==2.14.1 torchvision==0.29.1
TORCH_INDEX ?=
PIP_TORCH_FLAGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
STAMP := $(VENV)/.installed
# Each demo run gets its own directory, so a rerun never overwrites an earlier one.
DEMO_STAMP := $(shell date +%Y-%m-%d_%H-%M-%S)
DEMO_DIR ?= logs/demo/$(DEMO_STAMP)
# LDM epochs of the demo (rectified flow): 12 gave 96% clean samples (experiments/README.md).
DEMO_LDM_EPOCHS ?= 12

.PHONY: install demo test test-slow lint bench clean-demo

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_TORCH_FLAGS) $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## The offline default: shapes autoencoder -> class-conditional shapes latent diffusion -> a grid
## of 8 samples per class (one row per class), on the CPU. Stage 2 points at stage 1's checkpoint:
## the documented way to chain stages. Settings and measurements: experiments/README.md (demo).
demo: $(STAMP)
	$(PY) -m ldm_lightning.train +experiment=shapes_demo_kl hydra.run.dir=$(DEMO_DIR)/autoencoder
	$(PY) -m ldm_lightning.train +experiment=shapes_demo_ldm hydra.run.dir=$(DEMO_DIR)/diffusion \
		trainer.max_epochs=$(DEMO_LDM_EPOCHS) \
		model.first_stage.ckpt_path=$(DEMO_DIR)/autoencoder/checkpoints/last.ckpt
	$(PY) -m ldm_lightning.sample hydra.run.dir=$(DEMO_DIR)/samples per_class=8 guidance_scale=3 \
		ckpt_path=$(DEMO_DIR)/diffusion/checkpoints/last.ckpt
	@echo "Demo done: $(DEMO_DIR)/samples/grid.png (reconstructions in $(DEMO_DIR)/autoencoder/images)"

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(PY) -m ruff check ldm_lightning tests experiments
