#!/usr/bin/env bash
# The GPU checks of issue 17 as one prepared run (under 10 minutes on one H200): the
# gpu-marked tests, then benchmarks/gpu.py. On the device machine, from the repository root,
# with the wheels of benchmarks/gpu_wheels.sh carried in .whl:
#   bash benchmarks/gpu_check.sh            # logs and results under $OUT (else ./gpu-out)
# Elsewhere (a GPU node with bayesal installed) it skips the wheel step.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ! python3 -c "import bayesal.bayes_model" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
    --target /tmp/site . || exit 1
  export PYTHONPATH=/tmp/site
fi
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, e3nn; print('torch', torch.__version__, 'e3nn', e3nn.__version__,
'cuda', torch.cuda.is_available(), torch.cuda.device_count())"
} 2>&1 | tee "$OUT/env.txt"
# The tests: model, posteriors, explorer on CUDA (tests/test_gpu.py) and the GPU labeler
# where gpu4pyscf is installed. -p no:cacheprovider: the tree may be read-only.
tests=(tests/test_gpu.py)
python3 -c "import gpu4pyscf" 2>/dev/null && tests+=(tests/test_labelers.py)
timeout 300 python3 -m pytest -m gpu "${tests[@]}" \
  -p no:cacheprovider -o addopts="" -ra --junitxml="$OUT/gpu-tests.xml" 2>&1 \
  | tee "$OUT/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}
cd benchmarks
timeout 330 python3 gpu.py --out "$OUT/gpu.json" --seconds 10 --batches 5 32 \
  --infer-batches 64 512 --infer-structures 3000 --minutes 1.5 2>&1 | tee "$OUT/gpu-bench.log"
bench_rc=${PIPESTATUS[0]}
echo "tests rc=$tests_rc benchmark rc=$bench_rc" | tee -a "$OUT/env.txt"
exit $(( tests_rc || bench_rc ))
