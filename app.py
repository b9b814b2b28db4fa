"""FTI4CIR composed image retrieval demo (Gradio): reference image + modification text -> ranked gallery images.

    python app.py --tiny --gallery demo                                      # offline, random tiny model
    python app.py --weights fti4cir_vitl14.safetensors --gallery clothing    # ViT-L-14/openai + trained weights
    python app.py ... --m2c-weights m2c_stage2.safetensors                   # + methods m2c, m2c+compose

Shows what the model understood (the pseudo-word sentence with each token's nearest words, the relevance of the
attribute queries, each kept attribute token's attention over the image) and lets the user switch tokens off to see
how the ranking changes. When the model or gallery cannot be loaded the page still comes up, with a banner that says
what was tried and what to do, and searching disabled. Flags also read environment variables (FTI4CIR_*, and the
GRADIO_SERVER_NAME / GRADIO_SERVER_PORT / PORT that hosting platforms such as Hugging Face Spaces set).
"""

import argparse
import dataclasses
import functools
import html
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fti4cir.errors import UserError
from fti4cir.inputs import quote
from fti4cir.m2c.model import M2C_METHODS

log = logging.getLogger("fti4cir.app")

DEFAULT_K = 10
BROWSER_IMAGES = 60  # gallery images offered as references (an even sample of larger galleries)
GENERIC_ERROR = ("Something went wrong while handling this request (the details are in the server log). "
                 "Please try again.")
NO_REFERENCE = "Upload a reference image or click a gallery image first."
SUBJECT_SWITCH = "subject"
# Cleanup. Per-session state lives at most SESSION_TTL_S, and at most --max-sessions sessions are kept (the least
# recently active go first). What one session holds: our lean reference and last result (tens of kB), plus gradio's
# copy of the page config with the last value of every output (the chart as an image, the result and heatmap
# galleries): about 1.5 MB with the tiny model (measured over 30 new sessions), so 256 sessions hold roughly 400 MB
# at most (tests/test_reliability_app.py: flat once the bound is reached). gradio's upload and result-image
# cache is swept every min(CACHE_SWEEP_S, age), deleting files older than --cache-max-age (all of it at shutdown).
SESSION_TTL_S = 3600
UNSET = object()  # a model flag that was not given
# One-click examples on the embedded demo gallery (gallery image name, modification text); chosen among queries the
# demo model answers well and kept honest by tests/test_demo_model.py, which checks their top results.
EXAMPLES: list[tuple[str, str]] = [
    ("shoes/f5ed50b6-79b3-4d9d-84a9-8010f5e1c581.jpg", "in black"),
    ("shorts/97620b7f-54ba-445a-9817-b39c8684f890.jpg", "make them blue"),
    ("shoes/9b61a6bd-1456-459e-a5f9-00c4c1989b94.jpg", "is a jacket of the same colour"),
    ("skirt/0558b2c5-be00-49de-b27f-8c88114ac36f.jpg", "are shoes of the same colour"),
    ("t-shirt/56c195bd-7685-4666-9a45-05a755758335.jpg", "a sweater in grey instead"),
    ("longsleeve/d5bd0641-fa5e-4757-ae93-000a0439fd38.jpg", "are black shoes instead"),
]
DEMO_GALLERY = "clothing"  # the embedded demo (fti4cir demo-rebuild --install)
CACHE_SWEEP_S = 600


