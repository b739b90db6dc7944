#!/usr/bin/env bash
# Set up bayesal in ./.venv and run the main job on the embedded defaults: a real
# active-learning campaign (examples/quickstart.yaml) with the SQLite file ./bayesal.db,
# Prefect's local API and PySCF at HF/STO-3G; about 2.5 minutes on 2 idle cores
# after the install.
# Usage: ./examples/quickstart.sh              (needs nothing outside the repository)
#        ./examples/quickstart.sh --baseline   (then the same campaign with random
#                                               selection, about 2.5 minutes more)
set -euo pipefail
cd "$(dirname "$0")/.."
baseline=0
case "${1:-}" in
  "") ;;
  --baseline) baseline=1 ;;
  *) echo "usage: $0 [--baseline]" >&2; exit 2 ;;
esac

[ -x .venv/bin/python ] || python3 -m venv .venv
# CPU torch first: letting pip resolve torch itself pulls a multi-GB CUDA build.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[dev]"

.venv/bin/python examples/make_quickstart_data.py
bayesal=.venv/bin/bayesal
$bayesal db upgrade
# --resume: a second invocation continues (or just reports) the same campaign
$bayesal run examples/quickstart.yaml --resume
if [ "$baseline" = 1 ]; then
  echo
  echo "the baseline: the same campaign with random selection"
  $bayesal run examples/quickstart-random.yaml --resume
else
  echo
  echo "compare with random selection (about 2.5 minutes): ./examples/quickstart.sh --baseline"
fi
