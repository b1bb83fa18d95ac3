#!/bin/bash
# Issue 14: probe vs LP-FT on the full chest X-ray and TrashNet sets, and the offline backbones'
# balanced probes on chest X-ray. One command (hours on a 2-core CPU; minutes on a GPU):
#     bash benchmarks/finetune_full.sh [CACHE] [RUNS]
# Results: benchmarks/RESULTS_finetune.md ("Full sets" section).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${1:-/tmp/ftfull-cache}
RUNS=${2:-/tmp/ftfull-runs}
DATA=${DATASETS:-../shared/datasets}
PY=${PYTHON:-.venv/bin/python}
export FEATURIZE_HOME=${FEATURIZE_HOME:-$RUNS/home}
mkdir -p "$RUNS"

# features (OpenVINO on CPUs) and probes
for b in efficientnet_lite0 efficientnet_lite2; do
  $PY cli.py extract "$DATA/chest_xray" --backbone $b --cache "$CACHE" --json | tail -n 1 > "$RUNS/extract-chest-$b.json"
  $PY cli.py fit --head logreg --data "$DATA/chest_xray" --backbone $b --cache "$CACHE" --json \
      | tail -n 1 > "$RUNS/probe-chest-$b.json"
  $PY cli.py fit --head logreg --data "$DATA/chest_xray" --backbone $b --cache "$CACHE" --class-weight balanced \
      --out "$RUNS/probe-chest-$b-balanced.joblib" --json | tail -n 1 > "$RUNS/probe-chest-$b-balanced.json"
done
$PY cli.py extract "$DATA/trashnet" --cache "$CACHE" --json | tail -n 1 > "$RUNS/extract-trashnet.json"
$PY cli.py fit --head logreg --data "$DATA/trashnet" --cache "$CACHE" --json | tail -n 1 > "$RUNS/probe-trashnet.json"

# LP-FT: last 3 blocks + head, 3 epochs, lr 1e-4; epoch 0 of each run is the probe on the same split
$PY cli.py finetune --data "$DATA/trashnet" --cache "$CACHE" --epochs 3 --unfreeze last:3 --val-fraction 0.2 \
    --lr 1e-4 --out "$RUNS/trash-lpft" --json | tail -n 1 > "$RUNS/trash-lpft.json"
$PY cli.py finetune --data "$DATA/chest_xray" --backbone efficientnet_lite0 --cache "$CACHE" \
    --probe "$RUNS/probe-chest-efficientnet_lite0-balanced.joblib" --class-weight balanced --epochs 3 \
    --unfreeze last:3 --val-fraction 0.05 --lr 1e-4 --out "$RUNS/chest-lpft-bal" --json | tail -n 1 > "$RUNS/chest-lpft-bal.json"
$PY cli.py finetune --data "$DATA/chest_xray" --backbone efficientnet_lite0 --cache "$CACHE" --class-weight none \
    --epochs 3 --unfreeze last:3 --val-fraction 0.05 --lr 1e-4 --out "$RUNS/chest-lpft" --json | tail -n 1 > "$RUNS/chest-lpft.json"
