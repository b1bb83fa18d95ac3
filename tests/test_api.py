"""The Python API (`import featurize as fz`): the README example as written, real caches, real models.

The `tiny` backbone stands in for the offline default so the README example runs in seconds;
everything else (images made on the fly, HDF5 cache, scikit-learn) is the real thing.
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, make_dataset, make_image, run_cli


def _readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs(tmp_path):
    code = _readme_block().replace('"efficientnet_lite0"', '"tiny"')
    assert '"tiny"' in code  # the substitution hit: the example names the default backbone
    make_dataset(tmp_path / "data", classes=("cat", "dog"), per_class=6)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "FEATURIZE_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "12 images, 12 embedded" in proc.stdout
    assert "(12, 16) ['cat', 'dog']" in proc.stdout
    assert list((tmp_path / "cache" / "heads").rglob("logreg.joblib"))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import featurize as fz

    tmp = tmp_path_factory.mktemp("api")
    data = make_dataset(tmp / "data", classes=("a", "b"), per_class=5)
    run = fz.extract(data, backbone="tiny", cache=tmp / "cache", workers=0)
    return {"tmp": tmp, "data": data, "cache": tmp / "cache", "run": run, "fz": fz}


def test_import_is_torch_and_sklearn_free(env):
    code = ("import sys, featurize as fz\n"
            "fz.extract; fz.load_features; fz.embed; fz.load_head; fz.Features\n"
            f"ds = fz.load_features({str(env['data'])!r}, cache={str(env['cache'])!r})\n"
            "print(ds.X.shape, [m for m in ('torch', 'torchvision', 'timm', 'sklearn') if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "(10, 16) []"


def test_extract_result_and_features_agree(env):
    fz, run = env["fz"], env["run"]
    assert isinstance(run, fz.Extraction) and (run.images, run.ok, run.embedded) == (10, 10, 10)
    assert run.summary["space_id"] == run.space_id and callable(fz.extract)  # still the function after the import
    ds = fz.load_features(env["data"], cache=env["cache"])
    assert ds.X.shape == (10, 16) and ds.classes == ["a", "b"] and ds.space_id == run.space_id
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in ds.paths)
    again = fz.extract(env["data"], backbone="tiny", cache=env["cache"], workers=0)
    assert (again.embedded, again.cached) == (0, 10)


def test_embed_paths_images_and_arrays_give_the_cached_vectors(env, tmp_path):
    from PIL import Image

    fz = env["fz"]
    ds = fz.load_features(env["data"], cache=env["cache"])
    cached = fz.embed(ds.paths[:3], backbone="tiny", cache=env["cache"])
    np.testing.assert_array_equal(cached, ds.X[:3])
    pil = Image.open(ds.paths[0])
    arr = np.asarray(Image.open(ds.paths[1]).convert("RGB"))
    mixed = fz.embed([pil, arr, Path(ds.paths[2])], backbone="tiny")  # no cache: computed in memory
    np.testing.assert_allclose(mixed, ds.X[:3], rtol=1e-5, atol=1e-5)
    batch = fz.embed(np.stack([arr, arr]), backbone="tiny")  # a 4-D array is a batch of images
    np.testing.assert_allclose(batch, ds.X[[1, 1]], rtol=1e-5, atol=1e-5)
    new = make_image(tmp_path / "new.png", seed=99)
    fz.embed([new], backbone="tiny", cache=env["cache"])  # a new file's vector is added to the cache
    from featurize.cache import FeatureSpace, content_hash

    assert content_hash(new).encode() in FeatureSpace(env["cache"], ds.space_id).known_hashes()


def test_errors_are_worded_for_python_and_for_the_cli(env, tmp_path):
    fz = env["fz"]
    with pytest.raises(fz.UserError, match=r"^batch_size must be >= 1") as e:
        fz.extract(env["data"], backbone="tiny", cache=env["cache"], batch_size=0)
    assert "--" not in str(e.value)
    with pytest.raises(fz.UserError, match="could not be embedded") as e:
        fz.embed([str(tmp_path / "missing.jpg")], backbone="tiny")
    assert e.value.details["errors"][0]["path"].endswith("missing.jpg")
    from featurize.api import python_wording

    assert python_wording("run `fit --head logreg` first (or `finetune --init random`); pass --weights PATH or "
                          "--trust") == ("run `featurize.fit(head='logreg')` first (or `finetune --init random`); "
                                         "pass weights=PATH or trust=True")
    proc = run_cli("extract", env["data"], "--backbone", "tiny", "--cache", env["cache"], "--batch-size", "0", check=1)
    assert "Error: --batch-size must be >= 1" in proc.stderr


def test_embedder_passes_the_applicable_estimator_checks():
    from sklearn.base import clone
    from sklearn.utils import estimator_checks as ec

    import featurize as fz

    est = fz.Embedder("tiny")
    # The data checks feed numeric 2-D matrices, which are not images (the tags say so); these
    # are the API checks that apply to a transformer of file paths.
    for check in (ec.check_estimator_cloneable, ec.check_estimator_repr, ec.check_no_attributes_set_in_init,
                  ec.check_get_params_invariance, ec.check_set_params, ec.check_parameters_default_constructible,
                  ec.check_do_not_raise_errors_in_init_or_set_params, ec.check_mixin_order,
                  ec.check_valid_tag_types, ec.check_estimator_tags_renamed):
        check("Embedder", est)
    assert clone(est).get_params() == est.get_params()


def test_embedder_in_a_pipeline_pickles_and_names_its_features(env):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    fz = env["fz"]
    ds = fz.load_features(env["data"], cache=env["cache"])
    emb = fz.Embedder("tiny", cache=str(env["cache"]))
    np.testing.assert_array_equal(emb.fit_transform(ds.paths), ds.X)
    assert list(emb.get_feature_names_out()[:2]) == ["embedder0", "embedder1"] and emb.n_features_out_ == 16
    pipe = make_pipeline(fz.Embedder("tiny", cache=str(env["cache"])), LogisticRegression(max_iter=500))
    pipe.fit(ds.paths, ds.y)
    back = pickle.loads(pickle.dumps(pipe))
    assert list(back.predict(ds.paths)) == list(pipe.predict(ds.paths))


def test_fit_and_load_head_predict_files_features_and_new_images(env, tmp_path, monkeypatch):
    monkeypatch.setenv("FEATURIZE_HOME", str(tmp_path / "home"))
    fz = env["fz"]
    fit = fz.fit(env["data"], head="centroid", cache=env["cache"])
    assert fit.classes == ["a", "b"] and Path(fit.path).is_file() and "cv" in fit.metrics
    assert "np.str_" not in repr(fit.metrics) and list(fit.metrics["cv"]["per_class"]) == ["a", "b"]  # plain str
    head = fz.load_head(fit.path)  # the cache is the one the head file sits in
    ds = fz.load_features(env["data"], cache=env["cache"])
    by_path = head.predict(ds.paths)
    np.testing.assert_array_equal(by_path, head.predict(ds.X))
    copy = make_image(tmp_path / "copy.jpg", seed=1234)
    assert head.predict_proba([copy]).shape == (1, 2)  # not in the cache: embedded with the head's backbone
    with pytest.raises(fz.UserError, match="trust=True"):
        (tmp_path / "other.joblib").write_bytes(Path(fit.path).read_bytes() + b"\0")
        fz.load_head(tmp_path / "other.joblib")


def test_load_features_while_the_first_extract_runs_is_an_error_not_zero_rows(env, tmp_path):
    # what a first extract's index looks like while it runs: every image listed, all pending
    import shutil

    from featurize import cache as fc

    fz, cache = env["fz"], tmp_path / "cache"
    shutil.copytree(env["cache"], cache)
    ipath, index = fc.find_index(cache, env["data"])
    index.status = [fc.STATUS_PENDING] * len(index.status)
    fc.write_index(ipath, index)
    with pytest.raises(fz.UserError, match=r"10 of 10 images pending: an extract is running") as e:
        fz.load_features(env["data"], cache=cache)
    assert "fz.extract(" in str(e.value)
