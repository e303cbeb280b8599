#!/usr/bin/env bash
# Fuzzes coopc's inputs (pipelines, model folders, plan files, safetensors,
# JSONL data) for about MINUTES minutes, from a fresh seed (or $SEED), with a
# release build. Findings are saved under target/tmp/fuzz-findings/ and
# named in the failure; each becomes a regression test in tests/fuzz.rs.
#
#   scripts/fuzz.sh 60          # an hour
#   SEED=42 scripts/fuzz.sh 5   # replay a seed
set -euo pipefail
minutes="${1:?usage: scripts/fuzz.sh MINUTES}"
cd "$(dirname "$0")/.."
seed="${SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}"
# Built first and run directly, so that cargo's build lock is free while it
# runs.
bin=$(cargo test --release --test fuzz --no-run 2>&1 | tee /dev/stderr |
      sed -n 's/.*Executable tests\/fuzz.rs (\(.*\))/\1/p' | tail -1)
[ -x "$bin" ] || { echo "the fuzz test did not build" >&2; exit 1; }
# The six time-shared targets run two at a time: each gets a third of the
# wall time.
seconds=$(( minutes * 60 * 2 ))
echo "fuzzing for ${minutes} min from seed ${seed}"
COOPC_FUZZ_SECONDS="$seconds" COOPC_FUZZ_SEED="$seed" "$bin" --nocapture --test-threads=2
