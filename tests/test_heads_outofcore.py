"""The out-of-core ``sgd`` head: streamed from real shards in chunks, scored like the other heads."""

from __future__ import annotations

import time

import numpy as np
import pytest

from cachebuild import blobs
from featurize.cache import DatasetIndex, FeatureSpace, index_path, read_index, write_index
from featurize.errors import UserError
from heads import outofcore
from heads.commands import fit_head
from heads.protocol import check_fits_in_memory, feature_bytes
from heads.store import load_head


def sorted_cache(tmp_path, n_per_class=(300, 200, 250), dim=24, split=False):
    """A cache whose shards hold the rows class by class, as `extract` writes a class-folder dataset,
    spread over three shards, plus a duplicate row left by a crash during compaction."""
    X, codes = blobs(list(n_per_class), dim=dim, sep=3.5, seed=3)
    names = np.array(["cat", "dog", "fox"])[codes]
    hashes = [f"{i:032x}" for i in range(len(X))]
    cache, root = tmp_path / "cache", tmp_path / "data"
    space = FeatureSpace(cache, "blobs-000000000001")
    space.create({"backbone": "blobs", "precision": "fp32"}, dim)
    for part in np.array_split(np.arange(len(X)), 3):
        space.write_shard([hashes[i] for i in part], X[part])
    space.write_shard([hashes[5]], X[5:6])  # a duplicate: the first copy wins
    rng = np.random.default_rng(0)
    splits = np.where(rng.random(len(X)) < 0.25, "test", "train") if split else np.array([""] * len(X))
    idx = DatasetIndex(root=str(root), layout="split" if split else "folder", path=[f"{n}/{i}.png" for i, n in
                       enumerate(names)], label=names.tolist(), split=splits.tolist(), hash=hashes,
                       size=[1] * len(X), mtime_ns=[0] * len(X), status=["ok"] * len(X),
                       extractions={space.space_id: {"backbone": "blobs", "finished_at": time.time()}})
    write_index(index_path(cache, root), idx)
    return cache, root, X, names, splits


@pytest.mark.parametrize("split", [True, False])
def test_sgd_streams_small_chunks_and_matches_logreg(tmp_path, monkeypatch, split):
    monkeypatch.setattr(outofcore, "CHUNK_ROWS", 128)  # many chunks, each gathered from random blocks
    monkeypatch.setattr(outofcore, "BLOCK_ROWS", 4)
    cache, root, X, names, splits = sorted_cache(tmp_path, split=split)
    sgd = fit_head(cache, "sgd", data=root).summary
    logreg = fit_head(cache, "logreg", data=root).summary
    assert sgd["protocol"] == ("split" if split else "holdout-0.2") and sgd["classes"] == ["cat", "dog", "fox"]
    n_test = sgd["metrics"]["test"]["n"]
    assert (n_test == int((splits == "test").sum())) if split else 100 < n_test < 200
    ooc = sgd["out_of_core"]
    assert ooc["n_train"] + ooc["n_tune"] + n_test == len(X)  # every row once, the duplicate dropped
    assert sgd["best_params"]["alpha"] in outofcore.ALPHAS and sgd["metrics"]["test"]["accuracy"] > 0.9
    if split:  # same test rows: within 2 points of logreg
        assert sgd["metrics"]["test"]["accuracy"] >= logreg["metrics"]["test"]["accuracy"] - 0.02
    est, meta = load_head(sgd["paths"]["model"])  # saved like any head: predict and report use it
    assert meta["head"] == "sgd" and list(est.classes_) == ["cat", "dog", "fox"]
    assert np.mean(est.predict(X) == names) > 0.9


def test_sgd_in_memory_is_a_registered_head():
    from heads import make_head

    X, y = blobs([80, 60], dim=8, sep=4.0, seed=1)
    est = make_head("sgd", seed=0).fit(X, y)
    assert est.best_params_["alpha"] in outofcore.ALPHAS and np.mean(est.predict(X) == y) > 0.95
    assert est.predict_proba(X[:3]).shape == (3, 2)


def test_heads_that_load_everything_refuse_when_it_cannot_fit(tmp_path):
    cache, root, X, _, _ = sorted_cache(tmp_path)
    idx = read_index(index_path(cache, root))
    space = FeatureSpace(cache, "blobs-000000000001")
    need = feature_bytes(len(X), X.shape[1])
    check_fits_in_memory(idx, space, available=need)  # fits exactly: no error
    with pytest.raises(UserError, match=r"750 x 24 float32, 0\.0 GB .* use `fit --head sgd`"):
        check_fits_in_memory(idx, space, available=need - 1)
