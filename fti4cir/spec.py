"""`ModelSpec`: what a model is built from, as data (a gallery stores it, the app and the Ray workers rebuild from it).

`fti4cir.factory.create_model(spec)` is the one function that turns it into a model."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from .errors import UserError
from .presets import DEFAULT_MODEL, DEFAULT_PRETRAINED

METHOD_FAMILIES = ("fti4cir", "m2c")


@dataclass(frozen=True)
class ModelSpec:
    """backbone: open_clip name or hf-hub:org/repo; pretrained: tag, local file or None (random); weights: the
    FTI4CIR inversion weights (.safetensors, official .pth, hub id; None = random from `seed`); m2c_weights: M2C
    weights run on the same backbone; model: a preset (fills backbone/pretrained/weights); family: which network the
    model is ("fti4cir" = CIRModel, "m2c" = M2CModel, whose weights are then `m2c_weights`)."""

    backbone: str = DEFAULT_MODEL
    pretrained: str | None = DEFAULT_PRETRAINED
    weights: str | None = None
    weights_revision: str | None = None
    m2c_weights: str | None = None
    preprocess: str = "targetpad"
    device: str | None = None
    seed: int | None = 0
    model: str | None = None
    family: str = "fti4cir"

    def __post_init__(self):
        for name in ("pretrained", "weights", "m2c_weights"):  # paths are kept as text (JSON, hashing, equality)
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, name, os.fspath(value))
        if self.family not in METHOD_FAMILIES:
            raise UserError(f"unknown model family {self.family!r}; one of {', '.join(METHOD_FAMILIES)}")

    def replace(self, **changes) -> ModelSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelSpec:
        """Unknown keys are refused (a typo must not silently build another model)."""
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise UserError(f"unknown model setting(s): {', '.join(sorted(unknown))}")
        return cls(**values)

    def resolved(self) -> ModelSpec:
        """The preset applied (official weights fetched once into the cache) and the pretrained default resolved: what
        is actually loaded. Idempotent."""
        from .backbone import resolve_pretrained
        from .presets import resolve_model

        backbone, pretrained, weights = resolve_model(self.model, self.backbone, self.pretrained, self.weights)
        return self.replace(
            model=None,
            backbone=backbone,
            pretrained=resolve_pretrained(backbone, pretrained),
            weights=None if weights is None else os.fspath(weights),
        )
