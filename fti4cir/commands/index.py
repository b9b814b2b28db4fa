"""`fti4cir index`: build or update a gallery (features, pseudo tokens, explanations, index) from an image folder or a
benchmark split; crash-safe and incremental (see `fti4cir.gallery.build`).

    fti4cir index data/clothing/test --name clothing --backbone ... --weights ...
    fti4cir index --definition galleries/clothing.json        # source and model from the definition file
    fti4cir index benchmark:cirr:val:data/CIRR --name cirr-val

Benchmark sources are resolved here (through `fti4cir.evaluation.datasets`) and handed to the gallery library as
named image files.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .common import add_model_args, positive_int, spec_from_args

# torch and the model are imported in `run`: `fti4cir index --help` stays fast
SUMMARY = "build or update a gallery: features, pseudo tokens, explanations, index"


def add_parser(subparsers) -> None:
    from ..gallery import INDEX_KINDS

    p = subparsers.add_parser("index", help=SUMMARY, description=__doc__.split("\n\n")[0])
    p.add_argument(
        "source",
        nargs="?",
        help="image folder (searched recursively) or benchmark:<fashioniq|cirr|circo>:<split>[:category]:<root>",
    )
    p.add_argument("--name", help="gallery name (letters, digits, . _ -); default: the definition's file name")
    p.add_argument(
        "--definition",
        help="gallery definition galleries/<name>.json (source, backbone, pretrained, "
        "weights); its values replace the SOURCE and model flags",
    )
    p.add_argument(
        "--galleries-dir", default=None, help="folder of galleries (default: the definition's folder, else 'galleries')"
    )
    add_model_args(p)
    p.add_argument(
        "--index",
        choices=INDEX_KINDS,
        default=None,
        help="search index: exact inner product, approximate, or auto (exact unless large; default)",
    )
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per visual pass (default %(default)s)")
    p.add_argument("--num-workers", type=int, default=None, help="image decoding processes (default: up to 4)")
    p.add_argument(
        "--shard-size",
        type=positive_int,
        default=256,
        help="images per staged shard: the unit of resumed work and of Ray tasks (default %(default)s)",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="compute on a Ray cluster: 'auto', ray://host:10001, host:6379; without ADDRESS, RAY_ADDRESS, "
        "a cluster running here, or a new local instance (give SOURCE before a bare --ray)",
    )
    p.add_argument(
        "--ray-workers",
        type=int,
        default=None,
        help="Ray actors, each holding one model (default: cluster CPUs / --ray-cpus-per-worker)",
    )
    p.add_argument(
        "--ray-cpus-per-worker", type=float, default=1.0, help="CPUs each Ray actor reserves (default %(default)s)"
    )
    p.add_argument(
        "--ray-gpus-per-worker",
        type=float,
        default=0.0,
        help="GPUs each Ray actor reserves, fractions allowed (default %(default)s)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def resolve_source(spec: str):
    """A `fti4cir.gallery.Source`: an image folder (recursive), or `benchmark:<fashioniq|cirr|circo>:<split>
    [:category]:<root>` (the split's images, named as the benchmark names them)."""
    from ..gallery import folder_source, named_source

    if not spec.startswith("benchmark:"):
        return folder_source(spec)
    from ..evaluation.datasets import load_benchmark

    parts = spec.split(":", 3)
    if len(parts) == 4 and parts[1].lower() == "fashioniq":
        parts = spec.split(":", 4)
    if len(parts) not in (4, 5) or not parts[-1]:
        raise UserError(
            f"Benchmark source {spec!r} must look like benchmark:<fashioniq|cirr|circo>:<split>"
            f"[:category]:<root>, e.g. benchmark:fashioniq:val:dress:data/FashionIQ"
        )
    name, split, category, root = parts[1], parts[2], (parts[3] if len(parts) == 5 else None), parts[-1]
    root = Path(root).resolve()
    bench = load_benchmark(name, root, split, category)
    return named_source(spec, root, bench.images)


def run(args) -> int:
    from ..gallery import SHOWN_FAILURES, build_gallery, read_definition, validate_name, weights_label

    index = args.index
    galleries_dir = args.galleries_dir
    m2c_weights = None
    if args.definition:
        if args.source:
            raise UserError("Give either SOURCE or --definition, not both")
        definition = read_definition(args.definition)
        args.source = definition["source"]
        for key in ("backbone", "pretrained", "weights", "preprocess"):
            if key in definition:
                setattr(args, key, definition[key])
        m2c_weights = definition.get("m2c_weights")  # not needed to index; recorded as part of the gallery's model
        index = index or definition.get("index")
        args.name = args.name or Path(args.definition).stem
        galleries_dir = galleries_dir or Path(args.definition).parent
    if not args.source or not args.name:
        raise UserError("fti4cir index needs SOURCE and --name, or --definition galleries/<name>.json")
    validate_name(args.name)
    source = resolve_source(args.source)  # before loading a model: a wrong path fails fast
    spec = spec_from_args(args)  # a preset resolved: its weights are a local file
    if spec.weights is not None and Path(spec.weights).exists():
        spec = spec.replace(weights=str(Path(spec.weights).resolve()))  # Ray workers may run elsewhere
    from ..factory import create_model

    model = create_model(spec)
    ray = None
    if args.ray is not None:
        from ..gallery.ray import RayCompute

        ray = RayCompute(
            address=args.ray or None,
            model_spec=spec.to_dict(),
            num_workers=args.ray_workers,
            cpus_per_worker=args.ray_cpus_per_worker,
            gpus_per_worker=args.ray_gpus_per_worker,
            batch_size=args.batch_size,
        )
    report = build_gallery(
        model,
        source,
        args.name,
        galleries_dir=galleries_dir or "galleries",
        index=index or "auto",
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        shard_size=args.shard_size,
        weights=weights_label(spec.weights, spec.seed),
        ray=ray,
        progress=not args.quiet,
        spec=spec.replace(m2c_weights=m2c_weights),
    )
    print(report.summary())
    for _, message in report.failures[:SHOWN_FAILURES]:
        print(f"  skipped {message}")
    return 0
