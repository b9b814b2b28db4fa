"""The vocabulary of the small clothing world: one noun per class folder, the basic colour words.

Every word is a single token of the CLIP BPE vocabulary (`open_clip.get_tokenizer`, checked by the tests), so a
pseudo token decoded to its nearest vocabulary word can land exactly on a class or colour.
"""

from __future__ import annotations

# class folder of clothing-dataset-small -> the noun captions, benchmark texts and decoding use
CLASS_WORDS: dict[str, str] = {
    "dress": "dress",
    "hat": "hat",
    "longsleeve": "sweater",
    "outwear": "jacket",
    "pants": "pants",
    "shirt": "shirt",
    "shoes": "shoes",
    "shorts": "shorts",
    "skirt": "skirt",
    "t-shirt": "tshirt",
}

# nouns that take plural agreement ("these pants are red", "a pair of shoes")
PLURAL_WORDS: frozenset[str] = frozenset({"pants", "shoes", "shorts"})

# the basic colour terms a garment is named with (Berlin & Kay's eleven)
COLOURS: tuple[str, ...] = (
    "black",
    "white",
    "grey",
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "pink",
    "brown",
)


def class_word(folder: str) -> str:
    """The noun of a class folder; a KeyError names the unknown folder."""
    try:
        return CLASS_WORDS[folder]
    except KeyError:
        raise KeyError(f"unknown clothing class folder {folder!r} (known: {', '.join(CLASS_WORDS)})") from None
