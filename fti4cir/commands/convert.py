"""`fti4cir convert` and `fti4cir convert-m2c`: official checkpoints (FTI4CIR release .pth, M2C .pt) read safely and
written as our safetensors + JSON."""

from __future__ import annotations

import argparse

CONVERT_HELP = "convert an official FTI4CIR release .pth to safetensors + JSON (safely)"
CONVERT_M2C_HELP = "convert an official M2C checkpoint (.pt) to our safetensors"
CONVERT_M2C_DESCRIPTION = """\
`fti4cir convert-m2c`: an official M2C checkpoint (LiJiaBei-7/TSCIR, src/main.py) read safely, renamed onto ours.

The official checkpoint is a `torch.save` of a dict: `epoch`, `name`, `args` (the argparse Namespace of the run),
`state_dict` (the frozen CLIP, not needed: the backbone comes from open_clip), `state_dict_img2text` (Phi, the patch
projection and the VSI modules, as `IM2TEXT`), `state_dict_lora` (stage II: the composing adapters, as `LoRA`) and
`optimizer`; keys carry DistributedDataParallel's `module.` prefix. It is unpickled by a restricted unpickler that
rebuilds tensors, plain containers and the Namespace only: every other global is refused before anything of it is
imported or run (the same policy as `fti4cir.convert` for the FTI4CIR release, with the Namespace allowed and no
module classes). Reading needs memory for the whole file (CLIP's tensors included: ~1 GB for ViT-L/14 in fp16).
The 188 tensors of a stage-II checkpoint (176 + 12) map one to one onto ours, shapes unchanged.
"""


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
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
