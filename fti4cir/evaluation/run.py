"""`fti4cir evaluate` and `fti4cir submit`: benchmark queries through the shared query path, cached visual features.

Pipeline: read the benchmark (annotations only) -> select queries and gallery -> check every needed image exists
(before any model work) -> visual features of references (with patch tokens) and gallery (global only) from the
on-disk feature cache -> pseudo tokens (inversion network) -> `compose(method=...)`, the function the app uses ->
similarities -> official metrics (evaluate) or server files (submit). With `--m2c-weights`, the M2C methods ("m2c",
"m2c+compose") run beside them in the same table: cached reference features (patch tokens included) ->
`m2c_compose`, with M2C's own preprocessing (and so its own cache entries) and the official M2C prompts.

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

import argparse
import functools
import sys
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

from fti4cir import prompts
from fti4cir.backbone import VisualFeatures
from fti4cir.cli import non_negative_int, positive_int
from fti4cir.compose import METHODS, compose
from fti4cir.errors import UserError
from fti4cir.evaluation import metrics, submission
from fti4cir.evaluation.datasets import (
    FASHIONIQ_CATEGORIES,
    Benchmark,
    Query,
    check_images_exist,
    load_benchmark,
)
from fti4cir.evaluation.report import to_markdown, write_report
from fti4cir.features import FeatureStore, FileHashes, TokenCache, extract_features
from fti4cir.inversion import PseudoTokens
from fti4cir.m2c import model as m2c
from fti4cir.tokens import ATTRS_FIELD, template_fields
from fti4cir.weights import parameter_digest

DEFAULT_CACHE_DIR = "cache/features"  # the `fti4cir features` default, so both commands share one cache
HASHES_FILE = "file_hashes.json"
ALL_METHODS = (*METHODS, *m2c.M2C_METHODS)
REFERENCE_POLICY = {
    "fashioniq": "the reference image stays in the gallery (official FashionIQ code)",
    "cirr": "the reference image is removed from the ranking (official CIRR protocol)",
    "circo": "the reference image stays in the ranking (official CIRCO/FTI4CIR validation code)",
    "clothing-cir": "the reference image is removed from the ranking; a query's ground truths are every other test "
                    "photo of the target class and colour",
}
EVALUATE_SPLITS = {"fashioniq": ("val",), "cirr": ("val",), "circo": ("val",), "clothing-cir": ("test",)}


# ---- queries and galleries ----------------------------------------------------------------------------------------
def _query_images(query: Query) -> list[str]:
    """Every image a query names: reference, target, ground truths, group members."""
    return [query.reference, *([query.target] if query.target is not None else []), *query.ground_truths,
            *query.group]


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
        return {"name": self.name, "queries": len(self.queries), "queries_total": len(self.benchmark.queries),
                "gallery": len(self.gallery), "gallery_total": len(self.benchmark.images)}

    def needed_images(self) -> list[str]:
        """Gallery plus every image a selected query names (a name outside the gallery index counts as missing)."""
        return list(dict.fromkeys([*self.gallery, *(n for q in self.queries for n in _query_images(q))]))


def select(name: str, benchmark: Benchmark, max_queries: int | None = None,
           subset_gallery: int | None = None) -> Part:
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


def load_parts(dataset: str, root: str | Path, split: str, *, categories: Sequence[str] = FASHIONIQ_CATEGORIES,
               max_queries: int | None = None, subset_gallery: int | None = None) -> list[Part]:
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


def query_texts(dataset: str, queries: Sequence[Query]) -> list[str | tuple[str, str]]:
    """FashionIQ: both caption orders (compose averages them, as the official code); else the one caption."""
    if dataset == "fashioniq":
        return [prompts.fashioniq_texts(*q.texts) for q in queries]
    return [q.texts[0] for q in queries]


def resolve_prompt(value: str | None, dataset: str) -> str:
    """The fti4cir template: a name from `prompts.PROMPTS`, a template with `*` placeholders, or the dataset default."""
    if value is None:
        return prompts.PROMPTS.get(dataset, prompts.DEFAULT)
    template = prompts.PROMPTS.get(value, value)
    if "*" not in template or template_fields(template) - {ATTRS_FIELD} != {"text"}:
        raise UserError(f"--prompt must be one of {', '.join(prompts.PROMPTS)} or a template with '*' placeholders "
                        f"and a {{text}} field (optionally {{attrs}}), got {value!r}")
    return template


def method_prompts(methods: Sequence[str], fti4cir_prompt: str, dataset: str) -> dict[str, str]:
    """The template each pseudo-token method encodes (the other methods use no template)."""
    chosen = {"fti4cir": fti4cir_prompt, "subject-only": prompts.SUBJECT_ONLY,
              **{method: m2c.PROMPTS.get(dataset, m2c.PROMPTS["default"]) for method in m2c.M2C_METHODS}}
    return {m: chosen[m] for m in methods if m in chosen}


def m2c_query_texts(dataset: str, queries: Sequence[Query]) -> list[str]:
    """The official M2C texts: FashionIQ "{cap2} and {cap1}" (one order, no averaging), else the caption."""
    if dataset == "fashioniq":
        return [m2c.fashioniq_text(*q.texts) for q in queries]
    return [q.texts[0] for q in queries]


# ---- feature cache ------------------------------------------------------------------------------------------------
class FeatureCache:
    """Reference features (with patch tokens) and gallery features (global only) for one model, on disk."""

    def __init__(self, model, root: str | Path = DEFAULT_CACHE_DIR, *, batch_size: int = 32,
                 num_workers: int | None = None, progress: bool = True, hashes: FileHashes | None = None):
        """hashes: the file-hash memo of another cache under the same root (one memo per file, so that neither
        overwrites what the other learnt)."""
        self.model, self.batch_size, self.num_workers, self.progress = model, batch_size, num_workers, progress
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
            result = extract_features(self.model, todo_paths, store, batch_size=self.batch_size,
                                      num_workers=self.num_workers, progress=self.progress)
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
        return VisualFeatures(cached.global_features.to(self.model.device).float(),
                              cached.patch_tokens.to(self.model.device).float())

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
                    visual = self.reference_features(missing_rows[start:start + self.batch_size])
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

    model: m2c.M2CModel
    cache: FeatureCache
    weights: str


# ---- queries -> similarities --------------------------------------------------------------------------------------
def query_features(model, tokens: PseudoTokens, reference_index: np.ndarray, texts: Sequence, method: str,
                   prompt: str | None, batch_size: int) -> torch.Tensor:
    """compose() over query batches: [Q, E] L2-normalised."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokens[reference_index[start:start + batch_size]]
            out.append(compose(model, batch, list(texts[start:start + batch_size]), method=method, prompt=prompt))
    return torch.cat(out).float()


