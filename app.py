"""FTI4CIR composed image retrieval demo (Gradio): reference image + modification text -> ranked gallery images.

    python app.py                                                            # the embedded demo model and gallery
    python app.py --tiny --gallery demo                                      # offline, random tiny model
    python app.py --weights fti4cir_vitl14.safetensors --gallery clothing    # ViT-L-14/openai + trained weights
    python app.py --model fti4cir-official --gallery NAME                    # the official weights from the Hub
    python app.py ... --m2c-weights m2c_stage2.safetensors                   # + methods m2c, m2c+compose

Shows what the model understood (the pseudo-word sentence with each token's nearest words, the relevance of the
attribute queries, each kept attribute token's attention over the image) and lets the user switch tokens off to see
how the ranking changes. When the model or gallery cannot be loaded the page still comes up, with a banner that says
what was tried and what to do, and searching disabled; a preset (--model) that cannot be fetched falls back to the
embedded demo, with a banner saying so. Flags also read environment variables (FTI4CIR_*, and the GRADIO_SERVER_NAME
/ GRADIO_SERVER_PORT / PORT that hosting platforms such as Hugging Face Spaces set).

This file holds the configuration, the page's layout and wiring and the server; what each event computes is in
`fti4cir.ui` (tested without a browser), the search itself in `fti4cir.app_service`.
"""

import argparse
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fti4cir.errors import UserError
from fti4cir.ui import (  # noqa: F401 - EXAMPLES, NO_REFERENCE and the renderers are also read as app.X by tests
    DEFAULT_K,
    EXAMPLE_OUTPUTS,
    EXAMPLES,
    NO_REFERENCE,
    REFERENCE_OUTPUTS,
    RESULT_OUTPUTS,
    SWITCH_OUTPUTS,
    Choices,
    Page,
    browser_rows,
    guarded,
    relevance_figure,
    sentence_html,
    switch_choices,
    switches_from_values,
)

log = logging.getLogger("fti4cir.app")

# Cleanup. Per-session state lives at most SESSION_TTL_S, and at most --max-sessions sessions are kept (the least
# recently active go first). What one session holds: our lean reference and last result (tens of kB), plus gradio's
# copy of the page config with the last value of every output (the chart as an image, the result and heatmap
# galleries): about 1.5 MB with the tiny model (measured over 30 new sessions), so 256 sessions hold roughly 400 MB
# at most (tests/test_reliability_app.py: flat once the bound is reached). gradio's upload and result-image
# cache is swept every min(CACHE_SWEEP_S, age), deleting files older than --cache-max-age (all of it at shutdown).
SESSION_TTL_S = 3600
UNSET = object()  # a model flag that was not given
DEMO_GALLERY = "clothing"  # the embedded demo (fti4cir demo-rebuild --install)
CACHE_SWEEP_S = 600
MODEL_FLAGS = ("backbone", "pretrained", "weights", "m2c_weights")  # what a gallery definition names


