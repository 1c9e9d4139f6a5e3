#!/usr/bin/env bash
# One run on a CUDA machine: the CUDA tests, the suite with CUDA as its default device, and the GPU benchmarks.
#
#   OUT=/tmp/gpu benchmarks/gpu_check.sh          # logs and benchmarks/results-style JSON land in $OUT
#
# Phase 1 runs tests/test_cuda.py and the suite under PUREOPT_TEST_DEVICE=cuda side by side (they only need to be
# right, not quiet); phase 2 runs benchmarks/step.py --device cuda alone on the GPU; phase 3 benchmarks/memory.py
# --device cuda (encoded state's step time and the steps' transients on the GPU). Each phase has a time limit so
# that the whole run fits a few minutes; what a phase printed before its limit is kept. Python packages missing
# on the machine (optree) can be carried as wheels in .whl/ (see docs/benchmarks.md).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pureopt-gpu-check}
PY=${PY:-python3}
TEST_LIMIT=${TEST_LIMIT:-240}
BENCH_LIMIT=${BENCH_LIMIT:-170}
MEM_LIMIT=${MEM_LIMIT:-140}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/pureopt-site \
        .whl/*.whl && export PYTHONPATH=/tmp/pureopt-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi; "$PY" -c "import torch, optree; print('torch', torch.__version__, 'optree', optree.__version__, \
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"; nproc; } > "$OUT/machine.txt" 2>&1

# the suite's files that make sense on another default device (not the multi-process, docs or examples tests)
SUITE=$(ls tests/test_*.py | grep -v -e test_adapters_ddp -e test_examples -e test_docs -e test_cuda)
PYTEST=("$PY" -m pytest -v -p no:cacheprovider -o addopts="" -rfE --timeout 150)
timeout "$TEST_LIMIT" "${PYTEST[@]}" -n 4 tests/test_cuda.py > "$OUT/test_cuda.log" 2>&1 &
CUDA_PID=$!
PUREOPT_TEST_DEVICE=cuda timeout "$TEST_LIMIT" "${PYTEST[@]}" -n 10 --maxfail=400 $SUITE \
    > "$OUT/suite_cuda.log" 2>&1 &
SUITE_PID=$!
wait $CUDA_PID; echo "test_cuda exit $?" >> "$OUT/test_cuda.log"
wait $SUITE_PID; echo "suite exit $?" >> "$OUT/suite_cuda.log"

timeout "$BENCH_LIMIT" "$PY" benchmarks/step.py --device cuda --algos sgd,adam,adamw --rounds 10 --warmup 2 \
    --inner 5 --json "$OUT/latest-cuda.json" > "$OUT/bench.log" 2>&1
echo "bench exit $?" >> "$OUT/bench.log"

# issue 16 on the GPU: encoded AdamW state (8-bit step vs fp32), and the transients of the unchunked GPU steps
timeout "$MEM_LIMIT" "$PY" benchmarks/memory.py --device cuda --algos adamw,adafactor,lion \
    --storages fp32,q8,q4,fp8,bf16-enc,bf16-sr --skip torchao --rounds 10 --warmup 2 \
    --json "$OUT/memory-cuda.json" --markdown > "$OUT/memory.log" 2>&1
echo "memory exit $?" >> "$OUT/memory.log"
tail -n 3 "$OUT"/*.log
