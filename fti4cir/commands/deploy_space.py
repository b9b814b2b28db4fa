"""`fti4cir deploy-space REPO_ID`: upload the app to a Hugging Face Space (`fti4cir.space`; --dry-run lists and checks
only)."""

from __future__ import annotations

HELP = "upload the app to a Hugging Face Space (--dry-run: list and check only)"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "deploy-space",
        help=HELP,
        description="`fti4cir deploy-space REPO_ID`: upload the app "
        "to a Hugging Face Space with `HfApi.upload_folder`.",
    )
    p.add_argument("repo_id", help="the Space, user/space-name (created when it does not exist)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="list the files and sizes that would go up and check the README front matter; uploads nothing",
    )
    p.add_argument(
        "--token",
        default=None,
        help="Hugging Face token with write access (default: HF_TOKEN or the login of `hf auth login`)",
    )
    p.add_argument("--root", default=".", help="the repository to deploy (default: the current folder)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..space import deploy

    deploy(args.repo_id, args.root, token=args.token, dry_run=args.dry_run, out=print)
    return 0
