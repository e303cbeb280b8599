#!/usr/bin/env bash
# coopc against PyTorch and burn on the CPU: one BRIDGE meta-step on fixed data.
#
# For each bench pipeline (default: benches/pipelines/tiny-first-order.toml,
# tiny-truncated.toml and tiny-truncated-keep.toml, the last with the PyTorch
# peer's memory plan) this script
#   1. makes inputs with `coopc init` and checks the PyTorch peer
#      (benches/peers/torch_meta_step.py) and the burn peer
#      (benches/peers/burn, first-order hypergradient only: burn has no
#      second-order autodiff, so it reports `truncated` as unsupported)
#      against `coopc grad`, in f32 and f64 (benches/peers/compare_grads.py:
#      relative error per tensor);
#   2. times `coopc grad --repeat N` against the PyTorch peer in eager mode
#      and under torch.compile and against the burn peer, alternating the
#      processes over ROUNDS rounds (each process warms up once, then times N
#      meta-steps);
#   3. prints a markdown table of the median times and peak memory, with the
#      machine and the date.
#
# Runs from a clean clone: it builds coopc (`cargo build --release`) and the
# burn peer (its own cargo workspace, benches/peers/burn/target), and puts
# PyTorch into a virtual environment of its own (benches/.venv).
#
# Environment (all optional):
#   REPEAT=N        timed meta-steps per process (default 5)
#   ROUNDS=N        alternating rounds of timing processes (default 3)
#   CONFIGS="a b"   pipeline names under benches/pipelines (default: the tiny three)
#   THREADS=N       threads for both sides (default: all CPUs; coopc's rayon pool
#                   and GEMM, torch.set_num_threads)
#   VENV=DIR        virtual environment to use or create (default benches/.venv)
#   PYTHON=EXE      Python that creates the environment (default python3)
#   WORK=DIR        scratch folder (default target/bench-compare)
#   SKIP_BUILD=1    use the existing target/release/coopc and burn peer binary
#   SKIP_COMPILE=1  leave out the torch.compile runs
#   SKIP_BURN=1     leave out the burn peer (and its build, several minutes
#                   clean on 2 cores)
#   BURN_PEER=EXE   the burn peer binary (default
#                   benches/peers/burn/target/release/coopc-burn-peer)
#   TOL32, TOL64    agreement tolerances (default 1e-4 and 1e-8)

set -euo pipefail

TORCH_VERSION=2.15.0
SAFETENSORS_VERSION=0.8.0
NUMPY_VERSION=2.4.6
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

REPEAT=${REPEAT:-5}
ROUNDS=${ROUNDS:-3}
CONFIGS=${CONFIGS:-"tiny-first-order tiny-truncated tiny-truncated-keep"}
VENV=${VENV:-benches/.venv}
PYTHON=${PYTHON:-python3}
WORK=${WORK:-target/bench-compare}
TOL32=${TOL32:-1e-4}
TOL64=${TOL64:-1e-8}
CPUS=$(nproc)
THREADS=${THREADS:-$CPUS}

say() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'compare.sh: error: %s\n' "$*" >&2; exit 1; }

# --- PyTorch -----------------------------------------------------------------

venv_ok() {
    [ -x "$VENV/bin/python" ] &&
        "$VENV/bin/python" - "$TORCH_VERSION" <<'EOF' 2>/dev/null
import sys
import numpy, safetensors, torch
sys.exit(0 if torch.__version__.split("+")[0] == sys.argv[1] else 1)
EOF
}

install_torch() {
    command -v "$PYTHON" >/dev/null || die "no $PYTHON to create the virtual environment with"
    "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' ||
        die "$PYTHON is older than 3.11 (the peer reads TOML with tomllib)"
    say "creating $VENV with torch $TORCH_VERSION"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV" >&2 || die "could not create a virtual environment in $VENV"
    local pip=("$VENV/bin/python" -m pip install --disable-pip-version-check --no-input)
    # The CPU-only build (~200 MB) comes from PyTorch's own index. Where only
    # PyPI is reachable, PyPI's Linux x86_64 wheel is the CUDA build: its
    # libraries link against the CUDA runtime, cuBLAS, cuDNN, NCCL, ... at load
    # time, so `import torch` needs those wheels too (about 3 GB to download,
    # 5.5 GB installed), although nothing here uses a GPU.
    if "$VENV/bin/python" - "$TORCH_CPU_INDEX" <<'EOF' 2>/dev/null
import sys, urllib.request
urllib.request.urlopen(sys.argv[1] + "/torch/", timeout=10)
EOF
    then
        echo "installing the CPU-only build from $TORCH_CPU_INDEX" >&2
        "${pip[@]}" "torch==$TORCH_VERSION" --index-url "$TORCH_CPU_INDEX" >&2 ||
            die "pip could not install torch==$TORCH_VERSION from $TORCH_CPU_INDEX"
    else
        echo "$TORCH_CPU_INDEX is not reachable: installing torch from PyPI (the CUDA build and its CUDA library wheels, ~3 GB)" >&2
        "${pip[@]}" "torch==$TORCH_VERSION" >&2 ||
            die "pip could not install torch==$TORCH_VERSION from PyPI"
    fi
    "${pip[@]}" "safetensors==$SAFETENSORS_VERSION" "numpy==$NUMPY_VERSION" >&2 ||
        die "pip could not install safetensors==$SAFETENSORS_VERSION and numpy==$NUMPY_VERSION"
    venv_ok || die "torch $TORCH_VERSION does not import in $VENV"
}

