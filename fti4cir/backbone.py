"""Frozen CLIP backbone (open_clip): loading, the one-pass visual encoder and pseudo-token text encoding.

Data path position: image -> **visual features** (global + patch tokens); token ids + pseudo tokens ->
**text features**.
"""

from __future__ import annotations

import contextlib
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from . import hub
from .digests import file_digest, parameter_digest
from .errors import UserError
from .presets import DEFAULT_MODEL, DEFAULT_PRETRAINED, TINY_MODEL
from .tokens import EOT_ID, PLACEHOLDER_ID, SOT_ID
from .towers import attach_conv_stem

HF_HUB_PREFIX = "hf-hub:"  # open_clip's name form for a model repository on the Hub (config + weights in the repo)

open_clip.add_model_config(Path(__file__).parent / "model_configs")


class BackboneUnavailable(UserError):
    """Pretrained CLIP weights could not be found or downloaded."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class VisualFeatures:
    """Output of one pass of the visual tower."""

    global_features: torch.Tensor  # [B, embed_dim], exactly `encode_image` (not normalised)
    patch_tokens: torch.Tensor  # [B, 1 + grid**2, visual_width], last block output before ln_post/proj


class Backbone(nn.Module):
    """A frozen open_clip CLIP with the two entry points FTI4CIR needs."""

    def __init__(self, clip_model: nn.Module, name: str, pretrained: str | None, preprocess_cfg: dict):
        super().__init__()
        self.clip = clip_model.eval().requires_grad_(False)
        self.name = name
        self.pretrained = pretrained
        self.preprocess_cfg = preprocess_cfg
        self.placeholder_id, self.sot_id, self.eot_id = PLACEHOLDER_ID, SOT_ID, EOT_ID
        self._identity: dict | None = None

    # ---- dimensions -------------------------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return self.clip.text_projection.shape[1]

    @property
    def token_dim(self) -> int:
        return self.clip.token_embedding.embedding_dim

    @property
    def patch_dim(self) -> int:
        return self.clip.visual.conv1.out_channels

    @property
    def context_length(self) -> int:
        return self.clip.positional_embedding.shape[0]

    @property
    def image_size(self) -> int:
        size = self.clip.visual.image_size
        return size[0] if isinstance(size, (tuple, list)) else int(size)

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.clip.visual.grid_size)

    @property
    def device(self) -> torch.device:
        return self.clip.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.clip.token_embedding.weight.dtype

    def identity(self) -> dict:
        """What makes features from this backbone comparable: used as a cache / gallery key. A random-weight
        backbone is named by a digest of its values (no tag names them)."""
        if self._identity is None:
            # a local checkpoint is named by its content, so a gallery built here matches in any clone or folder
            pretrained = (
                f"sha256:{file_digest(self.pretrained)}"
                if self.pretrained and os.path.isfile(self.pretrained)
                else str(self.pretrained)
            )
            self._identity = {"backbone": self.name, "pretrained": pretrained, "embed_dim": self.embed_dim}
            if self.pretrained is None:
                self._identity["backbone_digest"] = parameter_digest(self.clip)
        return dict(self._identity)

    def train(self, mode: bool = True):  # the towers stay frozen and in eval mode
        return super().train(False)

    # ---- visual ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_visual(self, images: torch.Tensor) -> VisualFeatures:
        """One visual pass giving the global feature and the official FTI4CIR patch tokens.

        The official code runs the tower twice (once for `encode_image`, once again for the tokens); the tokens are
        the last transformer block's output, which is also the input of `ln_post`, so one pass yields both.
        """
        visual = self.clip.visual
        x = visual._embeds(images.to(self.device, self.dtype))
        tokens = visual.transformer(x)
        pooled, _ = visual._pool(tokens)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return VisualFeatures(pooled, tokens)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(images.to(self.device, self.dtype))

    # ---- text -----------------------------------------------------------------------------------------------
    def encode_tokens(
        self,
        token_ids: torch.Tensor,
        pseudo_tokens: torch.Tensor | None = None,
        placeholder_mask: torch.Tensor | None = None,
        *,
        truncate_context: bool = True,
    ) -> torch.Tensor:
        """Text features with pseudo-word tokens injected (batched; differentiable w.r.t. `pseudo_tokens`).

        token_ids: [B, L] CLIP BPE ids with SOT ... EOT, zero padded.
        pseudo_tokens: [B, P, token_dim]; the k-th True position of `placeholder_mask[b]` takes `pseudo_tokens[b, k]`.
        truncate_context: run only up to the longest sequence in the batch. CLIP's text mask is causal, so positions
            after a sequence's EOT never influence its EOT feature: the result equals the full-context pass.
        """
        token_ids = token_ids.to(self.device)
        eot_pos = (token_ids == self.eot_id).int().argmax(dim=1)
        length = int(eot_pos.max()) + 1 if truncate_context else self.context_length
        token_ids = token_ids[:, :length]
        x = self.clip.token_embedding(token_ids)
        if pseudo_tokens is not None:
            mask = placeholder_mask[:, :length].to(self.device)
            slot = (mask.long().cumsum(dim=1) - 1).clamp(min=0, max=pseudo_tokens.shape[1] - 1)
            gathered = pseudo_tokens.to(x.dtype).gather(1, slot.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            x = torch.where(mask.unsqueeze(-1), gathered, x)
        x = x + self.clip.positional_embedding[:length].to(x.dtype)
        attn_mask = self.clip.attn_mask[:length, :length] if self.clip.attn_mask is not None else None
        x = self.clip.transformer(x, attn_mask=attn_mask)
        x = self.clip.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot_pos]
        return x @ self.clip.text_projection

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Plain CLIP text features (no pseudo tokens), context truncated exactly."""
        from .tokens import tokenize_plain

        return self.encode_tokens(tokenize_plain(self, texts))