# ---- configuration -----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from fti4cir.cli import add_model_args

    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    # model flags left out (and no FTI4CIR_* variable): the model the gallery was built with (see gallery_model)
    parser.set_defaults(backbone=env("FTI4CIR_BACKBONE", UNSET), pretrained=env("FTI4CIR_PRETRAINED", UNSET),
                        weights=env("FTI4CIR_WEIGHTS") or UNSET)
    parser.add_argument("--m2c-weights", default=env("FTI4CIR_M2C_WEIGHTS") or UNSET,
                        help="M2C weights (.safetensors from `fti4cir m2c-train`, same backbone): adds the methods m2c "
                             "and, for stage-2 weights, m2c+compose")
    parser.add_argument("--tiny", action="store_true", default=env("FTI4CIR_TINY", "") not in ("", "0"),
                        help="tiny random-weight model (fti4cir-tiny, no pretrained weights; for tests and offline "
                             "demos: results are meaningless)")
    parser.add_argument("--gallery", default=env("FTI4CIR_GALLERY"),
                        help="gallery name under --galleries-dir or a gallery folder (default: the only gallery "
                             "there)")
    parser.add_argument("--galleries-dir", default=env("FTI4CIR_GALLERIES_DIR", "galleries"),
                        help="folder of named galleries (default %(default)s)")
    parser.add_argument("--host", default=env("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to listen on (0.0.0.0: every interface; default %(default)s)")
    parser.add_argument("--port", type=int, default=int(env("GRADIO_SERVER_PORT") or env("PORT") or 7860),
                        help="port (default: $GRADIO_SERVER_PORT, else $PORT, else 7860)")
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    parser.add_argument("--concurrency", type=int, default=int(env("FTI4CIR_CONCURRENCY", "2")),
                        help="requests computed at the same time; the rest wait in the queue (default %(default)s)")
    parser.add_argument("--max-queue", type=int, default=int(env("FTI4CIR_MAX_QUEUE", "64")),
                        help="waiting requests beyond which new ones are refused (default %(default)s)")
    parser.add_argument("--cache-max-age", type=int, default=int(env("FTI4CIR_CACHE_MAX_AGE", "3600")),
                        help="seconds an uploaded or result file stays in gradio's cache (default %(default)s)")
    parser.add_argument("--max-sessions", type=int, default=int(env("FTI4CIR_MAX_SESSIONS", "256")),
                        help="browser sessions whose state is kept; the least recently active are dropped beyond "
                             "this (default %(default)s)")
    args = parser.parse_args(argv)
    if args.tiny:
        from fti4cir import TINY_MODEL

        args.backbone, args.pretrained, args.weights = TINY_MODEL, None, None
    gallery_model(args)
    return args


def gallery_model(args) -> None:
    """Without model flags, the model the gallery's definition names (`<galleries-dir>/<gallery>.json`, written when
    it was built), M2C weights included: `python app.py` serves the embedded demo model on its gallery, `--gallery
    NAME` alone builds NAME's model. Model flags that are given win (the rest take the usual defaults); `Gallery.load`
    then names both sides of any mismatch."""
    from fti4cir.backbone import DEFAULT_MODEL, DEFAULT_PRETRAINED
    from fti4cir.gallery import list_galleries, read_definition

    if args.gallery is None:
        available = list_galleries(args.galleries_dir)
        if len(available) == 1 or DEMO_GALLERY in available:
            args.gallery = available[0] if len(available) == 1 else DEMO_GALLERY
    chosen = any(getattr(args, key) is not UNSET for key in ("backbone", "pretrained", "weights"))
    definition = Path(args.galleries_dir) / f"{args.gallery}.json" if args.gallery and not chosen else None
    values = {}
    if definition is not None and definition.is_file():
        try:
            values = read_definition(definition)
        except UserError as e:
            log.warning("%s", e)
    for key, fallback in (("backbone", DEFAULT_MODEL), ("pretrained", DEFAULT_PRETRAINED), ("weights", None),
                          ("m2c_weights", None)):
        if getattr(args, key) is UNSET:
            setattr(args, key, values.get(key, fallback))


def create_app_model(args):
    """The model the flags describe, built exactly as `fti4cir index` builds it (random weights seeded the same way),
    so that galleries built with the same flags load."""
    from fti4cir.commands.common import spec_from_args
    from fti4cir.factory import create_model

    return create_model(spec_from_args(argparse.Namespace(**vars(args))))  # a copy: the app's flags stay as given


@dataclass
class Setup:
    """What `load_service` achieved: a service, or None with the reason, plus notes for the banner."""

    service: object | None
    problems: list[str]
    notes: list[str]


def load_service(args) -> Setup:
    """Model + gallery -> SearchService; every failure becomes a banner message instead of a crash."""
    from fti4cir.app_service import SearchService
    from fti4cir.gallery import Gallery, list_galleries

    problems, notes = [], []
    what = f"backbone {args.backbone} / pretrained {args.pretrained} / inversion weights {args.weights or 'random'}"
    try:
        model = create_app_model(args)
    except UserError as e:
        return Setup(None, [f"**The model could not be loaded** ({what}).\n\n{e}\n\n{_weights_help()}"], notes)
    except Exception as e:  # noqa: BLE001 - a broken file or platform problem must not stop the page
        log.exception("loading the model failed")
        return Setup(None, [f"**The model could not be loaded** ({what}): {type(e).__name__}: {e}\n\n"
                            f"{_weights_help()}"], notes)
    if args.tiny or args.pretrained is None:
        notes.append("Running a **random-weight model** (tiny or `--pretrained none`): the interface works, the "
                     "rankings and words are meaningless.")
    elif args.weights is None:
        notes.append("The inversion network has **random weights** (no `--weights` given): the pseudo words and "
                     "rankings are meaningless. " + _weights_help())

    gallery_name = args.gallery
    if gallery_name is None:
        available = list_galleries(args.galleries_dir)
        if len(available) != 1:
            listed = ", ".join(available) if available else "none"
            return Setup(None, [f"**No gallery chosen.** Galleries in `{args.galleries_dir}/`: {listed}. Start with "
                                "`--gallery NAME`, or build one: `fti4cir index IMAGE_FOLDER --name NAME` (same "
                                "`--backbone/--pretrained/--weights` as the app)."], notes)
        gallery_name = available[0]
    try:
        gallery = Gallery.load(gallery_name, model=model, galleries_dir=args.galleries_dir)
    except UserError as e:
        return Setup(None, [f"**The gallery could not be loaded.** {e}"], notes)
    if len(gallery) == 0:
        return Setup(None, [f"**Gallery {gallery_name} is empty.**"], notes)
    return Setup(SearchService(model, gallery, load_m2c(args, model, notes)), problems, notes)


def load_m2c(args, model, notes: list[str]):
    """The M2C model of --m2c-weights on the app's backbone, or None (a problem becomes a note: FTI4CIR still
    works). It preprocesses like the gallery, whose image features it is ranked against."""
    from fti4cir.m2c import attach_m2c

    if not args.m2c_weights:
        return None
    try:
        return attach_m2c(model.backbone, args.m2c_weights, model.preprocess_kind)
    except UserError as e:
        notes.append(f"**The M2C methods are off:** {e}")
    except Exception as e:  # noqa: BLE001 - a broken file must not stop the page
        log.exception("loading the M2C weights failed")
        notes.append(f"**The M2C methods are off:** {args.m2c_weights} could not be read ({type(e).__name__}: {e})")
    return None


def _weights_help() -> str:
    return ("To use real weights: `--pretrained /path/to/ViT-L-14.pt` (OpenAI CLIP file) or a filled Hugging Face "
            "cache for the backbone, and `--weights` with our `.safetensors`, the official FTI4CIR release `.pth` "
            "or a hub id for the inversion network. For an offline demo with random weights: `python app.py --tiny "
            "--gallery NAME` (with a gallery built by `fti4cir index ... --backbone fti4cir-tiny --pretrained none`).")


# ---- rendering ---------------------------------------------------------------------------------------------------
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
    ax.text(len(relevance) - 0.5, explanation.epsilon, f" ε = {explanation.epsilon:g}", color="#1f4e79",
            va="bottom", ha="right", fontsize=8)
    for q, word in kept.items():
        ax.annotate(word, (q, relevance[q]), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                    rotation=60, fontsize=7)
    ax.set_xticks(queries, [str(q) for q in queries], fontsize=7)
    ax.set_xlim(-0.6, len(relevance) - 0.4)
    ax.set_ylim(0, max(float(relevance.max()), explanation.epsilon) * 1.45)
    ax.set_xlabel("attribute query", fontsize=8)
    ax.set_ylabel("relevance", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(f"Relevance of the {len(relevance)} attribute queries: {len(kept)} kept (orange), "
                 f"{len(relevance) - len(kept)} dropped (grey)", fontsize=9)
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
        + "</tr>" for token, on in rows)
    note = "<p class='note'>The text was cut to fit CLIP's 77-token context.</p>" if result.truncated else ""
    if result.method in M2C_METHODS:
        note += ("<p class='note'>M2C reads the image as one pseudo token (its nearest word is in brackets above) "
                 "plus visual semantic injection; the table, chart and heatmaps below show FTI4CIR's tokens of "
                 "this reference, for comparison.</p>")
    return (f"<div class='sentence'>{e(result.sentence)}</div>{note}"
            f"<table class='words'><tr><th>pseudo token</th><th colspan='3'>nearest words (cosine)</th></tr>"
            f"{table}</table>")


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


def _status(message: str) -> str:
    return f"<div class='status'>⚠ {html.escape(message)}</div>" if message else ""


CSS = """
#banner { border: 2px solid #e4572e; border-radius: 8px; padding: 4px 12px; background: #fff4f0; }
#banner * { color: #5a1a00; }
.sentence { font-size: 1.15em; font-weight: 600; margin: 4px 0 8px; }
table.words { font-size: 0.85em; border-collapse: collapse; }
table.words td, table.words th { padding: 2px 8px; border-bottom: 1px solid #ddd; text-align: left; }
table.words tr.off td { text-decoration: line-through; opacity: 0.5; }
table.words .score { color: #777; }
.status { color: #a4161a; font-weight: 600; }
.note { color: #8a6d00; font-size: 0.85em; }
/* galleries grow with their content instead of reserving gradio's fixed 450 px */
#results .grid-wrap.fixed-height, #heatmaps .grid-wrap.fixed-height { min-height: 0; max-height: none; }
"""


# ---- file serving ------------------------------------------------------------------------------------------------
FILE_ROUTES = ("/gradio_api/file=", "/gradio_api/file/")  # gradio's routes that serve local files


class GalleryFilesOnly:
    """ASGI middleware: below the gallery's source folder, only the gallery's images are served.

    Gradio serves every file below `launch(allowed_paths=...)`. The source folder has to be there (result images are
    copied from it into gradio's cache, which refuses files outside allowed_paths), but it may also hold files that
    are no gallery image: notes, keys, dotfiles, the galleries folder itself. Requests for those get 404 here. Any
    other path is left to gradio's own rules (uploads and its cache are served, the rest is refused with 403).
    Paths are resolved as gradio resolves them (relative to the working directory, symlinks followed); an image
    reached through a symlink below the folder is only served through the page's cached copy."""

    def __init__(self, app, root: str | os.PathLike, images):
        self.app = app
        self.root = os.path.realpath(root)
        self.images = frozenset(os.path.normpath(os.path.join(self.root, os.path.relpath(p, root))) for p in images)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not self.allowed(scope.get("path", "")):
            from starlette.responses import PlainTextResponse

            await PlainTextResponse("File not found.", status_code=404)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def allowed(self, path: str) -> bool:
        for route in FILE_ROUTES:
            at = path.find(route)
            if at >= 0:
                if "\0" in path:  # no file has such a name (and realpath would raise)
                    return False
                requested = os.path.realpath(path[at + len(route):])
                inside = os.path.commonpath([requested, self.root]) == self.root
                return not inside or requested in self.images
        return True


class ServingHeaders:
    """ASGI middleware: `X-Content-Type-Options: nosniff` on every response, so that no browser runs an upload named
    `.jpg` that holds HTML as a page; files from gradio's file routes (uploads, cached results, gallery images) are
    served as attachments, so that opening one directly downloads it instead of rendering it (an <img> on the page
    shows it all the same)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_file = any(route in scope.get("path", "") for route in FILE_ROUTES)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                from starlette.datastructures import MutableHeaders

                headers = MutableHeaders(scope=message)
                headers["X-Content-Type-Options"] = "nosniff"
                if is_file:
                    disposition = headers.get("content-disposition", "")
                    name = disposition[disposition.find("filename"):] if "filename" in disposition else ""
                    headers["Content-Disposition"] = "attachment" + (f"; {name}" if name else "")
            await send(message)

        await self.app(scope, receive, send_with_headers)


def sweep_cache(demo, age: int, every: int) -> None:
    """gradio's cache deletion (files older than `age` seconds), every `every` seconds, forever; run in a daemon
    thread. gradio's own scheduled deletion (`delete_cache`) runs every CACHE_SWEEP_S too, but it iterates the
    cache's file sets while requests may add to them, and an error there ("set changed size during iteration")
    ends its task for good; here such a round is simply tried again next time."""
    from gradio.route_utils import delete_files_created_by_app

    while True:
        time.sleep(every)
        try:
            delete_files_created_by_app(demo, age)
        except Exception:  # noqa: BLE001 - a race with a request adding files; the next round catches up
            log.debug("cache sweep failed; retrying next round", exc_info=True)


# ---- the page ----------------------------------------------------------------------------------------------------
def build_demo(setup: Setup, cache_max_age: int = 3600):
    import gradio as gr

    from fti4cir.app_service import MAX_K, rank_changes, summarize_moves
    from fti4cir.compose import METHODS
    from fti4cir.inputs import MAX_TEXT_CHARS, describe_limits

    service = setup.service
    size = service.size if service else 0
    shown_rows = browser_rows(size)
    banner = "\n\n".join(setup.problems + setup.notes)

    # gradio deletes cached files older than the age every CACHE_SWEEP_S and all of them at shutdown; `sweep_cache`
    # adds the rounds that survive its races (and sweeps sooner for short ages)
    with gr.Blocks(title="FTI4CIR composed image retrieval", delete_cache=(CACHE_SWEEP_S, max(1, cache_max_age))) \
            as demo:
        gr.Markdown("## FTI4CIR · composed image retrieval\nGive a reference image and say what to change; the "
                    "image is turned into pseudo words (a subject and a few attributes) that are read together with "
                    "your text.")
        gr.Markdown(banner, visible=bool(banner), elem_id="banner")
        reference_state = gr.State(None, time_to_live=SESSION_TTL_S)  # lean app_service.Reference of this session
        base_state = gr.State(None, time_to_live=SESSION_TTL_S)  # lean Result, all tokens on: what switches compare to
        shown_state = gr.State([], time_to_live=SESSION_TTL_S)  # gallery rows of the displayed results

        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=280):
                reference_view = gr.Image(label="Reference", interactive=False, height=240, elem_id="reference")
                upload = gr.UploadButton("Upload a reference image", file_types=["image"], type="filepath",
                                         size="md", elem_id="upload", interactive=service is not None)
                text = gr.Textbox(label="Modification text", placeholder="e.g. is red and has long sleeves",
                                  max_lines=3, max_length=4 * MAX_TEXT_CHARS, elem_id="text")
                method = gr.Radio(list(service.methods if service else METHODS), value="fti4cir", label="Method",
                                  elem_id="method")
                top_k = gr.Slider(1, max(2, min(MAX_K, size)), value=min(DEFAULT_K, max(size, 1)), step=1,
                                  label="Results (top-k)", elem_id="topk")
                search = gr.Button("Search", variant="primary", elem_id="search", interactive=service is not None)
                status = gr.HTML(elem_id="status")
                examples_slot = gr.Column()  # the one-click examples, filled once the outputs exist (below)
            with gr.Column(scale=2, min_width=420):
                sentence = gr.HTML("<p>Upload a reference image or click one in the gallery below to see its "
                                   "pseudo words.</p>", elem_id="sentence")
                timing = gr.Markdown(elem_id="timing")
                results = gr.Gallery(label="Results (click one to use it as the reference)", columns=5,
                                     height="auto", object_fit="contain", allow_preview=False, interactive=False,
                                     buttons=[], elem_id="results")
                switches = gr.CheckboxGroup(label="Counterfactual: pseudo tokens in the query (untick to switch "
                                                  "one off; the results re-rank at once)", elem_id="switches")
                moved = gr.Markdown(elem_id="moved")
        with gr.Row(equal_height=False):
            chart = gr.Plot(label="Relevance of the attribute queries", show_label=False, elem_id="relevance",
                            scale=1)
            heatmaps = gr.Gallery(label="Attention of each kept attribute token", columns=4, height=300,
                                  object_fit="contain", allow_preview=False, interactive=False, buttons=[],
                                  elem_id="heatmaps", scale=1)
        example_rows = example_queries(service)
        example_image = gr.Image(visible=False, type="filepath")  # what an example row holds: a gallery photo
        with gr.Accordion(f"Gallery: click an image to use it as the reference ({len(shown_rows)} of {size} "
                          "shown)", open=True):
            browser = gr.Gallery(value=[(str(service.gallery.paths[i]), service.gallery.names[i])
                                        for i in shown_rows] if service else None,
                                 show_label=False, columns=10, height=260, object_fit="cover", allow_preview=False,
                                 interactive=False, buttons=[], elem_id="gallery")
        gr.Markdown(describe_limits() + " The gallery image used as the reference is left out of its results.")

        # hidden components of the stateless API endpoint (/search, for scripts and gradio_client)
        api_image = gr.File(visible=False)  # no file_types: load_image checks the content and answers {"error"}
        api_gallery_name = gr.Textbox(visible=False)
        # method and k get their own unvalidated inputs: the page's radio and slider would refuse values outside
        # their choices / range (the slider's depends on the gallery) with gradio errors instead of an answer
        api_method = gr.Textbox("fti4cir", visible=False)
        api_k = gr.Number(DEFAULT_K, visible=False)
        api_out = gr.JSON(visible=False)
        api_trigger = gr.Button(visible=False)

        result_outputs = [sentence, timing, results, chart, heatmaps, switches, moved, status, base_state,
                          shown_state]

        def guarded(fn):
            """UserError -> its message in the status line and a toast; anything else -> logged, generic message."""
            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                try:
                    return fn(*args, **kwargs)
                except UserError as e:
                    message = str(e)
                except Exception:  # noqa: BLE001 - never a traceback in the page
                    log.exception("%s failed", fn.__name__)
                    message = GENERIC_ERROR
                gr.Warning(message)
                return {status: _status(message)}
            return wrapper

        def require_service():
            if service is None:
                raise UserError("Search is disabled: " + (setup.problems[0].split("\n")[0].replace("**", "")
                                                          if setup.problems else "no model"))

        def show(result, new_reference: bool) -> dict:
            """Every output of a fresh search (all tokens on): it becomes the base of the switches. The chart and
            heatmaps are drawn for a new reference only (the session keeps the reference without them)."""
            explanation = result.reference.explanation
            choices = switch_choices(explanation)
            drawn = {
                chart: relevance_figure(explanation),
                heatmaps: [(image, f"q{a.query} {a.word}")
                           for image, a in zip(explanation.heatmaps, explanation.attributes)],
            } if new_reference else {}
            result = lean_result(result)
            return {
                sentence: sentence_html(result),
                timing: f"**Query time:** {result.timing_text()}",
                results: [(str(h.path), h.caption) for h in result.hits],
                **drawn,
                switches: gr.update(choices=choices, value=[value for _, value in choices]),
                moved: f"{len(result.hits)} results; untick a token above to see which ones move.",
                status: "",
                base_state: result,
                shown_state: [h.index for h in result.hits],
            }

        def new_reference(result) -> dict:
            """A search that prepared a new reference: all of `show`, the reference image and the lean reference."""
            shown = show(result, True)
            return {**shown, reference_state: shown[base_state].reference, reference_view: result.reference.image}

        @guarded
        def on_search(reference, text_value, method_value, k):
            require_service()
            if reference is None:
                raise UserError(NO_REFERENCE)
            return show(service.search(reference, text_value, method_value, int(k)), False)

        @guarded
        def on_settings(reference, text_value, method_value, k):
            """Method or top-k changed: search again if there is a reference, else wait quietly."""
            if service is None or reference is None:
                return gr.skip()
            return show(service.search(reference, text_value, method_value, int(k)), False)

        @guarded
        def on_upload(path, text_value, method_value, k):
            require_service()
            return new_reference(service.search(path, text_value, method_value, int(k)))

        def pick(row: int, text_value, method_value, k):
            require_service()
            return new_reference(service.search(int(row), text_value, method_value, int(k)))

        @guarded
        def on_example(path, text_value):
            """An example row was clicked: its photo is a gallery image, searched as such (cached tokens) with
            FTI4CIR and the default k, which the page then shows as chosen."""
            require_service()
            rows = {Path(service.gallery.paths[row]).name: row for row, _ in example_rows}
            return {**pick(rows[Path(path).name], text_value, "fti4cir", DEFAULT_K), method: "fti4cir",
                    top_k: DEFAULT_K}

        @guarded
        def on_browser_select(evt: gr.SelectData, text_value, method_value, k):
            return pick(shown_rows[evt.index], text_value, method_value, k)

        @guarded
        def on_result_select(evt: gr.SelectData, shown, text_value, method_value, k):
            return pick(shown[evt.index], text_value, method_value, k)

        @guarded
        def on_switch(values, base):
            require_service()
            if base is None:
                raise UserError("Run a search first; the switches act on its results.")
            reference = base.reference
            keep_attributes, keep_subject = switches_from_values(values, reference.num_kept)
            result = service.search(reference, base.text, base.method, len(base.hits), keep_attributes,
                                    keep_subject)
            moves = {m.name: m for m in rank_changes(base.hits, result.hits)}
            captions = [(str(h.path), f"{moves[h.name].arrow} {h.caption}".strip()) for h in result.hits]
            dropped = [m.name for m in moves.values() if m.kind == "out"]
            summary = f"**Moved:** {summarize_moves(list(moves.values()))}"
            if dropped:
                summary += " — out: " + ", ".join(f"`{n}`" for n in dropped)
            if base.method not in ("fti4cir", "subject-only"):
                summary += f" (the switches act on FTI4CIR's pseudo tokens: no effect on method {base.method})"
            return {sentence: sentence_html(result), timing: f"**Query time:** {result.timing_text()}",
                    results: captions, moved: summary, status: "", shown_state: [h.index for h in result.hits]}

        def api_search(image, gallery_name, text_value, method_value, k):
            """Stateless search: an uploaded image, or the name of a gallery image; results as JSON. Problems are
            part of the answer, {"error": message}, never a failed request or a traceback."""
            try:
                require_service()
                if image:
                    reference = service.reference(image, display=False)
                elif gallery_name:
                    reference = service.gallery_reference(service.gallery.row(gallery_name), display=False)
                else:
                    raise UserError(NO_REFERENCE)
                result = service.search(reference, text_value, method_value or "fti4cir", api_top_k(k))
            except UserError as e:
                return {"error": str(e)}
            except Exception:  # noqa: BLE001
                log.exception("api search failed")
                return {"error": GENERIC_ERROR}
            return {"reference": reference.name, "sentence": result.sentence, "text": result.text,
                    "method": result.method, "query_ms": round(result.seconds * 1000, 2),
                    "results": [{"rank": h.rank, "name": h.name, "score": round(h.score, 6)} for h in result.hits]}

        ui = dict(api_visibility="undocumented")
        search_inputs = [reference_state, text, method, top_k]
        search.click(on_search, search_inputs, result_outputs, **ui)
        text.submit(on_search, search_inputs, result_outputs, **ui)
        method.input(on_settings, search_inputs, result_outputs, **ui)
        top_k.release(on_settings, search_inputs, result_outputs, **ui)
        upload.upload(on_upload, [upload, text, method, top_k],
                      result_outputs + [reference_state, reference_view], **ui)
        browser.select(on_browser_select, [text, method, top_k], result_outputs + [reference_state, reference_view],
                       **ui)
        results.select(on_result_select, [shown_state, text, method, top_k],
                       result_outputs + [reference_state, reference_view], **ui)
        if example_rows:
            with examples_slot:
                gr.Examples([[str(service.gallery.paths[row]), query] for row, query in example_rows],
                            [example_image, text],
                            result_outputs + [reference_state, reference_view, method, top_k], on_example,
                            cache_examples=False, run_on_click=True, elem_id="examples",
                            label="Try an example (a gallery photo and a change)",
                            examples_per_page=len(example_rows))
        switches.input(on_switch, [switches, base_state],
                       [sentence, timing, results, moved, status, shown_state], **ui)
        api_trigger.click(api_search, [api_image, api_gallery_name, text, api_method, api_k], [api_out],
                          api_name="search")
    return demo


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("httpx", "faiss.loader"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    args = parse_args(argv)
    from fti4cir.inputs import MAX_UPLOAD_BYTES

    setup = load_service(args)
    for problem in setup.problems:
        log.warning("search disabled: %s", problem.replace("**", ""))
    demo = build_demo(setup, args.cache_max_age)
    age = max(1, args.cache_max_age)
    threading.Thread(target=sweep_cache, args=(demo, age, min(CACHE_SWEEP_S, age)), name="cache-sweep",
                     daemon=True).start()
    demo.queue(default_concurrency_limit=max(1, args.concurrency), max_size=max(1, args.max_queue))
    from starlette.middleware import Middleware

    allowed, middleware = [], [Middleware(ServingHeaders)]
    if setup.service:
        gallery = setup.service.gallery
        allowed = [str(gallery.root)]
        middleware.append(Middleware(GalleryFilesOnly, root=gallery.root, images=gallery.paths))
    # enable_monitoring=False: gradio's /monitoring routes (traffic summary and dashboard) answer 403 to everyone
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, max_file_size=MAX_UPLOAD_BYTES,
                allowed_paths=allowed, show_error=False, css=CSS, app_kwargs={"middleware": middleware},
                state_session_capacity=max(1, args.max_sessions), enable_monitoring=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
