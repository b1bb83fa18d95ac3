"""Measure `audit` on the shared datasets: label-error precision/recall on flipped flowers labels,
near-duplicate recall/false rate on transformed copies, leakage found in chest X-ray and TrashNet,
and what `fit --exclude` changes. Prints markdown tables and writes benchmarks/results_audit.json.

Prepare the derived datasets and extract them first (vectors are reused by content hash):

    python benchmarks/audit_data.py --out /tmp/i12
    for d in flowers_flip05 flowers_flip10 flowers_dups; do python cli.py extract /tmp/i12/$d --cache CACHE; done
    python benchmarks/bench_audit.py --cache CACHE --scratch /tmp/i12
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"  # --datasets overrides (a git worktree sits elsewhere)


def label_errors(cache, scratch, rate: str, head: str) -> dict:
    from heads.audit import audit

    flipped = {x["path"] for x in json.loads((scratch / f"flowers_flip{rate}.json").read_text())}
    t = time.perf_counter()
    r = audit(cache, scratch / f"flowers_flip{rate}", head=head)
    wall = time.perf_counter() - t
    got = {x["path"] for x in r["rows"] if x["issue"] == "label"}
    tp = len(flipped & got)
    return {"rate": int(rate), "head": head, "flipped": len(flipped), "flagged": len(got), "true_positives": tp,
            "precision": round(tp / max(1, len(got)), 3), "recall": round(tp / len(flipped), 3),
            "estimated_noise_rate": r["label_issues"]["estimated_noise_rate"], "wall_s": round(wall, 1)}


def duplicates(cache, scratch, thresholds) -> dict:
    """Recall of the planted copies and the reported pairs that are not planted, per cosine threshold,
    with the embeddings alone and with the pixel-hash rule added (what `audit` runs)."""
    from featurize.cache import find_index, load_features, resolve_space
    from heads.audit import DUP_THRESHOLD, PIXEL_FLOOR, PixelHashes, dup_rows, groups_of, similarity_pass
    from heads.pixelhash import dataset_hashes

    copies = json.loads((scratch / "flowers_dups.json").read_text())
    ip, idx = find_index(cache, scratch / "flowers_dups")
    X, _, _, paths = load_features(cache, idx, resolve_space(cache, idx))
    paths = [str(p) for p in paths]
    row = {p: i for i, p in enumerate(paths)}
    source = np.arange(len(paths))
    for cp, orig in copies.items():
        source[row[cp]] = row[orig]
    key = dict(zip(idx.path, idx.hash))
    codes, has, _ = dataset_hashes(cache, idx.root, paths, [key[p] for p in paths])
    px = PixelHashes(codes, has)
    U = dup_rows(X)
    pairs, sims, _ = similarity_pass(U, min(min(thresholds), PIXEL_FLOOR), 0)
    bits = px.distance(pairs[:, 0], pairs[:, 1])
    close = px.close(pairs[:, 0], pairs[:, 1]) & (sims >= PIXEL_FLOOR)
    planted = {(min(row[o], row[c]), max(row[o], row[c])): c.split("/")[1].split("-")[1] for c, o in copies.items()}
    planted_bits = {k: sorted(int(px.distance([a], [b])[0]) for (a, b), kk in planted.items() if kk == k)
                    for k in ("jpeg50", "half", "crop90", "rot5")}
    out = []
    for mode in ("embedding", "embedding + pixels"):
        for t in sorted(thresholds):
            keep = (sims >= t) | (close if mode != "embedding" else False)
            p, s, b = pairs[keep], sims[keep], bits[keep]
            found = {tuple(x) for x in p.tolist()}
            same = source[p[:, 0]] == source[p[:, 1]]
            identical = s > 0.9999  # byte-identical files already in flowers (2 pairs)
            false = ~same & ~identical
            among_originals = false & ~np.isin(p[:, 0], list(row[c] for c in copies)) & \
                ~np.isin(p[:, 1], list(row[c] for c in copies))
            by_kind = {}
            for k in ("jpeg50", "half", "crop90", "rot5"):
                want = [pr for pr, kind in planted.items() if kind == k]
                by_kind[k] = round(sum(pr in found for pr in want) / len(want), 3)
            group_of = {i: n for n, g in enumerate(groups_of(p, len(paths))) for i in g}
            grouped = [a in group_of and group_of.get(a) == group_of.get(b) for a, b in planted]
            out.append({"mode": mode, "threshold": t, "default": t == DUP_THRESHOLD,
                        "recall_grouped": round(float(np.mean(grouped)), 3),
                        "recall": round(sum(pr in found for pr in planted) / len(planted), 3),
                        "recall_by_transform": by_kind, "reported_pairs": int(len(p)),
                        "by_pixels_only": int(np.sum(s < t)), "false_pairs": int(false.sum()),
                        "false_rate": round(float(false.mean()) if len(p) else 0.0, 4),
                        "false_pairs_between_original_photos": int(among_originals.sum()),
                        "false_examples": [[paths[a], paths[c], round(float(x), 3), int(d)]
                                           for (a, c), x, d in zip(p[false][:60].tolist(), s[false][:60], b[false][:60])]})
    return {"copies": len(copies), "sources": len(set(copies.values())), "planted_pixel_bits": planted_bits,
            "curve": out}


def pixel_pass(cache, scratch) -> dict:
    """The pixel-hash pass alone on each dataset: cold (an empty hash store) and warm (cached), wall and
    CPU seconds, and the pairs the pixel rule adds below the cosine threshold (what `audit` reports extra)."""
    import tempfile

    from featurize.cache import find_index, load_features, resolve_space
    from heads.audit import DUP_THRESHOLD, PixelHashes, audit_pass
    from heads.pixelhash import dataset_hashes

    out = {}
    for name, data in (("chest_xray", SHARED / "chest_xray"), ("trashnet", SHARED / "trashnet"),
                       ("flowers", SHARED / "flowers"), ("flowers_dups", scratch / "flowers_dups")):
        _, idx = find_index(cache, data)
        X, _, _, paths = load_features(cache, idx, resolve_space(cache, idx))
        key = dict(zip(idx.path, idx.hash))
        hashes = [key[p] for p in paths]
        with tempfile.TemporaryDirectory() as tmp:  # cold: an empty store, the same files
            t, c = time.perf_counter(), time.process_time()
            codes, has, stats = dataset_hashes(tmp, idx.root, paths, hashes)
            cold = (time.perf_counter() - t, time.process_time() - c)
            t, c = time.perf_counter(), time.process_time()
            dataset_hashes(tmp, idx.root, paths, hashes)
            warm = (time.perf_counter() - t, time.process_time() - c)
        t = time.perf_counter()
        pairs, sims, _ = audit_pass(X, DUP_THRESHOLD, 0)
        plain = time.perf_counter() - t
        t = time.perf_counter()
        pairs_px, sims_px, _ = audit_pass(X, DUP_THRESHOLD, 0, pixels=PixelHashes(codes, has))
        with_px = time.perf_counter() - t
        extra = sims_px < DUP_THRESHOLD
        out[name] = {"images": len(paths), "hashed": int(has.sum()), "computed_cold": stats["computed"],
                     "cold_wall_s": round(cold[0], 2), "cold_cpu_s": round(cold[1], 2),
                     "cold_cpu_ms_per_image": round(1000 * cold[1] / max(1, stats["computed"]), 3),
                     "warm_wall_s": round(warm[0], 3), "similarity_pass_s": round(plain, 2),
                     "similarity_pass_with_pixels_s": round(with_px, 2),
                     "pairs_embedding": int(len(pairs)), "pairs_with_pixels": int(len(pairs_px)),
                     "pixel_only_pairs": [[str(paths[a]), str(paths[b]), round(float(s), 3)]
                                          for (a, b), s in zip(pairs_px[extra].tolist(), sims_px[extra])],
                     "load": round(os.getloadavg()[0], 1)}
    return out


PATIENT = re.compile(r"^(person\d+|NORMAL2-IM-\d+|IM-\d+)")


def chest_leakage(cache) -> dict:
    from heads.audit import audit

    data = SHARED / "chest_xray"
    r = audit(cache, data)
    groups = [g for g in r["near_duplicates"]["groups"] if g["cross_split"]]
    pairs = same_patient = 0
    for g in groups:
        tr = [p for p, s in zip(g["members"], g["splits"]) if s == "train"]
        te = [p for p, s in zip(g["members"], g["splits"]) if s != "train"]
        for a in tr:
            for b in te:
                pairs += 1
                pa, pb = PATIENT.match(Path(a).name), PATIENT.match(Path(b).name)
                same_patient += bool(pa and pb and pa.group(1) == pb.group(1))
    # ground truth from the file names: patients with images in both splits
    ids = {"train": set(), "test": set()}
    for p in data.glob("*/*/*"):
        m = PATIENT.match(p.name)
        if m:
            ids[p.parts[-3]].add(m.group(1))
    both = ids["train"] & ids["test"]
    # below the threshold: every (test, train) pair by cosine, and how many share a patient id
    from featurize.cache import find_index, load_features, resolve_space
    from heads.audit import dup_rows, similarity_pass

    _, idx = find_index(cache, data)
    X, _, splits, paths = load_features(cache, idx, resolve_space(cache, idx))
    splits, U = np.asarray(splits).astype(str), dup_rows(X)
    te, tr = np.flatnonzero(splits == "test"), np.flatnonzero(splits == "train")
    cand, sims, _ = similarity_pass(U[te], 0.6, 0, ref=U[tr])
    pid = [PATIENT.match(Path(p).name) for p in paths]
    pid = [m.group(1) if m else None for m in pid]
    share = np.array([pid[te[a]] is not None and pid[te[a]] == pid[tr[b]] for a, b in cand.tolist()], bool)
    curve = [{"threshold": t, "cross_split_pairs": int((sims >= t).sum()),
              "sharing_patient_id": int(share[sims >= t].sum())} for t in (0.85, 0.8, 0.75, 0.7, 0.65, 0.6)]
    # is a file-name id shared by train and test the same patient? compare the cosines of such pairs
    pid, S = np.array([p or "" for p in pid]), U @ U.T
    iu = np.triu_indices(len(U), 1)
    same, cross = (pid[:, None] == pid[None, :])[iu], (splits[:, None] != splits[None, :])[iu]
    v = S[iu]
    cosines = {name: {"pairs": int(m.sum()), "median": round(float(np.median(v[m])), 3),
                      "p99": round(float(np.percentile(v[m], 99)), 3)}
               for name, m in (("same id, same split", same & ~cross), ("same id, across splits", same & cross),
                               ("different ids", ~same))}
    del S, v
    return {"cross_split_groups": len(groups), "cross_split_pairs": pairs, "pairs_sharing_patient_id": same_patient,
            "below_threshold": curve, "cosine_by_id": cosines,
            "patients_in_both_splits_by_name": len(both), "near_duplicate_groups": r["near_duplicates"]["n_groups"],
            "near_duplicate_pairs": r["near_duplicates"]["n_pairs"],
            "examples": [{"members": g["members"], "max_cosine": g["max_cosine"]} for g in groups[:5]],
            "label_issues": r["label_issues"]["n"], "outliers": r["outliers"]["n"], "timings": r["timings"]}


def trashnet(cache) -> dict:
    from heads.audit import audit

    r = audit(cache, SHARED / "trashnet")
    nd = r["near_duplicates"]
    cross = [g for g in nd["groups"] if g["cross_label"]]
    return {"near_duplicate_groups": nd["n_groups"], "near_duplicate_pairs": nd["n_pairs"], "images": nd["n_images"],
            "cross_label_groups": len(cross),
            "cross_label_examples": [{"members": g["members"], "labels": g["labels"], "max_cosine": g["max_cosine"]}
                                     for g in cross[:8]],
            "label_issues": r["label_issues"]["n"], "estimated_noise_rate": r["label_issues"]["estimated_noise_rate"],
            "outliers": r["outliers"]["n"], "timings": r["timings"]}


def exclude_effect(cache, scratch, head: str) -> dict:
    """What `fit --exclude` does on flowers with 10 % flipped labels: the protocol `fit` runs
    (heads.protocol.evaluate, stratified 5-fold CV, excluded images still scored in their fold),
    with nothing, the audit's label issues, or the whole audit CSV left out of training.

    Accuracy against the given (noisy) labels is what `fit` reports; against the true labels
    (known here because we flipped them) is what the user cares about. Out-of-fold predictions
    are rebuilt from the misclassified rows the evaluation keeps (all of them: fewer than its cap).
    """
    import csv
    import warnings

    from heads.audit import audit, read_exclude
    from heads.protocol import MAX_KEPT_ERRORS, evaluate, load_labelled

    data = scratch / "flowers_flip10"
    r = audit(cache, data, head=head)
    lf = load_labelled(cache, data)
    truth = {x["path"]: x["true"] for x in json.loads((scratch / "flowers_flip10.json").read_text())}
    y_true = np.array([truth.get(p, y) for p, y in zip(lf.paths, lf.y)])
    csv_path = scratch / "flip10-label-issues.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path"])
        w.writerows([[x["path"]] for x in r["rows"] if x["issue"] == "label"])
    label_only, _ = read_exclude(csv_path, lf.root, lf.paths)
    all_rows = np.isin(lf.paths, [x["path"] for x in r["rows"]])
    out = {}
    for name, drop in (("none", None), ("label issues", label_only), ("whole audit CSV", all_rows)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ev = evaluate(head, lf.X, lf.y, lf.splits, lf.paths, exclude=drop, progress=False)
        assert len(ev.errors) < MAX_KEPT_ERRORS, "too many errors kept to rebuild the predictions"
        pred = lf.y.copy()
        row = {p: i for i, p in enumerate(lf.paths)}
        for e in ev.errors:
            pred[row[e["path"]]] = e["pred"]
        out[name] = {"excluded": int(0 if drop is None else drop.sum()), "n_train_final": ev.n_train,
                     "acc_given_labels": round(ev.metrics["cv"]["accuracy"], 4),
                     "acc_true_labels": round(float(np.mean(pred == y_true)), 4),
                     "acc_true_labels_not_flipped_rows": round(float(np.mean((pred == y_true)[lf.y == y_true])), 4)}
    return out


def novelty(cache) -> dict:
    """predict's `unlike_training` flag: fit the reference on 80 % of a dataset, score its other 20 %
    (should pass) and 300 images of each other dataset (should be flagged)."""
    from featurize.cache import find_index, load_features, resolve_space
    from heads.audit import Novelty

    data = {}
    for d in ("chest_xray", "trashnet", "flowers"):
        _, idx = find_index(cache, SHARED / d)
        data[d] = load_features(cache, idx, resolve_space(cache, idx))[0]
    rng, out = np.random.default_rng(0), {}
    for d, X in data.items():
        perm = rng.permutation(len(X))
        cut = int(0.8 * len(X))
        nov = Novelty.fit(X[perm[:cut]])
        row = {"cutoff": round(nov.cutoff, 3), "held_out_flagged": round(float(np.mean(nov.score(X[perm[cut:]]) >
                                                                                        nov.cutoff)), 3)}
        for o, Y in data.items():
            if o != d:
                row[f"{o}_flagged"] = round(float(np.mean(nov.score(Y[rng.permutation(len(Y))[:300]]) > nov.cutoff)), 3)
        out[d] = row
    return out


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc)."""
    import os

    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _sample(pids) -> dict[int, tuple[float, int]]:
    """``{pid: (cpu seconds, rss bytes)}`` for the live ones."""
    import os

    tick, page, out = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE"), {}
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[p] = ((int(fields[11]) + int(fields[12])) / tick, int(fields[21]) * page)
        except (OSError, IndexError, ValueError):
            pass
    return out


