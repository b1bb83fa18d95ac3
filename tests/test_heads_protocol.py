"""Registry, protocol (no leakage, CV vs split), metrics and the data checks, on real cache files."""

import numpy as np
import pytest

from cachebuild import blobs, build_cache
from featurize.errors import UserError
from heads import list_heads, make_head
from heads.metrics import compute_metrics, format_metrics
from heads.protocol import evaluate, load_labelled
from heads.registry import resolve_alias


def _data(n=(24, 20, 16), dim=8, sep=5.0, seed=0):
    X, codes = blobs(list(n), dim, sep, seed)
    return X, np.array(["ant", "bee", "cat"][: len(n)])[codes]


@pytest.mark.parametrize("name", list_heads(distinct=True))
def test_every_head_learns_blobs(name):
    X, y = _data()
    ev = evaluate(name, X, y, folds=3)
    assert ev.protocol == "cv-3"
    assert ev.metrics["cv"]["mean"]["accuracy"] > 0.85
    assert ev.metrics["cv"]["n"] == len(y)
    assert "log_loss" in ev.metrics["cv"]
    assert list(ev.estimator.classes_) == ["ant", "bee", "cat"]
    assert ev.estimator.predict(X[:3]).tolist() == y[:3].tolist() or ev.metrics["cv"]["accuracy"] < 1


def test_unknown_head_lists_valid_names():
    with pytest.raises(UserError, match=r"unknown head 'svn'; did you mean 'svm'\?.*logreg.*centroid"):
        make_head("svn")
    with pytest.raises(UserError, match=r"unknown head 'SVM'; did you mean 'svm'\?"):  # names are lower case
        make_head("SVM")


def test_svm_kernel_sized_to_data():
    assert "svm" in list_heads() and "svm" not in list_heads(distinct=True)
    assert resolve_alias("svm", 500) == "svm-rbf"
    assert resolve_alias("svm", 50_000) == "svm-linear"
    assert type(make_head("svm", n_samples=50_000).estimator.steps[-1][1]).__name__ == "LinearSVC"


def test_split_protocol_never_sees_test_rows():
    X, y = _data((30, 30), seed=1)
    splits = np.array((["train"] * 20 + ["test"] * 10) * 2)
    ev = evaluate("logreg", X, y, splits)
    # replacing every test vector with garbage must not change the fitted head at all
    X2 = X.copy()
    X2[splits == "test"] = 1e3
    ev2 = evaluate("logreg", X2, y, splits)
    np.testing.assert_array_equal(ev.estimator.predict_proba(X), ev2.estimator.predict_proba(X))
    assert ev.protocol == "split" and set(ev.metrics) == {"test"} and ev.metrics["test"]["n"] == 20
    assert "roc_auc" in ev.metrics["test"]


def test_seed_makes_runs_repeatable():
    X, y = _data((12, 10, 8), sep=2.0, seed=3)
    a = evaluate("mlp", X, y, folds=3, seed=7).metrics["cv"]
    b = evaluate("mlp", X, y, folds=3, seed=7).metrics["cv"]
    assert a["confusion"] == b["confusion"] and a["log_loss"] == b["log_loss"]


def test_class_weight_balanced_helps_minority_recall():
    X, codes = blobs([200, 12], 6, 2.0, seed=5)
    y = np.array(["common", "rare"])[codes]
    plain = evaluate("logreg", X, y, folds=3).metrics["cv"]["per_class"]["rare"]["recall"]
    balanced = evaluate("logreg", X, y, folds=3, class_weight="balanced").metrics["cv"]["per_class"]["rare"]["recall"]
    assert balanced >= plain


def test_metrics_match_hand_counts():
    m = compute_metrics(["a", "a", "a", "b"], ["a", "b", "a", "b"], [[0.9, 0.1], [0.4, 0.6], [0.8, 0.2], [0.3, 0.7]],
                        ["a", "b"])
    assert m["accuracy"] == 0.75
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["confusion"] == [[2, 1], [0, 1]]
    assert m["per_class"]["b"]["precision"] == 0.5
    assert m["roc_auc"] == 1.0
    assert m["log_loss"] == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.8, 0.7])))
    assert "balanced_accuracy" in format_metrics({"test": m})


def test_load_labelled_from_real_cache(tmp_path):
    build_cache(tmp_path / "c", tmp_path / "d", ["x", "y"], [5, 6], dim=4)
    lf = load_labelled(tmp_path / "c")
    assert lf.X.shape == (11, 4) and lf.X.dtype == np.float32
    assert sorted(set(lf.y)) == ["x", "y"] and lf.space_info["backbone"] == "tiny"


