# ctcovid — set-up, demo, tests. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO := demo
# Small enough to train in a few minutes on 2 CPU cores; see README "What the demo did".
DEMO_TRAIN_FLAGS ?= --input-size 64 --epochs 4 --max-slices 4 --weights none --head-epochs 0 \
	--batch-size 32 --lr 1e-3 --seed 0

.PHONY: install demo test test-all lint fixtures bench fuzz clean

install: $(STAMP)

# -qq: errors only; a failed install still prints pip's reason and stops make.
$(STAMP): pyproject.toml
	@echo "== Installing ctcovid and its dependencies into $(VENV) (a few minutes the first time) =="
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -qq --upgrade pip
	@$(BIN)/python -m pip install -qq -e ".[dev,jax,ray,metrics,dicomweb,onnx,web]"
	@touch $(STAMP)

$(DEMO)/data/manifest.json: | $(STAMP)
	$(BIN)/ctcovid fixtures $(DEMO)/data --studies 2 --slices 24 --size 128 --seed 11 \
		--cov19-per-class 32 --cov19-slices 6

# Scans that confirm the int8 graph: other phantoms (other seeds) than the training, validation
# and calibration scans, 128 of them, so that the gate can bound the label flip rate.
$(DEMO)/gate/cov19: | $(STAMP)
	$(BIN)/ctcovid fixtures $(DEMO)/gate --studies 0 --size 128 --seed 29 \
		--cov19-per-class 32 --cov19-slices 6

$(DEMO)/model/ctcovid.json: $(DEMO)/data/manifest.json
	$(BIN)/ctcovid train $(DEMO)/data/cov19 --out $(DEMO)/model --run-dir $(DEMO)/run \
		$(DEMO_TRAIN_FLAGS)

demo: $(DEMO)/model/ctcovid.json $(DEMO)/gate/cov19
	@echo "== Classifying the held-out DICOM studies (never seen in training) =="
	$(BIN)/ctcovid classify $(DEMO)/data/study_000/ct --model $(DEMO)/model --runtime keras \
		--sr $(DEMO)/out/study_000_sr.dcm --card $(DEMO)/out/study_000_card.dcm \
		--heatmaps $(DEMO)/out/heatmaps_000
	$(BIN)/ctcovid classify $(DEMO)/data/study_001/ct --model $(DEMO)/model --runtime keras \
		--sr $(DEMO)/out/study_001_sr.dcm --card $(DEMO)/out/study_001_card.dcm \
		--heatmaps $(DEMO)/out/heatmaps_001
	@echo "== The same studies on the fastest runtime verified on this CPU (ctcovid export: ONNX"
	@echo "   Runtime int8, the same int8 graph on OpenVINO, and OpenVINO bf16 where the CPU has"
	@echo "   BF16; each gated against fp32) =="
	@$(BIN)/ctcovid export $(DEMO)/model --validation $(DEMO)/gate/cov19 \
		|| echo "no fp32 graph kept (the reason is above)"
	@$(BIN)/ctcovid export $(DEMO)/model --int8 --calibration $(DEMO)/data/cov19/val \
		--validation $(DEMO)/gate/cov19 || echo "no int8 graph kept (the reason is above)"
	@if grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null; then \
		$(BIN)/ctcovid export $(DEMO)/model --bf16 --validation $(DEMO)/gate/cov19 \
		|| echo "no bf16 graph kept (the reason is above)"; \
	else echo "no bf16 run: this CPU has no BF16 instructions"; fi
	$(BIN)/ctcovid classify $(DEMO)/data/study_000/ct --model $(DEMO)/model --runtime auto
	$(BIN)/ctcovid classify $(DEMO)/data/study_001/ct --model $(DEMO)/model --runtime auto
	@echo "Ground truth: $$(grep -o '"label": "[^"]*"' $(DEMO)/data/manifest.json | tr '\n' ' ')"
	@echo "Structured Reports and heatmaps are in $(DEMO)/out/. Synthetic data: no clinical value."
	@echo "Result cards (DICOM Secondary Capture, any viewer shows them): $(DEMO)/out/study_000_card.dcm $(DEMO)/out/study_001_card.dcm"
	@echo "== To run the DICOM node with its status page (not started here) =="
	@echo "  $(BIN)/ctcovid listen --store $(DEMO)/node --model $(DEMO)/model --port 11112 --http-port 8080"
	@echo "  then open http://127.0.0.1:8080/ and send it a study from another shell:"
	@echo "  storescu -aec CTCOVID 127.0.0.1 11112 $(DEMO)/data/study_000/ct/*"

# Two workers (pytest-xdist): many tests wait on peers, timeouts and subprocesses, and the
# suite's one training run overlaps them. --dist loadfile: a module runs on one worker, so its
# module-scoped peers and models are built once, and every test of the one training run lives in
# tests/test_training.py. TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile --durations=15

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check ctcovid dicom_fixtures
	$(BIN)/mypy ctcovid
	PYTHONPATH=$(CURDIR) $(BIN)/lint-imports

fixtures: $(STAMP)
	$(BIN)/ctcovid fixtures fixtures --studies 6 --seed 0

bench: $(STAMP)
	$(BIN)/python bench/run.py

# Malformed and edge-case C-STOREs against the listener on 127.0.0.1 (see tests/fuzz_node.py).
FUZZ_COUNT ?= 2000
FUZZ_SEED ?= 0
FUZZ_SECONDS ?= 900
fuzz: $(STAMP)
	$(BIN)/python tests/fuzz_node.py --count $(FUZZ_COUNT) --seed $(FUZZ_SEED) \
		--time-limit $(FUZZ_SECONDS)

clean:
	rm -rf $(DEMO) fixtures .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
