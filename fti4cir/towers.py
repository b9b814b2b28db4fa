"""Visual towers beside open_clip's plain ViT: a convolutional stem in place of the patch embedding.

Small data favours convolutional inductive bias ("Early convolutions help transformers see better", Xiao et al.,
2021): a few stride-2 convolution stages turn the image into the same grid of tokens the ViT's patch embedding
would make, and the transformer, class token, pooling and projection stay open_clip's. So the tower still yields a
global feature and a grid of patch tokens, which is all FTI4CIR and M2C need.

A model config with a stem lives beside its open_clip config as `model_configs/conv_stems/<name>.json`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError

STEM_CONFIG_DIR = Path(__file__).parent / "model_configs" / "conv_stems"


@dataclass(frozen=True)
class ConvStemConfig:
    channels: tuple[int, ...]  # one stride-2 stage per entry: conv 3x3 + BatchNorm + ReLU, then `blocks` residuals
    blocks: int = 1

    @property
    def stride(self) -> int:
        return 2 ** len(self.channels)

    @classmethod
    def from_dict(cls, d: dict) -> ConvStemConfig:
        channels = d.get("channels")
        blocks = d.get("blocks", 1)
        if not (
            isinstance(channels, list) and channels and all(isinstance(c, int) and 0 < c <= 4096 for c in channels)
        ):
            raise UserError(f"conv stem 'channels' must be a non-empty list of positive integers, got {channels!r}")
        if not (isinstance(blocks, int) and 0 <= blocks <= 16):
            raise UserError(f"conv stem 'blocks' must be an integer in 0..16, got {blocks!r}")
        return cls(tuple(channels), blocks)

    def to_dict(self) -> dict:
        return {**asdict(self), "channels": list(self.channels)}


def stem_config(model_name: str) -> ConvStemConfig | None:
    """The registered stem of `model_name`, or None for a plain open_clip model."""
    path = STEM_CONFIG_DIR / f"{model_name}.json"
    return ConvStemConfig.from_dict(json.loads(path.read_text())) if path.exists() else None


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class Residual(nn.Module):
    """Two 3x3 convolutions with BatchNorm around an identity shortcut (a ResNet basic block)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn_relu(channels, channels, 1),
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class ConvStem(nn.Module):
    """[B, 3, S, S] -> [B, width, S / stride, S / stride]: the drop-in for a ViT's `conv1` patch embedding."""

    def __init__(self, config: ConvStemConfig, width: int):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in config.channels:
            layers += _conv_bn_relu(c_in, c, 2) + [Residual(c) for _ in range(config.blocks)]
            c_in = c
        layers.append(nn.Conv2d(c_in, width, 1))
        self.layers = nn.Sequential(*layers)
        self.out_channels = width  # what `Backbone.patch_dim` reads, as from the ViT's conv1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def attach_conv_stem(clip_model: nn.Module, model_name: str) -> None:
    """Replace the ViT patch embedding of `clip_model` by the stem registered for `model_name` (no-op without one).
    Called before any weights are loaded, so checkpoints hold the stem's tensors under `visual.conv1.*`."""
    config = stem_config(model_name)
    if config is None:
        return
    visual = clip_model.visual
    patch = visual.conv1.kernel_size[0]
    if config.stride != patch:
        raise UserError(f"conv stem of {model_name} has stride {config.stride} but its ViT config patch size {patch}")
    visual.conv1 = ConvStem(config, visual.conv1.out_channels)
