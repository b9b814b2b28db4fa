"""Prompt templates as data (see `fti4cir.tokens` for the template syntax)."""

from __future__ import annotations

import string
from collections.abc import Sequence

# "a photo of * with * * * but {text}": the official FTI4CIR query sentence (CIRR, CIRCO and the default).
DEFAULT = "a photo of * with {attrs}but {text}"
# Pic2Word / SEARLE-style single-token prompt, for the subject-only baseline.
SUBJECT_ONLY = "a photo of * that {text}"
# The training sentence (no modification text) and the tri-wise regularisation sentences.
PSEUDO_SENTENCE = "a photo of * with {attrs}"
SUBJECT_WISE = "a photo of * with {attribute}"
ATTRIBUTE_WISE = "a photo of {subject} with {attrs}"
CAPTION = "a photo of {subject} with {attribute}"

PROMPTS = {
    "default": DEFAULT,
    "cirr": DEFAULT,
    "circo": DEFAULT,
    "fashioniq": DEFAULT,
    "subject-only": SUBJECT_ONLY,
}


def fashioniq_texts(caption1: str, caption2: str) -> tuple[str, str]:
    """The two orders the official FashionIQ evaluation encodes and averages: each caption stripped of '.?, ' at both
    ends, the forward order with str.capitalize() on the first caption (which also lower-cases the rest of it)."""
    c1, c2 = caption1.strip(".?, "), caption2.strip(".?, ")
    return f"{c1.capitalize()} and {c2}", f"{c2} and {c1}"


def render(template: str, subject: str, attribute_words: Sequence[str], text: str) -> str:
    """A template filled for display: `*` -> subject, {attrs} -> "[w1, w2] ", other fields -> the text."""
    parts = []
    for literal, name, _, _ in string.Formatter().parse(template):
        parts.append(" ".join(subject if word == "*" else word for word in literal.split(" ")))
        if name == "attrs":
            parts.append(f"[{', '.join(attribute_words)}] " if attribute_words else "")
        elif name is not None:
            parts.append(text)
    return " ".join("".join(parts).split())
