"""The extraction driver's result object, the shared reader -> model -> writer stage, and the
package's ``extract`` name (the function, not a module)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from conftest import ROOT, make_dataset
from featurize import cache as fc
from featurize.extraction import STAGES, Extraction, Request, extract, extract_folder

TINY = Request(backbone="tiny", precision="fp32", workers=0, progress=False, batch_size=4)

#: ``extract --json``'s keys, in order, as before the driver returned an object
SUMMARY_KEYS = [
    "dataset", "layout", "backbone", "space_id", "dim", "device", "precision", "engine", "images", "classes",
    "ignored_files", "workers", "splits", "hashed", "embedded", "cached", "duplicates", "n_label_conflicts",
    "label_conflicts", "n_split_overlaps", "split_overlaps", "ok", "failed", "pending", "errors", "warnings", "warned", "seconds",
    "wall_seconds", "decode_cpu_seconds", "images_per_second", "index_file", "features_dir", "interrupted"]


def test_result_fields_are_the_json_summary(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=2, split=["train", "val"])
    (data / "val" / "cat" / "bad.jpg").write_bytes(b"not an image")
    r = extract_folder(data, tmp_path / "c", TINY)
    d = r.to_dict()
    assert list(d) == SUMMARY_KEYS and json.loads(json.dumps(d)) == d and r.summary == d
    assert all(getattr(r, k) == v for k, v in d.items())
    assert (r.images, r.ok, r.failed, r.embedded) == (9, 8, 1, 8)
    assert r.splits == {"train": {"images": 4, "ok": 4}, "val": {"images": 5, "ok": 4}}
    assert r.errors[0]["path"] == "val/cat/bad.jpg" and list(r.seconds) == list(STAGES)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.embedded = 0
    # the dict door gives the same summary (a re-run: nothing new, so only the counts that move differ)
    again = extract(data, tmp_path / "c", backbone="tiny", precision="fp32", workers=0, progress=False)
    assert list(again) == SUMMARY_KEYS and (again["embedded"], again["cached"], again["ok"]) == (0, 8, 8)


def test_process_time_is_a_new_result(tmp_path):
    r = extract_folder(make_dataset(tmp_path / "d", per_class=1), tmp_path / "c", TINY)
    before = dict(r.seconds)
    p = r.with_process_time(0.25)
    assert r.seconds == before and "import" not in r.seconds and r.process_seconds is None  # r unchanged
    assert "process_seconds" not in r.to_dict()
    assert p.seconds["import"] == 0.25 and list(p.to_dict())[-1] == "process_seconds"
    assert abs(sum(p.seconds.values()) - p.process_seconds) < 0.02


def test_stages_embed_returns_its_timings_and_failures(tmp_path):
    from featurize.pipeline import build_extractor
    from featurize.stages import Embedded, embed

    data = make_dataset(tmp_path / "d", per_class=2)
    bad = data / "cat" / "bad.jpg"
    bad.write_bytes(b"not an image")
    paths = sorted(str(p) for p in data.rglob("*.jpg"))
    todo = [(fc.content_hash(p), p) for p in paths]
    ex = build_extractor(tmp_path / "c", "tiny", precision="fp32")
    done = embed(ex, todo, 2, 0)
    assert isinstance(done, Embedded) and (done.written, done.interrupted) == (4, False)
    assert list(done.failed) == [fc.content_hash(bad)] and "not an image" in done.failed[fc.content_hash(bad)]
    assert {"load_model", "decode", "model", "write"} <= set(done.seconds)
    assert all(v >= 0 for v in done.seconds.values())
    assert len(ex.space.vectors_for({p: h for h, p in todo if p != str(bad)})) == 4


def test_featurize_extract_is_the_api_function():
    code = ("import types, featurize, featurize.extraction, featurize.api\n"
            "assert featurize.extract is featurize.api.extract, featurize.extract\n"
            "assert isinstance(featurize.extract, types.FunctionType)\n"
            "assert not hasattr(featurize, 'CallableModule')\n"
            "assert featurize.Extraction is featurize.extraction.Extraction\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert Extraction.__dataclass_params__.frozen
