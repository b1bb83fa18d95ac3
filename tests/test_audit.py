"""`audit` and `fit/compare --exclude` on real HDF5 caches with planted problems.

The planted cache: three classes of Gaussian blobs (real PNG files, so the gallery has
thumbnails), plus one flipped label, one near-duplicate (a copy of another image's vector
with tiny noise), one outlier, and a `stranger` file embedded in the cache but not in the
dataset (for predict's novelty flag).
"""

import csv
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cachebuild import blobs, build_cache, write_png
from conftest import ROOT, last_json, run_cli
from featurize.cache import DatasetIndex, FeatureSpace, content_hash, index_path, write_index

SPACE = "tiny-000000000001"
DIM = 64


@pytest.fixture
def env(tmp_path):
    return {"FEATURIZE_HOME": str(tmp_path / "home"), "FEATURIZE_CACHE": str(tmp_path / "nocache")}


def planted(tmp_path, split: bool = False):
    """Write the planted dataset; returns (cache, root, {role: root-relative path})."""
    cache, root = tmp_path / "c", tmp_path / "data"
    X, codes = blobs([14, 14, 14], dim=DIM, sep=12.0, seed=1)
    labels = np.array(["a", "b", "c"])[codes]
    splits = np.array(["train" if i % 14 < 10 else "test" for i in range(len(X))]) if split else np.array([""] * len(X))
    rng = np.random.default_rng(5)
    roles = {}
    labels[3] = "b"  # planted: an image of class a labelled b (a training row)
    roles["flipped"] = 3
    X = np.vstack([X, X[12] + 0.01 * rng.normal(size=DIM)])  # a near-copy of a test image of class a ...
    labels, splits = np.append(labels, "a"), np.append(splits, "train" if split else "")  # ... put in train
    roles["copy"], roles["original"] = len(X) - 1, 12
    far = -6.0 * X[:42].mean(axis=0) / np.linalg.norm(X[:42].mean(axis=0)) + rng.normal(size=DIM)
    X = np.vstack([X, far])
    labels, splits = np.append(labels, "c"), np.append(splits, "train" if split else "")
    roles["outlier"] = len(X) - 1
    rels, hashes = [], []
    for i, (lab, sp) in enumerate(zip(labels, splits)):
        rel = (Path(sp) if sp else Path()) / lab / f"img{i:03d}.png"
        hashes.append(content_hash(write_png(root / rel, 1000 + i, size=16)))
        rels.append(rel.as_posix())
    stranger = write_png(tmp_path / "new" / "stranger.png", 99, size=16)
    space = FeatureSpace(cache, SPACE)
    space.create({"backbone": "tiny"}, DIM)
    space.write_shard(hashes + [content_hash(stranger)], np.vstack([X, 2 * far]).astype(np.float32))
    n = len(X)
    write_index(index_path(cache, root), DatasetIndex(
        root=str(root), layout="split" if split else "folder", path=rels, label=list(labels), split=list(splits),
        hash=hashes, size=[1] * n, mtime_ns=[0] * n, status=["ok"] * n,
        extractions={SPACE: {"backbone": "tiny", "finished_at": time.time()}}))
    return cache, root, {k: rels[i] for k, i in roles.items()} | {"stranger": str(stranger)}


