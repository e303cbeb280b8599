#!/usr/bin/env bash
# Trains every method on the addition task with three seeds and writes
# results/addition.md (table), results/addition.png (curves against
# meta-steps), results/addition-time.png (against wall time) and the runs
# under results/runs/. Usage: scripts/results.sh [STEPS] (default 150).
# Budget: sized to finish in under an hour on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-150}"
pipeline="examples/addition.toml"
cargo build --release --quiet
bin=target/release/coopc
mkdir -p results/runs
start=$(date +%s)
for seed in 1 2 3; do
    for method in bridge rl_zero cold_start sft mix alternating; do
        out="results/runs/${method}-s${seed}"
        rm -rf "$out"
        echo "== $method seed $seed"
        "$bin" run "$pipeline" --method "$method" --seed "$seed" --steps "$steps" \
            --out "$out" --quiet
    done
done
elapsed=$(( $(date +%s) - start ))
"$bin" compare results/runs/* --smooth 0.9 --png results/addition.png --markdown results/addition-table.md > /dev/null
"$bin" compare results/runs/* --smooth 0.9 --png results/addition-time.png --x time > /dev/null
cpu=$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -n1)
{
    echo "# Addition: BRIDGE against its baselines"
    echo
    echo "Produced by \`scripts/results.sh $steps\` on $(date -u +%Y-%m-%d): $pipeline,"
    echo "$steps meta-steps per run, seeds 1–3, greedy held-out accuracy on all 128 held-out problems"
    echo "(drawn like the RL prompts unless the pipeline sets task.eval_digits; never an SFT demonstration or"
    echo "an RL prompt). Machine: $cpu, $(nproc) cores; the whole table took $((elapsed / 60)) min $((elapsed % 60)) s."
    echo "Curves (mean over seeds, min–max band): [by meta-step](addition.png), [by wall time](addition-time.png)."
    echo
    cat results/addition-table.md
} > results/addition.md
echo "wrote results/addition.md ($((elapsed / 60)) min)"
