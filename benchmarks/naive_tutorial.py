"""The naive tutorial script, as a user would run it: a whole process, imports included.

    python benchmarks/naive_tutorial.py FOLDER OUT.npy

ImageFolder + DataLoader(num_workers=0) + PIL transforms built from the backbone's own
preprocessing + the fp32 eager model (the same offline EfficientNet-Lite0 weights featurize
uses), features saved with numpy. ``benchmarks/bench.py --only process`` times it start to exit.
"""

import sys

import numpy as np
import torch
from torchvision import datasets, transforms

from featurize.backbones import get_backbone


def main(folder: str, out: str) -> None:
    bb = get_backbone("efficientnet_lite0")
    pp = bb.preprocess
    tf = transforms.Compose([
        transforms.Resize(pp.resize, interpolation=transforms.InterpolationMode(pp.interpolation)),
        transforms.CenterCrop(pp.crop), transforms.ToTensor(), transforms.Normalize(pp.mean, pp.std)])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(folder, transform=tf), batch_size=32, num_workers=0)
    outs = []
    with torch.no_grad():
        for x, _ in loader:
            outs.append(bb.model(x).numpy())
    np.save(out, np.concatenate(outs))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
