#!/bin/bash
# Issue 14: the offline chest X-ray recipe, end to end, in one command (about 10 minutes on a quiet 2-core CPU):
#     bash benchmarks/chest_recipe.sh [CACHE] [OUT]
# 1. probes: for each offline backbone, its default preprocessing and the whole-image variant NAME@SIZE,
#    extract chest_xray (OpenVINO on CPUs) and fit logreg --class-weight balanced on the train split
#    (C by the head's own 3-fold CV on train); the test split is scored once;
# 2. the recipe: LP-FT of efficientnet_lite2@260 (RECIPE=...; efficientnet_lite0@224 trains 2-3x faster,
#    0.86-0.88) from its balanced probe, 1 epoch, lr 3e-5, last 3 blocks,
#    balanced loss, --keep last (the trained epoch, not the probe: the 5 % hold-out carved from train is
#    from the training distribution: in half the runs it kept the probe, 6-7 points below epoch 1 on the
#    shifted test split; see RESULTS_finetune.md), then the kept model scores the test split once.
#    SEED=N varies the hold-out, augmentation and order.
# Prints markdown tables; every step's JSON lands in OUT. Results: benchmarks/RESULTS_finetune.md.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${1:-/tmp/chest-recipe-cache}
OUT=${2:-/tmp/chest-recipe}
DATA=${DATASETS:-../shared/datasets}/chest_xray
PY=${PYTHON:-.venv/bin/python}
BACKBONES=${BACKBONES:-"efficientnet_lite0 efficientnet_lite0@224 efficientnet_lite1 efficientnet_lite1@240 efficientnet_lite2 efficientnet_lite2@260"}
RECIPE=${RECIPE:-efficientnet_lite2@260}
SEED=${SEED:-0}
export FEATURIZE_HOME=${FEATURIZE_HOME:-$OUT/home}  # records the heads fit here, so finetune trusts them
mkdir -p "$OUT"
say() { echo "$(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg): $*" >&2; }
for b in $BACKBONES; do
  say "extract + fit $b"
  $PY cli.py extract "$DATA" --backbone "$b" --cache "$CACHE" --json | tail -n 1 > "$OUT/extract-$b.json"
  $PY cli.py fit --head logreg --class-weight balanced --data "$DATA" --backbone "$b" --cache "$CACHE" --json \
      | tail -n 1 > "$OUT/fit-$b.json"
done
say "LP-FT $RECIPE"
rm -rf "$OUT/lpft"
$PY cli.py finetune --data "$DATA" --backbone "$RECIPE" --cache "$CACHE" --class-weight balanced --epochs 1 \
    --lr 3e-5 --unfreeze last:3 --val-fraction 0.05 --keep last --seed "$SEED" --out "$OUT/lpft" --json | tail -n 1 > "$OUT/lpft.json"
say "score the kept model on test"
$PY - "$OUT" $BACKBONES <<'PY'
import json, sys, time
import numpy as np
import featurize as fz
from heads.metrics import compute_metrics

out, names = sys.argv[1], sys.argv[2:]
print("| probe: backbone + balanced logreg | input | test acc. | balanced acc. | ROC-AUC | NORMAL recall | C | extract s | fit s |")
print("|---|---|---|---|---|---|---|---|---|")
for b in names:
    e, f = (json.load(open(f"{out}/{k}-{b}.json")) for k in ("extract", "fit"))
    t = f["metrics"]["test"]
    print(f"| `{b}` | {'whole image' if '@' in b else 'centre crop'} | {t['accuracy']:.4f} | {t['balanced_accuracy']:.4f} | "
          f"{t['roc_auc']:.4f} | {t['per_class']['NORMAL']['recall']:.3f} | {f['best_params']['clf__C']:g} | "
          f"{e.get('process_seconds') or 0:.0f} | {f['timings']['fit_s']:.0f} |")
run = json.load(open(f"{out}/lpft.json"))
split = json.load(open(f"{run['run']}/split.json"))
paths = [f"{split['root']}/{p}" for p, _ in split["test"]]
y = np.array([split["classes"][c] for _, c in split["test"]])
t0 = time.time()
head = fz.load_head(run["run"])
proba = head.predict_proba(paths)
m = compute_metrics(y, head.classes_[proba.argmax(1)], proba, list(head.classes_))
m.update(kept_epoch=run["best_epoch"], train_s=run["train_seconds"], img_s=run["images_per_second"],
         score_s=round(time.time() - t0, 1), run=run["run"])
json.dump(m, open(f"{out}/lpft-test.json", "w"), indent=1)
print("\n| recipe | kept epoch (hold-out bal. acc.) | test acc. | balanced acc. | ROC-AUC | NORMAL recall | train s (img/s) |")
print("|---|---|---|---|---|---|---|")
hist = {h["epoch"]: h for h in run["history"]}
cfg = json.load(open(f"{run['run']}/featurize_run.json"))["config"]
print(f"| LP-FT `{run['base_backbone']}` {cfg['epochs']} epoch lr {cfg['lr']:g} {cfg['unfreeze']} balanced, keep {cfg.get('keep', 'best')}, seed {cfg['seed']} | {run['best_epoch']} "
      f"({hist[run['best_epoch']]['val_balanced_accuracy']:.4f}) | {m['accuracy']:.4f} | {m['balanced_accuracy']:.4f} | "
      f"{m['roc_auc']:.4f} | {m['per_class']['NORMAL']['recall']:.3f} | {run['train_seconds']:.0f} ({run['images_per_second']}) |")
PY
say "done"
