#!/usr/bin/env bash
# Runs a command (as root) in a private network namespace with a private
# /run/netns, then runs scripts/cleanup.sh in there:
#
#   scripts/isolated.sh go test ./hostnet/...
#
# Everything the tests create (named namespaces, veths, TUNs, policy rules,
# nft tables) lives and dies in that private world: it cannot collide with
# other developers' tests on a shared machine, cleanup.sh can remove by
# prefix without touching anyone else's resources, and whatever survives
# vanishes when the last process in it exits. The namespace has only
# loopback, so fetch Go modules and packages before (go mod download,
# scripts/install-deps.sh). Exits with the command's status.
set -euo pipefail
if [ $# -eq 0 ]; then
	echo "usage: $0 COMMAND [ARG...]" >&2
	exit 2
fi
if [ "$(id -u)" -ne 0 ]; then
	echo "isolated: needs root for unshare --net; running without isolation" >&2
	exec "$@"
fi
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p /run/netns
# --propagation private: the tmpfs over /run/netns and the namespaces
# bind-mounted into it stay invisible outside.
exec unshare --mount --net --propagation private -- bash -c '
	set -u
	mount -t tmpfs -o mode=0755 mptun-netns /run/netns
	ip link set lo up
	# The command runs in the background so a signal reaches the trap at
	# once; the trap passes it on and still cleans up (processes that stay
	# in a test namespace would otherwise outlive this one).
	# setsid: its own process group, so the signal reaches every process
	# of the command (go test and its test binaries), not just the first.
	setsid "$@" &
	pid=$!
	stop() { kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null; wait "$pid"; bash "'"$here"'/cleanup.sh" || true; exit "$1"; }
	trap "stop 130" INT
	trap "stop 143" TERM
	status=0
	wait "$pid" || status=$?
	trap - INT TERM
	bash "'"$here"'/cleanup.sh" || true
	exit "$status"
' isolated "$@"
