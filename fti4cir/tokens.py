"""Prompt templates -> CLIP token ids with a mask of pseudo-word placeholder positions.

A template is a format string: `*` in the template's own words is a placeholder, `{attrs}` expands to one `* ` per kept
attribute token, and any other `{field}` is filled with user text. Placeholder positions come from the template only,
so a `*` typed by a user stays an ordinary word. User text longer than CLIP's context is cut from its end; the result
says which rows were cut (`Tokenized.truncated`), so that callers report it (the app shows a note).
"""

from __future__ import annotations

import string
from functools import lru_cache

import torch
from open_clip.tokenizer import SimpleTokenizer

ATTRS_FIELD = "attrs"
_TOKENIZER = SimpleTokenizer()
PLACEHOLDER_ID = _TOKENIZER.encode("*")[0]
SOT_ID = _TOKENIZER.sot_token_id
EOT_ID = _TOKENIZER.eot_token_id


PLAIN = "{text}"  # the template of plain CLIP tokenisation


class Tokenized(tuple):
    """Token ids [B, context_length] and the placeholder mask [B, context_length]: unpacks as the pair `ids, mask`.
    `truncated` [B] bool: the rows whose user text was cut to fit the context (template words and placeholders are
    never cut)."""

    def __new__(cls, ids: torch.Tensor, mask: torch.Tensor, truncated: torch.Tensor):
        self = super().__new__(cls, (ids, mask))
        self.truncated = truncated
        return self

    @property
    def ids(self) -> torch.Tensor:
        return self[0]

    @property
    def mask(self) -> torch.Tensor:
        return self[1]


@lru_cache(maxsize=4096)
def bpe(text: str) -> tuple[int, ...]:
    return tuple(_TOKENIZER.encode(text))


@lru_cache(maxsize=256)
def _parse(template: str) -> tuple[tuple[str, str | None], ...]:
    parts = []
    for literal, field, _, _ in string.Formatter().parse(template):
        if literal:
            parts.append((literal, None))
        if field is not None:
            parts.append(("", field))
    return tuple(parts)


def template_fields(template: str) -> set[str]:
    return {field for _, field in _parse(template) if field is not None}


def _literal_ids(literal: str) -> tuple[int, ...]:
    ids = bpe(literal)
    if literal.count("*") != sum(i == PLACEHOLDER_ID for i in ids):
        raise ValueError(f"Template part {literal!r}: write each '*' placeholder as a separate word")
    return ids


def _sample_pieces(template: str, fields: dict[str, str], num_attrs: int) -> list[tuple[list[int], bool]]:
    """(ids, is_user_text) pieces of one prompt, in order."""
    pieces = []
    for literal, field in _parse(template):
        if field is None:
            pieces.append((list(_literal_ids(literal)), False))
        elif field == ATTRS_FIELD:
            pieces.append(([PLACEHOLDER_ID] * num_attrs, False))
        else:
            pieces.append((list(bpe(fields[field])), True))
    return pieces


def _fit(pieces: list[tuple[list[int], bool]], budget: int) -> bool:
    """Shorten user-text pieces in place so that all pieces fit in `budget` tokens; whether any text was cut."""
    excess = sum(len(ids) for ids, _ in pieces) - budget
    if excess <= 0:
        return False
    # Cut user text from the end of the last field backwards, the way clip.tokenize(truncate=True) cuts the end of
    # "... but {text}"; template words and placeholders are never cut.
    for ids, is_text in reversed(pieces):
        if is_text and excess > 0:
            cut = min(excess, len(ids))
            del ids[len(ids) - cut :]
            excess -= cut
    if excess > 0:
        raise ValueError(
            f"The prompt's template and pseudo-word placeholders alone exceed the {budget + 2}-token "
            f"context; use fewer attribute tokens or a shorter template"
        )
    return True


def tokenize_prompts(
    template: str,
    fields: list[dict[str, str]] | None = None,
    num_attrs: torch.Tensor | list[int] | None = None,
    context_length: int = 77,
) -> Tokenized:
    """Token ids [B, context_length] (SOT ... EOT, zero padded), the placeholder mask [B, context_length] and which
    rows had their user text cut (`Tokenized`; unpacks as `ids, mask`)."""
    if fields is None:
        fields = [{}] * len(num_attrs)
    num_attrs = [0] * len(fields) if num_attrs is None else [int(r) for r in num_attrs]
    needed = template_fields(template) - {ATTRS_FIELD}
    ids = torch.zeros(len(fields), context_length, dtype=torch.long)
    mask = torch.zeros(len(fields), context_length, dtype=torch.bool)
    truncated = torch.zeros(len(fields), dtype=torch.bool)
    for row, (values, r) in enumerate(zip(fields, num_attrs)):
        missing = needed - values.keys()
        if missing:
            raise KeyError(f"Template {template!r} needs fields {sorted(missing)}")
        pieces = _sample_pieces(template, values, r)
        truncated[row] = _fit(pieces, context_length - 2)
        seq = [SOT_ID] + [i for piece, _ in pieces for i in piece] + [EOT_ID]
        is_placeholder = [False] + [i == PLACEHOLDER_ID and not is_text for piece, is_text in pieces for i in piece]
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(is_placeholder)] = torch.tensor(is_placeholder)
    return Tokenized(ids, mask, truncated)


def tokenize_plain(backbone_or_context, texts: list[str]) -> torch.Tensor:
    """Plain CLIP tokenisation (no placeholders), truncated keeping the EOT token (`tokenize_prompts(PLAIN, ...)` also
    says which texts were cut)."""
    context = getattr(backbone_or_context, "context_length", backbone_or_context)
    return tokenize_prompts(PLAIN, [{"text": t} for t in texts], None, context).ids


def decode_ids(ids: list[int]) -> str:
    return _TOKENIZER.decode([i for i in ids if i not in (0, SOT_ID, EOT_ID)])


def vocabulary_word(token_id: int) -> str:
    return _TOKENIZER.decoder[token_id].replace("</w>", "")
