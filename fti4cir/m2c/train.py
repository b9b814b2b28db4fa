"""M2C training: stage I (mapping: Phi + VSI, frozen CLIP) and stage II (composing adapters, all else frozen).

Stage I reads a folder of images and one caption per image (for the soft text alignment term): the BLIP captions
JSONL of `fti4cir caption` (`--captions`), or class-name captions "a photo of a {class}" from the images' class
subfolders when no captions file is given. Two augmented views per image, as the official code: view A (random
resized crop, scale 0.8-1, horizontal flip) feeds Phi and VSI, view B (random resized crop, scale 0.9-1) is the
contrastive target. Stage II reads triplets (see `fti4cir.m2c.triplets`); their images go through the visual tower
once, into the shared feature cache (`fti4cir.features`).

Differences from the released code (LiJiaBei-7/TSCIR), besides it not running as released: in stage II the stage-I
modules are frozen in eval mode (the release leaves them in train mode, so the VSI BatchNorm statistics drift while
"frozen"), the mixed hard-negative logits are scaled by 1/t, and the KL term uses the reference images (see
`losses.stage2_loss`).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import (
    Compose,
    InterpolationMode,
    Normalize,
    RandomHorizontalFlip,
    RandomResizedCrop,
    ToTensor,
)
from tqdm.auto import tqdm

from ..cli import positive_int
from ..errors import UserError
from ..features import FeatureStore, default_num_workers, extract_features
from ..imagefiles import list_images
from ..inputs import load_image, to_rgb
from ..preprocess import CLIP_MEAN, CLIP_STD
from ..tokens import tokenize_prompts
from ..training.trainer import seed_everything
from .losses import stage1_loss, stage2_loss
from .model import MAPPING_PROMPT, PROMPTS, M2CModel, M2CNetwork, m2c_compose, save_m2c_weights
from .triplets import CLASS_CAPTION, Triplet, class_label, read_triplets

OFFICIAL_WARMUP = {1: 10000, 2: 100}
OFFICIAL_TEMPERATURE = {1: 0.07, 2: 0.01}
TRAIN_PROMPT = "a photo of * that {text}"


@dataclass
class TrainOptions:
    """Official defaults (run_stage1.sh / run_stage2.sh) unless noted."""

    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 0.1
    warmup: int | None = None  # None: the official 10000 (stage I) / 100 (stage II) steps, at most a tenth of the run
    temperature: float | None = None  # None: 0.07 (stage I) / 0.01 (stage II)
    kl_weight: float = 0.2
    ref_weight: float = 1.0  # stage I: the view-A term; stage II: the mapping-sentence term
    topk: int = 10  # stage II mixed hard negatives
    seed: int = 0
    num_workers: int | None = None
    amp: bool = False  # bfloat16 autocast on CUDA

    def resolved(self, stage: int, total_steps: int) -> tuple[int, float]:
        warmup = OFFICIAL_WARMUP[stage] if self.warmup is None else self.warmup
        if self.warmup is None:
            warmup = min(warmup, total_steps // 10)
        return warmup, OFFICIAL_TEMPERATURE[stage] if self.temperature is None else self.temperature


# ---- shared machinery ---------------------------------------------------------------------------------------------
def _optimizer(params: list[tuple[str, torch.nn.Parameter]], options: TrainOptions, total_steps: int, warmup: int):
    """AdamW without weight decay on gains and biases (the official rule), cosine schedule with linear warmup."""
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0},
                                   {"params": decay, "weight_decay": options.weight_decay}], lr=options.lr)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _autocast(model: M2CModel, options: TrainOptions):
    if options.amp and model.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Shuffled index batches; the last partial batch is dropped when there is more than one batch (in-batch
    negatives need a full batch)."""
    order = torch.randperm(n, generator=generator)
    if n <= batch_size:
        return [order]
    return list(order[: n - n % batch_size].split(batch_size))


def _num_batches(n: int, batch_size: int) -> int:
    return n // batch_size if n > batch_size else 1


