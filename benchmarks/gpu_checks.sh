#!/usr/bin/env bash
# The GPU checks of issues 9, 11 and 17, sized for one GPU session (at most 10 minutes a command), each part one
# command; results go to $OUT (or benchmarks/results/gpu when OUT is unset):
#   bash benchmarks/gpu_checks.sh speed     # pytest -m cuda, train_app.py (profiled), sampling against lucidrains
#   bash benchmarks/gpu_checks.sh quality   # quality.py at 150 s, then the sampler arms on its checkpoint
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
case "${1:-}" in
speed)
    timeout 150 python -m pytest -m cuda -q -x -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -5 | tee "$out/cuda_tests.txt"
    timeout 270 python benchmarks/train_app.py --device cuda --rounds 3 --warmup 100 --steps 300 --profile 20 \
        --out "$out/train_app.json" 2>&1 | tail -60 | tee "$out/train_app.txt"
    cp benchmarks/work/train_app/profile.txt "$out/train_profile.txt" 2>/dev/null
    timeout 120 python benchmarks/sampling.py --device cuda --threads 0 --batch 500 --quick --steps 50 --lucidrains \
        --out "$out/sampling.json" 2>&1 | tail -20 | tee "$out/sampling.txt"
    ;;
quality)
    timeout 480 python benchmarks/quality.py --device cuda --seconds 150 --out "$out/quality.json" 2>&1 \
        | tail -12 | tee "$out/quality.txt"
    timeout 100 python benchmarks/sampler_quality.py --device cuda --samples 2000 \
        --ckpt benchmarks/work/quality/ours/checkpoints/last.ckpt \
        --arms ddim50_quadratic ddim50_trailing dpm20_quadratic dpm20_logsnr ddim250 \
        --out "$out/sampler_quality.json" 2>&1 | tail -8 | tee "$out/sampler_quality.txt"
    ;;
*)
    echo "usage: bash benchmarks/gpu_checks.sh speed|quality" >&2
    exit 2
    ;;
esac
