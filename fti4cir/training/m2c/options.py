"""The settings of an M2C training run and their official defaults (light: no torch, for the command line)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ...errors import UserError

OFFICIAL_WARMUP = {1: 10000, 2: 100}
OFFICIAL_TEMPERATURE = {1: 0.07, 2: 0.01}
TRAIN_PROMPT = "a photo of * that {text}"
AUGMENT_MODES = ("online", "views", "none")  # see fti4cir.training.m2c.views
# src/params.py `get_default_params`: AdamW betas and eps of the CLIP paper per model (the run scripts leave them
# unset); the ViTs of the list use (0.9, 0.98) / 1e-6, every other model (0.9, 0.999) / 1e-8.
CLIP_VIT_MODELS = ("ViT-B-32", "ViT-B-16", "ViT-L-14")


def official_adam(backbone: str) -> tuple[float, float, float]:
    """(beta1, beta2, eps) the official code gives AdamW for this CLIP model."""
    return (0.9, 0.98, 1e-6) if backbone in CLIP_VIT_MODELS else (0.9, 0.999, 1e-8)


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
    augment: str = "online"  # online | views | none (see fti4cir.training.m2c.views)
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
        return (
            OFFICIAL_WARMUP[stage] if self.warmup is None else self.warmup,
            OFFICIAL_TEMPERATURE[stage] if self.temperature is None else self.temperature,
            (beta1 if self.beta1 is None else self.beta1, beta2 if self.beta2 is None else self.beta2),
            eps if self.eps is None else self.eps,
        )

    def to_dict(self) -> dict:
        return asdict(self)
