#!/usr/bin/env bash
# Fetch (here, where pip reaches the package index) the wheels that benchmarks/gpu_check.sh
# installs on a GPU machine that reaches nothing: what bayes_model needs beyond that
# machine's image (Python 3.12 with CUDA torch, e3nn, numpy, scipy, pytest, ...).
#   benchmarks/gpu_wheels.sh            # into .whl/ (git-ignored through .git/info/exclude)
# The gpu4pyscf labeler stack (gpu4pyscf-cuda12x, its libxc and cutensor: about 550 MB) and
# PySCF (53 MB) do not fit the 64 MiB a device call may carry, nor do cuEquivariance's fused
# kernels for CUDA 13 (cuequivariance-ops-torch-cu13 and -ops-cu13: 74 MB): those checks run
# where they are installed (`pip install -e ".[gpu]"` on a GPU node); without the fused
# kernels, kernels: cueq on a GPU is refused and its tests are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl .git/info
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
for spec in ase==3.29.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.7.0 \
            typing-inspection==0.4.2 vesin==0.6.2 ivon-opt==0.1.3 \
            cuequivariance==0.13.0 cuequivariance-torch==0.13.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl "$spec"
done
du -sh .whl
