"""Search benchmark (issue 6, item 4): exact faiss scan vs the automatically chosen approximate index, side by side.

For 10k, 100k and 1M synthetic unit vectors of dimension 512 and 768 (--quick: 10k and 50k): build time, index size,
p50/p95 latency of single queries, recall@10 against the exact scan for image-like and text-like queries, and the
exact/approximate latency ratio. Goal at 1M: p50 < 20 ms with recall@10 >= 0.95.

Synthetic data (no real features at this scale here): a mixture of gaussians on the sphere shaped like CLIP image
features. Each vector is normalise(0.63 u + 0.45 topic + 0.45 cluster + 0.3 low-rank + 0.33 isotropic) with unit-norm
parts: u is a direction shared by all (CLIP features sit in a narrow cone), 100 topic directions, one centre per ~100
vectors (cluster sizes Zipf-distributed, exponent 0.8), a shared rank-64 subspace of within-cluster variation and
isotropic noise. This gives mean pairwise cosine ~0.4 and nearest-neighbour cosine ~0.84, close to CLIP ViT image
galleries. Image-like queries are held-out vectors of the same mixture. Text-like queries stand for composed CIR
queries, which are text features: normalise(0.35 image-like + 0.8 gap + 0.45 noise), where `gap` is one fixed
direction (the modality gap): their best match has cosine ~0.3, like CLIP text-to-image similarities. Approximate
indexes have more trouble with these out-of-distribution queries, so both recalls are reported.

Run: `python -m bench.bench_search [--quick]` (the full run writes the "Search" section of bench/RESULTS.md).
"""

from __future__ import annotations

import gc
import itertools
import time

import numpy as np

from bench.common import bench_main, machine_info, markdown_table, percentile, time_calls
from fti4cir.search import EXACT_MAX_VECTORS, VectorIndex, choose_index_spec, set_num_threads

K = 10
RECALL_QUERIES = 500  # per query type
GOAL_P50_MS, GOAL_RECALL = 20.0, 0.95


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x /= np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    return x


def clip_like_vectors(n: int, dim: int, *, seed: int = 0, chunk: int = 65_536) -> np.ndarray:
    """[n, dim] float32 unit vectors shaped like CLIP image features (see the module docstring)."""
    rng = np.random.default_rng(seed)
    n_topics, cluster_size, rank = 100, 100, 64
    n_clusters = max(1, n // cluster_size)
    shared = _unit_rows(rng.standard_normal((1, dim), dtype=np.float32))
    topics = _unit_rows(rng.standard_normal((n_topics, dim), dtype=np.float32))
    centres = (
        0.63 * shared
        + 0.45 * topics[rng.integers(0, n_topics, n_clusters)]
        + 0.45 * _unit_rows(rng.standard_normal((n_clusters, dim), dtype=np.float32))
    ).astype(np.float32)
    basis = _unit_rows(rng.standard_normal((rank, dim), dtype=np.float32)) * np.float32(0.3 / np.sqrt(rank))
    cluster_cdf = np.cumsum(1.0 / np.arange(1, n_clusters + 1) ** 0.8)
    cluster_cdf /= cluster_cdf[-1]
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):  # chunked: no full-size temporaries at 1M x 768
        m = min(chunk, n - start)
        cluster = np.minimum(np.searchsorted(cluster_cdf, rng.random(m)), n_clusters - 1)
        x = rng.standard_normal((m, dim), dtype=np.float32)
        x *= np.float32(0.33 / np.sqrt(dim))
        x += rng.standard_normal((m, rank), dtype=np.float32) @ basis
        x += centres[cluster]
        out[start : start + m] = _unit_rows(x)
    return out


