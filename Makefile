# The two commands a newcomer needs (see README):
#   make demo   install into .venv, then train the digits classifier on 2 CPU ranks and print its accuracy
#   make test   install into .venv, then run the whole test suite (CI runs it after `make lint`)
# For contributors: make lint (ruff + mypy, as CI runs them), make format (fix in place)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install demo test test-fast lint format clean

$(BIN)/.installed: setup.py requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --constraint requirements.lock --editable ".[dev]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/torchrun --standalone --nproc_per_node 2 recipes/classification/train.py \
		--config recipes/classification/configs/digits.yaml --output-dir runs/digits --logging.progress_bar false
	@$(BIN)/python -c "import json; m = json.load(open('runs/digits/final/metrics.json')); print(f\"digits demo: top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%  (weights: runs/digits/final/model.safetensors)\")"

# Two pytest workers, each test file on one (its module fixtures made once); uninterrupted
# reference runs are shared between them (tests/conftest.py). One worker left a core idle about a
# third of the time: every launch starts with single-threaded imports.
test: install
	$(BIN)/python -m pytest -n 2 --dist loadfile

test-fast: install
	$(BIN)/python -m pytest tests/unit

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) runs .pytest_cache
