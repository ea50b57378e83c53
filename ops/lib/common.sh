# shellcheck shell=bash
# The start every ops script shares. Sourced, after the script has set `repo` (the checkout
# root), as
#
#   source "$here/../lib/common.sh" NAME
#
# It defines `say` and `die` (messages prefixed "NAME: "), the process helpers (proc.sh),
# `home` (the state root: $STREAMINFER_HOME or <repo>/.cache, created and made absolute, as
# Kafka's log.dirs must be) and `find_python`.

_ops_name="$1"

say() { echo "$_ops_name: $*"; }
die() {
    echo "$_ops_name: $*" >&2
    exit 1
}

# shellcheck source=ops/lib/proc.sh
source "$(dirname "${BASH_SOURCE[0]}")/proc.sh"

home="${STREAMINFER_HOME:-$repo/.cache}"
mkdir -p "$home"
home="$(cd "$home" && pwd)"

# find_python: sets PYTHON to an interpreter that runs: $PYTHON if set and found, else
# <repo>/.venv/bin/python, else python3, else empty.
find_python() {
    if [[ -z "${PYTHON:-}" ]] || ! command -v "$PYTHON" >/dev/null; then
        if [[ -x "$repo/.venv/bin/python" ]]; then
            PYTHON="$repo/.venv/bin/python"
        else
            PYTHON="$(command -v python3 || true)"
        fi
    fi
}
