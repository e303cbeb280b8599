#!/usr/bin/env bash
# Time per meta-step of the default example on one process and on two MPI
# processes (same cores in all: 2 threads, or 1 thread per process),
# alternating ROUNDS times, and the bytes one meta-step of the medium
# pipelines sums over processes. Needs a coopc built with --features mpi.
#   bash benches/data_parallel.sh [ROUNDS] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
steps=${2:-12}
bin=target/release/coopc
[ -x "$bin" ] || cargo build --release --features mpi
out=$(mktemp -d)
mpirun_flags=(--oversubscribe)
[ "$(id -u)" = 0 ] && mpirun_flags+=(--allow-run-as-root)
median_ms() {
    python3 - "$1" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
# Evaluation steps also time the held-out pass.
t = [r["step_time_s"] for r in rows if r.get("eval_accuracy") is None]
print(f"{statistics.median(t) * 1000:.1f}")
PY
}
declare -A times
for r in $(seq "$rounds"); do
    for cfg in one-2t two-1t one-1t; do
        d="$out/$cfg-$r"
        case $cfg in
        one-2t) RAYON_NUM_THREADS=2 "$bin" run examples/addition.toml --steps "$steps" -q --eval-limit 1 --out "$d" >/dev/null ;;
        one-1t) RAYON_NUM_THREADS=1 "$bin" run examples/addition.toml --steps "$steps" -q --eval-limit 1 --out "$d" >/dev/null ;;
        two-1t) mpirun "${mpirun_flags[@]}" -np 2 -x RAYON_NUM_THREADS=1 "$bin" run examples/addition.toml \
            --steps "$steps" -q --eval-limit 1 --out "$d" >/dev/null ;;
        esac
        times[$cfg]+="$(median_ms "$d") "
    done
done
echo "median ms per meta-step (default example, $steps steps, $rounds rounds, one value per round):"
for cfg in one-2t one-1t two-1t; do echo "  $cfg: ${times[$cfg]}"; done
python3 - "$out" "$rounds" <<'PY'
import json, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def metrics(d):
    return [json.loads(l) for l in open(f"{out}/{d}/metrics.jsonl")]
a, b = metrics("one-2t-1"), metrics("two-1t-1")
worst = max(abs(x["sft_loss"] - y["sft_loss"]) / max(abs(x["sft_loss"]), 1) for x, y in zip(a, b))
print(f"largest relative difference of loss.sft between one and two processes: {worst:.2e}")
PY
for p in medium-first-order medium-truncated; do
    "$bin" compile "benches/pipelines/$p.toml" --world 2 -o "$out/$p.plan" | grep "data parallel" | sed "s/^/$p: /"
done
rm -rf "$out"
