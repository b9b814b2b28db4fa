"""Composed-retrieval triplets for M2C stage II: the JSONL format, its reader, and a synthetic builder
(`fti4cir triplets`).

One JSON object per line (blank lines are ignored):

    {"reference": "imgs/a.jpg", "text": "is red", "target": "imgs/b.jpg",
     "reference_caption": "a photo of a shirt", "target_caption": "...", "ground_truths": ["imgs/b.jpg", ...]}

- `reference`, `target`: image paths, absolute or relative to the JSONL file's folder (required);
- `text`: the modification text; may be left out when `target_caption` is given, which is then used as the text
  (the CompoDiff-style triplets of the official code: "a photo of * that {target caption}");
- `reference_caption` (optional): a caption of the reference for the soft text alignment (KL) term;
- `ground_truths` (optional, for evaluation): every acceptable target; default: just `target`.

`fti4cir triplets FOLDER --out FILE` builds low-quality synthetic triplets from a folder of class subfolders: the
reference is an image of class A, the text "as a {class B}", the target an image of class B, the reference caption
"a photo of a {class A}" (class-name captions, so both stages run offline without a captioner).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from ...atomic import write_text_atomic
from ...errors import UserError
from ...imagefiles import list_images

TEXT_TEMPLATE = "as a {label}"
CLASS_CAPTION = "a photo of a {label}"


@dataclass(frozen=True)
class Triplet:
    reference: Path
    text: str
    target: Path
    reference_caption: str | None = None
    ground_truths: tuple[Path, ...] = ()

    @property
    def answers(self) -> tuple[Path, ...]:
        return self.ground_truths or (self.target,)


def _string(record: dict, key: str, where: str, required: bool) -> str | None:
    value = record.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: '{key}' must be a non-empty string")
    return value


def parse_triplet(record, base: Path, where: str) -> Triplet:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object")

    def resolve(p):
        return Path(os.path.abspath(base / p))  # normalised: paths are compared

    reference = _string(record, "reference", where, True)
    target = _string(record, "target", where, True)
    text = _string(record, "text", where, False) or _string(record, "target_caption", where, False)
    if text is None:
        raise UserError(f"{where}: needs a 'text' (or a 'target_caption' to use as the text)")
    truths = record.get("ground_truths", [])
    if not isinstance(truths, list) or not all(isinstance(t, str) and t for t in truths):
        raise UserError(f"{where}: 'ground_truths' must be a list of image paths")
    return Triplet(
        resolve(reference),
        text.strip(),
        resolve(target),
        _string(record, "reference_caption", where, False),
        tuple(resolve(t) for t in truths),
    )


def read_triplets(path: str | os.PathLike) -> list[Triplet]:
    """All triplets of a JSONL file; any malformed line raises a UserError naming the line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"Cannot read triplets file {path}: {e}") from e
    triplets = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from e
        triplets.append(parse_triplet(record, path.parent, where))
    if not triplets:
        raise UserError(f"{path} holds no triplets")
    return triplets


def class_label(folder_name: str) -> str:
    return folder_name.replace("_", " ").strip()


def labelled_images(root: str | os.PathLike) -> dict[str, list[Path]]:
    """Images of a folder grouped by their top-level subfolder (the class), classes sorted."""
    root = Path(root)
    groups: dict[str, list[Path]] = {}
    for path in list_images(root):
        parts = path.relative_to(root).parts
        if len(parts) > 1:
            groups.setdefault(parts[0], []).append(path)
    return dict(sorted(groups.items()))


def build_triplets(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    per_reference: int = 1,
    seed: int = 0,
    template: str = TEXT_TEMPLATE,
    with_ground_truths: bool = False,
    max_per_class: int | None = None,
) -> list[dict]:
    """Synthetic triplet records (paths relative to `out_dir`): for every image of class A, `per_reference`
    triplets with a random other class B, the text `template` with {label} = B, a random target of class B.
    max_per_class: use a random sample of at most this many images per class (as references and as targets)."""
    groups = labelled_images(root)
    if len(groups) < 2:
        raise UserError(f"{root} needs at least two class subfolders with images (found {len(groups)})")
    if "{label}" not in template:
        raise UserError(f"The text template needs a {{label}} field: {template!r}")
    rng = random.Random(seed)
    if max_per_class is not None:
        groups = {c: sorted(rng.sample(paths, min(max_per_class, len(paths)))) for c, paths in groups.items()}

    def rel(p):
        return os.path.relpath(p, out_dir)

    classes = list(groups)
    records = []
    for a in classes:
        others = [c for c in classes if c != a]
        for reference in groups[a]:
            for _ in range(per_reference):
                b = rng.choice(others)
                record = {
                    "reference": rel(reference),
                    "text": template.replace("{label}", class_label(b)),
                    "target": rel(rng.choice(groups[b])),
                    "reference_caption": CLASS_CAPTION.replace("{label}", class_label(a)),
                }
                if with_ground_truths:
                    record["ground_truths"] = [rel(p) for p in groups[b]]
                records.append(record)
    return records


def write_triplets(records: list[dict], path: str | os.PathLike) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
