"""The example backend's page in a real browser (Debian's chromium, driven by Playwright) against the real stack:
redis-server, the loopback S3 endpoint (uploads go from the browser straight to it) and a worker on the tiny model.

Each test saves screenshots under its temporary folder. `PAGE_SCREENSHOTS=docs` runs one more test that takes the
README's pictures of the page (docs/page-*.png) with the example photo.
"""

from __future__ import annotations

import io
import json
import os
import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from tests.support import photo

pytestmark = pytest.mark.slow  # a browser, the backend under uvicorn, a worker

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]' (playwright)")
expect = playwright_api.expect

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# the system browser, never a downloaded one; nothing but loopback is reachable, so nothing else is tried
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
WAIT_MS = 120_000  # the longest a step of the page may take to show (a cold worker on two CPU cores)
SLOW_STEPS = {"testkit": {"step_s": 0.3}}  # a big model's pace, so the page can watch the steps and cancel
DOCS_SHOTS = os.environ.get("PAGE_SCREENSHOTS")


@pytest.fixture(scope="module")
def page_url(stack, worker, tmp_path_factory):
    from worker.stack import PageServer

    server = PageServer(stack.env(), tmp_path_factory.mktemp("page")).start()
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no browser at {CHROMIUM} (Debian: apt-get install chromium)")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, page_url):
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    expect.set_options(timeout=WAIT_MS)
    page.goto(page_url)
    expect(page.locator("#f-prompt")).to_be_visible()  # the form is built from the service's schema
    yield page
    context.close()


@pytest.fixture
def phone_photo(tmp_path) -> Path:
    """A JPEG stored landscape (320x240) that its EXIF orientation (6: turn 90° clockwise) shows as portrait."""
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    photo(320, 240, seed=3).save(path, quality=92, exif=exif)
    return path


def shot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=path, full_page=True)
    return path


def paint(page, strokes: list[tuple[float, float, float, float]], brush: int = 30) -> dict:
    """Mouse strokes over the photo, each from (x0, y0) to (x1, y1) in fractions of its shown size."""
    page.locator("#brush-size").fill(str(brush))
    box = page.locator("#mask").bounding_box()
    for x0, y0, x1, y1 in strokes:
        page.mouse.move(box["x"] + x0 * box["width"], box["y"] + y0 * box["height"])
        page.mouse.down()
        page.mouse.move(box["x"] + x1 * box["width"], box["y"] + y1 * box["height"], steps=12)
        page.mouse.up()
    return box


def fill(page, **values) -> None:
    page.locator("#advanced summary").click()  # open, so every field is visible to fill
    for name, value in values.items():
        page.locator(f"[id='f-{name}']").fill(str(value))
    page.locator("#advanced summary").click()


def start_job(page, photo_path: Path, **values) -> dict:
    page.set_input_files("#photo", photo_path)
    expect(page.locator("#painter")).to_be_visible()
    box = paint(page, [(0.2, 0.3, 0.8, 0.35), (0.5, 0.6, 0.5, 0.9)])
    fill(page, prompt="a bowl of ripe oranges", seed=7, **values)
    return box


def distance_to_strokes(shape: tuple[int, int], segments) -> np.ndarray:
    """Each pixel's distance (in pixels) to the nearest of the segments, given in fractions of the picture."""
    height, width = shape
    y, x = np.mgrid[0:height, 0:width] + 0.5
    nearest = np.full(shape, np.inf)
    for x0, y0, x1, y1 in segments:
        a, b = np.array([x0 * width, y0 * height]), np.array([x1 * width, y1 * height])
        along = np.clip(((x - a[0]) * (b[0] - a[0]) + (y - a[1]) * (b[1] - a[1])) / max(np.sum((b - a) ** 2), 1e-9),
                        0, 1)
        nearest = np.minimum(nearest, np.hypot(x - (a[0] + along * (b[0] - a[0])), y - (a[1] + along * (b[1] - a[1]))))
    return nearest


