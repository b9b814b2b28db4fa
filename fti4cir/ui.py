"""The app's page logic without the page: what each event of `app.py`'s page computes, testable without a browser.

    page = Page(service, problems=setup.problems)       # service None: searching is disabled (the banner says why)
    out = page.search(reference, "is red", "fti4cir", 10)  # {output name: value}; UserError for the user's mistakes
    out = guarded(page.search)(reference, "", "magic", 10)  # errors as {"status": html, "warning": message}
    answer = page.api_search(None, "shoes/x.jpg", "in black", "fti4cir", 5, root_url="http://host:7860")

Outputs are keyed by the names in OUTPUTS (app.py maps each name to its component); `Choices` stands for an update of
a choice component's options and value; None from `Page.settings` means "nothing to do". No gradio here: matplotlib
draws the relevance chart.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import logging
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import methods as registry
from .errors import UserError
from .inputs import quote

log = logging.getLogger(__name__)

DEFAULT_K = 10
BROWSER_IMAGES = 60  # gallery images offered as references (an even sample of larger galleries)
GENERIC_ERROR = (
    "Something went wrong while handling this request (the details are in the server log). Please try again."
)
NO_REFERENCE = "Upload a reference image or click a gallery image first."
SUBJECT_SWITCH = "subject"
# One-click examples on the embedded demo gallery (gallery image name, modification text): two colour, two class and
# two colour-and-class changes, chosen among the clothing-cir queries the demo model answers well (the benchmark table
# measures the rest) and kept honest by tests/test_demo_model.py, which checks their top results.
EXAMPLES: list[tuple[str, str]] = [
    ("shoes/f5ed50b6-79b3-4d9d-84a9-8010f5e1c581.jpg", "in black"),
    ("shorts/ee64e502-6a14-44e0-abc9-1692299b00f6.jpg", "are blue"),
    ("shoes/9b61a6bd-1456-459e-a5f9-00c4c1989b94.jpg", "is a jacket of the same colour"),
    ("pants/fefa13bc-8c4a-4613-ae84-56d379d46984.jpg", "are shorts of the same colour"),
    ("outwear/0a86d893-93f1-4a52-8c42-07bb9f439833.jpg", "is a blue tshirt instead"),
    ("longsleeve/d5bd0641-fa5e-4757-ae93-000a0439fd38.jpg", "are black shoes instead"),
]
FILE_ROUTE = "/gradio_api/file="  # the server's route for files below its allowed paths (the gallery's images)
# the page's outputs, by name (app.py: name -> component)
RESULT_OUTPUTS = (
    "sentence",
    "timing",
    "results",
    "chart",
    "heatmaps",
    "switches",
    "moved",
    "status",
    "base_state",
    "shown_state",
)
REFERENCE_OUTPUTS = RESULT_OUTPUTS + ("reference_state", "reference_view")
EXAMPLE_OUTPUTS = REFERENCE_OUTPUTS + ("method", "top_k")
SWITCH_OUTPUTS = ("sentence", "timing", "results", "moved", "status", "shown_state")


@dataclass(frozen=True)
class Choices:
    """New options and value of a choice component (the token switches)."""

    choices: list[tuple[str, str]]
    value: list[str]


# ---- rendering -----------------------------------------------------------------------------------------------------
def relevance_figure(explanation):
    """Bar chart of every attribute query's relevance, kept ones coloured and labelled, with the epsilon line."""
    from matplotlib.figure import Figure

    relevance = np.asarray(explanation.relevance, dtype=float)
    kept = {int(q): a.word for q, a in zip(explanation.kept, explanation.attributes)}
    queries = np.arange(len(relevance))
    colours = ["#e4572e" if q in kept else "#b8b8b8" for q in queries]
    figure = Figure(figsize=(7.0, 2.8), dpi=100, layout="constrained")
    ax = figure.add_subplot()
    ax.bar(queries, relevance, color=colours, width=0.8)
    ax.axhline(explanation.epsilon, color="#1f4e79", linestyle="--", linewidth=1.2)
    ax.text(
        len(relevance) - 0.5,
        explanation.epsilon,
        f" ε = {explanation.epsilon:g}",
        color="#1f4e79",
        va="bottom",
        ha="right",
        fontsize=8,
    )
    for q, word in kept.items():
        ax.annotate(
            word,
            (q, relevance[q]),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            va="bottom",
            rotation=60,
            fontsize=7,
        )
    ax.set_xticks(queries, [str(q) for q in queries], fontsize=7)
    ax.set_xlim(-0.6, len(relevance) - 0.4)
    ax.set_ylim(0, max(float(relevance.max()), explanation.epsilon) * 1.45)
    ax.set_xlabel("attribute query", fontsize=8)
    ax.set_ylabel("relevance", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(
        f"Relevance of the {len(relevance)} attribute queries: {len(kept)} kept (orange), "
        f"{len(relevance) - len(kept)} dropped (grey)",
        fontsize=9,
    )
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return figure


def sentence_html(result) -> str:
    """The query sentence and a table of each pseudo token's top words (all text escaped)."""
    e = html.escape
    explanation = result.reference.explanation
    rows = [(explanation.subject, result.keep_subject)] + list(zip(explanation.attributes, result.keep_attributes))
    table = "".join(
        f"<tr class='{'' if on else 'off'}'><td>{e(token.label)}</td>"
        + "".join(f"<td><b>{e(w.word)}</b> <span class='score'>{w.score:.2f}</span></td>" for w in token.words)
        + "</tr>"
        for token, on in rows
    )
    note = "<p class='note'>The text was cut to fit CLIP's 77-token context.</p>" if result.truncated else ""
    if registry.get(result.method).family == "m2c":
        note += (
            "<p class='note'>M2C reads the image as one pseudo token (its nearest word is in brackets above) "
            "plus visual semantic injection; the table, chart and heatmaps below show FTI4CIR's tokens of "
            "this reference, for comparison.</p>"
        )
    return (
        f"<div class='sentence'>{e(result.sentence)}</div>{note}"
        f"<table class='words'><tr><th>pseudo token</th><th colspan='3'>nearest words (cosine)</th></tr>"
        f"{table}</table>"
    )


def status_html(message: str) -> str:
    return f"<div class='status'>⚠ {html.escape(message)}</div>" if message else ""


def switch_choices(explanation) -> list[tuple[str, str]]:
    """(label, value) of the counterfactual check boxes: the subject token and every kept attribute token."""
    choices = [(f"subject · {explanation.subject.word}", SUBJECT_SWITCH)]
    return choices + [(f"{a.word} (query {a.query})", f"attr-{i}") for i, a in enumerate(explanation.attributes)]


def switches_from_values(values: list[str] | None, num_attributes: int) -> tuple[list[bool], bool]:
    values = set(values or [])
    return [f"attr-{i}" in values for i in range(num_attributes)], SUBJECT_SWITCH in values


def example_queries(service) -> list[tuple[int, str]]:
    """The one-click examples that exist in the service's gallery: (gallery row, modification text)."""
    if service is None:
        return []
    rows = {name: i for i, name in enumerate(service.gallery.names)}
    return [(rows[name], query) for name, query in EXAMPLES if name in rows]


def api_top_k(value) -> int:
    """k of an API call: a whole number (the service clamps it to 1..MAX_K and the gallery), DEFAULT_K if absent."""
    if value is None:
        return DEFAULT_K
    try:
        k = float(value)
    except (TypeError, ValueError):
        k = float("nan")
    if not k.is_integer():  # nan, inf, 2.5, "ten"
        raise UserError(f"k must be a whole number of results, not {quote(value)}.")
    return int(k)


def lean_result(result):
    """A result as the session keeps it: its reference without the decoded image and the heatmaps (shown once when
    the reference is new, never read again), which are most of a session's memory."""
    return dataclasses.replace(result, reference=result.reference.lean())


def browser_rows(size: int, limit: int = BROWSER_IMAGES) -> list[int]:
    """Gallery rows offered as references: all of a small gallery, an even sample of a large one."""
    return sorted(set(np.linspace(0, size - 1, min(size, limit)).round().astype(int).tolist())) if size else []


def file_url(path: str | Path, root_url: str = "") -> str:
    """The URL under which the app's server serves a gallery image (its file route; `root_url`: the server's public
    address without the trailing slash, "" for a URL relative to the server)."""
    return f"{root_url.rstrip('/')}{FILE_ROUTE}{urllib.parse.quote(str(path), safe='/')}"


def guarded(fn: Callable[..., dict | None]) -> Callable[..., dict | None]:
    """A page event's function whose failures become outputs: a UserError's message, anything else logged with a
    generic message; as {"status": the status line's html, "warning": the message for a toast}. Never a traceback in
    the page."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            message = str(e)
        except Exception:  # noqa: BLE001 - never a traceback in the page
            log.exception("%s failed", getattr(fn, "__name__", "page event"))
            message = GENERIC_ERROR
        return {"status": status_html(message), "warning": message}

    return wrapper


# ---- the page's events ---------------------------------------------------------------------------------------------
class Page:
    """What the page's events compute for one service (None: searching is disabled, `problems` say why). Holds no
    per-user state: sessions pass theirs in (the lean reference, the base result, the shown rows) and get it back in
    the outputs."""

    def __init__(self, service, problems: list[str] | tuple[str, ...] = ()):
        from .app_service import MAX_K

        self.service = service
        self.problems = list(problems)
        self.size = service.size if service is not None else 0
        self.max_k = MAX_K
        self.shown_rows = browser_rows(self.size)  # the gallery browser's images
        self.example_rows = example_queries(service)

    # -- what the layout shows before any event
    def methods(self, default: tuple[str, ...]) -> list[str]:
        return list(self.service.methods if self.service is not None else default)

    def top_k_range(self) -> tuple[int, int, int]:
        """(minimum, maximum, value) of the top-k slider."""
        return 1, max(2, min(self.max_k, self.size)), min(DEFAULT_K, max(self.size, 1))

    def browser_items(self) -> list[tuple[str, str]] | None:
        """(image path, caption) of the gallery browser."""
        if self.service is None:
            return None
        gallery = self.service.gallery
        return [(str(gallery.paths[i]), gallery.names[i]) for i in self.shown_rows]

    def example_items(self) -> list[list[str]]:
        """Rows of the one-click examples: [photo path, modification text]."""
        return [[str(self.service.gallery.paths[row]), query] for row, query in self.example_rows]

    # -- helpers
    def require_service(self) -> None:
        if self.service is None:
            raise UserError(
                "Search is disabled: "
                + (self.problems[0].split("\n")[0].replace("**", "") if self.problems else "no model")
            )

    def show(self, result, new_reference: bool) -> dict:
        """Every output of a fresh search (all tokens on): it becomes the base of the switches. The chart and
        heatmaps are drawn for a new reference only (the session keeps the reference without them)."""
        explanation = result.reference.explanation
        choices = switch_choices(explanation)
        drawn = (
            {
                "chart": relevance_figure(explanation),
                "heatmaps": [
                    (image, f"q{a.query} {a.word}") for image, a in zip(explanation.heatmaps, explanation.attributes)
                ],
            }
            if new_reference
            else {}
        )
        result = lean_result(result)
        return {
            "sentence": sentence_html(result),
            "timing": f"**Query time:** {result.timing_text()}",
            "results": [(str(h.path), h.caption) for h in result.hits],
            **drawn,
            "switches": Choices(choices, [value for _, value in choices]),
            "moved": f"{len(result.hits)} results; untick a token above to see which ones move.",
            "status": "",
            "base_state": result,
            "shown_state": [h.index for h in result.hits],
        }

    def new_reference(self, result) -> dict:
        """A search that prepared a new reference: all of `show`, the reference image and the lean reference."""
        shown = self.show(result, True)
        return {**shown, "reference_state": shown["base_state"].reference, "reference_view": result.reference.image}

    def pick(self, row: int, text, method, k) -> dict:
        """A gallery image becomes the reference (its cached tokens)."""
        self.require_service()
        return self.new_reference(self.service.search(int(row), text, method, int(k)))

    # -- events
    def search(self, reference, text, method, k) -> dict:
        """The search button or Enter in the text: search again with the session's reference."""
        self.require_service()
        if reference is None:
            raise UserError(NO_REFERENCE)
        return self.show(self.service.search(reference, text, method, int(k)), False)

    def settings(self, reference, text, method, k) -> dict | None:
        """Method or top-k changed: search again if there is a reference, else nothing to do (None)."""
        if self.service is None or reference is None:
            return None
        return self.show(self.service.search(reference, text, method, int(k)), False)

    def upload(self, path, text, method, k) -> dict:
        """An image was uploaded, dropped, pasted or taken with the webcam: it becomes the reference. None (the
        reference box was cleared): the session forgets its reference."""
        if path is None:
            return {"reference_state": None}
        self.require_service()
        return self.new_reference(self.service.search(path, text, method, int(k)))

    def example(self, path, text) -> dict:
        """An example row was clicked: its photo is a gallery image, searched as such (cached tokens) with FTI4CIR
        and the default k, which the page then shows as chosen."""
        self.require_service()
        rows = {Path(self.service.gallery.paths[row]).name: row for row, _ in self.example_rows}
        if Path(str(path)).name not in rows:
            raise UserError("This example is not in the gallery.")
        return {
            **self.pick(rows[Path(str(path)).name], text, "fti4cir", DEFAULT_K),
            "method": "fti4cir",
            "top_k": DEFAULT_K,
        }

    def browser_select(self, index: int, text, method, k) -> dict:
        """The `index`-th image of the gallery browser was clicked."""
        self.require_service()
        return self.pick(self.shown_rows[index], text, method, k)

    def result_select(self, index: int, shown: list[int], text, method, k) -> dict:
        """The `index`-th result was clicked (`shown`: the gallery rows of the results on the page)."""
        return self.pick(shown[index], text, method, k)

    def switch(self, values, base) -> dict:
        """Token switches changed: the base search again with the ticked tokens only, and what moved."""
        from .app_service import rank_changes, summarize_moves

        self.require_service()
        if base is None:
            raise UserError("Run a search first; the switches act on its results.")
        reference = base.reference
        keep_attributes, keep_subject = switches_from_values(values, reference.num_kept)
        result = self.service.search(reference, base.text, base.method, len(base.hits), keep_attributes, keep_subject)
        moves = {m.name: m for m in rank_changes(base.hits, result.hits)}
        captions = [(str(h.path), f"{moves[h.name].arrow} {h.caption}".strip()) for h in result.hits]
        dropped = [m.name for m in moves.values() if m.kind == "out"]
        summary = f"**Moved:** {summarize_moves(list(moves.values()))}"
        if dropped:
            summary += " — out: " + ", ".join(f"`{n}`" for n in dropped)
        if base.method not in ("fti4cir", "subject-only"):
            summary += f" (the switches act on FTI4CIR's pseudo tokens: no effect on method {base.method})"
        return {
            "sentence": sentence_html(result),
            "timing": f"**Query time:** {result.timing_text()}",
            "results": captions,
            "moved": summary,
            "status": "",
            "shown_state": [h.index for h in result.hits],
        }

    def api_search(self, image, gallery_name, text, method, k, root_url: str = "") -> dict:
        """Stateless search (/search): an uploaded image, or the name of a gallery image; results as JSON, each with
        its name, score and the URL the server serves the image under (`root_url`: the server's address; "" gives
        URLs relative to it). Problems are part of the answer, {"error": message}, never a failed request or a
        traceback."""
        try:
            self.require_service()
            service = self.service
            if image:
                reference = service.reference(image, display=False)
            elif gallery_name:
                reference = service.gallery_reference(service.gallery.row(gallery_name), display=False)
            else:
                raise UserError(NO_REFERENCE)
            result = service.search(reference, text, method or "fti4cir", api_top_k(k))
        except UserError as e:
            return {"error": str(e)}
        except Exception:  # noqa: BLE001
            log.exception("api search failed")
            return {"error": GENERIC_ERROR}
        return {
            "reference": reference.name,
            "sentence": result.sentence,
            "text": result.text,
            "method": result.method,
            "query_ms": round(result.seconds * 1000, 2),
            "results": [
                {"rank": h.rank, "name": h.name, "score": round(h.score, 6), "url": file_url(h.path, root_url)}
                for h in result.hits
            ],
        }
