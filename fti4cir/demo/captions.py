"""Captions of the demo photos: the "web text" of the small clothing world, one per photo.

`caption(word, colour, rng)` phrases a garment word and its colour word in one of many natural forms. The forms
cover the language modification texts use ("is blue", "in blue", "coloured blue", "blue instead of red", "a skirt
instead", "make it ...") so a model that learned from the captions can read such texts, but every caption describes
ONE photo: no caption names a reference and a target (zero-shot: no composed-retrieval pairs enter training).

Families of forms:

- FTI4CIR forms (`FTI4CIR_FORMS`) put the garment first and the colour after it ("a dress that is red"), so
  `fti4cir split-captions` (subject = up to the first noun) gives subject = the garment phrase ("a dress") and
  attribute = the rest ("that is red"): the subject pseudo token learns the garment, the attribute tokens the colour;
- contrast forms (`CONTRAST_FORMS`: "a dress in red instead of blue", "a dress instead of a skirt, in red") also
  name a colour or garment the photo does not show, as modification texts do; true of the photo, but only in the
  "all" set (CLIP's text side), not in the FTI4CIR set, whose attributes should only describe the photo;
- colour-first forms (`COLOUR_FIRST_FORMS`: "a red dress", "a photo of a red dress") are the plainest way to say
  it, for CLIP's contrastive training; their split puts the colour into the subject (or has no attribute at all,
  and split-captions drops it).

Photos without a reliable colour (`"colour": null` in labels.json) get forms that name only the garment.

`write_captions(labels, split, out, seed)` writes the JSONL that `fti4cir split-captions` (and `fti4cir caption`)
use: `{"image": <path relative to the split folder>, "sha1": <sha1 of the file>, "caption": ...}`, so the pairs
file works with `fti4cir train --images data/clothing/<split>`.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from ..atomic import write_text_atomic
from ..digests import file_digest
from ..errors import UserError
from .world import COLOURS, PLURAL_WORDS

# {a}: "a " / "" (plural), {is}: "is"/"are", {this}: "this"/"these", {it}: "it"/"they", {w}: garment, {c}: colour,
# {other_c}: another colour, {other_w}: another garment word (with {other_a} its article)
FTI4CIR_FORMS: tuple[str, ...] = (
    "{a}{w} in {c}",
    "{a}{w} that {is} {c}",
    "{a}{w} in the colour {c}",
    "{a}{w} coloured {c}",
    "{a}{w} with a {c} colour",
    "{a}{w} in {c} on a plain background",
    "{a}{w} made of {c} fabric",
    "{a}{w} whose colour is {c}",
    "{a}{w} in a {c} shade",
    "{a}{w}, {c} all over",
    "{a}{w} in plain {c}",
    "{a}{w} photographed in {c}",
    "{a}{w} that {is} all {c}",
    "{this} {w} {is} {c}",
    "the {w} {is} {c}",
    "{a}{w}, they make {it} in {c}",
)
# garment first too, but naming a colour or garment the photo does NOT show ("blue instead of red", "a skirt
# instead"): the phrasing of modification texts, for CLIP's text side; left out of the FTI4CIR set, whose attribute
# should only describe the photo
CONTRAST_FORMS: tuple[str, ...] = (
    "{a}{w} in {c} instead of {other_c}",
    "{a}{w} that {is} {c} rather than {other_c}",
    "{a}{w} instead of {other_a}{other_w}, in {c}",
)
COLOUR_FIRST_FORMS: tuple[str, ...] = (
    "{a}{c} {w}",
    "a photo of {a}{c} {w}",
    "{a}{c} {w} on a plain background",
    "{a}{c} {w} instead of {other_a}{other_w}",
    "a picture of {a}{w} in {c}",
    "a photo of {a}{w} that {is} {c}",
)
NO_COLOUR_FORMS: tuple[str, ...] = (
    "{a}{w} on {its} own",
    "{a}{w} just as {it} {is}",
    "{a}{w} laid out to be photographed",
    "{a}{w} in a photo of {its} own",
)
FORM_SETS = {"all": FTI4CIR_FORMS + CONTRAST_FORMS + COLOUR_FIRST_FORMS, "fti4cir": FTI4CIR_FORMS}


def _fill(form: str, word: str, colour: str | None, rng: random.Random, others: tuple[str, ...]) -> str:
    plural = word in PLURAL_WORDS
    other_w = rng.choice([w for w in others if w != word]) if "{other_w}" in form else ""
    values = {
        "a": "" if plural else "a ",
        "is": "are" if plural else "is",
        "this": "these" if plural else "this",
        "it": "they" if plural else "it",
        "its": "their" if plural else "its",
        "w": word,
        "c": colour or "",
        "other_c": rng.choice([c for c in COLOURS if c != colour]) if "{other_c}" in form else "",
        "other_w": other_w,
        "other_a": "" if other_w in PLURAL_WORDS else "a ",
    }
    return form.format(**values)


def caption(
    word: str, colour: str | None, rng: random.Random, *, forms: str = "all", others: tuple[str, ...] | None = None
) -> str:
    """One caption of a garment `word` in `colour` (None: a form without colour), the form drawn with `rng`.

    forms: "all" (FTI4CIR, contrast and colour-first forms) or "fti4cir" (garment first, colour after, nothing the
    photo does not show: the forms whose spaCy split is subject = garment phrase, attribute = the rest).
    others: garment words for the "instead of a ..." forms (default: the class words of the clothing world)."""
    if forms not in FORM_SETS:
        raise UserError(f"unknown caption forms {forms!r} (choose from {', '.join(FORM_SETS)})")
    if others is None:
        from .world import CLASS_WORDS

        others = tuple(CLASS_WORDS.values())
    if colour is None:
        return _fill(rng.choice(NO_COLOUR_FORMS), word, None, rng, others)
    if colour not in COLOURS:
        raise UserError(f"unknown colour {colour!r} (known: {', '.join(COLOURS)})")
    return _fill(rng.choice(FORM_SETS[forms]), word, colour, rng, others)


def caption_records(
    labels: dict,
    split: str,
    seed: int = 0,
    *,
    forms: str = "all",
    photos_root: str | os.PathLike = "data/clothing",
    progress: bool = True,
) -> list[dict]:
    """One caption record per photo of `split` (in labels order), deterministic from `seed`."""
    from tqdm import tqdm

    photos = [p for p in labels["photos"] if p["split"] == split]
    if not photos:
        raise UserError(f"the labels hold no photos of split {split!r}")
    root = Path(photos_root)
    others = tuple(dict.fromkeys(labels.get("classes", {}).values())) or None
    rng = random.Random(f"{seed}:{split}:{forms}")
    records = []
    for photo in tqdm(photos, desc=f"captions {split}", unit="photo", disable=not progress):
        path = root / photo["path"]
        if not path.is_file():
            raise UserError(f"{path} is missing (labels and photo folder disagree; run `fti4cir demo-photos`)")
        records.append(
            {
                "image": Path(photo["path"]).relative_to(split).as_posix(),
                "sha1": file_digest(path, "sha1"),
                "caption": caption(photo["word"], photo["colour"], rng, forms=forms, others=others),
            }
        )
    return records


def write_captions(
    labels: dict,
    split: str,
    out_jsonl: str | os.PathLike,
    seed: int = 0,
    *,
    forms: str = "all",
    photos_root: str | os.PathLike = "data/clothing",
    progress: bool = True,
) -> list[dict]:
    """Write `caption_records(...)` as a captions JSONL (atomically); returns the records."""
    records = caption_records(labels, split, seed, forms=forms, photos_root=photos_root, progress=progress)
    write_text_atomic(out_jsonl, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records
