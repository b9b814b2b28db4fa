"""`fti4cir caption` (BLIP captions for a folder, resumable JSONL) and `fti4cir split-captions` (subject/attribute
pairs with spaCy): the first two stages of FTI4CIR training data (`fti4cir.training.captions`,
`fti4cir.training.caption_split`)."""

from __future__ import annotations

import argparse
import sys

from .common import positive_int

CAPTION_HELP = "BLIP captions for a folder of images (resumable JSONL)"
SPLIT_HELP = "split captions into subject/attribute pairs (spaCy)"


def add_parser(subparsers) -> None:
    from ..training import caption_split, captions  # light: they import torch, transformers and spaCy when used

    p = subparsers.add_parser(
        "caption", help=CAPTION_HELP, description=captions.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("images_dir", help="folder of images, searched recursively")
    p.add_argument("--out", required=True, help="captions JSONL file; appended to and resumed when it exists")
    p.add_argument(
        "--model",
        default=captions.DEFAULT_MODEL,
        help=f"hub id or local folder of a BLIP captioner (default %(default)s; {captions.TINY_MODEL} for tests)",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=16, help="images per captioning batch (default %(default)s)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default %(default)s)")
    p.add_argument(
        "--num-beams", type=positive_int, default=3, help="beam search width (default %(default)s, as the paper)"
    )
    p.add_argument("--min-length", type=positive_int, default=10, help="in tokens, counting the prompt")
    p.add_argument("--max-length", type=positive_int, default=25, help="in tokens, counting the prompt")
    p.add_argument(
        "--prompt", default=captions.PROMPT, help="decoder prompt, removed from the captions (default '%(default)s')"
    )
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N images (sorted by path)")
    p.set_defaults(func=run_caption)

    p = subparsers.add_parser(
        "split-captions",
        help=SPLIT_HELP,
        description=caption_split.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("captions", help="captions JSONL written by `fti4cir caption`")
    p.add_argument("--out", required=True, help="pairs JSONL to write (replaced atomically)")
    p.add_argument("--batch-size", type=int, default=256, help="captions per spaCy batch")
    p.set_defaults(func=run_split)


def run_caption(args) -> int:
    import time
    from pathlib import Path

    from ..errors import UserError
    from ..training.captions import caption_folder, load_blip, resolve_device

    if args.min_length > args.max_length:
        raise UserError(f"--min-length {args.min_length} is above --max-length {args.max_length}")
    if not Path(args.images_dir).is_dir():
        raise UserError(f"{args.images_dir} is not a folder of images")
    started = time.perf_counter()
    model, processor = load_blip(args.model, resolve_device(args.device))
    summary = caption_folder(
        args.images_dir,
        args.out,
        model,
        processor,
        limit=args.limit,
        batch_size=args.batch_size,
        num_beams=args.num_beams,
        min_length=args.min_length,
        max_length=args.max_length,
        prompt=args.prompt,
    )
    print(
        f"{args.out}: captioned {summary.captioned} images, {summary.already_done} already done, "
        f"{len(summary.bad)} bad images skipped, {summary.total} in total "
        f"({time.perf_counter() - started:.1f} s)"
    )
    return 0


def run_split(args) -> int:
    from ..training.caption_split import TORN_NOTICE, split_captions_file

    done = split_captions_file(args.captions, args.out, batch_size=args.batch_size)
    if done.torn:
        print(TORN_NOTICE.format(source=args.captions), file=sys.stderr)
    dropped = ", ".join(f"{reason.replace('_', ' ')} {count}" for reason, count in done.result.dropped.items())
    print(
        f"{args.out}: kept {len(done.result.pairs)} of {done.captions} captions; dropped "
        f"{done.result.total_dropped} ({dropped})"
    )
    return 0
