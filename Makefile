# umxtools — every stage is a flag-driven command; these targets chain them on the toy data or on
# MUSDB18: `make data train eval DATA=~/musdb18hq CACHE_DIR=/scratch/cache` (see docs/make.md).

PYTHON        ?= python3
PIP           ?= $(PYTHON) -m pip
# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0
OPENUNMIX_VERSION ?= 1.3.0
AUDIO_SEPARATOR_VERSION ?= 0.47.1
DEMUCS_VERSION ?= 4.1.0

# DATA is the toy folder (made here) or a MUSDB18 root, read only: a MUSDB18-HQ root
# (train/<track>/mixture.wav) or a MUSDB18 root (train/<track>.stem.mp4). Outputs are named after
# DATA's folder (NAME) under CACHE_DIR, MODELS_DIR and EVAL_DIR, never inside DATA.
TOY       := data/toy
DATA      ?= $(TOY)
NAME      ?= $(notdir $(abspath $(DATA)))
CACHE_DIR ?= cache
MODELS_DIR ?= models
EVAL_DIR  ?= eval
TRACKS    ?= 8
SECONDS   ?= 8
SEED      ?= 0
TARGETS   ?= vocals,drums,bass,other
JOBS      ?= 2
# the toy: its own validation tracks and a small UMX that learns it in minutes on 2 cores;
# MUSDB18: musdb's validation list and open-unmix's defaults (umxtools train's own)
VALID     ?= $(if $(IS_TOY),toy_006$(comma)toy_007)
EPOCHS    ?= $(if $(IS_TOY),10,1000)
TRAIN_FLAGS ?= $(if $(IS_TOY),--hidden-size 128 --seq-dur 2 --samples-per-track 16 --lr 3e-3)
# more `umxtools cache musdb` flags, e.g. --no-waveforms (UMX trains on the STFTs) or --dtype
CACHE_FLAGS ?=
# baselines scored beside the trained model
ORACLES   ?= irm2 mix
comma := ,

