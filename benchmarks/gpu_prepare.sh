#!/usr/bin/env bash
# Prepare a clean copy of HEAD for the device machine (see docs/architecture.md, issue 14): .gpurun/ holds
# `git archive HEAD` plus the Python 3.12 wheels the device image lacks (optree). Then, from the device tool:
#
#   run(command="cd .gpurun && OUT=$OUT benchmarks/gpu_check.sh", carry=[".gpurun"], timeout_s=540)
#
# .gpurun/ is kept out of git through .git/info/exclude (added here if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpurun/' .git/info/exclude 2>/dev/null || echo '/.gpurun/' >> .git/info/exclude
rm -rf .gpurun
mkdir -p .gpurun/.whl
git archive HEAD | tar -x -C .gpurun
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .gpurun/.whl "optree==0.20.0" "expecttest==0.3.0"
du -sh .gpurun
