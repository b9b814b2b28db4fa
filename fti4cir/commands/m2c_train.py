"""M2C training: stage I (mapping: Phi + VSI, frozen CLIP) and stage II (composing adapters, all else frozen).

Stage I reads a folder of images and one caption per image (for the soft text alignment term): the BLIP captions
JSONL of `fti4cir caption` (`--captions`), or class-name captions "a photo of a {class}" from the images' class
subfolders when no captions file is given. Stage II reads triplets (see `fti4cir triplets`). Both stages crop
their images as the official code: freshly at every step (`--augment online`, default), from K crops per image
cached once (`views`), or not at all (`none`: the cached centre crop).

Training follows the official code's intent (LiJiaBei-7/TSCIR src/main.py, src/trainer.py, src/params.py): AdamW
betas/eps per backbone, weight decay on all but the biases, warm-up then cosine, the target images in stage II's KL,
stage-I modules left in train mode during stage II. Its bugs are fixed by default; `--as-released` restores the
released hard negatives. With torchrun, the features of all processes are gathered into one pool of negatives.
Checkpoints (weights, optimizer, RNG states) go to `<out>.run/` at every epoch end (and every --checkpoint-steps);
--resume continues bit for bit (settings that differ from the checkpoint's are refused).
"""

from __future__ import annotations

import argparse

from ..training.m2c.options import AUGMENT_MODES, TRAIN_PROMPT, TrainOptions
from .common import add_model_args, non_negative_int, positive_int, spec_from_args

HELP = "train M2C (From Mapping to Composing): stage 1 mapping, stage 2 composing adapters"


def layers(value: str) -> tuple[int, ...]:
    """argparse type: comma-separated text-block numbers."""
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block numbers, got {value!r}") from None


def options_from_args(args) -> TrainOptions:
    return TrainOptions(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.wd,
        warmup=args.warmup,
        temperature=args.temperature,
        beta1=args.beta1,
        beta2=args.beta2,
        eps=args.eps,
        kl_weight=args.kl_weight,
        ref_weight=args.ref_weight,
        topk=args.topk,
        augment=args.augment,
        views=args.views,
        as_released=args.as_released,
        seed=args.seed,
        num_workers=args.num_workers,
        amp=args.amp,
        checkpoint_steps=args.checkpoint_steps,
    )


