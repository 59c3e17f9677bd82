# umxtools — every stage is a flag-driven command; these targets chain them on the toy data.
# Variables can be overridden: `make data DATA=/path/to/musdb18hq CACHE_DIR=/scratch/cache`.

PYTHON        ?= python3
PIP           ?= $(PYTHON) -m pip
# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0
OPENUNMIX_VERSION ?= 1.3.0

DATA      ?= data/toy
CACHE_DIR ?= cache
TRACKS    ?= 8
SECONDS   ?= 8
SEED      ?= 0
TARGETS   ?= vocals,drums,bass,other
EPOCHS    ?= 10
JOBS      ?= 2
# toy tracks used as the validation split (musdb's own list names real MUSDB18 tracks only)
VALID     ?= toy_006,toy_007

UMX = $(PYTHON) -m umxtools

.PHONY: install slurm demo test bench data clean-data

install:
	@command -v ffmpeg >/dev/null && command -v ffprobe >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg)
	@$(PYTHON) -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_VERSION)')" 2>/dev/null || \
		$(PIP) install -q "torch==$(TORCH_VERSION)"
	$(PIP) install -q -e ".[test]"
	@# the reference implementation, without its torchaudio requirement (it would replace torch)
	@$(PYTHON) -c "import importlib.metadata as m; m.version('openunmix')" 2>/dev/null || \
		$(PIP) install -q --no-deps "openunmix==$(OPENUNMIX_VERSION)"

# a one-node Slurm cluster for the cluster tests; where it cannot start they skip and say why
slurm:
	-@bin/slurm-local start

test: install slurm
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) bench/bench_cache.py --out results/bench_cache.json

demo: install data
	$(UMX) cache info $(CACHE_DIR)/toy-train.h5

# --- pipeline stages (file targets: a stage reruns only when its inputs changed) ---
data: $(CACHE_DIR)/toy-train.h5 $(CACHE_DIR)/toy-valid.h5

$(DATA)/.complete:
	$(UMX) toy $(DATA) --tracks $(TRACKS) --seconds $(SECONDS) --seed $(SEED)
	touch $@

$(CACHE_DIR)/toy-train.h5: $(DATA)/.complete
	$(UMX) cache musdb $(DATA) --is-wav --subsets train --split train --valid-tracks $(VALID) \
		--jobs $(JOBS) --force -o $@

$(CACHE_DIR)/toy-valid.h5: $(DATA)/.complete
	$(UMX) cache musdb $(DATA) --is-wav --subsets train --split valid --valid-tracks $(VALID) \
		--jobs $(JOBS) --force -o $@

clean-data:
	rm -rf $(DATA) $(CACHE_DIR)/toy-*.h5
