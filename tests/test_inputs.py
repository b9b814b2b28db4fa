"""Tests of fti4cir.inputs over the generated bad-input corpus (tests/bad_inputs.py) and its edge cases."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bad_inputs import Case, generate_image_cases, text_cases
from fti4cir import inputs
from fti4cir.errors import UserError
from fti4cir.inputs import MAX_IMAGE_PIXELS, MAX_TEXT_CHARS, MAX_UPLOAD_BYTES, clean_text, describe_limits, load_image

# Generated once at collection so that the cases can name the parameters; removed when the object is collected.
_CORPUS_DIR = tempfile.TemporaryDirectory(prefix="fti4cir-bad-inputs-")
CORPUS = {case.name: case for case in generate_image_cases(_CORPUS_DIR.name)}


def _as_stream(payload: Path | bytes) -> io.BufferedIOBase:
    return io.BytesIO(payload) if isinstance(payload, bytes) else open(payload, "rb")


def _load_or_error(case: Case, source) -> None:
    """The case's defined result, or a UserError with the expected words; any other exception fails the test."""
    try:
        image = load_image(source)
    except UserError as error:
        case.check_error(error)
        if isinstance(case.payload, Path):
            assert str(case.payload.parent) not in str(error), "server path leaked into the message"
        return
    case.check(image)


def test_corpus_is_large_and_mixed():
    assert len(CORPUS) + len(text_cases()) >= 25
    outcomes = [case.outcome for case in CORPUS.values()]
    assert outcomes.count("ok") >= 10 and outcomes.count("error") >= 10


@pytest.mark.parametrize("case", CORPUS.values(), ids=CORPUS.keys())
def test_image_case_as_given(case: Case):
    _load_or_error(case, case.payload)


@pytest.mark.parametrize("case", CORPUS.values(), ids=CORPUS.keys())
def test_image_case_as_stream(case: Case):
    stream = _as_stream(case.payload)
    with stream:
        _load_or_error(case, stream)
        assert not stream.closed, "load_image must not close the caller's stream"


@pytest.mark.parametrize("case", text_cases(), ids=lambda case: case.name)
def test_text_case(case):
    if case.outcome == "ok":
        assert clean_text(case.text) == case.expected
    else:
        with pytest.raises(UserError, match=case.message):
            clean_text(case.text)


@pytest.mark.parametrize("name", ["png_16bit_grey", "tiff_32bit_int", "rgba_png", "la_png", "exif_rotated_jpeg"])
def test_corpus_checks_catch_naive_loading(name):
    """Plain ``Image.open(...).convert("RGB")`` (clipping, no compositing, no orientation) must fail these checks."""
    case = CORPUS[name]
    with Image.open(case.payload) as image:
        naive = image.convert("RGB")
    with pytest.raises(AssertionError):
        case.check(naive)


