"""Image -> tensor: the official "targetpad" transform and the plain CLIP transform."""
from __future__ import annotations

import PIL.Image
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

from .inputs import to_rgb

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TARGET_RATIO = 1.25
KINDS = ("targetpad", "clip")


class TargetPad:
    """Pad the short side symmetrically with black so that max/min side = target ratio (only when the image is
    more elongated than that); Baldrati et al., CVPR 2022, as used by the official FTI4CIR code."""

    def __init__(self, target_ratio: float = TARGET_RATIO):
        self.target_ratio = target_ratio

    def __call__(self, image: PIL.Image.Image) -> PIL.Image.Image:
        w, h = image.size
        if max(w, h) / min(w, h) < self.target_ratio:
            return image
        target_short = max(w, h) / self.target_ratio
        horizontal = max(int((target_short - w) / 2), 0)
        vertical = max(int((target_short - h) / 2), 0)
        return TF.pad(image, [horizontal, vertical, horizontal, vertical], 0, "constant")


def make_transform(kind: str = "targetpad", size: int = 224) -> Compose:
    """`kind`: "targetpad" (the official FTI4CIR default) or "clip" (resize short side, center crop).

    Images are made RGB first (for RGB input this is exactly the official order, which converts last), so that every
    PIL mode resizes bicubically and pads with black.
    """
    if kind not in KINDS:
        raise ValueError(f"preprocess must be one of {KINDS}, got {kind!r}")
    steps = [to_rgb] + ([TargetPad()] if kind == "targetpad" else [])
    steps += [Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size), ToTensor(),
              Normalize(CLIP_MEAN, CLIP_STD)]
    return Compose(steps)


def preprocess_batch(images: list[PIL.Image.Image], transform) -> torch.Tensor:
    return torch.stack([transform(im) for im in images])
