"""`photos8`: 2,400 greyscale 32x32 crops of 8 real photographs, 300 per class (the class is the photograph),
shipped with maskkit as package data (`maskkit/data/files/photos8.npz`, 1.4 MB).

Natural-image data, where information is spread over the image, unlike digits. Cut by a seeded recipe
(each photograph converted to greyscale and resized so its shorter side is 256 px; random crops, those with
a pixel standard deviation under 8 rejected; half mirrored left-right; seed 20261130) from:
- china, flower: scikit-learn's sample images, CC BY 2.0, by danielbuechele and vultilion on Flickr;
- immunohistochemistry, retina, camera, cell, coins, clock: scikit-image 0.26's bundled data, public domain,
  CC0 or "no known copyright restrictions", as each function's docstring in `skimage.data` says.
The recipe is not byte-for-byte reproducible across library versions, so the arrays themselves ship.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import numpy as np
import torch

from maskkit.data.load import register_dataset
from maskkit.data.source import ImageData
from maskkit.registry import Card

FILE = "photos8.npz"


@register_dataset("photos8", card=Card(
    idea="2,400 greyscale 32x32 crops of 8 photographs (scikit-learn and scikit-image samples), 8 classes",
    paper="maskkit's own cut (CC BY 2.0 and public-domain photographs)",
))  # fmt: skip
def photos8(**_: Any) -> ImageData:
    """images [2400, 1, 32, 32] uint8, labels [2400] 0..7 in class order, classes the photographs' names."""
    with resources.files("maskkit.data").joinpath("files", FILE).open("rb") as f, np.load(f) as archive:
        images = torch.from_numpy(np.ascontiguousarray(archive["images"][:, None]))  # [2400, 1, 32, 32]
        labels = torch.from_numpy(archive["labels"].astype(np.int64))
        classes = [str(c) for c in archive["class_names"]]
    return ImageData("photos8", images, labels, classes)
