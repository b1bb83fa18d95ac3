"""Registry invariants, weights loading, device/precision choice, and the real offline weights."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED, run_cli
from featurize.backbones import (
    backbone_names,
    get_backbone,
    list_backbones,
    load_state_dict_file,
    resolve_device,
    resolve_precision,
)
from featurize.errors import UserError
from featurize.guide import PUBLISHED, RECOMMENDED_TIMM
from featurize.registry import LITE, PACKAGED_WEIGHTS

OFFLINE = [r["name"] for r in list_backbones() if r["offline"]]


def _invariants(bb, n=3):
    x = torch.randint(0, 256, (n, 3, bb.preprocess.crop, bb.preprocess.crop), dtype=torch.uint8)
    with torch.inference_mode():
        out = bb.model(bb.preprocess.normalize(x))
    assert out.shape == (n, bb.dim)
    assert not bb.model.training and all(not m.training for m in bb.model.modules())
    assert not any(p.requires_grad for p in bb.model.parameters())
    assert len(bb.weights_digest) >= 6
    return out


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_backbones_satisfy_registry_invariants(name):
    bb = get_backbone(name)
    registered = {r["name"]: r["dim"] for r in list_backbones()}
    assert bb.dim == registered[name]
    _invariants(bb)
    assert bb.space_config("fp32") == get_backbone(name).space_config("fp32")  # deterministic id


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg16", "efficientnet_b0", "mobilenet_v3_large",
                                  "convnext_tiny", "vit_b_16"])
def test_torchvision_architectures_and_preprocessing(name):
    import torchvision

    bb = get_backbone(name, pretrained=False)
    _invariants(bb, n=1)
    preset = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    assert (bb.preprocess.crop, bb.preprocess.resize) == (preset.crop_size[0], preset.resize_size[0])
    assert bb.preprocess.mean == tuple(preset.mean) and bb.preprocess.std == tuple(preset.std)


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(UserError) as e:
        get_backbone("resnet5O")
    for name in backbone_names():
        assert name in str(e.value)
    with pytest.raises(UserError, match=r"unknown backbone 'VGG16'; did you mean 'vgg16'\?"):
        get_backbone("VGG16")


def test_unknown_timm_model_suggests_the_nearest_name():
    # A one-letter typo must name the intended model first, not an alphabetical slice of the family
    # (it said "similar: convnext_atto, convnext_atto_ols, ..." without convnext_tiny).
    with pytest.raises(UserError, match=r"timm has no model 'convnext_tinyy'; did you mean 'convnext_tiny'\?"):
        get_backbone("timm:convnext_tinyy")
    with pytest.raises(UserError, match=r"'zzqq_no_such_net'; similar: none"):
        get_backbone("timm:zzqq_no_such_net")


def test_missing_torchvision_weights_offline_names_the_file(tmp_path, dataset):
    if os.environ.get("FEATURIZE_ONLINE"):
        pytest.skip("online: the weights would download")
    p = run_cli("extract", dataset, "--backbone", "resnet18", "--cache", tmp_path / "c",
                env={"TORCH_HOME": str(tmp_path / "th")})
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr  # torch hub's own "Downloading: ..." line is kept out
    assert "Downloading" not in p.stdout  # (torch hub writes it to stdout)
    last = lines[-1]
    assert last.startswith("Error: ") and "resnet18-f37072fd.pth" in last and str(tmp_path / "th") in last


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_file_loads_and_changes_the_digest(tmp_path, suffix):
    bb = get_backbone("tiny")
    sd = {k: v + 0.5 if v.is_floating_point() else v for k, v in bb.model.state_dict().items()}
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file

        save_file(sd, str(path))
    loaded = get_backbone("tiny", weights=str(path))
    assert loaded.weights_digest != bb.weights_digest
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, sd[k])


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/featurize-pwned",))


def test_pickled_code_in_weights_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    with pytest.raises(UserError, match="cannot load weights"):
        load_state_dict_file(path)
    assert not os.path.exists("/tmp/featurize-pwned")


def test_weights_for_another_architecture_are_refused(tmp_path):
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "w.pth")
    with pytest.raises(UserError, match="do not fit"):
        get_backbone("tiny", weights=str(tmp_path / "w.pth"))


def test_device_and_precision_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cuda", "mps", "cpu")
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cpu")) in ("bf16", "fp32")
    with pytest.raises(UserError):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(UserError):
        resolve_device("tpu")


# --------------------------------------------------------------------------- real weights


def _photo(name: str) -> bytes:
    import io

    import skimage.data
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(getattr(skimage.data, name)()).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LITE))
def test_real_lite_weights_classify_scikit_image_photos(name):
    """End to end through our decode + preprocessing + backbone, with the package's ImageNet
    classifier: the `chelsea` cat is 285 (Egyptian cat), the `coffee` cup 967 (espresso)."""
    from featurize.backbones import lite_classifier
    from featurize.images import decode_bytes

    bb = get_backbone(name)
    assert bb.preprocess.crop == {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}[name]
    w, b = lite_classifier(name)
    x = torch.stack([bb.preprocess(decode_bytes(_photo(p))) for p in ("chelsea", "coffee")])
    with torch.inference_mode():
        logits = bb.model(bb.preprocess.normalize(x)) @ w.T + b
    assert logits.argmax(1).tolist() == [285, 967]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_lite1"])  # one builder serves every size
def test_lite_checksum_is_verified(tmp_path, monkeypatch, name):
    from featurize import backbones

    fake = tmp_path / PACKAGED_WEIGHTS[name].filename
    fake.write_bytes(b"not the real weights")
    monkeypatch.setattr(backbones, "lite_weights_file", lambda _: str(fake))
    with pytest.raises(UserError, match=f"sha256.*{PACKAGED_WEIGHTS[name].requirement}"):
        get_backbone(name)


def test_lite_family_is_listed_offline_and_pinned():
    """Every Lite size is registered offline with its package pinned in pyproject.toml."""
    rows = {r["name"]: r for r in list_backbones()}
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    for name in LITE:
        assert rows[name]["offline"] and rows[name]["dim"] == 1280, name
        assert f'"{PACKAGED_WEIGHTS[name].requirement}"' in pyproject, name


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "trashnet").is_dir(), reason="../shared/datasets/trashnet not present")
def test_trashnet_integration(tmp_path):
    """The whole TrashNet folder with the offline default backbone, then an incremental re-run."""
    from conftest import last_json

    p = run_cli("extract", SHARED / "trashnet", "--cache", tmp_path / "c", "--json", timeout=900, check=0)
    s = last_json(p)
    assert s["backbone"] == "efficientnet_lite0" and s["classes"] == 6 and s["failed"] == 0
    assert s["ok"] == s["images"] >= 2500 and s["dim"] == 1280
    from featurize import cache as fc

    _, idx = fc.find_index(tmp_path / "c", SHARED / "trashnet")
    X, labels, _, _ = fc.load_features(tmp_path / "c", idx, fc.resolve_space(tmp_path / "c", idx))
    assert X.shape == (s["ok"], 1280) and np.isfinite(X).all() and X.std(0).mean() > 0.01
    again = last_json(run_cli("extract", SHARED / "trashnet", "--cache", tmp_path / "c", "--json", check=0))
    assert again["embedded"] == 0 and again["hashed"] == 0


def _fake_hf_cache(hub: Path, repo: str, state: dict) -> None:
    """The Hugging Face cache layout: refs/main names a snapshot holding model.safetensors."""
    from safetensors.torch import save_file

    folder = hub / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "snapshots" / commit / "model.safetensors"))


def test_timm_weights_come_from_the_hf_cache_offline_or_fail_at_once(tmp_path, dataset):
    """Offline, timm's hub client retried for ~50 s even for cached files: cached weights are
    loaded directly, and uncached ones fail at once with the fix (the hub is unreachable here:
    HF_ENDPOINT points at a closed local port)."""
    import subprocess
    import sys

    import timm

    src = timm.create_model("test_vit", pretrained=False)
    torch.manual_seed(0)
    for p in src.parameters():
        torch.nn.init.normal_(p, std=0.02)
    hub = tmp_path / "hub"
    _fake_hf_cache(hub, "timm/test_vit.r160_in1k", src.state_dict())
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_ENDPOINT": "http://127.0.0.1:9"}
    code = ("import sys, torch; from featurize.backbones import get_backbone\n"
            "bb = get_backbone('timm:test_vit'); ref = torch.load(sys.argv[1], weights_only=True)\n"
            "got = bb.model.state_dict(); keys = [k for k in got if k in ref]\n"
            "print(len(keys), max(float((got[k].float() - ref[k].float()).abs().max()) for k in keys))")
    torch.save(src.state_dict(), tmp_path / "ref.pt")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ref.pt")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    n, diff = r.stdout.split()
    assert int(n) >= 10 and float(diff) == 0.0  # every backbone tensor is the cached one

    p = run_cli("extract", dataset, "--backbone", "timm:test_efficientnet", "--cache", tmp_path / "c",
                env={"HF_HUB_CACHE": str(hub), "HF_ENDPOINT": "http://127.0.0.1:9"}, check=1)
    assert p.stderr.count("\n") == 1 and "Retrying" not in p.stderr, p.stderr
    assert "127.0.0.1 is unreachable" in p.stderr and "--weights PATH" in p.stderr and str(hub) in p.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", RECOMMENDED_TIMM)
def test_recommended_timm_backbones_load_from_the_hf_cache(tmp_path, monkeypatch, name):
    """Each backbone the guide recommends works offline once its weights are in the Hugging Face
    cache: the architecture is built here with random values, stored where its pretrained config
    points (fp16, to keep the file small), and `timm:NAME` must load exactly those tensors with
    the config's preprocessing, without the network (HF_ENDPOINT is a closed port)."""
    import huggingface_hub.constants
    import timm
    from timm.models import get_pretrained_cfg

    arch = name[5:]
    cfg = get_pretrained_cfg(arch)
    with torch.device("meta"):  # shapes only: no time spent on a random init
        shapes = timm.create_model(arch, pretrained=False, num_classes=0).state_dict()
    # a distinct constant per tensor: a tensor loaded under the wrong key would not match
    state = {k: torch.full(v.shape, (i % 251) / 256, dtype=torch.float16) if v.is_floating_point()
             else torch.zeros(v.shape, dtype=v.dtype) for i, (k, v) in enumerate(shapes.items())}
    hub = tmp_path / "hub"
    _fake_hf_cache(hub, cfg.hf_hub_id, state)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    bb = get_backbone(name)
    got = bb.model.state_dict()
    assert got.keys() == state.keys()
    assert all(torch.equal(got[k], v.to(got[k].dtype)) for k, v in state.items())
    assert bb.dim == PUBLISHED[name].dim  # the width the guide states
    assert bb.weights_digest.startswith(cfg.hf_hub_id) and not bb.model.training
    assert bb.preprocess.crop == cfg.input_size[-1] and bb.preprocess.mean == tuple(cfg.mean)


