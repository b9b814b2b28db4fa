"""`fti4cir demo-rebuild`: every learned file of the embedded demo, from the committed photos, in one command.

Stages (each one skipped when its output exists; the training stages resume from their last checkpoint after a
kill, so rerunning the command continues where it stopped):

1. ``clip``      a small CLIP trained from scratch on the train photos (`fti4cir.demo.clip_train`)
2. ``zero-shot`` its class and colour accuracy on the test photos, with confusion matrices
3. ``captions``  one garment-first caption per train photo (`fti4cir demo-captions --forms fti4cir`)
4. ``pairs``     subject / attribute pairs (`fti4cir split-captions`, spaCy)
5. ``fti4cir``   the inversion network (`fti4cir train`, features cached once)
6. ``m2c-1``     M2C stage I on the train photos and their captions (`fti4cir m2c-train --stage 1`)
7. ``triplets``  train-split triplets from the labels (colour, class and both changes; M2C stage II only)
8. ``m2c-2``     M2C stage II (`fti4cir m2c-train --stage 2`)
9. ``compact``   fp16 copies of the FTI4CIR and M2C weights: the files that ship (the CLIP is saved in fp16 already);
                 the gallery and the benchmark use them, so the numbers are those of the shipped files
10. ``gallery``  the demo gallery of the test photos (`fti4cir index`)
11. ``benchmark`` clothing-cir, every method in one table (`fti4cir evaluate`), and the decoded-word hit rates

Everything is seeded. No reference/target pair enters the CLIP or FTI4CIR training (zero-shot); only M2C stage II
uses triplets, and those come from the train photos: the benchmark's test photos are never trained on.

`--quick` runs the same stages on a few photos per class with a handful of steps (seconds to a minute: for CI).
`--install` copies the results into `weights/` and `galleries/` (the embedded default) when all stages are done.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..atomic import write_json_atomic, write_text_atomic
from ..errors import UserError
from .clip_train import DEMO_MODEL, ClipTrainConfig, train_clip

STAGES = ("clip", "zero-shot", "captions", "pairs", "fti4cir", "m2c-1", "triplets", "m2c-2", "compact", "gallery",
          "benchmark")
GALLERY = "clothing"
REPORT = "clothing-report.md"
CLIP_FILE, FTI4CIR_FILE, M2C_FILE = "clothing-clip.safetensors", "clothing-fti4cir.safetensors", \
    "clothing-m2c.safetensors"


@dataclass
class Settings:
    """Sizes of each stage: the full demo, or --quick."""

    clip: ClipTrainConfig = field(default_factory=ClipTrainConfig)
    fti4cir_epochs: int = 30
    fti4cir_batch: int = 128
    fti4cir_lr: float = 5e-4
    m2c1_epochs: int = 10
    m2c2_epochs: int = 10
    m2c_batch: int = 128
    m2c_lr: float = 5e-4
    m2c_augment: tuple[str, ...] = ("--augment", "views", "--views", "4")  # 4 crops per photo, cached
    triplets_per_type: int = 1000
    per_class: int = 0  # quick runs: photos per class and split for every stage (0: all)
    benchmark_queries: int = 0  # quick runs: queries of the benchmark generated from those photos

    @classmethod
    def quick(cls) -> "Settings":
        return cls(clip=ClipTrainConfig(epochs=2, batch_size=16), fti4cir_epochs=1, fti4cir_batch=16,
                   m2c1_epochs=1, m2c2_epochs=1, m2c_batch=16, m2c_augment=("--augment", "none"),
                   triplets_per_type=8, benchmark_queries=9, per_class=6)


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


def half_precision_copy(src: Path, dst: Path) -> None:
    """`src` (.safetensors + .json) with its floating-point tensors in fp16 (loading casts them back to the
    network's fp32): half the bytes in the repository."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..atomic import atomic_path

    with safe_open(str(src), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    with atomic_path(dst.with_suffix(".json")) as tmp:
        shutil.copyfile(src.with_suffix(".json"), tmp)
    with atomic_path(dst) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _cli(argv: list[str]) -> None:
    from ..cli import main

    code = main([str(a) for a in argv])
    if code:
        raise UserError(f"stage `fti4cir {argv[0]}` failed (exit {code})")


class Rebuild:
    def __init__(self, out: str | os.PathLike, photos: str | os.PathLike = "data/clothing",
                 benchmark: str | os.PathLike = "data/clothing-cir", settings: Settings | None = None,
                 seed: int = 0, device: str | None = None, progress: bool = True):
        self.out, self.photos, self.benchmark_root = Path(out), Path(photos), Path(benchmark)
        self.settings, self.seed, self.device, self.progress = settings or Settings(), seed, device, progress
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
            write_benchmark(generate(labels, seed=self.seed, per_type=self.settings.benchmark_queries // 3),
                            queries, subset)
        self.photos, self.benchmark_root = subset, queries.parent

    # ---- paths ----------------------------------------------------------------------------------------------------
    @property
    def clip_weights(self) -> Path:
        return self.out / "clip" / "clip.safetensors"

    def path(self, name: str) -> Path:
        return self.out / name

    def model_flags(self) -> list[str]:
        flags = ["--backbone", DEMO_MODEL, "--pretrained", self.clip_weights]
        return flags + (["--device", self.device] if self.device else [])

    # ---- stages ---------------------------------------------------------------------------------------------------
    def stages(self) -> dict[str, tuple[Path, Callable[[], None]]]:
        return {
            "clip": (self.clip_weights, self.train_clip),
            "zero-shot": (self.path("zero-shot.json"), self.zero_shot),
            "captions": (self.path("captions-train.jsonl"), self.captions),
            "pairs": (self.path("pairs-train.jsonl"), self.pairs),
            "fti4cir": (self.path("fti4cir/fti4cir.safetensors"), self.train_fti4cir),
            "m2c-1": (self.path("m2c-stage1.done"), self.train_m2c1),
            "triplets": (self.path("triplets-train.jsonl"), self.triplets),
            "m2c-2": (self.path("m2c-stage2.done"), self.train_m2c2),
            "compact": (self.path(M2C_FILE), self.compact),
            "gallery": (self.path(f"galleries/{GALLERY}/CURRENT"), self.gallery),
            "benchmark": (self.path("benchmark.json"), self.evaluate),
        }

    def run(self, only: list[str] | None = None) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for name, (output, stage) in self.stages().items():
            if only and name not in only:
                continue
            if output.exists():
                print(f"[{name}] done ({output})")
                continue
            print(f"[{name}] running")
            started = time.monotonic()
            stage()
            self.times[name] = round(time.monotonic() - started, 1)
            print(f"[{name}] finished in {self.times[name]:.0f} s")
            timings = self.path("timings.json")
            previous = json.loads(timings.read_text()) if timings.exists() else {}
            write_json_atomic(timings, {**previous, name: self.times[name]})

    def labels(self) -> dict:
        from .labels import read_labels

        return read_labels(self.photos / "labels.json")

    def train_clip(self) -> None:
        config = ClipTrainConfig(**{**self.settings.clip.to_dict(), "photos": str(self.photos),
                                    "out": str(self.out / "clip"), "seed": self.seed})
        train_clip(config, resume=True, device=self.device, progress=self.progress)

    def demo_model(self, weights: Path | None = None):
        from ..factory import create_model

        return create_model(DEMO_MODEL, str(self.clip_weights), str(weights) if weights else None,
                            device=self.device, seed=self.seed)

    def zero_shot(self) -> None:
        from .zero_shot import zero_shot

        report = zero_shot(self.demo_model(), self.photos, self.labels(), "test", progress=self.progress)
        print(report.markdown().split("\n")[0])
        write_text_atomic(self.path("zero-shot.md"), report.markdown())
        write_json_atomic(self.path("zero-shot.json"), report.to_dict())

    def captions(self) -> None:
        from .captions import write_captions

        write_captions(self.labels(), "train", self.path("captions-train.jsonl"), self.seed, forms="fti4cir",
                       photos_root=self.photos, progress=self.progress)

    def pairs(self) -> None:
        _cli(["split-captions", self.path("captions-train.jsonl"), "--out", self.path("pairs-train.jsonl")])

    def train_fti4cir(self) -> None:
        s = self.settings
        run = self.path("fti4cir")
        resume = ["--resume"] if (run / "checkpoint.json").exists() else []
        _cli(["train", "--images", self.photos / "train", "--pairs", self.path("pairs-train.jsonl"), "--out", run,
              "--cache-dir", self.cache, "--epochs", s.fti4cir_epochs, "--batch-size", s.fti4cir_batch,
              "--lr", s.fti4cir_lr, "--lr-decay-epoch", max(s.fti4cir_epochs * 3 // 4, 1), "--seed", self.seed,
              *self.model_flags(), *resume])

    def _m2c(self, stage: int, extra: list) -> None:
        s = self.settings
        out = self.path(f"m2c-stage{stage}.safetensors")
        resume = ["--resume"] if out.with_suffix(".run").exists() else []
        _cli(["m2c-train", "--stage", stage, "--out", out, "--epochs", s.m2c1_epochs if stage == 1 else
              s.m2c2_epochs, "--batch-size", s.m2c_batch, "--lr", s.m2c_lr, "--warmup", 0,
              *s.m2c_augment, "--cache-dir", self.cache, "--seed", self.seed,
              "--preprocess", "targetpad", *self.model_flags(), *extra, *resume])
        write_text_atomic(self.path(f"m2c-stage{stage}.done"), f"{out.name}\n")

    def train_m2c1(self) -> None:
        captions = self.path("captions-train.jsonl")
        self._m2c(1, ["--images", self.photos / "train", "--captions", captions])

    def triplets(self) -> None:
        from .benchmark import generate

        bench = generate(self.labels(), seed=self.seed, per_type=self.settings.triplets_per_type, split="train")
        root = (self.photos / "train").resolve()
        records = []
        for q in bench["queries"]:  # one triplet per ground truth would weigh common targets; one target each
            target = q["ground_truths"][hash((q["id"], self.seed)) % len(q["ground_truths"])]
            records.append({"reference": str(root / q["reference"]), "text": q["text"],
                            "target": str(root / target)})
        write_text_atomic(self.path("triplets-train.jsonl"), "".join(json.dumps(r) + "\n" for r in records))

    def train_m2c2(self) -> None:
        self._m2c(2, ["--triplets", self.path("triplets-train.jsonl"),
                      "--init", self.path("m2c-stage1.safetensors")])

    def compact(self) -> None:
        for src, dst in ((self.path("fti4cir/fti4cir.safetensors"), self.path(FTI4CIR_FILE)),
                         (self.path("m2c-stage2.safetensors"), self.path(M2C_FILE))):
            half_precision_copy(src, dst)

    def gallery(self) -> None:
        photos = self.photos / "test"
        _cli(["index", photos, "--name", GALLERY, "--galleries-dir", self.path("galleries"), *self.model_flags(),
              "--weights", self.path(FTI4CIR_FILE), "--quiet"])

    def evaluate(self) -> None:
        _cli(["evaluate", "--dataset", "clothing-cir", "--root", self.benchmark_root, "--out",
              self.path("evaluate"), "--cache-dir", self.cache, "--m2c-preprocess", "targetpad",
              "--weights", self.path(FTI4CIR_FILE), "--m2c-weights", self.path(M2C_FILE), *self.model_flags()])
        from .words import decoded_word_rates

        rates = decoded_word_rates(self.demo_model(self.path(FTI4CIR_FILE)), self.photos,
                                   self.labels(), "test", progress=self.progress)
        write_json_atomic(self.path("benchmark.json"), {"decoded_words": rates})

    # ---- install --------------------------------------------------------------------------------------------------
    def install(self, weights_dir: str | os.PathLike = "weights", galleries_dir: str | os.PathLike = "galleries"):
        missing = [name for name, (output, _) in self.stages().items() if not output.exists()]
        if missing:
            raise UserError(f"cannot install: stages not done yet: {', '.join(missing)}")
        weights_dir, galleries_dir = Path(weights_dir), Path(galleries_dir)
        pairs = [(self.clip_weights, weights_dir / CLIP_FILE), (self.path(FTI4CIR_FILE), weights_dir / FTI4CIR_FILE),
                 (self.path(M2C_FILE), weights_dir / M2C_FILE)]
        for src, dst in pairs:
            for a, b in ((src, dst), (src.with_suffix(".json"), dst.with_suffix(".json"))):
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(a, b)
        write_text_atomic(weights_dir / REPORT, self.report())
        definition = galleries_dir / f"{GALLERY}.json"
        rel = lambda p: os.path.relpath(Path(p).resolve(), galleries_dir.resolve())  # noqa: E731
        write_json_atomic(definition, {
            "description": "The embedded demo: the clothing test photos indexed with the demo model "
                           "(fti4cir demo-rebuild --install)",
            "source": rel(self.photos / "test"), "backbone": DEMO_MODEL, "pretrained": rel(weights_dir / CLIP_FILE),
            "weights": rel(weights_dir / FTI4CIR_FILE), "m2c_weights": rel(weights_dir / M2C_FILE)})
        target = galleries_dir / GALLERY
        if target.exists():  # rebuilt from scratch: a gallery keeps old versions, the repository needs one
            shutil.rmtree(target)
        _cli(["index", "--definition", definition, "--quiet", *(["--device", self.device] if self.device else [])])
        print(f"installed weights into {weights_dir} and gallery '{GALLERY}' into {galleries_dir}")

    def report(self) -> str:
        """The measured numbers of this run, as Markdown: wall time per stage, zero-shot accuracy, the
        benchmark table, decoded-word hit rates."""
        timings = json.loads(self.path("timings.json").read_text()) if self.path("timings.json").exists() else {}
        words = json.loads(self.path("benchmark.json").read_text())["decoded_words"]
        lines = ["# The demo model: measured numbers", "",
                 "Written by `fti4cir demo-rebuild --install` from the run it installs (seed "
                 f"{self.seed}); wall times on the machine that ran it.", "",
                 "## Wall time per stage", "", "| stage | seconds |", "|---|---:|"]
        lines += [f"| {name} | {seconds:.0f} |" for name, seconds in timings.items()]
        lines += ["", "## The CLIP, zero-shot", "", self.path("zero-shot.md").read_text().strip(), "",
                  "## clothing-cir (held-out test photos)", "",
                  (self.path("evaluate") / "results.md").read_text().strip(), "", "## Decoded words", "",
                  f"Of {words['photos']} test photos, the subject token's nearest word is the class word for "
                  f"{words['subject_is_class']:.1%}; of the {words['coloured_photos']} with a colour label, the colour "
                  f"word is among the top-3 words of a kept attribute token for {words['colour_in_attribute_top3']:.1%}.",
                  ""]
        return "\n".join(lines)
