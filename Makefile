# tagstream: the two commands are `make run` and `make test`. Each sets up everything it
# needs (system packages, virtualenv, Kafka jars) on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
EVENTS ?= 0
RATE   ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=
CHAOS_ARGS ?=
HELM_VERSION := v4.3.2
HELM   := .state/bin/helm

.PHONY: cluster cluster-stop setup run test test-unit test-slow deploy-test image images lock bench bench-recovery bench-sink bench-replay bench-explain bench-hot-customer bench-scale chaos docs observability dashboard-png broker broker-stop broker-reset clean

setup: $(VENV)/.installed deploy/kafka/lib/.complete

$(VENV)/.installed: pyproject.toml
	deploy/setup-system.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

deploy/kafka/lib/.complete: deploy/kafka/pom.xml
	deploy/setup-system.sh
	deploy/kafka/kafka.sh install

## The three-node secured cluster (SASL_SSL, SCRAM, TLS, ACLs) on 127.0.0.1:19092,19192,19292.
cluster: setup
	deploy/kafka/cluster.sh start
	@echo "connect with: set -a; eval \"$$(deploy/kafka/cluster.sh env)\"; set +a"

cluster-stop:
	deploy/kafka/cluster.sh stop

broker: setup
	deploy/kafka/kafka.sh start

broker-stop:
	deploy/kafka/kafka.sh stop

broker-reset:
	deploy/kafka/kafka.sh reset

## The main job on the embedded default: local broker, worker, file sink, generated load.
## `make run EVENTS=20000` stops by itself; plain `make run` runs until Ctrl-C.
## `make run WECOM=1 EVENTS=2000`: the load enters through the fake WeCom's callbacks, the ingest and the enrichment.
run: broker
	$(BIN)/tagstream run --events $(EVENTS) $(if $(RATE),--rate $(RATE)) $(if $(WECOM),--via-wecom)

## Every test that belongs in CI (unit + integration on the real broker, and a real Prometheus).
test: setup
	deploy/setup-system.sh --with-prometheus --with-hey
	$(BIN)/pytest -m "not slow and not deploy" $(PYTEST_ARGS)

test-unit: setup
	deploy/setup-system.sh --with-prometheus
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

## The images (podman; the base made here by mmdebstrap), the compose stack and the chart, for real.
deploy-test: setup $(HELM)
	$(BIN)/pip install -q -e '.[test,deploy]'
	deploy/setup-system.sh --with-prometheus
	HELM=$(abspath $(HELM)) $(BIN)/pytest -m deploy -s tests/deploy $(PYTEST_ARGS)

## helm, built from the Go module proxy (no other download site is reachable here): ~5 min once.
$(HELM):
	GOBIN=$(abspath $(dir $(HELM))) GOFLAGS=-mod=mod go install helm.sh/helm/v4/cmd/helm@$(HELM_VERSION)

image: setup
	deploy/container/build.sh tagstream

images: setup
	deploy/container/build.sh all

lock: setup
	$(BIN)/python deploy/container/lock.py

## The chaos run at the size CI affords (`make chaos` is the full size); CI runs this too.
test-slow: setup
	deploy/setup-system.sh --with-prometheus
	$(BIN)/pytest -m slow $(PYTEST_ARGS)

## The worker benchmark: tagstream beside a raw-aiokafka passthrough in the same run; table + docs/bench.png.
bench: setup
	deploy/setup-system.sh --with-chromium
	$(BIN)/python -m bench.worker $(BENCH_ARGS)

## A worker with no local state restores 1M customers from the changelog: time and peak RSS.
bench-recovery: setup
	$(BIN)/python -m bench.recovery $(BENCH_ARGS)

## Sink delivery throughput against the local Marketing API, beside the bare-HTTP ceiling.
bench-sink: setup
	$(BIN)/python -m bench.sink_throughput $(BENCH_ARGS)

## One 200,000-event log processed live, replayed from topics and from an archive: compared and timed.
bench-replay: setup
	$(BIN)/python -m bench.replay_vs_live $(BENCH_ARGS)

## `tagstream explain` of one customer's day out of 10M events over 30 days, beside reading its partition whole.
bench-explain: setup
	$(BIN)/python -m bench.explain $(BENCH_ARGS)

## The WeCom ingest: callbacks answered/s with answer times (beside a bare aiohttp server), and sidebar tag to report.
bench-ingest: setup
	deploy/setup-system.sh --with-hey
	$(BIN)/python -m bench.ingest $(BENCH_ARGS)

## One customer with 100,000 remembered event ids against fresh customers: cost per event, same run.
bench-hot-customer: setup
	$(BIN)/python -m bench.hot_customer $(BENCH_ARGS)

## The rule book at a provider's size: memory, build time and lookups for 300 to 30,000 corps.
bench-scale: setup
	$(BIN)/python -m bench.scale $(BENCH_ARGS)

## The chaos run: 300,000 events, two workers, the sink and the Marketing API, with worker/sink
## SIGKILLs, a join/leave, a broker restart, API failure bursts and 5% poison (CI runs it small).
chaos: setup
	$(BIN)/python -m tests.chaos $(if $(filter 3,$(CLUSTER)),--cluster) $(CHAOS_ARGS)

## Regenerate docs/configuration.md from the settings (a unit test fails when it is stale).
docs: setup
	$(BIN)/tagstream settings --markdown > docs/configuration.md

## Regenerate the Grafana dashboard and the alert rules from deploy/observability.py.
observability: setup
	$(BIN)/python deploy/observability.py

## Re-render docs/dashboard.png from a real run (worker, sink, Prometheus, headless Chromium).
dashboard-png: setup
	deploy/setup-system.sh --with-prometheus --with-chromium
	TAGSTREAM_DASHBOARD_PNG=$(CURDIR)/docs/dashboard.png $(BIN)/pytest -q tests/integration/test_observability.py

clean:
	rm -rf $(VENV) .state deploy/kafka/lib *.egg-info
