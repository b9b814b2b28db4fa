"""The demo world's commands (`fti4cir.demo`): `demo-photos`, `demo-labels`, `demo-captions`, `demo-benchmark` and
`demo-rebuild`."""

from __future__ import annotations

from pathlib import Path

from .common import positive_int

DEFAULT_PHOTOS = "data/clothing"
HELP = {
    "demo-photos": "copy the clothing photos (<split>/<class>/*.jpg) into the repository, downscaled",
    "demo-labels": "class and colour labels of the demo photos (labels.json)",
    "demo-captions": "one caption per demo photo of a split (captions JSONL for split-captions / CLIP training)",
    "demo-benchmark": "the clothing-cir composed-retrieval benchmark from the test photos' labels (queries.json)",
    "demo-rebuild": "rebuild the embedded demo: CLIP -> captions -> FTI4CIR -> M2C -> gallery -> benchmark table "
    "(resumable)",
}


def add_parser(subparsers) -> None:
    from ..demo.benchmark import PER_TYPE
    from ..demo.captions import FORM_SETS
    from ..demo.photos import MAX_SIDE, QUALITY, SPLITS
    from ..demo.rebuild import STAGES
    from ..evaluation.datasets import CLOTHING_CIR_SPLITS

    p = subparsers.add_parser("demo-photos", help=HELP["demo-photos"])
    p.add_argument("source", help="clothing-dataset-small folder with train/validation/test/<class>/*.jpg")
    p.add_argument("--out", default=DEFAULT_PHOTOS, help="destination (default %(default)s)")
    p.add_argument(
        "--max-side", type=positive_int, default=MAX_SIDE, help="longer side in pixels (default %(default)s)"
    )
    p.add_argument("--quality", type=positive_int, default=QUALITY, help="JPEG quality (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="rewrite photos that already exist")
    p.set_defaults(func=run_photos)

    p = subparsers.add_parser("demo-labels", help=HELP["demo-labels"])
    p.add_argument("--photos", default=DEFAULT_PHOTOS, help="photo folder (default %(default)s)")
    p.add_argument("--out", default=None, help="labels file (default PHOTOS/labels.json)")
    p.set_defaults(func=run_labels)

    p = subparsers.add_parser("demo-captions", help=HELP["demo-captions"])
    p.add_argument("--split", default="train", choices=list(SPLITS), help="photo split (default %(default)s)")
    p.add_argument("--out", required=True, help="captions JSONL to write (replaced atomically)")
    p.add_argument(
        "--forms",
        default="all",
        choices=list(FORM_SETS),
        help="all: FTI4CIR, contrast ('in red instead of blue') and colour-first forms, for CLIP; "
        "fti4cir: garment first, colour after, for split-captions (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the caption forms' choices (default %(default)s)")
    p.add_argument("--photos", default=DEFAULT_PHOTOS, help="photo folder (default %(default)s)")
    p.add_argument("--labels", default=None, help="labels file (default PHOTOS/labels.json)")
    p.set_defaults(func=run_captions)

    p = subparsers.add_parser("demo-benchmark", help=HELP["demo-benchmark"])
    p.add_argument("--out", default="data/clothing-cir/queries.json", help="benchmark file (default %(default)s)")
    p.add_argument(
        "--per-type",
        type=positive_int,
        default=PER_TYPE,
        help="queries per type: colour, class, both (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the queries' choice and phrasing (default %(default)s)")
    p.add_argument(
        "--split",
        default="test",
        choices=list(CLOTHING_CIR_SPLITS),
        help="photos of the queries and gallery (default %(default)s; validation: for choosing settings)",
    )
    p.add_argument("--photos", default=DEFAULT_PHOTOS, help="photo folder (default %(default)s)")
    p.add_argument("--labels", default=None, help="labels file (default PHOTOS/labels.json)")
    p.set_defaults(func=run_benchmark)

    p = subparsers.add_parser(
        "demo-rebuild",
        help=HELP["demo-rebuild"],
        description="Every learned file of the embedded demo from the committed photos, each "
        "stage skipped when done and the training stages resumed after a kill: "
        "rerun the same command to continue. " + ", ".join(STAGES) + ".",
    )
    p.add_argument("--out", default="runs/demo", help="work folder (default %(default)s; --quick: runs/demo-quick)")
    p.add_argument("--photos", default=DEFAULT_PHOTOS, help="photo folder with labels.json (default %(default)s)")
    p.add_argument("--benchmark", default="data/clothing-cir", help="clothing-cir folder (default %(default)s)")
    p.add_argument("--only", default=None, help="comma-separated stages to run (default: all that are not done)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a few photos per class and a handful of steps (CI smoke run); never installs",
    )
    p.add_argument(
        "--install",
        action="store_true",
        help="when every stage is done, copy the weights into "
        "weights/ and build the demo gallery in galleries/ (the embedded default)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every stage (default %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_rebuild)


def run_photos(args) -> int:
    from ..demo.photos import copy_photos, counts

    photos = copy_photos(args.source, args.out, max_side=args.max_side, quality=args.quality, overwrite=args.overwrite)
    for split, table in counts(photos).items():
        print(f"{split}: {sum(table.values())} photos ({', '.join(f'{c} {n}' for c, n in table.items())})")
    print(f"wrote {args.out}")
    return 0


def run_labels(args) -> int:
    from collections import Counter

    from ..demo.labels import label_photos, write_labels

    labels = label_photos(args.photos)
    out = Path(args.out or Path(args.photos) / "labels.json")
    write_labels(labels, out)
    colours = Counter(p["colour"] for p in labels["photos"])
    print(
        f"{len(labels['photos'])} photos; colours: " + ", ".join(f"{c or 'null'} {n}" for c, n in colours.most_common())
    )
    print(f"wrote {out}")
    return 0


def run_captions(args) -> int:
    from collections import Counter

    from ..demo.captions import write_captions
    from ..demo.labels import read_labels

    labels = read_labels(args.labels or Path(args.photos) / "labels.json")
    records = write_captions(labels, args.split, args.out, args.seed, forms=args.forms, photos_root=args.photos)
    words = Counter(len(r["caption"].split()) for r in records)
    print(
        f"wrote {len(records)} captions of {args.split} to {args.out} ({len(set(r['caption'] for r in records))} "
        f"distinct; {sum(n for k, n in words.items() if k < 4)} shorter than 4 words)"
    )
    print(
        f"next: fti4cir split-captions {args.out} --out PAIRS.jsonl, then train with --images "
        f"{Path(args.photos) / args.split}"
    )
    return 0


def run_benchmark(args) -> int:
    from collections import Counter

    from ..demo.benchmark import generate, write_benchmark
    from ..demo.labels import read_labels

    labels = read_labels(args.labels or Path(args.photos) / "labels.json")
    benchmark = generate(labels, seed=args.seed, per_type=args.per_type, split=args.split)
    write_benchmark(benchmark, args.out, args.photos)
    queries = benchmark["queries"]
    types = Counter(q["type"] for q in queries)
    truths = sorted(len(q["ground_truths"]) for q in queries)
    print(
        f"{len(queries)} queries ({', '.join(f'{t} {n}' for t, n in types.items())}) over a gallery of "
        f"{len(benchmark['gallery'])} photos; ground truths per query: median {truths[len(truths) // 2]}, "
        f"min {truths[0]}, max {truths[-1]}"
    )
    print(f"wrote {args.out}")
    return 0


def run_rebuild(args) -> int:
    from ..demo.rebuild import STAGES, Rebuild, Settings
    from ..errors import UserError

    only = [s.strip() for s in args.only.split(",")] if args.only else None
    unknown = sorted(set(only or ()) - set(STAGES))
    if unknown:
        raise UserError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGES)}")
    if args.quick and args.install:
        raise UserError("--quick results are not a demo model; --install needs a full run")
    out = "runs/demo-quick" if args.quick and args.out == "runs/demo" else args.out
    rebuild = Rebuild(
        out,
        args.photos,
        args.benchmark,
        Settings.quick() if args.quick else Settings(),
        seed=args.seed,
        device=args.device,
        progress=not args.quiet,
        say=print,
    )
    rebuild.run(only)
    if args.install:
        rebuild.install()
    return 0
