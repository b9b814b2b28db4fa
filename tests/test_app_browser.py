"""End to end in a real browser, driven by headless Chromium (Playwright).

`python app.py --tiny` on a small gallery: upload (a bad file, then a photo), type a text, search; the sentence, the
relevance chart, the heatmaps and k results appear; switching a token off re-ranks (the "moved" summary and the
sentence update); clicking a result makes it the reference. `python app.py` (the embedded demo, no flags): one click
on an example gives results of the asked class and colour, also on a phone-width (390 px) screen. At 390 px the
reference is also dropped on its box (a file that is no image: the readable message), pasted from the clipboard and
taken with a (fake) webcam, each giving a new search, and nothing is wider than the screen. Screenshots go to the
test's tmp folder; the demo's, with FTI4CIR_UPDATE_SCREENSHOT=1, also to docs/screenshot.png (the README's picture),
so that a plain test run leaves the checkout unchanged.
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest

from app_server import REPO, build_tiny_gallery, running_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
GALLERY_SIZE = 20
K = 10  # the app's default top-k
TIMEOUT_MS = 30_000
PHONE = {"width": 390, "height": 844}
# a fake camera (a generated test pattern) that needs no permission prompt
WEBCAM_ARGS = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
DROP_JS = """async ([b64, name]) => {
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([bytes], name, {type: 'image/jpeg'}));
  const target = document.querySelector('#reference [aria-label="Drop an image file here to upload"]');
  for (const type of ['dragenter', 'dragover', 'drop'])
    target.dispatchEvent(new DragEvent(type, {dataTransfer: data, bubbles: true, cancelable: true}));
}"""
COPY_JS = """async (b64) => {
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
  const image = await createImageBitmap(new Blob([bytes], {type: 'image/jpeg'}));
  const canvas = new OffscreenCanvas(image.width, image.height);
  canvas.getContext('2d').drawImage(image, 0, 0);
  const png = await canvas.convertToBlob({type: 'image/png'});
  await navigator.clipboard.write([new ClipboardItem({'image/png': png})]);
}"""


@pytest.fixture(autouse=True)
def patient_assertions():
    """Every `expect` here waits as long as the page does: its own default is 5 s, whatever
    `page.set_default_timeout` says, and on a loaded 2-core machine an upload, a visual pass and a search can take
    longer (all three tests failed that way in a clean-clone run beside two training jobs)."""
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    yield
    expect.set_options(timeout=5_000)


@pytest.fixture
def app_url(tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    galleries = build_tiny_gallery(tmp_path, GALLERY_SIZE)
    with running_app(tmp_path, galleries) as server:
        yield server.url
    assert "Traceback" not in server.log_text(), server.log_text()[-3000:]


def save_screenshot(page, tmp_path: Path, *, readme: bool = False) -> None:
    """Into the test's tmp folder; the README's picture (the embedded demo) also into docs/screenshot.png with
    FTI4CIR_UPDATE_SCREENSHOT=1."""
    for close in page.locator(".toast-close").all():  # the bad upload's warning would cover the banner
        close.click()
    shot = tmp_path / "app.png"
    page.screenshot(path=str(shot), full_page=True)
    if not readme or os.environ.get("FTI4CIR_UPDATE_SCREENSHOT") != "1":
        return
    docs = REPO / "docs"
    docs.mkdir(exist_ok=True)
    partial = docs / ".screenshot.png.tmp"
    shutil.copyfile(shot, partial)
    os.replace(partial, docs / "screenshot.png")


def text_of(page, selector: str) -> str:
    return page.locator(selector).inner_text()


def assert_fits(page, width: int) -> None:
    """Nothing makes the page wider than the screen: no horizontal scrolling of the page, and every image (of the
    results, heatmaps, gallery) and control inside the screen, not in a grid that scrolls sideways."""
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    overflowing = page.evaluate(
        """(width) => [...document.querySelectorAll('#results img, #heatmaps img, '
        + '#gallery img, #reference img, #search, #text textarea, #sentence, #examples')]
        .map(e => e.getBoundingClientRect())
        .filter(r => r.width > 0 && (r.left < -1 || r.right > width + 1)).length""",
        width,
    )
    assert overflowing == 0


def expect_new_reference(page, text: str) -> None:
    """A new reference was searched (a visual pass) with `text` (typed before, so the sentence shows that this
    search ran): K results."""
    from playwright.sync_api import expect

    expect(page.locator("#sentence .sentence")).to_contain_text(f"but {text}")
    expect(page.locator("#timing")).to_contain_text("(visual pass + inversion)")
    expect(page.locator("#results img")).to_have_count(K)


def test_search_explain_switch_and_pick_in_a_browser(app_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    bad = tmp_path / "notes.jpg"
    bad.write_text("This is not an image.\n" * 20)
    photo = sorted((tmp_path / "photos" / "skirt").glob("*.jpg"))[0]

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(app_url)
            expect(page.locator("#gallery img")).to_have_count(GALLERY_SIZE)

            # a bad upload: a readable message in the page, no traceback, no results
            with page.expect_file_chooser() as chooser:
                page.click("#upload")
            chooser.value.set_files(str(bad))
            expect(page.locator("#status")).to_contain_text('"notes.jpg" is not a supported image')
            assert page.locator("#results img").count() == 0
            assert "Traceback" not in page.content()

            # upload a photo, type a text, search
            with page.expect_file_chooser() as chooser:
                page.click("#upload")
            chooser.value.set_files(str(photo))
            expect(page.locator("#reference img")).to_be_visible()
            expect(page.locator("#results img")).to_have_count(K)  # the upload searches at once (empty text)
            page.fill("#text textarea", "is red and has long sleeves")
            page.click("#search")
            sentence = page.locator("#sentence .sentence")
            expect(sentence).to_contain_text("but is red and has long sleeves")
            assert text_of(page, "#sentence .sentence").startswith("a photo of [")
            expect(page.locator("#sentence table.words tr")).not_to_have_count(0)
            expect(page.locator("#status")).to_have_text("")
            expect(page.locator("#timing")).to_contain_text("Query time:")

            # the relevance chart and one heatmap per kept attribute token
            chart = page.locator("#relevance img")
            expect(chart).to_be_visible()
            assert chart.evaluate("img => img.naturalWidth") > 300
            switches = page.locator("#switches label")
            kept = switches.count() - 1  # the first switch is the subject token
            assert kept >= 1
            expect(page.locator("#heatmaps img")).to_have_count(kept)
            expect(page.locator("#results img")).to_have_count(K)
            captions = page.locator("#results .caption-label").all_inner_texts()
            assert all(" · " in c for c in captions), captions

            # switch the subject token off: the server re-ranks and reports what moved
            expect(page.locator("#moved")).not_to_contain_text("Moved:")
            switches.first.click()
            expect(page.locator("#moved")).to_contain_text("Moved:")
            expect(sentence).to_contain_text("a photo of something with")
            expect(page.locator("#sentence tr.off")).to_have_count(1)
            expect(page.locator("#results img")).to_have_count(K)
            save_screenshot(page, tmp_path)

            # click the third result: it becomes the reference (cached tokens) and leaves its own results
            picked = page.locator("#results .caption-label").nth(2).inner_text()
            picked_name = picked.split(" · ")[0].split(" ")[-1]
            before = page.locator("#reference img").get_attribute("src")
            page.locator("#results button.thumbnail-item").nth(2).click()
            expect(page.locator("#timing")).to_contain_text("(cached tokens)")
            assert page.locator("#reference img").get_attribute("src") != before
            expect(page.locator("#results img")).to_have_count(K)
            names = [c.split(" · ")[0] for c in page.locator("#results .caption-label").all_inner_texts()]
            assert picked_name not in names
            expect(page.locator("#switches input:checked")).to_have_count(switches.count())  # reset to all on
            page.screenshot(path=str(tmp_path / "picked.png"), full_page=True)
        finally:
            browser.close()


def test_reference_by_drop_paste_and_webcam_at_phone_width(app_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    photos = sorted((tmp_path / "photos").rglob("*.jpg"))
    encoded = [base64.b64encode(p.read_bytes()).decode() for p in photos[:2]]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS + WEBCAM_ARGS)
        try:
            context = browser.new_context(viewport=PHONE, permissions=["camera", "clipboard-read", "clipboard-write"])
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(app_url)
            expect(page.locator("#gallery img")).to_have_count(GALLERY_SIZE)
            sources = page.locator("#reference [data-testid=source-select] button")
            assert [b.get_attribute("aria-label") for b in sources.all()] == [
                "Upload file",
                "Capture from camera",
                "Paste from clipboard",
            ]
            assert_fits(page, PHONE["width"])

            not_an_image = base64.b64encode(b"This is not an image.\n" * 20).decode()
            page.evaluate(DROP_JS, [not_an_image, "notes.jpg"])  # a readable message, as for the upload button
            expect(page.locator("#status")).to_contain_text('"notes.jpg" is not a supported image')
            assert page.locator("#results img").count() == 0

            page.fill("#text textarea", "is dropped")
            page.evaluate(DROP_JS, [encoded[0], photos[0].name])  # drag and drop
            expect_new_reference(page, "is dropped")
            expect(page.locator("#reference img:visible")).to_have_count(1)
            assert_fits(page, PHONE["width"])
            page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)

            page.fill("#text textarea", "is pasted")
            page.evaluate(COPY_JS, encoded[1])  # paste from the clipboard
            page.click("#reference [aria-label='Paste from clipboard']")
            expect_new_reference(page, "is pasted")

            page.fill("#text textarea", "is from the webcam")
            page.click("#reference [aria-label='Capture from camera']")  # the webcam
            page.get_by_text("Click to Access Webcam").click()
            # a capture before the stream delivers frames is ignored: wait for a playing video first
            page.wait_for_function(
                "() => { const v = document.querySelector('#reference video');"
                " return v !== null && v.readyState >= 2 && v.videoWidth > 0; }"
            )
            page.click("#reference button[aria-label='capture photo']")
            expect_new_reference(page, "is from the webcam")
            assert_fits(page, PHONE["width"])
            expect(page.locator("#status")).to_have_text("")
            assert "Traceback" not in page.content()
        finally:
            browser.close()


def test_the_embedded_demo_answers_an_example_in_a_browser(tmp_path):
    """No flags: the embedded model and gallery; clicking the first example searches it at once."""
    from playwright.sync_api import expect, sync_playwright

    import app

    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    _, text = app.EXAMPLES[0]
    with running_app(tmp_path, None, gallery=None, tiny=False) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(server.url)
            examples = page.locator("#examples button, #examples tr.tr-body")
            expect(examples.first).to_be_visible()
            examples.first.click()
            expect(page.locator("#results img")).to_have_count(K)
            expect(page.locator("#text textarea")).to_have_value(text)
            sentence = text_of(page, "#sentence .sentence")
            assert sentence.startswith("a photo of [") and sentence.endswith(f"but {text}"), sentence
            assert "random" not in text_of(page, "#banner").lower() if page.locator("#banner").is_visible() else True
            save_screenshot(page, tmp_path, readme=True)

            phone = browser.new_page(viewport=PHONE)  # the same on a phone-width screen
            phone.set_default_timeout(TIMEOUT_MS)
            phone.goto(server.url)
            phone.locator("#examples button, #examples tr.tr-body").nth(1).click()
            expect(phone.locator("#results img")).to_have_count(K)
            expect(phone.locator("#text textarea")).to_have_value(app.EXAMPLES[1][1])
            assert_fits(phone, PHONE["width"])
            phone.screenshot(path=str(tmp_path / "phone.png"), full_page=True)
        finally:
            browser.close()
    assert "Traceback" not in server.log_text(), server.log_text()[-3000:]
