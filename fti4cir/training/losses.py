"""The FTI4CIR training objective: NT-Xent + orthogonality + tri-wise semantic regularisation.

Each term matches the official code (ZiChao111/FTI4CIR, src/i2t_model.py: `contrastive_loss`, `orthogonal_loss`,
`semanic_regularization_loss`, `getLoss`) on the same inputs; the differences are in how it is computed:
visual features come from the cache (the frozen visual tower never runs), every text pass runs only up to the
batch's longest sequence (exact: CLIP's text mask is causal) and the pseudo tokens are injected batched.

Which caption text goes where: the regularisation target is "a photo of {subject} with {attribute}", the
subject-wise sentence "a photo of * with {attribute}" and the attribute-wise one "a photo of {subject} with * ...",
where subject is the caption up to its first noun and attribute the rest (`caption_split`), as in the paper. The
official repository holds two versions of `getLoss`. One (commit 9738698), `getLoss(images, subject, attribute,
...)`, builds exactly these sentences. The other (commit 4b02c88) is `getLoss(images, captions, category, ...)` with
target "a photo of {category} with {captions}", while every version of `train.py` calls `getLoss(images, subject,
attribute, clip_model)` positionally: there `captions` receives the subject and `category` the attribute, so the
target becomes "a photo of {attribute} with {subject}" and each pseudo token is regularised towards the other half of
the caption (a swap; the dataset of that commit also yields `caption`/`category` keys while `train.py` reads
`subject`/`attribute`). We follow the consistent version.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import prompts
from ..backbone import VisualFeatures
from ..compose import encode_with_pseudo_tokens
from ..inversion import PseudoTokens
from ..tokens import tokenize_prompts


@dataclass
class LossTerms:
    total: torch.Tensor
    contrastive: torch.Tensor
    orthogonal: torch.Tensor
    regularisation: torch.Tensor

    def detached(self) -> dict[str, float]:
        return {name: float(value.detach()) for name, value in vars(self).items()}


def nt_xent(image_features: torch.Tensor, text_features: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over the 2B joint vectors [images; texts] (the official `contrastive_loss`, from PALAVRA).

    Each of the 2B vectors has its counterpart as the positive; every other vector of the joint batch, image-image
    and text-text pairs included, is a negative; the positive is also part of the denominator. Computed as
    logsumexp - positive logit (the official takes log of a ratio of exps, same value, less robust)."""
    z = F.normalize(torch.cat([image_features, text_features]).float(), dim=-1)
    n = image_features.shape[0]
    logits = (z @ z.T) / temperature
    positive = logits.diagonal(offset=n).repeat(2)  # logits[i, i+n] == logits[i+n, i]
    self_pairs = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    return (torch.logsumexp(logits.masked_fill(self_pairs, float("-inf")), dim=1) - positive).mean()


def orthogonality_loss(selected_features: torch.Tensor) -> torch.Tensor:
    """MSE between the [topk, topk] cosine matrix of each image's selected attribute features and the identity
    (official `orthogonal_loss`; all topk rows count, also those past the kept r)."""
    f = F.normalize(selected_features.float(), dim=-1)
    gram = f @ f.transpose(1, 2)
    return F.mse_loss(gram, torch.eye(f.shape[1], device=f.device).expand_as(gram))


def cosine_distance(features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean(1 - cos), exactly nn.CosineEmbeddingLoss with target 1 as the official code uses it."""
    ones = torch.ones(features.shape[0], device=features.device)
    return F.cosine_embedding_loss(features.float(), targets.float(), ones)


def caption_features(backbone, subjects: list[str], attributes: list[str]) -> torch.Tensor:
    """Frozen text features of "a photo of {subject} with {attribute}" (the regularisation target)."""
    fields = [{"subject": s, "attribute": a} for s, a in zip(subjects, attributes)]
    ids, _ = tokenize_prompts(prompts.CAPTION, fields, None, backbone.context_length)
    with torch.no_grad():
        return backbone.encode_tokens(ids)


def pseudo_sentence_features(backbone, tokens: PseudoTokens) -> torch.Tensor:
    """ "a photo of * with * ... *" with the subject token and the kept attribute tokens (the whole-wise sentence)."""
    pseudo = torch.cat([tokens.subject.unsqueeze(1), tokens.attributes], dim=1)
    return encode_with_pseudo_tokens(backbone, prompts.PSEUDO_SENTENCE, pseudo, tokens.num_kept)


def triwise_regularisation(
    backbone,
    tokens: PseudoTokens,
    subjects: list[str],
    attributes: list[str],
    *,
    whole_features: torch.Tensor | None = None,
    target_features: torch.Tensor | None = None,
    subject_weight: float = 1.0,
) -> torch.Tensor:
    """Sum of (1 - cos) of the subject-wise, attribute-wise and whole-wise sentences against the caption target,
    the subject-wise one times `subject_weight` (official: 1).

    whole_features: the pseudo sentence's features when already computed (the contrastive term uses them too).
    target_features: precomputed `caption_features` (frozen, so they can be cached per pair)."""
    if target_features is None:
        target_features = caption_features(backbone, subjects, attributes)
    if whole_features is None:
        whole_features = pseudo_sentence_features(backbone, tokens)
    subject_wise = encode_with_pseudo_tokens(
        backbone, prompts.SUBJECT_WISE, tokens.subject.unsqueeze(1), None, [{"attribute": a} for a in attributes]
    )
    attribute_wise = encode_with_pseudo_tokens(
        backbone, prompts.ATTRIBUTE_WISE, tokens.attributes, tokens.num_kept, [{"subject": s} for s in subjects]
    )
    return (
        subject_weight * cosine_distance(subject_wise, target_features)
        + cosine_distance(attribute_wise, target_features)
        + cosine_distance(whole_features, target_features)
    )


def fti4cir_loss(
    model,
    visual_features: VisualFeatures,
    subjects: list[str],
    attributes: list[str],
    *,
    target_features: torch.Tensor | None = None,
) -> LossTerms:
    """The official total: contrastive + orthogonal + reg_weight x regularisation (weights from the network's config).

    visual_features: cached global features and patch tokens of the batch's images.
    target_features: precomputed frozen caption features (else encoded here)."""
    config = model.inversion.config
    tokens = model.invert(visual_features)
    whole = pseudo_sentence_features(model.backbone, tokens)
    contrastive = nt_xent(tokens.image_features, whole, config.temperature)
    orthogonal = orthogonality_loss(tokens.selection.features)
    regularisation = triwise_regularisation(
        model.backbone,
        tokens,
        subjects,
        attributes,
        whole_features=whole,
        target_features=target_features,
        subject_weight=config.subject_weight,
    )
    total = contrastive + orthogonal + config.reg_weight * regularisation
    return LossTerms(total, contrastive, orthogonal, regularisation)
