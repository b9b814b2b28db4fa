"""Agreement of the colour labeller with a person's reading (data/clothing/colour_check.csv), and what a labeller
change would do to labels.json.

    python -m fti4cir.demo.colour_check                 # the labeller in the code vs the person, per set
    python -m fti4cir.demo.colour_check --stored        # the same for the answers stored in labels.json
    python -m fti4cir.demo.colour_check --changes       # + how many labels.json labels the code would change
    python -m fti4cir.demo.colour_check --write         # after `fti4cir demo-labels`: the csv's labeller columns

The csv has one row per photo: `path` (relative to the photo folder), `set` (check, dev: the 120 photos the rules
were tuned on; fresh: 80 photos drawn at random later and read before the labeller's answer was looked at, never
used for tuning), `labeller` / `labeller_confidence` / `labelled` / `agree` (labels.json's answer when the row was
written), `human` (the person's reading), `ambiguous` (1 when a person would hesitate) and `notes`.
Agreement is measured over all photos of a set, over the ones the labeller labels (not null) and the same without
the ambiguous ones; coverage is the labelled share.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
from collections import Counter
from pathlib import Path

from PIL import Image

DEFAULT_PHOTOS = Path(__file__).resolve().parents[2] / "data" / "clothing"
SETS = {"old (check + dev)": ("check", "dev"), "tune": ("tune",), "fresh (held out)": ("fresh",),
        "all": ("check", "dev", "tune", "fresh")}


def read_check(path: str | Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def live_answers(rows: list[dict], photos: str | Path) -> dict[str, tuple[str, bool]]:
    """path -> (colour guess, reliable) of the labeller in the code."""
    from .colours import garment_colour

    answers = {}
    for r in rows:
        with Image.open(Path(photos) / r["path"]) as image:
            label = garment_colour(image)
        answers[r["path"]] = (label.colour, label.reliable)
    return answers


def stored_answers(labels: dict) -> dict[str, tuple[str, bool]]:
    return {p["path"]: (p["colour_guess"], p["colour"] is not None) for p in labels["photos"]}


def write_stored(path: str | Path, rows: list[dict], labels: dict) -> None:
    """Rewrite the labeller columns of the check csv from `labels` (the person's columns are left as they are)."""
    from ..atomic import write_text_atomic

    stored = {p["path"]: p for p in labels["photos"]}
    fields = list(rows[0])
    for r in rows:
        p = stored[r["path"]]
        r.update(labeller=p["colour_guess"], agree=str(int(p["colour_guess"] == r["human"])),
                 labeller_confidence=str(p["confidence"]), labelled=str(int(p["colour"] is not None)))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, out.getvalue())


def agreement(rows: list[dict], answers: dict[str, tuple[str, bool]]) -> dict:
    """Counts over `rows`: n, agree, labelled, labelled_agree, clear (labelled, unambiguous), clear_agree, pairs."""
    out = Counter()
    pairs = Counter()
    for r in rows:
        guess, reliable = answers[r["path"]]
        hit = guess == r["human"]
        out["n"] += 1
        out["agree"] += hit
        if reliable:
            out["labelled"] += 1
            out["labelled_agree"] += hit
            if r["ambiguous"] != "1":
                out["clear"] += 1
                out["clear_agree"] += hit
        if not hit:
            pairs[(r["human"], guess, reliable)] += 1
    return {**out, "pairs": pairs}


def _pct(a: int, b: int) -> str:
    return f"{a}/{b} = {100 * a / b:.1f}%" if b else "-"


def report(rows: list[dict], answers: dict[str, tuple[str, bool]], title: str) -> str:
    lines = [f"## {title}", "", "| photos | all | labelled (not null) | labelled, unambiguous | coverage |",
             "|---|---:|---:|---:|---:|"]
    for name, sets in SETS.items():
        s = agreement([r for r in rows if r["set"] in sets], answers)
        lines.append(f"| {name} | {_pct(s['agree'], s['n'])} | {_pct(s['labelled_agree'], s['labelled'])} | "
                     f"{_pct(s['clear_agree'], s['clear'])} | {_pct(s['labelled'], s['n'])} |")
    for name, sets in SETS.items():
        if name == "all":
            continue
        pairs = agreement([r for r in rows if r["set"] in sets], answers)["pairs"]
        text = ", ".join(f"{h}->{g}{'' if rel else ' (null)'} {n}"
                         for (h, g, rel), n in sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0])))
        lines.append(f"\n{name} disagreements (person -> labeller): {text or 'none'}")
    return "\n".join(lines)


def label_changes(labels: dict, photos: str | Path, *, progress: bool = True) -> dict:
    """What the labeller in the code would change in `labels` (computed in memory; nothing is written)."""
    from tqdm import tqdm

    from .colours import garment_colour

    out = Counter()
    moves = Counter()
    for p in tqdm(labels["photos"], desc="relabel", unit="photo", disable=not progress):
        with Image.open(Path(photos) / p["path"]) as image:
            label = garment_colour(image)
        new = label.colour if label.reliable else None
        out["photos"] += 1
        out["null_before"] += p["colour"] is None
        out["null_after"] += new is None
        out["guess_changed"] += label.colour != p["colour_guess"]
        if new != p["colour"]:
            out["colour_changed"] += 1
            moves[(p["colour"], new)] += 1
            if p["colour"] is not None and new is not None:
                out["word_changed"] += 1
    return {**out, "moves": moves}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", default=str(DEFAULT_PHOTOS), help="photo folder (default %(default)s)")
    parser.add_argument("--check", default=None, help="check csv (default PHOTOS/colour_check.csv)")
    parser.add_argument("--stored", action="store_true", help="also measure the answers stored in labels.json")
    parser.add_argument("--write", action="store_true",
                        help="rewrite the csv's labeller, agree, labeller_confidence and labelled columns from "
                             "labels.json (after `fti4cir demo-labels`; the readings are kept)")
    parser.add_argument("--changes", action="store_true",
                        help="relabel every photo in memory and count the labels.json labels that would change")
    args = parser.parse_args(argv)
    photos = Path(args.photos)
    check = Path(args.check or photos / "colour_check.csv")
    rows = read_check(check)
    labels = json.loads((photos / "labels.json").read_text(encoding="utf-8"))
    if args.write:
        write_stored(check, rows, labels)
        print(f"wrote the labels.json answers into {check}")
    if args.stored:
        version = labels.get("generator", {}).get("version")
        print(report(rows, stored_answers(labels), f"labels.json (labeller version {version})"), "\n")
    from .labels import LABELS_VERSION

    print(report(rows, live_answers(rows, photos), f"labeller in the code (version {LABELS_VERSION})"))
    if args.changes:
        c = label_changes(labels, photos)
        n = c["photos"]
        print(f"\n## labels.json if relabelled with the code\n\n{n} photos: colour (null included) would "
              f"change for {c['colour_changed']}, of which {c['word_changed']} from one word to another; the guess "
              f"changes for {c['guess_changed']}; null {c['null_before']} -> {c['null_after']} (coverage "
              f"{_pct(n - c['null_before'], n)} -> {_pct(n - c['null_after'], n)})")
        top = ", ".join(f"{a or 'null'}->{b or 'null'} {n}" for (a, b), n in c["moves"].most_common(20))
        print(f"most frequent changes: {top}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
