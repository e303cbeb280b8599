#!/usr/bin/env bash
# GPU check for coopc on a CUDA machine. Needs no Rust toolchain: give it
# release binaries built elsewhere.
#
#   scripts/gpu-check.sh DIR
#
# DIR holds `coopc` (target/release/coopc) and, optionally,
# `device_kernels` (the test binary of tests/device_kernels.rs, from
# `cargo test --release --test device_kernels --no-run`) and `device_bench`
# (the bench binary of benches/device.rs, from `cargo bench --bench device
# --no-run`), each as is or gzip-compressed (`NAME.gz`, unpacked into a
# temporary folder): scripts/gpu-pack.sh builds and packs all three. Results go to $OUT (default ./gpu-check-out): the CUDA kernel
# suite's log, the emitted kernels, a timing table of one meta-step per
# bench pipeline on cuda (with CubeCL's matmul in f32 and in TF32, and with
# coopc's) vs the CPU
# (with the process's peak RSS and, on
# cuda, the device memory peak of one extra run — the medium truncated
# pipeline's is what the 24 GB target is about), the fused linear log-prob,
# attention and matmul benches, the metrics of a short training run of the default example on
# both (STEPS meta-steps, default 100), and last the medium pipelines on
# CUDA (MEDIUM=0 skips them; MEDIUM_REPEAT, MEDIUM_TIMEOUT).
# GPU_BACKEND=wgpu runs the same checks on wgpu instead of cuda (e.g. on
# Mesa's lavapipe, to try the script on a machine without a GPU).
# PARTS picks sections (default "suite emit tiny bench train medium"), e.g.
# PARTS="suite bench" then PARTS="tiny train" to fit two shorter calls;
# BENCH_SECS sets each bench's measurement time (default 3 s; criterion's
# groups otherwise take 5-20 s each).
set -uo pipefail
BIN_DIR=${1:?usage: scripts/gpu-check.sh DIR (with coopc and optionally device_kernels)}
BIN_DIR=$(cd "$BIN_DIR" && pwd) || exit 2
OUT=${OUT:-./gpu-check-out}
mkdir -p "$OUT"
# Binaries packed by scripts/gpu-pack.sh are unpacked first.
if ls "$BIN_DIR"/*.gz >/dev/null 2>&1; then
    unpacked=$(mktemp -d)
    trap 'rm -rf "$unpacked"' EXIT
    for f in "$BIN_DIR"/*; do
        case "$f" in
            *.gz) gunzip -c "$f" >"$unpacked/$(basename "$f" .gz)" ||
                { echo "cannot unpack $f" >&2; exit 2; } ;;
            *) cp "$f" "$unpacked/" ;;
        esac
    done
    chmod +x "$unpacked"/*
    BIN_DIR="$unpacked"
fi
COOPC="$BIN_DIR/coopc"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export PATH="/usr/local/cuda/bin:$PATH"
export CUDA_PATH="${CUDA_PATH:-/usr/local/cuda}"
export LD_LIBRARY_PATH="${CUDA_PATH}/targets/x86_64-linux/lib:${CUDA_PATH}/lib64:${LD_LIBRARY_PATH:-}"
status=0
PARTS=" ${PARTS:-suite emit tiny bench train medium} "
want() { [[ "$PARTS" == *" $1 "* ]]; }
GPU=${GPU_BACKEND:-cuda}
case "$GPU" in
    cuda) suite_env=(COOPC_TEST_CUDA=1) ;;
    wgpu) suite_env=(COOPC_TEST_CUDA=0 COOPC_REQUIRE_WGPU=1) ;;
    *) echo "GPU_BACKEND must be cuda or wgpu, got $GPU" >&2; exit 2 ;;
esac

{
    echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
    grep -m1 "model name" /proc/cpuinfo
} | tee "$OUT/machine.txt"

# 1. The kernel suite on the GPU (every kernel against the CPU executor,
#    and a whole truncated meta-step).
if want suite && [ -x "$BIN_DIR/device_kernels" ]; then
    echo "== $GPU kernel suite"
    if (cd "$ROOT" && env "${suite_env[@]}" "$BIN_DIR/device_kernels" --test-threads=1) >"$OUT/$GPU-kernels.log" 2>&1; then
        tail -3 "$OUT/$GPU-kernels.log"
    else
        status=1
        tail -40 "$OUT/$GPU-kernels.log"
    fi
fi

# 2. Kernel source for the example.
if want emit; then
    "$COOPC" compile "$ROOT/examples/addition.toml" --emit kernels "$OUT/kernels" >/dev/null || status=1
fi

# 3. One meta-step, CPU vs CUDA, on the same inputs: the tiny pipelines here,
#    the medium ones (CUDA only, MEDIUM_REPEAT runs, default 2) last, as they
#    take longest (MEDIUM=0 skips them); first-order also in bf16 (bf16
#    values in f32 buffers, rounded where stored: bf16's numbers, f32's
#    memory).
table="$OUT/timings.md"
echo "| pipeline | backend | median ms/meta-step | min ms | memory |" >"$table"
echo "|---|---|---|---|---|" >>"$table"
time_pipeline() { # PIPELINE REPEAT TIMEOUT_S
    local p=$1 repeat=$2 limit=$3 name backend log line med min mem
    [ -f "$p" ] || return 0
    name=$(basename "$p" .toml)
    "$COOPC" init "$p" --params "$OUT/$name.P.safetensors" --batch "$OUT/$name.B.safetensors" >/dev/null || { status=1; return 0; }
    # "$GPU:coopc" is the GPU with coopc's own matmul kernels
    # (COOPC_MATMUL=coopc) instead of CubeCL's; "$GPU:tf32" with CubeCL's
    # tensor-core routine (COOPC_MATMUL=tf32, backend.matmul = "tf32").
    for variant in cpu "$GPU" "$GPU:coopc" "$GPU:tf32"; do
        backend=${variant%%:*}
        case "$name:$variant" in medium-*:cpu | medium-*:*:coopc | *-bf16:*:tf32) continue ;; esac
        matmul=cubecl
        [ "$variant" = "$GPU:coopc" ] && matmul=coopc
        [ "$variant" = "$GPU:tf32" ] && matmul=tf32
        log="$OUT/$name.${variant/:/-}.log"
        if COOPC_MATMUL=$matmul timeout "$limit" "$COOPC" grad "$p" --params "$OUT/$name.P.safetensors" --batch "$OUT/$name.B.safetensors" \
            --out "$OUT/$name.$backend.G.safetensors" --repeat "$repeat" --backend "$backend" >"$log" 2>&1; then
            line=$(grep "timing:" "$log")
            med=$(echo "$line" | sed -E 's/.*median ([0-9.]+) ms.*/\1/')
            min=$(echo "$line" | sed -E 's/.*min ([0-9.]+) ms.*/\1/')
            mem=$(echo "$line" | sed -E 's/.*(peak RSS .*)$/\1/')
            echo "| $name | $variant | $med | $min | $mem |" >>"$table"
        else
            echo "| $name | $variant | failed or over ${limit}s (see $(basename "$log")) | | |" >>"$table"
            status=1
        fi
    done
    rm -f "$OUT/$name.P.safetensors" "$OUT/$name.B.safetensors" "$OUT/$name".*.G.safetensors
}
# bf16_copy PIPELINE: the pipeline with backend.dtype = "bf16", under $OUT
# (bf16 values held in f32 buffers and rounded where stored).
bf16_copy() {
    local out="$OUT/$(basename "$1" .toml)-bf16.toml"
    sed -E 's/^dtype = "f32"/dtype = "bf16"/' "$1" >"$out"
    grep -q '^dtype = "bf16"' "$out" && echo "$out"
}
if want tiny; then
    echo "== meta-step timings (tiny)"
    for p in "$ROOT"/benches/pipelines/tiny-first-order.toml "$ROOT"/benches/pipelines/tiny-truncated.toml \
        "$(bf16_copy "$ROOT"/benches/pipelines/tiny-first-order.toml)"; do
        time_pipeline "$p" 5 300
    done
    cat "$table"
