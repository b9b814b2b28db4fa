"""The app's logic without any UI: references, searches through `compose` (the evaluation query path), rank diffs.

    service = SearchService(model, gallery)
    reference = service.reference(upload_path_or_bytes_or_gallery_index)   # UserError for bad uploads
    result = service.search(reference, "is red and shorter", "fti4cir", k=10)
    switched = service.search(reference, "is red and shorter", "fti4cir", k=10, keep_attributes=[True, False])
    moves = rank_changes(result.hits, switched.hits)

A gallery image used as the reference takes its cached pseudo tokens and attribute data (no visual pass) and is
left out of its own results, as in the benchmarks. Everything is thread-safe: the service holds no per-user state.

With M2C weights (`SearchService(model, gallery, m2c_model)`), the methods "m2c" (and "m2c+compose" for stage-II
weights) rank the same gallery through `compose` on the same backbone. What a method needs comes from its declaration
(`fti4cir.methods`): the model of its family, and the reference's patch tokens for methods that read them (M2C): an
upload keeps them from its one visual pass; a gallery reference gets them from one visual pass over its file the
first time such a method needs them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import PIL.Image
import torch

from . import methods
from .backbone import VisualFeatures
from .compose import compose_query
from .decode import decode
from .errors import UserError
from .explain import AttributeEvidence, Explanation, explain, query_sentence
from .inputs import clean_text, load_image, quote
from .inversion import PseudoTokens
from .m2c.model import M2CModel

MAX_K = 100  # results per query: bounds the work and the page size of one request
DISPLAY_SIDE = 1024  # references are kept (per user session) and shown at most this large


@dataclass
class Reference:
    """A prepared reference image: pseudo tokens, explanation and the decoded image, reusable across queries."""

    name: str  # gallery name, or the uploaded file's base name ("upload" when it has none)
    image: PIL.Image.Image | None  # decoded RGB, at most DISPLAY_SIDE pixels a side; None when not for display
    tokens: PseudoTokens  # one row
    explanation: Explanation
    gallery_index: int | None = None
    seconds: float = 0.0  # preparation: decoding + visual pass + inversion (gallery references: decoding only)
    visual: VisualFeatures | None = None  # one row on the CPU, kept for M2C (gallery references: filled when first
    # needed)

    @property
    def num_kept(self) -> int:
        return len(self.explanation.attributes)

    def lean(self) -> Reference:
        """This reference without what only its first display needs (the image and the heatmaps): what a session
        keeps to search again."""
        return replace(self, image=None, explanation=replace(self.explanation, heatmaps=[]))


@dataclass(frozen=True)
class Hit:
    rank: int  # 1-based
    index: int  # row in the gallery
    name: str  # path relative to the gallery's source
    path: Path
    score: float  # cosine similarity of the query and the image feature

    @property
    def caption(self) -> str:
        return f"{self.name} · {self.score:.3f}"


@dataclass
class Result:
    reference: Reference
    text: str  # the cleaned text that was searched
    method: str
    hits: list[Hit]
    sentence: str  # the query's text side with the pseudo tokens' words (see explain.query_sentence)
    keep_attributes: list[bool]
    keep_subject: bool
    timings: dict[str, float] = field(default_factory=dict)  # seconds: "compose", "search"; "reference" when
    # this search prepared the reference (decoding + visual pass, or decoding for a gallery image)
    truncated: bool = False  # the text was cut to fit CLIP's context

    @property
    def seconds(self) -> float:
        """Query time: composing the query feature and searching the index."""
        return self.timings["compose"] + self.timings["search"]

    def timing_text(self) -> str:
        text = (
            f"{self.seconds * 1000:.0f} ms (compose {self.timings['compose'] * 1000:.0f} ms, "
            f"search {self.timings['search'] * 1000:.1f} ms)"
        )
        if "reference" in self.timings:
            what = "cached tokens" if self.reference.gallery_index is not None else "visual pass + inversion"
            text += f" · reference {self.timings['reference'] * 1000:.0f} ms ({what})"
        return text


@dataclass(frozen=True)
class Move:
    """How one result's rank changed between two rankings of the same query."""

    name: str
    before: int | None  # 1-based rank, None when it was not in the list
    after: int | None

    @property
    def kind(self) -> Literal["up", "down", "same", "new", "out"]:
        if self.before is None:
            return "new"
        if self.after is None:
            return "out"
        return "up" if self.after < self.before else "down" if self.after > self.before else "same"

    @property
    def arrow(self) -> str:
        """A short marker for captions: "↑2", "↓1", "new", "out" or "" (unchanged)."""
        kind = self.kind
        if kind == "up":
            return f"↑{self.before - self.after}"
        if kind == "down":
            return f"↓{self.after - self.before}"
        return "" if kind == "same" else kind


