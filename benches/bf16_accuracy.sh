#!/usr/bin/env bash
# How far a bf16 meta-step lands from the f64 one: coopc's mixed precision
# (`backend.dtype = "bf16"`: bf16 weights and activations, f32 master
# copies, optimiser state and accumulation) beside the PyTorch peer's bf16
# mode (every tensor bf16, the optimiser's update included) and both sides'
# f32, on the same inputs, against coopc's f64 meta-step.
#
# For each bench pipeline (default: the tiny pair) it makes inputs with
# `coopc init`, runs `coopc grad` in f64, f32 and bf16 and the PyTorch peer
# in f32 and bf16, and prints benches/peers/compare_grads.py's per-group
# relative errors (loss, lower gradient, θ_K, its update θ_K − θ, the
# hypergradient).
#
# Needs the virtual environment benches/compare.sh creates (torch,
# safetensors): run that script once, or point VENV at one.
#
# Environment (all optional):
#   CONFIGS="a b"   pipeline names under benches/pipelines (default: the tiny pair)
#   SEEDS="0 1 2"   `coopc init` seeds, one set of inputs each (default: 0)
#   VENV=DIR        virtual environment with torch (default benches/.venv)
#   WORK=DIR        scratch folder (default target/bench-bf16)
#   SKIP_BUILD=1    use the existing target/release/coopc

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

CONFIGS=${CONFIGS:-"tiny-first-order tiny-truncated"}
SEEDS=${SEEDS:-0}
VENV=${VENV:-benches/.venv}
WORK=${WORK:-target/bench-bf16}
PY="$VENV/bin/python"

die() { printf 'bf16_accuracy.sh: error: %s\n' "$*" >&2; exit 1; }

[ -x "$PY" ] && "$PY" -c 'import torch, safetensors' 2>/dev/null ||
    die "no torch in $VENV: run benches/compare.sh once (it creates it), or set VENV"
if [ -z "${SKIP_BUILD:-}" ]; then
    cargo build --release --quiet || die "cargo build --release failed"
fi
COOPC="$ROOT/target/release/coopc"
[ -x "$COOPC" ] || die "no $COOPC"

# pipeline_with SRC DTYPE OUT: SRC with backend.dtype set to DTYPE.
pipeline_with() {
    if grep -q '^dtype *=' "$1"; then
        sed "s/^dtype *=.*/dtype = \"$2\"/" "$1" >"$3"
    else
        { cat "$1"; printf '\n[backend]\ndtype = "%s"\n' "$2"; } >"$3"
    fi
}

mkdir -p "$WORK"
echo "# bf16 against f64, $(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -m), torch $("$PY" -c 'import torch; print(torch.__version__)')"
for cfg in $CONFIGS; do
    src="benches/pipelines/$cfg.toml"
    [ -f "$src" ] || die "no $src"
    for seed in $SEEDS; do
        dir="$WORK/$cfg/seed$seed"
        mkdir -p "$dir"
        for d in f64 f32 bf16; do
            pipeline_with "$src" "$d" "$dir/$d.toml"
        done
        "$COOPC" init "$dir/f64.toml" --seed "$seed" --params "$dir/P.safetensors" --batch "$dir/B.safetensors" >/dev/null 2>&1 ||
            die "coopc init $cfg --seed $seed failed"
        io=(--params "$dir/P.safetensors" --batch "$dir/B.safetensors")
        for d in f64 f32 bf16; do
            "$COOPC" grad "$dir/$d.toml" "${io[@]}" --out "$dir/G-coopc-$d.safetensors" >/dev/null 2>&1 ||
                die "coopc grad $cfg $d failed"
        done
        for d in f32 bf16; do
            "$PY" benches/peers/torch_meta_step.py "$dir/f64.toml" "${io[@]}" --dtype "$d" \
                --out "$dir/G-torch-$d.safetensors" >/dev/null 2>&1 || die "the PyTorch peer failed on $cfg $d"
        done
        for other in coopc-f32 torch-f32 coopc-bf16 torch-bf16; do
            echo
            echo "## $cfg, seed $seed: $other against coopc f64"
            "$PY" benches/peers/compare_grads.py "$dir/G-coopc-f64.safetensors" "$dir/G-$other.safetensors" \
                --params "$dir/P.safetensors" --tol 1e9 | grep -E '^  [a-z_K]+ +[0-9]+ tensors' || true
        done
    done
done