def test_paint_submit_watch_and_download_keeps_the_photo_outside_the_strokes(page, phone_photo, tmp_path):
    strokes = [(0.2, 0.3, 0.8, 0.35), (0.5, 0.6, 0.5, 0.9)]
    box = start_job(page, phone_photo, num_inference_steps=12, strength=1, preview_every=2,
                    plugins=json.dumps(SLOW_STEPS))
    shown = Image.open(phone_photo)
    upright = ImageOps.exif_transpose(shown).convert("RGB")
    # the page shows the photo as the phone took it: portrait, as its EXIF orientation says
    assert upright.size == (240, 320)
    assert abs(box["width"] / box["height"] - 240 / 320) < 0.02, box
    shot(page, tmp_path, "painting")

    page.locator("#submit").click()
    expect(page.locator("#job-state")).to_contain_text("Painting: step")
    first = page.evaluate("() => document.getElementById('job-progress').value")
    page.wait_for_function("first => document.getElementById('job-progress').value > first", arg=first)
    # a preview arrived from S3 and the browser decoded it
    page.wait_for_function("() => document.getElementById('preview').naturalWidth > 0")
    expect(page.locator("#job-facts")).to_contain_text("Time left")
    shot(page, tmp_path, "running")

    expect(page.locator("#result")).to_be_visible()
    expect(page.locator("#job-state")).to_have_text("Done.")
    page.wait_for_function("() => document.getElementById('after').naturalWidth > 0")
    expect(page.locator("#parameters")).to_contain_text("12 run of 12")
    expect(page.locator("#parameters")).to_contain_text("Modestandard")  # <dt>Mode</dt><dd>standard</dd>
    expect(page.locator("#history-list")).to_contain_text("a bowl of ripe oranges")
    shot(page, tmp_path, "result")

    with page.expect_download() as download:
        page.locator("#download").click()
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    result = np.asarray(Image.open(saved).convert("RGB")).astype(int)
    original = np.asarray(upright).astype(int)
    assert result.shape == original.shape
    distance = distance_to_strokes(result.shape[:2], strokes)
    brush = 30 * upright.width / box["width"]  # the brush's width in the photo's pixels
    away = distance > brush / 2 + 6  # past the stroke's edge (anti-aliased, then thresholded by the worker)
    assert away.mean() > 0.5
    assert np.array_equal(result[away], original[away]), "pixels away from the strokes changed"
    under = distance < brush / 4
    assert np.abs(result[under] - original[under]).mean() > 1, "nothing was painted under the strokes"


def test_cancel_a_running_job_from_the_page(page, phone_photo, tmp_path, client):
    start_job(page, phone_photo, num_inference_steps=40, strength=1, plugins=json.dumps(SLOW_STEPS))
    page.locator("#submit").click()
    expect(page.locator("#job-state")).to_contain_text("Painting: step")
    page.locator("#cancel").click()
    expect(page.locator("#job-state")).to_have_text("Cancelled.")
    expect(page.locator("#result")).to_be_hidden()
    shot(page, tmp_path, "cancelled")
    job_id = page.evaluate("() => current.id")
    status = client.status(job_id)
    assert status.state == "FAILURE" and status.error["code"] == "cancelled", status
    assert (status.progress is None) and status.result is None


def test_a_queued_job_shows_its_place_and_cancels_before_it_starts(page, phone_photo, tmp_path, client, stack):
    """The stack's one worker is busy with another job: the page's job waits at position 1, and Cancel while it
    waits means it never starts."""
    from tests.support import job_request, wait_for_step

    busy = client.submit(job_request(stack, num_inference_steps=40, strength=1.0, plugins=SLOW_STEPS))
    try:
        wait_for_step(client, busy, 1)
        start_job(page, phone_photo, num_inference_steps=4)
        page.locator("#submit").click()
        expect(page.locator("#job-state")).to_contain_text("Queued: 1 of")
        expect(page.locator("#job-facts")).to_contain_text("Queue position1")
        shot(page, tmp_path, "queued")
        page.locator("#cancel").click()
        expect(page.locator("#job-state")).to_have_text("Cancelled: the job will not start.")
    finally:
        client.cancel(busy)
    expect(page.locator("#job-state")).to_have_text("Cancelled.")  # a worker reached it, and did not start it
    status = client.status(page.evaluate("() => current.id"))
    assert status.state == "FAILURE" and status.error["code"] == "cancelled" and status.progress is None, status
    assert client.wait(busy, timeout=60).error["code"] == "cancelled"


