"""M2C training: stage I (mapping: Phi + VSI, frozen CLIP) and stage II (composing adapters, all else frozen).

Stage I reads a folder of images and one caption per image (for the soft text alignment term): the BLIP captions
JSONL of `fti4cir caption`, or class-name captions "a photo of a {class}" from the images' class subfolders when no
captions file is given. Stage II reads triplets (`triplets`). Both stages crop their images as the official code
(`views`): freshly at every step (augment "online", default), from K crops per image cached once ("views"), or not
at all ("none": the cached centre crop).

Training follows the official code's intent (LiJiaBei-7/TSCIR src/main.py, src/trainer.py, src/params.py): AdamW
betas/eps per backbone, weight decay on all but the biases, warm-up then cosine, the target images in stage II's KL,
stage-I modules left in train mode during stage II. Its bugs are fixed by default; `as_released` restores the
released hard negatives (see `losses.hard_negative_info_nce`). With torchrun, the features of all processes are
gathered into one pool of negatives (`distributed`). The loop is the project's one (`fti4cir.training.loop`):
checkpoints (weights, optimizer, RNG states) go to `<out>.run/` at every epoch end (and every `checkpoint_steps`);
`resume` continues bit for bit, also after a kill -9.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import UserError
from ...features import FeatureStore, default_num_workers, extract_features
from ...imagefiles import list_images
from ...m2c.convert import official_name
from ...m2c.model import MAPPING_PROMPT, M2CModel, m2c_compose, save_m2c_weights
from ...tokens import tokenize_prompts
from ..checkpoint import changed_settings
from ..loop import Loop, autocast, optimisation_step, read_checkpoint
from .distributed import World, gather_rows, init_world, main_first, sum_gradients
from .losses import stage1_loss, stage2_loss
from .options import TRAIN_PROMPT, TrainOptions
from .triplets import CLASS_CAPTION, Triplet, class_label
from .views import VIEW_A, VIEW_B, cached_views, derived_seed, view_loader

log = logging.getLogger(__name__)

RUN_SUFFIX = ".run"  # checkpoints of `out.safetensors` live in `out.run/`


def official_decay(official_parameter_name: str) -> bool:
    """src/main.py: no weight decay on names containing "bn", "ln", "bias" or "logit_scale". On the official M2C names
    only the biases match: BatchNorm and LayerNorm gains are decayed (their modules are called conv.1 and norm2)."""
    return not any(part in official_parameter_name for part in ("bn", "ln", "bias", "logit_scale"))


def official_lr(step: int, base: float, warmup: int, total: int) -> float:
    """third_party/open_clip/scheduler.py `cosine_lr`: linear warm-up over `warmup` steps (not capped: with fewer
    steps in the run the peak is never reached), then a cosine to 0 at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * base


def make_optimizer(module: torch.nn.Module, prefix: str, options: TrainOptions, betas, eps) -> torch.optim.AdamW:
    """AdamW over `module`'s trainable parameters (`prefix` + name = their M2CNetwork name), weight decay by the
    official rule applied to the official names."""
    groups = {True: [], False: []}
    for name, p in module.named_parameters():
        if p.requires_grad:
            groups[official_decay(official_name(prefix + name))].append(p)
    return torch.optim.AdamW(
        [
            {"params": groups[False], "weight_decay": 0.0},
            {"params": groups[True], "weight_decay": options.weight_decay},
        ],
        lr=options.lr,
        betas=betas,
        eps=eps,
    )


def _autocast(model: M2CModel, options: TrainOptions):
    """bfloat16 autocast with `amp` on CUDA (the parts of a step that the official code runs under it)."""
    return autocast(model.device, "bf16" if options.amp and model.device.type == "cuda" else None)


def _encode_texts(model: M2CModel, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [
                F.normalize(model.backbone.encode_text(texts[i : i + batch_size]).float(), dim=-1)
                for i in range(0, len(texts), batch_size)
            ]
        )


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Global batches of one epoch: a permutation depending only on (seed, epoch), the last partial batch dropped
    when there is more than one batch (in-batch negatives need full batches)."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    if n <= batch_size:
        return [order]
    return list(order[: n - n % batch_size].reshape(-1, batch_size))


