PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo lint bench clean

install: $(STAMP)

# Reinstall only when the dependency list changes, so a second `make install` is quick.
# TORCH_INDEX: a wheel index to take torch from first, e.g. https://download.pytorch.org/whl/cpu for a
# CPU-only torch without the CUDA libraries; empty: pip's default torch.
TORCH_INDEX ?=

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(if $(TORCH_INDEX),$(BIN)/pip install -q torch torchvision --index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q -n auto --dist worksteal

demo: install
	bash scripts/demo.sh

lint: install
	$(BIN)/ruff check la_seg tests benchmarks
	$(BIN)/ruff format --check la_seg tests benchmarks

# Quick figures of this machine; the measurements of record are in benchmarks/README.md.
bench: install
	$(BIN)/python benchmarks/throughput.py --config demo.yaml --device cpu --json benchmarks/results/cpu_demo.json
	$(BIN)/python benchmarks/startup.py --backbone vit_small_patch14_dinov2 \
		--json benchmarks/results/startup_cpu_small.json

clean:
	rm -rf $(VENV) runs demo_data *.egg-info
