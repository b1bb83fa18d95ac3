"""Light classifier heads on cached features (torch-free: numpy, scikit-learn, h5py, joblib).

Public API::

    heads.make_head(name, class_weight=None, seed=0, n_samples=None, n_jobs=None) -> unfitted sklearn estimator
    heads.list_heads(), heads.describe_heads(), heads.register(name, description)
    heads.protocol.evaluate(name, X, y, splits, paths)              -> Evaluation (metrics + fitted head)
    heads.protocol.load_labelled(cache, data, backbone)         -> cached features of a dataset
    heads.store.save_head(path, estimator, meta)
    heads.store.load_head(path, expect_space=None, expect_backbone=None, trust=False) -> (estimator, meta)
"""

from heads.registry import describe_heads, list_heads, make_head, register  # noqa: F401