def test_audit_finds_planted_issues_and_writes_csv_json_html(tmp_path, env):
    cache, root, roles = planted(tmp_path)
    argv = ["audit", "--cache", str(cache), "--head", "centroid", "--html", "--json"]
    code = (f"import sys, cli\nrc = cli.main({argv!r})\n"  # the real CLI, and it must stay torch-free
            "assert rc == 0 and not [m for m in ('torch', 'torchvision', 'timm') if m in sys.modules]\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, **env})
    assert p.returncode == 0, p.stderr
    out = last_json(p)
    with open(out["paths"]["csv"]) as f:
        rows = list(csv.DictReader(f))
    by = {(r["issue"], r["path"]): r for r in rows}
    flipped = by[("label", roles["flipped"])]
    assert (flipped["label"], flipped["suggested"]) == ("b", "a")
    assert out["label_issues"]["n"] <= 3 and out["label_issues"]["per_class"]["b"] >= 1
    # the copy and its original form one group; one of them is listed with the other as partner
    dup = [r for r in rows if r["issue"] == "near_duplicate"]
    assert len(dup) == 1 and {dup[0]["path"], dup[0]["partner"]} == {roles["copy"], roles["original"]}
    assert float(dup[0]["score"]) > 0.99 and dup[0]["cross_label"] == "0"
    outliers = [r for r in rows if r["issue"] == "outlier"]  # farthest first
    assert outliers[0]["path"] == roles["outlier"] and out["outliers"]["n"] == len(outliers) <= 4
    assert all(float(outliers[0]["score"]) > 1.5 * float(r["score"]) for r in outliers[1:])
    assert out["near_duplicates"]["n_pairs"] == 1
    full = json.loads(Path(out["paths"]["json"]).read_text())
    assert len(full["rows"]) == len(rows) and full["near_duplicates"]["groups"][0]["max_cosine"] > 0.99
    assert "suspected label errors: " in p.stdout and "near-duplicates (cosine >= 0.85, or pixel hashes within 24/255 " \
        "bits and cosine >= 0.30): 1 pairs, 0 of them by pixels" in p.stdout
    page = Path(out["paths"]["html"]).read_text()
    assert page.count("data:image/jpeg;base64,") == len(rows) + 1  # the kept original is shown beside its copy
    assert str(root / roles["flipped"]) in page and "(image missing)" not in page and 'href="file://' in page


def test_split_leak_warning_and_exclude_is_training_only(tmp_path, env):
    cache, root, roles = planted(tmp_path, split=True)
    p = run_cli("fit", "--head", "centroid", "--cache", cache, "--json", env=env, check=0)
    warn = [ln for ln in p.stderr.splitlines() if ln.startswith("warning: ")]
    assert len(warn) == 1 and "1 of 12 held-out images have a near-duplicate in train" in warn[0]
    assert roles["copy"] in warn[0] and roles["original"] in warn[0]
    full = last_json(p)

    # list the training copy, a held-out image (still scored) and a path the dataset does not have
    excl = tmp_path / "exclude.txt"
    excl.write_text(f"{roles['copy']}\n{root / roles['original']}\nnot/there.png\n")
    p = run_cli("fit", "--head", "centroid", "--cache", cache, "--exclude", excl, "--json", env=env, check=0)
    out = last_json(p)
    assert not [ln for ln in p.stderr.splitlines() if ln.startswith("warning: ")]  # the leak is gone
    assert out["metrics"]["test"]["n"] == full["metrics"]["test"]["n"] == 12
    assert out["exclude"] == {"file": str(excl), "excluded": 1, "unknown": ["not/there.png"]}
    assert out["n_train"] == full["n_train"] - 1
    assert "excluded 1 training images" in p.stdout and "not/there.png" in p.stdout

    # compare takes the same option and says so
    p = run_cli("compare", "--heads", "centroid", "--cache", cache, "--exclude", excl, "--json", env=env, check=0)
    assert last_json(p)["exclude"]["excluded"] == 1 and "excluded 1 training images" in p.stdout


def test_exclude_in_cv_scores_every_image_and_audit_csv_is_accepted(tmp_path, env):
    cache, root, roles = planted(tmp_path)
    audit = last_json(run_cli("audit", "--cache", cache, "--head", "centroid", "--json", env=env, check=0))
    argv = shlex.split(audit["refit_command"])  # what audit prints last: same data, backbone and cache
    assert argv[:3] == ["python", str(ROOT / "cli.py"), "fit"] and argv[-2:] == ["--exclude", audit["paths"]["csv"]]
    p = run_cli(*argv[2:], "--json", env=env, check=0)
    out = last_json(p)
    n_flagged = audit["n_flagged_images"]
    assert out["exclude"]["excluded"] == n_flagged >= 3 and out["exclude"]["unknown"] == []
    assert out["metrics"]["cv"]["n"] == 44 and out["n_train"] == 44 - n_flagged


def test_predict_flags_inputs_unlike_the_training_data(tmp_path, env):
    cache, root, roles = planted(tmp_path)
    run_cli("fit", "--head", "centroid", "--cache", cache, env=env, check=0)
    p = run_cli("predict", roles["stranger"], root / roles["original"], "--head", "centroid", "--format", "csv",
                "--cache", cache, "--json", env=env, check=0)
    rows = {Path(r["path"]).name: r for r in csv.DictReader(p.stdout.strip().splitlines()[:-1])}
    assert rows["stranger.png"]["unlike_training"] == "yes" and rows["img012.png"]["unlike_training"] == "no"
    preds = {Path(r["path"]).name: r for r in last_json(p)["predictions"]}
    assert preds["stranger.png"]["novelty"] > preds["img012.png"]["novelty"]


@pytest.mark.parametrize("kind,fix", [("unlabelled", "<class>"), ("one_class", "at least 2 class folders"),
                                      ("exclude_unreadable", "cannot read the exclude file"),
                                      ("threshold", "--dup-threshold must be in (0.0, 1.0]"),
                                      ("folds", "--folds must be >= 2")])
def test_bad_input_one_line(tmp_path, capsys, kind, fix):
    import cli  # in-process (same main() as the console script): these fail before any work

    if kind == "exclude_unreadable":
        build_cache(tmp_path / "c", tmp_path / "d", ["x", "y"], [6, 6])
        argv = ["fit", "--head", "centroid", "--exclude", str(tmp_path / "nope.csv")]
    elif kind in ("threshold", "folds"):
        build_cache(tmp_path / "c", tmp_path / "d", ["x", "y"], [6, 6])
        argv = ["audit", "--dup-threshold", "1.5"] if kind == "threshold" else ["audit", "--folds", "1"]
    else:
        build_cache(tmp_path / "c", tmp_path / "d", ["x"], [8], unlabelled=kind == "unlabelled")
        argv = ["audit"]
    assert cli.main(argv + ["--cache", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("Error: ") and fix in err


def test_similarity_pass_matches_brute_force_across_blocks():
    from heads.audit import audit_pass, dup_rows, similarity_pass, unit_rows

    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 8))
    X[30] = X[4] + 1e-3  # a pair that straddles two blocks
    U = unit_rows(X)
    pairs, sims, topk = similarity_pass(U, 0.6, 3, block=16)
    S = U @ U.T
    np.fill_diagonal(S, -np.inf)
    want = {(i, j) for i in range(50) for j in range(i + 1, 50) if S[i, j] >= 0.6}
    assert {tuple(p) for p in pairs.tolist()} == want and (4, 30) in want
    assert np.all(np.diff(sims) <= 0)
    np.testing.assert_allclose(topk, -np.sort(-S, axis=1)[:, :3], rtol=1e-5)

    # audit's single pass: centred pairs and uncentred neighbours from one Gram matrix
    X = np.abs(X) + 0.5  # non-negative like pooled CNN features, so centring matters
    pairs, sims, topk = audit_pass(X, 0.6, 3, block=16)
    want_pairs, want_sims, _ = similarity_pass(dup_rows(X), 0.6, 0, block=16)
    _, _, want_topk = similarity_pass(unit_rows(X), np.inf, 3, block=16)
    assert {tuple(p) for p in pairs.tolist()} == {tuple(p) for p in want_pairs.tolist()} and len(pairs) > 1
    np.testing.assert_allclose(np.sort(sims), np.sort(want_sims), atol=1e-4)
    np.testing.assert_allclose(topk, want_topk, atol=1e-5)


def test_python_api_audit_then_fit_without_the_flagged_images(tmp_path, monkeypatch):
    import featurize as fz

    monkeypatch.setenv("FEATURIZE_HOME", str(tmp_path / "home"))
    cache, root, roles = planted(tmp_path)
    found = fz.audit(root, cache=cache, head="centroid")
    assert (found.label_issues, found.near_duplicate_groups) == (1, 1) and found.outliers >= 1
    assert {(r["issue"], r["path"]) for r in found.rows} >= {("label", roles["flipped"]), ("outlier", roles["outlier"])}
    assert "np.str_" not in repr(found.rows)  # paths and labels as plain str in a notebook
    assert Path(found.paths["csv"]).is_file() and found.to_dict()["refit_command"].endswith(found.paths["csv"])
    # not run as cli.py: the printed command is the console script's (a pip install has no cli.py)
    assert shlex.split(found.to_dict()["refit_command"])[:2] == ["featurize", "fit"]
    fit = fz.fit(root, head="centroid", cache=cache, exclude=found.paths["csv"])
    assert fit.summary["exclude"]["excluded"] == len({r["path"] for r in found.rows}) and fit.summary["n_train"] < 44
    with pytest.raises(fz.UserError, match=r"^dup_threshold must be in \(0.0, 1.0\]"):  # worded for Python
        fz.audit(root, cache=cache, dup_threshold=0)


def pixel_planted(tmp_path):
    """Photos-like images (smooth random layouts, 160 px) in 3 classes, plus a half-size quality-50 JPEG
    copy of one whose vector moved as far as another image of its class: only its pixels tell."""
    from PIL import Image

    cache, root = tmp_path / "c", tmp_path / "data"
    X, codes = blobs([8, 8, 8], dim=DIM, sep=6.0, seed=2)
    rng = np.random.default_rng(3)
    labels, rels = list(np.array(["a", "b", "c"])[codes]), []
    for i, lab in enumerate(labels):
        layout = Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).resize((160, 160), Image.BICUBIC)
        rel = f"{lab}/img{i:02d}.png"
        (root / lab).mkdir(parents=True, exist_ok=True)
        layout.save(root / rel)
        rels.append(rel)
    with Image.open(root / rels[2]) as im:  # the copy: half size, re-encoded at JPEG quality 50
        im.resize((80, 80), Image.BILINEAR).save(root / "a/copy.jpg", quality=50)
    rels.append("a/copy.jpg")
    labels.append("a")
    X = np.vstack([X, 0.5 * X[2] + 0.5 * X[5]])  # its vector: halfway to another image of class a
    hashes = [content_hash(root / r) for r in rels]
    space = FeatureSpace(cache, SPACE)
    space.create({"backbone": "tiny"}, DIM)
    space.write_shard(hashes, X.astype(np.float32))
    n = len(rels)
    write_index(index_path(cache, root), DatasetIndex(
        root=str(root), layout="folder", path=rels, label=labels, split=[""] * n, hash=hashes, size=[1] * n,
        mtime_ns=[0] * n, status=["ok"] * n, extractions={SPACE: {"backbone": "tiny", "finished_at": time.time()}}))
    return cache, root, rels


