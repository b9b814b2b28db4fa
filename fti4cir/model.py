"""CIRModel = frozen CLIP backbone + inversion network + image transform (built by `fti4cir.factory.create_model`).

`BackboneModel` is what every method's model shares (FTI4CIR here, M2C in `fti4cir.m2c.model`): the backbone, the
image transform and the identity feature caches are keyed by."""

from __future__ import annotations

import PIL.Image
import torch
from torch import nn

from .backbone import Backbone, VisualFeatures
from .inversion import InversionNetwork, PseudoTokens
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
    # The M2C model on the same backbone, when the spec names M2C weights (set by `fti4cir.factory`; a plain
    # attribute, not a submodule, because it shares this model's backbone).
    m2c = None

    def __init__(self, backbone: Backbone, inversion: InversionNetwork, preprocess: str = "targetpad"):
        super().__init__(backbone, preprocess)
        self.inversion = inversion.to(backbone.device)

    def invert(self, visual: VisualFeatures | torch.Tensor, return_attention: bool = False) -> PseudoTokens:
        if isinstance(visual, torch.Tensor):
            visual = self.backbone.encode_visual(visual)
        return self.inversion(visual.global_features.float(), visual.patch_tokens.float(), return_attention)
