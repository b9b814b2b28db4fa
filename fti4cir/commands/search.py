"""`fti4cir search`: rank a gallery for one composed query from the command line (the app's query path).

    fti4cir search --gallery clothing --image dress.jpg --text "is red with short sleeves" -k 10 [--json]
    fti4cir search --gallery clothing --image test/dress/0001.jpg --text "..."   # a gallery image as the reference

The model is the one the gallery was built with (`fti4cir.gallery.gallery_model_spec`: its definition
`galleries/<name>.json` beside it, else the model or the identity it records); model flags override it, and a model
that does not match the gallery is refused naming both sides.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from ..errors import UserError
from .common import add_model_args, positive_int, spec_from_args

log = logging.getLogger(__name__)

SUMMARY = "rank a gallery for a reference image (file or gallery image) and a text"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("search", help=SUMMARY, description=__doc__.split("\n\n")[0])
    p.add_argument("--gallery", required=True, help="gallery name under --galleries-dir, or a gallery folder")
    p.add_argument("--galleries-dir", default="galleries", help="folder of galleries (default %(default)s)")
    p.add_argument(
        "--image",
        required=True,
        help="reference: an image file, or the name of a gallery image (as "
        "results name them; it is then left out of its own results)",
    )
    p.add_argument("--text", default="", help='modification text, e.g. "is red with short sleeves"')
    p.add_argument("-k", type=positive_int, default=10, help="number of results (default %(default)s, at most 100)")
    p.add_argument(
        "--method", default="fti4cir", help="fti4cir (default), subject-only, image-only, text-only, image+text"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (query, sentence, results with name, score and path) instead of lines",
    )
    add_model_args(p)
    # model flags default to the gallery's model (None = not given)
    p.set_defaults(backbone=None, pretrained=None, preprocess=None, seed=None, func=run)


def run(args) -> int:
    from ..app_service import SearchService
    from ..factory import create_model
    from ..gallery import Gallery, NotRecorded, gallery_model_spec

    spec = gallery_model_spec(args.gallery, args.galleries_dir)
    for key in ("backbone", "pretrained", "preprocess", "seed"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(spec, key))
    if args.weights is None and args.model is None:
        args.weights = spec.weights
    for key in ("pretrained", "weights"):
        if isinstance(getattr(args, key), NotRecorded):
            raise UserError(f"Gallery {args.gallery[:100]!r} was built with {getattr(args, key)}")
    image = Path(args.image)
    model = create_model(spec_from_args(args))
    gallery = Gallery.load(args.gallery, model, galleries_dir=args.galleries_dir)
    service = SearchService(model, gallery)
    if image.is_file():
        reference = image
    elif args.image in gallery.names:
        reference = gallery.row(args.image)
    else:
        raise UserError(
            f"--image {args.image[:200]!r} is neither an image file nor an image of gallery "
            f"{gallery.name!r} (gallery images are named like {gallery.names[0]!r})"
        )
    result = service.search(service.reference(reference, display=False), args.text, args.method, k=args.k)
    if args.json:
        json.dump(
            {
                "gallery": gallery.name,
                "reference": result.reference.name,
                "text": result.text,
                "method": result.method,
                "sentence": result.sentence,
                "truncated": result.truncated,
                "results": [
                    {"rank": h.rank, "name": h.name, "score": round(h.score, 6), "path": str(h.path)}
                    for h in result.hits
                ],
            },
            sys.stdout,
            indent=1,
        )
        print()
    else:
        print(result.sentence)
        for h in result.hits:
            print(f"{h.rank:3d}  {h.score:.4f}  {h.name}")
    log.info("%d results from %d images in %s", len(result.hits), len(gallery), result.timing_text())
    return 0