def _encode_texts(model: M2CModel, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([F.normalize(model.backbone.encode_text(texts[i:i + batch_size]).float(), dim=-1)
                          for i in range(0, len(texts), batch_size)])


def _step(loss: torch.Tensor, optimizer, scheduler) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()


class _Epoch:
    """One epoch's bookkeeping, shared by both stages: mean loss terms, duration, summary line, weights file."""

    def __init__(self, stage: int, epoch: int):
        self.stage, self.epoch = stage, epoch
        self.started, self.sums, self.steps = time.perf_counter(), {}, 0

    def add(self, terms) -> None:
        for k, v in terms.detached().items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1

    def finish(self, net: M2CNetwork, out: str | Path | None) -> dict:
        """The epoch's record (also printed); writes the weights to `out` when given."""
        seconds = time.perf_counter() - self.started
        record = {"stage": self.stage, "epoch": self.epoch,
                  **{k: v / max(1, self.steps) for k, v in self.sums.items()}, "steps": self.steps,
                  "seconds": round(seconds, 2)}
        tqdm.write(f"stage {self.stage} epoch {self.epoch}: loss {record.get('total', float('nan')):.4f} "
                   f"({self.steps} steps, {seconds:.1f} s)")
        if out is not None:
            save_m2c_weights(net, out)
        return record


# ---- stage I ------------------------------------------------------------------------------------------------------
def view_transforms(size: int) -> tuple[Compose, Compose]:
    """The official training views: A (to Phi and VSI) and B (the contrastive target)."""
    tail = [ToTensor(), Normalize(CLIP_MEAN, CLIP_STD)]
    view_a = Compose([to_rgb, RandomResizedCrop(size, scale=(0.8, 1.0), interpolation=InterpolationMode.BICUBIC),
                      RandomHorizontalFlip(), *tail])
    view_b = Compose([to_rgb, RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=InterpolationMode.BICUBIC),
                      *tail])
    return view_a, view_b


class _TwoViews(Dataset):
    def __init__(self, paths: list[Path], size: int):
        self.paths = paths
        self.view_a, self.view_b = view_transforms(size)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            image = load_image(self.paths[i])
        except UserError as e:
            return i, None, None, str(e)
        return i, self.view_a(image), self.view_b(image), None


def _collate_views(items):
    ok = [item for item in items if item[1] is not None]
    failed = [(i, message) for i, _, _, message in items if message is not None]
    if not ok:
        return None, None, None, failed
    return (torch.tensor([i for i, *_ in ok]), torch.stack([a for _, a, _, _ in ok]),
            torch.stack([b for _, _, b, _ in ok]), failed)


def stage1_data(images_dir: str | Path, captions_file: str | Path | None = None) -> tuple[list[Path], list[str]]:
    """(image paths, one caption each): from a BLIP captions JSONL (matched by path relative to `images_dir`;
    images without a caption are left out), else class-name captions from the class subfolders."""
    root = Path(images_dir)
    paths = list_images(root)
    if not paths:
        raise UserError(f"No images found under {root}")
    if captions_file is not None:
        from ..training.captions import read_captions

        records, _ = read_captions(captions_file)
        by_path = {r["image"]: r["caption"] for r in records}
        pairs = [(p, by_path.get(p.relative_to(root).as_posix())) for p in paths]
        missing = sum(c is None for _, c in pairs)
        pairs = [(p, c) for p, c in pairs if c is not None]
        if not pairs:
            raise UserError(f"{captions_file} has no caption for any image under {root}")
        if missing:
            print(f"{missing} images without a caption in {captions_file} are left out", file=sys.stderr)
        return [p for p, _ in pairs], [c for _, c in pairs]
    labelled = [(p, p.relative_to(root).parts) for p in paths]
    if any(len(parts) < 2 for _, parts in labelled):
        raise UserError(f"{root} has images outside class subfolders: pass --captions (a captions JSONL from "
                        f"`fti4cir caption`) for unlabelled folders")
    return paths, [CLASS_CAPTION.replace("{label}", class_label(parts[0])) for _, parts in labelled]


