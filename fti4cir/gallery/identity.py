"""A gallery's model identity: what its vectors and tokens depend on, and the check that a model matches it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..digests import file_digest, parameter_digest
from ..errors import UserError


def gallery_identity(model, weights: str | None = None) -> dict:
    """What a gallery's vectors and tokens depend on. `weights` is provenance for people (a file's sha256, a hub id,
    "random-init:<seed>"); compatibility is decided by the parameter digests, however the weights were loaded."""
    # a random backbone's identity carries a digest of its values (Backbone.identity)
    return {**model.identity(), "weights": weights or "unknown", "inversion_digest": parameter_digest(model.inversion)}


def weights_label(weights: str | os.PathLike | None, seed: int = 0) -> str:
    """Provenance of the inversion weights for identity.json: a file's sha256, a hub id or the random-init seed."""
    if weights is None:
        return f"random-init:{seed}"
    if Path(weights).is_file():
        return f"sha256:{file_digest(weights)}"
    return str(weights)


# the identity keys that decide whether features are comparable
COMPARED = ("backbone", "pretrained", "embed_dim", "preprocess", "inversion_digest", "backbone_digest")


def describe_identity(identity: dict) -> str:
    """A model identity for messages: backbone, preprocessing, weights and the digests that tell models apart."""
    text = f"backbone {identity.get('backbone')}/{identity.get('pretrained')}, preprocess {identity.get('preprocess')}"
    text += f", inversion weights {identity.get('weights')} (digest {str(identity.get('inversion_digest'))[:12]})"
    if identity.get("backbone_digest"):
        text += f", random backbone digest {identity['backbone_digest'][:12]}"
    return text


def identity_differences(a: dict, b: dict) -> list[str]:
    """The identity keys in which two models differ (any difference makes their features incomparable)."""
    return [k for k in COMPARED if a.get(k) != b.get(k)]


def check_compatible(gallery_identity_: dict, model_identity: dict, name: str) -> None:
    """Refuse a model whose identity differs from the gallery's, naming both sides."""
    differs = identity_differences(gallery_identity_, model_identity)
    if differs:
        raise UserError(
            f"Gallery '{name}' was built with {describe_identity(gallery_identity_)}, but the loaded "
            f"model has {describe_identity(model_identity)} (differs in: {', '.join(differs)}). Load the "
            f"matching model or rebuild the gallery with this one (fti4cir index ... --name {name})."
        )


def identity_key(identity: dict) -> str:
    """A short key of the compared identity (names a build's staging folder, so other models' work is not reused)."""
    return hashlib.sha1(json.dumps({k: identity.get(k) for k in COMPARED}, sort_keys=True).encode()).hexdigest()[:12]
