"""`fti4cir evaluate` (benchmark metrics, every method in one table) and `fti4cir submit` (test-server files).

The work is `fti4cir.evaluation.run`; this module parses the flags, checks them before any model work, builds the
model with `fti4cir.factory.create_model` (with the M2C weights when an M2C method runs) and prints the results.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .. import prompts
from ..errors import UserError
from ..evaluation.datasets import EVALUATE_SPLITS, FASHIONIQ_CATEGORIES
from .common import add_model_args, non_negative_int, positive_int, spec_from_args

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "cache/features"  # the `fti4cir features` default, so both commands share one cache
EVALUATE_HELP = "FashionIQ / CIRR / CIRCO validation metrics (clothing-cir: test), all methods in one table"
SUBMIT_HELP = "CIRR / CIRCO test-server prediction files"


def _comma_list(value: str, allowed, flag: str) -> list[str]:
    items = list(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    unknown = [v for v in items if v not in allowed]
    if unknown or not items:
        raise UserError(f"{flag}: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(allowed)}")
    return items


def _m2c_config(args):
    """The config of --m2c-weights (read without its tensors, before any model work), or None."""
    from ..m2c import read_m2c_config

    return read_m2c_config(args.m2c_weights) if args.m2c_weights is not None else None


def _model_and_cache(args, methods):
    """The FTI4CIR model (with the M2C weights on its backbone when an M2C method runs), its feature cache and the
    M2C side (None without M2C methods)."""
    from ..evaluation.run import FeatureCache, m2c_methods, m2c_preprocess, make_m2c_side
    from ..factory import create_model

    wants_m2c = bool(m2c_methods(methods))
    model = create_model(spec_from_args(args, m2c_weights=args.m2c_weights if wants_m2c else None))
    model.eval()  # dropout off in the inversion network
    cache = FeatureCache(model, args.cache_dir, batch_size=args.batch_size, num_workers=args.num_workers)
    preprocess = m2c_preprocess(args.dataset, args.m2c_preprocess)
    side = make_m2c_side(model, cache, args.m2c_weights, preprocess) if wants_m2c else None
    return model, cache, side


def run_evaluate(args) -> int:
    from .. import methods as registry
    from ..evaluation.report import to_markdown, write_report
    from ..evaluation.run import (
        check_m2c_methods,
        default_methods,
        evaluate,
        load_parts,
        resolve_prompt,
    )

    allowed = EVALUATE_SPLITS[args.dataset]
    args.split = args.split or allowed[0]
    if args.split not in allowed:
        raise UserError(f"{args.dataset} is evaluated on its {' / '.join(allowed)} split, not {args.split!r}")
    m2c_config = _m2c_config(args)
    if args.methods is None:
        methods = default_methods(m2c_config)
    else:
        methods = _comma_list(args.methods, registry.names(), "--methods")
    check_m2c_methods(methods, m2c_config, args.m2c_weights)
    categories = _comma_list(args.categories, FASHIONIQ_CATEGORIES, "--categories")
    resolve_prompt(args.prompt, args.dataset)  # a bad template fails before any model work
    parts = load_parts(
        args.dataset,
        args.root,
        args.split,
        categories=categories,
        max_queries=args.max_queries,
        subset_gallery=args.subset_gallery,
    )
    model, cache, side = _model_and_cache(args, methods)
    results = evaluate(
        model,
        args.dataset,
        parts,
        cache,
        methods=methods,
        prompt=args.prompt,
        batch_size=args.batch_size,
        weights=args.weights,
        m2c_side=side,
    )
    out = Path(args.out or Path("runs") / "evaluate" / f"{args.dataset}-{args.split}")
    json_path, markdown_path = write_report(out, results)
    print(to_markdown(results))
    print(
        f"{results['features']['visual_passes']} visual passes, {results['seconds']:.1f} s; "
        f"wrote {json_path} and {markdown_path}"
    )
    return 0


def run_submit(args) -> int:
    from .. import methods as registry
    from ..evaluation import submission
    from ..evaluation.run import (
        check_m2c_methods,
        load_parts,
        method_prompts,
        part_similarities,
        resolve_prompt,
        write_submission,
    )

    if args.method not in registry.names():
        raise UserError(f"--method: unknown {args.method}; choose from {', '.join(registry.names())}")
    check_m2c_methods([args.method], _m2c_config(args), args.m2c_weights)
    prompt = resolve_prompt(args.prompt, args.dataset)  # a bad template fails before any model work
    (part,) = load_parts(
        args.dataset, args.root, args.split, max_queries=args.max_queries, subset_gallery=args.subset_gallery
    )
    length = submission.CIRR_LENGTHS["recall"] if args.dataset == "cirr" else submission.CIRCO_LENGTH
    if len(part.gallery) <= length:
        raise UserError(
            f"the gallery has {len(part.gallery)} images; a top-{length} list without the reference "
            f"needs at least {length + 1}"
        )
    model, cache, side = _model_and_cache(args, [args.method])
    templates = method_prompts([args.method], prompt, args.dataset)
    [(_, similarity)] = list(
        part_similarities(model, args.dataset, part, cache, templates, [args.method], args.batch_size, m2c_side=side)
    )
    paths = write_submission(args.dataset, part, similarity, Path(args.out), args.name or args.method)
    if part.subset:
        sizes = part.sizes()
        log.warning(
            "warning: partial submission (%s of %s queries, gallery %s of %s); the server rejects it. For "
            "smoke tests only.",
            sizes["queries"],
            sizes["queries_total"],
            sizes["gallery"],
            sizes["gallery_total"],
        )
    print("wrote " + ", ".join(map(str, paths)))
    return 0


def _add_common_args(parser) -> None:
    parser.add_argument("--root", required=True, help="benchmark folder in its official layout")
    parser.add_argument(
        "--prompt",
        default=None,
        help=f"template of method fti4cir: {', '.join(prompts.PROMPTS)} or a template such as "
        f"'{prompts.DEFAULT}' (default: the dataset's; the M2C methods use the official M2C "
        f"prompts)",
    )
    parser.add_argument(
        "--max-queries",
        type=positive_int,
        default=None,
        help="only the first N queries (per FashionIQ category): a subset run",
    )
    parser.add_argument(
        "--subset-gallery",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="rank only the images the selected queries use plus N other gallery images: a subset "
        "run, not comparable to published numbers",
    )
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="feature cache root (default %(default)s)")
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=32,
        help="images per visual pass and queries per compose batch (default %(default)s)",
    )
    parser.add_argument("--num-workers", type=non_negative_int, default=None, help="image decoding processes")
    add_model_args(parser)
    parser.add_argument(
        "--m2c-weights",
        default=None,
        help="M2C weights (.safetensors from `fti4cir m2c-train`, same backbone): enables the methods "
        "m2c and, with stage-2 weights, m2c+compose",
    )
    parser.add_argument(
        "--m2c-preprocess",
        default=None,
        choices=["targetpad", "clip"],
        help="M2C's image preprocessing (default: clip, as the official M2C evaluation; on clothing-cir targetpad, "
        "the transform the demo's M2C is trained with)",
    )


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help=EVALUATE_HELP)
    p.add_argument(
        "--dataset",
        required=True,
        choices=list(EVALUATE_SPLITS),
        help="clothing-cir: --root data/clothing-cir (the demo photos' benchmark)",
    )
    p.add_argument(
        "--split",
        default=None,
        choices=list(dict.fromkeys(split for splits in EVALUATE_SPLITS.values() for split in splits)),
        help="default: val (clothing-cir: test; its validation split is for choosing settings)",
    )
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated query methods, e.g. fti4cir,text-only,m2c (default: FTI4CIR and its four "
        "baselines, plus the M2C methods --m2c-weights can run; an unknown name lists them all)",
    )
    p.add_argument("--categories", default=",".join(FASHIONIQ_CATEGORIES), help="FashionIQ categories")
    p.add_argument("--out", default=None, help="results folder (default runs/evaluate/<dataset>-<split>)")
    _add_common_args(p)
    p.set_defaults(func=run_evaluate)

    p = subparsers.add_parser("submit", help=SUBMIT_HELP)
    p.add_argument("--dataset", required=True, choices=["cirr", "circo"], help="the benchmark of the test server")
    p.add_argument("--split", default="test", choices=["test"], help="the test split (the server's)")
    p.add_argument(
        "--method",
        default="fti4cir",
        help="the query method ranked (default %(default)s; m2c, m2c+compose with --m2c-weights; an "
        "unknown name lists them all)",
    )
    p.add_argument("--out", default="runs/submit", help="output folder (default %(default)s)")
    p.add_argument("--name", default=None, help="file name stem (default: the method)")
    _add_common_args(p)
    p.set_defaults(func=run_submit)
