"""fti4cir: zero-shot composed image retrieval with FTI4CIR (Lin et al., SIGIR 2024) on open_clip.

Data path: image -> visual features (`backbone`) -> pseudo tokens (`inversion`) -> composed text (`tokens`,
`prompts`) -> query vector (`compose`) -> index (`search`, `gallery`) -> ranked list.
"""
from .backbone import DEFAULT_MODEL, DEFAULT_PRETRAINED, TINY_MODEL, Backbone, VisualFeatures, load_backbone
from .compose import METHODS, compose, encode_with_pseudo_tokens
from .convert import convert_official, read_official
from .decode import decode, decoded_sentence
from .errors import UserError
from .inversion import InversionConfig, InversionNetwork, PseudoTokens
from .model import CIRModel, create_model
from .weights import load_weights, save_weights

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL", "DEFAULT_PRETRAINED", "TINY_MODEL", "METHODS", "Backbone", "VisualFeatures", "load_backbone",
    "compose", "encode_with_pseudo_tokens", "convert_official", "read_official", "decode", "decoded_sentence",
    "UserError", "InversionConfig", "InversionNetwork", "PseudoTokens", "CIRModel", "create_model", "load_weights",
    "save_weights",
]