if venv_ok; then
    echo "using torch $TORCH_VERSION from $VENV" >&2
else
    install_torch
fi
PY="$VENV/bin/python"
PEER=(env OMP_NUM_THREADS="$THREADS" "$PY" benches/peers/torch_meta_step.py --threads "$THREADS")
COMPARE=("$PY" benches/peers/compare_grads.py)

# --- coopc ---------------------------------------------------------------------

COOPC=target/release/coopc
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    say "building coopc (cargo build --release)"
    command -v cargo >/dev/null || die "cargo is not installed"
    cargo build --release >&2 || die "cargo build --release failed"
fi
[ -x "$COOPC" ] || die "$COOPC does not exist (build it, or unset SKIP_BUILD)"
COOPC_ENV=(env RAYON_NUM_THREADS="$THREADS")

# --- burn ----------------------------------------------------------------------

BURN=0
[ "${SKIP_BURN:-0}" = 1 ] || BURN=1
BURN_PEER=${BURN_PEER:-benches/peers/burn/target/release/coopc-burn-peer}
if [ $BURN = 1 ]; then
    if [ "${SKIP_BUILD:-0}" != 1 ]; then
        say "building the burn peer (cargo build --release in benches/peers/burn)"
        cargo build --release --manifest-path benches/peers/burn/Cargo.toml >&2 ||
            die "building the burn peer failed (SKIP_BURN=1 leaves it out)"
    fi
    [ -x "$BURN_PEER" ] || die "$BURN_PEER does not exist (build it, unset SKIP_BUILD, or set SKIP_BURN=1)"
fi
# The peer sets RAYON_NUM_THREADS and MATMUL_NUM_THREADS from --threads.
BURN_RUN=("$BURN_PEER" --threads "$THREADS")

# --- agreement -------------------------------------------------------------------

mkdir -p "$WORK"
RESULTS="$WORK/results.jsonl"
: >"$RESULTS"
AGREEMENT="$WORK/agreement.txt"
: >"$AGREEMENT"
SUMMARY="$WORK/agreement-summary.txt"
: >"$SUMMARY"

# check CFG PREC PEER TOL G_PEER: compare_grads against coopc's output, with a
# one-line summary for the report.
check() {
    local cfg=$1 prec=$2 peer=$3 tol=$4 g=$5 dir="$WORK/$1" out
    echo "### $cfg, $prec, $peer (tolerance $tol)" >>"$AGREEMENT"
    if ! out=$("${COMPARE[@]}" "$dir/G_coopc_$prec.safetensors" "$g" --params "$dir/P.safetensors" --tol "$tol"); then
        echo "$out" | tee -a "$AGREEMENT" >&2
        die "$cfg ($prec): the $peer peer and coopc disagree (see above)"
    fi
    echo "$out" | tee -a "$AGREEMENT" >&2
    echo "$out" | grep 'compare_grads: max rel err' |
        sed -E "s/^compare_grads: max rel err ([^ ]+) over (.*): ([^:]*)\$/- $cfg, $prec, $peer: max rel err \1 over \2 (\3)/" >>"$SUMMARY"
}

