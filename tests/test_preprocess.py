import numpy as np
import open_clip
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from fti4cir.preprocess import TargetPad, make_transform


def test_targetpad_pads_to_the_target_ratio_not_to_a_square():
    padded = TargetPad(1.25)(Image.new("RGB", (400, 100), (255, 255, 255)))
    assert padded.size == (400, 320)  # 400 / 1.25 = 320: 110 rows of black above and below
    pixels = np.asarray(padded)
    assert pixels[:110].max() == 0 and pixels[-110:].max() == 0 and pixels[110:210].min() == 255
    tall = TargetPad(1.25)(Image.new("RGB", (90, 300)))
    assert tall.size == (2 * int((300 / 1.25 - 90) / 2) + 90, 300)


def test_targetpad_leaves_near_square_images_alone():
    image = Image.new("RGB", (124, 100))
    assert TargetPad(1.25)(image) is image


def official_targetpad(image, size):
    """The official order: pad, bicubic resize, center crop, then RGB, tensor, normalise."""
    w, h = image.size
    if max(w, h) / min(w, h) >= 1.25:
        target = max(w, h) / 1.25
        hp, vp = max(int((target - w) / 2), 0), max(int((target - h) / 2), 0)
        image = TF.pad(image, [hp, vp, hp, vp], 0, "constant")
    image = TF.center_crop(TF.resize(image, size, interpolation=TF.InterpolationMode.BICUBIC), size)
    tensor = TF.to_tensor(image.convert("RGB"))
    return TF.normalize(tensor, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


@pytest.mark.parametrize("size", [(640, 200), (200, 640), (300, 280)])
def test_targetpad_transform_matches_the_official_pipeline_on_rgb(size):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    torch.testing.assert_close(make_transform("targetpad", 224)(image), official_targetpad(image, 224))


def test_clip_transform_matches_open_clip(tiny_backbone):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (180, 333, 3), dtype=np.uint8))
    _, _, reference = open_clip.create_model_and_transforms("fti4cir-tiny", pretrained=None)
    torch.testing.assert_close(make_transform("clip", 224)(image), reference(image))


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGBA", "LA", "CMYK", "I;16", "I", "F", "YCbCr"])
def test_any_pil_mode_is_accepted(mode):
    image = (
        Image.new("RGB", (90, 60), (200, 100, 50)).convert(mode)
        if mode not in ("I;16", "I", "F")
        else Image.new(mode, (90, 60), 1)
    )
    out = make_transform("targetpad", 64)(image)
    assert out.shape == (3, 64, 64) and torch.isfinite(out).all()


def test_unknown_kind():
    with pytest.raises(ValueError, match="targetpad"):
        make_transform("square")
