#!/usr/bin/env bash
# A Qwen2.5-0.5B-shaped model on the CPU: coopc and PyTorch each load it
# (bf16 safetensors written by transformers) and score one 512-token row;
# prints time, peak RSS and the log-prob difference. Uses the virtual
# environment of scripts/hf-fixtures.sh (VENV, default scripts/.venv).
#
#   benches/hf-real-size.sh [--tokens N] [--threads N]
#   SKIP_BUILD=1 benches/hf-real-size.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-scripts/.venv}
VENV="$VENV" scripts/hf-fixtures.sh venv
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    cargo build --release >&2
fi
exec "$VENV/bin/python" benches/peers/hf_real_size.py "$@"
