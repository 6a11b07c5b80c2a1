#!/usr/bin/env bash
# Builds third_party/gvisor: the pinned gVisor module (go.mod's require) with
# mptun's patches (patches/gvisor/*.patch) applied. go.mod's replace points
# at it; the directory is generated and git-ignored, never committed.
#
# Idempotent: a stamp of the version and the patches' hash skips the work
# when nothing changed. Fails when a patch no longer applies (CI runs this
# first, so a gVisor bump that breaks a patch is caught at once).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
export PATH="/usr/local/go/bin:$PATH"

out=third_party/gvisor
ver=$(awk '$1 == "gvisor.dev/gvisor" && $2 ~ /^v/ { print $2; exit }' go.mod)
[ -n "$ver" ] || { echo "gvisor-patch: no gvisor.dev/gvisor requirement in go.mod" >&2; exit 1; }
stamp="$ver $(cat patches/gvisor/*.patch | sha256sum | cut -d' ' -f1)"
if [ -f "$out/.mptun-stamp" ] && [ "$(cat "$out/.mptun-stamp")" = "$stamp" ]; then
	exit 0
fi

# GOFLAGS=-mod=mod: go.mod's replace names the directory being built.
src=$(GOFLAGS=-mod=mod go mod download -json "gvisor.dev/gvisor@$ver" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
[ -d "$src" ] || { echo "gvisor-patch: go mod download gvisor.dev/gvisor@$ver gave no directory" >&2; exit 1; }

tmp=$(mktemp -d third_party/.gvisor.XXXXXX 2>/dev/null || { mkdir -p third_party && mktemp -d third_party/.gvisor.XXXXXX; })
trap 'rm -rf "$tmp"' EXIT
cp -r "$src/." "$tmp/"
chmod -R u+w "$tmp"
for p in patches/gvisor/*.patch; do
	# git apply as outside any repository (no patch(1) on a minimal machine).
	if ! (cd "$tmp" && GIT_CEILING_DIRECTORIES="$(dirname "$(pwd)")" git apply -p1 "$root/$p"); then
		echo "gvisor-patch: $p does not apply to gvisor.dev/gvisor@$ver" >&2
		exit 1
	fi
done
echo "$stamp" > "$tmp/.mptun-stamp"
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
echo "gvisor-patch: $out is gvisor.dev/gvisor@$ver with $(ls patches/gvisor/*.patch | wc -l) patch(es)"
