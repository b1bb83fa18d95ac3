"""``featurize.Embedder``: a scikit-learn transformer from images to backbone embeddings.

Imports scikit-learn, so ``featurize.api`` loads it on first use of ``fz.Embedder``.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin

from featurize.embedding import Model, as_list, model_for
from featurize.errors import python_errors
from featurize.registry import DEFAULT_BACKBONE


class Embedder(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """A scikit-learn transformer: images in (file paths, PIL images or uint8 arrays), backbone
    embeddings out (float32 ``(n, D)``).

    Stateless (``fit`` only builds the model and records ``D``), cache-backed when ``cache``
    is a folder, and usable in any ``Pipeline``::

        make_pipeline(fz.Embedder("efficientnet_lite0", cache="cache/"), LogisticRegression())
    """

    def __init__(self, backbone=DEFAULT_BACKBONE, cache=None, weights=None, batch_size=32, device="auto",
                 precision="auto", engine="auto"):
        self.backbone = backbone
        self.cache = cache
        self.weights = weights
        self.batch_size = batch_size
        self.device = device
        self.precision = precision
        self.engine = engine

    def _built(self) -> Model:
        with python_errors():
            return model_for(self.backbone, self.weights, None if self.cache is None else str(self.cache),
                             self.device, self.precision, self.engine)

    def fit(self, X=None, y=None):
        """Build the backbone (nothing is learned); sets ``n_features_out_`` and ``space_id_``."""
        model = self._built()
        self._n_features_out = model.dim
        self.space_id_ = model.space.space_id
        return self

    @property
    def n_features_out_(self) -> int:
        return self._n_features_out

    def transform(self, X):
        """Embed each image of ``X``; returns float32 ``(len(X), D)``."""
        items = as_list(X)
        model = self._built()
        if not hasattr(self, "_n_features_out"):  # stateless: transform without fit is fine
            self._n_features_out, self.space_id_ = model.dim, model.space.space_id
        with python_errors():
            return model(items, self.batch_size, None) if items else np.empty((0, model.dim), np.float32)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False  # images, not a feature matrix
        tags.input_tags.string = True  # file paths
        tags.requires_fit = False
        tags.transformer_tags.preserves_dtype = []
        return tags