fi

# 4. The hand-written kernel benches: the fused linear log-prob forward
# and gradients (medium shapes, 32k and 128k vocabulary; with CubeCL's
# matmul computing a chunk of logits at a time, and with coopc's fused
# register-blocked kernels), causal attention
# forward/backward (batch 8, 16 heads, 512 positions, head dim 64), and the
# matrix products ([4096, 1024] x [1024, 2816]): coopc's register-blocked
# kernel and 16 x 16 tiling, CubeCL's simple_unit and double_unit (f32) and
# its automatic choice (TF32 tensor cores on CUDA); throughputs are FLOP/s. Then token generation with the
# medium model (8 rows x 240 tokens, 256-position KV cache), tokens/s.
if want bench && [ -x "$BIN_DIR/device_bench" ]; then
    echo "== fused linear log-prob, attention, matmul, decode"
    COOPC_BENCH_SECS=${BENCH_SECS:-3} COOPC_BENCH_DEVICE=$GPU "$BIN_DIR/device_bench" --bench \
        >"$OUT/device-bench.log" 2>&1 || status=1
    grep -E "^(linear_logprob|attention|matmul|decode)|time:|thrpt:|GFLOP" "$OUT/device-bench.log"
    # The log-prob's and the products' FLOP rates against the card's f32
    # peak on its arithmetic units (PEAK_TFLOPS, else by name: H100 SXM and
    # H200 67, H100 PCIe 51). At these shapes the products bind, not HBM:
    # 4,096 tokens x 32k x 1,024 is 275 GFLOP per forward against 144 MB
    # of operands (4 ms at 67 TFLOP/s; 0.05 ms at 3.35 TB/s).
    python3 - "$OUT/device-bench.log" "$(cat "$OUT/machine.txt")" <<'PY' | tee "$OUT/bound.txt" || true
