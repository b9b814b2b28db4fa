"""Naming a garment's colour from its pixels: background from the border, garment = what differs, colour by vote.

The photos of the clothing dataset show one garment laid out (or hung) on a background that fills the border of
the picture. `garment_colour(image)`:

1. works on a copy whose longer side is at most `WORK_SIDE` pixels, in CIE Lab (D65), after a white balance taken
   from the border when the border is nearly neutral (a white sheet photographed under warm light should not make
   a white shirt yellow; a coloured blanket is left alone);
2. models the background by up to three colour clusters of the border pixels (k-means in Lab; clusters holding
   less than `MIN_BORDER_SHARE` of the border are treated as garment that touches the edge, not background);
3. takes as the garment every pixel farther (Delta E) from all background clusters than the border's own spread
   allows (at least `MIN_DELTA_E`), weighted towards the centre of the picture;
4. names each garment pixel by rules on lightness, chroma and hue (CIE LCh, `name_pixels`) and lets the pixels
   vote. Per-pixel votes rather than the mean colour: a print or a shadow takes some votes, but does not shift a
   striped or shaded garment to a colour it does not have.

The result carries the winning word, its share of the (centre-weighted) vote as `confidence`, and the garment's
share of the picture as `garment_fraction`; `reliable` says whether both are high enough to use the label.

The rules and limits were set by looking at photos (see data/clothing/colour_check.csv and its README for the
measured agreement with a person's reading: sets check, dev and tune were used to set them, set fresh never was;
`python -m fti4cir.commands.colour_check` measures them). `reliable` is strict (version 4: vote >= 60%, garment >= 25%
of the picture): about 63% of the demo photos get a label, which agrees with a person for about 73% of fresh
photos. The hard cases are the boundaries of the basic colour terms themselves: navy vs black, charcoal vs grey vs
black, beige/khaki (no basic term; here brown when it has some chroma), light denim vs white, and colour casts of
indoor light.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from .world import COLOURS

WORK_SIDE = 96
BORDER = 0.06  # border width as a fraction of the shorter side
MIN_BORDER_SHARE = 0.2
MIN_DELTA_E = 14.0
WB_MAX_CHROMA = 12.0  # a border more colourful than this is a coloured background, not a colour cast ...
WB_WARM_MAX_CHROMA = 22.0  # ... unless it is light and warm up to this chroma (then corrected by a part)
WB_WARM_MIN_L = 50.0
WB_WARM_STRENGTH = 0.5
MIN_CONFIDENCE = 0.6
MIN_GARMENT_FRACTION = 0.25

ACHROMATIC = ("black", "white", "grey")
BLACK_BELOW = 25.0  # achromatic lightness limits: black below, white from
WHITE_FROM = 64.0
BLUE_LIMIT = 5.0  # chroma from which a mid-light cyan-blue pixel is blue (light denim), not grey
VIOLET_FROM = 272.0  # hues from here to 308 are the blue-violet cast cameras give grey fabric ...
VIOLET_LIMIT = 9.0  # ... so there a mid-light pixel needs this much chroma to be blue
NAVY_TO = 325.0  # dark pixels (L < 32) with hues 290..NAVY_TO are navy (blue), not purple
MAGENTA_FROM = 330.0  # strong hues from here to 345 are raspberry / fuchsia (red or pink), not purple ...
MAGENTA_CHROMA = 25.0  # ... from this chroma
PINK_BELOW_HUE = 18.0  # light (L >= 40) reds with hues below this are deep pink, not red


@dataclass(frozen=True)
class ColourLabel:
    colour: str
    confidence: float  # share of the garment's weighted vote won by `colour`
    garment_fraction: float  # share of the picture taken as garment
    scores: dict[str, float]  # every colour word's share of the vote

    @property
    def reliable(self) -> bool:
        return self.confidence >= MIN_CONFIDENCE and self.garment_fraction >= MIN_GARMENT_FRACTION


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """[..., 3] sRGB in 0..255 -> [..., 3] CIE Lab (D65 white)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array(
        [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
    )
    xyz = linear @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 216 / 24389, np.cbrt(xyz), (24389 / 27 * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


_INDEX = {w: i for i, w in enumerate(COLOURS)}


def name_pixels(lab: np.ndarray) -> np.ndarray:
    """[N, 3] Lab -> [N] indices into COLOURS, by lightness L, chroma C and hue angle h (degrees, CIE LCh).

    Achromatic when C is below a hue- and lightness-dependent limit (warm casts of indoor light, the violet cast of
    grey fabric and the noise of dark pixels are tolerated more than a faint cyan-blue, which is what light denim
    looks like), then black / grey / white by L. Chromatic pixels by hue sector, with lightness and chroma splitting
    red from pink (light, soft or bluish reds are pink; dark or strong ones red), orange and yellow from brown
    (dark or soft warm hues are brown: tan, khaki, camel), dark yellow-green (olive) into green, dark violet (navy)
    into blue and light magenta into pink.
    """
    L, a, b = lab[:, 0], lab[:, 1], lab[:, 2]
    C = np.hypot(a, b)
    h = np.degrees(np.arctan2(b, a)) % 360
    warm = (h >= 40) & (h < 105)
    bluish = (h >= 215) & (h < 308)
    violet_cast = (h >= VIOLET_FROM) & (h < 308) & (L >= 30)
    limit = np.select(
        [L < 15, warm & (L > 55), warm, bluish & (L >= WHITE_FROM), violet_cast, bluish],
        [12.0, 13.0, 7.0, 9.0, VIOLET_LIMIT, BLUE_LIMIT],
        default=5.5,
    )
    achromatic = C < limit
    red_zone = (h < 48) | (h >= 345) | ((h >= MAGENTA_FROM) & (C >= MAGENTA_CHROMA))
    navy = (L < 32) & (h >= 290) & (h < NAVY_TO)
    rules = [
        (achromatic & (L < BLACK_BELOW), "black"),
        (achromatic & (L >= WHITE_FROM), "white"),
        (achromatic, "grey"),
        ((((h >= 30) & (h < 48)) | (h >= 345)) & (L < 45) & (C < 35), "brown"),
        (red_zone & (h < PINK_BELOW_HUE) & (L >= 40), "pink"),
        (red_zone & ((L < 40) | ((C >= 50) & (L < 60))), "red"),
        (red_zone, "pink"),
        ((h < 75) & (C >= 45) & (L >= 50), "orange"),
        (h < 75, "brown"),
        ((h < 105) & (C >= 30) & (L >= 55), "yellow"),
        (h < 95, "brown"),
        (h < 215, "green"),
        ((h < 308) | navy, "blue"),
        ((h >= 330) & (L > 55), "pink"),
    ]
    return np.select(
        [condition for condition, _ in rules], [_INDEX[word] for _, word in rules], default=_INDEX["purple"]
    ).astype(np.int64)


def _pixels(image: Image.Image) -> np.ndarray:
    image = ImageOps.exif_transpose(image)
    if image.mode != "RGB":
        image = image.convert("RGBA").convert("RGB") if "A" in image.getbands() else image.convert("RGB")
    image = image.copy()
    image.thumbnail((WORK_SIDE, WORK_SIDE), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float64)


def _border_mask(h: int, w: int) -> np.ndarray:
    b = max(1, round(BORDER * min(h, w)))
    mask = np.zeros((h, w), dtype=bool)
    mask[:b], mask[-b:], mask[:, :b], mask[:, -b:] = True, True, True, True
    return mask


def _kmeans(x: np.ndarray, k: int, iterations: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic k-means (farthest-point init from the median): centres [k', 3], assignment [N]."""
    centres = [np.median(x, axis=0)]
    for _ in range(k - 1):
        d = np.min([((x - c) ** 2).sum(1) for c in centres], axis=0)
        centres.append(x[d.argmax()])
    centres = np.array(centres)
    for _ in range(iterations):
        assign = ((x[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        centres = np.array([x[assign == j].mean(0) if (assign == j).any() else centres[j] for j in range(k)])
    assign = ((x[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
    return centres, assign


def _white_balance(rgb: np.ndarray, border: np.ndarray) -> np.ndarray:
    """Scale channels so a nearly neutral border becomes neutral (left alone when the border is clearly coloured)."""
    mean = np.median(rgb[border], axis=0)
    lab = srgb_to_lab(mean)
    chroma, hue = np.hypot(lab[1], lab[2]), np.degrees(np.arctan2(lab[2], lab[1])) % 360
    strength = 1.0
    if chroma > WB_MAX_CHROMA:
        # a light, softly warm border: a white sheet or wall under warm indoor light, or a cream one: corrected by a
        # part (WB_WARM_STRENGTH), so that greys under warm light are not named brown
        if not (lab[0] >= WB_WARM_MIN_L and 40 <= hue < 105 and chroma <= WB_WARM_MAX_CHROMA):
            return rgb
        strength = WB_WARM_STRENGTH
    if lab[0] < 25:
        return rgb
    gain = (mean.mean() / np.maximum(mean, 1.0)) ** strength
    return np.clip(rgb * gain, 0, 255)


def garment_mask(lab: np.ndarray, border: np.ndarray) -> np.ndarray:
    """[H, W] bool: pixels that differ from every background cluster more than the border's own spread."""
    edge = lab[border]
    centres, assign = _kmeans(edge, 3)
    share = np.bincount(assign, minlength=len(centres)) / len(edge)
    keep = share >= MIN_BORDER_SHARE
    if not keep.any():
        keep = share == share.max()
    background = centres[keep]
    dist = np.sqrt(((lab[..., None, :] - background) ** 2).sum(-1)).min(-1)
    # the border's own spread, on the border pixels of the background clusters only: those of a garment or an object
    # touching the edge would inflate it until the garment itself no longer stands out
    spread = np.quantile(dist[border][keep[assign]], 0.9)
    return dist > max(MIN_DELTA_E, spread)


def garment_colour(image: Image.Image) -> ColourLabel:
    """The colour word of the garment in a product-style photo (see the module docstring)."""
    rgb = _pixels(image)
    h, w = rgb.shape[:2]
    border = _border_mask(h, w)
    lab = srgb_to_lab(_white_balance(rgb, border))
    mask = garment_mask(lab, border) & ~border
    fraction = float(mask.mean())
    yy, xx = np.mgrid[0:h, 0:w]
    centre = np.exp(-(((yy - (h - 1) / 2) / (0.35 * h)) ** 2 + ((xx - (w - 1) / 2) / (0.35 * w)) ** 2))
    if mask.sum() < max(16, 0.01 * h * w):  # nothing stands out: name the middle of the picture
        mask = centre > 0.5
    votes = np.bincount(name_pixels(lab[mask]), weights=centre[mask], minlength=len(COLOURS))
    votes = votes / votes.sum()
    best = int(votes.argmax())
    return ColourLabel(
        COLOURS[best], float(votes[best]), fraction, {c: round(float(v), 4) for c, v in zip(COLOURS, votes)}
    )
