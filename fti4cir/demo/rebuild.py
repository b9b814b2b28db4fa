"""`fti4cir demo-rebuild`: every learned file of the embedded demo, from the committed photos, in one command.

Stages (each one skipped when its output exists and is newer than the outputs it is made from; the training
stages resume from their last checkpoint after a kill, so rerunning the command continues where it stopped; a
training stage whose CLIP or data is newer than its network or checkpoints trains afresh: a new CLIP retrains
FTI4CIR and M2C, and what follows them runs again; to retrain a network, delete its output and work folder):

1. ``clip``      a small CLIP trained from scratch on the train photos (`fti4cir.demo.clip_train`)
2. ``zero-shot`` its class and colour accuracy on the test photos, with confusion matrices
3. ``captions``  one garment-first caption per train photo (`fti4cir demo-captions --forms fti4cir`)
4. ``pairs``     subject / attribute pairs (as `fti4cir split-captions`, spaCy)
5. ``fti4cir``   the inversion network (as `fti4cir train`, features cached once)
6. ``m2c-1``     M2C stage I on the train photos and their captions (as `fti4cir m2c-train --stage 1`)
7. ``triplets``  train-split triplets from the labels (colour, class and both changes; M2C stage II only)
8. ``m2c-2``     M2C stage II (as `fti4cir m2c-train --stage 2`)
9. ``compact``   fp16 copies of the FTI4CIR and M2C weights: the files that ship (the CLIP is saved in fp16 already);
                 the gallery and the benchmark use them, so the numbers are those of the shipped files
10. ``gallery``  the demo gallery of the test photos (as `fti4cir index`)
11. ``benchmark`` clothing-cir, every method in one table (as `fti4cir evaluate`), and the decoded-word hit rates

Each stage calls the library functions of the command named beside it, with that command's defaults.

Everything is seeded. No reference/target pair enters the CLIP or FTI4CIR training (zero-shot); only M2C stage II
uses triplets, and those come from the train photos: the benchmark's test photos are never trained on.

`--quick` runs the same stages on a few photos per class with a handful of steps (seconds to a minute: for CI).
`--install` copies the results into `weights/` and `galleries/` (the embedded default) when all stages are done.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..atomic import write_json_atomic, write_text_atomic
from ..errors import UserError

if TYPE_CHECKING:
    from .clip_train import ClipTrainConfig

# torch and the training, gallery and evaluation code are imported by the stages that use them: `fti4cir demo-rebuild
# --help` (which lists STAGES) stays fast

log = logging.getLogger(__name__)

STAGES = (
    "clip",
    "zero-shot",
    "captions",
    "pairs",
    "fti4cir",
    "m2c-1",
    "triplets",
    "m2c-2",
    "compact",
    "gallery",
    "benchmark",
)
GALLERY = "clothing"
REPORT = "clothing-report.md"
CLIP_FILE, FTI4CIR_FILE, M2C_FILE = (
    "clothing-clip.safetensors",
    "clothing-fti4cir.safetensors",
    "clothing-m2c.safetensors",
)
DEMO_MODEL = "fti4cir-clothing"  # = fti4cir.demo.clip_train.DEMO_MODEL (that module imports torch)
COMMAND_SEED = 0  # the --seed default of `fti4cir index` and `fti4cir evaluate`, which the demo leaves unset


def _clip_config() -> ClipTrainConfig:
    from .clip_train import ClipTrainConfig

    return ClipTrainConfig()


@dataclass
class Settings:
    """Sizes of each stage: the full demo, or --quick."""

    # the CLIP's recipe; its photos, labels, out and seed are the rebuild's own (`Rebuild(seed=...)`, --seed)
    clip: ClipTrainConfig = field(default_factory=_clip_config)
    fti4cir_epochs: int = 30
    fti4cir_batch: int = 128
    fti4cir_lr: float = 5e-4
    fti4cir_reg_weight: float | None = 2.0  # None: the official 1.4 (chosen on validation: weights/README.md)
    # the subject-wise sentence's weight inside it (None: the official 1); 6 makes the subject token name the garment
    # far more often, composing about as well on validation (weights/README.md)
    fti4cir_subject_weight: float | None = 6.0
    m2c1_epochs: int = 10
    m2c2_epochs: int = 10
    m2c_batch: int = 128
    m2c_lr: float = 5e-4  # stage I
    # stage II: the official learning rate; adapters of rank 16 (the official 128 is the full width of this tiny text
    # tower). Chosen on validation-split queries: with stage I's 5e-4 and rank 128, m2c+compose fell below m2c.
    m2c2_lr: float = 1e-4
    m2c2_adapter_rank: int = 16
    m2c_augment: str = "views"  # 4 crops per photo, cached
    m2c_views: int = 4
    triplets_per_type: int = 1000
    # The labels the training captions and M2C triplets come from, in the photo folder (None: labels.json, the
    # labels every measurement uses). The demo trains on the version-3 colour labels, which label 86% of the photos
    # (version 4: 63%, but agreeing more often with a person): FTI4CIR composed better on validation when its CLIP
    # and captions came from them (weights/README.md).
    training_labels: str | None = "labels-v3.json"
    per_class: int = 0  # quick runs: photos per class and split for every stage (0: all)
    benchmark_queries: int = 0  # quick runs: queries of the benchmark generated from those photos

    @classmethod
    def quick(cls) -> Settings:
        from .clip_train import ClipTrainConfig

        return cls(
            clip=ClipTrainConfig(epochs=2, batch_size=16),
            fti4cir_epochs=1,
            fti4cir_batch=16,
            m2c1_epochs=1,
            m2c2_epochs=1,
            m2c_batch=16,
            m2c_augment="none",
            triplets_per_type=8,
            benchmark_queries=9,
            per_class=6,
        )


def subset_photos(photos: str | os.PathLike, out: str | os.PathLike, per_class: int) -> dict:
    """Copy the first `per_class` photos of each class and split (in labels order) with their labels into `out`;
    returns the subset's labels."""
    from .labels import read_labels, write_labels

    photos, out = Path(photos), Path(out)
    labels = read_labels(photos / "labels.json")
    seen: dict[tuple[str, str], int] = {}
    kept = []
    for p in labels["photos"]:
        key = (p["split"], p["class"])
        if seen.get(key, 0) < per_class:
            seen[key] = seen.get(key, 0) + 1
            kept.append(p)
            (out / p["path"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(photos / p["path"], out / p["path"])
    labels = {**labels, "photos": kept}
    write_labels(labels, out / "labels.json")
    return labels


def copy_weights(src: Path, dst: Path, half: bool = False, **fields) -> None:
    """Copy our weights file `src` (.safetensors + .json) to `dst`, with its floating-point tensors in fp16 if `half`
    (loading casts them back to the network's fp32: half the bytes in the repository) and `fields` replaced in the
    network's config (the JSON beside it and the copy in its metadata)."""
    from safetensors import safe_open

    from ..weightfiles import config_path, write_weights

    with safe_open(str(src), "pt") as f:
        (config_key,) = f.metadata()  # the one config our files carry
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if half:
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    write_weights(tensors, {**json.loads(config_path(src).read_text()), **fields}, dst, config_key)


@dataclass(frozen=True)
class Stage:
    output: Path  # written last (atomically): the stage is done when it exists
    run: Callable[[], None]
    # files it is made from: an output older than one of them is stale (a new CLIP retrains the networks; a
    # retrained network makes the fp16 copies, the gallery and the benchmark run again)
    sources: tuple[Path, ...] = ()
    # a training stage's checkpoints and weights: made before one of its sources changed, they are removed before
    # the stage runs, so that it trains afresh instead of resuming a network of the old CLIP
    work: tuple[Path, ...] = ()

    def _older_than_a_source(self, path: Path) -> bool:
        made = path.stat().st_mtime_ns
        return any(s.exists() and s.stat().st_mtime_ns > made for s in self.sources)

    def done(self) -> bool:
        return self.output.exists() and not self._older_than_a_source(self.output)

    def clear_stale(self) -> list[Path]:
        """Remove the output and work of a stale stage (or work left older than a source by a killed run); returns
        what was removed. The output goes first: killed in between, the old work is still older than the source."""
        stale = self.output.exists() and self._older_than_a_source(self.output)
        removed = []
        for path in (self.output, *self.work):
            if path.exists() and (stale or self._older_than_a_source(path)):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                removed.append(path)
        return removed


class Rebuild:
    def __init__(
        self,
        out: str | os.PathLike,
        photos: str | os.PathLike = "data/clothing",
        benchmark: str | os.PathLike = "data/clothing-cir",
        settings: Settings | None = None,
        seed: int = 0,
        device: str | None = None,
        progress: bool = True,
        say: Callable[[str], None] = log.info,
    ):
        """say: where the stage notices and results go (the command prints them)."""
        self.out, self.photos, self.benchmark_root = Path(out), Path(photos), Path(benchmark)
        self.source_photos = self.photos  # quick runs replace self.photos by a subset
        self.settings, self.seed, self.device, self.progress = settings or Settings(), seed, device, progress
        self.say = say
        self.cache = self.out / "cache"
        self.times: dict[str, float] = {}
        if self.settings.per_class:
            self._use_subset()

    def _use_subset(self) -> None:
        """Quick runs: a few photos of each class and split, and a benchmark generated from them, so that every
        stage (the gallery and the benchmark too) stays small."""
        from .benchmark import generate, write_benchmark

        subset, queries = self.out / "photos", self.out / "clothing-cir" / "queries.json"
        if not queries.exists():  # written last: a rerun keeps the subset (and every stage built on it)
            labels = subset_photos(self.photos, subset, self.settings.per_class)
            write_benchmark(
                generate(labels, seed=self.seed, per_type=self.settings.benchmark_queries // 3), queries, subset
            )
        self.photos, self.benchmark_root = subset, queries.parent

    # ---- paths ----------------------------------------------------------------------------------------------------
    @property
    def clip_weights(self) -> Path:
        return self.out / "clip" / "clip.safetensors"

    def path(self, name: str) -> Path:
        return self.out / name

    def model_spec(self, weights: Path | None = None, seed: int | None = None, **fields):
        """The demo model on the CLIP of this run: what the stages build (`fti4cir.factory.create_model`)."""
        from ..spec import ModelSpec

        return ModelSpec(
            backbone=DEMO_MODEL,
            pretrained=str(self.clip_weights),
            weights=str(weights) if weights else None,
            device=self.device,
            seed=self.seed if seed is None else seed,
            **fields,
        )

    # ---- stages ---------------------------------------------------------------------------------------------------
    def stages(self) -> dict[str, Stage]:
        from ..training.m2c.train import RUN_SUFFIX as M2C_RUN_SUFFIX
        from ..weightfiles import config_path

        fti4cir, m2c = self.path("fti4cir/fti4cir.safetensors"), self.path("m2c-stage2.safetensors")
        clip, captions, pairs = self.clip_weights, self.path("captions-train.jsonl"), self.path("pairs-train.jsonl")
        triplets = self.path("triplets-train.jsonl")

        def m2c_work(stage: int) -> tuple[Path, ...]:
            weights = self.path(f"m2c-stage{stage}.safetensors")
            return (weights, config_path(weights), weights.with_suffix(M2C_RUN_SUFFIX))

        return {
            "clip": Stage(clip, self.train_clip),
            "zero-shot": Stage(self.path("zero-shot.json"), self.zero_shot, (clip,)),
            "captions": Stage(captions, self.captions),
            "pairs": Stage(pairs, self.pairs, (captions,)),
            "fti4cir": Stage(fti4cir, self.train_fti4cir, (clip, pairs), (fti4cir.parent,)),
            "m2c-1": Stage(self.path("m2c-stage1.done"), self.train_m2c1, (clip, captions), m2c_work(1)),
            "triplets": Stage(triplets, self.triplets),
            "m2c-2": Stage(
                self.path("m2c-stage2.done"),
                self.train_m2c2,
                (clip, self.path("m2c-stage1.safetensors"), triplets),
                m2c_work(2),
            ),
            # written after the FTI4CIR copy: newer than both trained files means both copies are current
            "compact": Stage(self.path(M2C_FILE), self.compact, (fti4cir, m2c)),
            "gallery": Stage(self.path("gallery.done"), self.gallery, (self.path(M2C_FILE),)),
            "benchmark": Stage(self.path("benchmark.json"), self.evaluate, (self.path(M2C_FILE),)),
        }

    def run(self, only: list[str] | None = None) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for name, stage in self.stages().items():
            if only and name not in only:
                continue
            if stage.done():
                self.say(f"[{name}] done ({stage.output})")
                continue
            for path in stage.clear_stale():
                self.say(
                    f"[{name}] removed {path}: older than a file it is made from ({', '.join(map(str, stage.sources))})"
                )
            self.say(f"[{name}] running")
            started = time.monotonic()
            stage.run()
            self.times[name] = round(time.monotonic() - started, 1)
            self.say(f"[{name}] finished in {self.times[name]:.0f} s")
            timings = self.path("timings.json")
            previous = json.loads(timings.read_text()) if timings.exists() else {}
            write_json_atomic(timings, {**previous, name: self.times[name]})

    def labels(self) -> dict:
        from .labels import read_labels

        return read_labels(self.photos / "labels.json")

    def training_labels(self) -> dict:
        """The labels of the training captions and triplets (Settings.training_labels), for the photos of this run."""
        measured = self.labels()
        if not self.settings.training_labels:
            return measured
        from .labels import read_labels

        path = self.source_photos / self.settings.training_labels
        if not path.exists():
            raise UserError(f"no training labels {path} (Settings.training_labels; None trains on labels.json)")
        source = read_labels(path)
        here = {p["path"] for p in measured["photos"]}
        return {**source, "photos": [p for p in source["photos"] if p["path"] in here]}

    def train_clip(self) -> None:
        from .clip_train import ClipTrainConfig, train_clip
        from .labels import write_labels

        labels = self.path("training-labels.json")
        write_labels(self.training_labels(), labels)
        config = ClipTrainConfig(
            **{
                **self.settings.clip.to_dict(),
                "photos": str(self.photos),
                "labels": str(labels),
                "out": str(self.out / "clip"),
                "seed": self.seed,
            }
        )
        train_clip(config, resume=True, device=self.device, progress=self.progress)

    def demo_model(self, weights: Path | None = None):
        from ..factory import create_model

        return create_model(self.model_spec(weights))

    def zero_shot(self) -> None:
        from .zero_shot import zero_shot

        report = zero_shot(self.demo_model(), self.photos, self.labels(), "test", progress=self.progress)
        self.say(report.markdown().split("\n")[0])
        write_text_atomic(self.path("zero-shot.md"), report.markdown())
        write_json_atomic(self.path("zero-shot.json"), report.to_dict())

    def captions(self) -> None:
        from .captions import write_captions

        write_captions(
            self.training_labels(),
            "train",
            self.path("captions-train.jsonl"),
            self.seed,
            forms="fti4cir",
            photos_root=self.photos,
            progress=self.progress,
        )

    def pairs(self) -> None:
        from ..training.caption_split import TORN_NOTICE, split_captions_file

        source = self.path("captions-train.jsonl")
        done = split_captions_file(source, self.path("pairs-train.jsonl"))
        if done.torn:
            log.warning(TORN_NOTICE.format(source=source))
        self.say(f"{self.path('pairs-train.jsonl')}: kept {len(done.result.pairs)} of {done.captions} captions")

    def train_fti4cir(self) -> None:
        from ..training.trainer import TrainConfig, train

        s = self.settings
        run = self.path("fti4cir")
        config = TrainConfig(
            images=str(self.photos / "train"),
            pairs=str(self.path("pairs-train.jsonl")),
            out=str(run),
            backbone=DEMO_MODEL,
            pretrained=str(self.clip_weights),
            cache_dir=str(self.cache),
            epochs=s.fti4cir_epochs,
            batch_size=s.fti4cir_batch,
            lr=s.fti4cir_lr,
            lr_decay_epoch=max(s.fti4cir_epochs * 3 // 4, 1),
            reg_weight=s.fti4cir_reg_weight,
            subject_weight=s.fti4cir_subject_weight,
            seed=self.seed,
        )
        result = train(config, resume=(run / "checkpoint.json").exists(), device=self.device, progress=self.progress)
        self.say(f"wrote {result.weights}")

    def _m2c(self, stage: int, model, data, train_stage) -> None:
        from ..training.m2c.options import TrainOptions

        s = self.settings
        out = self.path(f"m2c-stage{stage}.safetensors")
        options = TrainOptions(
            epochs=s.m2c1_epochs if stage == 1 else s.m2c2_epochs,
            batch_size=s.m2c_batch,
            lr=s.m2c_lr if stage == 1 else s.m2c2_lr,
            warmup=0,
            augment=s.m2c_augment,
            views=s.m2c_views,
            seed=self.seed,
        )
        history = train_stage(
            model,
            *data,
            options,
            out=out,
            resume=out.with_suffix(".run").exists(),
            cache_dir=self.cache,
            progress=self.progress,
        )
        self.say(f"wrote {out} ({len(history)} epochs, final loss {history[-1].get('total', float('nan')):.4f})")
        write_text_atomic(self.path(f"m2c-stage{stage}.done"), f"{out.name}\n")

    def m2c_model(self, init: Path | None = None):
        """A stage's M2C model (random stage-I network, or `init`'s weights), as `fti4cir m2c-train` builds it."""
        from ..factory import create_model

        return create_model(
            self.model_spec(m2c_weights=str(init) if init else None, preprocess="targetpad", family="m2c")
        )

    def train_m2c1(self) -> None:
        from ..training.m2c.train import stage1_data, train_stage1

        paths, captions = stage1_data(self.photos / "train", self.path("captions-train.jsonl"))
        self._m2c(1, self.m2c_model(), (paths, captions), train_stage1)

    def triplets(self) -> None:
        from .benchmark import generate

        bench = generate(
            self.training_labels(), seed=self.seed, per_type=self.settings.triplets_per_type, split="train"
        )
        root = (self.photos / "train").resolve()
        records = []
        # one triplet per ground truth would weigh common targets: one target each, chosen by a stable hash (str
        # hash() differs between processes)
        for q in bench["queries"]:
            target = q["ground_truths"][zlib.crc32(f"{q['id']}/{self.seed}".encode()) % len(q["ground_truths"])]
            records.append({"reference": str(root / q["reference"]), "text": q["text"], "target": str(root / target)})
        write_text_atomic(self.path("triplets-train.jsonl"), "".join(json.dumps(r) + "\n" for r in records))

    def train_m2c2(self) -> None:
        from ..training.m2c.train import train_stage2
        from ..training.m2c.triplets import read_triplets

        model = self.m2c_model(self.path("m2c-stage1.safetensors"))
        model.net.add_adapters(None, self.settings.m2c2_adapter_rank)  # the official blocks scaled to this depth
        self._m2c(2, model, (read_triplets(self.path("triplets-train.jsonl")),), train_stage2)

    def compact(self) -> None:
        for src, dst in (
            (self.path("fti4cir/fti4cir.safetensors"), self.path(FTI4CIR_FILE)),
            (self.path("m2c-stage2.safetensors"), self.path(M2C_FILE)),
        ):
            copy_weights(src, dst, half=True)

    def gallery(self) -> None:
        summary = self.index(
            self.photos / "test",
            GALLERY,
            self.path("galleries"),
            self.model_spec(self.path(FTI4CIR_FILE), seed=COMMAND_SEED),
        )
        # the stage's own mark: an up-to-date gallery is left untouched, so its files' times say nothing
        write_text_atomic(self.path("gallery.done"), summary + "\n")

    def index(
        self, source: str | os.PathLike, name: str, galleries_dir: str | os.PathLike, spec, index: str = "auto"
    ) -> str:
        """Build the gallery `galleries_dir/name` of `source` with the model of `spec`, as `fti4cir index`."""
        from ..factory import create_model
        from ..gallery import build_gallery, folder_source, validate_name, weights_label

        validate_name(name)
        source = folder_source(str(source))  # before loading a model: a wrong path fails fast
        spec = spec.resolved()
        if spec.weights is not None and Path(spec.weights).exists():
            spec = spec.replace(weights=str(Path(spec.weights).resolve()))
        report = build_gallery(
            create_model(spec),
            source,
            name,
            galleries_dir=galleries_dir,
            index=index,
            weights=weights_label(spec.weights, spec.seed),
            progress=False,
        )
        summary = report.summary()
        self.say(summary)
        return summary

    def evaluate(self) -> None:
        from ..evaluation.report import to_markdown, write_report
        from ..evaluation.run import FeatureCache, default_methods, evaluate, load_parts, make_m2c_side
        from ..factory import create_model
        from ..m2c.model import read_m2c_config
        from .words import decoded_word_rates

        weights, m2c_weights = str(self.path(FTI4CIR_FILE)), str(self.path(M2C_FILE))
        methods = default_methods(read_m2c_config(m2c_weights))
        parts = load_parts("clothing-cir", self.benchmark_root, "test")
        model = create_model(self.model_spec(self.path(FTI4CIR_FILE), seed=COMMAND_SEED, m2c_weights=m2c_weights))
        cache = FeatureCache(model, self.cache)
        results = evaluate(
            model,
            "clothing-cir",
            parts,
            cache,
            methods=methods,
            weights=weights,
            m2c_side=make_m2c_side(model, cache, m2c_weights, model.preprocess_kind),
        )
        json_path, markdown_path = write_report(self.path("evaluate"), results)
        self.say(to_markdown(results))
        self.say(
            f"{results['features']['visual_passes']} visual passes, {results['seconds']:.1f} s; "
            f"wrote {json_path} and {markdown_path}"
        )

        rates = decoded_word_rates(
            self.demo_model(self.path(FTI4CIR_FILE)), self.photos, self.labels(), "test", progress=self.progress
        )
        write_json_atomic(self.path("benchmark.json"), {"decoded_words": rates})

    # ---- install --------------------------------------------------------------------------------------------------
    def install(self, weights_dir: str | os.PathLike = "weights", galleries_dir: str | os.PathLike = "galleries"):
        missing = [name for name, stage in self.stages().items() if not stage.done()]
        if missing:
            raise UserError(f"cannot install: stages not done yet: {', '.join(missing)}")
        weights_dir, galleries_dir = Path(weights_dir), Path(galleries_dir)
        weights_dir.mkdir(parents=True, exist_ok=True)
        clip = weights_dir / CLIP_FILE
        shutil.copyfile(self.clip_weights, clip)
        shutil.copyfile(self.clip_weights.with_suffix(".json"), clip.with_suffix(".json"))
        # the networks' configs name the CLIP they were trained on: the installed file beside them, not the run's
        for name in (FTI4CIR_FILE, M2C_FILE):
            copy_weights(self.path(name), weights_dir / name, pretrained=CLIP_FILE)
        write_text_atomic(weights_dir / REPORT, self.report())
        definition = galleries_dir / f"{GALLERY}.json"
        rel = lambda p: os.path.relpath(Path(p).resolve(), galleries_dir.resolve())  # noqa: E731
        write_json_atomic(
            definition,
            {
                "description": "The embedded demo: the clothing test photos indexed with the demo model "
                "(fti4cir demo-rebuild --install)",
                "source": rel(self.photos / "test"),
                "backbone": DEMO_MODEL,
                "pretrained": rel(weights_dir / CLIP_FILE),
                "weights": rel(weights_dir / FTI4CIR_FILE),
                "m2c_weights": rel(weights_dir / M2C_FILE),
            },
        )
        target = galleries_dir / GALLERY
        if target.exists():  # rebuilt from scratch: a gallery keeps old versions, the repository needs one
            shutil.rmtree(target)
        self.index_definition(definition)
        self.say(f"installed weights into {weights_dir} and gallery '{GALLERY}' into {galleries_dir}")

    def index_definition(self, definition: Path) -> None:
        """`fti4cir index --definition DEFINITION`: the gallery a definition file describes, beside it."""
        from ..gallery import read_definition

        values = read_definition(definition)
        spec = self.model_spec(seed=COMMAND_SEED).replace(
            **{key: values[key] for key in ("backbone", "pretrained", "weights", "preprocess") if key in values}
        )
        self.index(values["source"], definition.stem, definition.parent, spec, values.get("index") or "auto")

    def report(self) -> str:
        """The measured numbers of this run, as Markdown: wall time per stage, zero-shot accuracy, the
        benchmark table, decoded-word hit rates."""
        from ..evaluation.intervals import describe, wilson_interval

        timings = json.loads(self.path("timings.json").read_text()) if self.path("timings.json").exists() else {}
        words = json.loads(self.path("benchmark.json").read_text())["decoded_words"]

        def interval(rate: float, photos: int) -> str:
            return f" ({describe(wilson_interval(round(rate * photos), photos))})"

        lines = [
            "# The demo model: measured numbers",
            "",
            "Written by `fti4cir demo-rebuild --install` from the run it installs (seed "
            f"{self.seed}); wall times on the machine that ran it.",
            "",
            "## Wall time per stage",
            "",
            "| stage | seconds |",
            "|---|---:|",
        ]
        # a stage whose output was put into the folder (a CLIP copied in, say) has no time of this run
        lines += [
            f"| {name} | {timings[name]:.0f} |" if name in timings else f"| {name} | not run in this folder |"
            for name in STAGES
        ]
        lines += [
            "",
            "## The CLIP, zero-shot",
            "",
            self.path("zero-shot.md").read_text().strip(),
            "",
            "## clothing-cir (held-out test photos)",
            "",
            (self.path("evaluate") / "results.md").read_text().strip(),
            "",
            "## Decoded words",
            "",
            f"Of {words['photos']} test photos, the subject token's nearest word is the class word for "
            f"{words['subject_is_class']:.1%}{interval(words['subject_is_class'], words['photos'])}; of the "
            f"{words['coloured_photos']} with a colour label, the colour word is among the top-3 words of a kept "
            f"attribute token for {words['colour_in_attribute_top3']:.1%}"
            f"{interval(words['colour_in_attribute_top3'], words['coloured_photos'])}. Intervals: Wilson.",
            "",
        ]
        return "\n".join(lines)
