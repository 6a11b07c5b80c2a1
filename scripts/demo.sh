#!/usr/bin/env bash
# mptun demo: a client host with two rate-limited uplinks (tbf 50 and 30
# Mbit/s) reaches a web host through a router and a concentrator. It runs
# iperf3 through the bonded tunnel and through each uplink alone (the same
# tunnel with one uplink), prints a table, and removes everything.
#
#   cli  u1 10.203.1.2 (50 Mbit/s) ─ r1  rtr  rs ─ s0 10.203.3.2  srv (mptun server)  sw ─ w0 10.203.4.2 web (iperf3 -s)
#        u2 10.203.2.2 (30 Mbit/s) ─ r2
#
# Run as root on a machine with iproute2, tc (tbf) and iperf3
# (scripts/install-deps.sh installs them). DURATION=seconds per run.
set -euo pipefail
bash "$(dirname "$0")/gvisor-patch.sh" # third_party/gvisor, see the Makefile

if [ "$(id -u)" -ne 0 ]; then
	echo "demo: needs root (network namespaces, TUN devices)" >&2
	exit 1
fi
for tool in ip tc iperf3; do
	command -v "$tool" >/dev/null || { echo "demo: $tool missing: run scripts/install-deps.sh" >&2; exit 1; }
done

cd "$(dirname "$0")/.."
DURATION=${DURATION:-8}
id=$$
ns() { echo "mbc-demo$id-$1"; }
CLI=$(ns c) RTR=$(ns r) SRV=$(ns s) WEB=$(ns w)
work=$(mktemp -d)
pids=()

cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
	for n in "$CLI" "$RTR" "$SRV" "$WEB"; do
		for p in $(ip netns pids "$n" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
		ip netns del "$n" 2>/dev/null || true
	done
	rm -rf "$work"
}
trap cleanup EXIT INT TERM

echo "building bin/mptun"
go build -o bin/mptun ./cmd/mptun
MPTUN=$PWD/bin/mptun

for n in "$CLI" "$RTR" "$SRV" "$WEB"; do
	ip netns add "$n"
	ip -n "$n" link set lo up
done
veth() { # ns1 dev1 ns2 dev2
	ip link add "$2" netns "$1" type veth peer name "$4" netns "$3"
	ip -n "$1" link set "$2" up
	ip -n "$3" link set "$4" up
}
veth "$CLI" u1 "$RTR" r1
veth "$CLI" u2 "$RTR" r2
veth "$RTR" rs "$SRV" s0
veth "$SRV" sw "$WEB" w0
ip -n "$CLI" addr add 10.203.1.2/24 dev u1
ip -n "$CLI" addr add 10.203.2.2/24 dev u2
ip -n "$RTR" addr add 10.203.1.1/24 dev r1
ip -n "$RTR" addr add 10.203.2.1/24 dev r2
ip -n "$RTR" addr add 10.203.3.1/24 dev rs
ip -n "$SRV" addr add 10.203.3.2/24 dev s0
ip -n "$SRV" addr add 10.203.4.1/24 dev sw
ip -n "$WEB" addr add 10.203.4.2/24 dev w0
ip -n "$CLI" route add default via 10.203.1.1
ip -n "$SRV" route add default via 10.203.3.1
ip netns exec "$RTR" sysctl -qw net.ipv4.ip_forward=1
# Uplink rates, both directions.
shape() { ip netns exec "$1" tc qdisc add dev "$2" root tbf rate "$3" burst 64kb latency 50ms; }
shape "$CLI" u1 50mbit
shape "$RTR" r1 50mbit
shape "$CLI" u2 30mbit
shape "$RTR" r2 30mbit

"$MPTUN" genkey >"$work/key"
ip netns exec "$WEB" iperf3 -s -D -I "$work/iperf3.pid" >/dev/null
ip netns exec "$SRV" "$MPTUN" server --listen 10.203.3.2:4433 --key-file "$work/key" 2>"$work/server.log" &
pids+=($!)
sleep 1

# run_client LABEL UPLINK... : start a client, run iperf3 up and down, stop it.
declare -A UP DOWN
run_client() {
	local label=$1
	shift
	local args=()
	for u in "$@"; do args+=(--uplink "$u"); done
	ip netns exec "$CLI" "$MPTUN" client --server 10.203.3.2:4433 --key-file "$work/key" "${args[@]}" \
		--default-route --socket "$work/client.sock" 2>"$work/client-$label.log" &
	local pid=$!
	for _ in $(seq 100); do
		[ -S "$work/client.sock" ] && break
		kill -0 "$pid" 2>/dev/null || { echo "demo: client failed:" >&2; cat "$work/client-$label.log" >&2; exit 1; }
		sleep 0.1
	done
	# -O 2: omit slow start and subflow joins from the average.
	UP[$label]=$(ip netns exec "$CLI" iperf3 -c 10.203.4.2 -t "$DURATION" -O 2 -f m | awk '/receiver/ {print $(NF-2)}')
	DOWN[$label]=$(ip netns exec "$CLI" iperf3 -c 10.203.4.2 -t "$DURATION" -O 2 -f m -R | awk '/receiver/ {print $(NF-2)}')
	if [ "$label" = bonded ]; then
		echo
		ip netns exec "$CLI" "$MPTUN" status --socket "$work/client.sock" || true
	fi
	kill "$pid"
	wait "$pid" || true
}

echo "iperf3 through the tunnel, $DURATION s per run..."
run_client u1 u1,via=10.203.1.1
run_client u2 u2,via=10.203.2.1
run_client bonded u1,via=10.203.1.1 u2,via=10.203.2.1

echo
printf '%-24s %14s %16s\n' "path" "upload Mbit/s" "download Mbit/s"
declare -A NAME=([u1]="u1 alone (50)" [u2]="u2 alone (30)" [bonded]="bonded u1+u2 (80)")
for l in u1 u2 bonded; do
	name=${NAME[$l]}
	printf '%-24s %14s %16s\n' "$name" "${UP[$l]:-?}" "${DOWN[$l]:-?}"
done
echo
echo "demo: tearing down"
