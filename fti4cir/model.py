"""CIRModel = frozen CLIP backbone + inversion network + image transform; the factory `create_model`.

`BackboneModel` is what every method's model shares (FTI4CIR here, M2C in `fti4cir.m2c.model`): the backbone, the
image transform and the identity feature caches are keyed by."""
from __future__ import annotations

import os

import PIL.Image
import torch
from torch import nn

from .backbone import Backbone, VisualFeatures, load_backbone
from .inversion import InversionConfig, InversionNetwork, PseudoTokens
from .presets import DEFAULT_MODEL, DEFAULT_PRETRAINED
from .preprocess import make_transform, preprocess_batch


class BackboneModel(nn.Module):
    """A frozen backbone with its image transform; the base of each method's model."""

    def __init__(self, backbone: Backbone, preprocess: str):
        super().__init__()
        self.backbone = backbone
        self.preprocess_kind = preprocess
        self.transform = make_transform(preprocess, backbone.image_size)

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def preprocess(self, images: list[PIL.Image.Image]) -> torch.Tensor:
        return preprocess_batch(images, self.transform).to(self.device)

    def identity(self) -> dict:
        """Backbone + preprocessing: what gallery / feature caches are keyed by (weights add their own hash)."""
        return {**self.backbone.identity(), "preprocess": self.preprocess_kind}


class CIRModel(BackboneModel):
    def __init__(self, backbone: Backbone, inversion: InversionNetwork, preprocess: str = "targetpad"):
        super().__init__(backbone, preprocess)
        self.inversion = inversion.to(backbone.device)

    def invert(self, visual: VisualFeatures | torch.Tensor, return_attention: bool = False) -> PseudoTokens:
        if isinstance(visual, torch.Tensor):
            visual = self.backbone.encode_visual(visual)
        return self.inversion(visual.global_features.float(), visual.patch_tokens.float(), return_attention)


def create_model(
    backbone: str = DEFAULT_MODEL,
    pretrained: str | os.PathLike | None = DEFAULT_PRETRAINED,
    weights: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    preprocess: str = "targetpad",
    seed: int | None = 0,
    weights_revision: str | None = None,
) -> CIRModel:
    """Build a ready model. `weights`: our .safetensors, an official release .pth (converted on the fly, safely), a
    Hugging Face hub id ("org/repo" or "org/repo/file.safetensors", optionally "@revision"; or `weights_revision`),
    or None for a randomly initialised inversion network (for tests, training from scratch and offline demos). `seed`
    seeds every random initialisation. The preset of the official weights: `fti4cir.presets.official_weights()`."""
    from .weights import load_weights

    if seed is not None:  # makes random backbones (pretrained=None) and random inversion networks reproducible
        torch.manual_seed(seed)
    bb = load_backbone(backbone, pretrained, device)
    if weights is None:
        net = InversionNetwork(InversionConfig.for_backbone(bb))
    else:
        net = load_weights(weights, expect_backbone=bb, revision=weights_revision)
    return CIRModel(bb, net.eval(), preprocess)
