"""`python -m fti4cir.commands.colour_check`: how well the garment-colour labeller agrees with a person's reading
(data/clothing/colour_check.csv), per set, and how well two persons agree with each other (the second reading,
data/clothing/colour_check_second_reading.csv, printed when that file exists). The measures are in
`fti4cir.demo.colour_check`.

    python -m fti4cir.commands.colour_check                     # the labeller in the code vs the person, per set
    python -m fti4cir.commands.colour_check --stored            # + the same for the answers stored in labels.json
    python -m fti4cir.commands.colour_check --changes           # + how many labels.json labels the code would change
    python -m fti4cir.commands.colour_check --write             # after `fti4cir demo-labels`: the labeller columns
    python -m fti4cir.commands.colour_check --stored --changes  # data/clothing/colour_check_report.md
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fti4cir.commands.colour_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--photos", default=None, help="photo folder (default: the repository's data/clothing)")
    parser.add_argument("--check", default=None, help="check csv (default PHOTOS/colour_check.csv)")
    parser.add_argument(
        "--second",
        default=None,
        help="second reading csv (default PHOTOS/colour_check_second_reading.csv; its table is printed when it exists)",
    )
    parser.add_argument("--stored", action="store_true", help="also measure the answers stored in labels.json")
    parser.add_argument(
        "--write",
        action="store_true",
        help="rewrite the csv's labeller, agree, labeller_confidence and labelled columns from labels.json (after "
        "`fti4cir demo-labels`; the readings are kept)",
    )
    parser.add_argument(
        "--changes",
        action="store_true",
        help="relabel every photo in memory and count the labels.json labels that would change",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pathlib import Path

    from ..demo import colour_check as cc
    from ..demo.labels import LABELS_VERSION, read_labels

    photos = Path(args.photos) if args.photos else cc.DEFAULT_PHOTOS
    check = Path(args.check or photos / cc.CHECK)
    second = Path(args.second or photos / cc.SECOND_READING)
    rows = cc.read_check(check)
    labels = read_labels(photos / "labels.json")
    version = labels.get("generator", {}).get("version")
    if args.write:
        cc.write_stored(check, rows, labels)
        print(f"wrote the labels.json answers into {check}")
    if args.stored:
        print(cc.report(rows, cc.stored_answers(labels), f"labels.json (labeller version {version})"), "\n")
    print(cc.report(rows, cc.live_answers(rows, photos), f"labeller in the code (version {LABELS_VERSION})"))
    if second.is_file():
        labeller = f"labels.json (labeller version {version})"
        print("\n" + cc.persons_report(rows, cc.read_second(second), cc.stored_answers(labels), labeller))
    if args.changes:
        print("\n" + cc.changes_report(cc.label_changes(labels, photos)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
