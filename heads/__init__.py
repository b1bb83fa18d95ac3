"""Light classifier heads on cached features (torch-free: numpy, scikit-learn, h5py, joblib).

Public API::

    make_head(name, class_weight=None, seed=0, n_samples=None)  -> unfitted sklearn estimator
    list_heads(), describe_heads()
    evaluate(name, X, y, splits, paths)                          -> Evaluation (see heads.protocol)
    save_head(path, evaluation, meta) / load_head(path, expect_space=None)
"""

from heads.registry import describe_heads, list_heads, make_head, register  # noqa: F401
