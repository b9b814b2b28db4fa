"""`fti4cir inspect IMAGE`: the nearest vocabulary words of one image's subject and kept attribute pseudo tokens."""

from __future__ import annotations

from .common import add_model_args

HELP = "decode one image's pseudo-word tokens"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("inspect", help=HELP)
    p.add_argument("image", help="image file")
    p.add_argument("--text", default="", help="modification text shown after the decoded tokens")
    p.add_argument("-k", type=int, default=3, help="vocabulary words per token")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..compose import reference_tokens
    from ..decode import decode
    from ..factory import create_model
    from ..inputs import clean_text, load_image
    from .common import spec_from_args

    model = create_model(spec_from_args(args))
    with torch.no_grad():
        tokens = reference_tokens(model, [load_image(args.image)], return_attention=False)
    r = int(tokens.num_kept[0])
    words = decode(model.backbone, torch.cat([tokens.subject[:1], tokens.attributes[0, :r]]), k=args.k)
    fmt = lambda ws: "/".join(f"{w.word}({w.score:.2f})" for w in ws)  # noqa: E731
    print(f"a photo of [{fmt(words[0])}] with [{', '.join(fmt(w) for w in words[1:])}] but {clean_text(args.text)}")
    relevance = tokens.selection.relevance[0]
    print(f"kept {r} of {relevance.numel()} attribute queries: {tokens.selection.indices[0, :r].tolist()}")
    return 0
