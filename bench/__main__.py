"""Run every benchmark and collect the tables in bench/RESULTS.md: `python -m bench [--quick] [--only NAME ...]`.

--quick is a smoke run for CI (small sizes, nothing written to RESULTS.md); the full run takes roughly 20-30 minutes
on a 2-core machine.
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

from bench.common import write_results_section

# section title -> module; each module has run(quick) -> markdown
BENCHMARKS = {
    "Query latency": "bench.bench_query",
    "Indexing throughput": "bench.bench_indexing",
    "Search": "bench.bench_search",
    "Evaluation rerun": "bench.bench_eval_rerun",
    "Training step": "bench.train_step",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke sizes; RESULTS.md is left untouched")
    parser.add_argument("--only", nargs="*", choices=list(BENCHMARKS), help="run only these sections")
    args = parser.parse_args(argv)
    for section, module in BENCHMARKS.items():
        if args.only and section not in args.only:
            continue
        start = time.perf_counter()
        print(f"\n## {section}\n", flush=True)
        markdown = importlib.import_module(module).run(quick=args.quick)
        print(markdown)
        print(f"\n({time.perf_counter() - start:.0f} s)", flush=True)
        if not args.quick:
            write_results_section(Path(__file__).parent / "RESULTS.md", section, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
