"""95% intervals of the demo's measurements: Wilson for accuracies, a paired bootstrap for method differences."""

from __future__ import annotations

import numpy as np
import pytest

from fti4cir.evaluation.intervals import compare, paired_bootstrap, wilson_interval
from fti4cir.evaluation.report import to_markdown


def test_wilson_interval_matches_the_textbook_values_and_is_symmetric():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    low, high = wilson_interval(254, 372)
    assert wilson_interval(372 - 254, 372) == pytest.approx((1 - high, 1 - low))
    assert low < 254 / 372 < high
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_wilson_interval_covers_the_true_proportion_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    draws = rng.binomial(200, 0.3, size=2000)
    covered = np.mean([low <= 0.3 <= high for low, high in (wilson_interval(int(k), 200) for k in draws)])
    assert 0.93 <= covered <= 0.97


def test_paired_bootstrap_interval_is_the_standard_error_of_the_paired_difference():
    rng = np.random.default_rng(1)
    shared = rng.normal(50, 30, size=400)  # what both methods share (the query's difficulty) cancels out
    a, b = shared + rng.normal(3, 5, size=400), shared
    difference, low, high = paired_bootstrap(a, b)
    spread = np.std(a - b) / np.sqrt(400)
    assert difference == pytest.approx(np.mean(a - b))
    assert high - low == pytest.approx(2 * 1.96 * spread, rel=0.1)
    assert paired_bootstrap(a, b) == paired_bootstrap(a, b)  # seeded
    assert paired_bootstrap(a, a) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        paired_bootstrap([], [])


def test_compare_refuses_unpaired_methods_and_the_report_shows_each_difference():
    per_query = {"fti4cir": [40.0, 60.0, 10.0], "text-only": [20.0, 50.0, 10.0], "m2c": [1.0, 2.0]}
    with pytest.raises(ValueError, match="not paired"):
        compare(per_query, [("fti4cir", "m2c")], "map@10")
    (difference,) = compare(per_query, [("fti4cir", "text-only")], "map@10", resamples=500)
    assert difference.difference == pytest.approx(10.0) and difference.resamples == 500
    results = {
        "dataset": "clothing-cir",
        "split": "test",
        "protocol": "official",
        "parts": [{"name": "clothing-cir", "queries": 3, "queries_total": 3, "gallery": 5, "gallery_total": 5}],
        "methods": {
            m: {k: 0.0 for k in ("map@5", "map@10", "map@25", "recall@1", "recall@5", "recall@10")}
            for m in ("fti4cir", "text-only")
        },
        "differences": [difference.to_dict()],
    }
    markdown = to_markdown(results)
    assert f"| fti4cir - text-only | +10.00 | {difference.low:+.2f} to {difference.high:+.2f} |" in markdown
    assert "paired bootstrap over the 3 queries, 500 resamples" in markdown