def rank_changes(before: Sequence[Hit], after: Sequence[Hit]) -> list[Move]:
    """Moves of every result in `after` (in its order), then the results of `before` that dropped out."""
    old = {h.name: h.rank for h in before}
    new = {h.name: h.rank for h in after}
    moves = [Move(h.name, old.get(h.name), h.rank) for h in after]
    return moves + [Move(h.name, h.rank, None) for h in before if h.name not in new]


def summarize_moves(moves: Sequence[Move]) -> str:
    """ "2 up, 1 down, 1 new, 1 dropped out, 6 unchanged" (only non-zero counts), or "no change"."""
    counts = {kind: sum(m.kind == kind for m in moves) for kind in ("up", "down", "new", "out", "same")}
    if counts["same"] == len(moves):
        return "no change"
    names = {"up": "up", "down": "down", "new": "new", "out": "dropped out", "same": "unchanged"}
    return ", ".join(f"{counts[k]} {names[k]}" for k in names if counts[k])


class SearchService:
    """A model and a gallery built with it; answers searches for any number of concurrent users."""

    def __init__(self, model, gallery, m2c_model: M2CModel | None = None):
        self.model = model
        self.gallery = gallery
        self.m2c_model = m2c_model
        if m2c_model is not None and m2c_model.backbone is not model.backbone:
            raise ValueError("the M2C model must share the FTI4CIR model's backbone")
        self.models = {"fti4cir": model, "m2c": m2c_model}  # the model of each method family

    @property
    def methods(self) -> tuple[str, ...]:
        """What this service can rank with: FTI4CIR and its baselines, plus the M2C methods its weights allow."""
        return methods.runnable(self.models)

    @property
    def size(self) -> int:
        return len(self.gallery.names)

    # ---- references ----------------------------------------------------------------------------------------------
    def reference(self, source, *, display: bool = True) -> Reference:
        """A Reference (returned as is), a gallery row (int), or an upload (path, bytes, stream or PIL image).

        display=False skips what only a page shows (the image itself and the heatmaps): for API answers.
        """
        if isinstance(source, Reference):
            return source
        if isinstance(source, (int, np.integer)) and not isinstance(source, bool):
            return self.gallery_reference(int(source), display=display)
        return self.upload_reference(source, display=display)

    def gallery_reference(self, index: int, *, display: bool = True) -> Reference:
        """A gallery image as the reference: its cached pseudo tokens and attribute data, no visual pass."""
        if not 0 <= index < self.size:
            raise UserError(f"There is no gallery image number {index}; the gallery has {self.size} images.")
        start = time.perf_counter()
        image = load_image(self.gallery.paths[index]) if display else None
        tokens = self.gallery.tokens_of([index])
        evidence = AttributeEvidence.from_dict(self.gallery.explanations(index))
        explanation = explain(self.model, tokens, evidence, image)
        return Reference(
            self.gallery.names[index], _display(image), tokens, explanation, index, time.perf_counter() - start
        )

    def upload_reference(self, source, *, display: bool = True) -> Reference:
        """An uploaded image: decoded safely (UserError for anything unusable), then one visual pass."""
        start = time.perf_counter()
        image = load_image(source)
        visual = self._encode(image)
        with torch.inference_mode():
            tokens = self.model.invert(visual, return_attention=display)
        evidence = AttributeEvidence.from_selection(tokens.selection)
        explanation = explain(self.model, tokens, evidence, image if display else None)
        kept = _moved(visual, "cpu") if self.m2c_model is not None else None
        return Reference(
            _upload_name(source),
            _display(image) if display else None,
            tokens,
            explanation,
            None,
            time.perf_counter() - start,
            kept,
        )

    def _visual(self, reference: Reference, device) -> VisualFeatures:
        """The reference's visual features (on `device`); a gallery reference's come from one visual pass over its file
        (galleries store FTI4CIR's tokens, not the patch tokens M2C reads)."""
        if reference.visual is None:
            path = self.gallery.paths[reference.gallery_index]
            try:
                image = load_image(path)
            except UserError as e:
                raise UserError(
                    f"The M2C methods read the gallery image itself, and {reference.name} cannot be read "
                    f"({e}). Put the gallery's images back where it was built from, or rebuild the "
                    f"gallery; the FTI4CIR methods work from the gallery's cached tokens."
                ) from None
            reference.visual = _moved(self._encode(image), "cpu")
        return _moved(reference.visual, device)

    def _encode(self, image: PIL.Image.Image) -> VisualFeatures:
        """One visual pass over a decoded image (global feature and patch tokens, on the model's device)."""
        with torch.inference_mode():
            return self.model.backbone.encode_visual(self.model.preprocess([image]))

    # ---- search --------------------------------------------------------------------------------------------------
    def search(
        self,
        reference,
        text: str | None,
        method: str = "fti4cir",
        k: int = 10,
        keep_attributes: Sequence[bool] | None = None,
        keep_subject: bool = True,
    ) -> Result:
        """Rank the gallery for one query. keep_attributes: one switch per kept attribute token (prompt order); the
        switches act on FTI4CIR's pseudo tokens and leave the other methods' queries as they are."""
        if method not in self.methods:
            raise UserError(f"Unknown method {quote(method)}; choose one of {', '.join(self.methods)}.")
        prepared_here = not isinstance(reference, Reference)
        reference = self.reference(reference)
        text = clean_text(text)
        r = reference.num_kept
        keep = [True] * r if keep_attributes is None else [bool(v) for v in keep_attributes]
        if len(keep) != r:
            raise UserError(
                f"The token switches ({len(keep)}) do not match this reference's {r} attribute "
                "tokens; run the search again."
            )
        exclude = reference.gallery_index is not None
        k = max(1, min(int(k), MAX_K, self.size - exclude))

        declared = methods.get(method)
        model = self.models[declared.family]
        start = time.perf_counter()
        with torch.inference_mode():
            inputs = self._visual(reference, model.device) if declared.patch_tokens else reference.tokens
            query = compose_query(
                model,
                inputs,
                [text],
                method=method,
                keep_attributes=self._keep_mask(keep, reference.tokens),
                keep_subject=torch.tensor([bool(keep_subject)]),
            )
        composed = time.perf_counter()
        scores, indices = self.gallery.search(
            query.features.float().cpu(), k, exclude=[[reference.gallery_index]] if exclude else None
        )
        searched = time.perf_counter()

        hits = [
            Hit(rank, i, self.gallery.names[i], Path(self.gallery.paths[i]), s)
            for rank, (i, s) in enumerate(zip(_row(indices), _row(scores)), start=1)
            if i >= 0
        ]
        own_word = self._m2c_word(inputs) if declared.family == "m2c" else None  # M2C's own pseudo token
        sentence = query_sentence(
            reference.explanation,
            text,
            method,
            keep_attributes=keep,
            keep_subject=bool(keep_subject),
            subject_word=own_word,
        )
        timings = {"compose": composed - start, "search": searched - composed}
        if prepared_here:
            timings["reference"] = reference.seconds
        return Result(
            reference, text, method, hits, sentence, keep, bool(keep_subject), timings, bool(query.truncated[0])
        )

    def _m2c_word(self, visual: VisualFeatures) -> str:
        """The nearest word of M2C's pseudo token (Phi of the global feature) for the displayed sentence."""
        with torch.inference_mode():
            token = self.m2c_model.net.mapper(visual.global_features.float())
        return decode(self.model.backbone, token, k=1)[0][0].word

    @staticmethod
    def _keep_mask(keep: list[bool], tokens: PseudoTokens) -> torch.Tensor:
        """[1, topk] switches for compose: one per kept row, rows past num_kept stay off."""
        mask = torch.zeros(1, tokens.attributes.shape[1], dtype=torch.bool)
        mask[0, : len(keep)] = torch.tensor(keep, dtype=torch.bool)
        return mask


def _moved(visual: VisualFeatures, device) -> VisualFeatures:
    return VisualFeatures(visual.global_features.to(device), visual.patch_tokens.to(device))


def _row(values) -> list:
    """First row of a [1, k] tensor / array as a Python list."""
    values = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    return values.reshape(-1).tolist()


def _display(image: PIL.Image.Image | None) -> PIL.Image.Image | None:
    if image is None or max(image.size) <= DISPLAY_SIDE:
        return image
    small = image.copy()
    small.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE), PIL.Image.Resampling.LANCZOS)
    return small


def _upload_name(source) -> str:
    name = getattr(source, "name", source) if not isinstance(source, (bytes, bytearray, PIL.Image.Image)) else None
    if isinstance(name, (str, Path)):
        return clean_text(Path(name).name, max_chars=10**6)[:80] or "upload"
    return "upload"