def test_the_backend_away_is_said_in_a_banner_and_the_photo_and_settings_are_kept(browser, stack, phone_photo,
                                                                                  tmp_path):
    """A backend of its own, stopped once the page is loaded and painted: submitting says so in a banner; nothing
    the user did is lost."""
    from worker.stack import PageServer

    server = PageServer(stack.env(), tmp_path / "page").start()
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    try:
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.goto(server.url)
        expect(page.locator("#f-prompt")).to_be_visible()
        start_job(page, phone_photo)
        server.stop()
        page.locator("#submit").click()
        expect(page.locator("#banner")).to_be_visible()
        expect(page.locator("#banner-text")).to_contain_text("The backend cannot be reached")
        expect(page.locator("#f-prompt")).to_have_value("a bowl of ripe oranges")
        assert page.evaluate("() => strokes.length") == 2  # the mask is kept
        expect(page.locator("#job")).to_be_hidden()
        shot(page, tmp_path, "backend-away")
    finally:
        context.close()
        server.stop()


def test_a_12_megapixel_phone_photo_is_shown_upright_painted_and_returned_upright(page, tmp_path):
    """What phones take: 4000x3000 stored landscape, EXIF orientation 6 (portrait). The page shows it upright, the
    worker reads the whole photo with the same orientation, and the result is portrait too (asked at 384x512: the
    default, the photo scaled to the pixel budget, takes minutes to encode and decode on two CPU cores)."""
    path = tmp_path / "phone-12mp.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    photo(4000, 3000, seed=8).save(path, quality=85, exif=exif)
    box = start_job(page, path, num_inference_steps=2, strength=1, width=384, height=512)
    assert abs(box["width"] / box["height"] - 3000 / 4000) < 0.02, box
    page.locator("#submit").click()
    expect(page.locator("#job-state")).to_have_text("Done.")
    page.wait_for_function("() => document.getElementById('after').naturalWidth > 0")
    shown = page.evaluate("() => [document.getElementById('after').naturalWidth, "
                          "document.getElementById('after').naturalHeight]")
    assert shown == [384, 512]
    expect(page.locator("#parameters")).to_contain_text("384 × 512")
    # the worker turned it as the page did: outside the strokes the result is the upright photo, not a sideways one
    url = page.evaluate("() => document.getElementById('after').src")
    result = np.asarray(Image.open(io.BytesIO(urllib.request.urlopen(url, timeout=10).read())).convert("RGB"))
    stored = Image.open(path)
    upright = np.asarray(ImageOps.exif_transpose(stored).convert("RGB").resize((384, 512)))
    sideways = np.asarray(stored.convert("RGB").resize((384, 512)))
    off_upright = np.abs(result.astype(int) - upright).mean()
    assert off_upright < np.abs(result.astype(int) - sideways).mean() / 2, off_upright