def m2c_query_features(side: M2CSide, rows: np.ndarray, reference_index: np.ndarray, texts: Sequence[str],
                       method: str, prompt: str, batch_size: int) -> torch.Tensor:
    """m2c_compose() over query batches from cached reference features: [Q, E] L2-normalised."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            visual = side.cache.reference_features(rows[reference_index[start:start + batch_size]])
            out.append(m2c.m2c_compose(side.model, visual, list(texts[start:start + batch_size]), prompt=prompt,
                                       use_adapters=m2c.uses_adapters(method)))
    return torch.cat(out).float()


def part_similarities(model, dataset: str, part: Part, cache: FeatureCache, templates: dict[str, str],
                      methods: Sequence[str], batch_size: int, progress: bool = True, m2c_side: M2CSide | None = None
                      ) -> Iterator[tuple[str, np.ndarray]]:
    """(method, similarity [queries, gallery]) for each method; visual features come from the cache(s)."""
    images = part.benchmark.images
    references = list(dict.fromkeys(q.reference for q in part.queries))
    position = {name: i for i, name in enumerate(references)}
    reference_paths = [images[name] for name in references]
    gallery_paths = [images[name] for name in part.gallery]
    reference_index = np.array([position[q.reference] for q in part.queries])
    ours = [m for m in methods if m not in m2c.M2C_METHODS]
    if len(ours) < len(methods) and m2c_side is None:
        raise UserError("the M2C methods need M2C weights (--m2c-weights)")
    if ours:
        tokens = cache.reference_tokens(reference_paths)
        gallery = cache.gallery_features(gallery_paths)
        texts = query_texts(dataset, part.queries)
    if len(ours) < len(methods):
        m2c_rows = m2c_side.cache.reference_rows(reference_paths)
        m2c_gallery = m2c_side.cache.gallery_features(gallery_paths)
        m2c_texts = m2c_query_texts(dataset, part.queries)
    for method in tqdm(methods, desc=f"{part.name} methods", disable=not progress):
        if method in m2c.M2C_METHODS:
            features = m2c_query_features(m2c_side, m2c_rows, reference_index, m2c_texts, method, templates[method],
                                          batch_size)
            targets = m2c_gallery
        else:
            features = query_features(model, tokens, reference_index, texts, method, templates.get(method),
                                      batch_size)
            targets = gallery
        yield method, (features.to(targets.device) @ targets.T).cpu().numpy()


# ---- evaluate -----------------------------------------------------------------------------------------------------
def part_metrics(dataset: str, part: Part, similarity: np.ndarray) -> dict[str, float]:
    q = part.queries
    if dataset == "fashioniq":
        return metrics.fashioniq_recall(similarity, part.gallery, [x.target for x in q])
    if dataset == "cirr":
        result = metrics.cirr_metrics(similarity, part.gallery, [x.reference for x in q], [x.target for x in q],
                                      [x.group for x in q])
        result["avg"] = mean((result["recall@5"], result["recall_subset@1"]))  # the CIRR paper's "Avg"
        return result
    if dataset == "clothing-cir":
        return metrics.clothing_cir_metrics(similarity, part.gallery, [x.reference for x in q],
                                            [x.ground_truths for x in q], [x.kind for x in q])
    return metrics.circo_metrics(similarity, part.gallery, [x.target for x in q], [x.ground_truths for x in q])


def evaluate(model, dataset: str, parts: list[Part], cache: FeatureCache, *, methods: Sequence[str] = METHODS,
             prompt: str | None = None, batch_size: int = 32, weights: str | None = None,
             progress: bool = True, m2c_side: M2CSide | None = None) -> dict[str, Any]:
    """All `methods` on the same parts and cached features; returns the results object of `report`."""
    started = time.perf_counter()
    caches = [cache] + ([m2c_side.cache] if m2c_side is not None and m2c_side.cache is not cache else [])
    computed_before = sum(c.computed for c in caches)
    templates = method_prompts(methods, resolve_prompt(prompt, dataset), dataset)
    per_method: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for part in parts:
        for method, similarity in part_similarities(model, dataset, part, cache, templates, methods, batch_size,
                                                    progress, m2c_side):
            per_method[method][part.name] = part_metrics(dataset, part, similarity)
    if dataset == "fashioniq":
        results_by_method = {m: metrics.fashioniq_average(per_method[m]) for m in methods}
    else:
        results_by_method = {m: per_method[m][dataset] for m in methods}
    return {
        "dataset": dataset,
        "split": parts[0].benchmark.split,
        "protocol": "subset" if any(p.subset for p in parts) else "official",
        "parts": [p.sizes() for p in parts],
        "model": {**model.identity(), "weights": None if weights is None else str(weights),
                  **({"m2c_weights": m2c_side.weights, "m2c_preprocess": m2c_side.model.preprocess_kind}
                     if m2c_side else {})},
        "prompts": templates,
        "reference_policy": REFERENCE_POLICY[dataset],
        "methods": results_by_method,
        "features": {"visual_passes": sum(c.computed for c in caches) - computed_before,
                     "cache": str(cache.gallery.dir.parent)},
        "seconds": round(time.perf_counter() - started, 3),
    }


def _comma_list(value: str, allowed: Sequence[str], flag: str) -> list[str]:
    items = list(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    unknown = [v for v in items if v not in allowed]
    if unknown or not items:
        raise UserError(f"{flag}: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(allowed)}")
    return items


def m2c_config_from_args(args) -> m2c.M2CConfig | None:
    """The config of --m2c-weights (read without its tensors, before any model work), or None."""
    return m2c.read_m2c_config(args.m2c_weights) if args.m2c_weights is not None else None


def check_m2c_methods(methods: Sequence[str], config: m2c.M2CConfig | None, weights: str | None) -> None:
    """The M2C methods asked for must be runnable with the given weights (checked before any model work)."""
    wanted = [m for m in methods if m in m2c.M2C_METHODS]
    if wanted and config is None:
        raise UserError(f"method {', '.join(wanted)} needs --m2c-weights: an M2C .safetensors written by "
                        "`fti4cir m2c-train` (stage 2 for m2c+compose)")
    missing = [m for m in wanted if m not in m2c.available_methods(config)]
    if missing:
        raise UserError(f"{weights} holds stage-I M2C weights (no composing adapters); {', '.join(missing)} needs "
                        "the weights of `fti4cir m2c-train --stage 2`")


def m2c_side_from_args(args, model, cache: FeatureCache, methods: Sequence[str]) -> M2CSide | None:
    """M2C weights on `model`'s backbone when an M2C method runs (else None), with the FTI4CIR cache when both
    preprocess alike, else a cache of M2C's preprocessing sharing the file-hash memo."""
    if not any(m in m2c.M2C_METHODS for m in methods):
        return None
    m2c_model = m2c.attach_m2c(model.backbone, args.m2c_weights, args.m2c_preprocess)
    if m2c_model.identity() != model.identity():
        cache = FeatureCache(m2c_model, args.cache_dir, batch_size=args.batch_size, num_workers=args.num_workers,
                             hashes=cache.hashes)
    return M2CSide(m2c_model, cache, str(args.m2c_weights))