def train_stage1(model: M2CModel, paths: Sequence[Path], captions: Sequence[str] | None,
                 options: TrainOptions | None = None, *, out: str | Path | None = None,
                 progress: bool = True) -> list[dict]:
    """Train Phi, the patch projection and VSI; returns per-epoch mean loss terms. Writes `out` after every epoch.
    captions: one per path (the KL term), or None to train without it."""
    options = options or TrainOptions()
    seed_everything(options.seed)
    paths = list(paths)
    caption_features = _encode_texts(model, list(captions)) if captions is not None and options.kl_weight else None
    net = model.net
    net.requires_grad_(True).train()
    generator = torch.Generator().manual_seed(options.seed)
    total = _num_batches(len(paths), options.batch_size) * options.epochs
    warmup, temperature = options.resolved(1, total)
    optimizer, scheduler = _optimizer(list(net.named_parameters()), options, total, warmup)
    dataset = _TwoViews(paths, model.backbone.image_size)
    workers = options.num_workers if options.num_workers is not None else \
        default_num_workers(len(paths), options.batch_size)
    history, bad = [], set()
    for epoch in range(options.epochs):
        tally = _Epoch(1, epoch)
        batches = [b.tolist() for b in _batches(len(paths), options.batch_size, generator)]
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=_collate_views)
        for index, view_a, view_b, failed in tqdm(loader, desc=f"m2c stage 1 epoch {epoch}", disable=not progress,
                                                  leave=False):
            for i, message in failed:
                if i not in bad:
                    bad.add(i)
                    tqdm.write(f"skipping unreadable image: {message}", file=sys.stderr)
            if index is None or len(index) < 2:
                continue
            with _autocast(model, options):
                with torch.no_grad():
                    visual_a = model.backbone.encode_visual(view_a.to(model.device))
                    image_b = model.backbone.encode_image(view_b.to(model.device))
                image_a, patches = model.visual_inputs(visual_a)
                query = model.encode(MAPPING_PROMPT, None, image_a, patches, use_adapters=False)
                terms = stage1_loss(F.normalize(query.float(), dim=-1), F.normalize(image_a, dim=-1),
                                    F.normalize(image_b.float(), dim=-1),
                                    caption_features[index].to(model.device) if caption_features is not None else None,
                                    temperature=temperature, ref_weight=options.ref_weight,
                                    kl_weight=options.kl_weight)
            _step(terms.total, optimizer, scheduler)
            tally.add(terms)
        history.append(tally.finish(net, out))
    net.eval()
    return history


# ---- stage II -----------------------------------------------------------------------------------------------------
def _cache_rows(model: M2CModel, paths: list[Path], store: FeatureStore, num_workers: int | None,
                progress: bool) -> dict[Path, int]:
    """Feature-store rows of the readable images (one visual pass per new image)."""
    unique = sorted(set(paths))
    result = extract_features(model, unique, store, num_workers=num_workers, progress=progress)
    for path, message in result.failures[:10]:
        print(f"skipping unreadable image {path}: {message}", file=sys.stderr)
    return {p: int(r) for p, r in zip(unique, result.rows) if r >= 0}


def _usable(triplets: list[Triplet], rows: dict[Path, int]) -> list[Triplet]:
    usable = [t for t in triplets if t.reference in rows and t.target in rows]
    if not usable:
        raise UserError("No triplet has both a readable reference and a readable target image")
    if len(usable) < len(triplets):
        print(f"{len(triplets) - len(usable)} triplets with unreadable images are left out", file=sys.stderr)
    return usable


def train_stage2(model: M2CModel, triplets: Sequence[Triplet], store: FeatureStore,
                 options: TrainOptions | None = None, *, prompt: str = TRAIN_PROMPT,
                 out: str | Path | None = None, progress: bool = True) -> list[dict]:
    """Train the composing adapters (they must exist: `model.net.add_adapters()`); everything else stays frozen,
    in eval mode. Returns per-epoch mean loss terms; writes `out` after every epoch."""
    options = options or TrainOptions()
    net = model.net
    if not net.has_adapters:
        raise UserError("Stage II trains composing adapters: add them first (M2CNetwork.add_adapters)")
    seed_everything(options.seed)
    rows = _cache_rows(model, [p for t in triplets for p in (t.reference, t.target)], store, options.num_workers,
                       progress)
    triplets = _usable(list(triplets), rows)
    ref_rows = np.array([rows[t.reference] for t in triplets])
    tgt_rows = np.array([rows[t.target] for t in triplets])
    with_captions = bool(options.kl_weight) and all(t.reference_caption for t in triplets)
    if options.kl_weight and not with_captions:
        print("some triplets have no reference_caption: training without the KL term", file=sys.stderr)
    caption_features = _encode_texts(model, [t.reference_caption for t in triplets]) if with_captions else None
    query_ids, query_mask = tokenize_prompts(prompt, [{"text": t.text} for t in triplets], None,
                                             model.backbone.context_length)
    map_ids, map_mask = tokenize_prompts(MAPPING_PROMPT, [{}], None, model.backbone.context_length)

    net.requires_grad_(False).eval()
    net.adapters.requires_grad_(True).train()
    generator = torch.Generator().manual_seed(options.seed)
    total = _num_batches(len(triplets), options.batch_size) * options.epochs
    warmup, temperature = options.resolved(2, total)
    optimizer, scheduler = _optimizer(list(net.adapters.named_parameters()), options, total, warmup)
    history = []
    for epoch in range(options.epochs):
        tally = _Epoch(2, epoch)
        for batch in tqdm(_batches(len(triplets), options.batch_size, generator), desc=f"m2c stage 2 epoch {epoch}",
                          disable=not progress, leave=False):
            if len(batch) < 2:
                continue
            b = len(batch)
            with _autocast(model, options):
                with torch.no_grad():
                    reference = store.get(ref_rows[batch.numpy()])
                    target = F.normalize(store.global_features(tgt_rows[batch.numpy()]).to(model.device), dim=-1)
                    image, patches = model.visual_inputs(reference)
                    pseudo = net.mapper(image)
                ids = torch.cat([query_ids[batch], map_ids.expand(b, -1)])
                mask = torch.cat([query_mask[batch], map_mask.expand(b, -1)])
                features = model.encode_tokens(ids, mask, pseudo.repeat(2, 1), patches, use_adapters=True)
                features = F.normalize(features.float(), dim=-1)
                terms = stage2_loss(features[:b], features[b:], F.normalize(image, dim=-1), target,
                                    caption_features[batch].to(model.device) if caption_features is not None else None,
                                    temperature=temperature, topk=options.topk, map_weight=options.ref_weight,
                                    kl_weight=options.kl_weight)
            _step(terms.total, optimizer, scheduler)
            tally.add(terms)
        history.append(tally.finish(net, out))
    net.eval()
    return history