def _digest(items) -> str:
    return hashlib.sha256(json.dumps(items, default=str).encode()).hexdigest()


def _view_choice(options: TrainOptions, epoch: int, step: int, role: str, count: int) -> np.ndarray:
    """Which cached view of each image a step uses (a function of seed, epoch, step and role)."""
    return np.random.default_rng([options.seed, epoch, step, derived_seed(role) % 2**32]).integers(
        options.views, size=count
    )


# ---- the loop of both stages --------------------------------------------------------------------------------------
@dataclass
class Run:
    """Where a stage writes (weights `out`, checkpoints `out.run/`) and whether it continues a checkpoint."""

    out: Path | None = None
    resume: bool = False

    @property
    def dir(self) -> Path | None:
        return None if self.out is None else self.out.with_suffix(RUN_SUFFIX)


def _loop(
    stage: int,
    model: M2CModel,
    module: torch.nn.Module,
    prefix: str,
    options: TrainOptions,
    n: int,
    data_digest: str,
    step_loss,
    run: Run,
    world: World,
    progress: bool,
) -> list[dict]:
    """Train `module` (the trainable part of model.net; `prefix` its name there) for options.epochs over `n`
    examples with `fti4cir.training.loop`. step_loss(epoch, step, rows) -> LossTerms | None (None: no usable pair in
    the batch) computes this process's part of a global batch. Checkpoints (weights, optimizer, RNG, loss sums) at
    every epoch end and every options.checkpoint_steps steps; with run.resume the run continues from its checkpoint
    bit for bit."""
    net = model.net
    warmup, _, betas, eps = options.resolved(stage, model.backbone.name)
    optimizer = make_optimizer(module, prefix, options, betas, eps)
    global_batch = options.batch_size * world.size
    if world.size > 1 and n < global_batch:
        raise UserError(
            f"{n} examples are fewer than one global batch of {global_batch} ({world.size} processes x "
            f"--batch-size {options.batch_size})"
        )
    steps = len(epoch_batches(n, global_batch, options.seed, 0))
    total = steps * options.epochs
    record = read_checkpoint(run.dir) if run.dir is not None else None
    if record is not None and not run.resume:
        raise UserError(
            f"{run.dir} holds a training run of {run.out}: pass --resume to continue it, or choose another --out"
        )
    if record is not None:
        _check_resumable(record, stage, options, data_digest, run)
    params = [p for p in module.parameters() if p.requires_grad]

    def batches(epoch: int, start: int):
        """This process's rows of the epoch's global batches from step `start` on."""
        order = epoch_batches(n, global_batch, options.seed, epoch)
        for step in range(start, steps):
            yield np.array_split(order[step], world.size)[world.rank] if world.size > 1 else order[step]

    def step(epoch: int, index: int, rows: np.ndarray) -> dict[str, float] | None:
        terms = optimisation_step(
            optimizer,
            lambda: step_loss(epoch, index, rows),
            reduce_gradients=lambda: sum_gradients(params, world, average=options.as_released),
        )
        return None if terms is None else terms.detached()

    def epoch_record(epoch: int, state, seconds: float) -> dict:
        return {"stage": stage, "epoch": epoch, **state.means(), "steps": steps, "seconds": round(seconds, 2)}

    def epoch_end(epoch: int, state) -> None:
        if world.is_main:
            last = state.history[-1]
            log.info(
                f"stage {stage} epoch {epoch}: loss {last.get('total', float('nan')):.4f} ({steps} steps, "
                f"{last['seconds']:.1f} s)"
            )
            if run.out is not None:
                save_m2c_weights(net, run.out)  # before the checkpoint's commit: a resumed run never lacks them

    loop = Loop(
        net,
        optimizer,
        options.epochs,
        steps,
        batches,
        step,
        epoch_record,
        lr=lambda epoch, global_step: official_lr(global_step, options.lr, warmup, total),
        run_dir=run.dir,
        record={"stage": stage, "options": options.to_dict(), "data_sha256": data_digest},
        checkpoint_steps=options.checkpoint_steps,
        writes=world.is_main,
        on_epoch_end=epoch_end,
        progress=progress and world.is_main,
        describe=lambda epoch: f"m2c stage {stage} epoch {epoch}",
        unit="it",
        leave=False,
    )
    return loop.run(loop.start(options.seed, record)).history


