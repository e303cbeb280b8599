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
# the three binaries take about 110 MB; compressed, about 30 MB.
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

echo "building coopc (release)" >&2
cargo build --release
bins=("coopc=target/release/coopc")
echo "building the device kernel tests (release)" >&2
bins+=("device_kernels=$(cargo test --release --test device_kernels --no-run \
    --message-format=json 2>/dev/null | executable device_kernels)")
echo "building the device benches (release)" >&2
bins+=("device_bench=$(cargo bench --bench device --no-run \
    --message-format=json 2>/dev/null | executable device)")

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
