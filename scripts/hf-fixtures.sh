#!/usr/bin/env bash
# Regenerates the Hugging Face fixtures under tests/fixtures/hf (tiny random
# models of each architecture coopc loads, saved by transformers, with the
# log-probs transformers computes for them) and the GSM8K-format sample
# under examples/data/gsm8k-sample. The fixtures are committed, so the tests
# need no Python; run this after changing scripts/hf-fixtures.py.
#
# Makes a virtual environment (VENV, default scripts/.venv) with torch,
# transformers, peft and safetensors from the package registry. PyPI's
# Linux x86_64 torch wheel is the CUDA build (about 3 GB with its CUDA
# library wheels) although nothing here uses a GPU.
#
#   scripts/hf-fixtures.sh            # fixtures and sample
#   scripts/hf-fixtures.sh roundtrip RUN_DIR MERGED_DIR COOPC
#                                     # check a run's adapter and merged export
#   scripts/hf-fixtures.sh venv       # only make the environment
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.15.0
TRANSFORMERS_VERSION=5.25.0
PEFT_VERSION=0.21.2
SAFETENSORS_VERSION=0.8.0
VENV=${VENV:-scripts/.venv}
PYTHON=${PYTHON:-python3}

venv_ok() {
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$TRANSFORMERS_VERSION" <<'PY' 2>/dev/null
import sys
import peft, safetensors, torch, transformers
sys.exit(0 if transformers.__version__ == sys.argv[1] else 1)
PY
}

if ! venv_ok; then
    echo "creating $VENV (torch $TORCH_VERSION, transformers $TRANSFORMERS_VERSION, peft $PEFT_VERSION)" >&2
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input --quiet \
        "torch==$TORCH_VERSION" "transformers==$TRANSFORMERS_VERSION" \
        "peft==$PEFT_VERSION" "safetensors==$SAFETENSORS_VERSION"
    venv_ok || { echo "the packages do not import in $VENV" >&2; exit 1; }
fi

if [ "${1:-}" = venv ]; then
    exit 0
fi
if [ "${1:-}" = roundtrip ]; then
    shift
    exec "$VENV/bin/python" scripts/hf-roundtrip.py "$@"
fi
"$PYTHON" scripts/gsm8k-sample.py examples/data/gsm8k-sample
"$VENV/bin/python" scripts/hf-fixtures.py --out tests/fixtures/hf --data examples/data/gsm8k-sample
