"""Which backbone to choose: the published accuracy of each registered backbone and of a short
list of recommended ``timm:`` models (torch-free facts).

``benchmarks/guide.py`` joins these with what it measures on the machine (images/s end to end,
feature width, cache size) into the README's backbone guide; ``featurize backbones --guide``
prints them. The ImageNet numbers are the best comparable number each source publishes:
a *linear probe* on frozen features for self-/language-supervised models (DINOv2, CLIP), and
the *supervised top-1* for ImageNet-trained models, whose classifier is itself one linear
layer on the very features featurize caches. They rank backbones; they do not predict the
accuracy on a given dataset (`compare --backbones ...` measures that).
"""

from __future__ import annotations

from dataclasses import dataclass

TV_DOCS = "torchvision weights API (weights.meta acc@1, IMAGENET1K)"
LITE_SRC = "tensorflow/tpu efficientnet/lite README (TF EfficientNet-Lite)"


@dataclass(frozen=True)
class Published:
    imagenet_top1: float  # %
    protocol: str  # "linear probe" (frozen features) or "supervised"
    source: str
    note: str = ""
    dim: int | None = None  # for models not in the registry


#: Recommended when the weights can be downloaded once (or are in the Hugging Face cache).
RECOMMENDED_TIMM = [
    "timm:vit_small_patch14_dinov2.lvd142m",  # DINOv2 ViT-S/14: the strongest small general-purpose features
    "timm:vit_base_patch16_clip_224.openai",  # CLIP ViT-B/16 image tower
    "timm:convnext_tiny.fb_in22k_ft_in1k",  # ConvNeXt-T, ImageNet-22k pretrained
]

PUBLISHED: dict[str, Published] = {
    "efficientnet_lite0": Published(75.1, "supervised", LITE_SRC),
    "efficientnet_lite1": Published(76.7, "supervised", LITE_SRC),
    "efficientnet_lite2": Published(77.6, "supervised", LITE_SRC),
    "resnet18": Published(69.8, "supervised", TV_DOCS),
    "resnet50": Published(80.9, "supervised", TV_DOCS, "IMAGENET1K_V2 recipe"),
    "vgg16": Published(71.6, "supervised", TV_DOCS),
    "efficientnet_b0": Published(77.7, "supervised", TV_DOCS),
    "mobilenet_v3_large": Published(75.3, "supervised", TV_DOCS),
    "convnext_tiny": Published(82.5, "supervised", TV_DOCS),
    "vit_b_16": Published(81.1, "supervised", TV_DOCS),
    "timm:vit_small_patch14_dinov2.lvd142m": Published(
        81.1, "linear probe", "Oquab et al., DINOv2 (arXiv:2304.07193); facebookresearch/dinov2 README",
        "k-NN 79.0; self-supervised on LVD-142M; timm's config runs it at 518 px", 384),
    "timm:vit_base_patch16_clip_224.openai": Published(
        80.2, "linear probe", "Radford et al., CLIP (arXiv:2103.00020), Table 10",
        "image tower, 768-d before CLIP's projection", 768),
    "timm:convnext_tiny.fb_in22k_ft_in1k": Published(
        82.9, "supervised", "Liu et al., A ConvNet for the 2020s (arXiv:2201.03545), Table 1 (ImageNet-22k pre-trained)", dim=768),
}


def guide_rows(names: list[str] | None = None) -> list[dict]:
    """``[{backbone, imagenet_top1, protocol, source, note}]`` for ``names`` (default: all known)."""
    rows = []
    for name in names or list(PUBLISHED):
        p = PUBLISHED.get(name)
        rows.append({"backbone": name, "imagenet_top1": p.imagenet_top1 if p else None,
                     "protocol": p.protocol if p else None, "source": p.source if p else None,
                     "note": p.note if p else "", "dim": p.dim if p else None})
    return rows
