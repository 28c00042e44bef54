# The two set-up commands: `make demo` runs the main job, `make test` runs the whole suite.
# Both create .venv and install what they need on first use. `make test-unit` is the quick tier
# (no child processes, nothing slow); `make test-cuda` runs the device tests on CUDA.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-unit test-cuda lint bench bench-deps demo-model clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned first so pip picks the local CPU build, never the CUDA stack.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,sim]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m tessera.demo

# Retrain the bundled demo model (deterministic; a few minutes on 2 CPU cores).
demo-model: $(STAMP)
	$(BIN)/python -m tessera.demo_model.train

lint: $(STAMP)
	$(BIN)/ruff check tessera tests benchmarks
	$(BIN)/mypy tessera
	$(BIN)/lint-imports

test: $(STAMP) lint
	$(BIN)/python -m pytest tests --durations=25

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests -m "not processes and not slow"

# The tests that take the `device` fixture, on CUDA (needs a CUDA build of torch in .venv);
# without CUDA it says so in one line and succeeds.
test-cuda: $(STAMP)
	@$(BIN)/python -c "import sys, torch; ok = torch.cuda.is_available(); \
		ok or print('make test-cuda: skipped, torch.cuda is not available (torch', torch.__version__ + ')'); \
		sys.exit(0 if ok else 3)"; \
	rc=$$?; if [ $$rc -eq 0 ]; then $(BIN)/python -m pytest tests --device cuda --durations=25; \
	elif [ $$rc -ne 3 ]; then exit $$rc; fi

# Peers for the benchmarks: llama-cpp-python builds llama.cpp from source (~5 minutes on 2 cores);
# its [server] extra brings the OpenAI-compatible server benchmarks/serving.py runs.
bench-deps: $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/pip install -q \
		--no-binary llama-cpp-python 'llama-cpp-python[server]==0.3.36' sentencepiece
	# xgrammar, the grammar engine benchmarks/structured_output.py compares with; without the
	# triton it pulls for GPU kernels, which a CPU run does not use.
	$(BIN)/pip install -q --no-deps xgrammar==0.2.9 apache-tvm-ffi
	# llama.cpp's C++ llama-server (parallel slots), built from the same source distribution.
	$(BIN)/python -m benchmarks.peers.llama_server

bench: bench-deps
	$(BIN)/python benchmarks/offline_throughput.py
	$(BIN)/python benchmarks/prefix_caching.py
	$(BIN)/python benchmarks/serving.py

clean:
	rm -rf $(VENV) build *.egg-info
