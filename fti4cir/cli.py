"""`fti4cir` command line: one subcommand per pipeline stage."""
from __future__ import annotations

import argparse
import sys

from .errors import UserError


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(value, 1)


def non_negative_int(value: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(value, 0)


def _int_at_least(value: str, minimum: int) -> int:
    number = int(value)
    if number < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {number}")
    return number


def _none_or_str(value: str) -> str | None:
    return None if value.lower() in ("none", "random", "") else value


def add_model_args(parser: argparse.ArgumentParser, weights: bool = True) -> None:
    """The backbone/weights/device flags every model-using stage shares."""
    from .backbone import DEFAULT_MODEL, DEFAULT_PRETRAINED

    parser.add_argument("--backbone", default=DEFAULT_MODEL, help="open_clip model name (default %(default)s; "
                        "fti4cir-tiny for a tiny random model)")
    parser.add_argument("--pretrained", type=_none_or_str, default=DEFAULT_PRETRAINED,
                        help="open_clip pretrained tag or local checkpoint file; 'none' for random weights")
    if weights:
        parser.add_argument("--weights", type=_none_or_str, default=None,
                            help="inversion weights: .safetensors, official .pth release, or hub id "
                                 "(default: random init)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--preprocess", default="targetpad", choices=["targetpad", "clip"],
                        help="image preprocessing: targetpad (default, as the official FTI4CIR code) or clip "
                             "(resize + center crop)")
    parser.add_argument("--seed", type=int, default=0, help="seed of random initialisations (random backbone with "
                        "--pretrained none, inversion network without --weights)")


def model_from_args(args):
    from .backbone import resolve_pretrained
    from .model import create_model

    args.pretrained = resolve_pretrained(args.backbone, args.pretrained)  # callers read it back (gallery identity)
    return create_model(args.backbone, args.pretrained, getattr(args, "weights", None), device=args.device,
                        preprocess=args.preprocess, seed=args.seed)


def _convert(args) -> int:
    from .convert import convert_official

    out = convert_official(args.src, args.out, args.backbone, args.pretrained)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def _inspect(args) -> int:
    import torch

    from .compose import reference_tokens
    from .decode import decode
    from .inputs import clean_text, load_image

    model = model_from_args(args)
    with torch.no_grad():
        tokens = reference_tokens(model, [load_image(args.image)], return_attention=False)
    r = int(tokens.num_kept[0])
    words = decode(model.backbone, torch.cat([tokens.subject[:1], tokens.attributes[0, :r]]), k=args.k)
    fmt = lambda ws: "/".join(f"{w.word}({w.score:.2f})" for w in ws)  # noqa: E731
    print(f"a photo of [{fmt(words[0])}] with [{', '.join(fmt(w) for w in words[1:])}] but "
          f"{clean_text(args.text)}")
    relevance = tokens.selection.relevance[0]
    print(f"kept {r} of {relevance.numel()} attribute queries: {tokens.selection.indices[0, :r].tolist()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fti4cir", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert an official FTI4CIR release .pth to safetensors + JSON (safely)")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--backbone", default="ViT-L-14", help="backbone the release was trained with")
    p.add_argument("--pretrained", default="openai")
    p.set_defaults(func=_convert)

    p = sub.add_parser("inspect", help="decode one image's pseudo-word tokens")
    p.add_argument("image")
    p.add_argument("--text", default="")
    p.add_argument("-k", type=int, default=3, help="vocabulary words per token")
    add_model_args(p)
    p.set_defaults(func=_inspect)

    for stage in _stage_modules():
        stage.add_parser(sub)
    return parser


def _stage_modules():
    """Pipeline stages that bring their own subcommands."""
    import importlib

    names = ["fti4cir.training.captions", "fti4cir.training.caption_split", "fti4cir.features", "fti4cir.gallery",
             "fti4cir.training.trainer", "fti4cir.evaluation.run", "fti4cir.m2c.triplets", "fti4cir.m2c.train",
             "fti4cir.m2c.convert", "fti4cir.demo.commands"]
    return [importlib.import_module(n) for n in names]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
