"""Indexing throughput: JPEG decode + preprocessing in worker processes + encoder, vs the encoder alone on
pre-decoded tensors at the same batch size (goal: >= 90% of the encoder-only throughput).

Both use the product's path: `fti4cir.features.image_loader` (DataLoader workers running `load_image` + the
targetpad transform) feeding `Backbone.encode_visual`, on the shared photos, with a real-sized random ViT-B-32.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bench.common import bench_main, markdown_table, percentile, time_round_robin
from fti4cir import create_model
from fti4cir.features import image_loader
from fti4cir.imagefiles import list_images

PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "photos"


FOLDERS = {"clothing/test": PHOTOS / "clothing" / "test", "imagenet-sample": PHOTOS / "imagenet-sample"}


def measure(model, name: str, paths: list, batch: int, rounds: int) -> list[dict]:
    """Images/s of each pipeline: median over `rounds` full passes, the pipelines taking turns."""
    with torch.inference_mode():
        decoded = [images for _, images, _ in image_loader(paths, model.transform, batch, num_workers=0)]
        model.backbone.encode_visual(decoded[0])  # warm-up

        def encoder_only():
            for images in decoded:
                model.backbone.encode_visual(images)

        def pipeline(workers: int):
            def run_once():
                for _, images, _ in image_loader(paths, model.transform, batch, num_workers=workers):
                    model.backbone.encode_visual(images)

            return run_once

        default = image_loader(paths, model.transform, batch).num_workers
        passes = {"encoder only (pre-decoded tensors)": encoder_only}
        for workers in (0, 1, 2):
            label = f"decode+preprocess ({workers} worker processes) + encoder"
            passes[label + (" (default here)" if workers == default else "")] = pipeline(workers)
        wall, _ = time_round_robin(passes, repeat=rounds, warmup=0)
    rate = {label: len(paths) / percentile(times, 50) for label, times in wall.items()}
    reference = rate["encoder only (pre-decoded tensors)"]
    return [
        {"photos": name, "pipeline": label, "images/s": f"{r:.1f}", "vs encoder only": f"{100 * r / reference:.0f}%"}
        for label, r in rate.items()
    ]


def run(quick: bool = False) -> str:
    count, batch = (64 if quick else 256), 32
    folders = {name: list_images(folder)[:count] for name, folder in FOLDERS.items()}
    folders = {name: paths for name, paths in folders.items() if paths}
    if not folders:
        return f"skipped: no photos under {PHOTOS}"
    model = create_model("ViT-B-32", None, device="cpu").eval()
    rounds = 1 if quick else 3
    rows = [row for name, paths in folders.items() for row in measure(model, name, paths, batch, rounds)]
    return (
        f"ViT-B-32 (random weights), batch {batch}, the first {count} JPEGs of each folder of shared/data/photos, "
        f"{torch.get_num_threads()} torch threads; median of {rounds} full passes per pipeline, the pipelines "
        f"taking turns. Goal: >= 90% of encoder-only.\n\n" + markdown_table(rows)
    )


def main(argv=None) -> None:
    bench_main(run, "Indexing throughput", __doc__, argv)


if __name__ == "__main__":
    main()
