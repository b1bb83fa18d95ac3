"""featurize: extract frozen-backbone embeddings once, train small heads in seconds.

This package root stays free of torch imports so that ``heads`` (numpy, scikit-learn,
h5py) can read the cache without paying torch's import time. Torch-using modules
(``backbones``, ``images``, ``extract``, ``finetune``) are imported explicitly.
"""

from featurize.errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "__version__"]