def _methods_from_args(args, config: m2c.M2CConfig | None) -> list[str]:
    """--methods, or FTI4CIR's five methods plus the M2C methods that --m2c-weights can run."""
    if args.methods is None:
        return [*METHODS, *(m2c.available_methods(config) if config is not None else ())]
    return _comma_list(args.methods, ALL_METHODS, "--methods")


def _evaluate_command(args) -> int:
    from fti4cir.cli import model_from_args

    allowed = EVALUATE_SPLITS[args.dataset]
    args.split = args.split or allowed[0]
    if args.split not in allowed:
        raise UserError(f"{args.dataset} is evaluated on its {' / '.join(allowed)} split, not {args.split!r}")
    m2c_config = m2c_config_from_args(args)
    methods = _methods_from_args(args, m2c_config)
    check_m2c_methods(methods, m2c_config, args.m2c_weights)
    categories = _comma_list(args.categories, FASHIONIQ_CATEGORIES, "--categories")
    resolve_prompt(args.prompt, args.dataset)  # a bad template fails before any model work
    parts = load_parts(args.dataset, args.root, args.split, categories=categories, max_queries=args.max_queries,
                       subset_gallery=args.subset_gallery)
    model = model_from_args(args).eval()  # dropout off in the inversion network
    cache = FeatureCache(model, args.cache_dir, batch_size=args.batch_size, num_workers=args.num_workers)
    side = m2c_side_from_args(args, model, cache, methods)
    results = evaluate(model, args.dataset, parts, cache, methods=methods, prompt=args.prompt,
                       batch_size=args.batch_size, weights=args.weights, m2c_side=side)
    out = Path(args.out or Path("runs") / "evaluate" / f"{args.dataset}-{args.split}")
    json_path, markdown_path = write_report(out, results)
    print(to_markdown(results))
    print(f"{results['features']['visual_passes']} visual passes, {results['seconds']:.1f} s; "
          f"wrote {json_path} and {markdown_path}")
    return 0


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
            recall, subset = submission.cirr_submission(ids, *submission.cirr_rankings(similarity, part.gallery,
                                                                                        references, groups))
            for obj, metric in ((recall, "recall"), (subset, "recall_subset")):
                submission.validate_cirr_submission(obj, metric, ids, references=dict(zip(ids, references)),
                                                    groups=dict(zip(ids, groups)))
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