def speed(cache, datasets=("chest_xray", "trashnet", "flowers")) -> list[dict]:
    """Wall time of `python cli.py audit` as a user runs it, with the CPU seconds and the peak
    resident memory of the whole process tree (the joblib workers included), sampled every 0.1 s."""
    import os
    import subprocess
    import sys

    out = []
    for d in datasets:
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "audit", "--data", str(SHARED / d), "--cache",
                                 str(cache), "--json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        cpu: dict[int, float] = {}
        peak = 0
        while proc.poll() is None:
            seen = _sample(_tree(proc.pid))
            cpu.update({p: c for p, (c, _) in seen.items()})
            peak = max(peak, sum(r for _, r in seen.values()))
            time.sleep(0.1)
        wall = time.perf_counter() - t0
        summary = json.loads(proc.stdout.read().strip().splitlines()[-1])
        out.append({"dataset": d, "images": summary["n_images"], "dim": 1280, "wall_s": round(wall, 1),
                    "audit_s": summary["timings"]["total_s"], "stages": summary["timings"],
                    "cpu_s": round(sum(cpu.values()), 1), "peak_rss_mb": round(peak / 1e6),
                    "load_before": round(load, 1), "load_after": round(os.getloadavg()[0], 1)})
    return out


def main():
    global SHARED
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--scratch", default="/tmp/i12")
    ap.add_argument("--head", default="logreg")
    ap.add_argument("--datasets", default=str(SHARED), help="the shared datasets folder")
    ap.add_argument("--only", default="labels,dups,pixels,chest,trash,novelty,exclude,speed")
    a = ap.parse_args()
    SHARED = Path(a.datasets)
    cache, scratch, only = a.cache, Path(a.scratch), a.only.split(",")
    out = ROOT / "benchmarks" / "results_audit.json"

    class Results(dict):  # written after every stage: a later failure keeps what was measured
        def __setitem__(self, k, v):
            super().__setitem__(k, v)
            old = json.loads(out.read_text()) if out.exists() else {}
            out.write_text(json.dumps({**old, k: v}, indent=1))

    res = Results()
    if "labels" in only:
        res["label_errors"] = [label_errors(cache, scratch, r, a.head) for r in ("05", "10")]
        print("| flipped | flagged | precision | recall | cleanlab noise estimate |\n|---|---|---|---|---|")
        for x in res["label_errors"]:
            print(f"| {x['rate']} % ({x['flipped']}) | {x['flagged']} | {x['precision']:.3f} | {x['recall']:.3f} | "
                  f"{100 * x['estimated_noise_rate']:.1f} % |")
    if "dups" in only:
        res["duplicates"] = duplicates(cache, scratch, [0.75, 0.80, 0.85, 0.90, 0.95])
        print("planted copies' pixel-hash distances (bits of 255):", res["duplicates"]["planted_pixel_bits"])
        print("| pairs by | cosine >= | pair recall | same group | jpeg50 | half | crop90 | rot5 | reported pairs | "
              "by pixels only | not planted | of which between original photos |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for x in res["duplicates"]["curve"]:
            k = x["recall_by_transform"]
            print(f"| {x['mode']} | {x['threshold']:.2f}{' (default)' if x['default'] else ''} | {x['recall']:.3f} | "
                  f"{x['recall_grouped']:.3f} | {k['jpeg50']} | "
                  f"{k['half']} | {k['crop90']} | {k['rot5']} | {x['reported_pairs']} | {x['by_pixels_only']} | "
                  f"{x['false_pairs']} ({100 * x['false_rate']:.1f} %) | {x['false_pairs_between_original_photos']} |")
    if "pixels" in only:
        res["pixel_pass"] = pixel_pass(cache, scratch)
        print("| dataset | images | hash pass cold: wall s | CPU s | CPU ms/image | warm (cached) wall s | "
              "similarity pass s: embeddings / + pixels | pairs: embeddings / + pixels | load |")
        print("|---|---|---|---|---|---|---|---|---|")
        for d, x in res["pixel_pass"].items():
            print(f"| {d} | {x['images']} | {x['cold_wall_s']} | {x['cold_cpu_s']} | {x['cold_cpu_ms_per_image']} | "
                  f"{x['warm_wall_s']} | {x['similarity_pass_s']} / {x['similarity_pass_with_pixels_s']} | "
                  f"{x['pairs_embedding']} / {x['pairs_with_pixels']} | {x['load']} |")
    if "chest" in only:
        res["chest_xray"] = chest_leakage(cache)
        print(json.dumps({k: v for k, v in res["chest_xray"].items() if k != "examples"}))
    if "trash" in only:
        res["trashnet"] = trashnet(cache)
        print(json.dumps({k: v for k, v in res["trashnet"].items() if k != "cross_label_examples"}))
    if "novelty" in only:
        res["novelty"] = novelty(cache)
        print(json.dumps(res["novelty"]))
    if "speed" in only:
        res["speed"] = speed(cache)
        print("| dataset | images | wall s (CLI) | audit s (in-process) | CPU s (all processes) | peak RSS MB | load |")
        print("|---|---|---|---|---|---|---|")
        for x in res["speed"]:
            print(f"| {x['dataset']} | {x['images']} | {x['wall_s']} | {x['audit_s']} | {x['cpu_s']} | "
                  f"{x['peak_rss_mb']} | {x['load_before']} -> {x['load_after']} |")
    if "exclude" in only:
        res["exclude"] = exclude_effect(cache, scratch, a.head)
        print(json.dumps(res["exclude"]))


if __name__ == "__main__":
    main()
