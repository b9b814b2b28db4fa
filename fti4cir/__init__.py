"""fti4cir: zero-shot composed image retrieval with FTI4CIR (Lin et al., SIGIR 2024) on open_clip.

Data path: image -> visual features (`backbone`) -> pseudo tokens (`inversion`) -> composed text (`tokens`,
`prompts`) -> query vector (`compose`) -> index (`search`, `gallery`) -> ranked list.

The names below are imported on first use (module `__getattr__`), so `import fti4cir` and the command line's help
import neither torch nor open_clip.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "DEFAULT_MODEL": "presets",
    "DEFAULT_PRETRAINED": "presets",
    "TINY_MODEL": "presets",
    "Backbone": "backbone",
    "VisualFeatures": "backbone",
    "load_backbone": "backbone",
    "METHODS": "compose",
    "compose": "compose",
    "encode_with_pseudo_tokens": "compose",
    "convert_official": "convert",
    "read_official": "convert",
    "decode": "decode",
    "decoded_sentence": "decode",
    "UserError": "errors",
    "InversionConfig": "inversion",
    "InversionNetwork": "inversion",
    "PseudoTokens": "inversion",
    "CIRModel": "model",
    "create_model": "factory",
    "ModelSpec": "spec",
    "load_weights": "weights",
    "save_weights": "weights",
    "official_weights": "presets",
    "Gallery": "gallery",
    "SearchService": "app_service",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fti4cir' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """`fti4cir.compose` and `fti4cir.decode` are functions although modules of the same names exist: importing such a
    module (which binds it on the package) leaves the package attribute to the function, as an eager import did."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