def text_like_queries(image_like: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Queries offset by one fixed 'modality gap' direction plus noise (see the module docstring)."""
    rng = np.random.default_rng(seed)
    dim = image_like.shape[1]
    gap = _unit_rows(rng.standard_normal((1, dim), dtype=np.float32))
    noise = rng.standard_normal(image_like.shape, dtype=np.float32) / np.float32(np.sqrt(dim))
    return _unit_rows(0.35 * image_like + 0.8 * gap + 0.45 * noise)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = (found[:, :, None] == truth[:, None, :]).any(axis=2) & (found >= 0)
    return float(hits.sum() / truth.size)


def _single_query_ms(index: VectorIndex, queries: np.ndarray, repeat: int) -> list[float]:
    rows = itertools.cycle(range(len(queries)))
    return [1e3 * s for s in time_calls(lambda: index.search(queries[next(rows)][None], K), repeat=repeat, warmup=3)]


def _measure_index(index: VectorIndex, build_s: float, queries: dict, repeat: int) -> tuple[dict, dict]:
    """Row of measurements, and the top-k ids per query type (for recall)."""
    found = {name: index.search(q, K)[1] for name, q in queries.items()}
    latency = _single_query_ms(index, np.concatenate(list(queries.values())), repeat)
    row = {
        "index": index.spec.describe(),
        "build s": build_s,
        "size MB": index.nbytes() / 1e6,
        "p50 ms": percentile(latency, 50),
        "p95 ms": percentile(latency, 95),
    }
    return row, found


def measure(n: int, dim: int, *, seed: int = 0) -> list[dict]:
    """Exact and approximate index on the same n vectors and queries: two rows plus the comparison."""
    data = clip_like_vectors(n + RECALL_QUERIES, dim, seed=seed)
    base = data[:n]
    queries = {"image": data[n:], "text": text_like_queries(data[n:], seed=seed + 1)}
    rows = []
    for kind in ("exact", "approximate"):
        spec = choose_index_spec(n, dim, kind)
        start = time.perf_counter()
        index = VectorIndex.build(base, spec, seed=seed)
        build_s = time.perf_counter() - start
        # The exact scan reads every vector per query (~0.3 s at 1M x 768): fewer timed calls at that size.
        repeat = 200 if kind != "exact" else max(20, min(200, int(2e9 / (n * dim))))
        row, found = _measure_index(index, build_s, queries, repeat)
        if kind == "exact":
            truth = found
        row.update(
            {
                "n": n,
                "dim": dim,
                "auto picks": "yes" if choose_index_spec(n, dim).kind == spec.kind else "",
                "recall@10 image": _recall(found["image"], truth["image"]),
                "recall@10 text": _recall(found["text"], truth["text"]),
            }
        )
        rows.append(row)
        del index
        gc.collect()
    exact, approx = rows
    approx["exact/approx p50"] = exact["p50 ms"] / approx["p50 ms"]
    return rows


COLUMNS = [
    "n",
    "dim",
    "index",
    "auto picks",
    "build s",
    "size MB",
    "p50 ms",
    "p95 ms",
    "recall@10 image",
    "recall@10 text",
    "exact/approx p50",
]


def run(quick: bool = False) -> str:
    threads = set_num_threads()
    sizes = [10_000, 50_000] if quick else [10_000, 100_000, 1_000_000]
    rows = []
    for n in sizes:
        for dim in (512, 768):
            start = time.perf_counter()
            rows += measure(n, dim)
            print(f"search benchmark: n={n:,} dim={dim} done in {time.perf_counter() - start:.0f} s", flush=True)
    info = machine_info()
    return (
        f"faiss-cpu with {threads} OpenMP threads; 1-min load average {info['load_average_1min']} on "
        f"{info['usable_cores']} cores at the end (other jobs inflate absolute latencies, exact scans most). Synthetic "
        f"CLIP-like unit vectors (mixture of gaussians on the sphere; see bench/bench_search.py), {RECALL_QUERIES} "
        f"image-like and {RECALL_QUERIES} text-like (modality-gap) queries; recall@{K} against the exact scan on the "
        f"same queries; latency = single queries through `VectorIndex.search` (both query types); size = bytes of the "
        f"saved index. `auto picks` marks what `choose_index_spec` uses at that size (exact below "
        f"{EXACT_MAX_VECTORS:,} vectors).\n\n{_verdict(rows, max(sizes))}\n\n" + markdown_table(rows, COLUMNS)
    )


def _verdict(rows: list[dict], n: int) -> str:
    parts = []
    for row in rows:
        if row["n"] == n and row["index"] != "exact":
            recall = min(row["recall@10 image"], row["recall@10 text"])
            met = row["p50 ms"] < GOAL_P50_MS and recall >= GOAL_RECALL
            parts.append(
                f"dim {row['dim']}: p50 {row['p50 ms']:.1f} ms, recall@10 {recall:.3f} ({'met' if met else 'NOT met'})"
            )
    return f"Goal at {n:,} vectors: p50 < {GOAL_P50_MS:.0f} ms with recall@10 >= {GOAL_RECALL}. {'; '.join(parts)}."


def main(argv=None) -> None:
    bench_main(run, "Search", __doc__, argv)


if __name__ == "__main__":
    main()
