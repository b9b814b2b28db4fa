"""Property-based fuzzing of everything a user or a downloaded file can hand us (hypothesis).

    python -m fti4cir.commands.fuzz --examples 2000                  # every target, 2000 generated inputs each
    python -m fti4cir.commands.fuzz --examples 500 --target pickles   # one target

Targets and the property each must keep (any other outcome is a failure, reported with the input that caused it):

- images: generated files of every supported format, mode (1-bit ... 32-bit float), size and aspect ratio (down to
  1-pixel lines), animation, EXIF orientation (valid, invalid, garbage), colour keys, and truncated or bit-flipped
  copies. `load_image` gives an RGB image or a UserError; both transforms then give a finite 3 x 32 x 32 tensor.
- texts: any code points (lone surrogates, controls, bidi marks, joiners) and lengths around the limit.
  `clean_text` gives at most MAX_TEXT_CHARS visible characters or a UserError, and is idempotent.
- configs: FTI4CIR and M2C weights configs with hostile values (zero, negative, huge, NaN, strings, lists, nesting)
  written beside a small valid weights file. Loading gives the network or a UserError, and an accepted config
  builds and runs a forward pass on the meta device (nothing is allocated).
- pickles: release files whose data.pkl is a random program over the opcodes and globals a release file may use
  (allowed classes and functions, tensor rebuilders, storages, memo references that make cycles), plus mutations of
  a real release-structured pickle. `read_official` gives a network or a UserError, never another exception.

The test suite runs each target with a few dozen examples (tests/test_fuzz_inputs.py); the command
`python -m fti4cir.commands.fuzz` runs longer. It needs hypothesis, a development requirement (requirements-dev.txt).
"""

from __future__ import annotations

import io
import json
import struct
import sys
import tempfile
import traceback
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from .errors import UserError

# ---- images --------------------------------------------------------------------------------------------------------
FORMATS = {  # format -> modes Pillow can write in it
    "PNG": ("1", "L", "P", "RGB", "RGBA", "LA", "I;16", "I"),
    "GIF": ("L", "P", "RGB"),
    "WEBP": ("RGB", "RGBA", "L", "P"),
    "TIFF": ("1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr", "I;16", "I", "F", "PA"),
    "BMP": ("1", "L", "P", "RGB"),
    "JPEG": ("L", "RGB", "CMYK"),
}


@st.composite
def image_files(draw) -> bytes:
    """The bytes of a generated image file, sometimes damaged."""
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(FORMATS[fmt]))
    shape = draw(st.sampled_from(["ordinary", "thin", "tiny"]))
    if shape == "thin":  # 1-3 pixels across, up to 60,000 along
        long, short = draw(st.integers(100, 60_000)), draw(st.integers(1, 3))
        width, height = (long, short) if draw(st.booleans()) else (short, long)
    elif shape == "tiny":
        width, height = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    else:
        width, height = draw(st.integers(5, 300)), draw(st.integers(5, 300))
    seed = draw(st.integers(0, 2**16))
    frames = [
        _image(mode, width, height, seed + i)
        for i in range(draw(st.integers(1, 3)) if fmt in ("GIF", "PNG", "WEBP") else 1)
    ]
    options = {}
    if len(frames) > 1:
        options.update(save_all=True, append_images=frames[1:])
    if mode in ("1", "L", "P", "RGB") and fmt in ("PNG", "GIF") and draw(st.booleans()):
        options["transparency"] = (0, 0, 0) if mode == "RGB" else 0
    if fmt in ("JPEG", "PNG", "WEBP", "TIFF") and draw(st.booleans()):
        options["exif"] = _exif(draw)
    if fmt == "TIFF" and draw(st.booleans()):
        options["compression"] = "tiff_adobe_deflate"
    buf = io.BytesIO()
    try:
        frames[0].save(buf, fmt, **options)
    except Exception:  # noqa: BLE001 - a combination Pillow cannot write (it raises many types): plain
        buf = io.BytesIO()
        try:
            frames[0].save(buf, fmt)
        except Exception:  # noqa: BLE001
            buf = io.BytesIO()
            frames[0].convert("RGB").save(buf, "PNG")  # e.g. WebP over 16383 pixels a side
    data = buf.getvalue()
    damage = draw(st.sampled_from(["none", "none", "truncate", "flip"]))
    if damage == "truncate" and len(data) > 1:
        data = data[: draw(st.integers(1, len(data) - 1))]
    elif damage == "flip":
        data = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            at = draw(st.integers(0, len(data) - 1))
            data[at] ^= 1 << draw(st.integers(0, 7))
        data = bytes(data)
    return data