def test_backbones_guide_cites_every_backbone_without_torch():
    """`backbones --guide`: every registered backbone and each recommended timm model with its
    published accuracy and source, printed without importing torch (no model is built)."""
    import subprocess
    import sys

    from conftest import ROOT, last_json

    code = ("import sys, cli\n"
            "assert cli.main(['backbones', '--guide', '--json']) == 0\n"
            "assert not [m for m in ('torch', 'timm', 'torchvision') if m in sys.modules]\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    guide = {g["backbone"]: g for g in last_json(p)["guide"]}
    assert set(guide) == set(backbone_names()) - {"tiny"} | set(RECOMMENDED_TIMM)
    assert all(g["imagenet_top1"] > 60 and g["source"] and g["protocol"] for g in guide.values())
    assert all(guide[n]["dim"] for n in RECOMMENDED_TIMM)


# --------------------------------------------------------------------------- NAME@SIZE: the whole image at SIZE px


def test_size_variant_feeds_the_whole_image_at_that_size():
    from torchvision.transforms.v2 import functional as F

    base, variant = get_backbone("tiny"), get_backbone("tiny@40")
    assert variant.name == "tiny@40" and (variant.preprocess.resize, variant.preprocess.crop) == (40, 40)
    assert (variant.preprocess.mean, variant.preprocess.std) == (base.preprocess.mean, base.preprocess.std)
    img = torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8)
    whole = F.center_crop(F.resize(img, [40], antialias=True), [40, 40])  # only the longer side's excess goes
    assert torch.equal(variant.preprocess(img), whole)
    # the default keeps a crop_pct margin out: not the whole (short side of the) image
    assert not torch.equal(base.preprocess(img), F.center_crop(F.resize(img, [32], antialias=True), [32, 32]))
    assert variant.space_config("fp32") != base.space_config("fp32")
    assert variant.model(variant.preprocess.normalize(whole[None])).shape == (1, 16)


