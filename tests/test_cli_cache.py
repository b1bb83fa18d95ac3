"""`cache`: what a cache holds, read from real HDF5 files and head sidecars, without torch."""

import os
import re
import subprocess
import sys

from cachebuild import add_space, build_cache
from conftest import ROOT, last_json, run_cli


def test_cache_lists_datasets_spaces_heads_and_sizes(tmp_path):
    env = {"FEATURIZE_HOME": str(tmp_path / "home")}
    c, d = tmp_path / "c", tmp_path / "d"
    build_cache(c, d, ["a", "b"], [7, 5])
    add_space(c, d, "other", "other-000000000002")
    fit = last_json(run_cli("fit", "--head", "centroid", "--cache", c, "--json", env=env, check=0))
    out = last_json(run_cli("cache", "--cache", c, "--json", env=env, check=0))

    [ds] = out["datasets"]
    assert ds["root"] == str(d) and (ds["images"], ds["ok"], ds["failed"], ds["classes"]) == (12, 12, 0, 2)
    assert set(ds["extractions"]) == {"tiny-000000000001", "other-000000000002"}
    spaces = {s["space_id"]: s for s in out["spaces"]}
    assert {k: (s["dim"], s["vectors"], s["shards"]) for k, s in spaces.items()} == \
        {"tiny-000000000001": (16, 12, 1), "other-000000000002": (12, 12, 1)}
    assert all(s["datasets"] == [str(d)] and s["bytes"] > 0 for s in spaces.values())
    [head] = out["heads"]
    assert head["path"] == fit["paths"]["model"] and head["space_id"] == fit["space_id"]
    assert head["scored_on"] == "cv" and head["accuracy"] == fit["metrics"]["cv"]["mean"]["accuracy"]
    on_disk = sum(p.stat().st_size for p in c.rglob("*") if p.is_file())
    assert out["bytes"] == on_disk

    # A damaged shard is counted as unreadable, not fatal; its vectors are not counted.
    [shard] = (c / "features" / "other-000000000002").glob("*.h5")
    shard.write_bytes(b"not hdf5")
    p = run_cli("cache", "--cache", c, "--json", env=env, check=0)
    other = {s["space_id"]: s for s in last_json(p)["spaces"]}["other-000000000002"]
    assert (other["vectors"], other["unreadable_shards"]) == (0, 1) and "1 unreadable" in p.stdout


def test_cache_says_which_dataset_is_the_default(tmp_path):
    c = tmp_path / "c"
    build_cache(c, tmp_path / "older", ["a", "b"], [3, 3])
    build_cache(c, tmp_path / "newer", ["a", "b"], [3, 3])  # extracted last: what --data defaults to
    p = run_cli("cache", "--cache", c, "--json", check=0)
    out = last_json(p)
    assert out["default_dataset"] == str(tmp_path / "newer")
    assert [(d["root"], d["default"]) for d in out["datasets"]] == [(str(tmp_path / "newer"), True),
                                                                      (str(tmp_path / "older"), False)]
    [line] = [x for x in p.stdout.splitlines() if "[default" in x]
    assert line.strip().startswith(str(tmp_path / "newer"))
    assert run_cli("--version", check=0).stdout.startswith("featurize 0.")


def test_cache_empty_and_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    p = run_cli("cache", "--cache", tmp_path / "empty", check=0)
    assert "nothing cached yet" in p.stdout
    p = run_cli("cache", "--cache", tmp_path / "nope", check=1)
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("Error: no cache at") and "--cache" in p.stderr
    (tmp_path / "photos" / "cat").mkdir(parents=True)  # an image folder given by mistake
    p = run_cli("cache", "--cache", tmp_path / "photos", check=1)
    assert p.stderr.count("\n") == 1 and "is not a featurize cache" in p.stderr


def test_cache_command_never_imports_torch(tmp_path):
    build_cache(tmp_path / "c", tmp_path / "d", ["a", "b"], [4, 4])
    code = (
        "import sys, cli\n"
        f"assert cli.main(['cache', '--cache', {str(tmp_path / 'c')!r}]) == 0\n"
        "bad = [m for m in ('torch', 'torchvision', 'timm', 'sklearn') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "FEATURIZE_HOME": str(tmp_path / "home")}, timeout=120)
    assert p.returncode == 0, p.stderr


def test_cache_names_an_extraction_whose_space_was_deleted(tmp_path):
    import shutil

    c, d = tmp_path / "c", tmp_path / "d"
    build_cache(c, d, ["a", "b"], [4, 4])
    add_space(c, d, "other", "other-000000000002")
    shutil.rmtree(c / "features" / "other-000000000002")
    p = run_cli("cache", "--cache", c, check=0)
    gone = [line for line in p.stdout.splitlines() if "feature space is gone" in line]
    assert len(gone) == 1 and "other-000000000002" in gone[0]


def test_help_shows_real_defaults_once():
    sys.path.insert(0, str(ROOT))
    import cli

    parser = cli.build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    assert {"extract", "cache", "fit", "compare", "predict", "report", "finetune", "demo"} <= set(subs)
    for name, sub in subs.items():
        text = " ".join(sub.format_help().split())
        assert "(default: None)" not in text and not re.search(r"default[^)]*\) \(default:", text), name
    ft = " ".join(subs["finetune"].format_help().split())
    assert "(default: 5)" in ft and "(default: 0.0001)" in ft and "(default: runs/ft-NNN)" in ft


def test_cache_scores_heads_by_the_same_rule_as_compare():
    from featurize.inventory import _held_out_accuracy
    from heads.protocol import primary

    cv = {"cv": {"mean": {"accuracy": 0.7}, "std": {"accuracy": 0.1}}}
    val = {"val": {"accuracy": 0.8}}
    test = {"test": {"accuracy": 0.9}}
    for metrics in (cv, val, test, {**cv, **val}, {**val, **test}, {**cv, **val, **test}):
        part, scalars = primary(metrics)
        assert _held_out_accuracy(metrics) == (part, scalars["accuracy"]), metrics


def test_cache_lists_the_converted_engines_of_its_spaces(tmp_path):
    # Engines are kept in the per-user engine store, not in the cache: `cache` lists the store's
    # engines of the cache's own spaces (it listed a cache/engines/ folder nothing writes any more).
    from conftest import make_dataset

    store = tmp_path / "store"
    env = {"FEATURIZE_ENGINES": str(store), "FEATURIZE_HOME": str(tmp_path / "home")}
    data = make_dataset(tmp_path / "d", per_class=2)
    ex = last_json(run_cli("extract", data, "--cache", tmp_path / "c", "--backbone", "tiny", "--engine", "openvino",
                           "--precision", "fp32", "--workers", "0", "--json", env=env, check=0))
    other = tmp_path / "c2"
    # another space (bf16, PyTorch): the store's fp32 engine is not its engine
    run_cli("extract", data, "--cache", other, "--backbone", "tiny", "--engine", "torch", "--precision", "bf16",
            "--workers", "0", "--json", env=env, check=0)
    p = run_cli("cache", "--cache", tmp_path / "c", "--json", env=env, check=0)
    [engine] = last_json(p)["engines"]
    assert engine["space_id"] == ex["space_id"] and engine["bytes"] > 0
    assert engine["path"].startswith(str(store / ex["space_id"])) and (store / engine["path"]).is_dir()
    assert f"converted engines (1, in the engine store {store}" in p.stdout
    assert last_json(run_cli("cache", "--cache", other, "--json", env=env, check=0))["engines"] == []