def _submit_command(args) -> int:
    from fti4cir.cli import model_from_args

    check_m2c_methods([args.method], m2c_config_from_args(args), args.m2c_weights)
    prompt = resolve_prompt(args.prompt, args.dataset)  # a bad template fails before any model work
    (part,) = load_parts(args.dataset, args.root, args.split, max_queries=args.max_queries,
                         subset_gallery=args.subset_gallery)
    length = submission.CIRR_LENGTHS["recall"] if args.dataset == "cirr" else submission.CIRCO_LENGTH
    if len(part.gallery) <= length:
        raise UserError(f"the gallery has {len(part.gallery)} images; a top-{length} list without the reference "
                        f"needs at least {length + 1}")
    model = model_from_args(args).eval()  # dropout off in the inversion network
    cache = FeatureCache(model, args.cache_dir, batch_size=args.batch_size, num_workers=args.num_workers)
    side = m2c_side_from_args(args, model, cache, [args.method])
    templates = method_prompts([args.method], prompt, args.dataset)
    [(_, similarity)] = list(part_similarities(model, args.dataset, part, cache, templates, [args.method],
                                               args.batch_size, m2c_side=side))
    paths = write_submission(args.dataset, part, similarity, Path(args.out), args.name or args.method)
    if part.subset:
        sizes = part.sizes()
        print(f"warning: partial submission ({sizes['queries']} of {sizes['queries_total']} queries, gallery "
              f"{sizes['gallery']} of {sizes['gallery_total']}); the server rejects it. For smoke tests only.",
              file=sys.stderr)
    print("wrote " + ", ".join(map(str, paths)))
    return 0


