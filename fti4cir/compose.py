"""The one query path: reference (image or cached pseudo tokens) + modification text -> L2-normalised query feature.

Used by the app, evaluation and training alike. `method` selects FTI4CIR or one of the baselines.
"""
from __future__ import annotations

from typing import Sequence, Union

import PIL.Image
import torch
import torch.nn.functional as F

from . import prompts
from .backbone import VisualFeatures
from .inversion import PseudoTokens
from .tokens import bpe, tokenize_plain, tokenize_prompts

METHODS = ("fti4cir", "subject-only", "image-only", "text-only", "image+text")
# Stand-in word for a switched-off subject token in counterfactual inspection ("a photo of something with ...").
NEUTRAL_SUBJECT = "something"

Reference = Union[torch.Tensor, VisualFeatures, PseudoTokens, Sequence[PIL.Image.Image]]
Text = Union[str, tuple[str, ...]]


def encode_with_pseudo_tokens(backbone, template: str, pseudo_tokens: torch.Tensor, num_attrs=None,
                              fields: list[dict[str, str]] | None = None) -> torch.Tensor:
    """Encode `template` (one row per sample) with its placeholders filled, in order, by `pseudo_tokens[b]`.
    Differentiable w.r.t. the pseudo tokens; not normalised."""
    if fields is None:
        fields = [{}] * pseudo_tokens.shape[0]
    ids, mask = tokenize_prompts(template, fields, num_attrs, backbone.context_length)
    return backbone.encode_tokens(ids, pseudo_tokens, mask)


def reference_tokens(model, references: Reference, return_attention: bool = False) -> PseudoTokens:
    """Pseudo tokens for references given as PIL images, preprocessed tensors, visual features or cached tokens."""
    if isinstance(references, PseudoTokens):
        return references.to(model.device)
    if not isinstance(references, (torch.Tensor, VisualFeatures)):
        references = model.preprocess(list(references))
    if isinstance(references, torch.Tensor):
        references = model.backbone.encode_visual(references)
    return model.invert(references, return_attention=return_attention)


def _select_tokens(tokens: PseudoTokens, keep_attributes, keep_subject, backbone):
    """Apply counterfactual switches: drop attribute rows (compacting the rest) and/or neutralise the subject."""
    subject, attributes, num_kept = tokens.subject, tokens.attributes, tokens.num_kept
    if keep_attributes is not None:
        topk = attributes.shape[1]
        position = torch.arange(topk, device=attributes.device)
        kept = (position < num_kept.unsqueeze(1)) & keep_attributes.to(attributes.device).bool()
        order = torch.argsort((~kept).int(), dim=1, stable=True)
        attributes = attributes.gather(1, order.unsqueeze(-1).expand(-1, -1, attributes.shape[-1]))
        num_kept = kept.sum(dim=1)
    if keep_subject is not None:
        neutral = backbone.clip.token_embedding.weight[bpe(NEUTRAL_SUBJECT)[0]].to(subject.dtype)
        subject = torch.where(keep_subject.to(subject.device).bool().unsqueeze(1), subject, neutral)
    return subject, attributes, num_kept


def split_text_variants(texts: Sequence[Text]) -> tuple[list[str], int]:
    """Flatten text ensembles (tuples: every variant is encoded and the normalised features averaged)."""
    variants = {len(t) if isinstance(t, tuple) else 1 for t in texts}
    if len(variants) > 1:
        raise ValueError("All queries in a batch need the same number of text variants")
    n = variants.pop() if variants else 1
    flat = [v for t in texts for v in (t if isinstance(t, tuple) else (t,))]
    return flat, n


def average_text_variants(features: torch.Tensor, n: int) -> torch.Tensor:
    features = F.normalize(features.float(), dim=-1)
    if n > 1:
        features = F.normalize(features.view(-1, n, features.shape[-1]).mean(dim=1), dim=-1)
    return features


def compose(
    model,
    references: Reference,
    texts: Sequence[Text],
    *,
    prompt: str | None = None,
    method: str = "fti4cir",
    keep_attributes: torch.Tensor | None = None,
    keep_subject: torch.Tensor | None = None,
) -> torch.Tensor:
    """Query features [B, embed_dim], L2-normalised.

    references: PIL images, preprocessed image tensors [B, 3, H, W], `VisualFeatures` or cached `PseudoTokens`.
    texts: one modification text per reference, or a tuple of variants per reference (encoded and averaged, e.g. the
        two FashionIQ caption orders from `prompts.fashioniq_texts`).
    prompt: template for fti4cir/subject-only (default: `prompts.DEFAULT` / `prompts.SUBJECT_ONLY`).
    keep_attributes [B, topk] / keep_subject [B]: switch individual pseudo tokens off (counterfactual inspection).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    flat, n = split_text_variants(texts)
    backbone = model.backbone
    if method == "text-only":
        return average_text_variants(backbone.encode_tokens(tokenize_plain(backbone, flat)), n)

    if method in ("image-only", "image+text") and not isinstance(references, PseudoTokens):
        if not isinstance(references, (torch.Tensor, VisualFeatures)):
            references = model.preprocess(list(references))
        image = references.global_features if isinstance(references, VisualFeatures) else \
            backbone.encode_image(references)
    elif method in ("image-only", "image+text"):
        image = references.image_features
    if method == "image-only":
        return F.normalize(image.float(), dim=-1)
    if method == "image+text":
        text = average_text_variants(backbone.encode_tokens(tokenize_plain(backbone, flat)), n)
        return F.normalize(F.normalize(image.float(), dim=-1) + text, dim=-1)

    tokens = reference_tokens(model, references)
    subject, attributes, num_kept = _select_tokens(tokens, keep_attributes, keep_subject, backbone)
    if method == "subject-only":
        template, pseudo, num_kept = prompt or prompts.SUBJECT_ONLY, subject.unsqueeze(1), None
    else:
        template, pseudo = prompt or prompts.DEFAULT, torch.cat([subject.unsqueeze(1), attributes], dim=1)
    repeat = lambda t: t.repeat_interleave(n, dim=0) if n > 1 and t is not None else t  # noqa: E731
    features = encode_with_pseudo_tokens(backbone, template, repeat(pseudo), repeat(num_kept),
                                         [{"text": t} for t in flat])
    return average_text_variants(features, n)
