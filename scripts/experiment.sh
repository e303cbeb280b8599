#!/usr/bin/env bash
# The fair experiment: does BRIDGE beat its baselines at equal compute?
#
# For each seed: pre-trains a common base (examples/experiment/base.toml:
# SFT on carry-free sums), then trains every method from it on
# examples/experiment/addition.toml (a fixed pool of flawed demonstrations,
# RL prompts from the whole distribution), plus BRIDGE with the truncated
# hypergradient (K = 2 lower steps per meta-step, T = 2 differentiated) and
# its controls at the same K = 2: first-order BRIDGE (so that the
# hypergradient, not the second lower step, is what the two differ in), mix
# and SFT.
# The same seed gives every method the same base, initial adapter and data
# order. Writes results/experiment.md (tables: per run, per method, and
# paired differences BRIDGE − method with bootstrap 95 % intervals at equal
# steps, wall time and FLOPs, and time to a held-out threshold) and
# results/experiment-{step,time,flops}.png; runs go to results/runs-experiment/.
#
# Usage: scripts/experiment.sh [STEPS [SEEDS [THRESHOLD]]] (defaults 300,
# "1 2 3", 0.5). Runs are sequential, each with the machine to itself, so
# wall times compare. With SKIP_RUNS=1 only the tables and figures are
# made again, from the runs already in results/runs-experiment/.
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-300}"
seeds="${2:-1 2 3}"
threshold="${3:-0.5}"
base_pipeline="examples/experiment/base.toml"
pipeline="examples/experiment/addition.toml"
methods="sft rl_zero cold_start mix alternating bridge"
cargo build --release --quiet
bin=target/release/coopc
runs="results/runs-experiment"
base_log="$runs/bases.md"
if [ "${SKIP_RUNS:-0}" != 1 ]; then
rm -rf "$runs"
mkdir -p "$runs"
truncated="$runs/addition-truncated.toml"
sed 's/^hypergradient = .*/hypergradient = { kind = "truncated", unroll = 2, backprop = 2 }/' \
    "$pipeline" >"$truncated"
grep -q 'kind = "truncated"' "$truncated"
first_order_k2="$runs/addition-k2.toml"
sed 's/^hypergradient = .*/hypergradient = { kind = "first_order", unroll = 2 }/' \
    "$pipeline" >"$first_order_k2"
grep -q 'unroll = 2' "$first_order_k2"
start=$(date +%s)
{
    echo "| seed | base held-out accuracy (greedy) | base pass@1 on held-out (8 samples, temperature 1) |"
    echo "|---:|---:|---:|"
} >"$base_log"
for seed in $seeds; do
    base="$runs/base-s$seed"
    echo "== base, seed $seed"
    "$bin" run "$base_pipeline" --seed "$seed" --out "$base" --quiet
    model=$(ls -d "$base"/checkpoints/step-* | sort -t- -k2 -n | tail -n1)
    report=$("$bin" eval --model "$model" --task "$pipeline" --samples 8 --temperature 1)
    greedy=$(sed -n 's/.*held-out accuracy \([0-9.]*\)%.*/\1/p' <<<"$report" | head -n1)
    sampled=$(sed -n 's/.*pass@1 \([0-9.]*\)%.*/\1/p' <<<"$report" | head -n1)
    echo "| $seed | $greedy % | $sampled % |" >>"$base_log"
    for method in $methods; do
        echo "== $method, seed $seed"
        "$bin" run "$pipeline" --model "$model" --method "$method" --seed "$seed" \
            --steps "$steps" --out "$runs/$method-s$seed" --quiet
    done
    echo "== bridge (truncated), seed $seed"
    "$bin" run "$truncated" --model "$model" --method bridge --seed "$seed" \
        --steps "$steps" --out "$runs/bridge_truncated-s$seed" --quiet
    for method in sft mix bridge; do
        echo "== $method (K = 2), seed $seed"
        "$bin" run "$first_order_k2" --model "$model" --method "$method" --seed "$seed" \
            --steps "$steps" --out "$runs/${method}_k2-s$seed" --quiet
    done
done
echo $(( $(date +%s) - start )) >"$runs/elapsed"
fi
elapsed=$(cat "$runs/elapsed")
dirs=$(ls -d "$runs"/*-s* | grep -v '/base-s')
kind="bilevel.hypergradient.kind"
unroll="bilevel.hypergradient.unroll"
baseline="bridge, kind=FirstOrder, unroll=1"
# shellcheck disable=SC2086
"$bin" compare $dirs --group-by "$kind" --group-by "$unroll" --last 3 --baseline "$baseline" \
    --threshold "$threshold" --smooth 0.9 --png results/experiment-step.png \
    --markdown "$runs/table.md" >/dev/null
# The same pairs against BRIDGE at K = 2: only its paired table.
# shellcheck disable=SC2086
"$bin" compare $dirs --group-by "$kind" --group-by "$unroll" --last 3 \
    --baseline "bridge, kind=FirstOrder, unroll=2" --threshold "$threshold" \
    --png "$runs/k2.png" | sed -n '/^Paired with/,$p' >"$runs/paired-k2.md"
for x in time flops; do
    # shellcheck disable=SC2086
    "$bin" compare $dirs --group-by "$kind" --group-by "$unroll" --smooth 0.9 --x "$x" \
        --png "results/experiment-$x.png" >/dev/null
done
cpu=$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -n1)
{
    echo "# The fair experiment: BRIDGE against its baselines from a common base"
    echo
    echo "Produced by \`scripts/experiment.sh $steps \"$seeds\" $threshold\` on $(date -u +%Y-%m-%d):"
    echo "$pipeline from the base of $base_pipeline, $steps meta-steps per run, seeds $seeds"
    echo "(paired: a seed fixes the base, the initial adapter and the data order). Held-out: greedy"
    echo "accuracy on all 128 problems, every 50 steps; a run's accuracy is the mean of its last 3"
    echo "evaluations. Machine: $cpu, $(nproc) cores, one run at a time; the whole grid took"
    echo "$((elapsed / 60)) min $((elapsed % 60)) s. Curves (mean over seeds, min–max band):"
    echo "[by meta-step](experiment-step.png), [by wall time](experiment-time.png),"
    echo "[by FLOPs](experiment-flops.png). Groups: the method, the hypergradient kind (which only"
    echo "BRIDGE reads; \`Truncated\` is BRIDGE with T = 2) and K (\`unroll\`, lower steps per meta-step)."
    echo
    echo "## The bases"
    echo
    cat "$base_log"
    echo
    echo "## Runs"
    echo
    cat "$runs/table.md"
    echo
    cat "$runs/paired-k2.md"
} >results/experiment.md
echo "wrote results/experiment.md ($((elapsed / 60)) min)"
