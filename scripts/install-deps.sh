#!/usr/bin/env bash
# Installs what the tests and benchmarks need on a fresh Debian machine.
# Idempotent: does nothing when every tool is already there.
set -euo pipefail
need=()
command -v iperf3   >/dev/null || need+=(iperf3)
command -v mptcpize >/dev/null || need+=(mptcpize)
command -v nft      >/dev/null || need+=(nftables)
command -v socat    >/dev/null || need+=(socat)
command -v tcpdump  >/dev/null || need+=(tcpdump)
command -v ethtool  >/dev/null || need+=(ethtool)
command -v ip       >/dev/null || need+=(iproute2)
command -v ss       >/dev/null || need+=(iproute2)
command -v make     >/dev/null || need+=(make)
command -v git      >/dev/null || need+=(git)
command -v unshare  >/dev/null || need+=(util-linux) # scripts/isolated.sh
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" -ne 0 ]; then
	echo "install-deps: need root to install: ${need[*]}" >&2
	exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
echo "install-deps: installing ${need[*]}" >&2
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
