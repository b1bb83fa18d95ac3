"""Accuracy of every head with the default backbone on the real datasets, next to published points.

Usage (after `cli.py extract /work/shared/datasets/{chest_xray,flowers,trashnet} --cache CACHE`)::

    python benchmarks/accuracy_heads.py --cache /tmp/fzcache [--work /tmp/fzres]

Runs `cli.py compare --data <dataset>` (skipped when its JSON is already in --work), then writes
benchmarks/RESULTS_heads_accuracy.md: chest X-ray scored on its test split, flowers and trashnet
by stratified 5-fold nested CV (mean +/- std).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATASETS = {"chest_xray": "test split", "flowers": "5-fold CV", "trashnet": "5-fold CV"}
REFERENCE = {
    "chest_xray": "transfer-learned CNNs: ~87-94 % (test split)",
    "flowers": "MobileNetV2 features: ~86 % (full 3,670-photo tf_flowers)",
    "trashnet": "authors ~75 %; deep transfer (IEEE Access 2019) 94 %",
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="/tmp/fzcache")
    ap.add_argument("--shared", default=str(ROOT.parent / "shared" / "datasets"))
    ap.add_argument("--work", default="/tmp/fzres")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS_heads_accuracy.md"))
    a = ap.parse_args(argv)
    results = {}
    for name in DATASETS:
        data = Path(a.shared) / name
        if not data.exists():
            print(f"skip {name}: {data} not found")
            continue
        js = Path(a.work) / f"compare-{name}.json"
        if not js.exists():
            subprocess.run([sys.executable, str(ROOT / "cli.py"), "compare", "--data", str(data), "--cache", a.cache,
                            "--out", str(js.with_suffix("")), "--json"], check=True, cwd=ROOT, capture_output=True)
        results[name] = json.loads(js.read_text())
    heads = sorted({r["head"] for res in results.values() for r in res["rows"]})
    backbone = next((r["backbone"] for res in results.values() for r in res["rows"]), "?")
    md = [f"# Heads accuracy, backbone {backbone} (offline default)", "",
          "Accuracy (balanced accuracy) per head; chest X-ray on its test split (624 images, fit on the 5,216 "
          "train images), flowers and trashnet by stratified 5-fold nested CV, mean +/- std over folds.", "",
          "| head | " + " | ".join(f"{n} ({DATASETS[n]})" for n in results) + " |",
          "|---|" + "---|" * len(results)]
    for h in heads:
        cells = []
        for res in results.values():
            r = next((r for r in res["rows"] if r["head"] == h), None)
            if r is None:
                cells.append("-")
                continue
            std = f" +/- {100 * r['accuracy_std']:.1f}" if r.get("accuracy_std") is not None else ""
            cells.append(f"{100 * r['accuracy']:.1f}{std} ({100 * r['balanced_accuracy']:.1f})")
        md.append(f"| {h} | " + " | ".join(cells) + " |")
    md.append("| published reference | " + " | ".join(REFERENCE[n] for n in results) + " |")
    md += ["", "Protocol time per head (s, whole protocol incl. nested CV; shared, loaded 2-core machine):", "",
           "| head | " + " | ".join(results) + " |", "|---|" + "---:|" * len(results)]
    for h in heads:
        md.append(f"| {h} | " + " | ".join(
            str(next((r["eval_s"] for r in res["rows"] if r["head"] == h), "-")) for res in results.values()) + " |")
    Path(a.out).write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
