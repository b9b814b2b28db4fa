"""What a gallery is built from and with: its definition file `galleries/<name>.json` (source and model), and the model
a gallery knows (`gallery_model_spec`: from the definition beside it, else what its manifest records)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UserError
from ..spec import ModelSpec
from .store import Gallery

DEFINITION_KEYS = {"source", "backbone", "pretrained", "weights", "m2c_weights", "preprocess", "index", "description"}
DEFINITION_MODEL_KEYS = ("backbone", "pretrained", "weights", "m2c_weights", "preprocess")


def read_definition(path: str | os.PathLike) -> dict:
    """A gallery definition `<name>.json`: {"source", "backbone", "pretrained", "weights"[, "m2c_weights",
    "preprocess", "index", "description"]}. Relative paths in it (source, a benchmark root, weight files) are relative
    to the file."""
    path = Path(path)
    try:
        definition = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"Cannot read gallery definition {path}: {e}") from None
    if not isinstance(definition, dict) or "source" not in definition or set(definition) - DEFINITION_KEYS:
        raise UserError(
            f"Gallery definition {path} must be a JSON object with 'source' and only the keys "
            f"{', '.join(sorted(DEFINITION_KEYS))}"
        )
    base = path.resolve().parent
    source = str(definition["source"])
    if source.startswith("benchmark:"):
        head, _, root = source.rpartition(":")
        source = f"{head}:{(base / root).resolve()}"
    else:
        source = str((base / source).resolve())
    definition["source"] = source
    for key in ("pretrained", "weights", "m2c_weights"):
        value = definition.get(key)
        if isinstance(value, str) and (base / value).exists():
            definition[key] = str((base / value).resolve())
    return definition


def definition_model_spec(definition: dict) -> ModelSpec:
    """The model a (read) definition names; keys it leaves out take the defaults `fti4cir index` uses."""
    return ModelSpec(**{k: definition[k] for k in DEFINITION_MODEL_KEYS if k in definition})


class NotRecorded(str):
    """A value of `gallery_model_spec` that cannot be turned back into a flag (a file known only by its digest): the
    text says which flag gives it. Building the model with it left in is a mistake: check with `not_recorded`."""


def not_recorded(spec: ModelSpec) -> list[NotRecorded]:
    """The values of a spec from `gallery_model_spec` that the gallery could not tell (give them as flags)."""
    return [v for v in (spec.pretrained, spec.weights, spec.m2c_weights) if isinstance(v, NotRecorded)]


def gallery_model_spec(name_or_dir: str | os.PathLike, galleries_dir: str | os.PathLike = "galleries") -> ModelSpec:
    """The `ModelSpec` a gallery was built with: from its definition file `<name>.json` beside it when there is one,
    else from the model its manifest records (galleries built by `fti4cir index` since it records one), else from the
    identity it records. A weight file known only by its digest comes back as a `NotRecorded` text."""
    directory = Path(name_or_dir) if Path(name_or_dir).is_dir() else Path(galleries_dir) / name_or_dir
    definition = directory.with_name(directory.name + ".json")
    if definition.is_file():
        return definition_model_spec(read_definition(definition))
    gallery = Gallery.load(name_or_dir, galleries_dir=galleries_dir, verify=False)
    stored = _stored_spec(gallery.manifest.get("model"))
    return stored if stored is not None else _identity_spec(gallery.identity)


def _stored_spec(stored) -> ModelSpec | None:
    """The recorded ModelSpec when it can be used here (its files exist), else None (the identity decides)."""
    if not isinstance(stored, dict):
        return None
    try:
        spec = ModelSpec.from_dict(stored)
    except (UserError, TypeError):
        return None
    files = [v for v in (spec.pretrained, spec.weights, spec.m2c_weights) if isinstance(v, str) and os.path.isabs(v)]
    return spec if all(Path(f).exists() for f in files) else None


def _identity_spec(identity: dict) -> ModelSpec:
    pretrained = identity.get("pretrained")
    pretrained = None if pretrained in (None, "None") else pretrained
    if isinstance(pretrained, str) and pretrained.startswith("sha256:"):
        pretrained = _not_recorded("a local CLIP checkpoint", pretrained, "--pretrained /path/to/checkpoint")
    weights, seed = identity.get("weights"), 0
    if weights in (None, "unknown"):  # provenance not recorded: the digest check at load decides
        weights = None
    elif isinstance(weights, str) and weights.startswith("random-init:"):
        weights, seed = None, int(weights.split(":", 1)[1] or 0)
    elif isinstance(weights, str) and weights.startswith("sha256:"):
        weights = _not_recorded("a local weights file", weights, "--weights FILE.safetensors")
    return ModelSpec(
        backbone=identity.get("backbone"),
        pretrained=pretrained,
        weights=weights,
        preprocess=identity.get("preprocess", "targetpad"),
        seed=seed,
    )


def _not_recorded(what: str, digest: str, flag: str) -> NotRecorded:
    return NotRecorded(f"{what} ({digest[:19]}...), give it with {flag}")
