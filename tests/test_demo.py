"""The README's first command ends in `cli.py demo`: the demo must run end to end (write the
digits, extract, fit). Run here with the `tiny` backbone; the CLI's Lite0 run is the same code."""

from __future__ import annotations

from featurize.workflow import demo


def test_demo_writes_extracts_and_fits(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEATURIZE_HOME", str(tmp_path / "home"))
    out = demo(tmp_path / "cache", tmp_path / "digits", head="centroid", progress=False, backbone="tiny")
    assert len(list((tmp_path / "digits").glob("*/*.png"))) == 1797
    assert out["extract"]["images"] == 1797 and out["extract"]["failed"] == 0
    assert out["fit"]["head"] == "centroid"
    assert out["fit"]["n_train"] == 1797
    assert "1,797 handwritten digits" in capsys.readouterr().out
