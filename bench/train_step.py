"""Training step: our trainer's step vs a straightforward implementation of the official step, same batch and weights.

- ours: `fti4cir.training.trainer.train_step` on a batch read from the on-disk feature cache (fp16 memory map: global
  features + patch tokens, so the visual tower never runs), text passes truncated to the batch's longest sentence,
  frozen caption targets precomputed once per pair (a second row encodes them in every step instead), the trainer's
  fused AdamW;
- official: the official `getLoss` re-stated with `fti4cir.official` (visual tower twice per image and step,
  per-sample selection and token splicing, every text pass over the full 77-token context), CLIP frozen. A second row
  runs it as the released `train.py` does, where CLIP's parameters keep requires_grad=True so every step also
  computes text-tower weight gradients. Its optimizer is the official one, torch's default AdamW.
Both: forward + backward + AdamW step, CPU, fp32, one thread, dropout off (eval mode) so that the losses compare
exactly.
"""

from __future__ import annotations

import tempfile

import torch

from bench.common import bench_main, markdown_table, percentile, time_round_robin
from fti4cir import create_model
from fti4cir.features import FeatureStore
from fti4cir.official import official_copy, official_get_loss
from fti4cir.training.data import TrainingData
from fti4cir.training.losses import fti4cir_loss
from fti4cir.training.trainer import TrainConfig, make_optimizer, train_step

THREADS = (
    "Timed as CPU time of one thread: on a shared machine wall time swings with other processes' load (both "
    "are shown), and both paths do the same kind of large-matrix work, so one thread compares them fairly."
)

# BLIP-like caption splits (subject up to the first noun, attribute the rest), cycled over the batch
SUBJECTS = ["a dog", "a small brown bird", "a man", "a red car", "two women", "a plate", "a wooden boat", "a cat"]
ATTRIBUTES = [
    "sitting on the grass",
    "perched on a branch in the rain",
    "riding a bike down the street",
    "parked in front of a house",
    "standing next to each other",
    "of food on a table",
    "on the water near a dock",
    "laying on a bed with a blanket",
]


def measure(backbone: str, batch: int, repeat: int) -> tuple[list[dict], dict]:
    torch.manual_seed(0)
    model = create_model(backbone, None, device="cpu").eval()
    net = official_copy(model.inversion)
    clip = model.backbone.clip
    size = model.backbone.image_size
    images = torch.randn(batch, 3, size, size)
    subjects = [SUBJECTS[i % len(SUBJECTS)] for i in range(batch)]
    attributes = [ATTRIBUTES[(3 * i + 1) % len(ATTRIBUTES)] for i in range(batch)]
    visual = model.backbone.encode_visual(images)

    with tempfile.TemporaryDirectory() as cache:
        store = FeatureStore.for_model(cache, model, with_patches=True)
        rows = store.add([f"{i:040x}" for i in range(batch)], visual)
        data = TrainingData(store, rows, subjects, attributes, [f"{i}.jpg" for i in range(batch)])
        with torch.no_grad():  # same weights, same batch, before any step changes them
            ours_exact = float(fti4cir_loss(model, visual, subjects, attributes).total)
            ours_cached = float(fti4cir_loss(model, data.batch(range(batch)).visual, subjects, attributes).total)
            official = float(official_get_loss(clip, net, images, subjects, attributes)[0])
        check = {
            "ours (fp32 features)": ours_exact,
            "ours (fp16 feature cache)": ours_cached,
            "official": official,
            "relative difference": abs(ours_exact - official) / abs(official),
            "relative difference (fp16 cache)": abs(ours_cached - official) / abs(official),
        }

        ours_optimizer = make_optimizer(model.inversion, TrainConfig(images=None, pairs="", out="", lr=1e-6))
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        uncached = TrainingData(store, rows, subjects, attributes, data.images)
        data.compute_targets(model.backbone, progress=False)
        official_optimizer = torch.optim.AdamW(net.parameters(), lr=1e-6)

        def official_step():
            official_optimizer.zero_grad(set_to_none=True)
            official_get_loss(clip, net, images, subjects, attributes)[0].backward()
            official_optimizer.step()

        def released_step():
            clip.requires_grad_(True)  # as the released train.py leaves CLIP
            try:
                official_step()
            finally:
                clip.requires_grad_(False)
                clip.zero_grad(set_to_none=True)

        steps = {
            "ours: cached features + cached caption targets": lambda: train_step(
                model, ours_optimizer, scaler, data.batch(range(batch)), False
            ),
            "ours: cached features, caption targets encoded each step": lambda: train_step(
                model, ours_optimizer, scaler, uncached.batch(range(batch)), False
            ),
            "official step (CLIP frozen)": official_step,
            "official step as released (CLIP weight grads too)": released_step,
        }
        wall, cpu = time_round_robin(steps, repeat=repeat, warmup=1)

    p50 = {name: percentile(t, 50) for name, t in cpu.items()}
    official = p50["official step (CLIP frozen)"]
    rows = [
        {
            "backbone": backbone,
            "batch": batch,
            "step": name,
            "CPU s (p50)": f"{p50[name]:.3f}",
            "wall s (p50)": f"{percentile(wall[name], 50):.3f}",
            "wall s (min)": f"{min(wall[name]):.3f}",
            "official / this (CPU)": f"{official / p50[name]:.2f}x",
        }
        for name in steps
    ]
    ours = p50["ours: cached features + cached caption targets"]
    check["speed-up (official frozen / ours)"] = official / ours
    check["speed-up (official as released / ours)"] = p50["official step as released (CLIP weight grads too)"] / ours
    check["speed-up, wall (official frozen / ours)"] = percentile(wall["official step (CLIP frozen)"], 50) / percentile(
        wall["ours: cached features + cached caption targets"], 50
    )
    return rows, check


def run(quick: bool = False) -> str:
    backbone, batch, repeat = ("fti4cir-tiny", 4, 1) if quick else ("ViT-B-32", 32, 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see THREADS
    try:
        rows, check = measure(backbone, batch, repeat)
    finally:
        torch.set_num_threads(threads)
    speedup = check["speed-up (official frozen / ours)"]
    lines = [
        f"{backbone} (random weights), batch {batch}, CPU fp32, 1 torch thread, {repeat} timed steps each (round "
        f"robin) after one warm-up; forward + backward + AdamW step. {THREADS}",
        "",
        markdown_table(rows),
        f"**Speed-up, official step / ours: {speedup:.2f}x** in CPU time (goal >= 5x; in wall time "
        f"{check['speed-up, wall (official frozen / ours)']:.2f}x); against the step as released (CLIP left "
        f"trainable): {check['speed-up (official as released / ours)']:.2f}x.",
        "",
        f"Loss on the same weights and batch before any step: ours {check['ours (fp32 features)']:.6f}, official "
        f"{check['official']:.6f}, relative difference {check['relative difference']:.1e} (goal <= 1e-4); from the "
        f"fp16 feature cache {check['ours (fp16 feature cache)']:.6f} "
        f"({check['relative difference (fp16 cache)']:.1e}).",
    ]
    if check["relative difference"] > 1e-4:
        raise AssertionError(f"losses disagree: {check}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    bench_main(run, "Training step", __doc__, argv)


if __name__ == "__main__":
    main()
