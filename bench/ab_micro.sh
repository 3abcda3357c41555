#!/bin/sh
# A micro-benchmark run alternately on an earlier commit's code and on this checkout's
# (docs/bench.md, "What each change bought (issue 26)"): CPU per operation is noise-prone
# on a shared machine, so each figure is set beside its control, measured minutes apart
# and in alternation. Usage: bench/ab_micro.sh COMMIT PAIRS bench/SCRIPT.py [options]
#
# COMMIT's tree is exported (git archive) to /tmp/kt-ab-COMMIT with this checkout's built
# artifacts (the Cython core, the generated protobufs, the packaged Lua and Envoy files:
# neither tree may have changed native/ for the comparison to hold) and the benchmark
# script of this checkout, so both run the same measurement. Prints one line per run:
# which tree, and the first "<number> µs" of the script's output.
set -eu
commit=$1
pairs=$2
shift 2
root=$(git rev-parse --show-toplevel)
base=/tmp/kt-ab-$commit
if [ ! -d "$base" ]; then
    mkdir -p "$base"
    git -C "$root" archive "$commit" | tar -x -C "$base"
    for built in "$root"/sidecar/_core*.so "$root/sidecar/_proto" "$root/sidecar/lua" \
                 "$root/sidecar/envoy" "$root/sidecar/bench_reference.json"; do
        cp -r "$built" "$base/sidecar/"
    done
fi
cp "$root/$1" "$base/$1"
python=${PYTHON:-python3}
i=0
while [ "$i" -lt "$pairs" ]; do
    if [ $((i % 2)) -eq 0 ]; then order="$base $root"; else order="$root $base"; fi
    for tree in $order; do
        result=$(cd "$tree" && PYTHONPATH="$tree${KT_AB_PATH:+:$KT_AB_PATH}" "$python" "$@" 2>&1 \
                 | grep -m1 -oE '[0-9.]+ µs' || echo "failed")
        if [ "$tree" = "$root" ]; then echo "this  $result"; else echo "$commit $result"; fi
    done
    i=$((i + 1))
done
