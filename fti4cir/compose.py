"""The one query path: reference (image or cached pseudo tokens) + modification text -> L2-normalised query feature.

Used by the app, evaluation and training alike. `method` names a declared query method (`fti4cir.methods`):
FTI4CIR, one of its baselines, or a method another package declared (the M2C methods once `fti4cir.m2c` is imported).
`compose` returns the features; `compose_query` also says which texts were cut to fit CLIP's context.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import methods
from .queries import (  # noqa: F401  (the query helpers' public names, as before)
    NEUTRAL_SUBJECT,
    Composed,
    Reference,
    Text,
    average_text_variants,
    encode_with_pseudo_tokens,
    reference_tokens,
    split_text_variants,
)

METHODS = methods.names("fti4cir")  # FTI4CIR and its baselines (the methods every FTI4CIR model runs)


def compose_query(
    model,
    references: Reference,
    texts: Sequence[Text],
    *,
    prompt: str | None = None,
    method: str = "fti4cir",
    keep_attributes: torch.Tensor | None = None,
    keep_subject: torch.Tensor | None = None,
) -> Composed:
    """`compose`, with `truncated` [B]: whether a reference's text was cut to fit CLIP's context."""
    declared = methods.get(method)
    return declared.compose(
        model,
        references,
        texts,
        template=prompt or declared.template,
        keep_attributes=keep_attributes,
        keep_subject=keep_subject,
    )


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
    prompt: template of a template method (default: the method's, e.g. `prompts.DEFAULT` / `prompts.SUBJECT_ONLY`).
    keep_attributes [B, topk] / keep_subject [B]: switch individual pseudo tokens off (counterfactual inspection).
    model: the model of the method's family (`methods.get(method).family`): an FTI4CIR model, or for the M2C methods
        an M2C model or an FTI4CIR model built with M2C weights.
    """
    return compose_query(
        model,
        references,
        texts,
        prompt=prompt,
        method=method,
        keep_attributes=keep_attributes,
        keep_subject=keep_subject,
    ).features
