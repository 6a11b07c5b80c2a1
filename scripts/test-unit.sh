#!/usr/bin/env bash
# Fast tests that need no root, no namespaces and no extra tools.
# As a normal user every package runs with -short: tests that need root skip
# themselves. As root those tests would run, so only packages whose tests
# never check for privilege are tested (found by grepping for the checks).
set -euo pipefail
bash "$(dirname "$0")/gvisor-patch.sh" # third_party/gvisor, see the Makefile
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
	exec go test -short -count=1 "$@" ./...
fi
root_re='Geteuid|NeedRoot|needRoot|requireRoot|IsRoot|CheckPrivileges'
pkgs=()
while read -r imp dir; do
	shopt -s nullglob
	tests=("$dir"/*_test.go)
	shopt -u nullglob
	[ ${#tests[@]} -eq 0 ] && continue
	grep -qE "$root_re" "${tests[@]}" && continue
	pkgs+=("$imp")
done < <(go list -f '{{.ImportPath}} {{.Dir}}' ./...)
if [ ${#pkgs[@]} -eq 0 ]; then
	echo "test-unit: no package without root tests" >&2
	exit 1
fi
echo "test-unit (root: packages without privileged tests): ${pkgs[*]}"
exec go test -short -count=1 "$@" "${pkgs[@]}"