def _check_resumable(record: dict, stage: int, options: TrainOptions, data_digest: str, run: Run) -> None:
    if record["stage"] != stage:
        raise UserError(f"{run.dir} holds a stage-{record['stage']} run, not stage {stage}")
    if record["data_sha256"] != data_digest:
        raise UserError(f"The training data changed since the checkpoint in {run.dir} was written; cannot resume")
    different = changed_settings(record["options"], options.to_dict(), TrainOptions.RESUMABLE)
    if different:
        raise UserError(f"Cannot resume {run.out}: settings differ from its checkpoint ({'; '.join(different)})")


# ---- stage I ------------------------------------------------------------------------------------------------------
def stage1_data(images_dir: str | Path, captions_file: str | Path | None = None) -> tuple[list[Path], list[str]]:
    """(image paths, one caption each): from a BLIP captions JSONL (matched by path relative to `images_dir`;
    images without a caption are left out), else class-name captions from the class subfolders."""
    root = Path(images_dir)
    paths = list_images(root)
    if not paths:
        raise UserError(f"No images found under {root}")
    if captions_file is not None:
        from ..captions import read_captions

        records, _ = read_captions(captions_file)
        by_path = {r["image"]: r["caption"] for r in records}
        pairs = [(p, by_path.get(p.relative_to(root).as_posix())) for p in paths]
        missing = sum(c is None for _, c in pairs)
        pairs = [(p, c) for p, c in pairs if c is not None]
        if not pairs:
            raise UserError(f"{captions_file} has no caption for any image under {root}")
        if missing:
            log.warning("%d images without a caption in %s are left out", missing, captions_file)
        return [p for p, _ in pairs], [c for _, c in pairs]
    labelled = [(p, p.relative_to(root).parts) for p in paths]
    if any(len(parts) < 2 for _, parts in labelled):
        raise UserError(
            f"{root} has images outside class subfolders: pass --captions (a captions JSONL from "
            f"`fti4cir caption`) for unlabelled folders"
        )
    return paths, [CLASS_CAPTION.replace("{label}", class_label(parts[0])) for _, parts in labelled]


class _OnlineViews:
    """Per-step crops of pairs of images, decoded in DataLoader workers one epoch ahead of the visual tower."""

    def __init__(self, model: M2CModel, paths: list[Path], options: TrainOptions, world: World):
        self.model, self.paths, self.world = model, paths, world
        self.workers = (
            options.num_workers
            if options.num_workers is not None
            else default_num_workers(len(paths), options.batch_size)
        )
        self.loader, self.reported, self.epoch = None, set(), None

    def pairs(self, epoch: int, step: int, local_batches, first, second) -> tuple | None:
        """Views of the pairs of this step: local_batches(epoch) -> this process's rows per step; first / second
        (row, epoch) -> (path index, spec, seed) of a pair's two images. Returns (first views, second views,
        positions in the step's rows of the pairs whose two images decoded), None when none did."""
        if self.epoch != epoch:  # one loader per epoch, from the step the run is at
            self.epoch = epoch
            jobs = []
            for rows in local_batches(epoch)[step:]:
                b = len(rows)
                jobs.append(
                    [(j, *first(int(r), epoch)) for j, r in enumerate(rows)]
                    + [(b + j, *second(int(r), epoch)) for j, r in enumerate(rows)]
                )
            self.loader = iter(view_loader(self.paths, self.model.backbone.image_size, jobs, self.workers))
        keys, images, failed = next(self.loader)
        for _, message in failed:
            if self.world.size > 1:
                raise UserError(f"unreadable training image with several processes: {message} (remove it)")
            if message not in self.reported:
                self.reported.add(message)
                log.warning("skipping unreadable image: %s", message)
        b = (len(keys) + len(failed)) // 2
        at = {k: n for n, k in enumerate(keys)}
        keep = [j for j in range(b) if j in at and b + j in at]
        if not keep:
            return None
        return images[[at[j] for j in keep]], images[[at[b + j] for j in keep]], np.array(keep)


