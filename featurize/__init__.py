"""featurize: extract frozen-backbone embeddings once, train small heads in seconds.

The Python API (``featurize.api``; see the README's "Python API")::

    import featurize as fz
    run = fz.extract("data/", cache="cache/")          # embed a folder once -> Extraction
    ds = fz.load_features("data/", cache="cache/")     # X, y, paths, classes, splits
    X = fz.embed(["a.jpg", "b.png"])                    # or PIL images / uint8 arrays
    fz.Embedder(...)                                    # a scikit-learn transformer
    fit = fz.fit("data/", head="svm", cache="cache/")  # -> Fit (metrics, head file)
    fz.load_head(fit.path).predict(["new.jpg"])
    found = fz.audit("data/", cache="cache/")          # -> Audit (label errors, duplicates, outliers)

This package root stays free of torch (and of scikit-learn): the API's names are imported on
first use, so ``import featurize`` is fast and ``heads`` can read the cache without torch.
"""

from featurize.errors import UserError

__version__ = "0.1.0"

_API = ("extract", "embed", "Embedder", "load_features", "load_head", "fit", "audit", "Extraction", "Features", "Fit",
        "Head", "Audit")
__all__ = ["UserError", "__version__", *_API]


def __getattr__(name):
    if name in _API:
        from featurize import api

        return getattr(api, name)
    raise AttributeError(f"module 'featurize' has no attribute {name!r}")
