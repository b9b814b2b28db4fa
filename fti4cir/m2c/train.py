"""M2C training: stage I (mapping: Phi + VSI, frozen CLIP) and stage II (composing adapters, all else frozen).

Stage I reads a folder of images and one caption per image (for the soft text alignment term): the BLIP captions
JSONL of `fti4cir caption` (`--captions`), or class-name captions "a photo of a {class}" from the images' class
subfolders when no captions file is given. Stage II reads triplets (see `fti4cir.m2c.triplets`). Both stages crop
their images as the official code (`fti4cir.m2c.views`): freshly at every step (`--augment online`, default), from
K crops per image cached once (`views`), or not at all (`none`: the cached centre crop).

Training follows the official code's intent (LiJiaBei-7/TSCIR src/main.py, src/trainer.py, src/params.py): AdamW
betas/eps per backbone, weight decay on all but the biases, warm-up then cosine, the target images in stage II's KL,
stage-I modules left in train mode during stage II. Its bugs are fixed by default; `as_released` (`--as-released`)
restores the released hard negatives (see `losses.hard_negative_info_nce`). With torchrun, the features of all
processes are gathered into one pool of negatives (`fti4cir.m2c.distributed`). Checkpoints (weights, optimizer,
RNG states) go to `<out>.run/` at every epoch end (and every --checkpoint-steps); --resume continues bit for bit.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..atomic import write_json_atomic
from ..cli import non_negative_int, positive_int
from ..errors import UserError
from ..features import FeatureStore, default_num_workers, extract_features
from ..imagefiles import list_images
from ..tokens import tokenize_prompts
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
from .convert import official_name
from .distributed import World, gather_rows, init_world, local_device, main_first, sum_gradients
from .losses import stage1_loss, stage2_loss
from .model import MAPPING_PROMPT, PROMPTS, M2CModel, m2c_compose, save_m2c_weights
from .triplets import CLASS_CAPTION, Triplet, class_label, read_triplets
from .views import AUGMENT_MODES, VIEW_A, VIEW_B, cached_views, derived_seed, view_loader

OFFICIAL_WARMUP = {1: 10000, 2: 100}
OFFICIAL_TEMPERATURE = {1: 0.07, 2: 0.01}
TRAIN_PROMPT = "a photo of * that {text}"
# src/params.py `get_default_params`: AdamW betas and eps of the CLIP paper per model (the run scripts leave them
# unset); the ViTs of the list use (0.9, 0.98) / 1e-6, every other model (0.9, 0.999) / 1e-8.
CLIP_VIT_MODELS = ("ViT-B-32", "ViT-B-16", "ViT-L-14")
RUN_SUFFIX = ".run"  # checkpoints of `out.safetensors` live in `out.run/`
CHECKPOINT = "checkpoint.json"


def official_adam(backbone: str) -> tuple[float, float, float]:
    """(beta1, beta2, eps) the official code gives AdamW for this CLIP model."""
    return (0.9, 0.98, 1e-6) if backbone in CLIP_VIT_MODELS else (0.9, 0.999, 1e-8)


def official_decay(official_parameter_name: str) -> bool:
    """src/main.py: no weight decay on names containing "bn", "ln", "bias" or "logit_scale". On the official M2C names
    only the biases match: BatchNorm and LayerNorm gains are decayed (their modules are called conv.1 and norm2)."""
    return not any(part in official_parameter_name for part in ("bn", "ln", "bias", "logit_scale"))


@dataclass
class TrainOptions:
    """Official defaults (run_stage1.sh / run_stage2.sh, src/params.py) unless noted."""

    epochs: int = 30
    batch_size: int = 128  # per process; with several processes (torchrun) the negatives of all are gathered
    lr: float = 1e-4
    weight_decay: float = 0.1
    warmup: int | None = None  # None: the official 10000 (stage I) / 100 (stage II) steps
    temperature: float | None = None  # None: 0.07 (stage I) / 0.01 (stage II)
    beta1: float | None = None  # None (all three): per backbone, `official_adam`
    beta2: float | None = None
    eps: float | None = None
    kl_weight: float = 0.2
    ref_weight: float = 1.0  # stage I: the view-A term; stage II: the mapping-sentence term
    topk: int = 10  # stage II mixed hard negatives
    augment: str = "online"  # online | views | none (see fti4cir.m2c.views)
    views: int = 8  # augment "views": crops cached per image
    as_released: bool = False  # the released hard negatives (the positive itself, unscaled), DDP's gradient average
    seed: int = 0
    num_workers: int | None = None
    amp: bool = False  # bfloat16 autocast on CUDA
    checkpoint_steps: int = 0  # also checkpoint every N steps inside an epoch

    # Settings a resumed run may change; every other one must equal the checkpoint's.
    RESUMABLE = ("epochs", "num_workers", "checkpoint_steps")

    def __post_init__(self):
        if self.augment not in AUGMENT_MODES:
            raise UserError(f"--augment must be one of {', '.join(AUGMENT_MODES)}, not {self.augment!r}")

    def resolved(self, stage: int, backbone: str) -> tuple[int, float, tuple[float, float], float]:
        """(warmup steps, temperature, betas, eps) of a stage."""
        beta1, beta2, eps = official_adam(backbone)
        return (OFFICIAL_WARMUP[stage] if self.warmup is None else self.warmup,
                OFFICIAL_TEMPERATURE[stage] if self.temperature is None else self.temperature,
                (beta1 if self.beta1 is None else self.beta1, beta2 if self.beta2 is None else self.beta2),
                eps if self.eps is None else self.eps)

    def to_dict(self) -> dict:
        return asdict(self)


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
    return torch.optim.AdamW([{"params": groups[False], "weight_decay": 0.0},
                              {"params": groups[True], "weight_decay": options.weight_decay}],
                             lr=options.lr, betas=betas, eps=eps)


def _autocast(model: M2CModel, options: TrainOptions):
    if options.amp and model.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _encode_texts(model: M2CModel, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([F.normalize(model.backbone.encode_text(texts[i:i + batch_size]).float(), dim=-1)
                          for i in range(0, len(texts), batch_size)])


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
        options.views, size=count)


# ---- the loop shared by both stages -------------------------------------------------------------------------------
@dataclass
class Run:
    """Where a stage writes (weights `out`, checkpoints `out.run/`) and whether it continues a checkpoint."""

    out: Path | None = None
    resume: bool = False

    @property
    def dir(self) -> Path | None:
        return None if self.out is None else self.out.with_suffix(RUN_SUFFIX)


def _loop(stage: int, model: M2CModel, module: torch.nn.Module, prefix: str, options: TrainOptions, n: int,
          data_digest: str, step_loss, run: Run, world: World, progress: bool) -> list[dict]:
    """Train `module` (the trainable part of model.net; `prefix` its name there) for options.epochs over `n`
    examples. step_loss(epoch, step, rows) -> LossTerms | None (None: no usable pair in the batch) computes this
    process's part of a global batch. Checkpoints (weights, optimizer, RNG, loss sums) at every epoch end and every
    options.checkpoint_steps steps; with run.resume the run continues from its checkpoint bit for bit."""
    net = model.net
    warmup, _, betas, eps = options.resolved(stage, model.backbone.name)
    optimizer = make_optimizer(module, prefix, options, betas, eps)
    global_batch = options.batch_size * world.size
    if world.size > 1 and n < global_batch:
        raise UserError(f"{n} examples are fewer than one global batch of {global_batch} ({world.size} processes x "
                        f"--batch-size {options.batch_size})")
    steps = len(epoch_batches(n, global_batch, options.seed, 0))
    total = steps * options.epochs
    record = read_record(run.dir / CHECKPOINT) if run.dir is not None else None
    if record is not None and not run.resume:
        raise UserError(f"{run.dir} holds a training run of {run.out}: pass --resume to continue it, or choose "
                        f"another --out")
    seed_everything(options.seed)
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "sums": {}, "history": []}
    if record is not None:
        _check_resumable(record, stage, options, data_digest, run)
        restore_state_tensors(run.dir, record, net, optimizer)
        set_rng_state(record["rng"])
        state = {k: record[k] for k in state}

    def checkpoint() -> None:
        if run.dir is None or not world.is_main:
            return
        name, optimizer_state = write_state_tensors(run.dir, state["global_step"], net, optimizer)
        write_json_atomic(run.dir / CHECKPOINT, {"format": 1, "stage": stage, "tensors": name,
                                                 "options": options.to_dict(), "data_sha256": data_digest, **state,
                                                 "optimizer": optimizer_state, "rng": rng_state()}, indent=None)
        remove_stale_tensors(run.dir, name)

    params = [p for p in module.parameters() if p.requires_grad]
    for epoch in range(state["epoch"], options.epochs):
        started = time.perf_counter()
        batches = epoch_batches(n, global_batch, options.seed, epoch)
        bar = tqdm(total=steps, initial=state["step_in_epoch"], desc=f"m2c stage {stage} epoch {epoch}",
                   disable=not progress or not world.is_main, leave=False)
        for step in range(state["step_in_epoch"], steps):
            rows = np.array_split(batches[step], world.size)[world.rank] if world.size > 1 else batches[step]
            for group in optimizer.param_groups:
                group["lr"] = official_lr(state["global_step"], options.lr, warmup, total)
            optimizer.zero_grad(set_to_none=True)
            terms = step_loss(epoch, step, rows)
            if terms is not None:
                terms.total.backward()
                sum_gradients(params, world, average=options.as_released)
                optimizer.step()
                for k, v in terms.detached().items():
                    state["sums"][k] = state["sums"].get(k, 0.0) + v
                state["sums"]["steps"] = state["sums"].get("steps", 0) + 1
            state["step_in_epoch"] += 1
            state["global_step"] += 1
            bar.update()
            if options.checkpoint_steps and state["global_step"] % options.checkpoint_steps == 0 \
                    and state["step_in_epoch"] < steps:
                checkpoint()
        bar.close()
        done = max(1, state["sums"].pop("steps", 0))
        seconds = time.perf_counter() - started
        state["history"].append({"stage": stage, "epoch": epoch, **{k: v / done for k, v in state["sums"].items()},
                                 "steps": steps, "seconds": round(seconds, 2)})
        if world.is_main:
            tqdm.write(f"stage {stage} epoch {epoch}: loss {state['history'][-1].get('total', float('nan')):.4f} "
                       f"({steps} steps, {seconds:.1f} s)")
            if run.out is not None:
                save_m2c_weights(net, run.out)
        state.update(epoch=epoch + 1, step_in_epoch=0, sums={})
        checkpoint()
    return state["history"]


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


class _OnlineViews:
    """Per-step crops of pairs of images, decoded in DataLoader workers one epoch ahead of the visual tower."""

    def __init__(self, model: M2CModel, paths: list[Path], options: TrainOptions, world: World):
        self.model, self.paths, self.world = model, paths, world
        self.workers = options.num_workers if options.num_workers is not None else \
            default_num_workers(len(paths), options.batch_size)
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
                jobs.append([(j, *first(int(r), epoch)) for j, r in enumerate(rows)] +
                            [(b + j, *second(int(r), epoch)) for j, r in enumerate(rows)])
            self.loader = iter(view_loader(self.paths, self.model.backbone.image_size, jobs, self.workers))
        keys, images, failed = next(self.loader)
        for _, message in failed:
            if self.world.size > 1:
                raise UserError(f"unreadable training image with several processes: {message} (remove it)")
            if message not in self.reported:
                self.reported.add(message)
                tqdm.write(f"skipping unreadable image: {message}", file=sys.stderr)
        b = (len(keys) + len(failed)) // 2
        at = {k: n for n, k in enumerate(keys)}
        keep = [j for j in range(b) if j in at and b + j in at]
        if not keep:
            return None
        return images[[at[j] for j in keep]], images[[at[b + j] for j in keep]], np.array(keep)


def _local_batches(n: int, options: TrainOptions, world: World):
    def batches(epoch: int) -> list[np.ndarray]:
        return [np.array_split(b, world.size)[world.rank] if world.size > 1 else b
                for b in epoch_batches(n, options.batch_size * world.size, options.seed, epoch)]
    return batches


def train_stage1(model: M2CModel, paths: Sequence[Path], captions: Sequence[str] | None,
                 options: TrainOptions | None = None, *, out: str | Path | None = None, resume: bool = False,
                 cache_dir: str | Path = "cache/features", progress: bool = True) -> list[dict]:
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
            caches = [cached_views(model, paths, cache_dir, spec, options.views, options.seed, with_patches=patches,
                                   num_workers=options.num_workers, progress=progress and world.is_main)
                      for spec, patches in (((VIEW_A, True), (VIEW_B, False)) if options.augment == "views" else
                                            ((None, True),))]
        caches = caches * (2 // len(caches))  # [A, B], or the centre crop twice
        images = np.flatnonzero(caches[0].readable() & caches[1].readable())
        if len(images) < len(paths):
            print(f"{len(paths) - len(images)} unreadable images are left out", file=sys.stderr)
        if len(images) < 2:
            raise UserError("Stage I needs at least two readable images")
    local_batches = _local_batches(len(images), options, world)

    def visual(epoch: int, step: int, rows: np.ndarray):
        """(view A features, view B global features, indices into paths of the usable images) of this process's
        rows."""
        if online is not None:
            views = online.pairs(epoch, step, local_batches,
                                 lambda r, e: (r, VIEW_A, derived_seed(options.seed, e, "A", r)),
                                 lambda r, e: (r, VIEW_B, derived_seed(options.seed, e, "B", r)))
            if views is None:
                return None
            with torch.no_grad():
                return (model.backbone.encode_visual(views[0].to(model.device)),
                        model.backbone.encode_image(views[1].to(model.device)), rows[views[2]])
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
            caps = caption_features[torch.from_numpy(index)].to(model.device) if caption_features is not None \
                else None
            gathered = [gather_rows(x, world) if x is not None else None for x in
                        (F.normalize(query.float(), dim=-1), F.normalize(image_a.float(), dim=-1),
                         F.normalize(image_b.float(), dim=-1), caps)]
            return stage1_loss(*gathered, temperature=temperature, ref_weight=options.ref_weight,
                               kl_weight=options.kl_weight)

    digest = _digest([[str(p) for p in paths], list(captions) if captions is not None else None])
    history = _loop(1, model, net, "", options, len(images), digest, step_loss, Run(_path(out), resume), world,
                    progress)
    net.eval()
    return history


# ---- stage II -----------------------------------------------------------------------------------------------------
def train_stage2(model: M2CModel, triplets: Sequence[Triplet], options: TrainOptions | None = None, *,
                 prompt: str = TRAIN_PROMPT, out: str | Path | None = None, resume: bool = False,
                 cache_dir: str | Path = "cache/features", progress: bool = True) -> list[dict]:
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
            cache = cached_views(model, images, cache_dir, VIEW_B if options.augment == "views" else None,
                                 options.views, options.seed, with_patches=True, num_workers=options.num_workers,
                                 progress=progress and world.is_main)
        readable = cache.readable()
        usable = [t for t in triplets if readable[position[t.reference]] and readable[position[t.target]]]
        if not usable:
            raise UserError("No triplet has both a readable reference and a readable target image")
        if len(usable) < len(triplets):
            print(f"{len(triplets) - len(usable)} triplets with unreadable images are left out", file=sys.stderr)
        triplets = usable
    ref_index = np.array([position[t.reference] for t in triplets])
    tgt_index = np.array([position[t.target] for t in triplets])
    with_captions = bool(options.kl_weight) and all(t.reference_caption for t in triplets)
    if options.kl_weight and not with_captions:
        print("some triplets have no reference_caption: training without the KL term", file=sys.stderr)
    caption_features = _encode_texts(model, [t.reference_caption for t in triplets]) if with_captions else None
    query_ids, query_mask = tokenize_prompts(prompt, [{"text": t.text} for t in triplets], None,
                                             model.backbone.context_length)
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
            return (cache.get(ref_index[rows], vr), cache.get(tgt_index[rows], vt).global_features.to(model.device),
                    rows)
        views = online.pairs(epoch, step, local_batches,
                             lambda r, e: (int(ref_index[r]), VIEW_B, derived_seed(options.seed, e, "ref", r)),
                             lambda r, e: (int(tgt_index[r]), VIEW_B, derived_seed(options.seed, e, "tgt", r)))
        if views is None:
            return None
        with torch.no_grad():
            return (model.backbone.encode_visual(views[0].to(model.device)),
                    model.backbone.encode_image(views[1].to(model.device)), rows[views[2]])

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
            features = model.encode_tokens(ids, mask, pseudo.repeat(2, 1), patches.repeat(2, 1, 1),
                                           use_adapters=True)
            features = F.normalize(features.float(), dim=-1)
            caps = caption_features[torch.from_numpy(rows)].to(model.device) if caption_features is not None else None
            gathered = [gather_rows(x, world) if x is not None else None for x in
                        (features[:b], features[b:], F.normalize(image.float(), dim=-1),
                         F.normalize(target.float(), dim=-1), caps)]
            return stage2_loss(*gathered, temperature=temperature, topk=options.topk, map_weight=options.ref_weight,
                               kl_weight=options.kl_weight, as_released=options.as_released)

    digest = _digest([[str(t.reference), str(t.target), t.text, t.reference_caption] for t in triplets] + [prompt])
    history = _loop(2, model, net.adapters, "adapters.", options, len(triplets), digest, step_loss,
                    Run(_path(out), resume), world, progress)
    net.eval()
    return history


def _path(out: str | Path | None) -> Path | None:
    return None if out is None else Path(out)


# ---- held-out evaluation ------------------------------------------------------------------------------------------
def _cache_rows(model: M2CModel, paths: list[Path], store: FeatureStore, num_workers: int | None,
                progress: bool) -> dict[Path, int]:
    """Feature-store rows of the readable images (one visual pass per new image)."""
    unique = sorted(set(paths))
    result = extract_features(model, unique, store, num_workers=num_workers, progress=progress)
    for path, message in result.failures[:10]:
        print(f"skipping unreadable image {path}: {message}", file=sys.stderr)
    return {p: int(r) for p, r in zip(unique, result.rows) if r >= 0}


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
                        warmup=args.warmup, temperature=args.temperature, beta1=args.beta1, beta2=args.beta2,
                        eps=args.eps, kl_weight=args.kl_weight, ref_weight=args.ref_weight, topk=args.topk,
                        augment=args.augment, views=args.views, as_released=args.as_released, seed=args.seed,
                        num_workers=args.num_workers, amp=args.amp, checkpoint_steps=args.checkpoint_steps)


def _run(args) -> int:
    from ..backbone import resolve_pretrained
    from .model import create_m2c_model

    if not str(args.out).endswith(".safetensors"):
        raise UserError(f"--out must be a .safetensors file, got {args.out}")
    pretrained = resolve_pretrained(args.backbone, args.pretrained)
    options = _options(args)
    device = local_device(args.device)
    started = time.perf_counter()
    if args.stage == 1:
        if args.images is None:
            raise UserError("--stage 1 needs --images (a folder of training images)")
        paths, captions = stage1_data(args.images, args.captions)
        model = create_m2c_model(args.backbone, pretrained, None, device=device, preprocess=args.preprocess,
                                 seed=args.seed, vsi_layers=args.vsi_layers)
        print(f"stage 1: {len(paths)} images, VSI after text blocks {list(model.config.vsi_layers)}")
        history = train_stage1(model, paths, captions, options, out=args.out, resume=args.resume,
                               cache_dir=args.cache_dir)
    else:
        if args.triplets is None or args.init is None:
            raise UserError("--stage 2 needs --triplets (JSONL) and --init (stage-I weights)")
        triplets = read_triplets(args.triplets)
        model = create_m2c_model(args.backbone, pretrained, args.init, device=device,
                                 preprocess=args.preprocess, seed=args.seed)
        model.net.add_adapters(args.adapter_layers, args.adapter_rank)
        print(f"stage 2: {len(triplets)} triplets, adapters (rank {model.config.adapter_rank}) after text blocks "
              f"{list(model.config.adapter_layers)}")
        history = train_stage2(model, triplets, options, prompt=args.prompt, out=args.out, resume=args.resume,
                               cache_dir=args.cache_dir)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"wrote {args.out} ({len(history)} epochs, final loss {history[-1].get('total', float('nan')):.4f}, "
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
    p.add_argument("--out", required=True, help="weights to write (.safetensors + .json), after every epoch; "
                   "checkpoints go to <out>.run/")
    p.add_argument("--resume", action="store_true", help="continue the run of --out from its last checkpoint "
                   "(same data and settings; --epochs may be raised)")
    p.add_argument("--checkpoint-steps", type=non_negative_int, default=0,
                   help="also checkpoint every N steps inside an epoch (default: at epoch ends only)")
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
    p.add_argument("--augment", choices=AUGMENT_MODES, default="online",
                   help="online: a fresh random crop per image and step through the visual tower (official); "
                        "views: --views crops per image, their features cached once, one picked per step; none: "
                        "the cached centre crop (default %(default)s)")
    p.add_argument("--views", type=positive_int, default=8, help="crops per image for --augment views")
    p.add_argument("--as-released", action="store_true",
                   help="the released training where it differs from the intended one: stage-2 hard negatives "
                        "(the positive itself, logits without 1/t) and, with torchrun, gradients averaged over the "
                        "processes (DDP) instead of summed; see docs/m2c.md")
    p.add_argument("--cache-dir", default="cache/features", help="visual feature cache (cached views, held-out "
                   "eval)")
    p.add_argument("--val-triplets", help="held-out triplets JSONL: print Recall@k after training")
    p.add_argument("--gallery", help="folder of images ranked for --val-triplets")
    p.add_argument("--epochs", type=positive_int, default=30)
    p.add_argument("--batch-size", type=positive_int, default=128, help="per process (torchrun: the negatives of "
                   "all processes are gathered)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--wd", type=float, default=0.1, help="weight decay (not on biases, the official rule)")
    p.add_argument("--warmup", type=non_negative_int, default=None, help="warmup steps (default: official 10000 / "
                   "100 for stage 1 / 2)")
    p.add_argument("--temperature", type=float, default=None, help="default 0.07 (stage 1) / 0.01 (stage 2)")
    p.add_argument("--beta1", type=float, default=None, help="AdamW beta1 (default 0.9)")
    p.add_argument("--beta2", type=float, default=None, help="AdamW beta2 (default: 0.98 for ViT-B-32, ViT-B-16, "
                   "ViT-L-14, else 0.999, as the official params)")
    p.add_argument("--eps", type=float, default=None, help="AdamW eps (default: 1e-6 for those ViTs, else 1e-8)")
    p.add_argument("--kl-weight", type=float, default=0.2, help="soft text alignment weight")
    p.add_argument("--ref-weight", type=float, default=1.0,
                   help="stage 1: the view-A term; stage 2: the mapping-sentence term")
    p.add_argument("--topk", type=positive_int, default=10, help="stage 2 mixed hard negatives per query")
    p.add_argument("--num-workers", type=int, default=None, help="image decoding processes")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA)")
    add_model_args(p, weights=False)  # also --seed: random initialisations and the training order
    p.set_defaults(func=_run, preprocess="clip")
