"""Checks of the configs we read from files (weights configs, gallery manifests): types, ranges, finiteness.

A config file is input like an upload: a zero head count, a negative or string dimension, a NaN threshold or a
dimension of 4096 where 16 was meant must end in a short message, not in a ZeroDivisionError deep in a constructor
or a 4 GB allocation. `check_fields(cls, values, rules, what)` checks a dict against the rules of a dataclass's
fields (defaults filled in first, so relations between fields are checked too) and raises ValueError naming the
first bad field; callers turn it into a UserError. Sizes of the tensors are checked separately, against the
safetensors header, before anything is allocated (`fti4cir.weightfiles.build_network`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

from .inputs import quote

MAX_DIM = 16384  # widths: ViT-bigG's is 1664 and its MLP 8192; anything wider is a typo or an attack
MAX_COUNT = 4096  # layers, heads, queries, grid sides
MAX_TEXT = 1000  # free-text fields (backbone names, pretrained paths)
MAX_EXTRA_BYTES = 64 * 1024  # the free-form "extra" dict, as JSON


@dataclass(frozen=True)
class Int:
    low: int
    high: int

    def check(self, value, name: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be a whole number, not {_what(value)}")
        if not self.low <= value <= self.high:
            shown = value if abs(value) < 10**12 else "a huge number"
            raise ValueError(f"{name} must be in {self.low}..{self.high}, not {shown}")


@dataclass(frozen=True)
class Float:
    low: float
    high: float
    low_open: bool = False  # the low end itself is excluded (a temperature of 0 divides by zero)

    def check(self, value, name: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, not {_what(value)}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, not {value}")
        if not (self.low < value if self.low_open else self.low <= value) or value > self.high:
            raise ValueError(
                f"{name} must be in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}], not {value:g}"
            )


@dataclass(frozen=True)
class Text:
    max_chars: int = MAX_TEXT

    def check(self, value, name: str) -> None:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be text, not {_what(value)}")
        if len(value) > self.max_chars:
            raise ValueError(f"{name} is longer than {self.max_chars} characters")


@dataclass(frozen=True)
class Ints:
    """A list (or tuple) of whole numbers, each checked by `item`; `length` fixes how many."""

    item: Int
    length: int | None = None
    max_items: int = MAX_COUNT

    def check(self, value, name: str) -> None:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list of whole numbers, not {_what(value)}")
        if (self.length is not None and len(value) != self.length) or len(value) > self.max_items:
            raise ValueError(f"{name} must have {self.length or f'at most {self.max_items}'} items, not {len(value)}")
        for i, v in enumerate(value):
            self.item.check(v, f"{name}[{i}]")


@dataclass(frozen=True)
class JsonDict:
    """A free-form dict, small once written as JSON."""

    max_bytes: int = MAX_EXTRA_BYTES

    def check(self, value, name: str) -> None:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a dict, not {_what(value)}")
        try:
            size = len(json.dumps(value, allow_nan=False))
        except (TypeError, ValueError, RecursionError):
            raise ValueError(f"{name} must hold only plain JSON values") from None
        if size > self.max_bytes:
            raise ValueError(f"{name} is larger than {self.max_bytes // 1024} kB")


Rule = Int | Float | Text | Ints | JsonDict
Relation = tuple[str, Callable[[dict], bool]]  # (what must hold, as a message; the test)


def check_fields(cls, values, rules: dict[str, Rule], what: str, relations: tuple[Relation, ...] = ()) -> dict:
    """`values` (a config dict read from a file) checked for the dataclass `cls`: no unknown or missing keys, every
    field (defaults filled in) valid under its rule, then the relations. Returns the filled-in dict; ValueError."""
    if not isinstance(values, dict):
        raise ValueError(f"the {what} config must be a JSON object, not {_what(values)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise ValueError(f"Unknown config keys: {', '.join(quote(k) for k in sorted(map(str, unknown))[:5])}")
    filled = {}
    for name, f in fields.items():
        if name in values:
            filled[name] = values[name]
        elif f.default is not dataclasses.MISSING:
            filled[name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            filled[name] = f.default_factory()
        else:
            raise ValueError(f"the {what} config has no {name}")
    for name, rule in rules.items():
        rule.check(filled[name], f"{what} {name}")
    for description, holds in relations:
        if not holds(filled):
            raise ValueError(f"the {what} config breaks {description}")
    return filled


def _what(value) -> str:
    return f"{type(value).__name__} {quote(value, 20)}"


DIM = Int(1, MAX_DIM)
COUNT = Int(1, MAX_COUNT)
FRACTION = Float(0.0, 1.0)

INVERSION_RULES: dict[str, Rule] = {
    "embed_dim": DIM,
    "token_dim": DIM,
    "patch_dim": DIM,
    "num_k": COUNT,
    "topk": COUNT,
    "epsilon": FRACTION,
    "tf_layers": Int(0, 64),
    "tf_heads": COUNT,
    "mlp_ratio": Float(0.0, 64.0, low_open=True),
    "dropout": FRACTION,
    "temperature": Float(0.0, 100.0, low_open=True),
    "reg_weight": Float(0.0, 1e6),
    "subject_weight": Float(0.0, 1e6),
    "backbone": Text(),
    "pretrained": Text(),
    "version": Int(1, 1),
    "extra": JsonDict(),
}
INVERSION_RELATIONS: tuple[Relation, ...] = (
    ("topk <= num_k", lambda c: c["topk"] <= c["num_k"]),
    ("patch_dim divisible by tf_heads", lambda c: c["patch_dim"] % c["tf_heads"] == 0),
    ("1 <= patch_dim * mlp_ratio <= 4 * 16384", lambda c: 1 <= int(c["patch_dim"] * c["mlp_ratio"]) <= 4 * MAX_DIM),
)

M2C_RULES: dict[str, Rule] = {
    "embed_dim": DIM,
    "token_dim": DIM,
    "text_layers": Int(1, 1024),
    "grid": Ints(COUNT, length=2),
    "middle_dim": DIM,
    "dropout": FRACTION,
    "vsi_dim": DIM,
    "vsi_heads": COUNT,
    "vsi_depth": Int(0, 64),
    "vsi_layers": Ints(Int(0, 1023), max_items=1024),
    "adapter_layers": Ints(Int(0, 1023), max_items=1024),
    "adapter_rank": DIM,
    "backbone": Text(),
    "pretrained": Text(),
    "method": Text(),
    "version": Int(1, 1),
    "extra": JsonDict(),
}
M2C_RELATIONS: tuple[Relation, ...] = (
    ("vsi_dim divisible by vsi_heads", lambda c: c["vsi_dim"] % c["vsi_heads"] == 0),
)
