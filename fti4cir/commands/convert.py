"""`fti4cir convert` and `fti4cir convert-m2c`: official checkpoints (FTI4CIR release .pth, M2C .pt) read safely and
written as our safetensors + JSON."""

from __future__ import annotations

CONVERT_HELP = "convert an official FTI4CIR release .pth to safetensors + JSON (safely)"
CONVERT_M2C_HELP = "convert an official M2C checkpoint (.pt) to our safetensors"
CONVERT_M2C_DESCRIPTION = (
    "An official M2C checkpoint (LiJiaBei-7/TSCIR, a torch.save of a dict) read by a restricted unpickler (tensors, "
    "plain containers and the run's argparse Namespace; every other global is refused before anything is imported "
    "or run) and renamed onto our safetensors + JSON. The format and the mapping: fti4cir/m2c/convert.py."
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("convert", help=CONVERT_HELP)
    p.add_argument("src", help="the official release file (.pth: a pickle of the whole module, read safely)")
    p.add_argument("out", help="output .safetensors (the config is written beside it as .json)")
    p.add_argument("--backbone", default="ViT-L-14", help="backbone the release was trained with (default %(default)s)")
    p.add_argument("--pretrained", default="openai", help="its pretrained tag (default %(default)s)")
    p.set_defaults(func=run_convert)

    p = subparsers.add_parser(
        "convert-m2c",
        help=CONVERT_M2C_HELP,
        description=CONVERT_M2C_DESCRIPTION,
    )
    p.add_argument("src", help="official checkpoint (epoch_N.pt of LiJiaBei-7/TSCIR)")
    p.add_argument("out", help="weights to write (.safetensors + .json)")
    p.add_argument(
        "--backbone", default="ViT-L-14", help="open_clip model the checkpoint was trained on (default %(default)s)"
    )
    p.add_argument(
        "--pretrained",
        default="openai",
        help="its CLIP weights tag or file, recorded in the config (default %(default)s)",
    )
    p.set_defaults(func=run_convert_m2c)


def run_convert(args) -> int:
    from ..convert import convert_official

    out = convert_official(args.src, args.out, args.backbone, args.pretrained)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def run_convert_m2c(args) -> int:
    from ..m2c.convert import convert_official_m2c

    out = convert_official_m2c(args.src, args.out, args.backbone, args.pretrained)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0
