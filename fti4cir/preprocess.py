"""Image -> tensor: the official "targetpad" transform and the plain CLIP transform, in bounded memory.

Cost model: every step's output size is known from the input's size before the step runs.

- mode conversion (`to_rgb`): as many pixels as the decoded image (bounded by `inputs.MAX_IMAGE_PIXELS`);
- padding (targetpad): the padded canvas has at most `PAD_MAX_PIXELS`; an image whose canvas would be larger (an
  elongated one: a 1 x 30,000 line would need a 24,000 x 30,000 canvas) is first reduced by a whole factor (box
  average) so that its canvas fits, then padded. The next step resizes the canvas to `size` anyway, so this changes
  pixels only within interpolation tolerance (measured on 3000 x 1200 to 7000 x 5000 images: at most 0.03 in
  normalised units, 1/255 on average); canvases within the budget (a 3:2 photo up to 3.3 MP) are padded exactly as
  the official code pads;
- resizing: the output has `size` pixels on the short side; the clip transform first crops an image more elongated
  than `MAX_CROP_RATIO` to its central part of that ratio (the center crop that follows keeps only the middle square,
  and resizing the full strip of a 1 x 30,000 image would make 224 x 6,720,000 pixels). Images up to that ratio are
  transformed exactly as open_clip transforms them.
"""

from __future__ import annotations

import math

import PIL.Image
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

from .inputs import to_rgb

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TARGET_RATIO = 1.25
KINDS = ("targetpad", "clip")
PAD_MAX_PIXELS = 4_000_000  # 16 MB as RGB; a 1788 x 2236 canvas still is 8 times the output's 224 pixels
MAX_CROP_RATIO = 4.0  # clip transform: longer strips are cut to their middle before resizing


def padded_size(width: int, height: int, target_ratio: float = TARGET_RATIO) -> tuple[int, int]:
    """The canvas TargetPad pads an image of this size to (the size itself when it is not elongated enough)."""
    if max(width, height) / min(width, height) < target_ratio:
        return width, height
    target_short = max(width, height) / target_ratio
    horizontal = max(int((target_short - width) / 2), 0)
    vertical = max(int((target_short - height) / 2), 0)
    return width + 2 * horizontal, height + 2 * vertical


def cropped_size(width: int, height: int, max_ratio: float = MAX_CROP_RATIO) -> tuple[int, int]:
    """The part of an image CropToRatio keeps: the middle, at most `max_ratio` times as long as it is wide."""
    short = min(width, height)
    longest = max(short, math.floor(short * max_ratio))
    return min(width, longest), min(height, longest)


class TargetPad:
    """Pad the short side symmetrically with black so that max/min side = target ratio (only when the image is
    more elongated than that); Baldrati et al., CVPR 2022, as used by the official FTI4CIR code. A canvas over
    `max_pixels` is made from a downscaled image instead (see the module docstring)."""

    def __init__(self, target_ratio: float = TARGET_RATIO, max_pixels: int = PAD_MAX_PIXELS):
        self.target_ratio = target_ratio
        self.max_pixels = max_pixels

    def __call__(self, image: PIL.Image.Image) -> PIL.Image.Image:
        w, h = image.size
        canvas = padded_size(w, h, self.target_ratio)
        if canvas == (w, h):
            return image
        if canvas[0] * canvas[1] > self.max_pixels:
            # A box reduction by a whole factor: cheap (no filter coefficients, the output is the only new image)
            # and closer to the one-step resize than a bicubic pre-resize (which blurs twice).
            image = image.reduce(math.ceil(math.sqrt(canvas[0] * canvas[1] / self.max_pixels)))
            w, h = image.size
            canvas = padded_size(w, h, self.target_ratio)
        horizontal, vertical = (canvas[0] - w) // 2, (canvas[1] - h) // 2
        return TF.pad(image, [horizontal, vertical, horizontal, vertical], 0, "constant")


class CropToRatio:
    """Keep the middle of an image more elongated than `max_ratio` (long side / short side), before resizing."""

    def __init__(self, max_ratio: float = MAX_CROP_RATIO):
        self.max_ratio = max_ratio

    def __call__(self, image: PIL.Image.Image) -> PIL.Image.Image:
        w, h = image.size
        kept = cropped_size(w, h, self.max_ratio)
        if kept == (w, h):
            return image
        left, top = (w - kept[0]) // 2, (h - kept[1]) // 2
        return image.crop((left, top, left + kept[0], top + kept[1]))


def make_transform(kind: str = "targetpad", size: int = 224) -> Compose:
    """`kind`: "targetpad" (the official FTI4CIR default) or "clip" (resize short side, center crop).

    Images are made RGB first (for RGB input this is exactly the official order, which converts last), so that every
    PIL mode resizes bicubically and pads with black.
    """
    if kind not in KINDS:
        raise ValueError(f"preprocess must be one of {KINDS}, got {kind!r}")
    steps = [to_rgb, TargetPad() if kind == "targetpad" else CropToRatio()]
    steps += [
        Resize(size, interpolation=InterpolationMode.BICUBIC),
        CenterCrop(size),
        ToTensor(),
        Normalize(CLIP_MEAN, CLIP_STD),
    ]
    return Compose(steps)


def preprocess_batch(images: list[PIL.Image.Image], transform) -> torch.Tensor:
    return torch.stack([transform(im) for im in images])
