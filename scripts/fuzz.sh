#!/usr/bin/env bash
# Fuzzes coopc's inputs (pipelines, model folders, plan files, safetensors,
# JSONL data) for MINUTES minutes in all, from a fresh seed (or $SEED), with
# a release build. Findings are saved under target/tmp/fuzz-findings/ and
# named in the failure; each becomes a regression test in tests/fuzz.rs.
#
#   scripts/fuzz.sh 60          # an hour
#   SEED=42 scripts/fuzz.sh 5   # replay a seed
set -euo pipefail
minutes="${1:?usage: scripts/fuzz.sh MINUTES}"
cd "$(dirname "$0")/.."
seed="${SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}"
# The six targets share the time; the two test threads run them in pairs.
seconds=$(( minutes * 60 * 2 ))
echo "fuzzing for ${minutes} min from seed ${seed}"
COOPC_FUZZ_SECONDS="$seconds" COOPC_FUZZ_SEED="$seed" \
  cargo test --release --test fuzz -- --nocapture --test-threads=2
