"""Every command option's bad values give one `Error:` line and exit 1, never a traceback or a
silent reinterpretation (issue 10, items 9 and 10). Runs ``cli.main`` in-process: the same
parsing and error handling as the console script, without a Python start-up per case."""

import os

import pytest

import cli
from cachebuild import build_cache, write_png
from featurize.options import cpu_cores, resolve_workers


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A cache with a fitted logreg head, an image not in the cache, and a plain file."""
    tmp = tmp_path_factory.mktemp("opts")
    os.environ["FEATURIZE_HOME"] = str(tmp / "home")
    build_cache(tmp / "c", tmp / "data", ["cat", "dog"], [12, 12], images=True)
    assert cli.main(["fit", "--cache", str(tmp / "c"), "--head", "centroid"]) == 0
    new = write_png(tmp / "new.png", seed=999)
    afile = tmp / "afile"
    afile.write_text("not a folder")
    return tmp, str(tmp / "c"), str(tmp / "data"), str(new), str(afile)


def _cases(tmp, c, data, new, afile):
    yield from (["fit", "--cache", c, "--folds", f] for f in ("1", "0", "-3"))
    yield ["compare", "--cache", c, "--folds", "1", "--heads", "logreg"]
    yield from (["fit", "--cache", c, "--n-jobs", n] for n in ("0", "-5"))
    yield from (["fit", "--cache", c, "--seed", s] for s in ("-1", str(2**32)))
    yield ["compare", "--cache", c, "--heads", "logreg", "--seed", "-1"]
    yield from (["predict", new, "--cache", c, "--head", "centroid", "--batch-size", b] for b in ("0", "-1"))
    yield from (["predict", new, "--cache", c, "--head", "centroid", "--top-k", k] for k in ("0", "-2"))
    yield ["extract", data, "--cache", afile, "--backbone", "tiny", "--no-progress"]
    yield ["extract", data, "--cache", afile + "/sub", "--backbone", "tiny", "--no-progress"]
    yield from ([cmd, "--cache", afile] for cmd in ("fit", "compare", "report"))
    yield ["predict", new, "--cache", afile]
    yield ["report", "--cache", c, "--head", "centroid", "--max-errors", "-1"]
    yield ["report", "--cache", c, "--head", "centroid", "--out", afile]
    yield ["fit", "--cache", c, "--out", afile + "/x.joblib"]
    yield ["fit", "--cache", c, "--out", str(tmp)]  # a folder where a file is wanted
    for opt, bad in (("--workers", "-1"), ("--batch-size", "0"), ("--engine", "bogus"), ("--device", "bogus"),
                     ("--precision", "bogus"), ("--weights", afile)):
        yield ["extract", data, "--cache", c, "--backbone", "tiny", "--no-progress", opt, bad]
    for opt, bad in (("--epochs", "0"), ("--lr", "-1"), ("--lr", "nan"), ("--warmup", "2"),
                     ("--val-fraction", "1.5"), ("--val-fraction", "0"), ("--max-train", "0"), ("--max-steps", "0"),
                     ("--patience", "-1"), ("--weight-decay", "-1"), ("--workers", "-1"), ("--batch-size", "0"),
                     ("--seed", "-1"), ("--unfreeze", "last:-1"), ("--out", afile)):
        yield ["finetune", "--cache", c, opt, bad]
    yield ["finetune", "--resume", afile]
    yield ["demo", "--out", afile, "--cache", str(tmp / "cdemo")]


def test_every_bad_option_is_one_error_line(world, capsys, monkeypatch):
    tmp = world[0]
    monkeypatch.chdir(tmp)  # finetune's default runs/ folder
    tried = 0
    for argv in _cases(*world):
        rc = cli.main(argv)  # any exception other than UserError propagates here: a traceback
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1, argv
        assert len(err) == 1 and err[0].startswith("Error: "), (argv, err)
        tried += 1
    assert tried >= 45
    assert not (tmp / "runs").exists()  # no finetune run was started by a bad option


def test_workers_capped_to_the_cores(world):
    assert resolve_workers(999) == cpu_cores()
    assert resolve_workers(None) == min(cpu_cores(), 8)
    assert resolve_workers(0) == 0
    tmp, c, data, _, _ = world
    from featurize.extraction import extract

    summary = extract(data, cache_dir=str(tmp / "cw"), backbone="tiny", workers=999, progress=False)
    assert summary["workers"] == cpu_cores() and summary["ok"] == 24