def test_an_invalid_value_is_explained_next_to_its_field(page, phone_photo, tmp_path):
    start_job(page, phone_photo, strength=1.5)
    page.locator("#submit").click()
    message = page.locator("[id='err-strength']")
    expect(message).to_contain_text("less than or equal to 1")
    expect(page.locator("#f-strength")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#f-strength")).to_be_focused()
    # the message is the field's description, read out with it
    assert "err-strength" in page.locator("#f-strength").get_attribute("aria-describedby")
    expect(page.locator("#job")).to_be_hidden()
    shot(page, tmp_path, "invalid")


def test_fast_mode_leaves_the_steps_to_the_service_and_a_worker_without_it_says_so(page, phone_photo, tmp_path):
    """Fields the user did not touch are not sent, so the service's defaults apply and fast mode runs its own few
    steps instead of the 50 the Steps field showed. This stack's worker has no fast mode: the failure is shown with
    its code and next to the field."""
    start_job(page, phone_photo)
    page.locator("#advanced summary").click()
    page.locator("[id='f-mode']").select_option("fast")
    expect(page.locator("[id='f-num_inference_steps']")).to_have_value("")
    expect(page.locator("[id='f-num_inference_steps']")).to_have_attribute("placeholder", "fast mode's own")
    with page.expect_request(lambda request: request.url.endswith("/jobs") and request.method == "POST") as sent:
        page.locator("#submit").click()
    body = sent.value.post_data_json
    assert body["mode"] == "fast" and body["prompt"] == "a bowl of ripe oranges" and body["seed"] == 7, body
    assert "num_inference_steps" not in body and "strength" not in body and "true_cfg_scale" not in body, body
    expect(page.locator("#job-state")).to_have_text("The job failed.")
    expect(page.locator("#job-error")).to_contain_text("no fast mode")
    expect(page.locator("#job-error")).to_contain_text("(invalid_request, field mode)")
    expect(page.locator("[id='err-mode']")).to_contain_text("no fast mode")
    shot(page, tmp_path, "no-fast-mode")


def test_up_serves_the_page_and_prints_its_url(tmp_path):
    from worker.stack import LocalStack

    stack = LocalStack(tmp_path / "stack", page=True).start()
    try:
        printed = stack.how_to_use("photo.png", "mask.png", "a barn")
        url = re.search(r"^Page: +(http://127\.0\.0\.1:\d+/) ", printed, re.M)
        assert url, printed
        with urllib.request.urlopen(url.group(1), timeout=10) as response:
            assert b'<form id="job-form"' in response.read()
    finally:
        stack.stop()
    assert stack.page.process.poll() is not None


@pytest.mark.skipif(not DOCS_SHOTS, reason="takes the README's pictures: PAGE_SCREENSHOTS=docs")
def test_docs_screenshots(page, tmp_path):
    """The page at its three moments, with the example photo (on the tiny random-weight model: it paints noise)."""
    sample = Image.open(Path(__file__).resolve().parents[1] / "examples" / "sample.png")
    sample.resize((512, 384), Image.Resampling.LANCZOS).save(tmp_path / "barn.png")
    page.set_viewport_size({"width": 1200, "height": 900})
    page.set_input_files("#photo", tmp_path / "barn.png")
    expect(page.locator("#painter")).to_be_visible()
    paint(page, [(0.44, 0.66, 0.5, 0.66), (0.47, 0.62, 0.47, 0.78)], brush=26)
    fill(page, prompt="a blue wooden door with a brass handle", seed=7, num_inference_steps=40, strength=1,
         preview_every=4, plugins=json.dumps(SLOW_STEPS))
    save_for_docs(page, tmp_path, "painting", "#photo-section")
    page.locator("#submit").click()
    page.wait_for_function("() => document.getElementById('preview-strip').children.length >= 3")
    save_for_docs(page, tmp_path, "running", "#job")
    expect(page.locator("#result")).to_be_visible()
    page.wait_for_function("() => document.getElementById('after').naturalWidth > 0")
    page.locator("#compare-slider").fill("30")
    save_for_docs(page, tmp_path, "result", "#result")


def save_for_docs(page, tmp_path: Path, name: str, down_to: str) -> None:
    """The page from its top down to the bottom of `down_to`, small: 960 px wide, 256 colours."""
    full = Image.open(shot(page, tmp_path, name))
    bottom = page.evaluate(f"() => document.querySelector('{down_to}').getBoundingClientRect().bottom + scrollY")
    scale = full.width / page.viewport_size["width"]
    cropped = full.crop((0, 0, full.width, min(full.height, int((bottom + 16) * scale))))
    small = cropped.resize((960, round(cropped.height * 960 / cropped.width)), Image.Resampling.LANCZOS)
    small.quantize(256, method=Image.Quantize.MEDIANCUT).save(Path(DOCS_SHOTS) / f"page-{name}.png", optimize=True)
