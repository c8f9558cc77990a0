# edgesmith developer tasks. `make demo` and `make test` are the README's quick start.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= out/fmnist

.PHONY: install demo test test-all lint format bench arm64-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# torch first, from the local CPU wheel, so that no other torch build is ever pulled in; the rest
# at the versions the project is tested with (constraints.txt), which also spares pip a long backtrack
$(VENV)/.installed: pyproject.toml constraints.txt $(BIN)/python
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[dev]" -c constraints.txt
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/edgesmith build examples/fashion_mnist/recipe.yaml -o $(OUT) --force
	@echo "report: $(OUT)/report.md"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy runtime devices
	$(BIN)/python .ci/lint_imports.py --no-logo

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: install
	$(BIN)/python -m pytest -q

test-all: install
	$(BIN)/python -m pytest -q -m ""

bench: install
	$(BIN)/python benchmarks/onnx_vs_torch.py

# pre-release check: the device side on emulated 64-bit Arm (Cortex-A72 and Cortex-A76 under
# qemu-user, Debian bookworm arm64, PyPI's aarch64 wheels); as root, or with qemu-user-static and
# debootstrap installed. Cached in benchmarks/.cache/arm64 (see docs/benchmarks.md for its times)
arm64-check: install
	$(BIN)/python benchmarks/arm64_emulated.py

clean:
	rm -rf build dist *.egg-info out .pytest_cache .mypy_cache .ruff_cache