# ---- held-out evaluation ------------------------------------------------------------------------------------------
@torch.no_grad()
def triplet_recall(model: M2CModel, triplets: Sequence[Triplet], gallery: Sequence[Path], store: FeatureStore, *,
                   use_adapters: bool, prompt: str = TRAIN_PROMPT, ks: Sequence[int] = (1, 5, 10),
                   batch_size: int = 128, num_workers: int | None = None,
                   progress: bool = False) -> dict[str, float]:
    """Recall@k of triplet queries over a gallery: a hit when any of a triplet's answers (ground truths, else the
    target) is among the top k; the reference itself is never ranked (as in CIRR). Triplets without an answer in the
    gallery are left out."""
    gallery = [Path(os.path.abspath(p)) for p in gallery]
    rows = _cache_rows(model, gallery + [t.reference for t in triplets], store, num_workers, progress)
    gallery = [p for p in gallery if p in rows]
    position = {p: i for i, p in enumerate(gallery)}
    triplets = [t for t in triplets if t.reference in rows and any(a in position for a in t.answers)]
    if not triplets or not gallery:
        raise UserError("No triplet has an answer among the readable gallery images")
    targets = F.normalize(store.global_features([rows[p] for p in gallery]).to(model.device), dim=-1)
    hits = {k: 0 for k in ks}
    for start in range(0, len(triplets), batch_size):
        chunk = triplets[start:start + batch_size]
        query = m2c_compose(model, store.get([rows[t.reference] for t in chunk]), [t.text for t in chunk],
                            prompt=prompt, use_adapters=use_adapters)
        scores = query @ targets.t()
        answers = torch.zeros_like(scores, dtype=torch.bool)
        for r, t in enumerate(chunk):  # bookkeeping of variable-length answer sets, not tensor math
            if t.reference in position:
                scores[r, position[t.reference]] = float("-inf")
            answers[r, [position[a] for a in t.answers if a in position]] = True
        ranked = answers.gather(1, scores.topk(min(max(ks), len(gallery)), dim=1).indices)
        for k in ks:
            hits[k] += int(ranked[:, :k].any(dim=1).sum())
    return {f"R@{k}": hits[k] / len(triplets) for k in ks}


