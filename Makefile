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

.PHONY: setup sample-slide demo-data tiles qc demo train-demo test test-fast bench clean-demo

setup: $(VENV)/.installed

# torch is installed first and pinned to the CPU build that lies on local disk;
# an unpinned torch would pull a multi-GB CUDA build. GPU users: `pip install .[cuda]`.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

sample-slide: setup
	$(BIN)/python -m pipeline.demo_cohort fetch --dest data/sample

demo-data: setup
	$(BIN)/python -m pipeline.demo_cohort make --sample-dir data/sample --out data/demo --manifest data_manifests/demo.csv

# Builds tiles/$(DATASET)/mag$(MAG).zarr from data_manifests/$(DATASET).csv.
tiles: setup $(if $(filter demo,$(DATASET)),demo-data)
	$(BIN)/pm-tiles build --manifest data_manifests/$(DATASET).csv --magnification $(MAG) \
		--out $(STORE) --codec $(CODEC) --workers $(WORKERS)
	$(BIN)/pm-tiles info $(STORE)

qc: setup
	$(BIN)/pm-tiles qc $(STORE) --out qc/$(DATASET)/mag$(MAG)

train-demo: setup
	$(BIN)/pm-train supervised --config configs/demo_cpu.toml --store tiles/demo/mag5.zarr --out $(DEMO_RUN)

# The main job on the demo cohort: real slide -> labelled cohort -> tile store -> QC -> short training run.
demo:
	$(MAKE) tiles DATASET=demo MAG=5
	$(MAKE) qc DATASET=demo MAG=5
	$(MAKE) train-demo
	@echo "QC pictures:  qc/demo/mag5/"
	@echo "Tile store:   tiles/demo/mag5.zarr"
	@echo "Training run: $(DEMO_RUN) (metrics.csv, TensorBoard events, checkpoints/)"

test: setup sample-slide
	$(BIN)/python -m pytest -q

test-fast: setup sample-slide
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup sample-slide
	$(BIN)/python bench/tiles.py
	$(BIN)/python bench/ssm_scan.py
	$(BIN)/python bench/model.py
	$(BIN)/python bench/loader.py

clean-demo:
	rm -rf tiles/demo qc/demo runs/demo-supervised data/demo
