"""`fti4cir` command line: one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import logging
import sys
from types import ModuleType

from .commands import (
    captions,
    convert,
    demo,
    deploy_space,
    evaluate,
    features,
    index,
    inspect,
    m2c_train,
    search,
    train,
    triplets,
)
from .errors import UserError

log = logging.getLogger("fti4cir.cli")  # also under python -m fti4cir.cli


# command -> (module whose `add_parser(subparsers)` registers it, the one-line help `fti4cir --help` lists). Command
# modules are light (each imports its heavy dependencies in its handler), so importing them all costs ~0.1 s; only the
# parser of the command being run is built. tests/test_cli_conventions.py checks the lines against the modules' help.
COMMANDS: dict[str, tuple[ModuleType, str]] = {
    "convert": (convert, "convert an official FTI4CIR release .pth to safetensors + JSON (safely)"),
    "inspect": (inspect, "decode one image's pseudo-word tokens"),
    "search": (search, "rank a gallery for a reference image (file or gallery image) and a text"),
    "deploy-space": (deploy_space, "upload the app to a Hugging Face Space (--dry-run: list and check only)"),
    "caption": (captions, "BLIP captions for a folder of images (resumable JSONL)"),
    "split-captions": (captions, "split captions into subject/attribute pairs (spaCy)"),
    "features": (features, "extract and cache visual features (one visual pass per image)"),
    "index": (index, "build or update a gallery: features, pseudo tokens, explanations, index"),
    "train": (train, "train the inversion network on subject/attribute pairs"),
    "evaluate": (
        evaluate,
        "FashionIQ / CIRR / CIRCO validation metrics (clothing-cir: test), all methods in one table",
    ),
    "submit": (evaluate, "CIRR / CIRCO test-server prediction files"),
    "triplets": (triplets, "synthetic composed-retrieval triplets from a labelled image folder (M2C stage II)"),
    "m2c-train": (m2c_train, "train M2C (From Mapping to Composing): stage 1 mapping, stage 2 composing adapters"),
    "convert-m2c": (convert, "convert an official M2C checkpoint (.pt) to our safetensors"),
    "demo-photos": (demo, "copy the clothing photos (<split>/<class>/*.jpg) into the repository, downscaled"),
    "demo-labels": (demo, "class and colour labels of the demo photos (labels.json)"),
    "demo-captions": (
        demo,
        "one caption per demo photo of a split (captions JSONL for split-captions / CLIP training)",
    ),
    "demo-benchmark": (
        demo,
        "the clothing-cir composed-retrieval benchmark from the test photos' labels (queries.json)",
    ),
    "demo-rebuild": (
        demo,
        "rebuild the embedded demo: CLIP -> captions -> FTI4CIR -> M2C -> gallery -> benchmark table (resumable)",
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `fti4cir` parser. With `command`, only that command's module is imported and its parser built; the other
    commands are listed by name and help line (what `fti4cir --help` needs). Without, every command is built."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="fti4cir", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        dest="verbosity",
        help="more log output (-v: debug messages of fti4cir, -vv: of every library)",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_const",
        const=-1,
        dest="verbosity",
        help="errors only on stderr (results still go to stdout)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if command is None:
        modules = dict.fromkeys(module for module, _ in COMMANDS.values())
    else:
        modules = [COMMANDS[command][0]] if command in COMMANDS else []
    for module in modules:
        module.add_parser(sub)
    for name, (_, summary) in COMMANDS.items():  # the rest: listed only
        if name not in sub.choices:
            sub.add_parser(name, help=summary, add_help=False)
    return parser


def _command_of(argv: list[str]) -> str | None:
    """The command named in argv: the first word that is not an option (the main parser's options take no value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def setup_logging(verbosity: int) -> None:
    """One logging set-up for every command: warnings and notices of fti4cir on stderr by default; -q errors only;
    -v fti4cir's debug messages; -vv every library's."""
    level = {-1: logging.ERROR, 0: logging.INFO, 1: logging.DEBUG}.get(verbosity, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s" if verbosity > 0 else "%(message)s"))
    root = logging.getLogger("fti4cir")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    if verbosity > 1:
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    elif verbosity < 0:
        logging.getLogger().setLevel(logging.ERROR)  # other libraries' warnings too


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command_of(argv) or "").parse_args(argv)  # no command: the listing only
    setup_logging(args.verbosity)
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
