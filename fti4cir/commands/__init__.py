"""The `fti4cir` subcommands: one module per command (or per family of commands), each with `add_parser(subparsers)`
that registers its parser and a handler `run(args) -> int`.

Layering: this package is the top of the library (only `app.py` sits beside it). Library modules never import it and
hold no argparse. A command module imports nothing heavy at module level (torch, open_clip, the library's model
code are imported inside its handler), so `fti4cir --help` and `fti4cir CMD --help` answer in well under a second.
Shared flags and argparse types: `fti4cir.commands.common`.
"""
