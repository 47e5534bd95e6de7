# Everything from nothing: `make test` and `make demo` create the virtual environment, install the package and
# get the data. torch/torchvision are pinned here to the versions the project is tested with; pyproject.toml
# keeps compatible ranges for users.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
FASHION_DIR := /usr/share/datasets/fashion-mnist

.PHONY: test lint demo data venv clean benchmark gpu-check

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[test,examples,hf,timm]' $(TORCH_PINS)
	touch $@

venv: $(VENV)/.installed

# Fashion-MNIST from Debian's dataset-fashion-mnist when we are root; otherwise torchvision downloads it later.
data:
	@if [ -d $(FASHION_DIR) ]; then echo "Fashion-MNIST: $(FASHION_DIR)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "Installing Debian package dataset-fashion-mnist ..."; \
		(apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)) \
		&& echo "Fashion-MNIST: $(FASHION_DIR)"; \
	else echo "Fashion-MNIST not installed system-wide; torchvision will download it into data/."; fi

test: venv data
	$(PY) -m pytest -q

# The linter the project configures (pyproject.toml [tool.ruff]); .ci/run runs it after the tests.
lint: venv
	$(PY) -m ruff check lightning_decor tests examples

demo: venv data
	$(PY) examples/demo.py

clean:
	rm -rf $(VENV) .pytest_cache lightning_logs build *.egg-info

# On a CUDA machine, in about 8 minutes on one H100/H200: the GPU tests (tests/gpu/), then the overhead benchmark
# through Trainer.fit, its figures in examples/benchmarks/results/gpu_*.json: the zoo (stock torchvision models on small
# images at batch 32, and the benchmark CNN at 128), and ResNet-18 at 32x32 (batch 256) and ResNet-50 at 224x224
# (batch 128) in fp32 and in bf16-mixed with channels_last, each with the update on the side stream and without.
# A GPU machine without network whose own Python has torch and Lightning (the lent H100/H200 machines):
# `make gpu-check PY=python3` skips the virtual environment and runs this checkout from its folder.
GPU_METHODS := "DBP defaults" "DBP defaults, no stream" "DBP max_overhead=None" "DBP max_overhead=None, no stream"
gpu-check: $(if $(filter $(VENV)/bin/python,$(PY)),venv)
	PYTHONPATH=. $(PY) -m pytest -q -m gpu tests/gpu
	PYTHONPATH=. $(PY) examples/benchmarks/overhead.py --device cuda --zoo --methods "DBP defaults" "DBP max_overhead=None" \
		--steps 26 --warmup 17 --repeats 2 --no-breakdown --out examples/benchmarks/results/gpu_zoo.json
	PYTHONPATH=. $(PY) examples/benchmarks/overhead.py --device cuda --models cifar_resnet18 resnet50 --batch-size 256 128 \
		--methods $(GPU_METHODS) --steps 26 --warmup 17 --repeats 2 --no-breakdown \
		--out examples/benchmarks/results/gpu_fp32.json
	PYTHONPATH=. $(PY) examples/benchmarks/overhead.py --device cuda --models cifar_resnet18 resnet50 --batch-size 256 128 \
		--methods $(GPU_METHODS) --steps 26 --warmup 17 --repeats 2 --no-breakdown \
		--precision bf16-mixed --channels-last --out examples/benchmarks/results/gpu_bf16.json

benchmark: venv data
	$(PY) examples/benchmarks/overhead.py --zoo --steps 26 --warmup 17 --repeats 5 --no-breakdown \
		--out examples/benchmarks/results/overhead_zoo.json
	$(PY) examples/benchmarks/time_to_accuracy.py
