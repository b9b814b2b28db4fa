"""`python -m fti4cir.commands.fuzz`: the property-based fuzzing of `fti4cir.fuzz` over many generated inputs (a
development tool: it needs hypothesis, requirements-dev.txt).

    python -m fti4cir.commands.fuzz --examples 2000                  # every target, 2000 generated inputs each
    python -m fti4cir.commands.fuzz --examples 500 --target pickles   # one target
"""

from __future__ import annotations

import argparse
import sys
import time

TARGETS = ("images", "texts", "configs", "pickles")  # = fti4cir.fuzz.TARGETS (that module imports hypothesis)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fti4cir.commands.fuzz",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--examples", type=int, default=200, help="generated inputs per target (default 200)")
    parser.add_argument("--target", action="append", choices=TARGETS, help="only these targets (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import logging
    import warnings

    from ..fuzz import run_target

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    failed = 0
    with warnings.catch_warnings():  # hostile inputs make libraries warn; only the properties' outcomes matter here
        warnings.simplefilter("ignore")
        for target in args.target or TARGETS:
            start = time.perf_counter()
            tally = run_target(target, args.examples)
            outcomes = ", ".join(f"{k} {v}" for k, v in sorted(tally.outcomes.items()))
            print(
                f"{target}: {tally.examples} inputs ({outcomes}) in {time.perf_counter() - start:.0f} s: "
                f"{'FAILED' if tally.failure else 'no failure'}",
                flush=True,
            )
            if tally.failure:
                failed += 1
                print(tally.failure, flush=True)
    logging.disable(previous)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
