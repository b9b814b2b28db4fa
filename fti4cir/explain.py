"""What the inversion network "said" about a reference image, in a form people can read and look at.

For one reference image: the top vocabulary words of every pseudo token (subject first, then the kept attribute
tokens in the order they enter the prompt), the relevance of all attribute queries with the keep threshold, and for
every kept attribute token a heatmap of its attention over the image patches drawn on the image as the model saw it.
`query_sentence` renders the text side of a query (method, switched-off tokens and all) with the words in brackets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import torch
from torchvision.transforms import Normalize, ToTensor

from . import methods
from .decode import Word, decode
from .inversion import AttributeSelection, PseudoTokens
from .queries import NEUTRAL_SUBJECT

TOP_WORDS = 3
# Colour ramp of the heatmaps (dark purple -> red -> pale yellow, like matplotlib's "magma"), as RGB anchors.
_RAMP = np.array([(0, 0, 4), (81, 18, 124), (183, 55, 121), (252, 137, 97), (252, 253, 191)], dtype=np.float32)


def _ramp_table() -> np.ndarray:
    """[256, 3] colours along `_RAMP` (piecewise linear), looked up by the heat quantised to 8 bits."""
    position = np.linspace(0.0, 1.0, 256) * (len(_RAMP) - 1)
    low = np.minimum(np.floor(position).astype(np.int64), len(_RAMP) - 2)
    t = (position - low)[:, None]
    return (_RAMP[low] * (1.0 - t) + _RAMP[low + 1] * t).astype(np.float32)


_RAMP_TABLE = _ramp_table()


def patch_attention(attention: list[torch.Tensor], num_k: int) -> torch.Tensor:
    """Attention of each attribute query over the image patches, averaged over layers and heads.

    attention: per layer [B, heads, num_k, num_k + 1 + g*g] (`AttributeSelection.attention`; columns are the queries,
    the class token, then the patches). Returns [B, num_k, g*g]; rows do not sum to one (the queries also attend to
    each other and to the class token).
    """
    stacked = torch.stack([a.float() for a in attention])  # [layers, B, heads, num_k, columns]
    return stacked.mean(dim=(0, 2))[:, :, num_k + 1 :]


@dataclass(frozen=True)
class AttributeEvidence:
    """One image's attribute selection, as kept in a gallery or taken from a fresh inversion."""

    relevance: np.ndarray  # [num_k] softmax over the attribute queries
    kept: np.ndarray  # [r] query index of each kept attribute token, in prompt order
    attention: np.ndarray | None  # [num_k, g*g] attention of each query over the patches (`patch_attention`);
    # None when the inversion ran without return_attention (no heatmaps then)

    @classmethod
    def from_selection(cls, selection: AttributeSelection, row: int = 0) -> AttributeEvidence:
        r = int(selection.num_kept[row])
        maps = None
        if selection.attention is not None:
            maps = patch_attention([a[row : row + 1] for a in selection.attention], selection.relevance.shape[1])
            maps = maps[0].detach().cpu().numpy()
        return cls(
            selection.relevance[row].detach().cpu().float().numpy(),
            selection.indices[row, :r].detach().cpu().numpy().astype(np.int64),
            maps,
        )

    @classmethod
    def from_dict(cls, data: dict) -> AttributeEvidence:
        """From a gallery's stored explanation: keys "relevance", "kept", "attention" (arrays or tensors)."""
        as_array = lambda v: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)  # noqa: E731
        return cls(
            as_array(data["relevance"]).astype(np.float32),
            as_array(data["kept"]).astype(np.int64),
            as_array(data["attention"]).astype(np.float32),
        )


@dataclass(frozen=True)
class TokenWords:
    """The nearest vocabulary words of one pseudo token."""

    label: str  # "subject" or "attribute 2 (query 7)"
    query: int | None  # attribute query index; None for the subject token
    words: list[Word]

    @property
    def word(self) -> str:
        return self.words[0].word


@dataclass
class Explanation:
    """Everything shown about one reference image; independent of the modification text and method."""

    subject: TokenWords
    attributes: list[TokenWords]  # kept attribute tokens, prompt order
    relevance: np.ndarray  # [num_k]
    epsilon: float
    kept: np.ndarray  # [r] query indices, prompt order
    heatmaps: list[PIL.Image.Image] = field(default_factory=list)  # one per kept attribute token, prompt order

    @property
    def dropped(self) -> np.ndarray:
        """Query indices that were not kept, ascending."""
        return np.setdiff1d(np.arange(len(self.relevance)), self.kept)