@pytest.mark.parametrize("name, match", [("tiny@abc", "integer from 32 to 1024"), ("tiny@8", "integer from 32"),
                                         ("tiny@4096", "integer from 32"), ("nope@224", "unknown backbone 'nope'")])
def test_size_variant_refuses_bad_sizes_and_names(name, match):
    with pytest.raises(UserError, match=match):
        get_backbone(name)


def test_size_variant_is_known_to_the_torch_free_registry_and_engine_store():
    from featurize import registry
    from featurize.enginestore import request_key

    assert registry.backbone_info("efficientnet_lite2@384").dim == 1280
    assert registry.base_name("efficientnet_lite2@384") == "efficientnet_lite2"
    # the engine store's request key covers the packaged weights file of the base (a reinstall is noticed)
    files = request_key("efficientnet_lite0@224", None, "cpu", "bf16")["files"]
    assert any(PACKAGED_WEIGHTS["efficientnet_lite0"].filename in f for f in files)


def test_size_variant_refuses_a_fixed_size_model_before_fetching_its_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))  # no weights here: they would be downloaded
    with pytest.raises(UserError, match="vit_b_16 does not take 320 px inputs"):
        get_backbone("vit_b_16@320")
    assert not (tmp_path / "th").exists()


def test_size_variant_refuses_a_fixed_size_model():
    with pytest.raises(UserError, match="does not take 320 px inputs"):
        get_backbone("timm:vit_tiny_patch16_224@320", pretrained=False)
    assert get_backbone("timm:vit_tiny_patch16_224@224", pretrained=False).preprocess.crop == 224


def test_size_variant_extracts_its_own_space_end_to_end(tmp_path):
    import json

    import featurize as fz
    from conftest import make_dataset
    from featurize.images import read_image

    data = make_dataset(tmp_path / "data", per_class=2, ext=".png")
    cache = tmp_path / "cache"
    run = fz.extract(data, backbone="tiny@40", cache=cache, engine="torch", precision="fp32")
    plain = fz.extract(data, backbone="tiny", cache=cache, engine="torch", precision="fp32")
    assert run.space_id != plain.space_id and run.space_id.startswith("tiny-40-")
    meta = json.loads((cache / "features" / run.space_id / "space.json").read_text())
    assert meta["backbone"] == "tiny@40" and meta["preprocess"]["crop"] == 40
    ds = fz.load_features(data, cache=cache, backbone="tiny@40")
    bb = get_backbone("tiny@40")
    imgs = torch.stack([bb.preprocess(read_image(p)) for p in ds.paths])
    with torch.inference_mode():
        expected = bb.model(bb.preprocess.normalize(imgs)).numpy()
    np.testing.assert_allclose(ds.X, expected, rtol=1e-4, atol=1e-5)
