"""Zero-shot class and colour accuracy of a CLIP on the clothing photos, with confusion matrices.

Class: each photo goes to the class whose prompt "a photo of a {word}" has the highest cosine similarity. Colour:
each colour's text feature is the mean of "a photo of a {colour} {word}" over the class words (a prompt ensemble), for
photos with a reliable colour label. Images go through the model's own transform (`model.preprocess`), the path
every query takes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..evaluation.intervals import describe, wilson_interval
from .world import COLOURS, PLURAL_WORDS

CLASS_PROMPT = "a photo of a {word}"
COLOUR_PROMPT = "a photo of a {colour} {word}"


def _prompt(template: str, word: str, colour: str = "") -> str:
    text = template.format(word=word, colour=colour)
    return text.replace("a photo of a ", "a photo of ") if word in PLURAL_WORDS else text


@dataclass
class ZeroShotReport:
    split: str
    class_accuracy: float
    colour_accuracy: float
    class_confusion: np.ndarray  # [truth, predicted], order of `words`
    colour_confusion: np.ndarray  # [truth, predicted], order of COLOURS
    words: list[str]
    photos: int
    coloured_photos: int

    @property
    def class_interval(self) -> tuple[float, float]:
        """95% Wilson interval of the class accuracy over these photos."""
        return wilson_interval(int(np.trace(self.class_confusion)), self.photos)

    @property
    def colour_interval(self) -> tuple[float, float] | None:
        if not self.coloured_photos:
            return None
        return wilson_interval(int(np.trace(self.colour_confusion)), self.coloured_photos)

    def to_dict(self) -> dict:
        colour_interval = self.colour_interval
        return {
            "split": self.split,
            "class_accuracy": self.class_accuracy,
            "class_interval": list(self.class_interval),
            "colour_accuracy": self.colour_accuracy,
            "colour_interval": None if colour_interval is None else list(colour_interval),
            "photos": self.photos,
            "coloured_photos": self.coloured_photos,
            "words": self.words,
            "colours": list(COLOURS),
            "class_confusion": self.class_confusion.tolist(),
            "colour_confusion": self.colour_confusion.tolist(),
        }

    def markdown(self) -> str:
        def table(matrix: np.ndarray, names: list[str]) -> str:
            head = "| truth \\ predicted | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"
            return head + "".join(
                f"| {n} | " + " | ".join(str(v) for v in row) + " |\n" for n, row in zip(names, matrix)
            )

        def interval(bounds: tuple[float, float] | None) -> str:
            return "" if bounds is None else f", {describe(bounds)}"

        return (
            f"Zero-shot on the {self.split} split: class accuracy {self.class_accuracy:.1%} ({self.photos} photos"
            f"{interval(self.class_interval)}; chance {1 / len(self.words):.0%}), colour accuracy "
            f"{self.colour_accuracy:.1%} ({self.coloured_photos} photos with a colour label"
            f"{interval(self.colour_interval)}; chance {1 / len(COLOURS):.0%}). Intervals: Wilson, over the "
            "choice of photos.\n\n"
            f"Class confusion:\n\n{table(self.class_confusion, self.words)}\n"
            f"Colour confusion:\n\n{table(self.colour_confusion, list(COLOURS))}"
        )


def _confusion(truth: np.ndarray, predicted: np.ndarray, n: int) -> np.ndarray:
    matrix = np.zeros((n, n), dtype=np.int64)
    np.add.at(matrix, (truth, predicted), 1)
    return matrix


@torch.no_grad()
def image_features(model, paths: list[Path], batch_size: int = 128, progress: bool = True) -> torch.Tensor:
    """Normalised global image features of image files through the model's transform."""
    from ..inputs import load_image

    out = []
    for i in tqdm(range(0, len(paths), batch_size), desc="image features", unit="batch", disable=not progress):
        images = [load_image(p) for p in paths[i : i + batch_size]]
        out.append(F.normalize(model.backbone.encode_image(model.preprocess(images)).float(), dim=-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def zero_shot(
    model, photos_root: str | os.PathLike, labels: dict, split: str = "test", progress: bool = True
) -> ZeroShotReport:
    """Class and colour accuracy of `model` (a `BackboneModel`: backbone + transform) on `split`."""
    rows = [p for p in labels["photos"] if p["split"] == split]
    words = sorted(set(labels["classes"].values()))
    feats = image_features(model, [Path(photos_root) / p["path"] for p in rows], progress=progress)
    encode = lambda texts: F.normalize(model.backbone.encode_text(texts).float(), dim=-1).cpu()  # noqa: E731
    class_text = encode([_prompt(CLASS_PROMPT, w) for w in words])
    colour_text = torch.stack(
        [F.normalize(encode([_prompt(COLOUR_PROMPT, w, c) for w in words]).mean(0), dim=0) for c in COLOURS]
    )
    class_truth = np.array([words.index(p["word"]) for p in rows])
    class_pred = (feats @ class_text.T).argmax(1).numpy()
    coloured = [i for i, p in enumerate(rows) if p["colour"]]
    colour_truth = np.array([COLOURS.index(rows[i]["colour"]) for i in coloured])
    colour_pred = (feats[coloured] @ colour_text.T).argmax(1).numpy()
    return ZeroShotReport(
        split,
        float((class_pred == class_truth).mean()),
        float((colour_pred == colour_truth).mean()) if coloured else float("nan"),
        _confusion(class_truth, class_pred, len(words)),
        _confusion(colour_truth, colour_pred, len(COLOURS)),
        words,
        len(rows),
        len(coloured),
    )
