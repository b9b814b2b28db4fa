"""The benchmark suite: its helpers, and `python -m bench --quick` as the CI smoke run (every section runs, prints
its table and leaves bench/RESULTS.md alone)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import common
from conftest import shared_data

ROOT = Path(__file__).resolve().parents[1]


def test_markdown_table_formats_numbers_and_escapes_cells():
    table = common.markdown_table(
        [{"name": "a|b", "n": 1234567, "x": 0.012345, "big": 1234.5}, {"name": "c", "flag": True}]
    )
    lines = table.splitlines()
    assert lines[0] == "| name | n | x | big | flag |"
    assert lines[2] == "| a\\|b | 1,234,567 | 0.0123 | 1,234 |  |"
    assert lines[3] == "| c |  |  |  | True |"


def test_results_sections_are_replaced_one_at_a_time(tmp_path):
    path = tmp_path / "RESULTS.md"
    common.write_results_section(path, "Search", "table one")
    common.write_results_section(path, "Query latency", "```\n## not a heading\n```\ntable two")
    common.write_results_section(path, "Search", "table three")
    text = path.read_text()
    assert text.startswith(common.RESULTS_TITLE) and "Machine of the latest update" in text
    sections = dict(common._split_sections(text))
    assert list(sections) == ["Search", "Query latency"]
    assert sections["Search"].endswith("table three") and "table one" not in text
    assert "## not a heading" in sections["Query latency"]
    assert all(body.startswith("_Run ") for body in sections.values())


def test_round_robin_times_every_path_in_turns():
    calls = []
    wall, cpu = common.time_round_robin(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeat=3, warmup=1
    )
    assert calls == ["a", "b"] * 4
    assert [len(wall["a"]), len(wall["b"]), len(cpu["a"])] == [3, 3, 3]
    assert all(t >= 0 for t in wall["a"] + cpu["b"])


def test_percentile_interpolates_and_refuses_empty_input():
    assert common.percentile([1, 2, 3, 4], 50) == 2.5
    with pytest.raises(ValueError):
        common.percentile([], 50)


def test_query_benchmark_rows_on_the_tiny_backbone():
    from bench import bench_query

    rows, summary = bench_query.measure("fti4cir-tiny", repeat=2)
    assert summary.startswith("fti4cir-tiny: ours / floor ") and "goal <= 1.15" in summary
    by_path = {row["path"]: row for row in rows}
    ours, floor = by_path["ours: compose (uploaded)"], by_path["floor: encode_image"]
    assert float(ours["GFLOPs"]) > float(floor["GFLOPs"]) > 0  # ours adds the inversion and a text pass
    assert float(ours["weights read (M)"]) > float(floor["weights read (M)"])
    ratio = by_path["**ours / floor** (goal <= 1.15)"]
    assert ratio["p50 ms"].endswith("x") and float(ratio["p50 ms"][:-1]) > 0
    official = by_path["official: img_to_text"]
    assert float(official["GFLOPs"]) > float(ours["GFLOPs"])  # two visual passes and a 77-token text pass


def test_quick_run_of_every_benchmark():
    for folder in ("clothing/test", "imagenet-sample"):  # the indexing benchmark reads the shared photos
        shared_data("photos", *folder.split("/"))
    results = ROOT / "bench" / "RESULTS.md"
    before = results.read_bytes() if results.exists() else None
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for section in ("Query latency", "Indexing throughput", "Search", "Evaluation rerun", "Training step"):
        assert f"## {section}" in run.stdout
    assert run.stdout.count("| --- |") + run.stdout.count("|---|") >= 5  # a table per section
    assert (results.read_bytes() if results.exists() else None) == before
