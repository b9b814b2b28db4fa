"""Indexing throughput: JPEG decode + preprocessing in worker processes + encoder, vs the encoder alone on
pre-decoded tensors at the same batch size (goal: >= 90% of the encoder-only throughput).

Both use the product's path: `fti4cir.features.image_loader` (DataLoader workers running `load_image` + the
targetpad transform) feeding `Backbone.encode_visual`, on the shared photos, with a real-sized random ViT-B-32.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from bench.common import bench_main, markdown_table
from fti4cir import create_model
from fti4cir.features import image_loader
from fti4cir.imagefiles import list_images

PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "photos"


def run(quick: bool = False) -> str:
    paths = list_images(PHOTOS / "clothing" / "test")[: 64 if quick else 256]
    if not paths:
        return f"skipped: no photos under {PHOTOS}"
    model = create_model("ViT-B-32", None, device="cpu").eval()
    batch = 32
    rows = []
    with torch.inference_mode():
        decoded = [images for _, images, _ in image_loader(paths, model.transform, batch, num_workers=0)]
        model.backbone.encode_visual(decoded[0])  # warm-up
        start = time.perf_counter()
        for images in decoded:
            model.backbone.encode_visual(images)
        encoder_only = len(paths) / (time.perf_counter() - start)
        rows.append({"pipeline": "encoder only (pre-decoded tensors)", "images/s": f"{encoder_only:.1f}",
                     "vs encoder only": "100%"})
        for workers in (0, 1, 2):
            start = time.perf_counter()
            for _, images, _ in image_loader(paths, model.transform, batch, num_workers=workers):
                model.backbone.encode_visual(images)
            full = len(paths) / (time.perf_counter() - start)
            rows.append({"pipeline": f"decode+preprocess ({workers} worker processes) + encoder",
                         "images/s": f"{full:.1f}", "vs encoder only": f"{100 * full / encoder_only:.0f}%"})
    return (f"ViT-B-32 (random weights), batch {batch}, {len(paths)} JPEGs from shared/data/photos/clothing/test, "
            f"{torch.get_num_threads()} torch threads. Goal: >= 90% of encoder-only.\n\n" + markdown_table(rows))


def main(argv=None) -> None:
    bench_main(run, "Indexing throughput", __doc__, argv)

if __name__ == "__main__":
    main()