def test_resized_recompressed_copy_is_found_by_its_pixels_not_its_embedding(tmp_path, capsys):
    from dataclasses import replace

    from featurize.layout import Cache
    from heads.audit import DUP_THRESHOLD, PIXEL_FLOOR, audit, dup_rows, warn_leaks
    from heads.pixelhash import VERSION, load_store
    from heads.protocol import load_labelled

    cache, root, rels = pixel_planted(tmp_path)
    U = dup_rows(FeatureSpace(cache, SPACE).load()[1])  # shard rows are in index order here
    cos = float(U[2] @ U[-1])
    assert PIXEL_FLOOR <= cos < DUP_THRESHOLD  # the embedding alone does not call them copies ...
    alone = audit(cache, root, head="centroid", pixels=False)["near_duplicates"]
    assert alone["n_pairs"] == 0 and alone["pixel_hashes"] is None
    nd = audit(cache, root, head="centroid")["near_duplicates"]  # ... their pixels do
    assert nd["n_pairs"] == nd["n_pixel_pairs"] == 1 and nd["n_groups"] == 1
    top = nd["top"][0]
    assert {top["path"], top["partner"]} == {rels[2], "a/copy.jpg"} and 0 <= top["pixel_bits"] <= 24
    assert nd["groups"][0]["keep"] in (rels[2], "a/copy.jpg") and nd["groups"][0]["min_pixel_bits"] == top["pixel_bits"]
    assert nd["pixel_hashes"]["computed"] == len(rels) and nd["pixel_hashes"]["missing"] == 0

    # fit's leak warning reads the hashes audit cached: the copy in test, its original in train
    lf = load_labelled(cache, root)
    lf = replace(lf, splits=np.where(lf.paths == "a/copy.jpg", "test", "train"))
    assert warn_leaks(lf) == 1 and "1 of 1 held-out images have a near-duplicate in train" in capsys.readouterr().err

    # cached by content hash: a second audit decodes nothing; a file changed since extraction is skipped
    store = load_store(Cache(cache).pixelhash_path(VERSION))
    assert set(store) == {content_hash(root / r) for r in rels}
    (root / "a/copy.jpg").write_bytes((root / "a/copy.jpg").read_bytes() + b"\0")
    nd = audit(cache, root, head="centroid")["near_duplicates"]
    assert nd["pixel_hashes"] == {**nd["pixel_hashes"], "computed": 0, "cached": len(rels), "missing": 0}
    (Cache(cache).pixelhash_path(VERSION)).unlink()
    nd = audit(cache, root, head="centroid")["near_duplicates"]
    assert nd["pixel_hashes"]["missing"] == 1 and nd["n_pairs"] == 0  # its bytes no longer match its vector
    assert warn_leaks(lf) == 0  # nor does fit count it