def _image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode in ("I;16", "I", "F"):
        values = {
            "I;16": lambda: rng.integers(0, 65536, (height, width), dtype=np.uint16),
            "I": lambda: rng.integers(-(2**31), 2**31 - 1, (height, width), dtype=np.int32),
            "F": lambda: rng.choice([0.0, 0.5, 1.0, -3.0, 1e30, np.nan, np.inf], (height, width)).astype(np.float32),
        }[mode]()
        return Image.fromarray(values, mode if mode != "I;16" else "I;16")
    rgba = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    if mode in ("P", "PA"):
        palette = rgba.convert("RGB").convert("P")
        return palette.convert("PA") if mode == "PA" else palette
    return rgba.convert(mode)


def _exif(draw) -> bytes | Image.Exif:
    if draw(st.integers(0, 4)) == 0:  # garbage EXIF block
        return b"Exif\x00\x00" + draw(st.binary(max_size=64))
    exif = Image.Exif()
    exif[0x0112] = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 65535]))
    return exif


def check_image(data: bytes) -> str:
    """The image property; returns "ok" or "refused"."""
    import torch

    from .inputs import load_image
    from .preprocess import make_transform

    try:
        image = load_image(data)
    except UserError as e:
        assert len(str(e)) < 300, "message too long"
        return "refused"
    assert image.mode == "RGB" and min(image.size) >= 1
    for kind in ("targetpad", "clip"):
        out = make_transform(kind, 32)(image)
        assert out.shape == (3, 32, 32) and bool(torch.isfinite(out).all())
    return "ok"


# ---- texts ---------------------------------------------------------------------------------------------------------
def texts():
    any_char = st.characters(codec=None, exclude_categories=())
    pieces = st.sampled_from(
        [
            "*",
            "$",
            "{",
            "}",
            "\u202e",
            "\u200d",
            "\u200b",
            "\x00",
            "\x1b[31m",
            "\ud800",
            " ",
            "\u0301",
            "👩\u200d💻",
            "\r\n",
            "a photo of * with",
        ]
    )
    return st.one_of(
        st.text(any_char, max_size=200),
        st.lists(pieces, max_size=40).map("".join),
        st.integers(990, 4100).map(lambda n: "a" * n),
        st.none(),
    )


def check_text(text) -> str:
    from .inputs import MAX_TEXT_CHARS, clean_text

    try:
        cleaned = clean_text(text)
    except UserError as e:
        assert len(str(e)) < 300
        return "refused"
    assert isinstance(cleaned, str) and len(cleaned) <= MAX_TEXT_CHARS
    assert cleaned == clean_text(cleaned), "not idempotent"
    assert not any(ch in cleaned for ch in "\x00\x1b\u202e\u200b"), "invisible characters kept"
    return "ok"


# ---- configs -------------------------------------------------------------------------------------------------------
HOSTILE_VALUES = st.one_of(
    st.sampled_from(
        [
            0,
            -1,
            1,
            2,
            3,
            7,
            4096,
            16385,
            2**31,
            2**63,
            10**30,
            -(10**30),
            0.0,
            -0.5,
            0.5,
            1.5,
            1e308,
            float("nan"),
            float("inf"),
            float("-inf"),
            True,
            False,
            None,
            "",
            "16",
            "x" * 2000,
            [],
            [2, 2],
            [1, 2, 3],
            [[1]],
            {},
            {"a": [1]},
            [-1, 0],
            [0, 10**9],
        ]
    ),
    st.integers(-5, 100),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
)


@st.composite
def configs(draw) -> tuple[str, dict]:
    """("fti4cir" | "m2c", a config dict): a valid small config with a few values replaced by hostile ones."""
    kind = draw(st.sampled_from(["fti4cir", "m2c"]))
    config = dict(_valid_config(kind))
    keys = sorted(config)
    for key in draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3, unique=True)):
        config[key] = draw(HOSTILE_VALUES)
    if draw(st.integers(0, 9)) == 0:
        config[draw(st.text(max_size=8))] = 1  # an unknown key
    return kind, config


def _valid_config(kind: str) -> dict:
    if kind == "fti4cir":
        from .inversion import InversionConfig

        return InversionConfig(
            embed_dim=8, token_dim=8, patch_dim=8, num_k=4, topk=2, tf_layers=1, tf_heads=2
        ).to_dict()
    from .m2c.model import M2CConfig

    return M2CConfig(
        embed_dim=8,
        token_dim=8,
        text_layers=2,
        grid=(2, 2),
        middle_dim=8,
        vsi_dim=8,
        vsi_heads=2,
        vsi_depth=1,
        vsi_layers=(1,),
    ).to_dict()


