"""Do the decoded pseudo words mean something? Hit rates of FTI4CIR's tokens against the photo labels.

- subject: the subject token's nearest vocabulary word is the photo's class word;
- colour: the photo's colour word is among the top-3 words of at least one kept attribute token (photos with a
  colour label).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..decode import decode


@torch.no_grad()
def decoded_word_rates(
    model,
    photos_root: str | os.PathLike,
    labels: dict,
    split: str = "test",
    batch_size: int = 64,
    progress: bool = True,
) -> dict:
    from ..inputs import load_image

    rows = [p for p in labels["photos"] if p["split"] == split]
    subject_hits = colour_hits = coloured = 0
    for i in tqdm(range(0, len(rows), batch_size), desc="decoded words", unit="batch", disable=not progress):
        batch = rows[i : i + batch_size]
        tokens = model.invert(model.preprocess([load_image(Path(photos_root) / p["path"]) for p in batch]))
        subjects = decode(model.backbone, tokens.subject, k=1)
        for j, p in enumerate(batch):
            subject_hits += subjects[j][0].word == p["word"]
            if p["colour"]:
                coloured += 1
                kept = tokens.attributes[j, : int(tokens.num_kept[j])]
                words = {w.word for ws in decode(model.backbone, kept, k=3) for w in ws}
                colour_hits += p["colour"] in words
    return {
        "split": split,
        "photos": len(rows),
        "subject_is_class": subject_hits / len(rows),
        "coloured_photos": coloured,
        "colour_in_attribute_top3": colour_hits / max(coloured, 1),
    }