# ---- CLI ----------------------------------------------------------------------------------------------------------
def _layers(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block numbers, got {value!r}") from None


def _options(args) -> TrainOptions:
    return TrainOptions(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.wd,
                        warmup=args.warmup, temperature=args.temperature, kl_weight=args.kl_weight,
                        ref_weight=args.ref_weight, topk=args.topk, seed=args.seed, num_workers=args.num_workers,
                        amp=args.amp)


def _run(args) -> int:
    from ..backbone import resolve_pretrained
    from .model import create_m2c_model

    if not str(args.out).endswith(".safetensors"):
        raise UserError(f"--out must be a .safetensors file, got {args.out}")
    pretrained = resolve_pretrained(args.backbone, args.pretrained)
    options = _options(args)
    started = time.perf_counter()
    if args.stage == 1:
        if args.images is None:
            raise UserError("--stage 1 needs --images (a folder of training images)")
        paths, captions = stage1_data(args.images, args.captions)
        model = create_m2c_model(args.backbone, pretrained, None, device=args.device, preprocess=args.preprocess,
                                 seed=args.seed, vsi_layers=args.vsi_layers)
        print(f"stage 1: {len(paths)} images, VSI after text blocks {list(model.config.vsi_layers)}")
        history = train_stage1(model, paths, captions, options, out=args.out)
    else:
        if args.triplets is None or args.init is None:
            raise UserError("--stage 2 needs --triplets (JSONL) and --init (stage-I weights)")
        triplets = read_triplets(args.triplets)
        model = create_m2c_model(args.backbone, pretrained, args.init, device=args.device,
                                 preprocess=args.preprocess, seed=args.seed)
        model.net.add_adapters(args.adapter_layers, args.adapter_rank)
        print(f"stage 2: {len(triplets)} triplets, adapters (rank {model.config.adapter_rank}) after text blocks "
              f"{list(model.config.adapter_layers)}")
        store = FeatureStore.for_model(args.cache_dir, model, with_patches=True)
        history = train_stage2(model, triplets, store, options, prompt=args.prompt, out=args.out)
    print(f"wrote {args.out} ({len(history)} epochs, final loss {history[-1]['total']:.4f}, "
          f"{time.perf_counter() - started:.0f} s)")
    if args.val_triplets:
        if args.gallery is None:
            raise UserError("--val-triplets needs --gallery (the folder of images to rank)")
        store = FeatureStore.for_model(args.cache_dir, model, with_patches=True)
        val, gallery = read_triplets(args.val_triplets), list_images(args.gallery)
        for use_adapters in ([False, True] if model.net.has_adapters else [False]):
            recall = triplet_recall(model, val, gallery, store, use_adapters=use_adapters, prompt=args.prompt,
                                    num_workers=args.num_workers)
            name = "m2c+compose" if use_adapters else "m2c"
            print(f"held-out {name}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in recall.items()))
    return 0


def add_parser(subparsers) -> None:
    from ..cli import add_model_args

    p = subparsers.add_parser("m2c-train", help="train M2C (From Mapping to Composing): stage 1 mapping, stage 2 "
                              "composing adapters", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", type=int, choices=[1, 2], required=True)
    p.add_argument("--out", required=True, help="weights to write (.safetensors + .json), after every epoch")
    p.add_argument("--images", help="stage 1: folder of training images (searched recursively)")
    p.add_argument("--captions", help="stage 1: captions JSONL of `fti4cir caption` for --images (default: "
                   "class-name captions from the class subfolders)")
    p.add_argument("--vsi-layers", type=_layers, default=None,
                   help="stage 1: text blocks (0-based) followed by VSI (default 3,7,9,11 for a 12-block tower, "
                        "moved to the same relative depth otherwise)")
    p.add_argument("--triplets", help="stage 2: training triplets JSONL (see `fti4cir triplets`)")
    p.add_argument("--init", help="stage 2: stage-I weights")
    p.add_argument("--adapter-layers", type=_layers, default=None,
                   help="stage 2: text blocks followed by composing adapters (default 1,3,5,7,9,11, rescaled as "
                        "--vsi-layers)")
    p.add_argument("--adapter-rank", type=positive_int, default=128)
    p.add_argument("--prompt", default=TRAIN_PROMPT, help="stage 2 training / held-out prompt (default "
                   f"'%(default)s'; evaluation prompts per dataset: {PROMPTS})")
    p.add_argument("--cache-dir", default="cache/features", help="visual feature cache (stage 2, held-out eval)")
    p.add_argument("--val-triplets", help="held-out triplets JSONL: print Recall@k after training")
    p.add_argument("--gallery", help="folder of images ranked for --val-triplets")
    p.add_argument("--epochs", type=positive_int, default=30)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--wd", type=float, default=0.1, help="weight decay (not on gains and biases)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: official 10000 / 100 for "
                   "stage 1 / 2, at most a tenth of the run)")
    p.add_argument("--temperature", type=float, default=None, help="default 0.07 (stage 1) / 0.01 (stage 2)")
    p.add_argument("--kl-weight", type=float, default=0.2, help="soft text alignment weight")
    p.add_argument("--ref-weight", type=float, default=1.0,
                   help="stage 1: the view-A term; stage 2: the mapping-sentence term")
    p.add_argument("--topk", type=positive_int, default=10, help="stage 2 mixed hard negatives per query")
    p.add_argument("--num-workers", type=int, default=None, help="image decoding processes")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA)")
    add_model_args(p, weights=False)  # also --seed: random initialisations and the training order
    p.set_defaults(func=_run, preprocess="clip")
