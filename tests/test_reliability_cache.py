"""What the cache promises under faults (issue 10): the extract lock dies with its owner, every
cache file is validated on read, a full disk is one line and resumes, readers never race a
compaction. Real HDF5 files, real subprocesses, real SIGKILLs."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, make_dataset, run_cli
from featurize import cache as fc
from featurize.errors import UserError


def test_lock_dies_with_its_owner_not_with_its_decode_workers(tmp_path):
    """kill -9 of an extract whose decode workers are alive: the lock is free at once (the
    orphaned workers, which outlive it for a few seconds, do not hold it)."""
    data = make_dataset(tmp_path / "d", per_class=20)
    cache = tmp_path / "cache"
    env = {**os.environ, "FEATURIZE_FAULT": "shard_written", "FEATURIZE_SHARD_ROWS": "2"}
    # not run_cli: it would wait for the output pipes, which the orphaned workers hold open
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "extract", str(data), "--backbone", "tiny",
                             "--precision", "fp32", "--workers", "2", "--batch-size", "2", "--cache", str(cache),
                             "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert proc.wait(300) == -signal.SIGKILL
    with fc.CacheLock(fc.index_path(cache, data).with_suffix(".lock")):  # no wait, no "another extract"
        pass
    p = run_cli("extract", data, "--backbone", "tiny", "--precision", "fp32", "--cache", cache, "--json", check=0)
    assert json.loads(p.stdout.strip().splitlines()[-1])["ok"] == 40


FAST = dict(backbone="tiny", precision="fp32", workers=0, progress=False, batch_size=4)


@pytest.fixture
def extracted(tmp_path):
    from featurize.extraction import extract

    data = make_dataset(tmp_path / "d", per_class=5)
    cache = tmp_path / "cache"
    extract(data, cache, **FAST)
    extract(data, cache, **FAST)  # the second run records verified.json
    _, idx = fc.find_index(cache, data)
    return data, cache, fc.resolve_space(cache, idx)


@pytest.mark.parametrize("text", ["[]", "null", "{{{", '{"a.h5": "x"}'])
def test_verified_json_of_any_shape_is_repaired(extracted, text):
    from featurize.extraction import extract

    data, cache, space = extracted
    (space.folder / "verified.json").write_text(text)
    assert extract(data, cache, **FAST)["ok"] == 10
    assert isinstance(json.loads((space.folder / "verified.json").read_text()), dict)


@pytest.mark.parametrize("text", ["[]", "null", "garbage", '{"backbone": "tiny"}', '{"dim": "16"}'])
def test_damaged_space_json_is_named_then_repaired_by_extract(extracted, text, capsys):
    from featurize.extraction import extract

    data, cache, space = extracted
    (space.folder / "space.json").write_text(text)
    with pytest.raises(UserError, match="space.json is damaged"):
        fc.load_features(cache, fc.find_index(cache, data)[1], space)
    assert extract(data, cache, **FAST)["ok"] == 10
    assert "rewriting it" in capsys.readouterr().err
    assert space.info()["dim"] == 16 and len(fc.load_features(cache, fc.find_index(cache, data)[1], space)[0]) == 10


def test_an_edited_index_is_detected_and_rebuilt(extracted):
    """A changed content hash keeps the index valid HDF5; its checksum names it (fit used 9 of 10
    images silently before), and the next extract rebuilds it without re-embedding."""
    import h5py

    from featurize.extraction import extract

    data, cache, space = extracted
    ipath = fc.index_path(cache, data)
    with h5py.File(ipath, "r+") as f:
        h = f["hash"][()]
        h[0] = b"0" * 32
        f["hash"][...] = h
    with pytest.raises(UserError, match="is damaged .*checksum mismatch"):
        fc.find_index(cache, data)
    s = extract(data, cache, **FAST)
    assert (s["ok"], s["embedded"]) == (10, 0)
    assert len(fc.load_features(cache, fc.find_index(cache, data)[1], space)[0]) == 10


_WRITER = """
import sys, time, numpy as np
from featurize import cache as fc
space = fc.FeatureSpace(sys.argv[1], "race-000000000001")
k, end = 0, time.time() + float(sys.argv[2])
while time.time() < end:
    for _ in range(10):
        space.write_shard([f"{k:032x}"], np.full((1, 4), k, np.float32))
        k += 1
    space.compact()
