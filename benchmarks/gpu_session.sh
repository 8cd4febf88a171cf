#!/bin/bash
# Everything this project still has to run on a GPU, as one device call of under 10 minutes
# (device time is scarce: about 15 minutes per issue, the machine's start included).
#
# From the project root, with the team's check copied beside it (so that it travels with the tree):
#   cp ../shared/gpu-check.sh . && <device run, timeout_s=600> bash benchmarks/gpu_session.sh
#
# 1. gpu-check.sh: the kernel tests on the GPU, bf16 included (its "-k kernel" also selects the
#    mixed-batch kernel tests of tests/test_multi_lora.py), and the quick kernel benchmark;
# 2. the mixed-batch benchmark of docs/kernels.md ("Goals for mixed batches"): one layer
#    K = N = 4096, r = 16, bf16, 64 rows, decode and prefill, 1 to 64 adapters, against peft.
# Everything lands in $OUT: commit the reports to benchmarks/results/, write the ratios into
# docs/kernels.md.
set -x
OUT=${OUT:-$(mktemp -d)}; mkdir -p "$OUT"; export OUT
START=$SECONDS
if [ -f gpu-check.sh ]; then
    bash gpu-check.sh
else
    echo "gpu-check.sh is not here: cp ../shared/gpu-check.sh . first; installing and going on"
    python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/pip.log" 2>&1
fi
unset TRITON_INTERPRET
LEFT=$((570 - (SECONDS - START)))  # what the 600 s call has left, less time to send $OUT back
if [ "$LEFT" -gt 30 ]; then
    timeout "$LEFT" python3 benchmarks/bench_multi_adapter.py --out "$OUT" 2>&1 | tail -80 \
        | tee "$OUT/bench-multi-adapter.txt"
else
    echo "no time left for the mixed-batch benchmark: run it in a second call"
fi
ls -la "$OUT"
