"""The demo CLIP: a small open_clip model trained from scratch on the clothing photos, contrastively.

No pretrained CLIP can be downloaded here, so the embedded demo model is made from photos the project may ship.
Recipe (chosen by measuring several on the validation split; see `weights/README.md`):

- model `fti4cir-clothing` (64 px; a convolutional stem with residual stages in place of the ViT patch embedding,
  then open_clip's transformer on the 8 x 8 grid; the real CLIP BPE vocabulary in the text tower);
- the photos are decoded once through the project's "targetpad" transform at `load_size`, then every step draws a
  random resized crop (area `min_scale`..1, aspect 3/4..4/3) and a horizontal flip per photo, batched on tensors.
  Never a colour jitter: colour is a label;
- one caption per photo and step from `captions.caption` (its forms drawn at random; a share `colourless` of them
  name only the garment), class-balanced sampling of photos (t-shirt has 7 times skirt's photos);
- label-aware targets: a caption is a positive of every photo in the batch it describes truly (same garment, and
  the same colour when it names one), not only of its own photo, since many photos share a caption;
- AdamW (lr 5e-4, betas 0.9 / 0.98, eps 1e-6 as CLIP), linear warm-up then cosine decay, bf16 autocast where the CPU has
  it (or on CUDA); on the CPU, attention's math kernel and freed heap handed back every epoch (speed and memory:
  `_attention_backend`, `release_freed_memory`).

Deterministic from the seed; the run directory holds a checkpoint after every epoch (`checkpoint.json` + tensors,
written atomically) and `resume` continues bit for bit. The result is `clip.safetensors` (fp16; rows of the token
embedding for tokens no caption ever used are zero, since nothing gave them a meaning) and `clip.json`.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..atomic import write_json_atomic
from ..errors import UserError
from ..training.checkpoint import (
    changed_settings,
    read_record,
    remove_stale_tensors,
    restore_state_tensors,
    rng_state,
    seed_everything,
    set_rng_state,
    write_state_tensors,
)
from .benchmark import labels_digest
from .captions import caption
from .labels import read_labels
from .world import COLOURS

DEMO_MODEL = "fti4cir-clothing"
CHECKPOINT = "checkpoint.json"
WEIGHTS = "clip.safetensors"


@dataclass
class ClipTrainConfig:
    photos: str = "data/clothing"  # <split>/<class>/*.jpg with labels.json
    labels: str | None = None  # the labels the captions come from (None: PHOTOS/labels.json)
    out: str = "runs/demo/clip"
    model: str = DEMO_MODEL
    epochs: int = 60
    batch_size: int = 128
    # 5e-4: on 3 paired seeds better on validation than the 1e-3 the committed CLIP was trained with (weights/README.md)
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    min_scale: float = 0.35  # random resized crop: smallest share of the image area (weights/README.md: 0.5, 0.6)
    load_size: int = 80  # photos are decoded once at this size; crops are resized to the model's input size
    colourless: float = 0.25  # share of captions naming only the garment
    corrected: float = 0.25  # share of captions that correct a wrong description ("... but it is a red dress")
    seed: int = 0

    RESUMABLE = ("photos", "out", "epochs")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- data -------------------------------------------------------------------------------------------------------
@dataclass
class PhotoSet:
    images: torch.Tensor  # [N, 3, S, S] uint8, targetpad-resized
    classes: torch.Tensor  # [N] index into words
    colours: torch.Tensor  # [N] index into COLOURS, -1 = no reliable colour
    words: list[str]
    paths: list[str]


def load_photos(photos_root: str | os.PathLike, labels: dict, split: str, size: int, progress: bool = True) -> PhotoSet:
    """Decode the photos of `split` through the targetpad transform at `size` (uint8, not normalised)."""
    from PIL import Image

    from ..preprocess import make_transform

    words = sorted(set(labels["classes"].values()))
    transform = make_transform("targetpad", size)
    rows = [p for p in labels["photos"] if p["split"] == split]
    if not rows:
        raise UserError(f"no photos of split {split!r} in the labels")
    images = torch.empty(len(rows), 3, size, size, dtype=torch.uint8)
    mean = torch.tensor(transform.transforms[-1].mean).view(3, 1, 1)
    std = torch.tensor(transform.transforms[-1].std).view(3, 1, 1)
    for i, p in enumerate(tqdm(rows, desc=f"decode {split}", unit="photo", disable=not progress)):
        path = Path(photos_root) / p["path"]
        try:
            with Image.open(path) as im:
                x = transform(im)
        except OSError as e:
            raise UserError(f"cannot read {path}: {e}") from e
        images[i] = ((x * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
    return PhotoSet(
        images,
        torch.tensor([words.index(p["word"]) for p in rows]),
        torch.tensor([COLOURS.index(p["colour"]) if p["colour"] else -1 for p in rows]),
        words,
        [p["path"] for p in rows],
    )


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> the CLIP-normalised float input."""
    from ..preprocess import CLIP_MEAN, CLIP_STD

    mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def random_crops(images: torch.Tensor, size: int, min_scale: float) -> torch.Tensor:
    """A random resized crop (area min_scale..1, aspect 3/4..4/3) and a random horizontal flip per image, resized to
    `size`, as one batched affine resampling. Draws from the global torch RNG."""
    b = images.shape[0]
    side = torch.empty(b).uniform_(min_scale, 1.0).sqrt()
    aspect = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3)).exp().sqrt()
    sx, sy = (side * aspect).clamp(max=1), (side / aspect).clamp(max=1)
    tx, ty = (torch.rand(b) * 2 - 1) * (1 - sx), (torch.rand(b) * 2 - 1) * (1 - sy)
    flip = torch.where(torch.rand(b) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx * flip, tx, sy, ty
    grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False).to(images.device)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# ---- model ------------------------------------------------------------------------------------------------------
