"""Feature-space shards: streaming compaction and the verified-shard memo (real HDF5 files)."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

from featurize import cache as fc
from featurize.errors import UserError


def _space(tmp_path, dim=5):
    space = fc.FeatureSpace(tmp_path, "test-space")
    space.create({"backbone": "none"}, dim)
    return space


def _hashes(*ids):
    return [f"{i:032x}" for i in ids]


def _flip_vector_bytes(path):
    with h5py.File(path, "r") as f:
        offset = f["emb"].id.get_offset()
    with open(path, "r+b") as fh:  # bit rot inside the stored vectors
        fh.seek(offset + 4)
        fh.write(b"\xff" * 8)


def test_streaming_compaction_keeps_first_copy_of_each_hash(tmp_path, monkeypatch):
    monkeypatch.setattr(fc.FeatureSpace, "_CHUNK_ROWS", 3)  # several chunks per shard
    space = _space(tmp_path)
    rng = np.random.default_rng(0)
    rows = {}
    for ids in [(1, 2, 3, 4, 5, 6, 7), (8, 3, 9), (10, 11, 12, 13, 1, 14, 15, 16)]:  # 3 and 1 repeat
        emb = rng.normal(size=(len(ids), 5)).astype(np.float32)
        space.write_shard(_hashes(*ids), emb)
        for h, e in zip(_hashes(*ids), emb):
            rows.setdefault(h, e)  # the first written copy wins, as in load()
    before_h, before_e = space.load()
    assert space.compact(max_shards=1)
    assert len(space.shard_paths()) == 1
    after_h, after_e = space.load()  # load() checks the merged shard's CRC
    assert after_h.tolist() == before_h.tolist() and len(after_h) == 16
    np.testing.assert_array_equal(after_e, before_e)
    for h, e in zip(after_h.tolist(), after_e):
        np.testing.assert_array_equal(e, rows[h.decode()])


def test_compaction_refuses_a_damaged_source_and_keeps_the_originals(tmp_path, monkeypatch):
    monkeypatch.setattr(fc.FeatureSpace, "_CHUNK_ROWS", 2)
    space = _space(tmp_path)
    a = space.write_shard(_hashes(1, 2, 3), np.ones((3, 5), np.float32))
    space.write_shard(_hashes(4, 5), np.zeros((2, 5), np.float32))
    _flip_vector_bytes(a)
    with pytest.raises(UserError, match="damaged"):
        space.compact(max_shards=1)
    assert len(space.shard_paths()) == 2 and not list(space.folder.glob(".*tmp*"))


def test_quarantine_reads_a_shard_once_and_catches_later_damage(tmp_path):
    space = _space(tmp_path)
    good = space.write_shard(_hashes(1, 2), np.ones((2, 5), np.float32))
    assert space.quarantine_damaged() == []
    memo = json.loads((space.folder / "verified.json").read_text())
    assert list(memo) == [good.name]

    # Damage after verification: the memo (same size, same mtime) skips the check...
    st = good.stat()
    _flip_vector_bytes(good)
    os.utime(good, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert space.quarantine_damaged() == []
    # ...but every full read checks the CRC, and forgets the shard, so the next extract moves it aside.
    with pytest.raises(UserError, match="damaged"):
        space.load()
    assert good.name not in json.loads((space.folder / "verified.json").read_text())
    moved = space.quarantine_damaged()
    assert [p.name for p in moved] == [good.with_suffix(".damaged").name] and space.shard_paths() == []
