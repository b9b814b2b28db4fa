"""Bounded cost from bytes to tensor: worst image shapes measured for peak memory, thin lines handled or refused,
the bounded transforms close to the official ones, 1-bit colour keys on white."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from fti4cir.errors import UserError
from fti4cir.inputs import MAX_IMAGE_PIXELS, load_image
from fti4cir.preprocess import CLIP_MEAN, CLIP_STD, PAD_MAX_PIXELS, TargetPad, make_transform, padded_size
from test_preprocess import official_targetpad

TESTS = Path(__file__).resolve().parent
MiB = 2**20
# Peak memory of one request (decode + both transforms), measured by tests/peak_memory.py. A 40 MP photo held as
# RGB is 160 MB; the worst accepted files hold about four such copies at once (a float TIFF: its float pixels, the
# converted grey, the RGB copy). Thin lines cost next to nothing (before the bounded padding: +2.7 GB).
PEAK_BOUND = {
    "float-40mp.tiff": 700 * MiB,
    "rgba-40mp-exif-rotated.png": 560 * MiB,
    "one-bit-40mp-keyed.png": 480 * MiB,
    "line-40000000x1.png": 300 * MiB,
    "line-1x13000000.png": 450 * MiB,
    "line-1x100000.png": 48 * MiB,
    "line-1x40000000.png": 16 * MiB,  # refused from its header: its 40 M rows would cost 480 MB a copy
}


def _worst_shapes(folder: Path) -> list[Path]:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: EXIF transpose makes a full copy
    w, h = 7745, 5164  # 40 MP, just under the limit
    files = {
        "float-40mp.tiff": (Image.new("F", (w, h), 3.5), "TIFF", {"compression": "tiff_adobe_deflate"}),
        "rgba-40mp-exif-rotated.png": (Image.new("RGBA", (w, h), (10, 20, 30, 128)), "PNG", {"exif": exif}),
        "one-bit-40mp-keyed.png": (Image.new("1", (w, h), 0), "PNG", {"transparency": 0}),
        "line-40000000x1.png": (Image.new("1", (40_000_000, 1), 1), "PNG", {}),
        "line-1x13000000.png": (Image.new("L", (1, 13_000_000), 255), "PNG", {}),
        "line-1x100000.png": (Image.new("L", (1, 100_000), 255), "PNG", {}),
        "line-1x40000000.png": (Image.new("1", (1, 40_000_000), 1), "PNG", {}),
    }
    paths = []
    for name, (image, fmt, options) in files.items():
        image.save(folder / name, fmt, **options)
        paths.append(folder / name)
    return paths


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_memory_per_request_is_bounded_for_the_worst_shapes(tmp_path):
    paths = _worst_shapes(tmp_path)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONPATH": str(TESTS.parent)}
    run = subprocess.run(
        [sys.executable, str(TESTS / "peak_memory.py"), *map(str, paths)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    measured = json.loads(run.stdout)
    report = {name: f"{m['peak'] / MiB:.0f} MiB, {m['seconds']:.2f} s" for name, m in measured.items()}
    for name, bound in PEAK_BOUND.items():
        assert measured[name]["peak"] <= bound, report
    for name, m in measured.items():
        if name == "line-1x40000000.png":
            assert "too elongated" in m["result"], m
        else:
            assert m["result"] == str([(3, 224, 224)] * 2), m


def test_thin_lines_become_tensors_in_bounded_memory():
    for size in [(1, 30_000), (30_000, 1), (1, 100_000), (3, 99_999)]:
        image = Image.new("L", size, 255)
        buf = io.BytesIO()
        image.save(buf, "PNG")
        assert len(buf.getvalue()) < 2000  # a few hundred bytes ask for a 24,000 x 30,000 canvas...
        rgb = load_image(buf.getvalue())
        pad = TargetPad()
        w, h = pad(rgb).size
        assert w * h <= PAD_MAX_PIXELS  # ...which is never built
        for kind in ("targetpad", "clip"):
            out = make_transform(kind, 224)(rgb)
            assert out.shape == (3, 224, 224) and torch.isfinite(out).all()


def test_thin_line_with_too_many_rows_is_refused_from_its_header():
    buf = io.BytesIO()
    Image.new("1", (1, 20_000_000), 1).save(buf, "PNG")
    with pytest.raises(UserError, match="too elongated: 1 x 20000000 pixels") as error:
        load_image(buf.getvalue())
    assert f"{MAX_IMAGE_PIXELS / 1e6:g} megapixels" in str(error.value)


def _smooth(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    blobs = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    return Image.fromarray(blobs).resize((width, height), Image.Resampling.BICUBIC)


@pytest.mark.parametrize("size", [(3000, 1200), (1200, 3000), (2600, 2000)])
def test_bounded_targetpad_stays_within_interpolation_tolerance_of_the_official_one(size):
    assert padded_size(*size)[0] * padded_size(*size)[1] > PAD_MAX_PIXELS  # the reduced path is what is tested
    image = _smooth(*size)
    difference = (make_transform("targetpad", 224)(image) - official_targetpad(image, 224)).abs()
    assert difference.max() < 0.05 and difference.mean() < 0.005  # normalised units (1/255 is about 0.015)


def test_bounded_clip_transform_stays_close_to_the_plain_one_on_strips():
    image = _smooth(90, 2000, seed=1)  # ratio 22: the middle is cut out before resizing
    resized = TF.center_crop(TF.resize(image, 224, interpolation=TF.InterpolationMode.BICUBIC), 224)
    plain = TF.normalize(TF.to_tensor(resized), CLIP_MEAN, CLIP_STD)
    difference = (make_transform("clip", 224)(image) - plain).abs()
    assert difference.mean() < 0.03 and difference.max() < 0.15  # sub-pixel shifts of the crop only


def test_one_bit_png_colour_key_is_white():
    image = Image.new("1", (8, 2), 0)
    image.paste(1, (0, 0, 4, 2))  # left half white (1), right half black (0) = the transparent colour
    buf = io.BytesIO()
    image.save(buf, "PNG", transparency=0)
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "1"
    pixels = np.asarray(load_image(buf.getvalue()))
    assert (pixels == 255).all()  # opaque white and transparent-on-white; black would mean the key was dropped
    image.save(buf := io.BytesIO(), "PNG", transparency=1)  # now the white half is transparent, black stays
    pixels = np.asarray(load_image(buf.getvalue()))
    assert (pixels[:, :4] == 255).all() and (pixels[:, 4:] == 0).all()
