#!/usr/bin/env bash
# Set up bayesal in ./.venv and run the main job on the embedded defaults (SQLite file
# ./bayesal.db): import the shared ethanol reference data and summarise it.
# Usage: ./examples/quickstart.sh        (BAYESAL_SHARED_DATA overrides ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${BAYESAL_SHARED_DATA:-../shared/data}
[ -d "$DATA/ethanol" ] || { echo "shared data not found at $DATA; set BAYESAL_SHARED_DATA" >&2; exit 1; }

[ -x .venv/bin/python ] || python3 -m venv .venv
# CPU torch first: letting pip resolve torch itself pulls a multi-GB CUDA build.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[dev]"

bayesal=.venv/bin/bayesal
$bayesal db upgrade
$bayesal import "$DATA/ethanol/train.xyz" --campaign quickstart --source initial \
    --labelled --method pbe --basis def2-svp
$bayesal import "$DATA/ethanol/test_MD.xyz" --campaign quickstart --source test \
    --labelled --method pbe --basis def2-svp
$bayesal status --campaign quickstart
$bayesal sql "SELECT source, COUNT(*) AS n, ROUND(AVG(energy_per_atom), 4) AS mean_e_per_atom_eV,
              ROUND(MAX(max_force), 3) AS max_force_eV_per_A
              FROM labelled_data WHERE campaign = 'quickstart' GROUP BY source"
$bayesal export --campaign quickstart --output quickstart-export.xyz
echo
echo "Next: query with '.venv/bin/bayesal sql \"SELECT ...\"' (docs/database.md has examples)."
