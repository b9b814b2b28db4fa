"""`fti4cir triplets`: synthetic composed-retrieval triplets from a labelled image folder (M2C stage II).

The triplets' JSONL format and the builder: `fti4cir.training.m2c.triplets`."""

from __future__ import annotations

import argparse

from ..training.m2c import triplets  # light: no torch
from .common import positive_int

HELP = "synthetic composed-retrieval triplets from a labelled image folder (M2C stage II)"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "triplets", help=HELP, description=triplets.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("folder", help="folder with one subfolder of images per class")
    p.add_argument("--out", required=True, help="triplets JSONL to write (paths relative to its folder)")
    p.add_argument("--per-reference", type=positive_int, default=1, help="triplets per reference image")
    p.add_argument(
        "--template",
        default=triplets.TEXT_TEMPLATE,
        help="modification text; {label} = target class (default '%(default)s')",
    )
    p.add_argument(
        "--ground-truths",
        action="store_true",
        help="list every image of the target class as a ground truth (held-out evaluation sets)",
    )
    p.add_argument(
        "--max-per-class",
        type=positive_int,
        default=None,
        help="use a random sample of at most N images per class (a small triplet set)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random classes and targets (default %(default)s)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    out = Path(args.out)
    records = triplets.build_triplets(
        args.folder,
        out.parent.resolve(),
        per_reference=args.per_reference,
        seed=args.seed,
        template=args.template,
        with_ground_truths=args.ground_truths,
        max_per_class=args.max_per_class,
    )
    triplets.write_triplets(records, out)
    classes = len(triplets.labelled_images(args.folder))
    print(f"{out}: {len(records)} synthetic triplets over {classes} classes")
    return 0