def create_clip(model_name: str) -> torch.nn.Module:
    """A randomly initialised open_clip model of a registered config (conv stem attached)."""
    import open_clip

    from .. import backbone  # noqa: F401 - registers the project's model configs with open_clip
    from ..towers import attach_conv_stem

    model = open_clip.create_model(model_name, pretrained=None, precision="fp32", device="cpu")
    attach_conv_stem(model, model_name)
    return model


def encode_text(model, ids: torch.Tensor) -> torch.Tensor:
    """The text tower on [B, L] token ids, run only up to the batch's longest caption (causal mask: exact)."""
    from ..tokens import EOT_ID

    eot = (ids == EOT_ID).int().argmax(dim=1)
    length = int(eot.max()) + 1
    x = model.token_embedding(ids[:, :length]) + model.positional_embedding[:length]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    return x[torch.arange(len(ids), device=ids.device), eot] @ model.text_projection


def _autocast(device: torch.device) -> torch.autocast:
    bf16 = device.type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


class CaptionSampler:
    """Draws one caption per photo (global `random` RNG) and keeps the token ids; remembers every token used."""

    def __init__(self, words: list[str], colourless: float, corrected: float, context_length: int):
        from open_clip.tokenizer import SimpleTokenizer

        self.words, self.colourless, self.corrected = words, colourless, corrected
        self.context_length = context_length
        self.tokenizer = SimpleTokenizer(context_length=context_length)
        self._ids: dict[str, torch.Tensor] = {}

    def ids(self, text: str) -> torch.Tensor:
        if text not in self._ids:
            self._ids[text] = self.tokenizer([text])[0]
        return self._ids[text]

    def sample(self, classes: torch.Tensor, colours: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, L] and the colour each caption names ([B], -1 = none)."""
        ids, named = [], []
        for c, colour in zip(classes.tolist(), colours.tolist()):
            if colour >= 0 and random.random() < self.colourless:
                colour = -1
            word, colour_word = self.words[c], COLOURS[colour] if colour >= 0 else None
            if colour_word and random.random() < self.corrected:
                text = corrected_caption(word, colour_word, self.words, random)
            else:
                text = caption(word, colour_word, random, others=tuple(self.words))
            ids.append(self.ids(text))
            named.append(colour)
        return torch.stack(ids), torch.tensor(named)

    def used_tokens(self) -> torch.Tensor:
        return torch.unique(torch.stack(list(self._ids.values())))


# Captions that first name something else and then correct it, as people write ("not a skirt but a red dress"):
# every one still describes ONE photo (the garment after the correction), never a pair of photos. They are how the
# small world's text learns that what follows "but" / "instead" wins, the language of modification texts.
# {ow}/{oc}: a wrong garment / colour.
CORRECTED_FORMS = (
    "a photo of {oa}{oc} {w} but {is} {c}",
    "a photo of {oa}{ow} but {is} {a}{c} {w} instead",
    "a photo of {oa}{oc} {ow} but {is} {a}{c} {w}",
    "not {oa}{oc} {w} but {a}{c} one",
    "not {oa}{ow} but {a}{c} {w}",
    "{oa}{ow}? no, {a}{c} {w}",
    "a {w} that looks {oc} but {is} {c}",
    "it was {oa}{oc} {ow}, now {is} {a}{c} {w}",
)


def corrected_caption(word: str, colour: str, words: list[str], rng) -> str:
    """A caption of a `colour` `word` phrased as a correction of a wrong garment and/or colour."""
    from .world import PLURAL_WORDS

    other_word = rng.choice([w for w in words if w != word])
    other_colour = rng.choice([c for c in COLOURS if c != colour])
    form = rng.choice(CORRECTED_FORMS)
    article = lambda w: "" if w in PLURAL_WORDS else "a "  # noqa: E731
    plural = word in PLURAL_WORDS
    text = form.format(
        w=word,
        c=colour,
        ow=other_word,
        oc=other_colour,
        a=article(word),
        oa=article(other_word if "{ow}" in form else word),
        **{"is": "they are" if plural else "it is"},
    )
    text = text.replace(" one", " ones" if plural else " one")
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def label_aware_targets(classes: torch.Tensor, colours: torch.Tensor, named: torch.Tensor) -> torch.Tensor:
    """[B images, B captions]: 1 where caption j describes photo i truly (same garment; same colour if it names
    one). The diagonal is always 1."""
    same_class = classes[:, None] == classes[None, :]
    colour_ok = (named[None, :] < 0) | (colours[:, None] == named[None, :])
    return (same_class & colour_ok).float()


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, targets: torch.Tensor):
    """Symmetric cross-entropy against the row-normalised label-aware targets, both directions."""
    logits = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    to_text = -(targets / targets.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
    to_image = -(targets.T / targets.T.sum(1, keepdim=True) * F.log_softmax(logits.T, 1)).sum(1).mean()
    return (to_text + to_image) / 2


# ---- training ---------------------------------------------------------------------------------------------------
def _optimizer(model, config: ClipTrainConfig) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )


def _lr_factor(step: int, total: int, warmup: int) -> float:
    return min(1.0, (step + 1) / max(warmup, 1)) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


def release_freed_memory() -> None:
    """Hand glibc's freed heap pages back to the system. The batches' many differently-sized tensors fragment the
    heap: without this the process grew by ~0.2 GB per epoch (12 GB after 60), with it it stays at ~1.1 GB."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _attention_backend(device: torch.device):
    """On the CPU, the math kernel of scaled-dot-product attention: for these short sequences (65 image tokens,
    ~20 caption tokens) its backward pass is much faster than the CPU flash kernel's (a training step 0.55 s
    instead of 0.85 s on 2 cores)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else contextlib.nullcontext()


def _check_resumable(config: ClipTrainConfig, record: dict) -> None:
    different = changed_settings(record["config"], config.to_dict(), ClipTrainConfig.RESUMABLE)
    if different:
        raise UserError(f"Cannot resume {config.out}: settings differ from its checkpoint ({'; '.join(different)})")


def train_clip(
    config: ClipTrainConfig, *, resume: bool = True, device: str | None = None, progress: bool = True
) -> Path:
    """Train (or continue) the demo CLIP in `config.out`; returns the path of the final weights."""
    run_dir = Path(config.out)
    final = run_dir / WEIGHTS
    record = read_record(run_dir / CHECKPOINT)
    if record is not None and not resume:
        raise UserError(f"{run_dir} already holds a CLIP run; resume it or choose another --out")
    if record is not None:
        _check_resumable(config, record)
        if record["epoch"] >= config.epochs and final.exists():
            return final
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    labels = read_labels(config.labels or Path(config.photos) / "labels.json")
    seed_everything(config.seed)
    model = create_clip(config.model).to(device)
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    data = load_photos(config.photos, labels, "train", config.load_size, progress)
    sampler = CaptionSampler(data.words, config.colourless, config.corrected, model.context_length)
    optimizer = _optimizer(model, config)
    steps_per_epoch = max(len(data.images) // config.batch_size, 1)
    total, warmup = steps_per_epoch * config.epochs, int(config.warmup_epochs * steps_per_epoch)
    weights = (1.0 / torch.bincount(data.classes).float())[data.classes]  # class-balanced sampling
    start_epoch, history = 0, []
    run_dir.mkdir(parents=True, exist_ok=True)
    if record is not None:
        restore_state_tensors(run_dir, record, model, optimizer)
        set_rng_state(record["rng"])
        start_epoch, history = record["epoch"], record["history"]
        for text in record["captions"]:  # the token-usage record of the epochs already run
            sampler.ids(text)
    model.train()
    for epoch in range(start_epoch, config.epochs):
        started, loss_sum = time.monotonic(), 0.0
        order = torch.multinomial(weights, steps_per_epoch * config.batch_size, replacement=True)
        bar = tqdm(
            range(steps_per_epoch), desc=f"CLIP epoch {epoch + 1}/{config.epochs}", unit="step", disable=not progress
        )
        for step in bar:
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            global_step = epoch * steps_per_epoch + step
            for group in optimizer.param_groups:
                group["lr"] = config.lr * _lr_factor(global_step, total, warmup)
            images = normalise(random_crops(data.images[index], size, config.min_scale)).to(device)
            ids, named = sampler.sample(data.classes[index], data.colours[index])
            targets = label_aware_targets(data.classes[index], data.colours[index], named).to(device)
            with _autocast(device), _attention_backend(device):  # the backward pass follows the forward's kernel
                image_features = model.encode_image(images).float()
                text_features = encode_text(model, ids.to(device)).float()
            loss = contrastive_loss(image_features, text_features, model.logit_scale.exp().clamp(max=100), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item()
            bar.set_postfix(loss=f"{loss_sum / (step + 1):.3f}", refresh=False)
        history.append(
            {"epoch": epoch + 1, "loss": loss_sum / steps_per_epoch, "seconds": round(time.monotonic() - started, 2)}
        )
        release_freed_memory()
        name, optimizer_state = write_state_tensors(run_dir, epoch + 1, model, optimizer)
        write_json_atomic(
            run_dir / CHECKPOINT,
            {
                "format": 1,
                "tensors": name,
                "config": config.to_dict(),
                "epoch": epoch + 1,
                "history": history,
                "optimizer": optimizer_state,
                "rng": rng_state(),
                "captions": sorted(sampler._ids),
            },
            indent=None,
        )
        remove_stale_tensors(run_dir, name)
    return save_clip(model.eval(), sampler.used_tokens(), config, history, labels_digest(labels), final)


def save_clip(
    model, used_tokens: torch.Tensor, config: ClipTrainConfig, history: list, labels_sha1: str, path: Path
) -> Path:
    """fp16 safetensors (token rows no caption used set to zero) + `<stem>.json` describing the run."""
    from safetensors.torch import save_file

    from ..atomic import atomic_path

    state = {
        k: v.detach().cpu().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
        for k, v in model.state_dict().items()
    }
    unused = torch.ones(state["token_embedding.weight"].shape[0], dtype=torch.bool)
    unused[used_tokens] = False
    state["token_embedding.weight"][unused] = 0
    meta = {
        "model": config.model,
        "training": config.to_dict(),
        "labels_sha1": labels_sha1,
        "tokens_used": int((~unused).sum()),
        "history": history,
    }
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"fti4cir_clip": json.dumps(meta)})
    write_json_atomic(path.with_suffix(".json"), meta)
    return path