def model_view(model, image: PIL.Image.Image) -> PIL.Image.Image:
    """The reference as the model saw it (padding / cropping and resizing of `model.transform`), as an RGB image."""
    view = image
    for step in model.transform.transforms:
        if isinstance(step, (ToTensor, Normalize)):
            break
        view = step(view)
    return view.convert("RGB")


def heatmap_overlay(image: PIL.Image.Image, attention: np.ndarray) -> PIL.Image.Image:
    """Draw a square grid of attention weights [g*g] (row-major, as the patches) over `image`.

    The map is scaled to its own min..max (each token's strongest patch is brightest), upsampled bilinearly to the
    image size and blended in with more opacity where the attention is higher.
    """
    values = np.asarray(attention, dtype=np.float32).reshape(-1)
    side = int(round(np.sqrt(values.size)))
    if side * side != values.size:
        raise ValueError(f"attention over {values.size} patches is not a square grid")
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    grid = PIL.Image.fromarray(scaled.reshape(side, side), mode="F")
    heat = np.clip(np.asarray(grid.resize(image.size, PIL.Image.Resampling.BILINEAR)), 0.0, 1.0)
    colour = _RAMP_TABLE[np.rint(heat * 255).astype(np.uint8)]
    alpha = (0.25 + 0.5 * heat)[..., None]
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    return PIL.Image.fromarray(np.rint(base * (1.0 - alpha) + colour * alpha).astype(np.uint8), "RGB")


def explain(
    model,
    tokens: PseudoTokens,
    evidence: AttributeEvidence,
    image: PIL.Image.Image | None = None,
    *,
    top_words: int = TOP_WORDS,
) -> Explanation:
    """The explanation of one reference image.

    tokens: that image's pseudo tokens (batch of one; cached gallery tokens or a fresh inversion).
    evidence: its attribute selection. image: the reference as decoded (RGB); heatmaps are drawn on its model view
    (none without an image).
    """
    r = int(tokens.num_kept[0])
    if len(evidence.kept) != r:
        raise ValueError(f"evidence keeps {len(evidence.kept)} attribute tokens, the pseudo tokens {r}")
    with torch.no_grad():
        rows = torch.cat([tokens.subject[:1], tokens.attributes[0, :r]]).to(model.device)  # cached tokens: CPU
        words = decode(model.backbone, rows, k=top_words)
    queries = [int(q) for q in evidence.kept]
    subject = TokenWords("subject", None, words[0])
    attributes = [
        TokenWords(f"attribute {i + 1} (query {q})", q, w) for i, (q, w) in enumerate(zip(queries, words[1:]))
    ]
    heatmaps = []
    if image is not None:
        if evidence.attention is None:
            raise ValueError("heatmaps need attention maps: invert with return_attention=True")
        view = model_view(model, image)
        heatmaps = [heatmap_overlay(view, evidence.attention[q]) for q in queries]
    return Explanation(
        subject, attributes, evidence.relevance, float(model.inversion.config.epsilon), evidence.kept, heatmaps
    )


def query_sentence(
    explanation: Explanation | None,
    text: str,
    method: str = "fti4cir",
    *,
    keep_attributes: list[bool] | None = None,
    keep_subject: bool = True,
    subject_word: str | None = None,
) -> str:
    """The query's text side with pseudo tokens shown as their top word in brackets (the method's declared sentence).

    "a photo of [dress] with [floral, red] but is shorter" for fti4cir; switched-off attribute tokens are left out
    and a switched-off subject reads as the neutral word compose puts in its place, as the model sees the query.
    subject_word: the word of a method's own pseudo token (M2C's), instead of the explanation's subject.
    """
    if subject_word is not None:
        subject, words = f"[{subject_word}]", []
    else:
        subject = f"[{explanation.subject.word}]" if keep_subject else NEUTRAL_SUBJECT
        keep = [True] * len(explanation.attributes) if keep_attributes is None else list(keep_attributes)
        words = [a.word for a, on in zip(explanation.attributes, keep) if on]
    return methods.get(method).sentence(text, subject, words)
