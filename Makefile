# The two quick-start commands and the developer chores. Everything runs in .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The offline CIFAR-10 copy beside this checkout, when there is one; else Keras downloads CIFAR-10.
FL_DATA ?= $(firstword $(wildcard ../shared/data/cifar10-jpeg.tar.gz))

.PHONY: install demo standing-demo test typecheck proto bench clean

# PyTorch (the [torch] extra, for examples/pytorch and its test) is asked for as 2.13.0: where pip
# finds a CPU build of it on disk, as on CI's machines, that is one 191 MB wheel (measured 25 s to
# install, 71 s on a busy machine), where any newer release is a CUDA build of several GB ([dev]
# itself asks only for torch>=2.2).
$(BIN)/fl-server: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet 'torch==2.13.0' -e '.[dev]'
	@touch $@

install: $(BIN)/fl-server

## The main job: fl-server + 3 fl-client processes on localhost, 10 rounds of CIFAR-10.
demo: install
	$(BIN)/fl-local --clients 3 --rounds 10 --out results $(if $(FL_DATA),--data $(FL_DATA))
	@echo "curves: results/curves.png  history: results/history.json  model: results/final_model.keras"

## A standing federation in containers (docker/compose.standing.yaml): provisioning, the
## coordinator, three site agents, and one job submitted with fl-job, followed to its end. The
## coordinator and agents stay up afterwards; `$(COMPOSE) -p fedgrpc-standing -f
## docker/compose.standing.yaml down -v` removes them.
COMPOSE ?= docker-compose
STANDING := $(COMPOSE) -p fedgrpc-standing -f docker/compose.standing.yaml
standing-demo:
	$(STANDING) up --build -d
	@status=$$(docker wait "$$($(STANDING) ps -a -q submit)"); \
	$(STANDING) logs --no-color submit; \
	echo "the job's outputs: volume fedgrpc-standing_results; more jobs: $(STANDING) run --rm submit"; \
	exit $$status

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
	$(BIN)/pytest -q --durations=25

## mypy (strict) over the fedgrpc package, read straight from its folders: .ci/typecheck.py
## hands mypy each file under its installed name (pyproject's package-dir), which mypy cannot map.
## The second run checks bench/ and tests/ against the package as they use it (its own cache: the
## two runs check the package under different flags).
typecheck: install
	$(BIN)/python .ci/typecheck.py -p fedgrpc.common -p fedgrpc.server -p fedgrpc.client
	$(BIN)/python .ci/typecheck.py --allow-untyped-defs --cache-dir .mypy_cache/with-tests \
		-p fedgrpc.common -p fedgrpc.server -p fedgrpc.client bench proto/generate.py .ci/typecheck.py tests

## The reference benchmark on the offline CIFAR-10 copy (about 15 minutes on 2 cores).
bench: install
	$(BIN)/python bench/reference_run.py $(if $(FL_DATA),--data $(FL_DATA))

## Regenerate the committed protobuf bindings after editing proto/ (every .proto there:
## coordinator.proto, the sites' contract, and admin.proto, the admins').
proto: install
	$(BIN)/python proto/generate.py

clean:
	rm -rf $(VENV) results build *.egg-info
