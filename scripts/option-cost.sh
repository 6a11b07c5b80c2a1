#!/usr/bin/env bash
# Measures the cost of the MPTCP option layer and meta-socket: 1 GB through
# `mptun connect` against `mptun connect --plain` (the same gVisor stack and
# TUN path without MPTCP), to a kernel MPTCP peer over one veth, rounds
# alternating so that load changes on a shared machine hit both alike.
#
#   sudo scripts/option-cost.sh [-r ROUNDS] [-d up|down|both] [-p DIR] BINARY [BINARY...]
#
# -p DIR writes a CPU profile of every mptun run to DIR/N-MODE-DIR-rR.prof
# (N: the binary's position, R: the round), for `go tool pprof`.
#
# Prints one line per run (binary, mode, direction, wall s, user s, sys s)
# and medians per binary, mode and direction. Several binaries compare builds
# (A/B) in the same rounds. Namespaces moc-c/moc-s, removed on exit.
set -euo pipefail
rounds=3 dirs=both profdir=
while getopts r:d:p: o; do
	case $o in
	r) rounds=$OPTARG ;;
	d) dirs=$OPTARG ;;
	p) profdir=$(mkdir -p "$OPTARG" && readlink -f "$OPTARG") ;;
	*) exit 2 ;;
	esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || { echo "usage: $0 [-r N] [-d up|down|both] [-p DIR] BINARY..." >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "option-cost: needs root (namespaces)" >&2; exit 1; }
bins=()
for b in "$@"; do bins+=("$(readlink -f "$b")"); done
tmp=$(mktemp -d)
cleanup() {
	ip netns pids moc-s 2>/dev/null | xargs -r kill 2>/dev/null || true
	ip netns pids moc-c 2>/dev/null | xargs -r kill 2>/dev/null || true
	ip netns del moc-c 2>/dev/null || true
	ip netns del moc-s 2>/dev/null || true
	rm -rf "$tmp"
}
trap cleanup EXIT
cleanup_ns() { :; }
ip netns add moc-c
ip netns add moc-s
ip -n moc-c link add cli0 type veth peer name srv0 netns moc-s
ip -n moc-c addr add 10.91.1.2/24 dev cli0
ip -n moc-s addr add 10.91.1.1/24 dev srv0
ip -n moc-c link set cli0 up
ip -n moc-s link set srv0 up
ip -n moc-c link set lo up
ip -n moc-s link set lo up
ip netns exec moc-s sysctl -qw net.mptcp.enabled=1
head -c 1000000000 /dev/zero >"$tmp/zero1g"

server() { # dir
	ip netns pids moc-s | xargs -r kill 2>/dev/null || true
	sleep 0.2
	if [ "$1" = up ]; then
		ip netns exec moc-s mptcpize run socat -u TCP-LISTEN:5000,reuseaddr OPEN:/dev/null &
	else
		ip netns exec moc-s mptcpize run socat -u OPEN:"$tmp/zero1g" TCP-LISTEN:5000,reuseaddr &
	fi
	for _ in $(seq 50); do
		ip netns exec moc-s ss -Hltn 'sport = :5000' | grep -q . && return 0
		sleep 0.1
	done
	echo "option-cost: server did not start" >&2
	return 1
}
run() { # bin mode dir binindex
	local plain=() in=/dev/null prof=()
	[ "$2" = plain ] && plain=(--plain)
	[ "$3" = up ] && in="$tmp/zero1g"
	[ -n "$profdir" ] && prof=(env MPTUN_CPUPROFILE="$profdir/$4-$2-$3-r$round.prof")
	server "$3"
	/usr/bin/time -f "%e %U %S" -o "$tmp/t" ip netns exec moc-c "${prof[@]}" "$1" connect "${plain[@]}" --uplink cli0 10.91.1.1:5000 <"$in" >/dev/null 2>"$tmp/err" ||
		{ echo "option-cost: $1 $2 $3 failed:" >&2; tail -5 "$tmp/err" >&2; return 1; }
	echo "$1 $2 $3 $(cat "$tmp/t")" | tee -a "$tmp/all"
}
case $dirs in both) dl="up down" ;; *) dl=$dirs ;; esac
for round in $(seq "$rounds"); do
	for d in $dl; do
		for i in "${!bins[@]}"; do
			run "${bins[$i]}" mptcp "$d" "$i"
			run "${bins[$i]}" plain "$d" "$i"
		done
	done
done
echo "# medians over $rounds rounds: binary mode dir wall user sys"
awk '{k=$1" "$2" "$3; w[k]=w[k]" "$4; u[k]=u[k]" "$5; s[k]=s[k]" "$6}
function med(str,  a,n,i,j,t){n=split(str,a," "); for(i=1;i<=n;i++)for(j=i+1;j<=n;j++)if(a[j]<a[i]){t=a[i];a[i]=a[j];a[j]=t}; return (n%2)?a[(n+1)/2]:(a[n/2]+a[n/2+1])/2}
END{for(k in w) print k, med(w[k]), med(u[k]), med(s[k])}' "$tmp/all" | sort
