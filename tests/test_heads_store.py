"""Saved heads: provenance, trust registry (no silent code execution), feature-space checks."""

import pickle

import numpy as np
import pytest

from cachebuild import blobs
from featurize.errors import UserError
from heads import make_head
from heads.store import file_digest, load_head, read_meta, save_head, trust_file


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATURIZE_HOME", str(tmp_path / "home"))


def _fitted():
    X, y = blobs([10, 10], 4, 5.0)
    return make_head("centroid").fit(X, y), X


def test_roundtrip_with_provenance(tmp_path):
    est, X = _fitted()
    saved = save_head(tmp_path / "h.joblib", est, {"space_id": "sp-1", "backbone": "bb", "classes": [0, 1]})
    assert saved["sha256"] == file_digest(tmp_path / "h.joblib")
    assert saved["sha256"] in trust_file().read_text()
    est2, meta = load_head(tmp_path / "h.joblib", expect_space="sp-1")
    np.testing.assert_allclose(est2.predict_proba(X), est.predict_proba(X))
    assert meta["versions"]["scikit-learn"] and meta["classes"] == [0, 1]
    assert read_meta(tmp_path / "h.joblib")["space_id"] == "sp-1"


def test_mismatched_space_names_both(tmp_path):
    est, _ = _fitted()
    save_head(tmp_path / "h.joblib", est, {"space_id": "sp-1", "backbone": "resnet50", "classes": [0, 1]})
    with pytest.raises(UserError, match=r"fit on feature space sp-1 \(backbone resnet50\), not on sp-2 \(backbone vit\)"):
        load_head(tmp_path / "h.joblib", expect_space="sp-2", expect_backbone="vit")


class Boom:
    def __reduce__(self):  # what a malicious pickle does: run code on load
        return (open, ("/proc/self/never-opened-marker", "w"))


def test_foreign_file_is_refused_before_unpickling(tmp_path):
    bad = tmp_path / "foreign.joblib"
    bad.write_bytes(pickle.dumps({"format": "featurize-head", "estimator": Boom()}))
    with pytest.raises(UserError, match="refusing to load .*not recorded by this tool.*--trust"):
        load_head(bad)


def test_modified_file_is_refused_and_trust_records_it(tmp_path, monkeypatch):
    est, X = _fitted()
    path = tmp_path / "h.joblib"
    save_head(path, est, {"space_id": "s", "classes": [0, 1]})
    data = path.read_bytes()
    path.write_bytes(data + b"\0")  # any change of bytes changes the digest
    with pytest.raises(UserError, match="refusing"):
        load_head(path)
    path.write_bytes(data)
    load_head(path)  # the original bytes are trusted again
    monkeypatch.setenv("FEATURIZE_HOME", str(tmp_path / "other-machine"))
    with pytest.raises(UserError, match="refusing"):
        load_head(path)
    est2, _ = load_head(path, trust=True)  # explicit trust records the digest
    load_head(path)
    np.testing.assert_allclose(est2.predict_proba(X), est.predict_proba(X))


def test_trust_refuses_a_file_its_sidecar_disowns_and_never_records_a_broken_one(tmp_path):
    """--trust on a damaged head: unpickling it can exhaust memory (one appended byte did), so a
    digest that differs from the sidecar's is refused; a file that fails to load stays untrusted."""
    est, _ = _fitted()
    path = tmp_path / "h.joblib"
    save_head(path, est, {"space_id": "s", "classes": [0, 1]})
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(UserError, match=r"does not match the SHA-256 in h\.json .*re-run `fit`"):
        load_head(path, trust=True)
    assert file_digest(path) not in trust_file().read_text()

    junk = tmp_path / "junk.joblib"  # no sidecar, not a joblib file at all
    junk.write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="could not be loaded"):
        load_head(junk, trust=True)
    assert file_digest(junk) not in trust_file().read_text()
    with pytest.raises(UserError, match="refusing"):
        load_head(junk)