# ---- configuration -----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from fti4cir.commands.common import add_model_args

    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    # model flags left out (and no FTI4CIR_* variable): the model the gallery was built with (see gallery_model)
    parser.set_defaults(
        backbone=env("FTI4CIR_BACKBONE", UNSET),
        pretrained=env("FTI4CIR_PRETRAINED", UNSET),
        weights=env("FTI4CIR_WEIGHTS") or UNSET,
        model=env("FTI4CIR_MODEL") or None,
    )
    parser.add_argument(
        "--m2c-weights",
        default=env("FTI4CIR_M2C_WEIGHTS") or UNSET,
        help="M2C weights (.safetensors from `fti4cir m2c-train`, same backbone): adds the methods m2c "
        "and, for stage-2 weights, m2c+compose",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        default=env("FTI4CIR_TINY", "") not in ("", "0"),
        help="tiny random-weight model (fti4cir-tiny, no pretrained weights; for tests and offline "
        "demos: results are meaningless)",
    )
    parser.add_argument(
        "--gallery",
        default=env("FTI4CIR_GALLERY"),
        help="gallery name under --galleries-dir or a gallery folder (default: the only gallery there)",
    )
    parser.add_argument(
        "--galleries-dir",
        default=env("FTI4CIR_GALLERIES_DIR", "galleries"),
        help="folder of named galleries (default %(default)s)",
    )
    parser.add_argument(
        "--host",
        default=env("GRADIO_SERVER_NAME", "127.0.0.1"),
        help="address to listen on (0.0.0.0: every interface; default %(default)s)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(env("GRADIO_SERVER_PORT") or env("PORT") or 7860),
        help="port (default: $GRADIO_SERVER_PORT, else $PORT, else 7860)",
    )
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=int(env("FTI4CIR_CONCURRENCY", "2")),
        help="requests computed at the same time; the rest wait in the queue (default %(default)s)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=int(env("FTI4CIR_MAX_QUEUE", "64")),
        help="waiting requests beyond which new ones are refused (default %(default)s)",
    )
    parser.add_argument(
        "--cache-max-age",
        type=int,
        default=int(env("FTI4CIR_CACHE_MAX_AGE", "3600")),
        help="seconds an uploaded or result file stays in gradio's cache (default %(default)s)",
    )
    parser.add_argument(
        "--max-sessions",
        type=int,
        default=int(env("FTI4CIR_MAX_SESSIONS", "256")),
        help="browser sessions whose state is kept; the least recently active are dropped beyond "
        "this (default %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.tiny:
        from fti4cir import TINY_MODEL

        args.backbone, args.pretrained, args.weights, args.model = TINY_MODEL, None, None, None
    gallery_model(args)
    return args


def gallery_model(args) -> None:
    """Without model flags, the model the gallery's definition names (`<galleries-dir>/<gallery>.json`, written when
    it was built), M2C weights included: `python app.py` serves the embedded demo model on its gallery, `--gallery
    NAME` alone builds NAME's model. Model flags that are given (a preset included) win (the rest take the usual
    defaults); `Gallery.load` then names both sides of any mismatch."""
    from fti4cir.gallery import list_galleries
    from fti4cir.presets import DEFAULT_MODEL, DEFAULT_PRETRAINED

    if args.gallery is None:
        available = list_galleries(args.galleries_dir)
        if len(available) == 1 or DEMO_GALLERY in available:
            args.gallery = available[0] if len(available) == 1 else DEMO_GALLERY
    chosen = getattr(args, "model", None) is not None or any(
        getattr(args, key) is not UNSET for key in ("backbone", "pretrained", "weights")
    )
    values = definition_model(args.galleries_dir, args.gallery) if args.gallery and not chosen else {}
    for key, fallback in zip(MODEL_FLAGS, (DEFAULT_MODEL, DEFAULT_PRETRAINED, None, None)):
        if getattr(args, key) is UNSET:
            setattr(args, key, values.get(key, fallback))


def definition_model(galleries_dir, gallery: str) -> dict:
    """The model flags a gallery's definition names ({} when it has none or cannot be read: a warning)."""
    from fti4cir.gallery import read_definition

    definition = Path(galleries_dir) / f"{gallery}.json"
    if not definition.is_file():
        return {}
    try:
        values = read_definition(definition)
    except UserError as e:
        log.warning("%s", e)
        return {}
    return {key: values[key] for key in MODEL_FLAGS if key in values}


def model_spec(args):
    """The `ModelSpec` of the app's flags: built by `fti4cir.factory.create_model` exactly as `fti4cir index` builds
    it (random weights seeded the same way), so that galleries built with the same flags load; with --m2c-weights the
    model carries the M2C model on the same backbone (`.m2c`)."""
    from fti4cir.spec import ModelSpec

    return ModelSpec(
        backbone=args.backbone,
        pretrained=args.pretrained,
        weights=args.weights,
        weights_revision=args.weights_revision,
        m2c_weights=args.m2c_weights or None,
        preprocess=args.preprocess,
        device=args.device,
        seed=args.seed,
        model=args.model,
    )


@dataclass
class Setup:
    """What `load_service` achieved: a service, or None with the reason, plus notes for the banner."""

    service: object | None
    problems: list[str]
    notes: list[str]


def load_service(args) -> Setup:
    """Model + gallery -> SearchService; every failure becomes a banner message instead of a crash. A preset
    (--model, FTI4CIR_MODEL) that cannot be fetched falls back to the embedded demo when there is one."""
    from fti4cir.app_service import SearchService
    from fti4cir.gallery import Gallery, list_galleries

    problems, notes = [], []
    spec = model_spec(args)
    what = (
        f"preset {args.model}"
        if args.model
        else f"backbone {args.backbone} / pretrained {args.pretrained} / inversion weights {args.weights or 'random'}"
    )
    try:
        spec = spec.resolved()  # a preset's weights are fetched (and converted) here
        model, m2c_problem = create_model_or_fti4cir(spec)
    except UserError as e:
        fallback = embedded_fallback(args, e)
        if fallback is not None:
            return fallback
        return Setup(None, [f"**The model could not be loaded** ({what}).\n\n{e}\n\n{_weights_help()}"], notes)
    except Exception as e:  # noqa: BLE001 - a broken file or platform problem must not stop the page
        log.exception("loading the model failed")
        return Setup(
            None, [(f"**The model could not be loaded** ({what}): {type(e).__name__}: {e}\n\n{_weights_help()}")], notes
        )
    if m2c_problem:
        notes.append(m2c_problem)
    if args.tiny or spec.pretrained is None:
        notes.append(
            "Running a **random-weight model** (tiny or `--pretrained none`): the interface works, the "
            "rankings and words are meaningless."
        )
    elif spec.weights is None:
        notes.append(
            "The inversion network has **random weights** (no `--weights` given): the pseudo words and "
            "rankings are meaningless. " + _weights_help()
        )

    gallery_name = args.gallery
    if gallery_name is None:
        available = list_galleries(args.galleries_dir)
        if len(available) != 1:
            listed = ", ".join(available) if available else "none"
            return Setup(
                None,
                [
                    (
                        f"**No gallery chosen.** Galleries in `{args.galleries_dir}/`: {listed}. Start "
                        "with `--gallery NAME`, or build one: `fti4cir index IMAGE_FOLDER --name NAME` (same "
                        "`--backbone/--pretrained/--weights` as the app)."
                    )
                ],
                notes,
            )
        gallery_name = available[0]
    try:
        gallery = Gallery.load(gallery_name, model=model, galleries_dir=args.galleries_dir)
    except UserError as e:
        return Setup(None, [f"**The gallery could not be loaded.** {e}"], notes)
    if len(gallery) == 0:
        return Setup(None, [f"**Gallery {gallery_name} is empty.**"], notes)
    return Setup(SearchService(model, gallery, model.m2c), problems, notes)


def create_model_or_fti4cir(spec):
    """(model, problem): the model of `spec`; when only its M2C weights fail, the model without them and the reason
    for the banner (FTI4CIR still works). The M2C model preprocesses like the gallery, whose features it is ranked
    against."""
    from fti4cir.factory import create_model

    try:
        return create_model(spec), None
    except Exception as e:  # noqa: BLE001 - sorted out below
        if spec.m2c_weights is None:
            raise
        model = create_model(spec.replace(m2c_weights=None))  # fails again: the problem is not M2C's
        if isinstance(e, UserError):
            return model, f"**The M2C methods are off:** {e}"
        log.error("loading the M2C weights failed", exc_info=e)
        return model, (f"**The M2C methods are off:** {spec.m2c_weights} could not be read ({type(e).__name__}: {e})")


def embedded_fallback(args, reason: Exception) -> Setup | None:
    """A preset that could not be loaded (no network, say): the embedded demo model on its gallery instead, with a
    banner that says so; None without a preset or an embedded demo."""
    if not args.model or not (Path(args.galleries_dir) / f"{DEMO_GALLERY}.json").is_file():
        return None
    log.warning("the preset %s could not be loaded, serving the embedded demo instead: %s", args.model, reason)
    fallback = argparse.Namespace(
        **{**vars(args), "model": None, "gallery": DEMO_GALLERY, **dict.fromkeys(MODEL_FLAGS, UNSET)}
    )
    gallery_model(fallback)
    setup = load_service(fallback)
    setup.notes.insert(
        0,
        f"**The model {args.model} could not be loaded, so this page serves the embedded demo "
        f"model** (gallery {DEMO_GALLERY}, a small CLIP trained on the demo photos) instead.\n\n"
        f"{reason}",
    )
    return setup


def _weights_help() -> str:
    return (
        "To use real weights: `--pretrained /path/to/ViT-L-14.pt` (OpenAI CLIP file) or a filled Hugging Face "
        "cache for the backbone, and `--weights` with our `.safetensors`, the official FTI4CIR release `.pth` "
        "or a hub id for the inversion network. For an offline demo with random weights: `python app.py --tiny "
        "--gallery NAME` (with a gallery built by `fti4cir index ... --backbone fti4cir-tiny --pretrained none`)."
    )


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
/* phone-width screens: the token table scrolls inside its box instead of widening the page */
table.words { display: block; max-width: 100%; overflow-x: auto; }
.sentence { overflow-wrap: anywhere; }
/* and the image grids take fewer columns instead of scrolling sideways (gradio keeps 100 px a column) */
@media (max-width: 640px) {
  #results .grid-container, #heatmaps .grid-container { grid-template-columns: repeat(3, minmax(0, 1fr)); }
  #gallery .grid-container { grid-template-columns: repeat(4, minmax(0, 1fr)); }
}
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
                requested = os.path.realpath(path[at + len(route) :])
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
                    name = disposition[disposition.find("filename") :] if "filename" in disposition else ""
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
    """The page: layout and wiring. Each event runs a method of `fti4cir.ui.Page` (what it computes) through
    `event` (names -> components, errors -> the status line and a toast)."""
    import gradio as gr

    from fti4cir.compose import METHODS
    from fti4cir.inputs import MAX_TEXT_CHARS, describe_limits

    class ReferenceImage(gr.Image):
        """gr.Image that hands the event the uploaded file's path without decoding it (gradio has checked that it
        is an upload): `fti4cir.inputs.load_image` reads and checks it like every upload, so a dropped file that is
        no image gets the page's readable message instead of a gradio error."""

        is_template = True  # the page shows it as gradio's own image component

        def preprocess(self, payload):
            if payload is not None and payload.path:
                return payload.path
            return super().preprocess(payload)

    page = Page(setup.service, setup.problems)
    enabled = setup.service is not None
    banner = "\n\n".join(setup.problems + setup.notes)
    k_min, k_max, k_value = page.top_k_range()

    # gradio deletes cached files older than the age every CACHE_SWEEP_S and all of them at shutdown; `sweep_cache`
    # adds the rounds that survive its races (and sweeps sooner for short ages)
    with gr.Blocks(
        title="FTI4CIR composed image retrieval", delete_cache=(CACHE_SWEEP_S, max(1, cache_max_age))
    ) as demo:
        gr.Markdown(
            "## FTI4CIR · composed image retrieval\nGive a reference image and say what to change; the "
            "image is turned into pseudo words (a subject and a few attributes) that are read together with "
            "your text."
        )
        gr.Markdown(banner, visible=bool(banner), elem_id="banner")
        reference_state = gr.State(None, time_to_live=SESSION_TTL_S)  # lean app_service.Reference of this session
        base_state = gr.State(None, time_to_live=SESSION_TTL_S)  # lean Result, all tokens on: what switches compare to
        shown_state = gr.State([], time_to_live=SESSION_TTL_S)  # gallery rows of the displayed results

        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=280):
                # drop a file on it, paste one (clipboard) or take a webcam photo; or the button below
                reference_view = ReferenceImage(
                    label="Reference (drop, paste or webcam)",
                    type="filepath",
                    sources=["upload", "clipboard", "webcam"],
                    height=240,
                    interactive=enabled,
                    buttons=[],
                    elem_id="reference",
                )
                upload = gr.UploadButton(
                    "Upload a reference image",
                    file_types=["image"],
                    type="filepath",
                    size="md",
                    elem_id="upload",
                    interactive=enabled,
                )
                text = gr.Textbox(
                    label="Modification text",
                    placeholder="e.g. is red and has long sleeves",
                    max_lines=3,
                    max_length=4 * MAX_TEXT_CHARS,
                    elem_id="text",
                )
                method = gr.Radio(page.methods(METHODS), value="fti4cir", label="Method", elem_id="method")
                top_k = gr.Slider(k_min, k_max, value=k_value, step=1, label="Results (top-k)", elem_id="topk")
                search = gr.Button("Search", variant="primary", elem_id="search", interactive=enabled)
                status = gr.HTML(elem_id="status")
                examples_slot = gr.Column()  # the one-click examples, filled once the outputs exist (below)
            with gr.Column(scale=2, min_width=300):
                sentence = gr.HTML(
                    "<p>Upload a reference image or click one in the gallery below to see its pseudo words.</p>",
                    elem_id="sentence",
                )
                timing = gr.Markdown(elem_id="timing")
                results = gr.Gallery(
                    label="Results (click one to use it as the reference)",
                    columns=5,
                    height="auto",
                    object_fit="contain",
                    allow_preview=False,
                    interactive=False,
                    buttons=[],
                    elem_id="results",
                )
                switches = gr.CheckboxGroup(
                    label="Counterfactual: pseudo tokens in the query (untick to switch "
                    "one off; the results re-rank at once)",
                    elem_id="switches",
                )
                moved = gr.Markdown(elem_id="moved")
        with gr.Row(equal_height=False):
            chart = gr.Plot(
                label="Relevance of the attribute queries",
                show_label=False,
                elem_id="relevance",
                scale=1,
                min_width=300,
            )
            heatmaps = gr.Gallery(
                label="Attention of each kept attribute token",
                columns=4,
                height=300,
                object_fit="contain",
                allow_preview=False,
                interactive=False,
                buttons=[],
                elem_id="heatmaps",
                scale=1,
                min_width=300,
            )
        example_image = gr.Image(visible=False, type="filepath")  # what an example row holds: a gallery photo
        with gr.Accordion(
            f"Gallery: click an image to use it as the reference ({len(page.shown_rows)} of {page.size} shown)",
            open=True,
        ):
            browser = gr.Gallery(
                value=page.browser_items(),
                show_label=False,
                columns=10,
                height=260,
                object_fit="cover",
                allow_preview=False,
                interactive=False,
                buttons=[],
                elem_id="gallery",
            )
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

        components = {
            "sentence": sentence,
            "timing": timing,
            "results": results,
            "chart": chart,
            "heatmaps": heatmaps,
            "switches": switches,
            "moved": moved,
            "status": status,
            "base_state": base_state,
            "shown_state": shown_state,
            "reference_state": reference_state,
            "reference_view": reference_view,
            "method": method,
            "top_k": top_k,
        }

        def event(fn):
            """A Page method as an event function: its {name: value} as {component: value}; a failure's message in
            the status line and a toast; None (nothing to do) skips the update."""
            fn = guarded(fn)

            def run(*args):
                out = fn(*args)
                if out is None:
                    return gr.skip()
                if "warning" in out:
                    gr.Warning(out.pop("warning"))
                return {
                    components[name]: gr.update(choices=value.choices, value=value.value)
                    if isinstance(value, Choices)
                    else value
                    for name, value in out.items()
                }

            return run

        def outputs(names):
            return [components[name] for name in names]

        def on_browser_select(evt: gr.SelectData, text_value, method_value, k):
            return event(page.browser_select)(evt.index, text_value, method_value, k)

        def on_result_select(evt: gr.SelectData, shown, text_value, method_value, k):
            return event(page.result_select)(evt.index, shown, text_value, method_value, k)

        def api_search(image, gallery_name, text_value, method_value, k, request: gr.Request = None):
            return page.api_search(image, gallery_name, text_value, method_value, k, root_url=root_url(request))

        ui = {"api_visibility": "undocumented"}
        search_inputs = [reference_state, text, method, top_k]
        search.click(event(page.search), search_inputs, outputs(RESULT_OUTPUTS), **ui)
        text.submit(event(page.search), search_inputs, outputs(RESULT_OUTPUTS), **ui)
        method.input(event(page.settings), search_inputs, outputs(RESULT_OUTPUTS), **ui)
        top_k.release(event(page.settings), search_inputs, outputs(RESULT_OUTPUTS), **ui)
        upload.upload(event(page.upload), [upload, text, method, top_k], outputs(REFERENCE_OUTPUTS), **ui)
        # a file dropped on the reference box or chosen there, a pasted image, a webcam photo: all are "upload"s
        # (never fired by our own updates of the box); clearing the box forgets the session's reference
        reference_inputs = [reference_view, text, method, top_k]
        reference_view.upload(event(page.upload), reference_inputs, outputs(REFERENCE_OUTPUTS), **ui)
        reference_view.clear(event(page.upload), reference_inputs, outputs(REFERENCE_OUTPUTS), **ui)
        browser.select(on_browser_select, [text, method, top_k], outputs(REFERENCE_OUTPUTS), **ui)
        results.select(on_result_select, [shown_state, text, method, top_k], outputs(REFERENCE_OUTPUTS), **ui)
        if page.example_rows:
            with examples_slot:
                gr.Examples(
                    page.example_items(),
                    [example_image, text],
                    outputs(EXAMPLE_OUTPUTS),
                    event(page.example),
                    cache_examples=False,
                    run_on_click=True,
                    elem_id="examples",
                    label="Try an example (a gallery photo and a change)",
                    examples_per_page=len(page.example_rows),
                )
        switches.input(event(page.switch), [switches, base_state], outputs(SWITCH_OUTPUTS), **ui)
        api_trigger.click(
            api_search, [api_image, api_gallery_name, text, api_method, api_k], [api_out], api_name="search"
        )
    return demo


