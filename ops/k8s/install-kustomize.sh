#!/usr/bin/env bash
# Installs the pinned kustomize into .cache/bin (what tests/unit/ops/test_k8s.py renders the
# overlays with), built from source by the Go toolchain through the Go module proxy. Idempotent:
# does nothing when the pinned version is already there. Needs Go 1.22+ on PATH (or in
# /usr/local/go/bin). A first build downloads the modules and compiles for a few minutes
# (~4.5 min measured on the 2-core dev box); afterwards it is instant.
#   bash ops/k8s/install-kustomize.sh          # prints the binary's path
set -euo pipefail
cd "$(dirname "$0")/../.."

VERSION=v5.8.1   # pinned: a new kustomize may render differently
BIN_DIR="$PWD/.cache/bin"
BIN="$BIN_DIR/kustomize"

if [ -x "$BIN" ] && [ "$("$BIN" version 2>/dev/null)" = "$VERSION" ]; then
  echo "$BIN"
  exit 0
fi

PATH="$PATH:/usr/local/go/bin"
if ! command -v go >/dev/null; then
  echo "install-kustomize: no Go toolchain on PATH (need Go 1.22+)" >&2
  exit 1
fi

mkdir -p "$BIN_DIR"
# Outside the repository, so no go.mod or VCS stamping gets in the way.
(cd /tmp && GOBIN="$BIN_DIR" GOFLAGS=-buildvcs=false go install "sigs.k8s.io/kustomize/kustomize/v5@$VERSION") >&2
echo "$BIN"