import os, re, sys
log, machine = open(sys.argv[1]).read().splitlines(), sys.argv[2]
peak = os.environ.get("PEAK_TFLOPS")
if peak is None:
    for key, tf in [("H100 PCIe", 51), ("H100", 67), ("H200", 67)]:
        if key in machine:
            peak = tf
            break
if peak is None:
    print("f32 peak unknown for this card: set PEAK_TFLOPS")
    sys.exit(0)
peak = float(peak) * 1e12
scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
name = None
for line in log:
    m = re.match(r"^((linear_logprob|matmul)_\S+)", line)
    if m:
        name = m.group(1)
    t = re.search(r"thrpt:\s+\[\S+ \S+ ([0-9.]+) ([KMGT]?)elem/s", line)
    if t and name:
        rate = float(t.group(1)) * scale[t.group(2)]
        print(f"{name}: {rate / 1e12:.1f} TFLOP/s, {100 * rate / peak:.0f}% of the {peak / 1e12:.0f} TFLOP/s f32 peak")
        name = None
PY
fi

# 5. Training end to end on both backends: same seed, STEPS meta-steps.
STEPS=${STEPS:-100}
want train && echo "== training, $STEPS meta-steps"
for backend in cpu "$GPU"; do
    want train || break
    if timeout 900 "$COOPC" run "$ROOT/examples/addition.toml" --steps "$STEPS" --backend "$backend" \
        --out "$OUT/run-$backend" -q >"$OUT/run-$backend.log" 2>&1; then
        tail -1 "$OUT/run-$backend/metrics.jsonl" | sed "s/^/$backend: /"
        # Per-step wall time and host<->device traffic (device-resident state:
        # after step 0 only batches, token ids and draws go up; sampled tokens
        # and losses come back).
        python3 - "$OUT/run-$backend/metrics.jsonl" "$backend" <<'PY' || true
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
t = [r["step_time_s"] for r in rows[1:]] or [rows[0]["step_time_s"]]
up = [r.get("bytes_to_device") for r in rows[1:] if r.get("bytes_to_device") is not None]
down = [r.get("bytes_from_device") for r in rows[1:] if r.get("bytes_from_device") is not None]
msg = f"{sys.argv[2]}: median step {statistics.median(t):.3f} s"
if up:
    msg += f", per step {statistics.median(up)/1e3:.1f} kB up / {statistics.median(down)/1e3:.1f} kB down"
print(msg)
PY
    else
        status=1
        tail -5 "$OUT/run-$backend.log"
    fi
done

# 5b. A data-parallel run of one process through an NCCL rendezvous
#    (no MPI): the process joins a communicator of one, which carries the
#    trainer's sums; its metrics are the plain CUDA run's (the device's
#    NCCL sums themselves are checked by the kernel suite, with one rank).
if want train && [ "$GPU" = cuda ]; then
    echo "== NCCL rendezvous, one process"
    rm -f "$OUT/nccl-id"
    if COOPC_NCCL_RENDEZVOUS="$OUT/nccl-id" RANK=0 WORLD_SIZE=1 timeout 600 "$COOPC" run "$ROOT/examples/addition.toml" \
        --steps 5 --backend cuda --out "$OUT/run-nccl" -q >"$OUT/run-nccl.log" 2>&1; then
        tail -1 "$OUT/run-nccl/metrics.jsonl" | sed "s/^/nccl: /"
    else
        status=1
        tail -5 "$OUT/run-nccl.log"
    fi
fi

# 6. The medium pipelines on CUDA (d_model 1024, 8 layers, vocab 32k); the
#    truncated one also with the activations kept (memory budget 70 GiB).
if want medium && [ "${MEDIUM:-1}" != 0 ]; then
    echo "== meta-step timings (medium, $GPU)"
    for p in "$ROOT"/benches/pipelines/medium-first-order.toml "$ROOT"/benches/pipelines/medium-truncated.toml \
        "$ROOT"/benches/pipelines/medium-truncated-keep.toml \
        "$(bf16_copy "$ROOT"/benches/pipelines/medium-first-order.toml)"; do
        time_pipeline "$p" "${MEDIUM_REPEAT:-2}" "${MEDIUM_TIMEOUT:-300}"
    done
    cat "$table"
fi
exit $status