def root_url(request) -> str:
    """The server's public address as the request reached it (behind a proxy such as a Space's: the forwarded host
    and scheme), the way gradio computes its own file URLs; "" without a request (a direct call)."""
    from gradio import route_utils

    raw = getattr(request, "request", None) if request is not None else None
    if raw is None:
        return ""
    try:
        route = route_utils.get_api_call_path(raw)
    except ValueError:
        route = raw.url.path
    app = raw.scope.get("app")
    return route_utils.get_root_url(raw, route, getattr(app, "root_path", None) or None)


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
    threading.Thread(
        target=sweep_cache, args=(demo, age, min(CACHE_SWEEP_S, age)), name="cache-sweep", daemon=True
    ).start()
    demo.queue(default_concurrency_limit=max(1, args.concurrency), max_size=max(1, args.max_queue))
    from starlette.middleware import Middleware

    allowed, middleware = [], [Middleware(ServingHeaders)]
    if setup.service:
        gallery = setup.service.gallery
        allowed = [str(gallery.root)]
        middleware.append(Middleware(GalleryFilesOnly, root=gallery.root, images=gallery.paths))
    # enable_monitoring=False: gradio's /monitoring routes (traffic summary and dashboard) answer 403 to everyone
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        max_file_size=MAX_UPLOAD_BYTES,
        allowed_paths=allowed,
        show_error=False,
        css=CSS,
        app_kwargs={"middleware": middleware},
        state_session_capacity=max(1, args.max_sessions),
        enable_monitoring=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
