#!/usr/bin/env bash
# Builds the release binaries scripts/gpu-check.sh runs and packs them,
# stripped and gzip-compressed, into DIR (default .gpu, which git ignores),
# for a CUDA machine without a Rust toolchain:
#
#   scripts/gpu-pack.sh [DIR]
#   # copy the repository (or just scripts/, examples/, benches/pipelines/,
#   # tests/ and DIR) to the GPU machine, then there:
#   scripts/gpu-check.sh DIR
#
# DIR gets coopc.gz, device_kernels.gz (tests/device_kernels.rs) and
# device_bench.gz (benches/device.rs); gpu-check.sh unpacks them. Stripped,
# the three binaries take about 113 MB; compressed, about 34 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.gpu}
mkdir -p "$DIR"

# The path of the executable cargo built for target $1, from its JSON
# messages.
executable() {
    grep "\"name\":\"$1\"" | grep -o '"executable":"[^"]*"' |
        sed 's/"executable":"//; s/"$//' | tail -1
}

# Builds with `cargo CMD`, printing cargo's diagnostics, and prints the
# path of target $1's executable.
built() {
    local name=$1 out path
    shift
    out=$(cargo "$@" --message-format=json-render-diagnostics) || {
        echo "error: cargo $* failed" >&2
        exit 1
    }
    path=$(printf '%s\n' "$out" | executable "$name")
    [ -n "$path" ] || { echo "error: no executable built for $name" >&2; exit 1; }
    printf '%s\n' "$path"
}

echo "building coopc (release)" >&2
bins=("coopc=$(built coopc build --release)")
echo "building the device kernel tests (release)" >&2
bins+=("device_kernels=$(built device_kernels test --release --test device_kernels --no-run)")
echo "building the device benches (release)" >&2
bins+=("device_bench=$(built device bench --bench device --no-run)")

for entry in "${bins[@]}"; do
    name=${entry%%=*}
    path=${entry#*=}
    if [ -z "$path" ] || [ ! -x "$path" ]; then
        echo "error: no executable built for $name" >&2
        exit 1
    fi
    tmp=$(mktemp)
    strip -o "$tmp" "$path" 2>/dev/null || cp "$path" "$tmp"
    gzip -9 -c "$tmp" >"$DIR/$name.gz"
    rm -f "$tmp"
done
ls -l "$DIR"
du -ch "$DIR"/*.gz | tail -1
