"""Safe handling of user inputs: uploaded images and typed text.

Everything a user can send goes through :func:`load_image` or :func:`clean_text`. Both either return a value
with a defined, documented shape or raise :class:`fti4cir.errors.UserError` with a short message meant to be
shown as is (it never contains a server path, only the uploaded file's base name).

Limits and why they have these values:

``MAX_UPLOAD_BYTES`` (20 MiB)
    Fits a high-quality JPEG from a 24-45 MP camera (about 8-20 MB) while bounding what one request can make the
    server hold in memory. The size is checked before the data is read (``stat`` for paths, ``seek`` for
    seekable streams, a bounded read otherwise), so an oversized upload is never read whole.
``MAX_IMAGE_PIXELS`` (40 megapixels)
    Fits a 40 MP camera frame (7728 x 5152). The models see 224-336 px, so more pixels add nothing but cost:
    40 MP decodes to 160 MB as RGBA, plus about as much again for the conversion to RGB. Pillow's own limit
    (89 MP warns, 179 MP raises) is too lenient for a server decoding concurrent uploads. Ours is checked on the
    size declared in the file header, before any pixel is decoded; Pillow's ``DecompressionBombError`` (raised
    while opening files over 179 MP) is caught and reported the same way. Pillow's global limit is left as it is,
    deliberately: lowering or disabling it would change every other ``Image.open`` in the process (gallery
    indexing included), and under our stricter limit it never decides anything for uploads. Thin images are also
    refused when their rows would cost more than that: Pillow keeps a pointer per row, so a 1 x 40,000,000 line
    takes three times the memory of a 40 MP photo (see :func:`decoded_bytes`). What follows decoding is bounded by
    these limits too: EXIF rotation and mode conversion hold a few copies of the same size, and
    :mod:`fti4cir.preprocess` bounds padding and resizing.
``MAX_TEXT_CHARS`` (1000 characters)
    The CLIP text encoder reads 77 tokens (about 300 characters of English); 1000 characters leaves room for
    scripts that need more tokens per character while bounding the work spent normalising and tokenising.

Only these image formats are decoded: JPEG (incl. MPO), PNG (incl. APNG), GIF, WebP, BMP, TIFF, and AVIF where
Pillow supports it. Restricting Pillow to them keeps its rarely used parsers (EPS, which would start Ghostscript,
PSD, ICNS, FITS, ...) away from untrusted data.

Defined behaviours of :func:`load_image`:

- the EXIF orientation is applied (a broken EXIF block is ignored, the pixels are still used);
- animations (GIF, WebP, APNG) and multi-page TIFFs give their first frame;
- transparency (RGBA, LA, PA, palette or 1-bit/grey/RGB with a transparent colour key) is composited onto white.
  White because catalogue photos, the main use, show products on white, and a cut-out shown on black would
  give the encoder a dark backdrop that is not part of the picture;
- 16-bit greyscale is scaled to 8 bits (65535 -> 255, 32768 -> 128), never clipped; 32-bit integer images with
  values in 0..65535 are treated as 16-bit, others are stretched from their min..max; float images with values in
  0..1 are scaled by 255, others stretched from their min..max; a colour key on 16-bit images is ignored;
- CMYK, YCbCr, 1-bit, L and palette images are converted with Pillow's conversions (embedded ICC profiles are
  not applied).
"""

from __future__ import annotations

import io
import logging
import os
import stat
import unicodedata

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

from fti4cir.errors import UserError

__all__ = [
    "MAX_UPLOAD_BYTES",
    "MAX_IMAGE_PIXELS",
    "MAX_TEXT_CHARS",
    "load_image",
    "clean_text",
    "describe_limits",
    "decoded_bytes",
    "quote",
]

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000
MAX_TEXT_CHARS = 1000

_log = logging.getLogger(__name__)

_IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF") + (("AVIF",) if features.check("avif") else ())
_FORMAT_NAMES = ", ".join({"WEBP": "WebP"}.get(f, f) for f in _IMAGE_FORMATS)
_READ_CHUNK = 1 << 20
_MAX_NAME_CHARS = 60
_ROW_BYTES = 8  # Pillow's pointer to each row
_FREE_ROWS = 100_000  # rows not counted against the pixel limit: every photo shape up to a 1 x 100,000 line
_WHITE = (255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "PA"})  # "La" has no conversion: unsupported
_KEYED_MODES = frozenset({"1", "P", "L", "RGB"})  # modes whose info["transparency"] Pillow turns into alpha
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# ftyp brands of HEIF containers Pillow cannot read (AVIF, also HEIF-based, is tried by Pillow first).
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"})
_JOINERS = frozenset({"\u200c", "\u200d"})  # zero-width non-joiner and joiner


