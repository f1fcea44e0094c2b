# The two commands: `make run` and `make test`. Both set everything up on a machine with only Python 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
export FLASK_APP := web.app:create_app
# Embedded PostgreSQL/Redis under var/ unless DATABASE_URL/REDIS_URL are given.
SERVICES := eval "$$($(BIN)/python -m scripts.dev_services up)"
FLOWER_BASIC_AUTH ?= admin:inferq-dev
export FLOWER_BASIC_AUTH

.PHONY: install run test migrate services-down bench bench-quick soak fuzz clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $@

migrate: install
	@$(SERVICES) && flask db upgrade

run: install
	@mkdir -p var
	@$(SERVICES) && flask db upgrade && \
	  echo "InferQ API:   http://$${WEB_HOST:-127.0.0.1}:$${WEB_PORT:-8000}/api/v1/docs" && \
	  echo "Flower:       http://$${FLOWER_HOST:-127.0.0.1}:$${FLOWER_PORT:-5555}  (basic auth $$FLOWER_BASIC_AUTH)" && \
	  echo "Metrics:      http://$${WEB_HOST:-127.0.0.1}:$${WEB_PORT:-8000}/metrics  and each worker's http://$${WORKER_METRICS_HOST:-127.0.0.1}:$${WORKER_METRICS_PORT:-9808}/metrics" && \
	  echo "Dashboard:    http://$${WEB_HOST:-127.0.0.1}:$${WEB_PORT:-8000}/dashboard" && \
	  exec honcho start -f Procfile web worker beat flower

test: install test-deps
	@mkdir -p var
	@$(SERVICES) && python -m pytest $(PYTEST_ARGS)

# issue 7: the whole stack against same-run baselines (own database inferq_bench, Redis db 10) -> bench/results.json
bench: install
	@mkdir -p var
	@$(SERVICES) && python -m bench

bench-quick: install
	@mkdir -p var
	@$(SERVICES) && python -m bench --quick

# issue 7: chaos soak (killed workers, a replaced worker, Redis restarts); its own database and Redis server
soak: install
	@mkdir -p var
	@$(SERVICES) && python -m bench.soak

# issue 7: schemathesis against the live API with two users (tests/test_fuzz.py with the LONG budget: 200 examples
# per operation, each of its two runs fuzzing for 10 minutes, about 21 minutes in all); reports in var/fuzz/
fuzz: install
	@mkdir -p var
	@$(SERVICES) && INFERQ_FUZZ=long python -m pytest tests/test_fuzz.py $(PYTEST_ARGS)

# the dashboard test drives Debian's headless chromium; CI runs as root, so apt can install it
.PHONY: test-deps
test-deps:
	@command -v chromium >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)

services-down:
	$(BIN)/python -m scripts.dev_services down

clean: services-down
	rm -rf var $(VENV)
