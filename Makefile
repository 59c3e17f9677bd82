# umxtools — every stage is a flag-driven command; these targets chain them on the toy data.
# Variables can be overridden: `make data DATA=/path/to/musdb18hq CACHE_DIR=/scratch/cache`.

PYTHON        ?= python3
PIP           ?= $(PYTHON) -m pip
# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0
OPENUNMIX_VERSION ?= 1.3.0
AUDIO_SEPARATOR_VERSION ?= 0.47.1
DEMUCS_VERSION ?= 4.1.0

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
MODELS_DIR ?= models
EVAL_DIR  ?= eval
# a small UMX that learns the toy data in minutes on 2 cores (open-unmix's defaults are for MUSDB18)
TRAIN_FLAGS ?= --hidden-size 128 --seq-dur 2 --samples-per-track 16 --lr 3e-3
# baselines scored beside the trained model
ORACLES   ?= irm2 mix
comma := ,

UMX = $(PYTHON) -m umxtools

.PHONY: install slurm demo test bench data train eval clean-data
# keep the .complete markers of the pattern rules (they are what makes reruns incremental)
.SECONDARY:

install:
	@command -v ffmpeg >/dev/null && command -v ffprobe >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg)
	@$(PYTHON) -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_VERSION)')" 2>/dev/null || \
		$(PIP) install -q "torch==$(TORCH_VERSION)"
	$(PIP) install -q -e ".[test]"
	@# the reference implementation, without its torchaudio requirement (it would replace torch)
	@$(PYTHON) -c "import importlib.metadata as m; m.version('openunmix')" 2>/dev/null || \
		$(PIP) install -q --no-deps "openunmix==$(OPENUNMIX_VERSION)"
	@# MSST-compatible RoFormer classes, the reference of the RoFormer tests: without the package's
	@# own dependencies (onnxruntime and others), plus what its roformer modules import
	@$(PYTHON) -c "import importlib.metadata as m; m.version('audio-separator')" 2>/dev/null || \
		($(PIP) install -q --no-deps "audio-separator==$(AUDIO_SEPARATOR_VERSION)" && \
		 $(PIP) install -q einops "beartype<0.19" "rotary-embedding-torch<0.7" librosa "torch==$(TORCH_VERSION)")
	@# HTDemucs (umxtools train/separate --model htdemucs) and the reference of its tests
	@$(PYTHON) -c "import importlib.metadata as m; m.version('demucs')" 2>/dev/null || \
		$(PIP) install -q "demucs==$(DEMUCS_VERSION)" "torch==$(TORCH_VERSION)"

# a one-node Slurm cluster for the cluster tests; where it cannot start they skip and say why
slurm:
	-@bin/slurm-local start

test: install slurm
	$(PYTHON) -m ruff check umxtools tests bench examples
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) bench/bench_cache.py --out results/bench_cache.json
	$(PYTHON) bench/bench_separate.py --out results/bench_separate.json
	$(PYTHON) bench/bench_eval.py --out results/bench_eval.json
	$(PYTHON) bench/bench_metrics.py --out results/bench_metrics.json
	$(PYTHON) bench/bench_train.py --out results/bench_train.json

# the whole pipeline on the toy data, small enough for a few minutes on 2 cores
demo: install
	$(MAKE) data train eval EPOCHS=$(if $(filter command line,$(origin EPOCHS)),$(EPOCHS),4)

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

# one UMX per target in one folder (open-unmix's layout); --resume continues an interrupted run,
# and a larger EPOCHS trains only the new epochs
train: $(MODELS_DIR)/toy-umx/separator.json

$(MODELS_DIR)/toy-umx/separator.json: $(CACHE_DIR)/toy-train.h5 $(CACHE_DIR)/toy-valid.h5
	for t in $(subst $(comma), ,$(TARGETS)); do \
		$(UMX) train $(CACHE_DIR)/toy-train.h5 --valid $(CACHE_DIR)/toy-valid.h5 --target $$t -o $(@D) \
			$(TRAIN_FLAGS) --epochs $(EPOCHS) --resume -q || exit 1; \
	done

# separate the toy test split, score it and the oracle baselines with museval, one report
eval: $(EVAL_DIR)/report/report.md
	@cat $<

$(EVAL_DIR)/estimates/umx/.complete: $(MODELS_DIR)/toy-umx/separator.json
	$(UMX) separate $(DATA)/test --model $(MODELS_DIR)/toy-umx --targets $(TARGETS) -o $(EVAL_DIR)/estimates/umx/test --force -q
	touch $@

$(EVAL_DIR)/estimates/%/.complete: $(DATA)/.complete
	$(UMX) oracle $(DATA) --is-wav --method $* --targets $(TARGETS) -o $(EVAL_DIR)/estimates/$*
	touch $@

$(EVAL_DIR)/scores/%/.complete: $(EVAL_DIR)/estimates/%/.complete
	$(UMX) eval $(EVAL_DIR)/estimates/$* --musdb $(DATA) --is-wav --targets $(TARGETS) -o $(EVAL_DIR)/scores/$* --jobs $(JOBS) -q
	touch $@

$(EVAL_DIR)/report/report.md: $(EVAL_DIR)/scores/umx/.complete $(foreach m,$(ORACLES),$(EVAL_DIR)/scores/$(m)/.complete)
	$(UMX) report UMX=$(EVAL_DIR)/scores/umx $(foreach m,$(ORACLES),$(shell echo $(m) | tr a-z A-Z)=$(EVAL_DIR)/scores/$(m)) -o $(@D)

clean-data:
	rm -rf $(DATA) $(CACHE_DIR)/toy-*.h5 $(MODELS_DIR)/toy-umx $(EVAL_DIR)