def test_result_is_detached_from_the_file(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(CORPUS["png_named_jpg"].payload.read_bytes())
    image = load_image(path)
    path.unlink()
    assert getattr(image, "fp", None) is None
    assert image.getpixel((0, 0)) == (255, 0, 0)


def test_pil_image_source_is_converted_and_not_modified():
    source = Image.new("RGBA", (4, 2), (0, 0, 255, 0))
    result = load_image(source)
    assert result.mode == "RGB" and result.getpixel((0, 0)) == (255, 255, 255)
    assert source.mode == "RGBA" and source.getpixel((0, 0)) == (0, 0, 255, 0)

    rgb = Image.new("RGB", (2, 2), (1, 2, 3))
    copy = load_image(rgb)
    copy.putpixel((0, 0), (9, 9, 9))
    assert rgb.getpixel((0, 0)) == (1, 2, 3), "the caller's image must not be shared"


def test_pil_image_modes():
    ycbcr = Image.new("RGB", (4, 4), (0, 0, 255)).convert("YCbCr")
    assert all(abs(a - b) <= 2 for a, b in zip(load_image(ycbcr).getpixel((1, 1)), (0, 0, 255)))
    big_endian = Image.frombytes("I;16B", (2, 1), np.array([32768, 65535], dtype=">u2").tobytes())
    assert [load_image(big_endian).getpixel((x, 0)) for x in (0, 1)] == [(128,) * 3, (255,) * 3]
    wide_ints = Image.fromarray(np.array([[-1000, 0, 1000]], dtype=np.int32), "I")
    assert [load_image(wide_ints).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    with pytest.raises(UserError, match="colour mode"):
        load_image(Image.new("LA", (2, 2), (10, 128)).convert("La"))


def test_pil_image_over_pixel_limit_is_refused_before_decoding():
    class Lazy(Image.Image):  # declares a size, would fail loudly if decoded
        def load(self):
            raise AssertionError("decoded an image over the pixel limit")

    lazy = Lazy()
    lazy._size = (MAX_IMAGE_PIXELS // 1000 + 1, 1000)
    with pytest.raises(UserError, match="megapixels"):
        load_image(lazy)


def test_own_pixel_limit_holds_without_pillows(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(UserError, match="20000 x 20000"):
        load_image(CORPUS["bomb_20000x20000_png"].payload)


BOMBS = ["bomb_20000x20000_png", "bomb_8000x8000_png", "gif_huge_canvas"]


def test_bombs_are_refused_without_allocating():
    """In a fresh process, refusing each bomb must not raise the peak memory by more than 32 MB.

    The child imports fti4cir.inputs without running fti4cir/__init__.py (which loads torch), so that it starts
    fast and its memory baseline is small.
    """
    script = (
        "import json, resource, sys, types\n"
        "package = types.ModuleType('fti4cir'); package.__path__ = [sys.argv[1]]; sys.modules['fti4cir'] = package\n"
        "from fti4cir.inputs import load_image\n"
        "from fti4cir.errors import UserError\n"
        "results = []\n"
        "for path in sys.argv[2:]:\n"
        "    data = open(path, 'rb').read()\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "    try:\n        load_image(data)\n        message = 'accepted'\n"
        "    except UserError as e:\n        message = str(e)\n"
        "    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "    results.append({'grown_kb': after - before, 'message': message})\n"
        "print(json.dumps(results))\n"
    )
    package_dir = Path(inputs.__file__).resolve().parent
    paths = [str(CORPUS[name].payload) for name in BOMBS]
    done = subprocess.run(
        [sys.executable, "-c", script, str(package_dir), *paths], capture_output=True, text=True, timeout=60, check=True
    )
    for name, result in zip(BOMBS, json.loads(done.stdout), strict=True):
        assert "megapixels" in result["message"], (name, result)
        assert result["grown_kb"] < 32 * 1024, (name, result)


def test_oversized_file_is_refused_from_its_size(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    with open(path, "wb") as f:
        f.truncate(MAX_UPLOAD_BYTES + 1)

    def no_open(*args, **kwargs):
        raise AssertionError("the file was opened although stat already showed it too large")

    monkeypatch.setattr(inputs, "open", no_open, raising=False)
    with pytest.raises(UserError, match="upload limit"):
        load_image(path)


class _EndlessStream(io.RawIOBase):
    """A non-seekable stream of zeros that counts what was read from it."""

    def __init__(self):
        self.bytes_read = 0

    def readable(self):
        return True

    def readinto(self, buffer):
        buffer[:] = bytes(len(buffer))
        self.bytes_read += len(buffer)
        return len(buffer)


def test_unseekable_stream_is_read_only_up_to_the_limit():
    stream = _EndlessStream()
    with pytest.raises(UserError, match="upload limit"):
        load_image(stream)
    assert stream.bytes_read <= MAX_UPLOAD_BYTES + 1


def test_seekable_stream_over_the_limit_is_not_read():
    stream = io.BytesIO(bytes(MAX_UPLOAD_BYTES + 1))
    with pytest.raises(UserError, match="upload limit"):
        load_image(stream)
    assert stream.tell() == 0


def test_stream_is_read_from_its_position():
    png = CORPUS["one_by_one"].payload.read_bytes()
    stream = io.BytesIO(b"header to skip" + png)
    stream.seek(len(b"header to skip"))
    assert load_image(stream).getpixel((0, 0)) == (10, 20, 30)


def test_bad_paths_give_user_errors_with_the_base_name_only(tmp_path):
    missing = tmp_path / "secret_dir" / "missing.jpg"
    with pytest.raises(UserError, match="not found") as caught:
        load_image(missing)
    assert "missing.jpg" in str(caught.value) and "secret_dir" not in str(caught.value)
    with pytest.raises(UserError, match="not a regular file"):
        load_image(tmp_path)
    with pytest.raises(UserError, match="could not be read"):
        load_image(str(tmp_path / "nul\x00name.jpg"))


def test_file_names_in_messages_are_cleaned_and_shortened(tmp_path):
    path = tmp_path / ("evil\u202e\x1b[2J" + "x" * 200 + ".jpg")
    path.write_bytes(b"")
    message = str(pytest.raises(UserError, load_image, path).value)
    assert "\u202e" not in message and "\x1b" not in message
    assert len(message) < 160


def test_custom_text_limit_is_named():
    assert clean_text("abcde", max_chars=5) == "abcde"
    with pytest.raises(UserError, match="limit is 5 characters"):
        clean_text("abcdef", max_chars=5)


def test_describe_limits_states_the_limits():
    text = describe_limits()
    assert f"{MAX_UPLOAD_BYTES // 2**20} MB" in text
    assert f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels" in text
    assert f"{MAX_TEXT_CHARS} characters" in text
    assert "\n\n" not in text, "one paragraph"