IS_TOY = $(filter $(abspath $(TOY)),$(abspath $(DATA)))
# toy, hq (MUSDB18-HQ wavs), stems (MUSDB18 .stem.mp4), or empty: not a dataset
LAYOUT = $(if $(IS_TOY),toy,$(if $(wildcard $(DATA)/train/*/mixture.wav),hq,$(if $(wildcard $(DATA)/train/*.stem.mp4),stems)))
IS_WAV = $(if $(filter stems,$(LAYOUT)),,--is-wav)
VALID_FLAG = $(if $(VALID),--valid-tracks '$(VALID)')
# what the caches and the test-split outputs are rebuilt after: the toy's completion marker, or
# a MUSDB18 root's train/ and test/ folders (their times change when tracks are added or removed)
TRAIN_INPUT = $(if $(IS_TOY),$(TOY)/.complete,$(wildcard $(DATA)/train))
TEST_INPUT  = $(if $(IS_TOY),$(TOY)/.complete,$(wildcard $(DATA)/test))
SOURCE    = $(CACHE_DIR)/$(NAME).source
CACHES    = $(CACHE_DIR)/$(NAME)-train.h5 $(CACHE_DIR)/$(NAME)-valid.h5
MODEL     = $(MODELS_DIR)/$(NAME)-umx
RUN       = $(EVAL_DIR)/$(NAME)
# the first line of every stage's recipe: stop with one line unless DATA is a dataset and the
# outputs lie outside it
CHECK = @$(if $(LAYOUT),,echo "umxtools: error: $(DATA): no MUSDB18 dataset (MUSDB18-HQ: train/<track>/mixture.wav; MUSDB18: train/<track>.stem.mp4)" >&2; exit 1;) \
	$(if $(IS_TOY),,$(foreach d,$(CACHE_DIR) $(MODELS_DIR) $(EVAL_DIR),$(if $(filter $(abspath $(DATA))/%,$(abspath $(d))/),echo "umxtools: error: $(d): inside the dataset $(DATA); outputs never go into DATA" >&2; exit 1;))) :

UMX = $(PYTHON) -m umxtools
# one target: Wiener EM needs a second output, the rest of the mixture (open-unmix's --residual)
RESIDUAL = $(if $(word 2,$(subst $(comma), ,$(TARGETS))),,--residual)
# and what is scored: BSSEval scores two or more targets jointly, so a vocals model is scored with
# its residual, written as accompaniment (the oracles write the same two)
SCORED = $(if $(RESIDUAL),$(if $(filter vocals,$(TARGETS)),vocals$(comma)accompaniment,$(TARGETS)),$(TARGETS))

.PHONY: install slurm demo test bench data train eval clean-data FORCE
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

# pytest-xdist: TEST_JOBS worker processes, each test file on one worker (a file's tests share
# fixtures and run in order); TEST_JOBS=0 runs in this process
TEST_JOBS ?= 2
test: install slurm
	$(PYTHON) -m ruff check umxtools tests bench examples
	$(PYTHON) -m pytest -q $(if $(filter 0,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist loadfile)

bench: install
	$(PYTHON) bench/bench_cache.py --out results/bench_cache.json
	$(PYTHON) bench/bench_separate.py --out results/bench_separate.json
	$(PYTHON) bench/bench_eval.py --out results/bench_eval.json
	$(PYTHON) bench/bench_metrics.py --out results/bench_metrics.json
	$(PYTHON) bench/bench_train.py --out results/bench_train.json
	$(PYTHON) bench/bench_models.py --part all --out results/bench_models.json

# the whole pipeline on the toy data, small enough for a few minutes on 2 cores
demo: install
	$(MAKE) data train eval EPOCHS=$(if $(filter command line,$(origin EPOCHS)),$(EPOCHS),4)

# --- pipeline stages (file targets: a stage reruns only when its inputs changed) ---
data: $(CACHES)

# the toy is made only in its own folder; a MUSDB18 root is only read
$(TOY)/.complete:
	$(UMX) toy $(TOY) --tracks $(TRACKS) --seconds $(SECONDS) --seed $(SEED)
	touch $@

# DATA, its layout and the validation list behind NAME's outputs: rewritten (and everything after
# it rebuilt) only when one of them changes
$(SOURCE): FORCE
	$(CHECK)
	@mkdir -p $(@D)
	@echo '$(abspath $(DATA)) $(LAYOUT) $(VALID)' | cmp -s - $@ || echo '$(abspath $(DATA)) $(LAYOUT) $(VALID)' > $@

$(CACHE_DIR)/$(NAME)-%.h5: $(SOURCE) $(TRAIN_INPUT)
	$(UMX) cache musdb $(DATA) $(IS_WAV) --subset train --split $* $(VALID_FLAG) $(CACHE_FLAGS) --jobs $(JOBS) --force -o $@

# one UMX per target in one folder (open-unmix's layout); --resume continues an interrupted run,
# and a larger EPOCHS trains only the new epochs
train: $(MODEL)/separator.json

$(MODEL)/separator.json: $(CACHES)
	for t in $(subst $(comma), ,$(TARGETS)); do \
		$(UMX) train $(CACHE_DIR)/$(NAME)-train.h5 --valid $(CACHE_DIR)/$(NAME)-valid.h5 --targets $$t -o $(@D) \
			$(TRAIN_FLAGS) --epochs $(EPOCHS) --resume -q || exit 1; \
	done
	@# a rerun that trained nothing new (already EPOCHS) writes nothing: mark the stage done
	touch $@

# separate the test subset (a MUSDB18 .stem.mp4 through its mixture stream), score it and the
# oracle baselines with museval, one report
eval: $(RUN)/report/report.md
	@cat $<

$(RUN)/estimates/umx/.complete: $(MODEL)/separator.json $(SOURCE) $(TEST_INPUT)
	rm -rf $(@D)
	$(UMX) separate $(DATA)/test --model $(MODEL) --targets $(TARGETS) $(RESIDUAL) -o $(@D)/test -q
	touch $@

$(RUN)/estimates/%/.complete: $(SOURCE) $(TEST_INPUT)
	rm -rf $(@D)
	$(UMX) oracle --musdb $(DATA) $(IS_WAV) --method $* --targets $(SCORED) -o $(@D)
	touch $@

$(RUN)/scores/%/.complete: $(RUN)/estimates/%/.complete
	$(UMX) eval $(RUN)/estimates/$* --musdb $(DATA) $(IS_WAV) --targets $(SCORED) -o $(@D) --jobs $(JOBS) -q
	touch $@

$(RUN)/report/report.md: $(RUN)/scores/umx/.complete $(foreach m,$(ORACLES),$(RUN)/scores/$(m)/.complete)
	$(UMX) report UMX=$(RUN)/scores/umx $(foreach m,$(ORACLES),$(shell echo $(m) | tr a-z A-Z)=$(RUN)/scores/$(m)) -o $(@D)

# what make made for DATA: its caches, model and evaluation, and the toy folder when it is the
# toy that make made; a MUSDB18 root is never touched
clean-data:
	@$(foreach d,CACHE_DIR MODELS_DIR EVAL_DIR NAME,$(if $(strip $($(d))),,echo "umxtools: error: $(d) is empty" >&2; exit 1;)) :
	rm -rf $(CACHES) $(foreach c,$(CACHES),$(dir $(c)).$(notdir $(c)).parts) $(SOURCE) $(MODEL) $(RUN)
	$(if $(IS_TOY),if [ -e $(TOY)/.complete ]; then rm -rf $(TOY); fi)

FORCE:
