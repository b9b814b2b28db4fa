"""Model names and presets: light (no torch), so the command line can offer them before anything heavy is imported.

`fti4cir-official` = CLIP ViT-L/14 (OpenAI) + the official FTI4CIR weights, published by the authors on the Hugging
Face Hub (model repository `iLearn-Lab/SIGIR24-FTI4CIR`, Apache-2.0). The release checkpoint is found among the
repository's files, downloaded once into the Hugging Face cache, converted safely (`fti4cir.convert`, no pickle code
runs) into `<HF cache>/fti4cir-converted/<content id>/`, and that converted file is reused on later starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

TINY_MODEL = "fti4cir-tiny"
DEFAULT_MODEL = "ViT-L-14"
DEFAULT_PRETRAINED = "openai"

OFFICIAL = "fti4cir-official"
OFFICIAL_REPO = "iLearn-Lab/SIGIR24-FTI4CIR"
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
CONVERTED_DIR = "fti4cir-converted"


@dataclass(frozen=True)
class Preset:
    backbone: str
    pretrained: str
    repo: str
    description: str


PRESETS = {
    OFFICIAL: Preset(
        DEFAULT_MODEL,
        DEFAULT_PRETRAINED,
        OFFICIAL_REPO,
        "ViT-L-14/openai + the official FTI4CIR weights from the Hub (Apache-2.0)",
    ),
}


def pick_checkpoint(files: list[str]) -> str:
    """The release checkpoint among a repository's files: a PyTorch file, 'best' first, then the highest epoch."""
    candidates = [f for f in files if f.lower().endswith(CHECKPOINT_SUFFIXES)]
    if not candidates:
        shown = ", ".join(files[:20]) or "none"
        raise UserError(f"No checkpoint ({'/'.join(CHECKPOINT_SUFFIXES)}) among the files of {OFFICIAL_REPO}: {shown}")

    def rank(name: str):
        numbers = [int(n) for n in re.findall(r"\d+", Path(name).stem)]
        return ("best" not in name.lower(), -(numbers[-1] if numbers else -1), name.count("/"), name)

    return min(candidates, key=rank)


def official_weights(revision: str | None = None) -> Path:
    """The official weights converted to our .safetensors (+ .json), from the cache when converted before."""
    from . import hub
    from .convert import convert_official

    preset = PRESETS[OFFICIAL]
    files = hub.list_files(preset.repo, revision=revision)
    if not files:
        raise UserError(
            f"The official FTI4CIR weights ({preset.repo} on the Hugging Face Hub) are not in the cache "
            f"({hub.cache_dir()}) and the Hub ({hub.endpoint()}) is unreachable or HF_HUB_OFFLINE is set. "
            "Run once with network access, or convert a downloaded release yourself: fti4cir convert "
            "model_best.pth weights/fti4cir_vit-l-14.safetensors, then pass --weights."
        )
    checkpoint = pick_checkpoint(files)
    source = hub.download(preset.repo, checkpoint, revision=revision, what="the official FTI4CIR checkpoint")
    content_id = source.resolve().name[:32]  # the cache's blob name: the file's content hash
    out = hub.cache_dir() / CONVERTED_DIR / content_id / "fti4cir_vit-l-14.safetensors"
    if not (out.is_file() and out.with_suffix(".json").is_file()):
        out.parent.mkdir(parents=True, exist_ok=True)
        convert_official(source, out, preset.backbone, preset.pretrained)
    return out


def resolve_model(model: str | None, backbone: str, pretrained, weights):
    """The command lines' --model: a preset's (backbone, pretrained, weights); without one the flags as given.
    --weights or another --backbone contradict a preset and are refused; --pretrained may name a local CLIP file."""
    if model is None:
        return backbone, pretrained, weights
    if model not in PRESETS:
        raise UserError(f"Unknown --model {model[:100]!r}; presets: {', '.join(PRESETS)}")
    preset = PRESETS[model]
    if weights is not None:
        raise UserError(f"--model {model} brings its own weights; leave out --weights")
    if backbone.replace("/", "-") != preset.backbone:
        raise UserError(f"--model {model} is backbone {preset.backbone}; leave out --backbone {backbone[:100]}")
    # --pretrained may point at a local copy of the same CLIP (offline machines)
    return preset.backbone, pretrained if pretrained is not None else preset.pretrained, str(official_weights())
