"""Extraction end to end with the tiny backbone: incremental runs, bad input, crash safety."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import ROOT, last_json, make_dataset, make_image, run_cli
from featurize import cache as fc
from featurize.errors import UserError
from featurize.extraction import extract, format_summary

FAST = dict(backbone="tiny", precision="fp32", workers=0, progress=False, batch_size=4)


def features(cache, data):
    _, idx = fc.find_index(cache, data)
    space = fc.resolve_space(cache, idx)
    X, labels, splits, paths = fc.load_features(cache, idx, space)
    return dict(zip(paths, X)), idx, space


def test_first_run_embeds_everything_and_rerun_nothing(dataset, cache):
    s1 = extract(dataset, cache, **FAST)
    assert (s1["images"], s1["embedded"], s1["ok"], s1["failed"], s1["classes"]) == (8, 8, 8, 0, 2)
    s2 = extract(dataset, cache, **FAST)
    assert (s2["embedded"], s2["hashed"], s2["cached"], s2["ok"]) == (0, 0, 8, 8)
    vecs, idx, space = features(cache, dataset)
    assert len(vecs) == 8 and all(v.shape == (16,) for v in vecs.values())
    assert idx.classes == ["cat", "dog"] and space.info()["dim"] == 16


def test_duplicate_files_are_embedded_once_and_counted_apart(dataset, cache):
    import shutil as sh

    sh.copy(dataset / "cat" / "0.jpg", dataset / "dog" / "copy-of-cat0.jpg")
    s = extract(dataset, cache, **FAST)
    assert (s["ok"], s["embedded"], s["duplicates"], s["cached"]) == (9, 8, 1, 0)
    vecs, _, _ = features(cache, dataset)
    np.testing.assert_array_equal(vecs["dog/copy-of-cat0.jpg"], vecs["cat/0.jpg"])
    # the same bytes under two labels is a labelling problem: named in the summary
    assert s["label_conflicts"] == [["cat/0.jpg", "dog/copy-of-cat0.jpg"]] and s["split_overlaps"] == []
    assert "warning: 1 images have the same bytes under different labels" in format_summary(s)


def test_same_bytes_in_train_and_test_is_reported(tmp_path, cache):
    import shutil as sh

    root = make_dataset(tmp_path / "d", split=["train", "test"])
    sh.copy(root / "train" / "cat" / "1.jpg", root / "test" / "cat" / "leak.jpg")
    s = extract(root, cache, **FAST)
    assert s["split_overlaps"] == [["test/cat/leak.jpg", "train/cat/1.jpg"]] and s["label_conflicts"] == []
    assert "1 images are in more than one split" in format_summary(s)


def test_new_edited_renamed_and_deleted_files(dataset, cache):
    extract(dataset, cache, **FAST)
    before, _, _ = features(cache, dataset)
    make_image(dataset / "cat" / "new.jpg", seed=1000)                     # new
    make_image(dataset / "dog" / "0.jpg", seed=2000)                       # edited in place
    os.rename(dataset / "cat" / "1.jpg", dataset / "cat" / "renamed.jpg")  # renamed
    os.remove(dataset / "dog" / "3.jpg")                                   # deleted
    s = extract(dataset, cache, **FAST)
    assert s["embedded"] == 2  # only the new and the edited file
    assert s["images"] == 8
    after, idx, _ = features(cache, dataset)
    assert "dog/3.jpg" not in idx.path and "cat/1.jpg" not in idx.path
    np.testing.assert_array_equal(after["cat/renamed.jpg"], before["cat/1.jpg"])
    assert not np.allclose(after["dog/0.jpg"], before["dog/0.jpg"])


def test_unchanged_files_are_not_read_again(dataset, cache):
    extract(dataset, cache, **FAST)
    # Same size and mtime but different bytes: recognised as unchanged without reading/decoding.
    p = dataset / "cat" / "0.jpg"
    st = p.stat()
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF
    p.write_bytes(bytes(data))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    s = extract(dataset, cache, **FAST)
    assert (s["hashed"], s["embedded"]) == (0, 0)


def test_two_backbones_coexist_for_one_dataset(dataset, cache):
    a = extract(dataset, cache, **FAST)
    b = extract(dataset, cache, **{**FAST, "precision": "bf16"})
    assert a["space_id"] != b["space_id"]  # precision is part of the feature space
    _, idx = fc.find_index(cache, dataset)
    assert set(idx.extractions) == {a["space_id"], b["space_id"]}
    assert fc.resolve_space(cache, idx, a["space_id"]).space_id == a["space_id"]


def test_bad_inputs_are_recorded_and_skipped(dataset, cache):
    import io

    from PIL import Image

    (dataset / "cat" / "empty.jpg").write_bytes(b"")
    (dataset / "cat" / "text.png").write_bytes(b"not an image at all")
    good = (dataset / "cat" / "0.jpg").read_bytes()
    (dataset / "dog" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")
    (dataset / "dog" / "bomb.png").write_bytes(buf.getvalue())
    os.symlink(dataset / "gone.jpg", dataset / "dog" / "broken.jpg")
    unreadable = dataset / "cat" / "secret.jpg"
    make_image(unreadable, seed=77)
    unreadable.chmod(0)
    (dataset / "notes.txt").write_text("not an image: ignored, not an error")
    s = extract(dataset, cache, **FAST)
    reasons = {e["path"]: e["reason"] for e in s["errors"]}
    as_root = os.geteuid() == 0  # root reads a chmod 0 file: then it is simply ok
    assert s["ok"] == 8 + as_root and s["ignored_files"] == 1
    assert "empty" in reasons["cat/empty.jpg"] and "not an image" in reasons["cat/text.png"]
    assert "truncated" in reasons["dog/truncated.jpg"] and "decompression bomb" in reasons["dog/bomb.png"]
    assert "broken symlink" in reasons["dog/broken.jpg"]
    if not as_root:
        assert "unreadable" in reasons["cat/secret.jpg"]
    assert s["failed"] == len(reasons)
    s2 = extract(dataset, cache, **FAST)  # failures are remembered, not retried
    assert s2["embedded"] == 0 and s2["failed"] == s["failed"]


def test_split_layout_is_recorded(tmp_path, cache):
    root = make_dataset(tmp_path / "d", per_class=2, split=["train", "val", "test"])
    s = extract(root, cache, **FAST)
    assert s["layout"] == "split"
    _, idx = fc.find_index(cache, root)
    assert sorted(set(idx.split)) == ["test", "train", "val"]
    assert idx.label[idx.path.index("val/dog/1.jpg")] == "dog"
    # per-split counts in the summary and its text (a broken file counts as not ok in its split)
    assert s["splits"] == {"train": {"images": 4, "ok": 4}, "val": {"images": 4, "ok": 4},
                           "test": {"images": 4, "ok": 4}}
    (root / "test" / "cat" / "bad.jpg").write_bytes(b"not a jpeg")
    s = extract(root, cache, **FAST)
    assert s["splits"]["test"] == {"images": 5, "ok": 4}
    assert "splits: train 4, val 4, test 4 (1 not ok) images" in format_summary(s).splitlines()[1]


def test_flat_folder_is_unlabelled(tmp_path, cache):
    for i in range(3):
        make_image(tmp_path / "flat" / f"{i}.png", seed=i)
    s = extract(tmp_path / "flat", cache, **FAST)
    assert s["layout"] == "flat" and s["classes"] == 0 and s["ok"] == 3


def test_cli_extract_json_and_errors(dataset, cache, tmp_path):
    p = run_cli("extract", dataset, "--backbone", "tiny", "--cache", cache, "--json", check=0)
    out = last_json(p)
    assert out["embedded"] == 8 and Path(out["index_file"]).is_file()
    assert set(out["seconds"]) >= {"scan", "decode", "model", "write"}
    for args, msg in [
        (["extract", tmp_path / "missing"], "does not exist"),
        (["extract", tmp_path], "no images"),
        (["extract", dataset, "--backbone", "resnet5"], "unknown backbone 'resnet5'; did you mean 'resnet50'? valid: "),
        (["extract", dataset, "--backbone", "tiny", "--precision", "fp8"], "unknown precision"),
        (["extract", dataset, "--backbone", "tiny", "--device", "cuda:0" if not _has_cuda() else "nope"], "device"),
    ]:
        (tmp_path / "emptydir").mkdir(exist_ok=True)
        if args[1] == tmp_path:
            args[1] = tmp_path / "emptydir"
        p = run_cli(*args, "--cache", cache)
        assert p.returncode == 1, p.stderr
        err = p.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("Error: ") and msg in err[0], p.stderr


def _has_cuda():
    import torch

    return torch.cuda.is_available()


def test_backbones_command_lists_registry():
    p = run_cli("backbones", "--json", check=0)
    rows = {r["name"]: r for r in last_json(p)["backbones"]}
    assert {"efficientnet_lite0", "resnet18", "resnet50", "vgg16", "efficientnet_b0", "mobilenet_v3_large",
            "convnext_tiny", "vit_b_16", "tiny"} <= set(rows)
    assert rows["efficientnet_lite0"]["offline"] and rows["efficientnet_lite0"]["dim"] == 1280


def test_concurrent_extract_gets_clear_message(dataset, cache):
    extract(dataset, cache, **FAST)
    lock = fc.index_path(cache, dataset).with_suffix(".lock")
    with fc.CacheLock(lock):  # another process holds the dataset
        p = run_cli("extract", dataset, "--backbone", "tiny", "--cache", cache)
    assert p.returncode == 1 and "another extract" in p.stderr and "--wait" in p.stderr


def test_two_real_concurrent_extracts_never_corrupt(tmp_path, cache):
    data = make_dataset(tmp_path / "d", per_class=30)
    args = [sys.executable, str(ROOT / "cli.py"), "extract", str(data), "--backbone", "tiny", "--cache", str(cache),
            "--precision", "fp32", "--no-progress"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(120), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) in ([0, 0], [0, 1])  # one may be told to wait
    for rc, err in results:
        assert rc == 0 or "another extract" in err
    vecs, _, _ = features(cache, data)
    assert len(vecs) == 60


def test_damaged_files_are_detected_and_repaired(dataset, cache):
    s = extract(dataset, cache, **FAST)
    shard = next(Path(s["features_dir"]).glob("*.h5"))
    with h5py.File(shard, "r") as f:
        offset = f["emb"].id.get_offset()
    with open(shard, "r+b") as fh:  # flip bytes inside the stored vectors (bit rot)
        fh.seek(offset + 8)
        fh.write(b"\xff" * 16)
    with pytest.raises(UserError, match="damaged.*re-run `extract`"):
        features(cache, dataset)
    p = run_cli("extract", dataset, "--backbone", "tiny", "--precision", "fp32", "--cache", cache, "--json", check=0)
    assert "damaged" in p.stderr and last_json(p)["embedded"] == 8
    assert len(features(cache, dataset)[0]) == 8
    # a damaged index is derived data: extract rebuilds it without re-embedding
    ipath = fc.index_path(cache, dataset)
    ipath.write_bytes(b"garbage")
    with pytest.raises(UserError, match="damaged"):
        fc.read_index(ipath)
    p = run_cli("extract", dataset, "--backbone", "tiny", "--precision", "fp32", "--cache", cache, "--json", check=0)
    assert last_json(p)["embedded"] == 0 and last_json(p)["ok"] == 8


# --------------------------------------------------------------------------- kill -9


def _shard_rows(space_dir: Path) -> int:
    n = 0
    for p in space_dir.glob("*.h5"):
        with h5py.File(p, "r") as f:
            n += len(f["hash"])
    return n


def _unique_hashes(space_dir: Path) -> int:
    seen = set()
    for p in space_dir.glob("*.h5"):
        with h5py.File(p, "r") as f:
            seen.update(f["hash"][()].tolist())
    return len(seen)


@pytest.fixture(scope="module")
def crash_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    data = make_dataset(root / "data", classes=("a", "b", "c"), per_class=20)
    clean = root / "clean"
    extract(data, clean, **FAST)
    return data, features(clean, data)[0]


@pytest.mark.parametrize("fault", ["index_tmp_written", "index_written", "shard_tmp_written:2", "shard_written:3",
                                   "index_written:2", "compact_merged", "shard_tmp_written:6"])
def test_kill9_at_every_write_point_then_resume_matches_clean_run(crash_data, tmp_path, fault):
    data, clean = crash_data
    cache = tmp_path / "cache"
    env = {"FEATURIZE_FAULT": fault, "FEATURIZE_SHARD_ROWS": "8"}
    p = run_cli("extract", data, "--backbone", "tiny", "--precision", "fp32", "--workers", "0", "--batch-size", "4",
                "--cache", cache, env=env)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr)
    p = run_cli("extract", data, "--backbone", "tiny", "--precision", "fp32", "--cache", cache, "--json", check=0)
    resumed, idx, space = features(cache, data)
    assert sorted(resumed) == sorted(clean)  # none lost
    for k in clean:
        np.testing.assert_allclose(resumed[k], clean[k], rtol=1e-5, atol=1e-6)
    assert _shard_rows(space.folder) == 60  # none duplicated on disk
    assert not list(space.folder.glob(".*tmp*")) and all(s == "ok" for s in idx.status)


def test_kill9_at_random_times_loses_little(crash_data, tmp_path):
    data, clean = crash_data
    cache = tmp_path / "cache"
    for delay in (1.0, 2.5, 4.0):
        proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "extract", str(data), "--backbone", "tiny",
                                 "--precision", "fp32", "--workers", "0", "--batch-size", "2", "--cache", str(cache),
                                 "--no-progress"], env={**os.environ, "FEATURIZE_SHARD_ROWS": "4"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.kill()
        proc.wait()
    run_cli("extract", data, "--backbone", "tiny", "--precision", "fp32", "--cache", cache, check=0)
    resumed, _, space = features(cache, data)
    assert sorted(resumed) == sorted(clean) and _shard_rows(space.folder) == 60


def test_ctrl_c_saves_work_and_exits_with_one_line(tmp_path):
    n = 600  # enough that a quiet machine is still embedding when the signal lands
    data = make_dataset(tmp_path / "d", per_class=n // 2, classes=("a", "b"))
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "extract", str(data), "--backbone", "tiny",
                             "--precision", "fp32", "--workers", "1", "--batch-size", "2", "--cache", str(cache),
                             "--no-progress"], env={**os.environ, "FEATURIZE_SHARD_ROWS": "4"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    features_dir = None
    while time.time() < deadline:  # wait until embedding has started
        dirs = list((cache / "features").glob("*")) if (cache / "features").exists() else []
        if dirs and list(dirs[0].glob("*.h5")):
            features_dir = dirs[0]
            break
        time.sleep(0.05)
    assert features_dir is not None
    if proc.poll() is not None:
        pytest.skip("extract finished before it could be interrupted")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    said = [ln for ln in lines if ln.startswith("Interrupted")]
    assert len(said) == 1 and said[0].startswith("Interrupted: ") and "re-run" in said[0], err
    assert "Traceback" not in err, err
    # Ctrl-C landing just after a shard's rename makes the final flush write those rows again:
    # a harmless duplicate (reads keep the first copy, compaction drops it), so count hashes.
    saved = _unique_hashes(features_dir)
    assert 0 < saved < n
    p = run_cli("extract", data, "--backbone", "tiny", "--precision", "fp32", "--cache", cache, "--json", check=0)
    assert last_json(p)["embedded"] == n - saved and last_json(p)["ok"] == n
    shutil.rmtree(cache)


def test_rerun_with_nothing_new_never_imports_torch(dataset, cache):
    code = ("import sys; from featurize.extraction import extract; "
            "s = extract(sys.argv[1], sys.argv[2], backbone='tiny', precision='fp32', workers=0, progress=False); "
            "print(s['embedded'], s['ok'], s['space_id'], 'torch' in sys.modules, 'ray' in sys.modules)")

    def run(folder=dataset):
        out = subprocess.run([sys.executable, "-c", code, str(folder), str(cache)], capture_output=True, text=True,
                             cwd=ROOT, check=True).stdout.split()
        assert out[4] == "False"  # Ray is imported only by --ray
        return int(out[0]), int(out[1]), out[2], out[3] == "True"

    first = run()
    assert first[0] == 8 and first[3]  # had work: built the model
    again = run()
    assert again == (0, 8, first[2], False)  # same space, no model, no torch
    # a new folder holding images another folder already embedded: known from that folder's runs
    copy = dataset.parent / "copy"
    shutil.copytree(dataset / "cat", copy / "cat")
    assert run(copy) == (0, 4, first[2], False)
    make_image(dataset / "cat" / "extra.jpg", seed=4242)
    assert run()[:2] == (1, 9)


def test_ctrl_c_while_loading_the_model_says_so(dataset, cache):
    """Ctrl-C during the 2-5 s of importing torch and building the backbone: one line, exit 130."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "extract", str(dataset), "--backbone", "tiny",
                             "--cache", str(cache), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 30
    while time.time() < deadline and not list((cache / "datasets").glob("*.lock")):
        time.sleep(0.01)  # the lock is taken before hashing; the model load follows within milliseconds
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines() == [
        "Interrupted while loading the model, before any image was embedded; re-run the same command."], err
    assert not list((cache / "features").glob("*/*.h5"))