# ---- CLI ----------------------------------------------------------------------------------------------------------
def _add_common_args(parser: argparse.ArgumentParser) -> None:
    from fti4cir.cli import add_model_args

    parser.add_argument("--root", required=True, help="benchmark folder in its official layout")
    parser.add_argument("--prompt", default=None,
                        help=f"template of method fti4cir: {', '.join(prompts.PROMPTS)} or a template such as "
                             f"'{prompts.DEFAULT}' (default: the dataset's; the M2C methods use the official M2C "
                             f"prompts)")
    parser.add_argument("--max-queries", type=positive_int, default=None,
                        help="only the first N queries (per FashionIQ category): a subset run")
    parser.add_argument("--subset-gallery", type=non_negative_int, default=None, metavar="N",
                        help="rank only the images the selected queries use plus N other gallery images: a subset "
                             "run, not comparable to published numbers")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="feature cache root (default %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--num-workers", type=non_negative_int, default=None, help="image decoding processes")
    add_model_args(parser)
    parser.add_argument("--m2c-weights", default=None,
                        help="M2C weights (.safetensors from `fti4cir m2c-train`, same backbone): enables the methods "
                             "m2c and, with stage-2 weights, m2c+compose")
    parser.add_argument("--m2c-preprocess", default="clip", choices=["targetpad", "clip"],
                        help="M2C's image preprocessing (default %(default)s, as the official M2C evaluation)")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="FashionIQ / CIRR / CIRCO validation metrics (clothing-cir: test), all "
                              "methods in one table")
    p.add_argument("--dataset", required=True, choices=list(EVALUATE_SPLITS),
                   help="clothing-cir: --root data/clothing-cir (the demo photos' benchmark)")
    p.add_argument("--split", default=None, choices=["val", "test"],
                   help="default: val (clothing-cir: test, its only split)")
    p.add_argument("--methods", default=None, help="comma-separated, from: " + ", ".join(ALL_METHODS) +
                   " (default: the five FTI4CIR methods, plus the M2C methods --m2c-weights can run)")
    p.add_argument("--categories", default=",".join(FASHIONIQ_CATEGORIES), help="FashionIQ categories")
    p.add_argument("--out", default=None, help="results folder (default runs/evaluate/<dataset>-<split>)")
    _add_common_args(p)
    p.set_defaults(func=_evaluate_command)

    p = subparsers.add_parser("submit", help="CIRR / CIRCO test-server prediction files")
    p.add_argument("--dataset", required=True, choices=["cirr", "circo"])
    p.add_argument("--split", default="test", choices=["test"])
    p.add_argument("--method", default="fti4cir", choices=ALL_METHODS)
    p.add_argument("--out", default="runs/submit", help="output folder (default %(default)s)")
    p.add_argument("--name", default=None, help="file name stem (default: the method)")
    _add_common_args(p)
    p.set_defaults(func=_submit_command)
