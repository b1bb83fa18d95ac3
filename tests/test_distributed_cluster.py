"""``extract --ray`` on a 2-node Ray cluster on this machine (``ray.cluster_utils.Cluster``, as Ray's
own tests do): one model worker per node, the same index and vectors as a local run."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_dataset
from featurize import cache as fc
from featurize.extraction import extract

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")

FAST = dict(backbone="tiny", precision="fp32", workers=0, progress=False, batch_size=4)


@pytest.fixture(scope="module")
def cluster():
    c = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    c.add_node(num_cpus=2)
    try:
        ray.init(address=c.address, log_to_driver=False)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def test_two_nodes_give_the_local_index_and_vectors(cluster, tmp_path):
    data = make_dataset(tmp_path / "data", classes=("a", "b"), per_class=12)
    (data / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    local = extract(data, tmp_path / "local", **FAST)
    s = extract(data, tmp_path / "ray", ray=cluster.address, workers_per_node=1, **{**FAST, "batch_size": 2})
    assert (s["ray"]["nodes"], s["ray"]["workers"]) == (2, 2)  # a model worker per node
    # (which of them returned rows depends on start-up times: under load the first one up may take it all)
    assert s["space_id"] == local["space_id"] and (s["embedded"], s["failed"]) == (24, 1)
    _, want = fc.find_index(tmp_path / "local", data)
    _, got = fc.find_index(tmp_path / "ray", data)
    for k in fc.INDEX_FIELDS:
        assert getattr(got, k) == getattr(want, k), k
    Xw = fc.load_features(tmp_path / "local", want, fc.resolve_space(tmp_path / "local", want))[0]
    Xg = fc.load_features(tmp_path / "ray", got, fc.resolve_space(tmp_path / "ray", got))[0]
    np.testing.assert_allclose(Xg, Xw, rtol=1e-5, atol=1e-6)
