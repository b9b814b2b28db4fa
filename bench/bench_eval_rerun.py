"""Evaluation rerun: `fti4cir evaluate` with a cold feature cache vs the same command again (warm cache).

The warm run computes no visual features: reference and gallery features come from the on-disk cache, so it runs
only the inversion network on cached features and the text encoder.

1. End to end on the CIRR val annotations (a subset: the first N queries, the gallery cut to the images they use)
   with synthetic 384x384 PNG images, with the tiny model and a real-sized random-weight ViT-B-32, on CPU, in two
   scenarios: all five methods, the same command twice; `--methods fti4cir` cold, then `--methods fti4cir --prompt
   <another template>` warm (the "try another prompt" loop). "command" includes model creation and reading the
   annotations; "pipeline" is the evaluation itself (features, queries, metrics).
2. The speed-up depends on the ratio of gallery images to queries, so the section ends with a projection to the
   full benchmarks from per-item costs (one visual pass, one inversion, one composed query per method) measured on
   ViT-B-32 and ViT-L-14. Image decoding is left out of the cold cost there, so the projection is conservative.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import bench_main, markdown_table, time_calls
from fti4cir import METHODS, VisualFeatures, compose, create_model
from fti4cir.commands import evaluate as evaluate_command
from fti4cir.evaluation import run as evaluation
from fti4cir.evaluation.datasets import load_benchmark

SHARED_CIRR = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks" / "CIRR"
OTHER_PROMPT = "a picture of * showing {attrs}, {text}"
CAPTION = "show three bottles of soft drink"  # a CIRR val caption of the average length (11 words)
# Full benchmark shapes: gallery images, distinct references, queries, caption variants per query.
FULL_SHAPES = {
    "CIRR val": (2297, 2165, 4181, 1),
    "FashionIQ val (3 categories)": (15536, 4326, 6016, 2),
    "CIRCO val": (123403, 220, 220, 1),
}
# scenario -> (cold command arguments, warm command arguments)
SCENARIOS = {
    "all 5 methods, same command": ([], []),
    "fti4cir, another prompt": (["--methods", "fti4cir"], ["--methods", "fti4cir", "--prompt", OTHER_PROMPT]),
}


def make_root(folder: Path, queries: int) -> Path:
    """A CIRR root linking the real annotations, with synthetic images for the subset the run will rank."""
    root = folder / "CIRR"
    root.mkdir(parents=True)
    (root / "cirr").symlink_to(SHARED_CIRR / "cirr", target_is_directory=True)
    benchmark = load_benchmark("cirr", root, "val")
    rng = np.random.default_rng(0)
    for name in evaluation.select("cirr", benchmark, queries, 0).gallery:
        path = benchmark.images[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)  # smooth content: photo-like PNG sizes
        Image.fromarray(coarse).resize((384, 384), Image.BILINEAR).save(path)
    return root


def evaluate_once(argv: list[str]) -> dict:
    """One `fti4cir evaluate` command (the random backbone seeded, so every run sees the same weights)."""
    parser = argparse.ArgumentParser()
    evaluate_command.add_parser(parser.add_subparsers())
    args = parser.parse_args(["evaluate", *argv])
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        code = args.func(args)
    if code != 0:
        raise RuntimeError(f"evaluate exited with {code}")
    return json.loads((Path(args.out) / "results.json").read_text())


def measure(backbone: str, queries: int, folder: Path, repeat: int) -> list[dict]:
    root = make_root(folder / backbone, queries)
    base = [
        "--dataset",
        "cirr",
        "--root",
        str(root),
        "--max-queries",
        str(queries),
        "--subset-gallery",
        "0",
        "--backbone",
        backbone,
        "--pretrained",
        "none",
        "--device",
        "cpu",
        "--out",
        str(folder / "out"),
    ]
    rows = []
    for index, (scenario, (cold_args, warm_args)) in enumerate(SCENARIOS.items()):
        cache = ["--cache-dir", str(folder / f"cache-{backbone}-{index}")]
        cold = {}
        (cold_seconds,) = time_calls(lambda: cold.update(evaluate_once(base + cache + cold_args)), repeat=1, warmup=0)
        warm_runs = []
        warm_seconds = float(
            np.median(
                time_calls(lambda: warm_runs.append(evaluate_once(base + cache + warm_args)), repeat=repeat, warmup=0)
            )
        )
        assert all(warm["features"]["visual_passes"] == 0 for warm in warm_runs)
        warm_pipeline = float(np.median([warm["seconds"] for warm in warm_runs]))
        part = cold["parts"][0]
        rows.append(
            {
                "backbone": backbone,
                "scenario": scenario,
                "queries": part["queries"],
                "gallery": part["gallery"],
                "visual passes (cold / warm)": f"{cold['features']['visual_passes']} / 0",
                "command s (cold / warm)": f"{cold_seconds:.2f} / {warm_seconds:.2f}",
                "**command speed-up**": f"{cold_seconds / warm_seconds:.1f}x",
                "pipeline s (cold / warm)": f"{cold['seconds']:.2f} / {warm_pipeline:.2f}",
                "**pipeline speed-up**": f"{cold['seconds'] / warm_pipeline:.1f}x",
            }
        )
    return rows


def unit_costs(backbone: str, repeat: int, visual_batch: int, query_batch: int) -> dict[str, float]:
    """Seconds per item on CPU: a visual pass, an inversion and a composed query per method (batched)."""
    torch.manual_seed(0)
    model = create_model(backbone, None, device="cpu").eval()
    size = model.backbone.image_size
    images = torch.randn(visual_batch, 3, size, size)
    per_item = lambda fn, n: float(np.median(time_calls(fn, repeat=repeat, warmup=1))) / n  # noqa: E731
    with torch.inference_mode():
        costs = {"visual": per_item(lambda: model.backbone.encode_visual(images), visual_batch)}
        one = model.backbone.encode_visual(images[:1])
        visual = VisualFeatures(
            one.global_features.expand(query_batch, -1), one.patch_tokens.expand(query_batch, -1, -1)
        )
        costs["inversion"] = per_item(lambda: model.invert(visual), query_batch)
        tokens, texts = model.invert(visual), [CAPTION] * query_batch
        for method in METHODS:
            costs[method] = per_item(lambda: compose(model, tokens, texts, method=method), query_batch)
    return costs


def projection(backbone: str, unit: dict[str, float]) -> list[dict]:
    """Pipeline speed-ups on the full benchmarks from per-item costs (no fixed costs, image decoding left out)."""
    rows = []
    for name, (gallery, references, queries, variants) in FULL_SHAPES.items():
        for scenario, methods in (("all 5 methods", METHODS), ("fti4cir, another prompt", ("fti4cir",))):
            text = queries * variants * sum(unit[m] for m in methods)
            warm = references * unit["inversion"] + text
            cold = gallery * unit["visual"] + warm
            rows.append(
                {
                    "backbone": backbone,
                    "benchmark": name,
                    "scenario": scenario,
                    "projected speed-up": f"{cold / warm:.0f}x",
                    "with pseudo tokens cached too": f"{cold / text:.0f}x",
                }
            )
    return rows


def run(quick: bool = False) -> str:
    if not (SHARED_CIRR / "cirr").is_dir():
        return f"Skipped: the CIRR annotations are not available under {SHARED_CIRR}.\n"
    repeat = 1 if quick else 3
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_eval_rerun_") as tmp:
        for backbone, queries in (("fti4cir-tiny", 8 if quick else 40), ("ViT-B-32", 4 if quick else 16)):
            rows += measure(backbone, queries, Path(tmp), repeat)
    # (backbone, visual batch, query batch): ViT-L-14 in small batches to keep the CPU run short (conservative:
    # smaller batches cost more per item, and text is the warm run's cost)
    sizes = [("ViT-B-32", 4, 32)] + ([] if quick else [("ViT-L-14", 2, 8)])
    costs = {backbone: unit_costs(backbone, repeat, visual, query) for backbone, visual, query in sizes}
    cost_rows = [
        {"backbone": backbone, **{f"{item} ms": f"{1e3 * seconds:.1f}" for item, seconds in unit.items()}}
        for backbone, unit in costs.items()
    ]
    projected = [row for backbone, unit in costs.items() for row in projection(backbone, unit)]
    return (
        f"CPU, {torch.get_num_threads()} torch threads, random weights. End to end: CIRR val subset (gallery = "
        f"the images the queries use), synthetic 384x384 PNGs, warm = median of {repeat} runs. Goal: >= 20x.\n\n"
        + markdown_table(rows)
        + '\nPer-item costs (ms; methods = one composed query, caption "'
        + CAPTION
        + '"):\n\n'
        + markdown_table(cost_rows)
        + "\nProjected pipeline speed-up of a warm rerun on the full benchmarks (the warm run inverts every "
        "distinct reference and encodes every query text; FashionIQ encodes two caption orders per query; "
        "the last column assumes pseudo tokens were cached as well):\n\n" + markdown_table(projected)
    )


def main(argv=None) -> None:
    bench_main(run, "Evaluation rerun", __doc__, argv)


if __name__ == "__main__":
    main()
