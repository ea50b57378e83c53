#!/usr/bin/env bash
# Creates the monitor's own virtualenv (.cache/monitor-venv) from monitor/requirements.lock.
#
# faust-streaming 0.15 pins click<8.4 while the product locks click 8.5 (uvicorn,
# import-linter), so the monitor must not share the product's .venv: it runs from the checkout
# (`streaminfer monitor` starts `<venv>/bin/python -m monitor` in the repository root).
#
#   bash monitor/setup.sh [VENV]   idempotent; re-installs when the lock changed
#
# VENV defaults to .cache/monitor-venv (`streaminfer monitor` passes <STREAMINFER_HOME>/monitor-venv,
# the same by default).
#
# Uses the product venv's uv when there is one (a few seconds), pip otherwise.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
venv="${1:-$repo/.cache/monitor-venv}"
lock="$here/requirements.lock"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
uv="$repo/.venv/bin/uv"

stamp="$venv/.installed-$(sha256sum "$lock" | cut -c1-16)"
if [[ -f "$stamp" ]]; then
    echo "monitor venv: $venv (up to date)"
    exit 0
fi
if [[ -x "$uv" ]]; then
    [[ -x "$venv/bin/python" ]] || "$uv" venv --quiet --python "$python" "$venv"
    "$uv" pip sync --quiet --python "$venv/bin/python" --require-hashes "$lock"
else
    [[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
    "$venv/bin/pip" install -q --require-hashes -r "$lock"
fi
rm -f "$venv"/.installed-*
touch "$stamp"
"$venv/bin/python" -c 'import faust, aiokafka; print("monitor venv:", "'"$venv"'", "faust-streaming", faust.__version__, "aiokafka", aiokafka.__version__)'
