"""FTI4CIR training (`fti4cir train`): the inversion network trained from cached visual features, resumable bit for
bit (the loop, its checkpoints and resume: `training.loop`).

Recipe (official defaults): AdamW over the inversion network only (lr 4e-5, weight decay 0.01), batch 256 (the last
incomplete batch of an epoch dropped), lr x 0.1 from epoch 10 on, dropout active, CLIP frozen and in eval mode;
mixed precision (autocast fp16 + GradScaler) on CUDA, fp32 on CPU. Unlike the official code, the visual tower never
runs during training (features come from `fti4cir.features`), every text pass runs only up to the batch's longest
sequence, the frozen caption targets are encoded once per pair, and CLIP's weights get no gradients (the official
`train.py` never freezes CLIP, so every step also computes and accumulates text-tower weight gradients it never uses).

Run directory: `checkpoint.json` (the commit record: epoch, step, config, optimizer hyper-parameters, GradScaler and
RNG states, log history) naming `checkpoint-<step>.safetensors` (network + optimizer tensors), written at every
epoch end and, with --checkpoint-steps N, every N steps. Both files are written atomically, tensors first, so a kill
at any moment leaves the previous checkpoint intact; --resume then continues exactly where that checkpoint stood.
`log.jsonl` holds one line per finished epoch and `fti4cir.safetensors` (+ `.json`) the final weights.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..atomic import write_text_atomic
from ..backbone import DEFAULT_MODEL, DEFAULT_PRETRAINED, default_device
from ..digests import file_digest
from ..errors import UserError
from ..factory import create_model
from ..features import FeatureStore
from ..spec import ModelSpec
from ..weights import save_weights
from .checkpoint import changed_settings
from .data import BatchDataset, TrainingBatch, epoch_batches, prepare_training_data
from .loop import Loop, LoopState, optimisation_step, read_checkpoint
from .losses import LossTerms, fti4cir_loss

log = logging.getLogger(__name__)

FINAL_WEIGHTS = "fti4cir.safetensors"
LOG = "log.jsonl"
TERMS = tuple(f.name for f in fields(LossTerms))  # "total" first


@dataclass
class TrainConfig:
    images: str | None  # image folder (only read for images whose features are not cached yet)
    pairs: str  # pairs JSONL (image, sha1, subject, attribute)
    out: str  # run directory
    backbone: str = DEFAULT_MODEL
    pretrained: str | None = DEFAULT_PRETRAINED
    weights: str | None = None  # start from these inversion weights (fine-tuning); None = random init
    preprocess: str = "targetpad"
    cache_dir: str = "cache/features"
    epochs: int = 80
    batch_size: int = 256
    lr: float = 4e-5
    weight_decay: float = 0.01
    lr_decay_epoch: int = 10  # 0-based epoch from which lr is multiplied by lr_decay
    lr_decay: float = 0.1
    reg_weight: float | None = None  # weight of the tri-wise regularisation; None: the network's (official 1.4)
    subject_weight: float | None = None  # its subject-wise sentence's weight; None: the network's (official 1)
    seed: int = 0
    checkpoint_steps: int = 0  # also checkpoint every this many steps inside an epoch (0: at epoch ends only)

    # Settings a resumed run may change; every other one must equal the checkpoint's.
    RESUMABLE = ("images", "pairs", "out", "cache_dir", "epochs", "checkpoint_steps")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def model_spec(self, device=None) -> ModelSpec:
        """The model a run trains: the backbone and the initial inversion network (random from `seed`, or
        `weights`)."""
        return ModelSpec(
            backbone=self.backbone,
            pretrained=self.pretrained,
            weights=self.weights,
            preprocess=self.preprocess,
            device=None if device is None else str(device),
            seed=self.seed,
        )


def lr_for_epoch(config: TrainConfig, epoch: int) -> float:
    """The official schedule: one multiplication by lr_decay at epoch `lr_decay_epoch` (0-based)."""
    return config.lr * (config.lr_decay if epoch >= config.lr_decay_epoch else 1.0)


# ---- run directory ----------------------------------------------------------------------------------------------
def write_log(run_dir: Path, history: list[dict]) -> None:
    write_text_atomic(run_dir / LOG, "".join(json.dumps(r) + "\n" for r in history))


def check_resumable(config: TrainConfig, record: dict) -> None:
    different = changed_settings(record["config"], config.to_dict(), TrainConfig.RESUMABLE)
    if different:
        raise UserError(
            f"Cannot resume {config.out}: settings differ from its checkpoint ({'; '.join(different)}). "
            f"Resume with the checkpoint's settings or train into another --out"
        )


def make_optimizer(net, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the inversion network only; the fused kernel (one pass over each tensor: 4x faster than the default
    per-tensor loop on CPU, same arithmetic up to rounding) where torch has it."""
    fused = next(net.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=fused)


