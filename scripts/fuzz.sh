#!/usr/bin/env bash
# Runs every Fuzz target in the module for FUZZTIME each (default 30s), one
# after the other (go test -fuzz takes one target per run). New crashers land
# in the package's testdata/fuzz/<Target>/ and fail the run.
#   FUZZTIME=2m scripts/fuzz.sh            all targets
#   scripts/fuzz.sh ./mptcpep/header       targets of some packages
set -euo pipefail
bash "$(dirname "$0")/gvisor-patch.sh" # third_party/gvisor, see the Makefile
cd "$(dirname "$0")/.."
fuzztime=${FUZZTIME:-30s}
dirs=("$@")
[ ${#dirs[@]} -eq 0 ] && dirs=(.)
failed=()
n=0
while IFS=: read -r file _ match; do
	name=$(sed -E 's/^func (Fuzz[A-Za-z0-9_]*)\(.*/\1/' <<<"$match")
	pkg=./$(dirname "${file#./}")
	n=$((n + 1))
	echo "=== fuzz $pkg $name for $fuzztime"
	if ! go test -run '^$' -fuzz "^${name}\$" -fuzztime "$fuzztime" "$pkg"; then
		failed+=("$pkg $name")
	fi
done < <(grep -rnE '^func Fuzz[A-Za-z0-9_]*\(' --include='*_test.go' "${dirs[@]}" | grep -v '/.git/' | sort)
if [ "$n" -eq 0 ]; then
	echo "fuzz: no Fuzz targets found in ${dirs[*]}" >&2
	exit 1
fi
if [ ${#failed[@]} -gt 0 ]; then
	printf 'fuzz: FAILED %s\n' "${failed[@]}" >&2
	exit 1
fi
echo "fuzz: $n targets ok ($fuzztime each)"