for cfg in $CONFIGS; do
    pipe="benches/pipelines/$cfg.toml"
    [ -f "$pipe" ] || die "no pipeline $pipe"
    dir="$WORK/$cfg"
    mkdir -p "$dir"
    say "$cfg: inputs and agreement"
    "$COOPC" check "$pipe" >&2 || die "coopc check $pipe failed"
    "$COOPC" init "$pipe" --params "$dir/P.safetensors" --batch "$dir/B.safetensors" >&2 ||
        die "coopc init $pipe failed"
    # The same pipeline in f64, for the tighter check.
    sed -E 's/^dtype = "f32"/dtype = "f64"/' "$pipe" >"$dir/f64.toml"
    grep -q '^dtype = "f64"' "$dir/f64.toml" || die "$pipe has no \`dtype = \"f32\"\` line to switch to f64"
    for prec in f32 f64; do
        p="$pipe"; tol="$TOL32"
        if [ "$prec" = f64 ]; then p="$dir/f64.toml"; tol="$TOL64"; fi
        "${COOPC_ENV[@]}" "$COOPC" grad "$p" --params "$dir/P.safetensors" --batch "$dir/B.safetensors" \
            --out "$dir/G_coopc_$prec.safetensors" >&2 || die "coopc grad $p failed"
        "${PEER[@]}" "$p" --params "$dir/P.safetensors" --batch "$dir/B.safetensors" \
            --out "$dir/G_torch_$prec.safetensors" >&2 || die "the PyTorch peer failed on $p"
        check "$cfg" "$prec" torch "$tol" "$dir/G_torch_$prec.safetensors"
        [ $BURN = 1 ] || continue
        set +e
        out=$("${BURN_RUN[@]}" "$p" --params "$dir/P.safetensors" --batch "$dir/B.safetensors" \
            --out "$dir/G_burn_$prec.safetensors")
        rc=$?
        set -e
        echo "$out" >&2
        if [ $rc = 3 ]; then
            # A hypergradient burn cannot form (no second-order autodiff).
            reason=$(echo "$out" | grep '^unsupported: ' | sed 's/^unsupported: //')
            echo "### $cfg, $prec, burn: unsupported: $reason" >>"$AGREEMENT"
            echo "- $cfg, $prec, burn: unsupported ($reason)" >>"$SUMMARY"
            continue
        fi
        [ $rc = 0 ] || die "the burn peer failed on $p (exit $rc)"
        check "$cfg" "$prec" burn "$tol" "$dir/G_burn_$prec.safetensors"
    done
done

# --- timing ----------------------------------------------------------------------

MODES=(eager)
[ "${SKIP_COMPILE:-0}" = 1 ] || MODES+=(compile)

record() { # config side mode round json-fields...
    local cfg=$1 side=$2 mode=$3 round=$4
    shift 4
    printf '{"config": "%s", "side": "%s", "mode": "%s", "round": %s, %s}\n' "$cfg" "$side" "$mode" "$round" "$*" >>"$RESULTS"
}

