"""`fti4cir features IMAGES`: extract and cache visual features (`fti4cir.features`), one visual pass per image."""

from __future__ import annotations

from .common import add_model_args

HELP = "extract and cache visual features (one visual pass per image)"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("features", help=HELP)
    p.add_argument("images", help="image folder (searched recursively)")
    p.add_argument("--cache-dir", default="cache/features", help="feature cache root (default %(default)s)")
    p.add_argument("--no-patches", action="store_true", help="store global features only (galleries)")
    p.add_argument("--batch-size", type=int, default=32, help="images per visual pass (default %(default)s)")
    p.add_argument("--num-workers", type=int, default=None, help="image decoding processes (default: up to 4)")
    add_model_args(p, weights=False)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import UserError
    from ..factory import create_model
    from ..features import FeatureStore, extract_features
    from ..imagefiles import list_images
    from .common import spec_from_args

    paths = list_images(args.images)
    if not paths:
        raise UserError(f"No images found under {args.images}")
    model = create_model(spec_from_args(args))
    store = FeatureStore.for_model(args.cache_dir, model, with_patches=not args.no_patches)
    result = extract_features(model, paths, store, batch_size=args.batch_size, num_workers=args.num_workers)
    print(
        f"{len(paths)} images: {result.computed} encoded, {len(paths) - result.computed - len(result.failures)} "
        f"already cached, {len(result.failures)} unreadable; cache {store.dir}"
    )
    for _path, message in result.failures[:10]:
        print(f"  skipped {message}")
    return 0
