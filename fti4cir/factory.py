"""The one model factory: `create_model(spec)` builds every model the app, `index`, the Ray workers, evaluation and
training use, from a `ModelSpec` (or its fields).

It sits above the core and `fti4cir.m2c` because it builds both: an FTI4CIR `CIRModel` (with the M2C model of
`spec.m2c_weights` on the same backbone as `.m2c`), or, for `family="m2c"`, an `M2CModel`."""

from __future__ import annotations

import torch

from .backbone import load_backbone
from .inversion import InversionConfig, InversionNetwork
from .m2c.model import M2CConfig, M2CModel, M2CNetwork, load_m2c_weights
from .model import CIRModel
from .spec import ModelSpec
from .weights import load_weights


def create_model(spec: ModelSpec | str | None = None, *args, m2c_config: dict | None = None, **fields):
    """A ready model (eval mode). `spec`: a ModelSpec, or its fields as arguments (`create_model("ViT-L-14",
    "openai", weights=...)`); fields given beside a ModelSpec override it. Random networks (no weights) and random
    backbones (pretrained None) come from `spec.seed`. `m2c_config`: shape of a random M2C network (training).

    FTI4CIR weights: our .safetensors, an official release .pth (converted on the fly, safely), a Hugging Face hub id
    ("org/repo" or "org/repo/file.safetensors", optionally "@revision"; or `weights_revision`)."""
    if not isinstance(spec, ModelSpec):
        spec = ModelSpec(*((spec,) if spec is not None else ()), *args, **fields)
    elif args or fields:
        spec = spec.replace(**dict(zip(("backbone", "pretrained", "weights"), args)), **fields)
    spec = spec.resolved()
    if spec.seed is not None:  # makes random backbones and random networks reproducible
        torch.manual_seed(spec.seed)
    backbone = load_backbone(spec.backbone, spec.pretrained, spec.device)
    if spec.family == "m2c":
        return _m2c_model(backbone, spec.m2c_weights, spec.preprocess, m2c_config)
    if spec.weights is None:
        net = InversionNetwork(InversionConfig.for_backbone(backbone))
    else:
        net = load_weights(spec.weights, expect_backbone=backbone, revision=spec.weights_revision)
    model = CIRModel(backbone, net.eval(), spec.preprocess)
    if spec.m2c_weights is not None:
        model.__dict__["m2c"] = _m2c_model(backbone, spec.m2c_weights, spec.preprocess, None)  # see CIRModel.m2c
    return model


def _m2c_model(backbone, weights, preprocess: str, config: dict | None) -> M2CModel:
    if weights is None:
        net = M2CNetwork(M2CConfig.for_backbone(backbone, **(config or {})))
    else:
        net = load_m2c_weights(weights)
    return M2CModel(backbone, net.eval(), preprocess)
