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
# wall times compare.
#
# A second grid matches compute by wall time: every variant gets the budget
# of one first-order BRIDGE run (K = 1, its mean wall time over the seeds),
# as a number of meta-steps measured from its own runs of the first grid
# (budget / its seconds per meta-step, evaluations included), with its
# schedules (λ, learning rates, cold_start's switch) stretched to them.
# Its table is results/experiment.md's last part, its curves
# results/experiment-budget.png.
#
# SKIP_RUNS=1 only makes the tables and figures again, from the runs already
# in results/runs-experiment/; SKIP_STEP_RUNS=1 keeps the first grid's runs
# and runs the equal-time grid.
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
truncated="$runs/addition-truncated.toml"
first_order_k2="$runs/addition-k2.toml"
# The pipeline with another [bilevel] hypergradient: variant HYPERGRADIENT FILE.
variant() {
    sed "s/^hypergradient = .*/hypergradient = $1/" "$pipeline" >"$2"
    grep -qF "hypergradient = $1" "$2"
}
# The seed's base: the checkpoint its run folder names as the latest.
base_model() {
    local dir="$runs/base-s$1/checkpoints"
    echo "$dir/$(cat "$dir/latest")"
}
if [ "${SKIP_RUNS:-0}" != 1 ] && [ "${SKIP_STEP_RUNS:-0}" != 1 ]; then
rm -rf "$runs"
mkdir -p "$runs"
variant '{ kind = "truncated", unroll = 2, backprop = 2 }' "$truncated"
variant '{ kind = "first_order", unroll = 2 }' "$first_order_k2"
start=$(date +%s)
{
    echo "| seed | base held-out accuracy (greedy) | base pass@1 on held-out (8 samples, temperature 1) |"
    echo "|---:|---:|---:|"
} >"$base_log"
for seed in $seeds; do
    base="$runs/base-s$seed"
    echo "== base, seed $seed"
    "$bin" run "$base_pipeline" --seed "$seed" --out "$base" --quiet
    model=$(base_model "$seed")
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

# The equal-time grid: name, pipeline, method of each variant (folders of
# the first grid are NAME-sSEED).
budgeted="$runs/equal-time"
variants=(
    "sft|$pipeline|sft"
    "rl_zero|$pipeline|rl_zero"
    "cold_start|$pipeline|cold_start"
    "mix|$pipeline|mix"
    "alternating|$pipeline|alternating"
    "bridge_truncated|$truncated|bridge"
    "sft_k2|$first_order_k2|sft"
    "mix_k2|$first_order_k2|mix"
    "bridge_k2|$first_order_k2|bridge"
)
# Seconds per meta-step of a run folder: its wall time over its steps.
per_step() {
    tail -n1 "$1/metrics.jsonl" |
        sed 's/^{"step":\([0-9]*\),.*"wall_time_s":\([0-9.e+-]*\),.*/\2 \1/' |
        awk '{ print $1 / ($2 + 1) }'
}
mean_over_seeds() {
    local name=$1 total=0 n=0 v
    for seed in $seeds; do
        v=$(per_step "$runs/$name-s$seed")
        total=$(awk -v a="$total" -v b="$v" 'BEGIN { print a + b }')
        n=$((n + 1))
    done
    awk -v a="$total" -v n="$n" 'BEGIN { print a / n }'
}
budget=$(awk -v p="$(mean_over_seeds bridge)" -v s="$steps" 'BEGIN { printf "%.1f", p * s }')
if [ "${SKIP_RUNS:-0}" != 1 ]; then
    rm -rf "$budgeted"
    mkdir -p "$budgeted"
    start=$(date +%s)
    {
        echo "| variant | seconds per meta-step (first grid) | meta-steps in the budget |"
        echo "|---|---:|---:|"
    } >"$budgeted/steps.md"
    for seed in $seeds; do
        # BRIDGE at K = 1 defines the budget: its runs are the first grid's.
        cp -r "$runs/bridge-s$seed" "$budgeted/bridge-s$seed"
    done
    for v in "${variants[@]}"; do
        IFS='|' read -r name file method <<<"$v"
        secs=$(mean_over_seeds "$name")
        n=$(awk -v b="$budget" -v p="$secs" 'BEGIN { n = int(b / p); print (n < 1 ? 1 : n) }')
        echo "| $name | $secs | $n |" >>"$budgeted/steps.md"
        for seed in $seeds; do
            model=$(base_model "$seed")
            echo "== $name, seed $seed, $n meta-steps (${budget} s budget)"
            "$bin" run "$file" --model "$model" --method "$method" --seed "$seed" \
                --steps "$n" --out "$budgeted/$name-s$seed" --quiet
        done
    done
    echo $(( $(date +%s) - start )) >"$budgeted/elapsed"
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
if [ -f "$budgeted/elapsed" ]; then
    # shellcheck disable=SC2086
    "$bin" compare $(ls -d "$budgeted"/*-s*) --group-by "$kind" --group-by "$unroll" --last 3 \
        --baseline "$baseline" --threshold "$threshold" --smooth 0.9 --x time \
        --png results/experiment-budget.png --markdown "$budgeted/table.md" >/dev/null
fi
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
    if [ -f "$budgeted/elapsed" ]; then
        b_elapsed=$(cat "$budgeted/elapsed")
        echo
        echo "## At equal wall time: every variant with the budget of one BRIDGE run"
        echo
        echo "Every run below had the same wall-time budget, $budget s (the mean wall time of"
        echo "first-order BRIDGE, K = 1, over 300 meta-steps), as meta-steps measured from its"
        echo "variant's runs above; its schedules (λ, learning rates, cold_start's switch at half)"
        echo "span those steps. The BRIDGE (K = 1) runs are those above. In the paired table,"
        echo "\"at equal steps\" compares the runs' ends, i.e. equal budgets. This grid took"
        echo "$((b_elapsed / 60)) min $((b_elapsed % 60)) s. Curves: [by wall time](experiment-budget.png)."
        echo
        cat "$budgeted/steps.md"
        echo
        cat "$budgeted/table.md"
    fi
} >results/experiment.md
echo "wrote results/experiment.md ($((elapsed / 60)) min)"
