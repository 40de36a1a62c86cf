# Two commands do everything on a fresh clone:
#   make demo   - build .venv, generate a small MovieLens-shaped dataset, convert it, train on CPU
#   make test   - build .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
DEMO_DIR ?= runs/demo
DEMO_EPOCHS ?= 10

.PHONY: setup demo test bench bench-quick clean

$(VENV)/.installed: requirements.txt requirements-test.txt requirements-optional.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -r requirements-test.txt -r requirements-optional.txt
	touch $@

setup: $(VENV)/.installed

# DEMO_DIR is quoted: a name with a space would otherwise split, and `clean` remove its halves.
demo: setup
	$(PY) generate.py --preset small --output "$(DEMO_DIR)/raw/ratings.csv"
	$(PY) convert.py --path "$(DEMO_DIR)/raw/ratings.csv" --output "$(DEMO_DIR)/data"
	$(PY) ncf.py --data "$(DEMO_DIR)/data" --epochs $(DEMO_EPOCHS) -b 16384 \
		--checkpoint_dir "$(DEMO_DIR)/checkpoints" --log_path "$(DEMO_DIR)/log.json"

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/run.py

bench-quick: setup
	$(PY) bench/run.py --quick

clean:
	rm -rf "$(DEMO_DIR)" .pytest_cache
