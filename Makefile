# Benchmarks need root, iproute2, ethtool, iperf3 and mptcpize
# (scripts/install-deps.sh). SCENARIO=3 runs one scenario, BENCH_DURATION=10s
# shortens every transfer. Results: bench/results/DATE/ and bench/results/latest.md.
.PHONY: bench
bench:
	bash scripts/install-deps.sh
	SCENARIO="$(SCENARIO)" BENCH_DURATION="$(BENCH_DURATION)" go run ./bench