# ---- one step ---------------------------------------------------------------------------------------------------
def train_step(model, optimizer, scaler, batch: TrainingBatch, amp: bool) -> LossTerms:
    """One optimisation step of the inversion network on a batch of cached features (fp16 autocast + `scaler` with
    amp)."""
    return optimisation_step(
        optimizer,
        lambda: fti4cir_loss(model, batch.visual, batch.subjects, batch.attributes, target_features=batch.targets),
        device=model.device,
        precision="fp16" if amp else None,
        scaler=scaler,
    )


# ---- the run ----------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    weights: Path
    history: list[dict]
    pairs_used: int
    dropped: dict[str, int]


def _epoch_record(epoch: int, state: LoopState, steps: int, lr: float, seconds: float) -> dict:
    means = {k: state.sums[k] / steps for k in TERMS}
    return {
        "epoch": epoch + 1,
        "global_step": state.global_step,
        "lr": lr,
        "loss": means["total"],
        **{k: means[k] for k in TERMS[1:]},
        "steps": steps,
        "seconds": round(seconds, 3),
    }


def _prepare(config: TrainConfig, record: dict | None, device, num_workers, progress: bool):
    """Model, training data (features cached, caption targets encoded) and the pairs file's digest."""
    model = create_model(config.model_spec(device))
    # stored in the inversion config, so the weights file records them
    if config.reg_weight is not None:
        model.inversion.config.reg_weight = config.reg_weight
    if config.subject_weight is not None:
        model.inversion.config.subject_weight = config.subject_weight
    pairs_digest = file_digest(config.pairs)
    if record is not None and record["pairs_sha256"] != pairs_digest:
        raise UserError(f"{config.pairs} changed since the checkpoint in {config.out} was written; cannot resume")
    store = FeatureStore.for_model(config.cache_dir, model, with_patches=True)
    data = prepare_training_data(model, config.images, config.pairs, store, num_workers=num_workers, progress=progress)
    for _, message in data.failures[:10]:
        log.warning("skipped %s", message)
    if len(data) < config.batch_size:
        raise UserError(f"{len(data)} usable pairs are fewer than one batch of {config.batch_size}; lower --batch-size")
    data.compute_targets(model.backbone, progress=progress)
    return model, data, pairs_digest


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    device: str | torch.device | None = None,
    num_workers: int | None = None,
    deterministic: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train (or, with resume, continue) the run in `config.out`; returns the final weights' path and the log.

    num_workers: processes decoding images for feature extraction and reading cached features (default: automatic
    for extraction; 2 readers on CUDA, none on CPU). deterministic: deterministic CUDA kernels, so that a resumed
    GPU run also equals an uninterrupted one bit for bit (on CPU it always does)."""
    run_dir = Path(config.out)
    record = read_checkpoint(run_dir)
    if record is not None and not resume:
        raise UserError(
            f"{run_dir} already holds a training run; pass --resume to continue it, or choose another --out"
        )
    if record is not None:
        check_resumable(config, record)
    if config.batch_size < 2:
        raise UserError("--batch-size must be at least 2 (the contrastive loss needs negatives)")
    device = torch.device(device) if device is not None else default_device()
    amp = device.type == "cuda"
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)  # an op without one warns instead of failing
    model, data, pairs_digest = _prepare(config, record, device, num_workers, progress)

    net = model.inversion
    optimizer = make_optimizer(net, config)
    run_dir.mkdir(parents=True, exist_ok=True)
    steps_per_epoch = len(data) // config.batch_size
    readers = num_workers if num_workers is not None else (2 if amp else 0)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)

    def batches(epoch: int, start: int) -> DataLoader:
        order = epoch_batches(len(data), config.batch_size, config.seed, epoch)[start:]
        return DataLoader(
            BatchDataset(data, order), batch_size=None, num_workers=readers, pin_memory=amp, generator=torch.Generator()
        )  # its own generator: the global RNG stays untouched

    def step(epoch: int, index: int, batch: TrainingBatch) -> dict[str, float]:
        terms = train_step(model, optimizer, scaler, batch.to(device, non_blocking=amp), amp).detached()
        if not math.isfinite(terms["total"]):
            raise UserError(
                f"The loss became {terms['total']} at step {epoch * steps_per_epoch + index + 1}; the "
                f"last checkpoint is intact: resume with a lower --lr in a new --out"
            )
        return terms

    loop = Loop(
        net,
        optimizer,
        config.epochs,
        steps_per_epoch,
        batches,
        step,
        epoch_record=lambda epoch, state, seconds: _epoch_record(
            epoch, state, steps_per_epoch, lr_for_epoch(config, epoch), seconds
        ),
        lr=lambda epoch, _: lr_for_epoch(config, epoch),
        run_dir=run_dir,
        record={"config": config.to_dict(), "pairs_sha256": pairs_digest},
        scaler=scaler,
        checkpoint_steps=config.checkpoint_steps,
        on_epoch_end=lambda epoch, state: write_log(run_dir, state.history),
        progress=progress,
        describe=lambda epoch: f"epoch {epoch + 1}/{config.epochs}",
        postfix=_running_means,
    )
    state = loop.start(config.seed, record)
    if record is not None:
        write_log(run_dir, state.history)  # the log of the checkpoint (a kill before a commit leaves it ahead)
    dropped = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in data.dropped.items()) or "none"
    log.info(
        f"training on {len(data)} pairs (dropped: {dropped}), {steps_per_epoch} steps of {config.batch_size} "
        f"per epoch, {device}{' with AMP' if amp else ''}"
        + (f"; resuming at epoch {state.epoch + 1} step {state.step_in_epoch}" if record else "")
    )
    net.train()  # dropout on; the backbone stays in eval mode
    state = loop.run(state)

    net.eval()
    net.config.extra = {
        **net.config.extra,
        "training": {
            "epochs": state.epoch,
            "steps": state.global_step,
            "pairs": len(data),
            "pairs_sha256": pairs_digest,
            "seed": config.seed,
        },
    }
    return TrainResult(save_weights(net, run_dir / FINAL_WEIGHTS), state.history, len(data), data.dropped)


def _running_means(state: LoopState) -> dict[str, str]:
    n = max(state.step_in_epoch, 1)
    return {
        "loss": f"{state.sums['total'] / n:.4f}",
        "nce": f"{state.sums['contrastive'] / n:.3f}",
        "ortho": f"{state.sums['orthogonal'] / n:.4f}",
        "reg": f"{state.sums['regularisation'] / n:.3f}",
    }


def config_from_args(values: dict, defaults: dict, record: dict | None) -> TrainConfig:
    """The run's settings: `values` (a fresh run: the command's flags), or the checkpoint's with the values that differ
    from their `defaults` (resume: the flags the user gave)."""
    names = [f.name for f in fields(TrainConfig)]
    given = {name: values[name] for name in names}
    if record is None:
        if not given["images"] or not given["pairs"]:
            raise UserError("--images and --pairs are needed to start a training run")
        return TrainConfig(**given)
    merged = dict(record["config"])
    for name, value in given.items():
        if value != defaults[name]:
            merged[name] = value  # contradictions with the checkpoint are reported by check_resumable
    return TrainConfig(**merged)