# ---- loading ------------------------------------------------------------------------------------------------------
def _is_jit_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


class _RandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _without_random_init_notice():
    """open_clip says the model is "initialized randomly" before we load a local checkpoint into it: not so."""
    notice, root = _RandomInitNotice(), logging.getLogger()
    root.addFilter(notice)
    try:
        yield
    finally:
        root.removeFilter(notice)


def _load_local_checkpoint(model: nn.Module, path: Path) -> None:
    if _is_jit_archive(path):
        # OpenAI's release files are TorchScript archives; torch.jit.load runs no Python pickle code.
        state_dict = torch.jit.load(str(path), map_location="cpu").state_dict()
        for key in ("input_resolution", "context_length", "vocab_size"):
            state_dict.pop(key, None)
        model.load_state_dict(state_dict, strict=True)
    else:
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)


def resolve_pretrained(name: str, pretrained: str | os.PathLike | None) -> str | os.PathLike | None:
    """The command lines' default tag ("openai") means random weights for the tiny model, which has no pretrained
    weights anywhere, and "the repository's weights" for an `hf-hub:org/repo` backbone; every other value is kept."""
    if pretrained == DEFAULT_PRETRAINED and name.startswith(HF_HUB_PREFIX):
        return "hf-hub"
    return None if name == TINY_MODEL and pretrained == DEFAULT_PRETRAINED else pretrained