class ConfigFiles:
    """One small valid weights file per kind, in a temporary folder; `check_config` writes hostile JSON beside it."""

    def __init__(self):
        import torch

        from .inversion import InversionConfig, InversionNetwork
        from .m2c.model import M2CConfig, M2CNetwork, save_m2c_weights
        from .weights import save_weights

        self.folder = Path(tempfile.mkdtemp(prefix="fti4cir-fuzz-"))
        torch.manual_seed(0)
        self.paths = {
            "fti4cir": save_weights(
                InversionNetwork(InversionConfig.from_dict(_valid_config("fti4cir"))),
                self.folder / "fti4cir.safetensors",
            ),
            "m2c": save_m2c_weights(
                M2CNetwork(M2CConfig.from_dict(_valid_config("m2c"))), self.folder / "m2c.safetensors"
            ),
        }

    def check(self, kind: str, config: dict) -> str:
        import torch

        from .inversion import InversionConfig, InversionNetwork
        from .m2c.model import M2CConfig, M2CNetwork, load_m2c_weights
        from .weights import config_path, load_weights

        path = self.paths[kind]
        config_path(path).write_text(json.dumps(config))
        try:
            parsed = (InversionConfig if kind == "fti4cir" else M2CConfig).from_dict(config)
        except (ValueError, TypeError, UserError) as e:
            assert len(str(e)) < 400, "message too long"
            parsed = None
        try:
            (load_weights if kind == "fti4cir" else load_m2c_weights)(path)
            loaded = True
        except UserError as e:
            assert len(str(e)) < 1200, "message too long"
            loaded = False
        if parsed is None:
            assert not loaded, "a config refused by from_dict was loaded"
            return "refused"
        with torch.device("meta"):  # an accepted config builds and runs without allocating anything
            if kind == "fti4cir":
                net = InversionNetwork(parsed)
                net(torch.zeros(2, parsed.embed_dim), torch.zeros(2, 5, parsed.patch_dim))
            else:
                M2CNetwork(parsed)
        return "ok" if loaded else "valid config, file refused"


# ---- pickles -------------------------------------------------------------------------------------------------------
ALLOWED_GLOBALS = [
    ("i2t_model", "IMG2TEXT"),
    ("i2t_model", "Phi"),
    ("MHTransformer", "Transformer"),
    ("torch.nn.modules.linear", "Linear"),
    ("torch.nn.modules.container", "ModuleList"),
    ("collections", "OrderedDict"),
    ("__builtin__", "set"),
    ("builtins", "frozenset"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "FloatStorage"),
    ("torch", "LongStorage"),
    ("torch.nn.functional", "relu"),
]
_NAMES = [
    "_modules",
    "_parameters",
    "_buffers",
    "_non_persistent_buffers_set",
    "weight",
    "bias",
    "0",
    "layers",
    "transformer",
    "attn",
    "num_heads",
    "num_k",
    "topk",
    "epsilon",
    "phi_s",
    "templates",
    "storage",
]


@st.composite
def pickle_programs(draw) -> bytes:
    """A protocol-2 pickle built from random pushes, containers, allowed globals, calls, state, memo and storage
    references (syntactically valid opcodes; the structure is whatever the draws make it)."""
    out = [b"\x80\x02"]
    memo = 0
    for _ in range(draw(st.integers(1, 60))):
        op = draw(
            st.sampled_from(
                [
                    "int",
                    "str",
                    "float",
                    "none",
                    "bool",
                    "tuple",
                    "list",
                    "dict",
                    "global",
                    "reduce",
                    "newobj",
                    "build",
                    "setitems",
                    "appends",
                    "mark",
                    "put",
                    "get",
                    "persid",
                    "pop",
                    "tuple2",
                    "dup",
                ]
            )
        )
        if op == "int":
            out.append(b"J" + struct.pack("<i", draw(st.integers(-(2**31), 2**31 - 1))))
        elif op == "str":
            text = draw(st.sampled_from(_NAMES)).encode()
            out.append(b"X" + struct.pack("<I", len(text)) + text)
        elif op == "float":
            out.append(b"G" + struct.pack(">d", draw(st.floats(allow_nan=True))))
        elif op == "none":
            out.append(b"N")
        elif op == "bool":
            out.append(draw(st.sampled_from([b"\x88", b"\x89"])))
        elif op in ("tuple", "list", "dict"):
            out.append({"tuple": b")", "list": b"]", "dict": b"}"}[op])
        elif op == "global":
            module, name = draw(st.sampled_from(ALLOWED_GLOBALS))
            out.append(b"c" + module.encode() + b"\n" + name.encode() + b"\n")
        else:
            out.append(
                {
                    "reduce": b"R",
                    "newobj": b"\x81",
                    "build": b"b",
                    "setitems": b"u",
                    "appends": b"e",
                    "mark": b"(",
                    "pop": b"0",
                    "tuple2": b"\x86",
                    "dup": b"2",
                    "persid": b"Q",
                }.get(op, b"")
            )
            if op == "put":
                out.append(b"q" + bytes([memo % 256]))
                memo += 1
            elif op == "get":
                out.append(b"h" + bytes([draw(st.integers(0, max(memo, 1) - 1)) % 256]))
    out.append(b".")
    return b"".join(out)


