# mptun: userspace MPTCP (RFC 8684) on gVisor netstack behind TUN devices.
# `make help` lists the targets. Most tests need root (namespaces, TUNs, nft);
# without root they skip themselves.

GO          ?= go
PKGS        ?= ./...
GOTEST_FLAGS ?= -count=1 -timeout 25m
# ISOLATE=1 (default) runs the root tests in a private network namespace with
# a private /run/netns (scripts/isolated.sh): they cannot collide with other
# developers' tests and cleanup cannot touch anyone else's namespaces.
# ISOLATE=0 runs them in the host namespaces, then removes by prefix
# everything mptun-named (scripts/cleanup.sh): only on a dedicated machine.
ISOLATE     ?= 1
FUZZTIME    ?= 30s

.PHONY: help all gvisor build deps vet fmt-check check test test-unit test-race fuzz bench cleanup clean demo

help:
	@echo 'make gvisor       third_party/gvisor: pinned gVisor + patches/gvisor (every build target does this)'
	@echo 'make build        go build ./... and bin/mptun'
	@echo 'make test         deps (root), vet, gofmt check, go test $(PKGS) (isolated when root), cleanup'
	@echo 'make test-unit    fast tests needing no root (go test -short)'
	@echo 'make test-race    the engine, option layer and command under the race detector (~2 min, no root)'
	@echo 'make fuzz         every Fuzz target for FUZZTIME=$(FUZZTIME)'
	@echo 'make bench        lab scenarios (root); SCENARIO=3, BENCH_DURATION=10s, BENCH_CC=bbr,cubic'
	@echo 'make demo         bonding demo in namespaces (root): iperf3 through mptun client/server vs each uplink'
	@echo 'make cleanup      remove leftover mptun namespaces, links, rules, nft tables'
	@echo 'make clean        remove build outputs'

all: build

# gVisor with mptun's patches (patches/gvisor/), generated into the
# git-ignored third_party/gvisor that go.mod's replace points at. Every
# target that compiles depends on it; a no-op when up to date.
gvisor:
	bash scripts/gvisor-patch.sh

build: gvisor
	$(GO) build ./...
	@if [ -d cmd/mptun ]; then echo '$(GO) build -o bin/mptun ./cmd/mptun'; $(GO) build -o bin/mptun ./cmd/mptun; fi

# Tools the root tests and benchmarks call (iperf3, mptcpize, nft, ...).
deps:
	@if [ "$$(id -u)" -eq 0 ]; then bash scripts/install-deps.sh; \
	else echo 'deps: not root, not installing (root tests will skip)'; fi

vet: gvisor
	$(GO) vet $(PKGS)

fmt-check:
	bash scripts/check-gofmt.sh

check: vet fmt-check

# vet also fetches every module the tests import: the isolated namespace has
# no network.
test: deps gvisor vet fmt-check
	@status=0; \
	if [ "$$(id -u)" -eq 0 ] && [ "$(ISOLATE)" = 1 ]; then \
		echo 'scripts/isolated.sh $(GO) test $(GOTEST_FLAGS) $(PKGS)'; \
		bash scripts/isolated.sh $(GO) test $(GOTEST_FLAGS) $(PKGS) || status=$$?; \
	else \
		echo '$(GO) test $(GOTEST_FLAGS) $(PKGS)'; \
		$(GO) test $(GOTEST_FLAGS) $(PKGS) || status=$$?; \
		if [ "$$(id -u)" -eq 0 ]; then bash scripts/cleanup.sh || true; fi; \
	fi; \
	exit $$status

test-unit: gvisor
	bash scripts/test-unit.sh

# The concurrent core under -race: the subflow readers, WriteTo and the
# option layer share buffers outside the connection lock. Not part of
# `make test` (it doubles the engine's test time); run it after changes there.
test-race: gvisor
	$(GO) test -race -count=1 -timeout 15m ./mptcpep/... ./netstack/... ./engine/ ./cmd/mptun/

fuzz: gvisor
	FUZZTIME=$(FUZZTIME) bash scripts/fuzz.sh

# Benchmarks need root, iproute2, ethtool, iperf3 and mptcpize
# (scripts/install-deps.sh). SCENARIO=3 runs one scenario, BENCH_DURATION=10s
# shortens every transfer. Results: bench/results/DATE/ and bench/results/latest.md.
bench: build
	bash scripts/install-deps.sh
	SCENARIO="$(SCENARIO)" BENCH_DURATION="$(BENCH_DURATION)" BENCH_CC="$(BENCH_CC)" $(GO) run ./bench

cleanup:
	bash scripts/cleanup.sh

clean:
	rm -rf bin/ bench/results/tmp/
	find . \( -path ./.git -o -name testdata \) -prune -o -type f \
		\( -name '*.test' -o -name '*.out' -o -name '*.pprof' \) -print | xargs -r rm -f

# Bonding demo (root): two tbf-limited uplinks (50 and 30 Mbit/s), mptun
# client and server in namespaces, iperf3 through the tunnel; DURATION=8.
demo: deps gvisor
	bash scripts/demo.sh
