"""The page at ``/`` of ``instalign serve``, in a real browser.

Headless Chromium (the Debian package ``chromium``, launched through its own executable —
Playwright downloads no browser) drives the page of a real Ray Serve application: upload an
image, type an expression, submit, see the overlay, the target verdict and the instances
with their colours, the raw JSON on request; then an expression the model calls no-target
and that verdict; a bundled sample; then a file that is no image and the server's error.

The model is a tiny random checkpoint whose no-target bias is set so that the model itself
— not the test — separates two expressions: their no-target logits are measured with a
``Predictor`` on the uploaded image, and the bias is placed halfway between them, so one is
a target (p̂_nt < 0.5) and the other is not (eq. 12). The fixture checks that before serving.

Without ``chromium`` or Playwright the test is skipped — except in CI (``CI=true``), where
that is a failure: ``make install`` installs both (README).
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil

import pytest

from tests.support.serve_fixtures import register, serving

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CANDIDATES = ["the red ball on the left", "a green square", "the zebra in the sky", "all of the shapes",
              "the smallest thing", "nothing blue here", "the big circle", "the car"]
IMAGE_SIZE = (120, 90)


def _browser_or_skip() -> str:
    exe = shutil.which("chromium")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        exe = None
    if exe is None:
        message = ("the page test needs the Debian package `chromium` on PATH and the `playwright` Python package "
                   "(`make install` installs both)")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: {message}")
        pytest.skip(message)
    return exe


def _png(size: tuple[int, int]) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, (200, 200, 210))
    draw = ImageDraw.Draw(img)
    draw.ellipse([8, 10, 50, 52], fill=(220, 40, 40))
    draw.rectangle([65, 30, 110, 80], fill=(40, 180, 60))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _logit(p: float) -> float:
    p = min(max(p, 1e-7), 1 - 1e-7)
    return math.log(p / (1 - p))


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A registered model for which TARGET is a target and NO_TARGET is not, on the test image."""
    from instalign.predictor import Predictor
    from tests.support.tiny_checkpoint import make_checkpoint

    root = tmp_path_factory.mktemp("page")
    image = _png(IMAGE_SIZE)
    probe = Predictor.from_checkpoint(make_checkpoint(root / "probe", score_bias=4.0), device="cpu")
    logits = {t: _logit(probe.predict(image, t).no_target_prob) for t in CANDIDATES}
    target, no_target = min(logits, key=logits.get), max(logits, key=logits.get)
    assert logits[no_target] - logits[target] > 1e-3, f"the random model barely tells texts apart: {logits}"
    bias = -(logits[target] + logits[no_target]) / 2
    model = register(root, "instalign-page-test", score_bias=4.0, no_target_bias=bias)
    check = Predictor.from_checkpoint(model["checkpoint"], device="cpu")
    assert not check.predict(image, target).no_target and check.predict(image, no_target).no_target
    assert check.predict(image, target).instances, "the target answer should show kept instances"
    path = root / "upload.png"
    path.write_bytes(image)
    bad = root / "holiday.png"
    bad.write_bytes(b"this file is named .png but holds text, not an image")
    return {**model, "target": target, "no_target": no_target, "image": path, "bad": bad}


@pytest.fixture(scope="module")
def url(calibrated):
    with serving(calibrated, max_batch_size=4) as base:
        yield base + "/"


def test_page_upload_segment_no_target_and_error(calibrated, url):
    exe = _browser_or_skip()
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        # --no-sandbox: the test may run as root (containers), where Chromium's sandbox cannot start.
        browser = pw.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url)
            expect(page.locator("h1")).to_have_text("InstAlign")
            expect(page.locator("#model-name")).to_contain_text("instalign-page-test")
            # No broken-image placeholder ("the chosen image") before an image is chosen.
            expect(page.locator("#preview")).to_be_hidden()

            # Upload, type, submit: the overlay, the target verdict, one legend row per instance.
            page.set_input_files("#image-file", str(calibrated["image"]))
            page.fill("#text", calibrated["target"])
            page.click("#submit")
            verdict = page.locator("#verdict")
            expect(verdict).to_contain_text("Target found")
            expect(verdict).to_have_class("target")
            page.wait_for_function("document.getElementById('overlay').complete && "
                                   "document.getElementById('overlay').naturalWidth > 0")
            width, height = page.evaluate("[document.getElementById('overlay').naturalWidth, "
                                          "document.getElementById('overlay').naturalHeight]")
            assert width == IMAGE_SIZE[0] and height > IMAGE_SIZE[1]  # the image plus the title strip
            items = page.locator("#instances li")
            assert items.count() >= 1
            expect(items.first).to_contain_text("score")
            assert page.locator("#instances .swatch").first.evaluate("e => e.style.background") != ""
            expect(page.locator("#raw-json")).to_be_hidden()
            page.check("#show-json")
            expect(page.locator("#raw-json")).to_be_visible()
            raw = json.loads(page.locator("#raw-json").text_content())
            assert raw["no_target"] is False and len(raw["instances"]) == items.count()
            expect(page.locator("#error")).to_be_hidden()

            # The expression the model calls no-target: that verdict with its probability.
            page.fill("#text", calibrated["no_target"])
            page.click("#submit")
            expect(verdict).to_contain_text("No target")
            expect(verdict).to_have_class("no-target")
            expect(page.locator("#instances li")).to_have_count(0)
            assert json.loads(page.locator("#raw-json").text_content())["no_target"] is True
            p_nt = float(verdict.text_content().split("p_nt = ")[1].rstrip(")"))
            assert p_nt > 0.5

            # A bundled sample, with its suggested expression.
            page.select_option("#sample", index=1)
            expect(page.locator("#preview")).to_be_visible()
            page.fill("#text", "")
            page.locator("#sample").dispatch_event("change")
            expect(page.locator("#text")).not_to_have_value("")
            page.click("#submit")
            expect(page.locator("#status")).to_have_text("Done.")
            expect(page.locator("#result")).to_be_visible()

            # A file that is no image: the server's message, shown as an error; no stale result.
            page.set_input_files("#image-file", str(calibrated["bad"]))
            page.fill("#text", calibrated["target"])
            page.click("#submit")
            error = page.locator("#error")
            expect(error).to_be_visible()
            expect(error).to_contain_text("HTTP 400")
            expect(error).to_contain_text("not a readable image")
            expect(page.locator("#result")).to_be_hidden()
        finally:
            browser.close()
