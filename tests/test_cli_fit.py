"""The fit/compare/predict/report commands as subprocesses on real HDF5 caches and tiny PNGs."""

import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from urllib.parse import unquote

import pytest

from cachebuild import add_space, build_cache
from conftest import ROOT, last_json, run_cli


@pytest.fixture
def env(tmp_path):
    return {"FEATURIZE_HOME": str(tmp_path / "home"), "FEATURIZE_CACHE": str(tmp_path / "nocache")}


@pytest.fixture
def split_cache(tmp_path):
    """A split-layout dataset (train/test) with real tiny PNGs whose hashes are in the cache."""
    splits = (["train"] * 14 + ["test"] * 6) * 2
    build_cache(tmp_path / "c", tmp_path / "data", ["cat", "dog"], [20, 20], splits=splits, images=True, sep=2.5)
    return tmp_path / "c"


def test_fit_split_json_and_saved_head(split_cache, env):
    p = run_cli("fit", "--head", "logreg", "--cache", split_cache, "--json", env=env, check=0)
    out = last_json(p)
    assert out["protocol"] == "split" and set(out["metrics"]) == {"test"}
    assert out["metrics"]["test"]["n"] == 12 and out["metrics"]["test"]["accuracy"] >= 0.75
    assert out["timings"]["fit_s"] > 0 and "fit time:" in p.stdout and "balanced_accuracy" in p.stdout
    meta = json.loads(open(out["paths"]["meta"]).read())
    assert meta["space_id"] == "tiny-000000000001" and meta["classes"] == ["cat", "dog"]
    assert meta["versions"]["scikit-learn"]


def test_fit_cv_out_class_weight(tmp_path, env):
    build_cache(tmp_path / "c", tmp_path / "d", ["a", "b", "c"], [12, 8, 5])
    out_file = tmp_path / "models" / "m.joblib"
    p = run_cli("fit", "--head", "centroid", "--class-weight", "balanced", "--out", out_file, "--folds", "4",
                "--cache", tmp_path / "c", "--json", env=env, check=0)
    out = last_json(p)
    assert out_file.exists() and out["paths"]["model"] == str(out_file)
    cv = out["metrics"]["cv"]
    assert cv["folds"] == 4 and cv["mean"]["accuracy"] > 0.8 and "+/-" in p.stdout


def test_compare_every_head_every_backbone(tmp_path, env):
    build_cache(tmp_path / "c", tmp_path / "d", ["a", "b"], [10, 10])
    add_space(tmp_path / "c", tmp_path / "d", "other", "other-000000000002")
    p = run_cli("compare", "--heads", "centroid,knn", "--cache", tmp_path / "c", "--seed", "3", "--folds", "4",
                "--class-weight", "balanced", "--json", env=env, check=0)
    out = last_json(p)
    rows = out["rows"]
    assert {(r["backbone"], r["head"]) for r in rows} == {(b, h) for b in ("tiny", "other")
                                                          for h in ("centroid", "knn")}
    accs = [r["accuracy"] for r in rows]
    assert accs == sorted(accs, reverse=True) and [r["rank"] for r in rows] == list(range(1, 5))
    with open(out["paths"]["csv"]) as f:
        assert len(list(csv.DictReader(f))) == 4
    assert "fit_s" in p.stdout
    # compare keeps no heads; the command it prints last saves the winner, options included
    lines = p.stdout.strip().splitlines()  # the JSON object, then the command, then "best: ..."
    assert lines[-3].startswith("best: ")
    argv = shlex.split(lines[-2])
    assert argv[:3] == ["python", str(ROOT / "cli.py"), "fit"]
    fit = last_json(run_cli(*argv[2:], "--json", env=env, check=0))
    assert (fit["head"], fit["backbone"]) == (rows[0]["head"], rows[0]["backbone"])
    assert fit["metrics"]["cv"]["mean"]["accuracy"] == rows[0]["accuracy"] and fit["metrics"]["cv"]["folds"] == 4


