#!/usr/bin/env bash
# Trains BRIDGE on the addition task with each RL policy loss — GRPO's
# clipped surrogate (the default), CISPO, GSPO's sequence ratio and Dr.
# GRPO (constant normaliser and mean-centred advantages) — and with two
# policy updates per rollout batch (PPO's epochs, for the clipped surrogate
# and CISPO) and an entropy bonus, and writes results/losses-kUNROLL.md
# (table) and .png (curves); runs go to results/runs-losses/kUNROLL/.
#
# Usage: scripts/losses.sh [STEPS [UNROLL [SEEDS [VARIANTS]]]] (defaults
# 300, 2, "1 2 3", and every variant below; VARIANTS is a list of names).
#
# UNROLL is the number of lower steps per meta-step (bilevel.hypergradient
# first_order, unroll K). The rollouts of a meta-step are scored once,
# before its first lower step, so lower step 0 is on-policy (ratio 1, where
# the three surrogates have the same gradient) and steps 1.. are off-policy:
# only with K ≥ 2, or two updates per batch, can the losses differ beyond
# Dr. GRPO's weights. Every run has the same pipeline, seed, data order and
# number of meta-steps; only the [rl] keys below differ.
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-300}"
unroll="${2:-2}"
seeds="${3:-1 2 3}"
only="${4:-}"
base="examples/addition.toml"
cargo build --release --quiet
bin=target/release/coopc
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# name and the [rl] keys it sets (replacing the example's where present).
variants=(
    "ppo_clip|"
    "cispo|loss = \"cispo\""
    "gspo|ratio_level = \"sequence\"\nclip_low = 0.0003\nclip_high = 0.0004"
    "dr_grpo|loss_agg = \"seq_mean_token_sum_norm\"\nadvantage = \"group_mean\""
    "ppo_clip_epochs2|updates_per_batch = 2"
    "cispo_epochs2|loss = \"cispo\"\nupdates_per_batch = 2"
    "entropy_bonus|entropy_coef = 0.01"
    "entropy_bonus_0.05|entropy_coef = 0.05"
)
runs="results/runs-losses/k$unroll"
mkdir -p "$runs"
start=$(date +%s)
for v in "${variants[@]}"; do
    name=${v%%|*}
    if [ -n "$only" ] && [[ " $only " != *" $name "* ]]; then
        continue
    fi
    keys=$(printf '%b' "${v#*|}")
    pipeline="$work/$name.toml"
    # Drop the example's lines for the keys set here, then add them under [rl].
    sed "s/^hypergradient = .*/hypergradient = { kind = \"first_order\", unroll = $unroll }/" "$base" >"$pipeline"
    while IFS= read -r line; do
        [ -n "$line" ] || continue
        key=${line%% =*}
        sed -i "/^\[rl\]/,/^\[/{/^${key} = /d}" "$pipeline"
    done <<<"$keys"
    if [ -n "$keys" ]; then
        printf '%s\n' "$keys" >"$work/keys"
        sed -i "/^\[rl\]/r $work/keys" "$pipeline"
    fi
    "$bin" check "$pipeline" >/dev/null
    for seed in $seeds; do
        out="$runs/${name}-s${seed}"
        rm -rf "$out"
        echo "== $name seed $seed"
        "$bin" run "$pipeline" --seed "$seed" --steps "$steps" --out "$out" --quiet
    done
done
elapsed=$(( $(date +%s) - start ))
group=(--group-by rl.loss --group-by rl.ratio_level --group-by rl.loss_agg
    --group-by rl.updates_per_batch --group-by rl.entropy_coef)
"$bin" compare "$runs"/* "${group[@]}" --smooth 0.9 --png "results/losses-k$unroll.png" \
    --markdown "$work/table.md" >/dev/null
cpu=$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -n1)
{
    echo "# Addition: BRIDGE with each RL policy loss"
    echo
    echo "Produced by \`scripts/losses.sh $steps $unroll \"$seeds\"${only:+ \"$only\"}\` on $(date -u +%Y-%m-%d): $base with"
    echo "K = $unroll lower steps per meta-step (first-order hypergradient) and only the [rl] keys of each"
    echo "variant changed (see the script); $steps meta-steps per run, seeds $seeds; greedy held-out accuracy"
    echo "on all 128 held-out problems. Machine: $cpu, $(nproc) cores; all runs took"
    echo "$((elapsed / 60)) min $((elapsed % 60)) s. Curves: [losses-k$unroll.png](losses-k$unroll.png)."
    echo
    cat "$work/table.md"
} >"results/losses-k$unroll.md"
echo "wrote results/losses-k$unroll.md ($((elapsed / 60)) min)"
