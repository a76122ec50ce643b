#!/usr/bin/env bash
# Everything that needs a GPU, in one call (for the lent GPU machine): GPU tests, the full suite on
# CUDA, and the end-to-end benchmark. Tables go to $OUT (default: benchmarks/results/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
stamp=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
python -m pip install --quiet --no-deps -e . 2>/dev/null || true
python -m pytest -q -m gpu 2>&1 | tee "$OUT/gpu_tests_${stamp}.txt" | tail -5
python benchmarks/bench_e2e.py --device cuda --preset t2v-1.3b --height 480 --width 832 --frames 81 --steps 10 \
    --repeats 1 --dit-latent 21 60 104 --out "$OUT/e2e_${stamp}_1.3b_480p_10steps.md"