def load_backbone(
    name: str = DEFAULT_MODEL,
    pretrained: str | os.PathLike | None = DEFAULT_PRETRAINED,
    device: str | torch.device | None = None,
    *,
    quick_gelu: bool | None = None,
    cache_dir: str | None = None,
) -> Backbone:
    """Load a frozen CLIP by open_clip model name and pretrained tag, or from a local checkpoint file.

    name: an open_clip model name, or `hf-hub:org/repo` (open_clip's form for a Hub repository holding
        `open_clip_config.json` and the weights; `pretrained` is then "hf-hub", the repository's own weights).
    pretrained: an open_clip tag ("openai", "laion2b_s32b_b82k", ...), a local file (OpenAI JIT archive, OpenAI or
        open_clip state dict, .safetensors), or None for random weights (tests, benchmarks of timing).
    quick_gelu: OpenAI weights were trained with QuickGELU; default: on for the "openai" tag and OpenAI JIT files.
    Raises BackboneUnavailable (with what was tried and how to give a local path) when weights cannot be had.
    """
    device = torch.device(device) if device is not None else default_device()
    if name.startswith(HF_HUB_PREFIX):
        model = _load_hf_hub(name, pretrained, cache_dir)
        return Backbone(model.to(device), name, "hf-hub", dict(getattr(model.visual, "preprocess_cfg", {})))
    name = name.replace("/", "-")
    if name not in open_clip.list_models():
        raise UserError(f"Unknown backbone '{name}'. Known: {', '.join(open_clip.list_models()[:12])}, ...")
    local = Path(pretrained) if pretrained is not None and os.path.exists(pretrained) else None
    if quick_gelu is None:
        quick_gelu = pretrained == "openai" or (local is not None and _is_jit_archive(local))

    kwargs = dict(precision="fp32", device="cpu", force_quick_gelu=bool(quick_gelu), cache_dir=cache_dir)
    if pretrained is None or local is not None:
        with _without_random_init_notice() if local is not None else contextlib.nullcontext():
            model, _, _ = open_clip.create_model_and_transforms(name, pretrained=None, **kwargs)
        attach_conv_stem(model, name)
        if local is not None:
            try:
                _load_local_checkpoint(model, local)
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint gets the same actionable message
                raise BackboneUnavailable(f"Could not load CLIP weights for {name} from {local}: {e}") from e
    else:
        tag = str(pretrained)
        if not open_clip.get_pretrained_cfg(name, tag):
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise UserError(f"'{tag}' is neither a file nor a pretrained tag of {name}. Tags: {tags}")
        model = _cache_then_hub(
            lambda: open_clip.create_model_and_transforms(name, pretrained=tag, **kwargs)[0],
            lambda: _offline_message(name, tag, cache_dir),
        )
    preprocess_cfg = dict(getattr(model.visual, "preprocess_cfg", {}))
    model = model.to(device)
    return Backbone(model, name, None if pretrained is None else str(pretrained), preprocess_cfg)


def _cache_then_hub(create, message):
    """`create()` answered from the Hugging Face cache only (no network, no hang), else with the network when
    huggingface_hub's settings let it reach the Hub; BackboneUnavailable with `message()` otherwise."""
    with hub.offline(), contextlib.suppress(Exception):
        return create()
    if not hub.reachable():
        raise BackboneUnavailable(message())
    try:
        return create()
    except Exception as e:
        raise BackboneUnavailable(message() + f"\nDownload error: {str(e)[:300]}") from e


def _load_hf_hub(name: str, pretrained, cache_dir: str | None) -> nn.Module:
    """An open_clip model from a Hub repository (`hf-hub:org/repo`): its config and weights, cache first."""
    repo = name[len(HF_HUB_PREFIX) :]
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise UserError(f"Backbone {name[:200]!r} must look like hf-hub:org/repo")
    if pretrained not in (None, "hf-hub", DEFAULT_PRETRAINED):
        raise UserError(f"Backbone {name[:200]!r} brings its own weights; leave out --pretrained")
    if pretrained is None:
        raise UserError(f"Backbone {name[:200]!r} has no random-weight form; use a model name with --pretrained none")

    def message() -> str:
        return (
            f"CLIP {name} is not available offline. Tried: the Hugging Face cache ({hub.cache_dir()}); "
            f"hub repo '{repo}' ({hub.endpoint()}). Run once with network access to fill the cache."
        )

    return _cache_then_hub(
        lambda: open_clip.create_model_and_transforms(name, precision="fp32", device="cpu", cache_dir=cache_dir)[0],
        message,
    )


def _offline_message(name: str, tag: str, cache_dir: str | None) -> str:
    cfg = open_clip.get_pretrained_cfg(name, tag)
    tried = [f"the Hugging Face cache ({cache_dir or os.environ.get('HF_HOME', '~/.cache/huggingface')})"]
    if cfg.get("hf_hub"):
        tried.append(f"hub repo '{cfg['hf_hub'].rstrip('/')}'")
    if cfg.get("url"):
        tried.append(f"URL {cfg['url']}")
    return (
        f"CLIP weights {name}/{tag} are not available offline. Tried: {'; '.join(tried)}.\n"
        f"Give a local checkpoint instead, e.g. --pretrained /path/to/{name}.pt (an OpenAI .pt file or an open_clip "
        f"checkpoint), or run once with network access to fill the cache. For tests and offline demos use "
        f"--backbone {TINY_MODEL} --pretrained none (random weights)."
    )


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)
