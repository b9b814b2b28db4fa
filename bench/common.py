"""Helpers shared by the benchmarks: machine description, timing, percentiles, Markdown tables, RESULTS.md updates."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np

from fti4cir.atomic import write_text_atomic

RESULTS_TITLE = "# Benchmark results"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict:
    """What the numbers depend on: CPU, usable cores, library versions, thread counts, date (UTC, ISO 8601)."""
    import faiss  # imported here: fti4cir.search must load faiss first (it picks faiss' OpenBLAS kernels)
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "load_average_1min": round(load, 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "faiss": _version("faiss-cpu"),
        "numpy": np.__version__,
        "open_clip": _version("open_clip_torch"),
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def time_calls(fn: Callable[[], object], *, repeat: int, warmup: int = 1) -> list[float]:
    """Seconds per call of `fn` (time.perf_counter), `warmup` untimed calls first."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def time_round_robin(
    fns: dict[str, Callable[[], object]], *, repeat: int, warmup: int = 1
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(wall seconds, CPU seconds of this process) per call of each function, timed in turns (one call of each per
    round) so that a change of machine load hits every path alike; `warmup` untimed rounds first."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start_cpu, start = time.process_time(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def percentile(xs, p: float) -> float:
    """The p-th percentile (0-100, linear interpolation) of a non-empty sequence."""
    if len(xs) == 0:
        raise ValueError("percentile of an empty sequence")
    return float(np.percentile(np.asarray(xs, dtype=np.float64), p))


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not np.isfinite(value):
            return str(value)
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A GitHub Markdown table; columns default to the keys of the rows in first-seen order. Numbers get 3
    significant digits (no decimals from 100 on, thousands separated); missing cells stay empty."""
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _split_sections(text: str) -> list[tuple[str, str]]:
    """(title, body) for each "## title" section of `text`; headings inside code fences do not count."""
    sections: list[tuple[str, list[str]]] = []
    in_fence = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        if not in_fence and line.startswith("## "):
            sections.append((line[3:].strip(), []))
        elif sections:
            sections[-1][1].append(line)
    return [(title, "\n".join(body).strip("\n")) for title, body in sections]


def _header(info: dict) -> str:
    machine = (
        f"{info['cpu']}, {info['usable_cores']} usable of {info['cores']} cores; torch {info['torch']} "
        f"({info['torch_threads']} threads), faiss {info['faiss']} ({info['faiss_threads']} threads), "
        f"numpy {info['numpy']}, Python {info['python']}"
    )
    return (
        f"{RESULTS_TITLE}\n\nWritten by `python -m bench` (one section per benchmark, each rewritten by its own "
        f"run; the line under each heading says when and at what load it ran).\n\n"
        f"Machine of the latest update: {machine}.\n"
    )


def write_results_section(path: Path, section: str, markdown: str) -> None:
    """Replace the "## {section}" of the results file at `path` (or append it), keeping the other sections; the
    header describes this machine, the section gets a line with the date and load. Atomic write."""
    path = Path(path)
    info = machine_info()
    sections = dict(_split_sections(path.read_text(encoding="utf-8"))) if path.is_file() else {}
    run_line = f"_Run {info['date']}, 1-min load average {info['load_average_1min']} on {info['usable_cores']} cores._"
    sections[section] = f"{run_line}\n\n{markdown.strip()}"
    body = "\n\n".join(f"## {title}\n\n{text}" for title, text in sections.items())
    write_text_atomic(path, f"{_header(info)}\n{body}\n")


def bench_main(run, section: str, description: str, argv=None) -> None:
    """The command line every benchmark module shares: `--quick` for a smoke run (RESULTS.md untouched), otherwise
    the section is written to bench/RESULTS.md."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke sizes; RESULTS.md is left untouched")
    args = parser.parse_args(argv)
    markdown = run(args.quick)
    print(markdown)
    if not args.quick:
        write_results_section(Path(__file__).parent / "RESULTS.md", section, markdown)