@st.composite
def mutated_pickles(draw, original: bytes) -> bytes:
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "delete", "duplicate", "byte"]))
        if action == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif action == "duplicate":
            data[at:at] = data[at : at + draw(st.integers(1, 32))]
        else:
            data[at] = draw(st.integers(0, 255))
        if not data:
            data = bytearray(b".")
    return bytes(data)


class ReleaseFiles:
    """Writes release archives around a given data.pkl: the storage members of a small official-structured file."""

    def __init__(self, template: Path):
        self.folder = Path(tempfile.mkdtemp(prefix="fti4cir-fuzz-pickles-"))
        with zipfile.ZipFile(template) as zf:
            self.members = {n: zf.read(n) for n in zf.namelist()}
        self.pkl_name = next(n for n in self.members if n.endswith("data.pkl"))
        self.original = self.members[self.pkl_name]
        self.prefix = self.pkl_name[: -len("data.pkl")]

    def check(self, data: bytes) -> str:
        from .convert import read_official

        path = self.folder / "release.pth"
        with zipfile.ZipFile(path, "w") as zf:
            for name, content in self.members.items():
                zf.writestr(name, data if name == self.pkl_name else content)
            zf.writestr(f"{self.prefix}data/fuzz", b"\x00" * 64)  # a storage key the programs may not name
        try:
            read_official(path)
        except UserError as e:
            assert len(str(e)) < 400, "message too long"
            return "refused"
        return "ok"


# ---- running -------------------------------------------------------------------------------------------------------
@dataclass
class Tally:
    examples: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    failure: str | None = None

    def count(self, outcome: str) -> None:
        self.examples += 1
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


def run_target(target: str, examples: int, release_template: Path | None = None) -> Tally:
    """Run one target's property over `examples` generated inputs; the tally of outcomes and the first failure."""
    tally = Tally()
    options = settings(
        max_examples=examples, deadline=None, database=None, derandomize=False, suppress_health_check=list(HealthCheck)
    )
    if target == "images":

        @options
        @given(image_files())
        def prop(data):
            tally.count(check_image(data))
    elif target == "texts":

        @options
        @given(texts())
        def prop(text):
            tally.count(check_text(text))
    elif target == "configs":
        files = ConfigFiles()

        @options
        @given(configs())
        def prop(drawn):
            tally.count(files.check(*drawn))
    elif target == "pickles":
        files = ReleaseFiles(release_template or _release_template())

        @options
        @given(st.one_of(pickle_programs(), mutated_pickles(files.original)))
        def prop(data):
            tally.count(files.check(data))
    else:
        raise ValueError(f"unknown fuzz target {target!r}")
    try:
        prop()
    except Exception:  # noqa: BLE001 - the property's failure, with hypothesis's minimal example
        tally.failure = traceback.format_exc(limit=-6)
    return tally


def _release_template() -> Path:
    """A small release-structured file (our official re-statement saved under the official class names)."""
    import types

    import torch

    from . import official

    folder = Path(tempfile.mkdtemp(prefix="fti4cir-fuzz-release-"))
    torch.manual_seed(0)
    net = official.OfficialIMG2TEXT(
        embed_dim=8,
        token_dim=8,
        patch_dim=8,
        num_k=4,
        topk=2,
        epsilon=0.1,
        tf_layer=1,
        tf_head=2,
        hy_regLoss=1.4,
        temperature=0.2,
    ).eval()
    classes = {
        "i2t_model": {"IMG2TEXT": official.OfficialIMG2TEXT, "Phi": official.Phi},
        "MHTransformer": {
            c: getattr(official, c) for c in ("MlpTransformer", "MultiHeadAttention", "TransformerLayer", "Transformer")
        },
    }
    saved = {}
    for module, names in classes.items():
        sys.modules[module] = types.ModuleType(module)
        for name, cls in names.items():
            saved[cls] = (cls.__module__, cls.__qualname__, cls.__name__)
            cls.__module__, cls.__qualname__, cls.__name__ = module, name, name
            setattr(sys.modules[module], name, cls)
    try:
        torch.save(net, folder / "release.pth")
    finally:
        for cls, (module, qualname, name) in saved.items():
            cls.__module__, cls.__qualname__, cls.__name__ = module, qualname, name
        for module in classes:
            sys.modules.pop(module)
    return folder / "release.pth"


TARGETS = ("images", "texts", "configs", "pickles")