for round in $(seq 1 "$ROUNDS"); do
    for cfg in $CONFIGS; do
        pipe="benches/pipelines/$cfg.toml"
        dir="$WORK/$cfg"
        args=(--params "$dir/P.safetensors" --batch "$dir/B.safetensors")
        say "round $round/$ROUNDS, $cfg: coopc"
        out=$("${COOPC_ENV[@]}" "$COOPC" grad "$pipe" "${args[@]}" --out "$dir/G_time.safetensors" --repeat "$REPEAT") ||
            die "coopc grad --repeat failed on $pipe"
        echo "$out" | grep 'timing:' >&2 || die "coopc grad printed no timing line"
        line=$(echo "$out" | grep 'timing:')
        median=$(echo "$line" | sed -E 's/.*median ([0-9.]+) ms.*/\1/')
        min=$(echo "$line" | sed -E 's/.*min ([0-9.]+) ms.*/\1/')
        peak=$(echo "$line" | sed -E 's/.*peak RSS ([0-9.]+) MiB.*/\1/')
        record "$cfg" coopc native "$round" "\"status\": \"ok\", \"median_ms\": $median, \"min_ms\": $min, \"peak_mib\": $peak"
        modes=("${MODES[@]}")
        i=0
        while [ $i -lt ${#modes[@]} ]; do
            mode=${modes[$i]}
            i=$((i + 1))
            say "round $round/$ROUNDS, $cfg: torch $mode"
            flag=()
            [ "$mode" = compile ] && flag=(--compile)
            [ "$mode" = compile-outer ] && flag=(--compile outer)
            set +e
            out=$("${PEER[@]}" "$pipe" "${args[@]}" --repeat "$REPEAT" "${flag[@]}" 2>"$dir/peer_stderr.txt")
            rc=$?
            set -e
            echo "$out" | grep -E 'timing:|unsupported:' >&2 || true
            json=$(echo "$out" | grep '^result: ' | sed 's/^result: //' || true)
            if [ -z "$json" ]; then
                tail -n 20 "$dir/peer_stderr.txt" >&2
                die "the PyTorch peer ($mode) failed on $pipe (exit $rc)"
            fi
            record "$cfg" torch "$mode" "$round" "\"peer\": $json"
            # Where the whole meta-step cannot be compiled (double backward
            # through AOTAutograd), also time compiling only the losses that
            # are differentiated once, the inner steps staying eager.
            if [ "$mode" = compile ] && echo "$json" | grep -q '"status": "unsupported"'; then
                modes+=(compile-outer)
            fi
        done
        [ $BURN = 1 ] || continue
        say "round $round/$ROUNDS, $cfg: burn"
        set +e
        out=$("${BURN_RUN[@]}" "$pipe" "${args[@]}" --repeat "$REPEAT" 2>"$dir/burn_stderr.txt")
        rc=$?
        set -e
        echo "$out" | grep -E 'timing:|unsupported:' >&2 || true
        json=$(echo "$out" | grep '^result: ' | sed 's/^result: //' || true)
        if [ -z "$json" ]; then
            tail -n 20 "$dir/burn_stderr.txt" >&2
            die "the burn peer failed on $pipe (exit $rc)"
        fi
        record "$cfg" burn eager "$round" "\"peer\": $json"
    done
done

# Memory of a process that has only imported torch (the floor under the peer's RSS).
torch_floor=$("$PY" -c 'import resource, torch; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)')

# --- report ---------------------------------------------------------------------

say "report"
cpu_model=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || echo unknown)
mem=$(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)
torch_build=$("$PY" -c 'import torch; print(torch.__version__)')
coopc_rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if ! git diff --quiet HEAD 2>/dev/null; then coopc_rev="$coopc_rev+changes"; fi

"$PY" - "$RESULTS" <<EOF
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print()
print("## coopc grad vs PyTorch" + (" and burn" if any(r["side"] == "burn" for r in rows) else "") + ", one meta-step on fixed data (CPU)")
print()
print("Machine: $cpu_model, $CPUS CPUs, $mem; threads: $THREADS on every side "
      "(coopc: RAYON_NUM_THREADS, torch.set_num_threads, "
      "burn peer: --threads, which sets its rayon and matrixmultiply pools).")
print("Date: $(date -u '+%Y-%m-%d %H:%M UTC'). coopc $coopc_rev (release build), torch $torch_build"
      + (", burn 0.21.0 (ndarray backend + autodiff, without burn-ndarray's SIMD feature, release build; "
         "first-order hypergradient only)" if any(r["side"] == "burn" for r in rows) else "") + ".")
print("Each figure: median over $ROUNDS alternating rounds of the per-process median of $REPEAT "
      "meta-steps after one warm-up (min over all in brackets). Peak memory: the process's peak RSS "
      "(largest over the rounds); a bare \`import torch\` reaches ${torch_floor%.*} MiB here. "
      "Time ratio above 1: coopc is faster.")
print()
print("| config | peer | coopc median ms | peer median ms | time peer / coopc | coopc peak RSS MiB | peer peak RSS MiB | RSS peer / coopc |")
print("|---|---|---|---|---|---|---|---|")
configs = []
for r in rows:
    if r["config"] not in configs:
        configs.append(r["config"])
def fmt(x):
    return f"{x:,.1f}"
for cfg in configs:
    c = [r for r in rows if r["config"] == cfg and r["side"] == "coopc"]
    c_med = statistics.median(r["median_ms"] for r in c)
    c_min = min(r["min_ms"] for r in c)
    c_rss = max(r["peak_mib"] for r in c)
    names = {
        ("torch", "eager"): "torch eager",
        ("torch", "compile"): "torch.compile",
        ("torch", "compile-outer"): "torch.compile, once-differentiated losses only (inner steps eager)",
        ("burn", "eager"): "burn (ndarray, autodiff)",
    }
    for (side, mode), name in names.items():
        p = [r["peer"] for r in rows if r["config"] == cfg and r["side"] == side and r["mode"] == mode]
        if not p:
            continue
        bad = [x for x in p if x.get("status") != "ok"]
        if bad:
            reason = bad[0].get("reason", "failed").replace("|", "/")
            print(f"| {cfg} | {name} | {fmt(c_med)} ({fmt(c_min)}) | unsupported: {reason} | — | {fmt(c_rss)} | — | — |")
            continue
        p_med = statistics.median(x["median_ms"] for x in p)
        p_min = min(x["min_ms"] for x in p)
        p_rss = max(x["peak_mib"] for x in p)
        print(f"| {cfg} | {name} | {fmt(c_med)} ({fmt(c_min)}) | {fmt(p_med)} ({fmt(p_min)}) | "
              f"{p_med / c_med:.2f}× | {fmt(c_rss)} | {fmt(p_rss)} | {p_rss / c_rss:.1f}× |")
print()
print("Agreement (coopc grad vs each peer, relative error per tensor; tolerances f32 $TOL32, f64 $TOL64):")
print()
EOF
cat "$SUMMARY"
echo
echo "Raw results: $RESULTS; per-tensor agreement: $AGREEMENT"
