"""`clothing-cir`: a held-out composed-retrieval benchmark made from the TEST split of the demo photos.

A query is a reference test photo and a modification text of one of three types:

- ``colour``: the same garment class in another colour ("is blue", "change the colour to blue", ...);
- ``class``: another garment class in the same colour ("is a skirt instead", "make it a skirt", ...);
- ``both``: another class in another colour ("is a blue skirt instead", ...).

Its ground truths are every test photo whose labels have the target class AND the target colour, the reference
excluded (it is also removed from the ranking when evaluated). Only photos with a colour label take part (as
references and as ground truths; unlabelled photos stay in the gallery as distractors), and only queries with at
least one ground truth are kept. Queries are balanced over the types and deterministic from the seed and the labels.

The file (`data/clothing-cir/queries.json`):

    {"name": "clothing-cir", "split": "test",
     "generator": {"name": "fti4cir.demo.benchmark", "version": 1, "seed": 0, "labels_sha1": "..."},
     "images": "../clothing/test",            # image folder, relative to this file's folder
     "gallery": ["dress/abc.jpg", ...],       # every test photo, the ranked set
     "queries": [{"id": "colour-000", "type": "colour", "reference": "dress/abc.jpg", "text": "is blue",
                  "reference_class": "dress", "reference_colour": "red",
                  "target_class": "dress", "target_colour": "blue", "ground_truths": ["dress/def.jpg", ...]}]}

`fti4cir evaluate --dataset clothing-cir --root data/clothing-cir` reads it (see fti4cir.evaluation.datasets).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import defaultdict
from pathlib import Path

from ..atomic import write_json_atomic
from ..errors import UserError
from .world import CLASS_WORDS, COLOURS, PLURAL_WORDS

NAME = "clothing-cir"
GENERATOR = "fti4cir.demo.benchmark"
VERSION = 1
QUERY_TYPES = ("colour", "class", "both")
PER_TYPE = 100

# {c}: target colour, {rc}: reference colour, {w}: target garment, {rw}: reference garment; {a}/{ra}: "a " or ""
# (plural garments), {it}: "it"/"them" for the reference; {is}: "is"/"are" agreeing with the garment named after it
# (the reference in colour changes, the target otherwise)
PHRASINGS: dict[str, tuple[str, ...]] = {
    "colour": (
        "{is} {c}",
        "in {c}",
        "change the colour to {c}",
        "make {it} {c}",
        "{c} instead of {rc}",
        "{is} {c} instead of {rc}",
        "the same but in {c}",
    ),
    "class": (
        "{is} {a}{w} instead",
        "make {it} {a}{w}",
        "{a}{w} instead of {ra}{rw}",
        "change {it} to {a}{w} in the same colour",
        "{is} {a}{w} of the same colour",
        "as {a}{w}",
    ),
    "both": (
        "{is} {a}{c} {w} instead",
        "make {it} {a}{c} {w}",
        "{a}{w} in {c} instead",
        "change {it} to {a}{c} {w}",
        "{is} {a}{w} and {c}",
        "{a}{c} {w} instead of {ra}{rc} {rw}",
    ),
}


def _article(word: str) -> str:
    return "" if word in PLURAL_WORDS else "a "


def phrase(form: str, reference_word: str, reference_colour: str, target_word: str, target_colour: str) -> str:
    """One modification text: `form` (a PHRASINGS entry) filled in."""
    named = reference_word if target_word == reference_word else target_word
    return form.format(
        c=target_colour,
        rc=reference_colour,
        w=target_word,
        rw=reference_word,
        a=_article(target_word),
        ra=_article(reference_word),
        it="them" if reference_word in PLURAL_WORDS else "it",
        **{"is": "are" if named in PLURAL_WORDS else "is"},
    )


def labels_digest(labels: dict) -> str:
    """sha1 of the labels' photo records (so a benchmark names the labels it was generated from)."""
    return hashlib.sha1(json.dumps(labels["photos"], sort_keys=True).encode()).hexdigest()


def generate(labels: dict, seed: int = 0, per_type: int = PER_TYPE, split: str = "test") -> dict:
    """The benchmark object (see the module docstring) from the labels of `split`."""
    photos = sorted((p for p in labels["photos"] if p["split"] == split), key=lambda p: p["path"])
    if not photos:
        raise UserError(f"the labels hold no photos of split {split!r}")
    prefix = f"{split}/"
    name = lambda p: p["path"][len(prefix) :] if p["path"].startswith(prefix) else p["path"]  # noqa: E731
    labelled = [p for p in photos if p["colour"] is not None]
    by_key: dict[tuple[str, str], list[str]] = defaultdict(list)
    for p in labelled:
        by_key[(p["class"], p["colour"])].append(name(p))
    words = {**CLASS_WORDS, **labels.get("classes", {})}

    rng = random.Random(f"{GENERATOR}:{VERSION}:{seed}")
    queries = []
    for kind in QUERY_TYPES:
        order = list(labelled)
        rng.shuffle(order)
        made = 0
        for reference in order:
            if made == per_type:
                break
            ref_class, ref_colour = reference["class"], reference["colour"]
            targets = [
                (c, col)
                for (c, col), names in sorted(by_key.items())
                if (c == ref_class) == (kind == "colour")
                and (col == ref_colour) == (kind == "class")
                and [n for n in names if n != name(reference)]
            ]
            if not targets:
                continue
            target_class, target_colour = rng.choice(targets)
            form = rng.choice(PHRASINGS[kind])
            text = phrase(form, words[ref_class], ref_colour, words[target_class], target_colour)
            truths = [n for n in by_key[(target_class, target_colour)] if n != name(reference)]
            queries.append(
                {
                    "id": f"{kind}-{made:03d}",
                    "type": kind,
                    "reference": name(reference),
                    "text": text,
                    "reference_class": ref_class,
                    "reference_colour": ref_colour,
                    "target_class": target_class,
                    "target_colour": target_colour,
                    "ground_truths": truths,
                }
            )
            made += 1
        if made < per_type:
            raise UserError(
                f"only {made} {kind} queries with ground truths can be made from {len(labelled)} "
                f"labelled {split} photos (asked for {per_type})"
            )
    return {
        "name": NAME,
        "split": split,
        "generator": {
            "name": GENERATOR,
            "version": VERSION,
            "seed": seed,
            "per_type": per_type,
            "labels_sha1": labels_digest(labels),
            "colours": list(COLOURS),
        },
        "images": f"../clothing/{split}",
        "gallery": [name(p) for p in photos],
        "queries": queries,
    }


def write_benchmark(benchmark: dict, path: str | os.PathLike, photos: str | os.PathLike) -> None:
    """Write queries.json, with its image folder (`photos`/<split>) stored relative to the file's folder."""
    path = Path(path)
    images = os.path.relpath(Path(photos).resolve() / benchmark["split"], path.parent.resolve())
    write_json_atomic(path, {**benchmark, "images": Path(images).as_posix()}, indent=1)
