"""`fti4cir train`: train FTI4CIR's inversion network on subject/attribute pairs (`fti4cir.training.trainer`)."""

from __future__ import annotations

from .common import add_model_args, inversion_config_value, non_negative_int

HELP = "train the inversion network on subject/attribute pairs"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help=HELP,
        description="Train FTI4CIR's inversion network from cached visual features. With "
        "--resume, settings come from the run's checkpoint; flags that "
        "contradict it are an error (--epochs may be raised).",
    )
    p.add_argument("--images", help="image folder the pairs' `image` paths are relative to (any layout)")
    p.add_argument("--pairs", help="pairs JSONL from `fti4cir split-captions`")
    p.add_argument("--out", required=True, help="run directory (checkpoints, log.jsonl, final weights)")
    p.add_argument("--cache-dir", default="cache/features", help="feature cache root (default %(default)s)")
    p.add_argument("--epochs", type=int, default=80, help="training epochs (default %(default)s, as the paper)")
    p.add_argument("--batch-size", type=int, default=256, help="pairs per step (default %(default)s)")
    p.add_argument("--lr", type=float, default=4e-5, help="AdamW learning rate (default %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default %(default)s)")
    p.add_argument(
        "--lr-decay-epoch",
        type=int,
        default=10,
        help="epoch (0-based) from which lr is multiplied by --lr-decay (default %(default)s)",
    )
    p.add_argument(
        "--lr-decay", type=float, default=0.1, help="learning-rate factor at the decay epoch (default %(default)s)"
    )
    p.add_argument(
        "--reg-weight",
        type=inversion_config_value("reg_weight"),
        default=None,
        help="weight of the tri-wise semantic regularisation (default: the network's, officially 1.4)",
    )
    p.add_argument(
        "--subject-weight",
        type=inversion_config_value("subject_weight"),
        default=None,
        help="weight of the subject-wise sentence inside that regularisation (default: the network's, officially 1; "
        "larger pulls the subject token towards its caption's subject words)",
    )
    p.add_argument(
        "--checkpoint-steps", type=non_negative_int, default=0, help="also checkpoint every N steps inside an epoch"
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="worker processes for image decoding (feature "
        "extraction; default automatic) and cached-feature reading (default 2 on CUDA, 0 on CPU)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic CUDA kernels where torch has "
        "them (for a bit-exact resume on GPU too; slower); CPU runs are always deterministic",
    )
    add_model_args(p, weights=True, hub=False)  # the run's config names its model: no presets here
    # the defaults tell a resumed run which flags the user gave (those override the checkpoint's settings)
    p.set_defaults(func=run, train_defaults={a.dest: a.default for a in p._actions if a.dest != "help"})


def run(args) -> int:
    from ..training.trainer import config_from_args, read_checkpoint, train

    record = read_checkpoint(args.out) if args.resume else None
    config = config_from_args(vars(args), args.train_defaults, record)
    result = train(
        config, resume=args.resume, device=args.device, num_workers=args.num_workers, deterministic=args.deterministic
    )
    if result.history:
        last = result.history[-1]
        print(
            f"epoch {last['epoch']}: loss {last['loss']:.4f} (contrastive {last['contrastive']:.4f}, orthogonal "
            f"{last['orthogonal']:.4f}, regularisation {last['regularisation']:.4f})"
        )
    print(f"wrote {result.weights}")
    return 0
