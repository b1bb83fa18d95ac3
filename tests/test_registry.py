"""Backbone names and metadata without torch (featurize.registry), duplicates refused, close names suggested."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT


def test_backbones_command_is_torch_free_and_matches_the_builders():
    code = ("import sys, json, cli\n"
            "cli.main(['backbones', '--json'])\n"
            "print(json.dumps([m for m in ('torch', 'torchvision', 'timm') if m in sys.modules]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    *_, listed, loaded = out.stdout.strip().splitlines()
    assert json.loads(loaded) == []
    rows = json.loads(listed)["backbones"]
    import torchvision

    from featurize import backbones, registry

    # every builder is declared (and the reverse) with the width its model really has
    assert [r["name"] for r in rows] == backbones.backbone_names() == registry.backbone_names()
    assert {r["name"]: r["dim"] for r in rows}["tiny"] == backbones.get_backbone("tiny").dim
    # the torch-free offline check looks for the file torchvision's DEFAULT weights download to
    for name, _, _, filename in registry.TORCHVISION:
        assert torchvision.models.get_model_weights(name).DEFAULT.url.endswith("/" + filename)
    lite0 = next(r for r in rows if r["name"] == "efficientnet_lite0")
    assert lite0["offline"] == (backbones.lite_weights_file("efficientnet_lite0") is not None)


def test_a_backbone_name_is_registered_once():
    from featurize import backbones, registry

    with pytest.raises(ValueError, match="already registered"):
        backbones.register("tiny", dim=16, source="again")(lambda weights=None, pretrained=True: None)
    with pytest.raises(ValueError, match="already registered"):
        registry.declare("resnet18", 512, "again")


def test_unknown_backbone_suggests_the_closest_name():
    from featurize.backbones import get_backbone
    from featurize.errors import UserError

    with pytest.raises(UserError, match=r"unknown backbone 'resnet5'; did you mean 'resnet50'\?"):
        get_backbone("resnet5")
    with pytest.raises(UserError, match=r"unknown backbone 'zzz'; valid: "):  # nothing close: no guess
        get_backbone("zzz")
