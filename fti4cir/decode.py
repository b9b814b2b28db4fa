"""Pseudo tokens -> nearest vocabulary words, to show what the network "said" about an image."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .tokens import EOT_ID, SOT_ID, vocabulary_word


@dataclass(frozen=True)
class Word:
    word: str
    score: float  # cosine similarity to the pseudo token


# backbone -> (what its table was, the normalised table); an entry goes with its backbone
_UNIT_VOCABULARIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def unit_vocabulary(backbone) -> torch.Tensor:
    """The L2-normalised token-embedding table [vocab, token_dim], computed once per backbone (ViT-L: 38M values)
    and again only if the table changes."""
    table = backbone.clip.token_embedding.weight
    key = (table.data_ptr(), table._version, table.dtype, table.device)
    cached = _UNIT_VOCABULARIES.get(backbone)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, F.normalize(table.detach(), dim=-1))
        _UNIT_VOCABULARIES[backbone] = cached
    return cached[1]


def decode(backbone, tokens: torch.Tensor, k: int = 3) -> list[list[Word]]:
    """Top-k vocabulary words by cosine similarity to each pseudo token. tokens: [N, token_dim] -> N lists."""
    table = unit_vocabulary(backbone)
    sims = F.normalize(tokens.detach().to(table.dtype), dim=-1) @ table.T
    sims[:, [SOT_ID, EOT_ID]] = -2.0  # special tokens are not words
    scores, ids = sims.topk(k, dim=-1)
    return [
        [Word(vocabulary_word(i), s) for i, s in zip(row_ids.tolist(), row_scores.tolist())]
        for row_ids, row_scores in zip(ids, scores)
    ]


def decoded_sentence(backbone, subject: torch.Tensor, attributes: torch.Tensor, text: str = "") -> str:
    """'a photo of [dress] with [floral, red, sleeveless] but {text}' from one image's subject token [token_dim]
    and its kept attribute tokens [r, token_dim]."""
    words = decode(backbone, torch.cat([subject.unsqueeze(0), attributes]), k=1)
    subject_word, attribute_words = words[0][0].word, [w[0].word for w in words[1:]]
    sentence = f"a photo of [{subject_word}] with [{', '.join(attribute_words)}]"
    return f"{sentence} but {text}" if text else sentence
