"""What several commands share: argparse types and the model flags, turned into a `ModelSpec`."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger("fti4cir.commands")


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(value, 1)


def non_negative_int(value: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(value, 0)


def inversion_config_value(field: str):
    """argparse type: a number for the inversion network's config field `field`, checked by the rule its loader
    applies (`fti4cir.config_checks.INVERSION_RULES`), so a flag that ends up in a weights file accepts exactly what
    will load again. The rules are imported on use: building the parser stays light."""

    def parse(value: str) -> float:
        from ..config_checks import INVERSION_RULES

        number = float(value)
        try:
            INVERSION_RULES[field].check(number, "the value")
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return number

    parse.__name__ = "number"  # argparse names the type in its message for a non-number: "invalid number value"
    return parse


def _int_at_least(value: str, minimum: int) -> int:
    number = int(value)
    if number < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {number}")
    return number


def none_or_str(value: str) -> str | None:
    """argparse type: 'none', 'random' or '' mean None (random weights)."""
    return None if value.lower() in ("none", "random", "") else value


def add_model_args(parser: argparse.ArgumentParser, weights: bool = True, hub: bool | None = None) -> None:
    """The backbone/weights/device flags every model-using command shares. hub (default: = weights): also --model (a
    preset) and --weights-revision."""
    hub = weights if hub is None else hub
    from ..presets import DEFAULT_MODEL, DEFAULT_PRETRAINED, PRESETS

    parser.add_argument(
        "--backbone",
        default=DEFAULT_MODEL,
        help="open_clip model name or hf-hub:org/repo (default %(default)s; fti4cir-tiny for a tiny random model)",
    )
    parser.add_argument(
        "--pretrained",
        type=none_or_str,
        default=DEFAULT_PRETRAINED,
        help="open_clip pretrained tag or local checkpoint file; 'none' for random weights",
    )
    if hub:
        parser.add_argument(
            "--model",
            choices=sorted(PRESETS),
            default=None,
            help="a preset instead of --backbone/--weights: fti4cir-official = ViT-L-14/openai + the "
            "official FTI4CIR weights from the Hugging Face Hub (downloaded and converted once)",
        )
    if weights:
        parser.add_argument(
            "--weights",
            type=none_or_str,
            default=None,
            help="inversion weights: .safetensors, official .pth release, or hub id "
            "org/repo[/file][@revision] (default: random init)",
        )
    if hub:
        parser.add_argument(
            "--weights-revision",
            default=None,
            help="branch, tag or commit of a hub id given to --weights (default: main)",
        )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument(
        "--preprocess",
        default="targetpad",
        choices=["targetpad", "clip"],
        help="image preprocessing: targetpad (default, as the official FTI4CIR code) or clip (resize + center crop)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of random initialisations (random backbone with "
        "--pretrained none, inversion network without --weights)",
    )


def spec_from_args(args: argparse.Namespace, **changes):
    """The `ModelSpec` the flags of `add_model_args` describe (a preset resolved: args.backbone/pretrained/weights are
    updated, callers read them back). Without weights the inversion network is random: said on stderr."""
    from ..spec import ModelSpec

    spec = ModelSpec(
        backbone=args.backbone,
        pretrained=args.pretrained,
        weights=getattr(args, "weights", None),
        weights_revision=getattr(args, "weights_revision", None),
        device=args.device,
        preprocess=args.preprocess,
        seed=getattr(args, "seed", 0),
        model=getattr(args, "model", None),
        **changes,
    ).resolved()
    args.backbone, args.pretrained = spec.backbone, spec.pretrained
    if hasattr(args, "weights"):
        args.weights = spec.weights
    if spec.family == "fti4cir" and spec.weights is None:
        log.warning(
            "note: no --weights: the inversion network is randomly initialised (seed %s), so the pseudo "
            "words and rankings are meaningless; pass --weights or --model fti4cir-official",
            spec.seed,
        )
    return spec
