"""Agreement of the colour labeller with a person's reading (data/clothing/colour_check.csv), of two persons with
each other (data/clothing/colour_check_second_reading.csv), and what a labeller change would do to labels.json. The
command line is `python -m fti4cir.commands.colour_check`.

The csv has one row per photo: `path` (relative to the photo folder), `set` (check, dev: the 120 photos the rules
were tuned on; tune: 80 more photos used to set version 4's rules; fresh: 80 photos drawn at random later and read
before the labeller's answer was looked at, never used for tuning), `labeller` / `labeller_confidence` / `labelled`
/ `agree` (labels.json's answer when the row was written), `human` (the person's reading), `ambiguous` (1 when a
person would hesitate) and `notes`.
Agreement is measured over all photos of a set, over the ones the labeller labels (not null) and the same without
the ambiguous ones; coverage is the labelled share.

The second reading (`path`, `human`, `ambiguous`, `notes`) is another person's reading of the check and fresh
photos, blind to the labels and to the first reading: how often two persons agree is the ceiling to hold the
labeller to.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path

from PIL import Image

DEFAULT_PHOTOS = Path(__file__).resolve().parents[2] / "data" / "clothing"
CHECK = "colour_check.csv"
SECOND_READING = "colour_check_second_reading.csv"
SETS = {
    "old (check + dev)": ("check", "dev"),
    "tune": ("tune",),
    "fresh (held out)": ("fresh",),
    "all": ("check", "dev", "tune", "fresh"),
}
PERSON_SETS = {"check": ("check",), "fresh": ("fresh",), "both": ("check", "fresh")}


def read_check(path: str | Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def read_second(path: str | Path) -> dict[str, dict]:
    """path -> row (`human`, `ambiguous`, `notes`) of the second reading."""
    return {r["path"]: r for r in read_check(path)}


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
    """path -> (colour guess, labelled: `colour` not null) of the answers stored in labels.json."""
    return {p["path"]: (p["colour_guess"], p["colour"] is not None) for p in labels["photos"]}


def write_stored(path: str | Path, rows: list[dict], labels: dict) -> None:
    """Rewrite the labeller columns of the check csv from `labels` (the person's columns are left as they are)."""
    from ..atomic import write_text_atomic

    stored = {p["path"]: p for p in labels["photos"]}
    fields = list(rows[0])
    for r in rows:
        p = stored[r["path"]]
        r.update(
            labeller=p["colour_guess"],
            agree=str(int(p["colour_guess"] == r["human"])),
            labeller_confidence=str(p["confidence"]),
            labelled=str(int(p["colour"] is not None)),
        )
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, out.getvalue())


def _zeros(keys: str) -> dict[str, int]:
    return dict.fromkeys(keys.split(), 0)


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
    return {**_zeros("n agree labelled labelled_agree clear clear_agree"), **out, "pairs": pairs}


def persons_agreement(rows: list[dict], second: dict[str, dict], answers: dict[str, tuple[str, bool]]) -> dict:
    """Two persons and the labeller, over the rows of `rows` that `second` also reads. Counts: n, agree (the two
    readings name the same colour), clear (neither reading marked ambiguous), clear_agree; on the photos the labeller
    labels (`answers`' reliable): labelled, first / second (the labeller names the first / second reading's colour),
    both (the two readings agree), both_agree (the labeller names that colour too); pairs: (first, second) -> n for
    the readings' disagreements."""
    out = Counter()
    pairs = Counter()
    for r in rows:
        other = second.get(r["path"])
        if other is None:
            continue
        same = r["human"] == other["human"]
        out["n"] += 1
        out["agree"] += same
        if r["ambiguous"] != "1" and other["ambiguous"] != "1":
            out["clear"] += 1
            out["clear_agree"] += same
        if not same:
            pairs[(r["human"], other["human"])] += 1
        guess, reliable = answers[r["path"]]
        if reliable:
            out["labelled"] += 1
            out["first"] += guess == r["human"]
            out["second"] += guess == other["human"]
            if same:
                out["both"] += 1
                out["both_agree"] += guess == r["human"]
    return {**_zeros("n agree clear clear_agree labelled first second both both_agree"), **out, "pairs": pairs}


def _pct(a: int, b: int) -> str:
    return f"{a}/{b} = {100 * a / b:.1f}%" if b else "-"


def report(rows: list[dict], answers: dict[str, tuple[str, bool]], title: str) -> str:
    lines = [
        f"## {title}",
        "",
        "| photos | all | labelled (not null) | labelled, unambiguous | coverage |",
        "|---|---:|---:|---:|---:|",
    ]
    stats = {name: agreement([r for r in rows if r["set"] in sets], answers) for name, sets in SETS.items()}
    for name, s in stats.items():
        lines.append(
            f"| {name} | {_pct(s['agree'], s['n'])} | {_pct(s['labelled_agree'], s['labelled'])} | "
            f"{_pct(s['clear_agree'], s['clear'])} | {_pct(s['labelled'], s['n'])} |"
        )
    for name, s in stats.items():
        if name == "all":
            continue
        pairs = s["pairs"]
        text = ", ".join(
            f"{h}->{g}{'' if rel else ' (null)'} {n}"
            for (h, g, rel), n in sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        )
        lines.append(f"\n{name} disagreements (person -> labeller): {text or 'none'}")
    return "\n".join(lines)


def persons_report(
    rows: list[dict], second: dict[str, dict], answers: dict[str, tuple[str, bool]], labeller: str
) -> str:
    """The "Two persons" section: the two readings' agreement per set, and the labeller (`labeller` names it) against
    each reading and where they agree."""
    lines = [
        "## Two persons",
        "",
        f"First reading: {CHECK}'s `human`; second reading: {SECOND_READING} (another person, blind to the labels "
        f"and to the first reading). Labeller: {labeller}, on the photos it labels (not null).",
        "",
        "| photos | persons agree | neither reading ambiguous | labelled | labeller = first | labeller = second "
        "| labeller, where the persons agree |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    stats = {
        name: persons_agreement([r for r in rows if r["set"] in sets], second, answers)
        for name, sets in PERSON_SETS.items()
    }
    for name, s in stats.items():
        lines.append(
            f"| {name} ({s['n']}) | {_pct(s['agree'], s['n'])} | {_pct(s['clear_agree'], s['clear'])} | "
            f"{_pct(s['labelled'], s['n'])} | {_pct(s['first'], s['labelled'])} | "
            f"{_pct(s['second'], s['labelled'])} | {_pct(s['both_agree'], s['both'])} |"
        )
    for name, s in stats.items():
        if name == "both":
            continue
        pairs = s["pairs"]
        text = ", ".join(f"{a}->{b} {n}" for (a, b), n in sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0])))
        lines.append(f"\n{name} disagreements (first -> second reading): {text or 'none'}")
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
    keys = "photos null_before null_after guess_changed colour_changed word_changed"
    return {**_zeros(keys), **out, "moves": moves}


def changes_report(changes: dict) -> str:
    """The `label_changes` counts as text."""
    c = changes
    n = c["photos"]
    top = ", ".join(f"{a or 'null'}->{b or 'null'} {k}" for (a, b), k in c["moves"].most_common(20))
    return (
        f"## labels.json if relabelled with the code\n\n{n} photos: colour (null included) would "
        f"change for {c['colour_changed']}, of which {c['word_changed']} from one word to another; the guess "
        f"changes for {c['guess_changed']}; null {c['null_before']} -> {c['null_after']} (coverage "
        f"{_pct(n - c['null_before'], n)} -> {_pct(n - c['null_after'], n)})\n"
        f"most frequent changes: {top or 'none'}"
    )
