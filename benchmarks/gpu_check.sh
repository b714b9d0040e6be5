#!/usr/bin/env bash
# The GPU check, for any CUDA machine with the project checked out: the CUDA tests
# (graph-captured Backward Search against the eager loop among them), the Backward Search and
# serving-component benchmarks on CUDA, and a compare run with the tiny-weight adapters on
# CUDA. Outputs land in $OUT (default ./gpu-out). Each step is time-boxed (at most
# 150+270+90+60 s = 9.5 min): `bash benchmarks/gpu_check.sh`. Packages the machine lacks may be
# put as wheels in .whl/ (installed to /tmp/site, no index used).
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 CIR_BENCH_CACHE=/tmp/cir-cache
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:.
else
  export PYTHONPATH=.
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, open_clip; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" -k "cuda" \
  tests/test_backward.py tests/test_objective.py tests/test_models.py tests/test_baselines.py tests/test_service.py 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
# eager vs graph-captured (plain and torch.compile) Backward Search and autograd vs the gradient
# by hand (batch 1, 1,000, 10,000; capture time; identical top-10); before the other benchmarks, as the
# GPU targets are these, and written after every stage (a cut-short run keeps what it measured)
timeout 270 python3 benchmarks/backward_search.py --set device=cuda --n-queries 1000 --loop-queries 60 \
  --out "$OUT/backward_search_cuda.json" > /dev/null 2> "$OUT/backward_search.err"
tail -3 "$OUT/backward_search.err"
timeout 90 python3 benchmarks/serve_components.py --set device=cuda --large 500000 > "$OUT/serve_components_cuda.json" 2> "$OUT/serve_components.err"
tail -3 "$OUT/serve_components.err"
python3 -m tests.tiny_weights /tmp/tiny-weights > /dev/null
timeout 60 python3 -m cir_bench.cli compare --device cuda --weights-dir /tmp/tiny-weights --no-progress --out /tmp/cmp > "$OUT/compare_cuda.txt" 2>&1
tail -40 "$OUT/compare_cuda.txt"
