"""Benchmark evaluation and test-server submissions (commands `fti4cir evaluate` / `fti4cir submit`, in
`fti4cir.commands.evaluate`): benchmark queries through the shared query path, cached visual features.

Pipeline: read the benchmark (annotations only) -> select queries and gallery -> check every needed image exists
(before any model work) -> visual features of references (with patch tokens) and gallery (global only) from the
on-disk feature cache -> pseudo tokens (inversion network) -> `compose(method=...)`, the function the app uses ->
similarities -> official metrics (evaluate) or server files (submit). Each method's declaration (`fti4cir.methods`)
says which model runs it, what it reads and its template per benchmark. With M2C weights, the M2C methods ("m2c",
"m2c+compose") run beside them in the same table: cached reference features (patch tokens included) -> `compose`
on the M2C model, with M2C's own preprocessing (and so its own cache entries) and the official M2C prompts and texts.

Caching. Features live in two `FeatureStore`s under `--cache-dir`, keyed by backbone, pretrained weights,
preprocessing (random backbones by a digest of their values) and file content. Reference images get patch tokens
(the inversion network needs them); the gallery keeps global features only (CIRCO's 120k images would need ~120 GB
of ViT-L patch tokens). A gallery image that is also a reference gets its global feature copied from the reference
store instead of a second visual pass. File content hashes are remembered by (path, size, mtime) in
`file_hashes.json`, so a rerun stats the gallery files instead of reading them. Reference pseudo tokens are cached
too, keyed by a digest of the inversion network's weights. A rerun with another prompt or method therefore runs only
the text encoder; with other inversion weights, the inversion network on cached visual features and the text
encoder.

Subset mode (`--max-queries`, `--subset-gallery`): the first N queries (per FashionIQ category) and/or a gallery cut
down to the images those queries use plus N distractors. For smoke tests and quick comparisons; the results are
marked "subset" and are not comparable to published numbers (a smaller gallery makes retrieval easier).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fti4cir import methods as registry
from fti4cir import prompts
from fti4cir.backbone import VisualFeatures
from fti4cir.compose import METHODS, compose_query
from fti4cir.digests import parameter_digest
from fti4cir.errors import UserError
from fti4cir.evaluation import intervals, metrics, submission
from fti4cir.evaluation.datasets import (
    FASHIONIQ_CATEGORIES,
    Benchmark,
    Query,
    check_images_exist,
    load_benchmark,
)
from fti4cir.features import FeatureStore, FileHashes, TokenCache, extract_features
from fti4cir.inversion import PseudoTokens
from fti4cir.m2c import M2CConfig, M2CModel
from fti4cir.tokens import ATTRS_FIELD, template_fields

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "cache/features"  # the `fti4cir features` default, so both commands share one cache
HASHES_FILE = "file_hashes.json"
REFERENCE_POLICY = {
    "fashioniq": "the reference image stays in the gallery (official FashionIQ code)",
    "cirr": "the reference image is removed from the ranking (official CIRR protocol)",
    "circo": "the reference image stays in the ranking (official CIRCO/FTI4CIR validation code)",
    "clothing-cir": "the reference image is removed from the ranking; a query's ground truths are every other "
    "photo of the split with the target class and colour",
}


# ---- queries and galleries ----------------------------------------------------------------------------------------
def _query_images(query: Query) -> list[str]:
    """Every image a query names: reference, target, ground truths, group members."""
    return [query.reference, *([query.target] if query.target is not None else []), *query.ground_truths, *query.group]


@dataclass
class Part:
    """One ranked gallery and its queries: a FashionIQ category, or a whole CIRR/CIRCO split."""

    name: str
    benchmark: Benchmark
    queries: list[Query]
    gallery: list[str]  # image names in the official gallery order (which decides ties)

    @property
    def subset(self) -> bool:
        return len(self.queries) < len(self.benchmark.queries) or len(self.gallery) < len(self.benchmark.images)

    def sizes(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "queries": len(self.queries),
            "queries_total": len(self.benchmark.queries),
            "gallery": len(self.gallery),
            "gallery_total": len(self.benchmark.images),
        }

    def needed_images(self) -> list[str]:
        """Gallery plus every image a selected query names (a name outside the gallery index counts as missing)."""
        return list(dict.fromkeys([*self.gallery, *(n for q in self.queries for n in _query_images(q))]))


def select(name: str, benchmark: Benchmark, max_queries: int | None = None, subset_gallery: int | None = None) -> Part:
    """The first `max_queries` queries; with `subset_gallery`, only the gallery images those queries use (reference,
    target, ground truths, group members) plus that many other gallery images, in official order."""
    queries = benchmark.queries[:max_queries] if max_queries is not None else list(benchmark.queries)
    gallery = list(benchmark.images)
    if subset_gallery is not None:
        used = {n for q in queries for n in _query_images(q)}
        distractors = [n for n in gallery if n not in used][:subset_gallery]
        keep = used | set(distractors)
        gallery = [n for n in gallery if n in keep]
    return Part(name, benchmark, queries, gallery)


def load_parts(
    dataset: str,
    root: str | Path,
    split: str,
    *,
    categories: Sequence[str] = FASHIONIQ_CATEGORIES,
    max_queries: int | None = None,
    subset_gallery: int | None = None,
) -> list[Part]:
    """Read and select the benchmark, then check that every needed image file exists (one UserError otherwise)."""
    if dataset == "fashioniq":
        parts = [select(c, load_benchmark(dataset, root, split, c), max_queries, subset_gallery) for c in categories]
    else:
        parts = [select(dataset, load_benchmark(dataset, root, split), max_queries, subset_gallery)]
    for part in parts:
        if not part.queries:
            raise UserError(f"{dataset} {split} {part.name}: no queries selected")
        check_images_exist(part.benchmark, part.needed_images())
    return parts


def query_texts(dataset: str, queries: Sequence[Query], method: str = "fti4cir") -> list[str | tuple[str, ...]]:
    """The texts `method` encodes: FashionIQ's two captions as the method declares (FTI4CIR: both caption orders,
    averaged by compose as the official code; M2C: "{cap2} and {cap1}", one order); else the one caption."""
    if dataset == "fashioniq":
        join = registry.get(method).fashioniq_text
        return [join(*q.texts) for q in queries]
    return [q.texts[0] for q in queries]


def resolve_prompt(value: str | None, dataset: str) -> str:
    """The fti4cir template: a name from `prompts.PROMPTS`, a template with `*` placeholders, or the dataset default."""
    if value is None:
        return prompts.PROMPTS.get(dataset, prompts.DEFAULT)
    template = prompts.PROMPTS.get(value, value)
    if "*" not in template or template_fields(template) - {ATTRS_FIELD} != {"text"}:
        raise UserError(
            f"--prompt must be one of {', '.join(prompts.PROMPTS)} or a template with '*' placeholders "
            f"and a {{text}} field (optionally {{attrs}}), got {value!r}"
        )
    return template


def method_prompts(methods: Sequence[str], fti4cir_prompt: str, dataset: str) -> dict[str, str]:
    """The template each template method encodes on `dataset` (`fti4cir_prompt` for the method that takes the
    user's); the other methods use no template."""
    chosen = {m: registry.get(m).template_for(dataset, fti4cir_prompt) for m in methods}
    return {m: template for m, template in chosen.items() if template is not None}


# ---- feature cache ------------------------------------------------------------------------------------------------
class FeatureCache:
    """Reference features (with patch tokens) and gallery features (global only) for one model, on disk."""

    def __init__(
        self,
        model,
        root: str | Path = DEFAULT_CACHE_DIR,
        *,
        batch_size: int = 32,
        num_workers: int | None = None,
        progress: bool = True,
        hashes: FileHashes | None = None,
    ):
        """hashes: the file-hash memo of another cache under the same root (one memo per file, so that neither
        overwrites what the other learnt)."""
        self.model, self.batch_size, self.num_workers, self.progress = model, batch_size, num_workers, progress
        self.root = Path(root)
        self.references = FeatureStore.for_model(root, model, with_patches=True)
        self.gallery = FeatureStore.for_model(root, model, with_patches=False)
        self.hashes = hashes if hashes is not None else FileHashes(Path(root) / HASHES_FILE)
        self.computed = 0  # images that went through the visual tower

    @functools.cached_property
    def tokens(self) -> TokenCache:
        """Pseudo tokens of the references, per inversion weights (FTI4CIR models only)."""
        return TokenCache(self.references.dir / f"tokens-{parameter_digest(self.model.inversion)[:16]}.safetensors")

    def _rows(self, paths: list[Path], store: FeatureStore, donor: FeatureStore | None = None) -> np.ndarray:
        """Rows of `paths` in `store`, computing (or copying from `donor`'s global features) what is absent."""
        hashes = self.hashes.known(paths)
        rows = store.lookup(hashes)
        if donor is not None:
            donor_rows = donor.lookup(hashes)
            copy = np.flatnonzero((rows < 0) & (donor_rows >= 0))
            if copy.size:
                features = VisualFeatures(donor.global_features(donor_rows[copy]), None)
                rows[copy] = store.add([hashes[i] for i in copy], features)
        todo = np.flatnonzero(rows < 0)
        if todo.size:
            todo_paths = [paths[i] for i in todo]
            result = extract_features(
                self.model,
                todo_paths,
                store,
                batch_size=self.batch_size,
                num_workers=self.num_workers,
                progress=self.progress,
            )
            self.computed += result.computed
            self.hashes.record(todo_paths, result.hashes)
            self.hashes.save()
            if result.failures:
                shown = "; ".join(message for _, message in result.failures[:5])
                raise UserError(f"{len(result.failures)} images could not be read: {shown}")
            rows[todo] = result.rows
        return rows

    def reference_features(self, rows: np.ndarray) -> VisualFeatures:
        """Visual features (with patch tokens, fp32, on the model's device) of rows from `reference_rows`."""
        cached = self.references.get(rows)
        return VisualFeatures(
            cached.global_features.to(self.model.device).float(), cached.patch_tokens.to(self.model.device).float()
        )

    def reference_rows(self, paths: list[Path]) -> np.ndarray:
        """Rows of the references in the reference store, computing what is absent."""
        return self._rows(paths, self.references)

    def reference_tokens(self, paths: list[Path]) -> PseudoTokens:
        """Pseudo tokens of each path: cached per inversion weights, else the inversion network on cached visual
        features (batched)."""
        rows = self.reference_rows(paths)
        hashes = [self.references.hash_of(r) for r in rows]
        missing = [h for h in dict.fromkeys(hashes) if h not in self.tokens]
        if missing:
            missing_rows = self.references.lookup(missing)
            batches = []
            with torch.inference_mode():
                for start in range(0, len(missing_rows), self.batch_size):
                    visual = self.reference_features(missing_rows[start : start + self.batch_size])
                    batches.append(self.model.invert(visual))
            self.tokens.add(missing, PseudoTokens.cat(batches))
        return self.tokens.get(hashes).to(self.model.device)

    def gallery_features(self, paths: list[Path]) -> torch.Tensor:
        """L2-normalised global features [N, E] on the model's device (the official gallery index)."""
        rows = self._rows(paths, self.gallery, donor=self.references)
        return F.normalize(self.gallery.global_features(rows).to(self.model.device), dim=-1)


@dataclass
class M2CSide:
    """The M2C methods of an evaluation: M2C weights on the same backbone, and the feature cache of M2C's
    preprocessing (the FTI4CIR cache itself when both preprocess alike)."""

    model: M2CModel
    cache: FeatureCache
    weights: str


# M2C's image preprocessing when --m2c-preprocess is not given: "clip" as the official M2C evaluation; on the demo's
# benchmark the transform its M2C was trained with (`fti4cir demo-rebuild`), so that `fti4cir evaluate` gives the
# model card's numbers
M2C_PREPROCESS = {"clothing-cir": "targetpad"}


def m2c_preprocess(dataset: str, chosen: str | None = None) -> str:
    return chosen or M2C_PREPROCESS.get(dataset, "clip")


def make_m2c_side(model, cache: FeatureCache, weights: str, preprocess: str = "clip") -> M2CSide:
    """The M2C side of an evaluation from a model built with M2C weights (`ModelSpec.m2c_weights`: its `.m2c` shares
    the backbone; `weights`: their file, for the report), with M2C's own `preprocess` (the official M2C evaluation:
    "clip"); its feature cache is the
    FTI4CIR cache when both preprocess alike, else a cache of M2C's preprocessing sharing the file-hash memo."""
    m2c_model = model.m2c
    if m2c_model is None:
        raise UserError("the M2C methods need M2C weights (--m2c-weights)")
    if m2c_model.preprocess_kind != preprocess:  # the same network on the same backbone, another image transform
        m2c_model = M2CModel(m2c_model.backbone, m2c_model.net, preprocess)
    if m2c_model.identity() != model.identity():
        cache = FeatureCache(
            m2c_model,
            cache.root,
            batch_size=cache.batch_size,
            num_workers=cache.num_workers,
            progress=cache.progress,
            hashes=cache.hashes,
        )
    return M2CSide(m2c_model, cache, str(weights))


# ---- queries -> similarities --------------------------------------------------------------------------------------
def query_features(
    model, references, reference_index: np.ndarray, texts: Sequence, method: str, prompt: str | None, batch_size: int
) -> torch.Tensor:
    """compose() over query batches: [Q, E] L2-normalised. references: the references' pseudo tokens, or a function
    (rows of `reference_index`) -> their visual features, for methods that read patch tokens."""
    out, truncated = [], 0
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            rows = reference_index[start : start + batch_size]
            batch = references(rows) if callable(references) else references[rows]
            composed = compose_query(
                model, batch, list(texts[start : start + batch_size]), method=method, prompt=prompt
            )
            out.append(composed.features)
            truncated += int(composed.truncated.sum())
    if truncated:
        log.warning("%s: %d of %d query texts were cut to fit CLIP's context", method, truncated, len(texts))
    return torch.cat(out).float()


def part_similarities(
    model,
    dataset: str,
    part: Part,
    cache: FeatureCache,
    templates: dict[str, str],
    methods: Sequence[str],
    batch_size: int,
    progress: bool = True,
    m2c_side: M2CSide | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """(method, similarity [queries, gallery]) for each method; visual features come from the cache(s). Each method
    runs on the model of its family (FTI4CIR's, or M2C's from `m2c_side`) with that model's cache, on the references'
    pseudo tokens, or on their cached visual features when it reads patch tokens."""
    images = part.benchmark.images
    references = list(dict.fromkeys(q.reference for q in part.queries))
    position = {name: i for i, name in enumerate(references)}
    reference_paths = [images[name] for name in references]
    gallery_paths = [images[name] for name in part.gallery]
    reference_index = np.array([position[q.reference] for q in part.queries])
    declared = {m: registry.get(m) for m in methods}
    sides = {"fti4cir": (model, cache), **({"m2c": (m2c_side.model, m2c_side.cache)} if m2c_side else {})}
    if any(d.family not in sides for d in declared.values()):
        raise UserError("the M2C methods need M2C weights (--m2c-weights)")
    inputs, galleries = {}, {}
    for family, (_, side_cache) in sides.items():
        used = [d for d in declared.values() if d.family == family]
        if not used:
            continue
        if any(not d.patch_tokens for d in used):
            inputs[family, False] = side_cache.reference_tokens(reference_paths)
        if any(d.patch_tokens for d in used):
            rows = side_cache.reference_rows(reference_paths)
            inputs[family, True] = lambda index, rows=rows, side_cache=side_cache: side_cache.reference_features(
                rows[index]
            )
        galleries[family] = side_cache.gallery_features(gallery_paths)
    for method in tqdm(methods, desc=f"{part.name} methods", disable=not progress):
        spec = declared[method]
        side_model, _ = sides[spec.family]
        features = query_features(
            side_model,
            inputs[spec.family, spec.patch_tokens],
            reference_index,
            query_texts(dataset, part.queries, method),
            method,
            templates.get(method),
            batch_size,
        )
        targets = galleries[spec.family]
        yield method, (features.to(targets.device) @ targets.T).cpu().numpy()


# ---- evaluate -----------------------------------------------------------------------------------------------------
def part_metrics(dataset: str, part: Part, similarity: np.ndarray) -> dict[str, float]:
    q = part.queries
    if dataset == "fashioniq":
        return metrics.fashioniq_recall(similarity, part.gallery, [x.target for x in q])
    if dataset == "cirr":
        result = metrics.cirr_metrics(
            similarity, part.gallery, [x.reference for x in q], [x.target for x in q], [x.group for x in q]
        )
        result["avg"] = mean((result["recall@5"], result["recall_subset@1"]))  # the CIRR paper's "Avg"
        return result
    if dataset == "clothing-cir":
        return metrics.clothing_cir_metrics(
            similarity, part.gallery, [x.reference for x in q], [x.ground_truths for x in q], [x.kind for x in q]
        )
    return metrics.circo_metrics(similarity, part.gallery, [x.target for x in q], [x.ground_truths for x in q])


def evaluate(
    model,
    dataset: str,
    parts: list[Part],
    cache: FeatureCache,
    *,
    methods: Sequence[str] = METHODS,
    prompt: str | None = None,
    batch_size: int = 32,
    weights: str | None = None,
    progress: bool = True,
    m2c_side: M2CSide | None = None,
) -> dict[str, Any]:
    """All `methods` on the same parts and cached features; returns the results object of `report`."""
    started = time.perf_counter()
    caches = [cache] + ([m2c_side.cache] if m2c_side is not None and m2c_side.cache is not cache else [])
    computed_before = sum(c.computed for c in caches)
    templates = method_prompts(methods, resolve_prompt(prompt, dataset), dataset)
    per_method: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for part in parts:
        for method, similarity in part_similarities(
            model, dataset, part, cache, templates, methods, batch_size, progress, m2c_side
        ):
            per_method[method][part.name] = part_metrics(dataset, part, similarity)
    if dataset == "fashioniq":
        results_by_method = {m: metrics.fashioniq_average(per_method[m]) for m in methods}
    else:
        results_by_method = {m: per_method[m][dataset] for m in methods}
    differences = paired_differences(results_by_method) if dataset == "clothing-cir" else []
    return {
        "dataset": dataset,
        "split": parts[0].benchmark.split,
        "protocol": "subset" if any(p.subset for p in parts) else "official",
        "parts": [p.sizes() for p in parts],
        "model": {
            **model.identity(),
            "weights": None if weights is None else str(weights),
            **({"m2c_weights": m2c_side.weights, "m2c_preprocess": m2c_side.model.preprocess_kind} if m2c_side else {}),
        },
        "prompts": templates,
        "reference_policy": REFERENCE_POLICY[dataset],
        "methods": results_by_method,
        **({"differences": [d.to_dict() for d in differences]} if differences else {}),
        "features": {
            "visual_passes": sum(c.computed for c in caches) - computed_before,
            "cache": str(cache.gallery.dir.parent),
        },
        "seconds": round(time.perf_counter() - started, 3),
    }


def comparison_pairs(methods: Sequence[str]) -> list[tuple[str, str]]:
    """The comparisons the demo's goals are about: fti4cir against every other method, m2c+compose against m2c."""
    pairs = [("fti4cir", m) for m in methods if m != "fti4cir"] if "fti4cir" in methods else []
    return pairs + ([("m2c+compose", "m2c")] if {"m2c", "m2c+compose"} <= set(methods) else [])


def paired_differences(results_by_method: dict[str, dict[str, Any]]) -> list[intervals.Difference]:
    """mAP@10 differences of `comparison_pairs` with paired-bootstrap intervals over the queries (clothing-cir)."""
    metric = metrics.CLOTHING_PAIRED_METRIC
    per_query = {m: values["per_query"][metric] for m, values in results_by_method.items()}
    return intervals.compare(per_query, comparison_pairs(list(results_by_method)), metric)


def m2c_methods(methods: Sequence[str]) -> list[str]:
    """The methods of `methods` that run on the M2C model."""
    return [m for m in methods if registry.get(m).family == "m2c"]


def default_methods(m2c_config: M2CConfig | None) -> list[str]:
    """FTI4CIR's five methods, plus the M2C methods that weights of `m2c_config` (if any) can run."""
    return list(registry.runnable({"fti4cir": True, "m2c": m2c_config}))


def check_m2c_methods(methods: Sequence[str], config: M2CConfig | None, weights: str | None) -> None:
    """The M2C methods asked for must be runnable with the given weights (checked before any model work)."""
    wanted = m2c_methods(methods)
    if wanted and config is None:
        raise UserError(
            f"method {', '.join(wanted)} needs --m2c-weights: an M2C .safetensors written by "
            "`fti4cir m2c-train` (stage 2 for m2c+compose)"
        )
    missing = [m for m in wanted if not registry.get(m).available(config)]
    if missing:
        raise UserError(
            f"{weights} holds stage-I M2C weights (no composing adapters); {', '.join(missing)} needs "
            "the weights of `fti4cir m2c-train --stage 2`"
        )


# ---- submit -------------------------------------------------------------------------------------------------------
def write_submission(dataset: str, part: Part, similarity: np.ndarray, out: Path, name: str) -> list[Path]:
    """The official server files, validated (format, no duplicates, reference excluded); returns their paths.

    CIRR: `<out>/cirr/<name>.json` (recall, top 50) and `<out>/cirr/subset_<name>.json` (recall_subset, top 3);
    CIRCO: `<out>/circo/<name>.json` (top 50). File names follow the FTI4CIR release.
    """
    q = part.queries
    ids = [x.query_id for x in q]
    references = [x.reference for x in q]
    try:
        if dataset == "cirr":
            groups = [x.group for x in q]
            recall, subset = submission.cirr_submission(
                ids, *submission.cirr_rankings(similarity, part.gallery, references, groups)
            )
            for obj, metric in ((recall, "recall"), (subset, "recall_subset")):
                submission.validate_cirr_submission(
                    obj, metric, ids, references=dict(zip(ids, references)), groups=dict(zip(ids, groups))
                )
            files = {out / "cirr" / f"{name}.json": recall, out / "cirr" / f"subset_{name}.json": subset}
        else:
            ranked = submission.circo_rankings(similarity, part.gallery, references)
            obj = submission.circo_submission(ids, ranked)
            submission.validate_circo_submission(obj, ids, references=dict(zip(ids, references)))
            files = {out / "circo" / f"{name}.json": obj}
    except ValueError as error:  # e.g. a gallery too small for a top-50 list
        raise UserError(f"cannot build the {dataset} submission: {error}") from None
    for path, obj in files.items():
        submission.write_json_atomic(path, obj)
    return list(files)