@pytest.mark.parametrize("kind,match", [
    ("empty", "cache .* is empty; run `extract DATA` first"),
    ("missing", "cache folder .* does not exist; check --cache"),
    ("unlabelled", "have no labels .*<class>"),
    ("one_class", "only one class .*at least 2 class folders"),
    ("single_image", "class 'y' has a single image .*add at least one more"),
])
def test_bad_input_is_one_user_error(tmp_path, kind, match):
    c, d = tmp_path / "c", tmp_path / "d"
    if kind == "empty":
        c.mkdir()
    elif kind == "unlabelled":
        build_cache(c, d, ["x"], [6], unlabelled=True)
    elif kind == "one_class":
        build_cache(c, d, ["x"], [6])
    elif kind == "single_image":
        build_cache(c, d, ["x", "y"], [6, 1])
    with pytest.raises(UserError, match=match) as e:
        load_labelled(c)
    assert "\n" not in str(e.value)


def test_kept_mistakes_take_turns_across_classes_most_confident_first():
    """The report shows the first 60 kept mistakes: in path order they were all from the first
    classes (TrashNet: cardboard and glass only, never trash)."""
    from heads.protocol import _misclassified

    classes = ["a", "b", "c"]
    y = np.array(["a"] * 4 + ["b"] * 2 + ["c"] * 2 + ["a"])
    pred = np.array(["b", "c", "b", "b", "a", "a", "a", "b", "a"])  # the last row is right
    conf = np.array([0.6, 0.9, 0.7, 0.5, 0.55, 0.8, 0.65, 0.95, 0.99])
    proba = np.full((len(y), 3), 0.0)
    for i, p in enumerate(pred):
        proba[i, classes.index(p)] = conf[i]
    paths = np.array([f"{t}/{i}.jpg" for i, t in enumerate(y)])
    rows = _misclassified(paths, y, pred, proba, classes, "test")
    # classes take turns (in the order of their most confident mistake), each most confident first
    assert [r["path"] for r in rows] == ["c/7.jpg", "a/1.jpg", "b/5.jpg", "c/6.jpg", "a/2.jpg", "b/4.jpg",
                                         "a/0.jpg", "a/3.jpg"]
    assert rows[1]["prob"] == 0.9 and rows[1]["pred"] == "c" and all(r["part"] == "test" for r in rows)


# --------------------------------------------------------------------------- heads under load (issue 9)


def _blas_threads():
    from threadpoolctl import threadpool_info

    return max((p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"), default=1)


def test_worker_fits_run_with_capped_blas_threads():
    from heads.parallel import run_tasks

    seen = []
    out = run_tasks(_blas_threads, [()] * 3, jobs=2, on_done=lambda i, r: seen.append(i))
    assert out == [1, 1, 1] and sorted(seen) == [0, 1, 2]  # cores // jobs = 1 on this 2-core machine
    assert run_tasks(_blas_threads, [()], jobs=1) == [1]  # in-process fits are capped too


def test_parallel_folds_give_the_same_result_as_one_at_a_time():
    X, y = _data((20, 18, 16), sep=2.5, seed=4)
    one = evaluate("logreg", X, y, folds=3, n_jobs=1)
    two = evaluate("logreg", X, y, folds=3, n_jobs=2)
    assert one.metrics["cv"]["confusion"] == two.metrics["cv"]["confusion"]
    assert one.metrics["cv"]["log_loss"] == pytest.approx(two.metrics["cv"]["log_loss"], rel=1e-9)
    np.testing.assert_allclose(one.estimator.predict_proba(X), two.estimator.predict_proba(X), rtol=1e-7)


def test_long_runs_show_which_fold_on_stderr_only(capsys, monkeypatch):
    import heads.parallel

    monkeypatch.setattr(heads.parallel, "PROGRESS_AFTER_S", 0.0)  # every run counts as long
    X, y = _data()
    evaluate("centroid", X, y, folds=3)
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert [ln.split(": ", 1)[1].split(" (")[0] for ln in lines] == [
        "fold 1/3 done", "fold 2/3 done", "fold 3/3 done", "final head fit on all rows"]
    assert all(ln.startswith("centroid (3-fold CV): ") and ln.endswith(" s)") for ln in lines)
    assert "(4/4, " in lines[-1]
