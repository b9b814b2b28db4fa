"""`fti4cir search`: rank a gallery for one composed query from the command line (the app's query path).

    fti4cir search --gallery clothing --image dress.jpg --text "is red with short sleeves" -k 10 [--json]
    fti4cir search --gallery clothing --image test/dress/0001.jpg --text "..."   # a gallery image as the reference

The model is the one the gallery was built with (its definition `galleries/<name>.json` beside it, else the identity
it records); model flags override it, and a model that does not match the gallery is refused naming both sides.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from .errors import UserError

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    from .cli import COMMANDS, add_model_args, positive_int

    p = subparsers.add_parser("search", help=COMMANDS["search"][1], description=__doc__.split("\n\n")[0])
    p.add_argument("--gallery", required=True, help="gallery name under --galleries-dir, or a gallery folder")
    p.add_argument("--galleries-dir", default="galleries", help="folder of galleries (default %(default)s)")
    p.add_argument("--image", required=True, help="reference: an image file, or the name of a gallery image (as "
                   "results name them; it is then left out of its own results)")
    p.add_argument("--text", default="", help="modification text, e.g. \"is red with short sleeves\"")
    p.add_argument("-k", type=positive_int, default=10, help="number of results (default %(default)s, at most 100)")
    p.add_argument("--method", default="fti4cir", help="fti4cir (default), subject-only, image-only, text-only, "
                   "image+text")
    p.add_argument("--json", action="store_true", help="print one JSON object (query, sentence, results with name, "
                   "score and path) instead of lines")
    add_model_args(p)
    # model flags default to the gallery's model (None = not given)
    p.set_defaults(backbone=None, pretrained=None, preprocess=None, seed=None, func=_search_command)


def gallery_model_spec(name_or_dir: str, galleries_dir: str | Path = "galleries") -> dict:
    """The model flags (backbone, pretrained, weights, preprocess, seed) a gallery was built with: from its
    definition file when there is one, else from the identity its manifest records."""
    from .gallery import Gallery, read_definition

    directory = Path(name_or_dir) if Path(name_or_dir).is_dir() else Path(galleries_dir) / name_or_dir
    definition = directory.with_name(directory.name + ".json")
    if definition.is_file():
        d = read_definition(definition)
        return {"backbone": d.get("backbone"), "pretrained": d.get("pretrained"), "weights": d.get("weights"),
                "preprocess": d.get("preprocess", "targetpad"), "seed": 0}
    identity = Gallery.load(name_or_dir, galleries_dir=galleries_dir, verify=False).identity
    pretrained = identity.get("pretrained")
    pretrained = None if pretrained in (None, "None") else pretrained
    if isinstance(pretrained, str) and pretrained.startswith("sha256:"):
        pretrained = _unknown("a local CLIP checkpoint", pretrained, "--pretrained /path/to/checkpoint")
    weights, seed = identity.get("weights"), 0
    if weights in (None, "unknown"):  # provenance not recorded: the digest check at load decides
        weights = None
    elif isinstance(weights, str) and weights.startswith("random-init:"):
        weights, seed = None, int(weights.split(":", 1)[1] or 0)
    elif isinstance(weights, str) and weights.startswith("sha256:"):
        weights = _unknown("a local weights file", weights, "--weights FILE.safetensors")
    return {"backbone": identity.get("backbone"), "pretrained": pretrained, "weights": weights,
            "preprocess": identity.get("preprocess", "targetpad"), "seed": seed}


class _Unknown(str):
    """A recorded value that cannot be turned back into a flag (a file known only by its digest)."""


def _unknown(what: str, digest: str, flag: str) -> _Unknown:
    return _Unknown(f"{what} ({digest[:19]}...), give it with {flag}")


def _search_command(args) -> int:
    from .app_service import SearchService
    from .cli import model_from_args
    from .gallery import Gallery

    spec = gallery_model_spec(args.gallery, args.galleries_dir)
    for key in ("backbone", "pretrained", "preprocess", "seed"):
        if getattr(args, key) is None:
            setattr(args, key, spec[key])
    if args.weights is None and args.model is None:
        args.weights = spec["weights"]
    for key in ("pretrained", "weights"):
        if isinstance(getattr(args, key), _Unknown):
            raise UserError(f"Gallery {args.gallery[:100]!r} was built with {getattr(args, key)}")
    image = Path(args.image)
    model = model_from_args(args)
    gallery = Gallery.load(args.gallery, model, galleries_dir=args.galleries_dir)
    service = SearchService(model, gallery)
    if image.is_file():
        reference = image
    elif args.image in gallery.names:
        reference = gallery.row(args.image)
    else:
        raise UserError(f"--image {args.image[:200]!r} is neither an image file nor an image of gallery "
                        f"{gallery.name!r} (gallery images are named like {gallery.names[0]!r})")
    result = service.search(service.reference(reference, display=False), args.text, args.method, k=args.k)
    if args.json:
        json.dump({"gallery": gallery.name, "reference": result.reference.name, "text": result.text,
                   "method": result.method, "sentence": result.sentence, "truncated": result.truncated,
                   "results": [{"rank": h.rank, "name": h.name, "score": round(h.score, 6), "path": str(h.path)}
                               for h in result.hits]}, sys.stdout, indent=1)
        print()
    else:
        print(result.sentence)
        for h in result.hits:
            print(f"{h.rank:3d}  {h.score:.4f}  {h.name}")
    log.info("%d results from %d images in %s", len(result.hits), len(gallery), result.timing_text())
    return 0

