"""How each core query method turns references and modification texts into query features (the implementations the
method registry, `fti4cir.methods`, declares; `fti4cir.compose` is the entry point that picks one).

Every query function returns a `Composed`: the L2-normalised features and which texts were cut to fit CLIP's context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import PIL.Image
import torch
import torch.nn.functional as F

from .backbone import VisualFeatures
from .inversion import PseudoTokens
from .tokens import PLAIN, bpe, tokenize_prompts

# Stand-in word for a switched-off subject token in counterfactual inspection ("a photo of something with ...").
NEUTRAL_SUBJECT = "something"

Reference = torch.Tensor | VisualFeatures | PseudoTokens | Sequence[PIL.Image.Image]
Text = str | tuple[str, ...]


@dataclass(frozen=True)
class Composed:
    """Query features [B, embed_dim], L2-normalised, and `truncated` [B] bool: whether a reference's text (any of its
    variants) was cut to fit CLIP's context. Methods without text report no truncation."""

    features: torch.Tensor
    truncated: torch.Tensor


def encode_prompt(
    backbone,
    template: str,
    pseudo_tokens: torch.Tensor | None,
    num_attrs=None,
    fields: list[dict[str, str]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [B, E] not normalised, truncated [B]) of `template`, one row per sample, its placeholders filled in
    order by `pseudo_tokens[b]` (None: a template without placeholders). Differentiable w.r.t. the pseudo tokens."""
    if fields is None:
        fields = [{}] * pseudo_tokens.shape[0]
    tokenized = tokenize_prompts(template, fields, num_attrs, backbone.context_length)
    if pseudo_tokens is None:
        return backbone.encode_tokens(tokenized.ids), tokenized.truncated
    return backbone.encode_tokens(tokenized.ids, pseudo_tokens, tokenized.mask), tokenized.truncated


def encode_with_pseudo_tokens(
    backbone, template: str, pseudo_tokens: torch.Tensor, num_attrs=None, fields: list[dict[str, str]] | None = None
) -> torch.Tensor:
    """Encode `template` (one row per sample) with its placeholders filled, in order, by `pseudo_tokens[b]`.
    Differentiable w.r.t. the pseudo tokens; not normalised."""
    return encode_prompt(backbone, template, pseudo_tokens, num_attrs, fields)[0]


def reference_tokens(model, references: Reference, return_attention: bool = False) -> PseudoTokens:
    """Pseudo tokens for references given as PIL images, preprocessed tensors, visual features or cached tokens."""
    if isinstance(references, PseudoTokens):
        return references.to(model.device)
    if not isinstance(references, (torch.Tensor, VisualFeatures)):
        references = model.preprocess(list(references))
    if isinstance(references, torch.Tensor):
        references = model.backbone.encode_visual(references)
    return model.invert(references, return_attention=return_attention)


def select_tokens(tokens: PseudoTokens, keep_attributes, keep_subject, backbone):
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


def any_variant(truncated: torch.Tensor, n: int) -> torch.Tensor:
    """[B * n] per variant -> [B] per reference."""
    return truncated.view(-1, n).any(dim=1)


def _image_features(model, references: Reference) -> torch.Tensor:
    """The references' global image features (cached pseudo tokens carry them)."""
    if isinstance(references, PseudoTokens):
        return references.image_features
    if not isinstance(references, (torch.Tensor, VisualFeatures)):
        references = model.preprocess(list(references))
    return (
        references.global_features
        if isinstance(references, VisualFeatures)
        else model.backbone.encode_image(references)
    )


def _plain_text(model, texts: Sequence[Text]) -> Composed:
    flat, n = split_text_variants(texts)
    features, truncated = encode_prompt(model.backbone, PLAIN, None, None, [{"text": t} for t in flat])
    return Composed(average_text_variants(features, n), any_variant(truncated, n))


# ---- the core methods' query functions: (model, references, texts, *, template, keep_attributes, keep_subject) ----
def text_query(model, references: Reference, texts: Sequence[Text], **_) -> Composed:
    """The text alone, plainly tokenised (the references are not read)."""
    return _plain_text(model, texts)


def image_query(model, references: Reference, texts: Sequence[Text], **_) -> Composed:
    """The reference's image feature alone (the texts are not read)."""
    image = F.normalize(_image_features(model, references).float(), dim=-1)
    return Composed(image, torch.zeros(image.shape[0], dtype=torch.bool))


def image_text_query(model, references: Reference, texts: Sequence[Text], **_) -> Composed:
    """The sum of the normalised image and text features, normalised."""
    image = _image_features(model, references)
    text = _plain_text(model, texts)
    return Composed(F.normalize(F.normalize(image.float(), dim=-1) + text.features, dim=-1), text.truncated)


def pseudo_token_query(
    model,
    references: Reference,
    texts: Sequence[Text],
    *,
    template: str,
    attributes: bool = True,
    keep_attributes: torch.Tensor | None = None,
    keep_subject: torch.Tensor | None = None,
) -> Composed:
    """`template` with the pseudo tokens in its placeholders: subject and attribute tokens (fti4cir), or the subject
    token alone (attributes=False: subject-only). keep_attributes [B, topk] / keep_subject [B]: switch individual
    pseudo tokens off (counterfactual inspection)."""
    flat, n = split_text_variants(texts)
    backbone = model.backbone
    tokens = reference_tokens(model, references)
    subject, kept_attributes, num_kept = select_tokens(tokens, keep_attributes, keep_subject, backbone)
    if attributes:
        pseudo = torch.cat([subject.unsqueeze(1), kept_attributes], dim=1)
    else:
        pseudo, num_kept = subject.unsqueeze(1), None

    def repeat(t):
        return t.repeat_interleave(n, dim=0) if n > 1 and t is not None else t

    features, truncated = encode_prompt(
        backbone, template, repeat(pseudo), repeat(num_kept), [{"text": t} for t in flat]
    )
    return Composed(average_text_variants(features, n), any_variant(truncated, n))