def _local_batches(n: int, options: TrainOptions, world: World):
    def batches(epoch: int) -> list[np.ndarray]:
        return [
            np.array_split(b, world.size)[world.rank] if world.size > 1 else b
            for b in epoch_batches(n, options.batch_size * world.size, options.seed, epoch)
        ]

    return batches


def train_stage1(
    model: M2CModel,
    paths: Sequence[Path],
    captions: Sequence[str] | None,
    options: TrainOptions | None = None,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    cache_dir: str | Path = "cache/features",
    progress: bool = True,
) -> list[dict]:
    """Train Phi, the patch projection and VSI; returns per-epoch mean loss terms. Writes `out` after every epoch
    and checkpoints into `out.run/` (resume=True continues there). captions: one per path (the KL term), or None.

    Views (official model/clip.py `_transform`): A (crop 0.8-1 + flip) feeds Phi and VSI and the view-A term, B
    (crop 0.9-1) is the contrastive target and the KL's image side."""
    options = options or TrainOptions()
    world = init_world(model.device)
    paths = list(paths)
    caption_features = _encode_texts(model, list(captions)) if captions is not None and options.kl_weight else None
    net = model.net
    net.requires_grad_(True).train()
    temperature = options.resolved(1, model.backbone.name)[1]
    online = _OnlineViews(model, paths, options, world) if options.augment == "online" else None
    caches, images = None, np.arange(len(paths))  # images: the training examples' indices into paths
    if online is None:
        with main_first(world):  # views: A with patch tokens, B global only; none: one centre crop for both
            caches = [
                cached_views(
                    model,
                    paths,
                    cache_dir,
                    spec,
                    options.views,
                    options.seed,
                    with_patches=patches,
                    num_workers=options.num_workers,
                    progress=progress and world.is_main,
                )
                for spec, patches in (
                    ((VIEW_A, True), (VIEW_B, False)) if options.augment == "views" else ((None, True),)
                )
            ]
        caches = caches * (2 // len(caches))  # [A, B], or the centre crop twice
        images = np.flatnonzero(caches[0].readable() & caches[1].readable())
        if len(images) < len(paths):
            log.warning("%d unreadable images are left out", len(paths) - len(images))
        if len(images) < 2:
            raise UserError("Stage I needs at least two readable images")
    local_batches = _local_batches(len(images), options, world)

    def visual(epoch: int, step: int, rows: np.ndarray):
        """(view A features, view B global features, indices into paths of the usable images) of this process's
        rows."""
        if online is not None:
            views = online.pairs(
                epoch,
                step,
                local_batches,
                lambda r, e: (r, VIEW_A, derived_seed(options.seed, e, "A", r)),
                lambda r, e: (r, VIEW_B, derived_seed(options.seed, e, "B", r)),
            )
            if views is None:
                return None
            with torch.no_grad():
                return (
                    model.backbone.encode_visual(views[0].to(model.device)),
                    model.backbone.encode_image(views[1].to(model.device)),
                    rows[views[2]],
                )
        if options.augment == "views":
            va, vb = (_view_choice(options, epoch, step, role, len(rows)) for role in ("A", "B"))
        else:
            va = vb = np.zeros(len(rows), dtype=np.int64)
        index = images[rows]
        return caches[0].get(index, va), caches[1].get(index, vb).global_features.to(model.device), index

    def step_loss(epoch: int, step: int, rows: np.ndarray):
        seen = visual(epoch, step, rows)
        if seen is None or len(seen[2]) < 2:
            return None
        visual_a, image_b, index = seen
        with _autocast(model, options):
            image_a, patches = model.visual_inputs(visual_a)
            query = model.encode(MAPPING_PROMPT, None, image_a, patches, use_adapters=False)
            caps = caption_features[torch.from_numpy(index)].to(model.device) if caption_features is not None else None
            gathered = [
                gather_rows(x, world) if x is not None else None
                for x in (
                    F.normalize(query.float(), dim=-1),
                    F.normalize(image_a.float(), dim=-1),
                    F.normalize(image_b.float(), dim=-1),
                    caps,
                )
            ]
            return stage1_loss(
                *gathered, temperature=temperature, ref_weight=options.ref_weight, kl_weight=options.kl_weight
            )

    digest = _digest([[str(p) for p in paths], list(captions) if captions is not None else None])
    history = _loop(
        1, model, net, "", options, len(images), digest, step_loss, Run(_path(out), resume), world, progress
    )
    net.eval()
    return history


# ---- stage II -----------------------------------------------------------------------------------------------------
def train_stage2(
    model: M2CModel,
    triplets: Sequence[Triplet],
    options: TrainOptions | None = None,
    *,
    prompt: str = TRAIN_PROMPT,
    out: str | Path | None = None,
    resume: bool = False,
    cache_dir: str | Path = "cache/features",
    progress: bool = True,
) -> list[dict]:
    """Train the composing adapters (they must exist: `model.net.add_adapters()`); everything else gets no
    gradient but stays in train mode, as the official stage II (dropout active; VSI BatchNorm on batch statistics,
    its running statistics updated and saved). Reference and target images are cropped 0.9-1 (official
    `preprocess_train`). Returns per-epoch mean loss terms; writes `out` after every epoch, checkpoints into
    `out.run/`."""
    options = options or TrainOptions()
    net = model.net
    if not net.has_adapters:
        raise UserError("Stage II trains composing adapters: add them first (M2CNetwork.add_adapters)")
    world = init_world(model.device)
    triplets = list(triplets)
    images = sorted({p for t in triplets for p in (t.reference, t.target)})
    position = {p: i for i, p in enumerate(images)}
    online, cache = None, None
    if options.augment == "online":
        online = _OnlineViews(model, images, options, world)
    else:
        with main_first(world):
            cache = cached_views(
                model,
                images,
                cache_dir,
                VIEW_B if options.augment == "views" else None,
                options.views,
                options.seed,
                with_patches=True,
                num_workers=options.num_workers,
                progress=progress and world.is_main,
            )
        readable = cache.readable()
        usable = [t for t in triplets if readable[position[t.reference]] and readable[position[t.target]]]
        if not usable:
            raise UserError("No triplet has both a readable reference and a readable target image")
        if len(usable) < len(triplets):
            log.warning("%d triplets with unreadable images are left out", len(triplets) - len(usable))
        triplets = usable
    ref_index = np.array([position[t.reference] for t in triplets])
    tgt_index = np.array([position[t.target] for t in triplets])
    with_captions = bool(options.kl_weight) and all(t.reference_caption for t in triplets)
    if options.kl_weight and not with_captions:
        log.warning("some triplets have no reference_caption: training without the KL term")
    caption_features = _encode_texts(model, [t.reference_caption for t in triplets]) if with_captions else None
    query_ids, query_mask = tokenize_prompts(
        prompt, [{"text": t.text} for t in triplets], None, model.backbone.context_length
    )
    map_ids, map_mask = tokenize_prompts(MAPPING_PROMPT, [{}], None, model.backbone.context_length)
    temperature = options.resolved(2, model.backbone.name)[1]
    net.requires_grad_(False).train()
    net.adapters.requires_grad_(True)
    local_batches = _local_batches(len(triplets), options, world)

    def visual(epoch: int, step: int, rows: np.ndarray):
        """(reference features with patches, target global features, usable rows)."""
        if online is None:
            if options.augment == "views":
                vr, vt = (_view_choice(options, epoch, step, role, len(rows)) for role in ("ref", "tgt"))
            else:
                vr = vt = np.zeros(len(rows), dtype=np.int64)
            return (
                cache.get(ref_index[rows], vr),
                cache.get(tgt_index[rows], vt).global_features.to(model.device),
                rows,
            )
        views = online.pairs(
            epoch,
            step,
            local_batches,
            lambda r, e: (int(ref_index[r]), VIEW_B, derived_seed(options.seed, e, "ref", r)),
            lambda r, e: (int(tgt_index[r]), VIEW_B, derived_seed(options.seed, e, "tgt", r)),
        )
        if views is None:
            return None
        with torch.no_grad():
            return (
                model.backbone.encode_visual(views[0].to(model.device)),
                model.backbone.encode_image(views[1].to(model.device)),
                rows[views[2]],
            )

    def step_loss(epoch: int, step: int, rows: np.ndarray):
        seen = visual(epoch, step, rows)
        if seen is None or len(seen[2]) < 2:
            return None
        reference, target, rows = seen
        b = len(rows)
        with _autocast(model, options):
            with torch.no_grad():
                image, patches = model.visual_inputs(reference)
                pseudo = net.mapper(image)
            ids = torch.cat([query_ids[rows], map_ids.expand(b, -1)])
            mask = torch.cat([query_mask[rows], map_mask.expand(b, -1)])
            # both prompts see their own VSI pass over the images (BatchNorm over 2B rows, independent dropout)
            features = model.encode_tokens(ids, mask, pseudo.repeat(2, 1), patches.repeat(2, 1, 1), use_adapters=True)
            features = F.normalize(features.float(), dim=-1)
            caps = caption_features[torch.from_numpy(rows)].to(model.device) if caption_features is not None else None
            gathered = [
                gather_rows(x, world) if x is not None else None
                for x in (
                    features[:b],
                    features[b:],
                    F.normalize(image.float(), dim=-1),
                    F.normalize(target.float(), dim=-1),
                    caps,
                )
            ]
            return stage2_loss(
                *gathered,
                temperature=temperature,
                topk=options.topk,
                map_weight=options.ref_weight,
                kl_weight=options.kl_weight,
                as_released=options.as_released,
            )

    digest = _digest([[str(t.reference), str(t.target), t.text, t.reference_caption] for t in triplets] + [prompt])
    history = _loop(
        2,
        model,
        net.adapters,
        "adapters.",
        options,
        len(triplets),
        digest,
        step_loss,
        Run(_path(out), resume),
        world,
        progress,
    )
    net.eval()
    return history


def _path(out: str | Path | None) -> Path | None:
    return None if out is None else Path(out)


# ---- held-out evaluation ------------------------------------------------------------------------------------------
def _cache_rows(
    model: M2CModel, paths: list[Path], store: FeatureStore, num_workers: int | None, progress: bool
) -> dict[Path, int]:
    """Feature-store rows of the readable images (one visual pass per new image)."""
    unique = sorted(set(paths))
    result = extract_features(model, unique, store, num_workers=num_workers, progress=progress)
    for path, message in result.failures[:10]:
        log.warning("skipping unreadable image %s: %s", path, message)
    return {p: int(r) for p, r in zip(unique, result.rows) if r >= 0}


@torch.no_grad()
def triplet_recall(
    model: M2CModel,
    triplets: Sequence[Triplet],
    gallery: Sequence[Path],
    store: FeatureStore,
    *,
    use_adapters: bool,
    prompt: str = TRAIN_PROMPT,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 128,
    num_workers: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
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
        chunk = triplets[start : start + batch_size]
        query = m2c_compose(
            model,
            store.get([rows[t.reference] for t in chunk]),
            [t.text for t in chunk],
            prompt=prompt,
            use_adapters=use_adapters,
        )
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
