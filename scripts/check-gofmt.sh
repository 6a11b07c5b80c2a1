#!/usr/bin/env bash
# Fails (exit 1) and lists the files when any Go file is not gofmt-formatted.
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t files < <(find . -name '*.go' -not -path './.git/*' -not -path './third_party/*' -not -path '*/testdata/*' | sort)
[ ${#files[@]} -eq 0 ] && exit 0
bad=$(gofmt -l "${files[@]}")
if [ -n "$bad" ]; then
	echo "gofmt: these files need formatting (gofmt -w):" >&2
	echo "$bad" >&2
	exit 1
fi
echo "gofmt: ${#files[@]} files ok"
