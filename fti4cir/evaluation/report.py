"""Evaluation results as JSON and as one Markdown table (methods as rows, the benchmark's metrics as columns).

The results object (written by :mod:`fti4cir.evaluation.run`) holds ``dataset``, ``split``, ``protocol``
("official" or "subset"), ``parts`` (per FashionIQ category, or one entry: query and gallery sizes used / total),
``model``, ``prompts``, ``methods`` (method -> metrics, FashionIQ: method -> category/"average" -> metrics),
``features`` (visual passes run) and ``seconds``. Metrics are percentages. clothing-cir metrics also hold
``by_type`` (query type -> its query count and metrics), shown as a second table with one row per method and type,
and ``per_query`` (each query's AP@10); their results add ``differences`` (mAP@10 of fti4cir minus each other
method, and of m2c+compose minus m2c, with paired-bootstrap intervals), shown as a third table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fti4cir.atomic import write_json_atomic, write_text_atomic

JSON_NAME = "results.json"
MARKDOWN_NAME = "results.md"
_TITLES = {"fashioniq": "FashionIQ", "cirr": "CIRR", "circo": "CIRCO", "clothing-cir": "clothing-cir"}


def metric_columns(results: Mapping[str, Any]) -> list[tuple[str, tuple[str, ...]]]:
    """(column header, key path into one method's metrics) for the table, in the papers' column order."""
    dataset = results["dataset"]
    if dataset == "fashioniq":
        categories = [part["name"] for part in results["parts"]]
        columns = [(f"{c} R@{k}", (c, f"recall@{k}")) for c in categories for k in (10, 50)]
        return columns + [
            ("avg R@10", ("average", "recall@10")),
            ("avg R@50", ("average", "recall@50")),
            ("avg", ("average", "mean")),
        ]
    if dataset == "cirr":
        return [
            *((f"R@{k}", (f"recall@{k}",)) for k in (1, 5, 10, 50)),
            *((f"Rs@{k}", (f"recall_subset@{k}",)) for k in (1, 2, 3)),
            ("avg", ("avg",)),
        ]
    if dataset == "circo":
        return [
            *((f"mAP@{k}", (f"map@{k}",)) for k in (5, 10, 25, 50)),
            *((f"R@{k}", (f"recall@{k}",)) for k in (5, 10, 25, 50)),
        ]
    if dataset == "clothing-cir":
        return [
            *((f"mAP@{k}", (f"map@{k}",)) for k in (5, 10, 25)),
            *((f"R@{k}", (f"recall@{k}",)) for k in (1, 5, 10)),
        ]
    raise ValueError(f"unknown dataset {dataset!r}")


def _lookup(metrics: Mapping[str, Any], path: Sequence[str]) -> float:
    value: Any = metrics
    for key in path:
        value = value[key]
    return float(value)


def _scope(results: Mapping[str, Any]) -> str:
    """One line on what was evaluated, loud when the run is a subset."""
    sizes = "; ".join(
        f"{part['name']}: {part['queries']} of {part['queries_total']} queries, "
        f"gallery {part['gallery']} of {part['gallery_total']} images"
        for part in results["parts"]
    )
    if results["protocol"] == "subset":
        return (
            f"**Subset run, not comparable to published numbers** ({sizes}). Fewer queries change the "
            f"average; a smaller gallery makes retrieval easier."
        )
    return f"Official protocol ({sizes})."


def to_markdown(results: Mapping[str, Any]) -> str:
    """A heading, the scope line, the model line and the methods table."""
    columns = metric_columns(results)
    model = results.get("model", {})
    weights = model.get("weights") or "random inversion network"
    pretrained = model.get("pretrained")
    clip_weights = "random weights" if pretrained in (None, "None") else pretrained
    lines = [
        f"### {_TITLES[results['dataset']]} {results['split']}",
        "",
        _scope(results),
        "",
        f"Backbone {model.get('backbone')} ({clip_weights}), weights: {weights}, "
        f"preprocessing {model.get('preprocess')}; {results.get('reference_policy', '')}",
        "",
        "| method | " + " | ".join(header for header, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for method, metrics in results["methods"].items():
        cells = " | ".join(f"{_lookup(metrics, path):.2f}" for _, path in columns)
        lines.append(f"| {method} | {cells} |")
    by_type = [
        (method, kind, values)
        for method, metrics in results["methods"].items()
        for kind, values in metrics.get("by_type", {}).items()
    ]
    if by_type:
        lines += [
            "",
            "Per query type:",
            "",
            "| method | type | queries | " + " | ".join(header for header, _ in columns) + " |",
            "|---|---|---:|" + "---:|" * len(columns),
        ]
        for method, kind, values in by_type:
            cells = " | ".join(f"{_lookup(values, path):.2f}" for _, path in columns)
            lines.append(f"| {method} | {kind} | {values['queries']} | {cells} |")
    differences = results.get("differences", [])
    if differences:
        first = differences[0]
        headers = {path: header for header, path in columns}
        lines += [
            "",
            f"Differences in {headers[(first['metric'],)]}, query by query, with {first['level']:.0%} "
            f"intervals (paired bootstrap over the {first['queries']} queries, {first['resamples']:,} resamples; "
            "they cover the choice of queries, not of photos):",
            "",
            "| comparison | difference | interval |",
            "|---|---:|---|",
        ]
        lines += [
            f"| {d['better']} - {d['other']} | {d['difference']:+.2f} | {d['low']:+.2f} to {d['high']:+.2f} |"
            for d in differences
        ]
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | Path, results: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` atomically into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    json_path, markdown_path = out_dir / JSON_NAME, out_dir / MARKDOWN_NAME
    write_json_atomic(json_path, results)
    write_text_atomic(markdown_path, to_markdown(results))
    return json_path, markdown_path