def test_predict_files_folders_csv_and_bad_files(split_cache, tmp_path, env):
    run_cli("fit", "--head", "centroid", "--cache", split_cache, env=env, check=0)
    broken = tmp_path / "new" / "broken.png"
    broken.parent.mkdir()
    broken.write_bytes(b"not an image")
    shutil.copy(tmp_path / "data" / "test" / "dog" / "img0034.png", tmp_path / "new" / "copy.png")
    p = run_cli("predict", tmp_path / "data" / "test", tmp_path / "new", tmp_path / "missing.jpg", "--head", "centroid",
                "--format", "csv", "--cache", split_cache, "--json", env=env, check=0)
    lines = p.stdout.strip().splitlines()
    rows = list(csv.DictReader(lines[:-1]))
    assert len(rows) == 13  # 12 test images + the copy, found in the cache by content hash
    copy = next(r for r in rows if r["path"].endswith("copy.png"))
    original = next(r for r in rows if r["path"].endswith("img0034.png"))
    # same bytes -> same cached vector -> same answer; the top-1 probability leads the top-k list
    assert (copy["label"], copy["probability"]) == (original["label"], original["probability"])
    assert 0.5 <= float(copy["probability"]) <= 1 and copy["top_k"].startswith(copy["label"] + ":")
    assert sum(r["label"] == r["path"].split("/")[-2] for r in rows if "/test/" in r["path"]) >= 8
    out = json.loads(lines[-1])
    assert {e["path"].rsplit("/", 1)[-1] for e in out["errors"]} == {"broken.png", "missing.jpg"}
    assert "skipped" in p.stderr and "broken.png" in p.stderr
    # which head answered, fit on which dataset and space (without --model: the latest extraction's)
    used = next(line for line in p.stderr.splitlines() if line.startswith("using head centroid"))
    assert out["model"] in used and "data" in used and "space tiny-" in used

    # nothing classifiable: the count is of the inputs given, and --json keeps the skipped list
    p = run_cli("predict", broken, tmp_path / "missing.jpg", "--head", "centroid", "--cache", split_cache, "--json",
                env=env, check=1)
    assert p.stderr.splitlines()[-1].startswith("Error: none of the 2 inputs could be classified")
    out = last_json(p)
    assert out["error"].startswith("none of the 2 inputs") and len(out["errors"]) == 2


def test_predict_with_a_head_saved_elsewhere_finds_the_cache_it_was_fit_in(tmp_path, env, monkeypatch):
    # fit --out models/h.joblib --cache DIR, then predict --model models/h.joblib without --cache: every
    # image was "skipped ... run `extract` first", then "pass readable image files"
    import featurize as fz
    from conftest import make_dataset, make_image

    for k, v in env.items():  # $FEATURIZE_CACHE: a folder that does not exist
        monkeypatch.setenv(k, v)
    cache, model = tmp_path / "c", tmp_path / "models" / "h.joblib"
    fz.extract(make_dataset(tmp_path / "data", per_class=4), backbone="tiny", cache=cache, workers=0, progress=False)
    fz.fit(tmp_path / "data", head="centroid", cache=cache, out=model)
    new = make_image(tmp_path / "new.png", seed=99, color=(250, 10, 10))  # not cached: embedded with tiny
    p = run_cli("predict", new, "--model", model, "--json", env=env, check=0)
    [row] = last_json(p)["predictions"]
    assert row["path"] == str(new) and row["label"] in ("cat", "dog")
    assert f"using the cache {cache}, where the head was fit" in p.stderr
    assert fz.load_head(model).predict([new]).tolist() == [row["label"]]  # the Python API alike
    cache.rename(tmp_path / "moved")  # neither cache holds the head's space: one line naming --cache
    p = run_cli("predict", new, "--model", model, env=env, check=1)
    assert p.stderr.splitlines()[-1].startswith(f"Error: the cache {tmp_path / 'nocache'} has no feature space tiny-")
    assert "pass --cache" in p.stderr.splitlines()[-1]


def test_predict_refuses_other_backbone_and_foreign_files(split_cache, tmp_path, env):
    out = last_json(run_cli("fit", "--head", "knn", "--cache", split_cache, "--json", env=env, check=0))
    img = tmp_path / "data" / "test" / "cat" / "img0014.png"
    p = run_cli("predict", img, "--model", out["paths"]["model"], "--backbone", "resnet50", "--cache", split_cache,
                env=env, check=1)
    assert p.stderr.startswith("Error: ") and "tiny-000000000001" in p.stderr and "resnet50" in p.stderr
    stranger = {**env, "FEATURIZE_HOME": str(tmp_path / "elsewhere")}
    p = run_cli("predict", img, "--model", out["paths"]["model"], "--cache", split_cache, env=stranger, check=1)
    assert "refusing to load" in p.stderr and "--trust" in p.stderr
    p = run_cli("predict", img, "--model", out["paths"]["model"], "--trust", "--cache", split_cache, "--json",
                env=stranger, check=0)
    assert last_json(p)["predictions"][0]["label"] in ("cat", "dog")


def test_report_renders_metrics_confusion_and_gallery(tmp_path, env):
    build_cache(tmp_path / "c", tmp_path / "d", ["a", "b"], [15, 15], images=True, sep=1.0)
    run_cli("fit", "--head", "centroid", "--cache", tmp_path / "c", env=env, check=0)
    p = run_cli("report", "--head", "centroid", "--cache", tmp_path / "c", "--json", env=env, check=0)
    out = last_json(p)
    html = open(out["paths"]["html"]).read()
    assert "confusion" in html and "balanced_accuracy" in html and "data:image/png;base64," in html
    assert out["paths"]["gallery"] > 0 and html.count("data:image/jpeg;base64,") == out["paths"]["gallery"]
    assert "(image missing)" not in html  # root-relative index paths resolve from any working directory
    # captions: the path relative to the dataset and the part it was held out in; thumbnails open the image
    assert len(re.findall(r"<br>[ab]/img\d{4}\.png \[cv\]</figcaption>", html)) == out["paths"]["gallery"]
    links = re.findall(r'<a href="(file://[^"]+)"><img src="data:image/jpeg', html)
    assert len(links) == out["paths"]["gallery"] and all(os.path.isfile(unquote(u[7:])) for u in links)
    assert all(open(png, "rb").read(4) == b"\x89PNG" for png in out["paths"]["pngs"])


