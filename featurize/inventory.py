"""What a cache holds: datasets, feature spaces, saved heads, converted engines, and their sizes.

Read-only and torch-free (like cache.py): it reads index attributes, shard shapes and JSON
sidecars, never the vectors and never a pickled head, so it answers in well under a second.
"""

from __future__ import annotations

import glob
import json
import time
from pathlib import Path

import h5py

from featurize import cache as fc
from featurize.enginestore import is_complete
from featurize.errors import UserError
from featurize.layout import engine_store_dir


def _bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _rows(shard: Path) -> int:
    try:
        with h5py.File(shard, "r") as f:
            return int(f["hash"].shape[0])
    except Exception:  # damaged: `extract` moves it aside; here it is just counted as unreadable
        return -1


def _held_out_accuracy(metrics: dict) -> tuple[str, float] | None:
    # The rule of heads.protocol.primary (test, else val, else the CV mean), restated here because
    # featurize never imports heads and importing it costs scikit-learn's 1-2 s; a test keeps the
    # two in step.
    for part in ("test", "val", "cv"):
        m = metrics.get(part)
        if m:
            return part, float(m.get("mean", m).get("accuracy", float("nan")))
    return None


def describe_cache(cache) -> dict:
    """Return what ``cache`` holds.

    Takes the cache folder. Returns ``{"cache", "bytes", "datasets", "spaces", "heads",
    "engines"}``: each dataset with its image counts and per-space extraction summaries, each
    feature space with its backbone, width, vector and shard counts and bytes (and which
    datasets use it), each saved head with its held-out accuracy, each converted engine of those
    spaces (in the per-user engine store, ``engine_store``).
    Raises ``UserError`` when the folder does not exist or holds something else than a
    featurize cache (an empty folder is an empty cache).
    """
    cache = fc.Cache.of(cache)
    root = cache.root
    if not root.is_dir():
        raise UserError(f"no cache at {root}; run `extract DATA` first (or pass --cache DIR)")
    if not cache.looks_like_cache():
        raise UserError(f"{root} is not a featurize cache (no datasets/ or features/ folder); pass --cache DIR "
                        "with the folder `extract` wrote to")
    datasets = _datasets(cache)
    spaces = _spaces(cache, datasets)
    return {"cache": str(root.resolve()), "bytes": _bytes(root),
            "default_dataset": datasets[0]["root"] if datasets else None, "datasets": datasets,
            "spaces": spaces, "heads": _heads(cache), "engine_store": str(engine_store_dir()),
            "engines": _engines(spaces)}


def _engines(spaces: list[dict]) -> list[dict]:
    # Converted engines live once per user in the engine store, shared by every cache, so the
    # cache's own folder holds none: list the store's engines of this cache's feature spaces.
    out = []
    for s in spaces:
        for folder in sorted(engine_store_dir().glob(f"{glob.escape(s['space_id'])}-openvino-*/")):
            if is_complete(folder):
                out.append({"path": str(folder), "bytes": _bytes(folder), "space_id": s["space_id"],
                            "engine": "openvino"})
    return out


def _datasets(cache: fc.Cache) -> list[dict]:
    out = []
    for path, idx in fc.list_indexes(cache):  # newest first: the first is what commands without --data use
        ok = sum(s == fc.STATUS_OK for s in idx.status)
        failed = sum(s.startswith("error") for s in idx.status)
        out.append({
            "index": str(path), "root": idx.root, "layout": idx.layout, "classes": len(idx.classes),
            "images": len(idx), "ok": ok, "failed": failed, "pending": len(idx) - ok - failed,
            "updated_at": idx.updated_at, "extractions": idx.extractions, "bytes": _bytes(path),
            "default": not out,
        })
    return out


def _spaces(cache: fc.Cache, datasets: list[dict]) -> list[dict]:
    out = []
    for folder in cache.space_folders():
        space = fc.FeatureSpace(cache.root, folder.name)
        try:
            info = space.info()
        except UserError:
            info = {}
        shards = space.shard_paths()
        rows = [_rows(s) for s in shards]
        out.append({
            "space_id": folder.name, "backbone": info.get("backbone", "?"), "dim": info.get("dim"),
            "precision": info.get("precision"), "vectors": sum(r for r in rows if r > 0),
            "shards": len(shards), "unreadable_shards": sum(r < 0 for r in rows), "bytes": _bytes(folder),
            "datasets": [d["root"] for d in datasets if folder.name in d["extractions"]],
        })
    return out


def _heads(cache: fc.Cache) -> list[dict]:
    out = []
    for meta_path in cache.head_sidecars():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        if "space_id" not in meta or "head" not in meta:
            continue  # another JSON under heads/ (an audit, a report's data)
        score = _held_out_accuracy(meta.get("metrics", {}))
        out.append({
            "path": str(meta_path.with_suffix(".joblib")), "head": meta["head"], "dataset": meta.get("dataset"),
            "backbone": meta.get("backbone"), "space_id": meta["space_id"], "saved_at": meta.get("saved_at"),
            "scored_on": score[0] if score else None, "accuracy": score[1] if score else None,
        })
    return out


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def format_inventory(inv: dict) -> str:
    """The text the `cache` command prints for :func:`describe_cache`'s result."""
    out = [f"cache {inv['cache']}: {_size(inv['bytes'])}"]
    present = {s["space_id"] for s in inv["spaces"]}
    out.append(f"datasets ({len(inv['datasets'])}):")
    for d in inv["datasets"]:
        extra = f", {d['failed']} failed" if d["failed"] else ""
        extra += f", {d['pending']} pending" if d["pending"] else ""
        default = "  [default: used when --data is not given]" if d.get("default") else ""
        out.append(f"  {d['root']}  {d['images']} images ({d['ok']} ok{extra}), {d['classes']} classes, "
                   f"{d['layout']} layout{default}")
        for sid, run in sorted(d["extractions"].items()):
            how = " ".join(str(run[k]) for k in ("engine", "precision", "device") if run.get(k))
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(run["finished_at"])) if run.get("finished_at") \
                else "not finished"
            gone = "" if sid in present else " (its feature space is gone: `extract` re-embeds)"
            out.append(f"    {sid}: {run.get('n_ok', '?')} embedded [{how}], {when}{gone}")
    out.append(f"feature spaces ({len(inv['spaces'])}):")
    for s in inv["spaces"]:
        bad = f", {s['unreadable_shards']} unreadable" if s["unreadable_shards"] else ""
        out.append(f"  {s['space_id']}  D={s['dim']}  {s['vectors']} vectors in {s['shards']} shard(s){bad}, "
                   f"{_size(s['bytes'])}, used by {len(s['datasets'])} dataset(s)")
    out.append(f"heads ({len(inv['heads'])}):")
    for h in inv["heads"]:
        acc = f"accuracy {h['accuracy']:.3f} ({h['scored_on']})" if h["accuracy"] is not None else "no metrics"
        out.append(f"  {h['path']}  {acc}")
    out.append(f"converted engines ({len(inv['engines'])}, in the engine store {inv['engine_store']}, shared by "
               "every cache):")
    for e in inv["engines"]:
        out.append(f"  {e['path']}  {_size(e['bytes'])}")
    if not inv["datasets"] and not inv["spaces"]:
        out.append("nothing cached yet: run `extract DATA` to embed an image folder")
    return "\n".join(out)