print(k)
"""


def test_readers_never_race_a_compaction(tmp_path):
    """One process writes tiny shards and compacts them over and over; this one reads the space
    meanwhile. A reader used to open a shard the compaction had just deleted and call it damaged
    (1 load in 580 on real data; 1 in 25 here). Now it lists again: no error, no row lost."""
    import time

    space = fc.FeatureSpace(tmp_path, "race-000000000001")
    space.create({"backbone": "race"}, 4)
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), "4"], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    loads, end = 0, time.time() + 3.5
    while time.time() < end:
        hashes, emb = space.load()
        assert len(hashes) == len(emb) and np.all(emb[:, 0] == [int(h, 16) for h in hashes])
        assert len(space.known_hashes()) >= len(hashes)
        loads += 1
    written = int(writer.communicate(timeout=60)[0])
    assert loads > 20 and len(space.load()[0]) == written


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs (needs root and a kernel that lets it mount; skipped otherwise)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_is_one_line_keeps_finished_shards_and_resumes(small_disk, tmp_path):
    data = make_dataset(tmp_path / "d", per_class=60)
    cache = small_disk / "cache"
    filler = small_disk / "filler"
    subprocess.run(["fallocate", "-l", f"{3072 - 100}k", str(filler)], check=True)
    (cache / "datasets").mkdir(parents=True)
    dead = cache / "datasets" / ".d-00000000.h5.tmp-999999"  # an index a dead writer left (pid 999999)
    dead.write_bytes(b"x")
    args = ("extract", data, "--backbone", "tiny", "--workers", "0", "--cache", cache, "--no-progress")
    p = run_cli(*args, env={"FEATURIZE_SHARD_ROWS": "8"})
    assert p.returncode == 1, p.stderr
    assert p.stderr.startswith("Error: no space left on device on the disk of") and len(p.stderr.splitlines()) == 1
    assert not dead.exists()
    kept = list(cache.glob("features/*/*.h5"))
    assert kept and not list(cache.rglob(".*tmp*"))  # finished shards kept, no half-written file
    filler.unlink()
    s = json.loads(run_cli(*args, "--json", check=0).stdout.strip().splitlines()[-1])
    assert s["ok"] == 120 and s["embedded"] < 120  # resumed: the kept shards were not embedded again


def _file_size_limit(nbytes: int):
    """For a child process: writes past ``nbytes`` fail with EFBIG (SIGXFSZ ignored, as ``ulimit -f`` in a
    shell that traps it), the full-disk fault any machine can give an unprivileged process."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return limit


def test_file_size_limit_is_one_line_keeps_finished_shards_and_resumes(tmp_path):
    """The full-disk test where no tmpfs can be mounted: ``ulimit -f`` at 42 KB. The index (16 images)
    and the new shard fit, the merge with the space's 600 rows (66 KB) does not. It was pages of h5py
    tracebacks and a segfault; now one line naming the limit, the new shards kept, and the next run
    (without the limit) embeds nothing again."""
    from featurize.extraction import extract
    from featurize.pipeline import build_extractor

    cache = tmp_path / "cache"
    space = build_extractor(cache, "tiny", precision="fp32", engine="torch").space
    space.write_shard([f"{k:032x}" for k in range(600)], np.zeros((600, 16), np.float32))  # other folders' rows
    data = make_dataset(tmp_path / "d", per_class=8)
    p = subprocess.run([sys.executable, str(ROOT / "cli.py"), "extract", str(data), "--backbone", "tiny", "--precision",
                        "fp32", "--engine", "torch", "--workers", "0", "--cache", str(cache), "--no-progress"],
                       preexec_fn=_file_size_limit(42 << 10),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr
    assert p.stderr.startswith(f"Error: a cache file in {cache} would exceed this process's file size limit "
                               "(ulimit -f: 42 KB); raise it (ulimit -f unlimited), then re-run") \
        and len(p.stderr.splitlines()) == 1, p.stderr
    assert len(list(space.folder.glob("*.h5"))) >= 2 and not list(cache.rglob(".*tmp*"))  # not merged, no half file
    assert len(space.load()[0]) == 616  # the 16 new rows are kept
    s = extract(data, cache, backbone="tiny", precision="fp32", engine="torch", workers=0, progress=False)
    assert (s["ok"], s["embedded"]) == (16, 0) and len(list(space.folder.glob("*.h5"))) == 1  # resumed, merged


def test_engines_never_mix_in_one_feature_space(tmp_path):
    """After OpenVINO failed (disk full) a run fell back to PyTorch into the same space: 1,244
    vectors from one engine, 1,280 from the other. The first writer now records its engine and
    a run with another engine is refused, naming both; the recorded engine keeps working."""
    from featurize.extraction import extract

    cache = tmp_path / "cache"
    extract(make_dataset(tmp_path / "a", per_class=3), cache, **{**FAST, "engine": "torch"})
    _, idx = fc.find_index(cache, tmp_path / "a")
    space = fc.resolve_space(cache, idx)
    assert space.held_engine() == "torch"
    (space.folder / "engine.json").write_text(json.dumps({"engine": "openvino"}))  # as if OpenVINO wrote it
    with pytest.raises(UserError, match="holds vectors from the openvino engine and this run would add vectors "
                                        "from torch.*--engine openvino"):
        extract(make_dataset(tmp_path / "b", per_class=3, seed=50), cache, **{**FAST, "engine": "torch"})
    assert len(space.load()[0]) == 6  # nothing was added
    (space.folder / "engine.json").write_text(json.dumps({"engine": "torch"}))
    assert extract(tmp_path / "b", cache, **{**FAST, "engine": "torch"})["ok"] == 6