def load_image(source: str | os.PathLike | bytes | io.BufferedIOBase | Image.Image) -> Image.Image:
    """Decode an untrusted image into a fully loaded RGB image that holds no file handle.

    ``source`` is a path, the file's bytes, a readable binary stream (read from its current position, not
    closed), or a Pillow image (already decoded or lazily opened). Raises UserError for anything that is not a
    usable image; see the module docstring for the limits and the defined conversions.
    """
    if isinstance(source, Image.Image):
        return _decoded_to_rgb(source, "The image")
    data, name = _read_upload(source)
    subject = f'The file "{name}"' if name else "The uploaded file"
    if not data:
        raise UserError(f"{subject} is empty (0 bytes).")
    try:
        opened = Image.open(io.BytesIO(data), formats=_IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise UserError(_unsupported_format_message(data, subject)) from None
    except Image.DecompressionBombError:
        raise UserError(_too_many_pixels_message(subject)) from None
    except Exception as exc:  # Pillow's parsers raise many types on malformed headers; all mean "corrupt"
        raise UserError(f"{subject} is truncated or corrupt and could not be read as an image.") from exc
    with opened:
        return _decoded_to_rgb(opened, subject)


def clean_text(text: str | None, *, max_chars: int = MAX_TEXT_CHARS) -> str:
    """Normalise user-typed text; None gives "".

    NFC-normalised; every whitespace character (tabs, newlines, no-break spaces, ...) becomes a space and runs
    collapse to one, ends stripped; control, format and lone-surrogate characters are dropped (bidi overrides,
    zero-width spaces, NUL, escape sequences' ESC, ...), except zero-width (non-)joiners standing between two
    non-ASCII characters, where they are part of an emoji sequence or of Persian/Indic spelling. Everything else,
    emoji, RTL scripts, combining marks, ``*``, ``$`` and braces, is kept as literal text. More than ``max_chars``
    characters (code points, counted after cleaning) raises UserError naming the limit; so does raw input over
    four times the limit, refused before any work is spent on it.
    """
    if text is None:
        return ""
    if not isinstance(text, str):
        raise TypeError(f"clean_text expects str or None, got {type(text).__name__}")
    too_long = f"The text is too long; the limit is {max_chars} characters."
    if len(text) > 4 * max_chars:  # refuse before spending work on an absurd input
        raise UserError(too_long)
    kept = [" " if ch.isspace() else ch for ch in text if ch.isspace() or ch in _JOINERS or not _is_invisible(ch)]
    kept = [ch for i, ch in enumerate(kept) if ch not in _JOINERS or _joins(kept, i)]
    cleaned = " ".join(unicodedata.normalize("NFC", "".join(kept)).split())
    if len(cleaned) > max_chars:
        raise UserError(too_long)
    return cleaned


def quote(value: object, limit: int = 40) -> str:
    """A user's value for a message: the repr of at most `limit` characters of it (with "..." when cut).

    Messages never repeat a whole input back: it may be a megabyte long, or text meant to look like our own."""
    text = value if isinstance(value, str) else repr(value)[: 4 * limit]
    shown = repr(text[:limit])
    return shown + "..." if len(text) > limit else shown


def describe_limits() -> str:
    """A short Markdown paragraph stating the input limits, for the README and the UI."""
    return (
        f"**Input limits.** Images: {_FORMAT_NAMES}; at most {MAX_UPLOAD_BYTES // 2**20} MB and "
        f"{_megapixels(MAX_IMAGE_PIXELS)} (larger ones are refused before decoding). The EXIF orientation is "
        "applied, animations use their first frame, and transparent areas are shown on white. "
        f"Text: at most {MAX_TEXT_CHARS} characters; control and invisible formatting characters are removed and "
        "whitespace is collapsed; `*`, `$` and braces are searched as ordinary text."
    )


def _read_upload(source: object) -> tuple[bytes, str | None]:
    """The upload's bytes (at most MAX_UPLOAD_BYTES) and its base name, if it has one."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        size = source.nbytes if isinstance(source, memoryview) else len(source)
        _check_upload_size(size, "The uploaded file")
        return bytes(source), None
    if isinstance(source, (str, os.PathLike)):
        return _read_path(source)
    if hasattr(source, "read"):
        name = getattr(source, "name", None)
        name = _display_name(name) if isinstance(name, (str, bytes, os.PathLike)) else None
        subject = f'The file "{name}"' if name else "The uploaded file"
        try:
            return _read_stream(source, subject), name
        except (OSError, ValueError):  # I/O errors, an already closed stream
            raise UserError(f"{subject} could not be read.") from None
    raise TypeError(f"load_image cannot read a {type(source).__name__}")


def _read_path(source: str | os.PathLike) -> tuple[bytes, str]:
    path = os.fsdecode(source)
    name = _display_name(path)
    subject = f'The file "{name}"'
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"{subject} is not a regular file.")
        _check_upload_size(info.st_size, subject)
        with open(path, "rb") as f:
            # Bounded read: the file may have grown since stat.
            return _read_stream(f, subject), name
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"{subject} was not found.") from None
    except (OSError, ValueError):  # permissions, NUL in the name, name too long, I/O errors
        raise UserError(f"{subject} could not be read.") from None


def _read_stream(stream, subject: str) -> bytes:
    """Read to EOF, refusing before reading further once MAX_UPLOAD_BYTES is exceeded."""
    seekable = getattr(stream, "seekable", None)
    if callable(seekable) and seekable():
        position = stream.tell()
        size = stream.seek(0, io.SEEK_END) - position
        stream.seek(position)
        _check_upload_size(size, subject)
    chunks, total = [], 0
    while total <= MAX_UPLOAD_BYTES:
        chunk = stream.read(min(_READ_CHUNK, MAX_UPLOAD_BYTES + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    _check_upload_size(total, subject)
    return b"".join(chunks)


def _check_upload_size(size: int, subject: str) -> None:
    if size > MAX_UPLOAD_BYTES:
        raise UserError(f"{subject} is larger than the upload limit of {MAX_UPLOAD_BYTES // 2**20} MB.")


def _decoded_to_rgb(image: Image.Image, subject: str) -> Image.Image:
    """Check the declared size, decode the first frame, orient it and convert it to a detached RGB image."""
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise UserError(_too_many_pixels_message(subject, image.size))
    if decoded_bytes(width, height) > decoded_bytes(MAX_IMAGE_PIXELS, 1) + _ROW_BYTES * _FREE_ROWS:
        raise UserError(_too_many_rows_message(subject, image.size))
    try:
        image.load()
    except Image.DecompressionBombError:  # some plugins check again while decoding
        raise UserError(_too_many_pixels_message(subject)) from None
    except Exception as exc:  # truncated data, bad checksums, decoder errors of any type
        raise UserError(f"{subject} is truncated or corrupt and could not be decoded.") from exc
    try:
        oriented = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a malformed EXIF block does not spoil the pixels: use them unrotated
        _log.info("ignoring unreadable EXIF orientation of an uploaded image", exc_info=True)
        oriented = image
    rgb = to_rgb(oriented, subject)
    return rgb.copy() if rgb is image else rgb  # never hand back the caller's (or a file-backed) object


def to_rgb(image: Image.Image, subject: str = "The image") -> Image.Image:
    """RGB for any PIL mode: high bit depths scaled (not clipped), transparency composited onto white."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return Image.fromarray(_high_depth_to_uint8(image), "L").convert("RGB")
    if mode == "RGB" and "transparency" not in image.info:
        return image
    try:
        if mode in _ALPHA_MODES or (mode in _KEYED_MODES and "transparency" in image.info):
            # Pasting through the alpha band onto white is alpha compositing onto an opaque background, with two
            # image copies alive instead of four (this decides the peak memory of a large transparent upload).
            rgba = image if mode == "RGBA" else image.convert("RGBA")
            white = Image.new("RGB", rgba.size, _WHITE)
            white.paste(rgba, mask=rgba)
            return white
        return image.convert("RGB")
    except ValueError:  # modes Pillow has no conversion for, e.g. premultiplied "La"
        raise UserError(f"{subject} uses an unsupported colour mode ({mode}).") from None


def _high_depth_to_uint8(image: Image.Image) -> np.ndarray:
    """8-bit grey from 16-bit, 32-bit integer or float pixels, scaled rather than clipped.

    Converted in blocks of rows, so that the float64 / uint32 temporaries stay small next to the image."""
    values = np.asarray(image)
    if image.mode == "F":
        low, high = _finite_range(values)  # NaN and infinities count as 0, as they are converted
        if low >= 0.0 and high <= 1.0:
            return _by_rows(values, lambda v: np.rint(_finite_or_zero(v) * 255.0))
        return _stretch(values, low, high, _finite_or_zero)
    low, high = int(values.min()), int(values.max())
    if low >= 0 and high <= 65535:
        # Exact rounding of v * 255 / 65535 in integers: 65535 -> 255, 32768 -> 128.
        return _by_rows(values, lambda v: (v.astype(np.uint32) * 255 + 32767) // 65535)
    return _stretch(values, low, high, lambda v: v)


_BLOCK_PIXELS = 1 << 20


def _by_rows(values: np.ndarray, convert) -> np.ndarray:
    """uint8 of `convert(block)` over blocks of about _BLOCK_PIXELS values."""
    out = np.empty(values.shape, dtype=np.uint8)
    rows = max(1, _BLOCK_PIXELS // max(1, values.shape[1]))
    for start in range(0, values.shape[0], rows):
        out[start : start + rows] = convert(values[start : start + rows])
    return out


def _finite_or_zero(values: np.ndarray) -> np.ndarray:
    return np.nan_to_num(values.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)


def _finite_range(values: np.ndarray) -> tuple[float, float]:
    finite = np.isfinite(values)
    if finite.all():
        return float(values.min()), float(values.max())
    kept = values[finite]
    low, high = (float(kept.min()), float(kept.max())) if kept.size else (0.0, 0.0)
    return min(low, 0.0), max(high, 0.0)


def _stretch(values: np.ndarray, low: float, high: float, clean) -> np.ndarray:
    if high == low:
        return np.full(values.shape, np.clip(round(low), 0, 255), dtype=np.uint8)
    scale = 255.0 / (high - low)
    return _by_rows(values, lambda v: np.rint((clean(v).astype(np.float64) - low) * scale))


def _unsupported_format_message(data: bytes, subject: str) -> str:
    head = data[:1024]
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return f"{subject} is a HEIC/HEIF image, which is not supported; please convert it to JPEG or PNG."
    if b"<svg" in head.lower():
        return f"{subject} is an SVG (vector) image, which is not supported; please upload a JPEG or PNG."
    return f"{subject} is not a supported image. Supported formats: {_FORMAT_NAMES}."


def _display_name(path: str | bytes | os.PathLike) -> str:
    """The base name only, without invisible characters, shortened: safe to show in a message."""
    name = clean_text(os.path.basename(os.fsdecode(path)), max_chars=10**9)
    return name if len(name) <= _MAX_NAME_CHARS else name[: _MAX_NAME_CHARS - 1] + "\u2026"


def _is_invisible(ch: str) -> bool:
    return unicodedata.category(ch) in ("Cc", "Cf", "Cs")


def _joins(chars: list[str], i: int) -> bool:
    """Whether the joiner at ``i`` stands between two visible non-ASCII characters."""
    return 0 < i < len(chars) - 1 and all(_is_joinable(chars[j]) for j in (i - 1, i + 1))


def _is_joinable(ch: str) -> bool:
    return ord(ch) > 0x7F and not ch.isspace() and ch not in _JOINERS


def decoded_bytes(width: int, height: int) -> int:
    """Memory of one RGB(A) copy of an image in Pillow: 4 bytes a pixel and a pointer a row.

    The row pointers matter for thin images: a 1 x 40,000,000 line has 40 megapixels but takes 480 MB per copy,
    three times a 40-megapixel photo. Every step after decoding (EXIF rotation, mode conversion, compositing) holds
    at most a few such copies, so this bounds them all."""
    return height * (4 * width + _ROW_BYTES)


def _too_many_rows_message(subject: str, size: tuple[int, int]) -> str:
    equivalent = _megapixels(decoded_bytes(*size) // 4)
    return (
        f"{subject} is too elongated: {size[0]} x {size[1]} pixels need as much memory as {equivalent} "
        f"(every row costs as much as two pixels); the limit is {_megapixels(MAX_IMAGE_PIXELS)}."
    )


def _too_many_pixels_message(subject: str, size: tuple[int, int] | None = None) -> str:
    declared = f": {size[0]} x {size[1]} pixels ({size[0] * size[1] / 1e6:.0f} megapixels)" if size else ""
    return f"{subject} is too large{declared}; the limit is {_megapixels(MAX_IMAGE_PIXELS)}."


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:g} megapixels"