@pytest.mark.parametrize("kind,fix", [
    ("empty", "run `extract DATA` first"),
    ("unlabelled", "<class>"),
    ("one_class", "at least 2 class folders"),
    ("single_image", "add at least one more image"),
    ("typo", "valid heads: logreg"),
])
def test_bad_input_one_line_exit_1(tmp_path, env, kind, fix):
    c, d = tmp_path / "c", tmp_path / "d"
    if kind == "unlabelled":
        build_cache(c, d, ["x"], [6], unlabelled=True)
    elif kind == "one_class":
        build_cache(c, d, ["x"], [6])
    elif kind in ("single_image", "typo"):
        build_cache(c, d, ["x", "y"], [6, 1 if kind == "single_image" else 6])
    head = "logregg" if kind == "typo" else "logreg"
    p = run_cli("fit", "--head", head, "--cache", c, env=env, check=1)
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("Error: ") and fix in p.stderr


def test_fit_path_never_imports_torch(tmp_path, env):
    build_cache(tmp_path / "c", tmp_path / "d", ["a", "b"], [6, 6])
    code = (
        "import sys, cli, heads, heads.commands, heads.compare, heads.predict, heads.report, heads.store\n"
        f"assert cli.main(['fit', '--head', 'centroid', '--cache', {str(tmp_path / 'c')!r}]) == 0\n"
        f"assert cli.main(['compare', '--heads', 'knn', '--cache', {str(tmp_path / 'c')!r}]) == 0\n"
        "bad = [m for m in ('torch', 'torchvision', 'timm', 'featurize.extraction') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**__import__("os").environ, **env}, timeout=120)
    assert p.returncode == 0, p.stderr


def test_fit_head_list_describes_every_head(env):
    from heads.registry import list_heads

    p = run_cli("fit", "--head", "list", "--json", env=env, check=0)
    heads = last_json(p)["heads"]
    assert list(heads) == list_heads() and all(heads.values())
    assert all(line.split()[0] in heads for line in p.stdout.splitlines()[:-1])


def test_fit_on_a_folder_that_does_not_exist_says_so(tmp_path, env):
    build_cache(tmp_path / "c", tmp_path / "d", ["a", "b"], [6, 6])
    p = run_cli("fit", "--data", tmp_path / "typo", "--cache", tmp_path / "c", env=env, check=1)
    assert p.stderr.count("\n") == 1 and p.stderr.startswith(f"Error: no folder {tmp_path / 'typo'}")
    # a folder deleted after extraction still fits from the cache (its index stays)
    out = last_json(run_cli("fit", "--head", "centroid", "--data", tmp_path / "d", "--cache", tmp_path / "c",
                            "--json", env=env, check=0))
    assert out["metrics"]["cv"]["n"] == 12


def test_compare_across_backbones_extracts_what_is_missing_and_shows_the_cost(tmp_path, env, capsys, monkeypatch):
    """`compare --backbones` is how a backbone is chosen: a backbone not extracted yet is extracted
    first, every backbone x head is ranked with the embedding cost (img/s, seconds) beside the
    accuracy; a second run finds everything cached and embeds nothing, without importing torch."""
    from conftest import make_dataset

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    sys.path.insert(0, str(ROOT))
    import cli

    data = make_dataset(tmp_path / "d", classes=("a", "b"), per_class=8)
    args = ["compare", "--data", str(data), "--backbones", "tiny", "--heads", "centroid", "--cache",
            str(tmp_path / "c"), "--json"]
    assert cli.main(args) == 0  # in-process: this one builds the tiny model
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["extractions"][0]["backbone"] == "tiny" and out["extractions"][0]["embedded"] == 16
    row = out["rows"][0]
    assert row["backbone"] == "tiny" and row["head"] == "centroid" and row["embed_img_s"] > 0 and row["embed_s"] > 0
    with open(out["paths"]["csv"]) as f:
        assert float(next(csv.DictReader(f))["embed_img_s"]) == row["embed_img_s"]
    code = (
        "import sys, json, cli\n"
        f"assert cli.main({args!r}) == 0\n"
        "bad = [m for m in ('torch', 'torchvision', 'timm') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**__import__("os").environ, **env}, timeout=300)
    assert p.returncode == 0, p.stderr
    again = last_json(p)
    assert again["extractions"][0]["embedded"] == 0 and again["extractions"][0]["cached"] == 16
    assert again["rows"][0]["embed_img_s"] == row["embed_img_s"]
