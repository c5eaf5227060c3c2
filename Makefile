# The two quick-start commands and the developer chores. Everything runs in .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The offline CIFAR-10 copy beside this checkout, when there is one; else Keras downloads CIFAR-10.
FL_DATA ?= $(firstword $(wildcard ../shared/data/cifar10-jpeg.tar.gz))

.PHONY: install demo test typecheck proto bench clean

$(BIN)/fl-server: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

install: $(BIN)/fl-server

## The main job: fl-server + 3 fl-client processes on localhost, 10 rounds of CIFAR-10.
demo: install
	$(BIN)/fl-local --clients 3 --rounds 10 --out results $(if $(FL_DATA),--data $(FL_DATA))
	@echo "curves: results/curves.png  history: results/history.json  model: results/final_model.keras"

## Unit and integration tests (synthetic data, loopback only), lint and types. As strict as CI:
## the programs some tests drive are installed first where missing (tests/install-tools.sh), and
## $CI is set, so a test that still cannot run fails and says what to install. `make test CI=`
## lets such tests skip instead; the run's end lists them.
test: export CI ?= true
test: install
	@if [ -n "$$CI" ]; then bash tests/install-tools.sh; fi
	$(BIN)/python proto/generate.py --check
	$(BIN)/ruff check .
	$(MAKE) --no-print-directory typecheck
	$(BIN)/pytest -q

## mypy (strict) over the fedgrpc namespace, seen through a tree of links: the source folders
## install under fedgrpc.* by setuptools mappings that mypy cannot follow by itself.
typecheck: install
	rm -rf build/typecheck && mkdir -p build/typecheck/fedgrpc
	for d in common server client; do ln -s ../../../$$d build/typecheck/fedgrpc/$$d; done
	ln -s ../../../proto/fedgrpc/v1 build/typecheck/fedgrpc/v1
	cd build/typecheck && ../../$(BIN)/mypy --config-file ../../pyproject.toml \
		-p fedgrpc.common -p fedgrpc.server -p fedgrpc.client
	cd build/typecheck && ../../$(BIN)/mypy --config-file ../../pyproject.toml --allow-untyped-defs \
		../../bench ../../proto/generate.py ../../tests

## The reference benchmark on the offline CIFAR-10 copy (about 15 minutes on 2 cores).
bench: install
	$(BIN)/python bench/reference_run.py $(if $(FL_DATA),--data $(FL_DATA))

## Regenerate the committed protobuf bindings after editing proto/.
proto: install
	$(BIN)/python proto/generate.py

clean:
	rm -rf $(VENV) results build *.egg-info