def run(args) -> int:
    import os
    import time

    from ..errors import UserError
    from ..factory import create_model
    from ..features import FeatureStore
    from ..imagefiles import list_images
    from ..training.m2c import train as m2c
    from ..training.m2c.distributed import local_device
    from ..training.m2c.triplets import read_triplets

    if not str(args.out).endswith(".safetensors"):
        raise UserError(f"--out must be a .safetensors file, got {args.out}")
    options = options_from_args(args)
    args.device = local_device(args.device)  # this process's GPU under torchrun
    started = time.perf_counter()
    if args.stage == 1:
        if args.images is None:
            raise UserError("--stage 1 needs --images (a folder of training images)")
        paths, captions = m2c.stage1_data(args.images, args.captions)
        model = create_model(spec_from_args(args, family="m2c"), m2c_config={"vsi_layers": args.vsi_layers})
        print(f"stage 1: {len(paths)} images, VSI after text blocks {list(model.config.vsi_layers)}")
        history = m2c.train_stage1(
            model, paths, captions, options, out=args.out, resume=args.resume, cache_dir=args.cache_dir
        )
    else:
        if args.triplets is None or args.init is None:
            raise UserError("--stage 2 needs --triplets (JSONL) and --init (stage-I weights)")
        triplets = read_triplets(args.triplets)
        model = create_model(spec_from_args(args, family="m2c", m2c_weights=args.init))
        model.net.add_adapters(args.adapter_layers, args.adapter_rank)
        print(
            f"stage 2: {len(triplets)} triplets, adapters (rank {model.config.adapter_rank}) after text blocks "
            f"{list(model.config.adapter_layers)}"
        )
        history = m2c.train_stage2(
            model, triplets, options, prompt=args.prompt, out=args.out, resume=args.resume, cache_dir=args.cache_dir
        )
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(
        f"wrote {args.out} ({len(history)} epochs, final loss {history[-1].get('total', float('nan')):.4f}, "
        f"{time.perf_counter() - started:.0f} s)"
    )
    if args.val_triplets:
        if args.gallery is None:
            raise UserError("--val-triplets needs --gallery (the folder of images to rank)")
        store = FeatureStore.for_model(args.cache_dir, model, with_patches=True)
        val, gallery = read_triplets(args.val_triplets), list_images(args.gallery)
        for use_adapters in [False, True] if model.net.has_adapters else [False]:
            recall = m2c.triplet_recall(
                model, val, gallery, store, use_adapters=use_adapters, prompt=args.prompt, num_workers=args.num_workers
            )
            name = "m2c+compose" if use_adapters else "m2c"
            print(f"held-out {name}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in recall.items()))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "m2c-train", help=HELP, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--stage",
        type=int,
        choices=[1, 2],
        required=True,
        help="1: the mapping network (Phi + VSI); 2: the composing adapters on stage-I weights (--init)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="weights to write (.safetensors + .json), after every epoch; checkpoints go to <out>.run/",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run of --out from its last checkpoint (same data and settings; --epochs may be raised)",
    )
    p.add_argument(
        "--checkpoint-steps",
        type=non_negative_int,
        default=0,
        help="also checkpoint every N steps inside an epoch (default: at epoch ends only)",
    )
    p.add_argument("--images", help="stage 1: folder of training images (searched recursively)")
    p.add_argument(
        "--captions",
        help="stage 1: captions JSONL of `fti4cir caption` for --images (default: "
        "class-name captions from the class subfolders)",
    )
    p.add_argument(
        "--vsi-layers",
        type=layers,
        default=None,
        help="stage 1: text blocks (0-based) followed by VSI (default 3,7,9,11 for a 12-block tower, "
        "moved to the same relative depth otherwise)",
    )
    p.add_argument("--triplets", help="stage 2: training triplets JSONL (see `fti4cir triplets`)")
    p.add_argument("--init", help="stage 2: stage-I weights")
    p.add_argument(
        "--adapter-layers",
        type=layers,
        default=None,
        help="stage 2: text blocks followed by composing adapters (default 1,3,5,7,9,11, rescaled as --vsi-layers)",
    )
    p.add_argument(
        "--adapter-rank",
        type=positive_int,
        default=128,
        help="stage 2: rank of the composing adapters (default %(default)s)",
    )
    p.add_argument(
        "--prompt",
        default=TRAIN_PROMPT,
        help="stage 2 training / held-out prompt (default "
        "'%(default)s'; the evaluation prompts per dataset: fti4cir.m2c.model.PROMPTS)",
    )
    p.add_argument(
        "--augment",
        choices=AUGMENT_MODES,
        default="online",
        help="online: a fresh random crop per image and step through the visual tower (official); "
        "views: --views crops per image, their features cached once, one picked per step; none: "
        "the cached centre crop (default %(default)s)",
    )
    p.add_argument("--views", type=positive_int, default=8, help="crops per image for --augment views")
    p.add_argument(
        "--as-released",
        action="store_true",
        help="the released training where it differs from the intended one: stage-2 hard negatives "
        "(the positive itself, logits without 1/t) and, with torchrun, gradients averaged over the "
        "processes (DDP) instead of summed; see docs/m2c.md",
    )
    p.add_argument("--cache-dir", default="cache/features", help="visual feature cache (cached views, held-out eval)")
    p.add_argument("--val-triplets", help="held-out triplets JSONL: print Recall@k after training")
    p.add_argument("--gallery", help="folder of images ranked for --val-triplets")
    p.add_argument("--epochs", type=positive_int, default=30, help="training epochs (default %(default)s)")
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=128,
        help="per process (torchrun: the negatives of all processes are gathered)",
    )
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW peak learning rate (default %(default)s)")
    p.add_argument("--wd", type=float, default=0.1, help="weight decay (not on biases, the official rule)")
    p.add_argument(
        "--warmup",
        type=non_negative_int,
        default=None,
        help="warmup steps (default: official 10000 / 100 for stage 1 / 2)",
    )
    p.add_argument("--temperature", type=float, default=None, help="default 0.07 (stage 1) / 0.01 (stage 2)")
    p.add_argument("--beta1", type=float, default=None, help="AdamW beta1 (default 0.9)")
    p.add_argument(
        "--beta2",
        type=float,
        default=None,
        help="AdamW beta2 (default: 0.98 for ViT-B-32, ViT-B-16, ViT-L-14, else 0.999, as the official params)",
    )
    p.add_argument("--eps", type=float, default=None, help="AdamW eps (default: 1e-6 for those ViTs, else 1e-8)")
    p.add_argument("--kl-weight", type=float, default=0.2, help="soft text alignment weight")
    p.add_argument(
        "--ref-weight", type=float, default=1.0, help="stage 1: the view-A term; stage 2: the mapping-sentence term"
    )
    p.add_argument("--topk", type=positive_int, default=10, help="stage 2 mixed hard negatives per query")
    p.add_argument("--num-workers", type=int, default=None, help="image decoding processes")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA)")
    add_model_args(p, weights=False)  # also --seed: random initialisations and the training order
    p.set_defaults(func=run, preprocess="clip")
