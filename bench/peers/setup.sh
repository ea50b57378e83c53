#!/usr/bin/env bash
# Creates the peers' own virtualenv (.cache/peers-venv) with faust-streaming and Quix Streams.
#
# Quix Streams 3.28 pins confluent-kafka<2.13 and pydantic<2.14, so the peers must never share
# the product's .venv: a benchmark must not hold the product's dependencies back.
#
#   bash bench/peers/setup.sh            idempotent; re-run after changing the pins below
#   PEERS_VENV=/elsewhere bash ...       another location
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${PEERS_VENV:-$repo/.cache/peers-venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3

stamp="$venv/.installed-v4"
if [[ -f "$stamp" ]]; then
    echo "peers venv: $venv (up to date)"
    exit 0
fi
"$python" -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
# Same model runtime, codec and Redis client as the product (pyyaml: schemas/ reads model.yaml);
# the peers' own frameworks.
"$venv/bin/pip" install -q \
    "faust-streaming>=0.11" \
    "quixstreams==3.28.*" \
    "msgspec>=0.19" \
    "numpy>=1.26" \
    "onnxruntime>=1.18" \
    "redis>=5" \
    "pyyaml>=6" \
    "cramjam>=2.7"  # aiokafka (faust) compresses with it: lz4, as ours
touch "$stamp"
echo "peers venv: $venv ready"
"$venv/bin/python" -c 'import faust, quixstreams, confluent_kafka; print("faust", faust.__version__, "quixstreams", quixstreams.__version__, "confluent-kafka", confluent_kafka.version()[0])'
