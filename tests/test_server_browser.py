"""The web UI in headless Chromium (Playwright) against a real `latentforge serve` subprocess.

Skipped only where /usr/bin/chromium or the playwright package is missing. Set
LATENTFORGE_UI_SCREENSHOT=PATH to save a screenshot of the page (docs/ui.png is made so).
"""

from __future__ import annotations

import base64
import io
import os

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)", allow_module_level=True)
pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
pytest.importorskip("fastapi", reason="the server needs the serve extra (fastapi)")

from conftest import live_serve  # noqa: E402
from PIL import Image  # noqa: E402
from playwright.sync_api import expect, sync_playwright  # noqa: E402

# Records every value the progress bars take, and every live preview shown, from page load on.
RECORDER = """
window.__progress = []; window.__previews = 0;
new MutationObserver((records) => {
  for (const r of records) {
    const el = r.target;
    if (r.attributeName === "aria-valuenow") window.__progress.push(Number(el.ariaValueNow));
    if (r.attributeName === "src" && el.classList.contains("preview")) window.__previews++;
  }
}).observe(document, {subtree: true, attributes: true, attributeFilter: ["aria-valuenow", "src"]});
"""


@pytest.fixture(scope="module")
def server(tiny_digits_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with live_serve(["--model", str(tiny_digits_model)], log) as (_, url):
        yield url


@pytest.fixture(scope="module")
def page(server):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1200, "height": 820})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.add_init_script(RECORDER)
        page.goto(server)
        yield page
        browser.close()
        assert not errors, f"JavaScript errors: {errors}"


def test_generate_shows_progress_previews_and_the_image(page):
    expect(page.locator("#model option")).to_have_count(1)
    expect(page.locator("#sampler option").nth(1)).to_be_attached()  # fetched from /v1/samplers
    # regional prompting is for text models: off for this class model, its default named
    expect(page.locator("#layout")).to_be_disabled()
    expect(page.locator("#layout option").first).to_have_text("model default (none)")
    page.fill("#prompt", "a handwritten seven")
    page.fill("#steps", "60")
    page.fill("#seed", "7")
    page.check("#bf16")  # sent as bf16: true, named in the caption
    page.click("#generate")
    result = page.locator("#gallery figure.result img").first
    expect(result).to_be_visible(timeout=60_000)

    progress = page.evaluate("window.__progress")
    assert any(0 < v < 100 for v in progress), progress  # the bar moved through the steps
    assert progress == sorted(progress)
    assert page.evaluate("window.__previews") >= 1  # live x0 previews were shown
    assert page.locator(".job").count() == 0  # the finished job's card made way for the result
    # a 16 px image, shown scaled up without smoothing
    natural = page.evaluate("(img) => [img.naturalWidth, img.clientWidth]", result.element_handle())
    assert natural[0] == 16 and natural[1] >= 64
    assert result.evaluate("(img) => getComputedStyle(img).imageRendering") == "pixelated"
    expect(page.locator("#gallery figcaption").first).to_contain_text("seed: 7")
    expect(page.locator("#gallery figcaption").first).to_contain_text("precision: bf16")
    if os.environ.get("LATENTFORGE_UI_SCREENSHOT"):
        page.screenshot(path=os.environ["LATENTFORGE_UI_SCREENSHOT"])


def test_paint_a_mask_and_inpaint(page):
    page.click("nav [data-tab=inpaint]")
    canvas = page.locator("#paint-mask")
    expect(canvas).to_be_visible()
    box = canvas.bounding_box()
    # paint the left half, top to bottom, with the mouse
    page.mouse.move(box["x"] + 20, box["y"] + 10)
    page.mouse.down()
    page.mouse.move(box["x"] + 20, box["y"] + box["height"] - 10, steps=12)
    page.mouse.move(box["x"] + box["width"] / 2 - 20, box["y"] + box["height"] - 10, steps=8)
    page.mouse.move(box["x"] + box["width"] / 2 - 20, box["y"] + 10, steps=12)
    page.mouse.up()
    before = page.locator("#gallery figure.result").count()
    with page.expect_request("**/v1/inpaint") as req:
        page.click("#inpaint-submit")
    body = req.value.post_data_json
    mask = Image.open(io.BytesIO(base64.b64decode(body["mask"].split(",", 1)[1]))).convert("L")
    assert mask.size == (16, 16)
    left, right = mask.crop((0, 0, 6, 16)), mask.crop((10, 0, 16, 16))
    assert max(left.tobytes()) == 255 and max(right.tobytes()) == 0  # the strokes, and only them
    done = page.locator("#gallery figure.result").nth(before)
    expect(done).to_be_visible(timeout=60_000)
    expect(page.locator("#gallery figure.result")).to_have_count(before + 1)


def test_png_info_reads_an_a1111_png_and_fills_the_form(page, tmp_path):
    from PIL import PngImagePlugin

    text = (
        "a handwritten two\nNegative prompt: blurry\n"
        "Steps: 5, Sampler: Euler a, CFG scale: 2.5, Seed: 42, Size: 16x16, Version: v1.10.1"
    )
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    path = tmp_path / "a1111.png"
    Image.new("RGB", (16, 16)).save(path, pnginfo=info)
    page.click("nav [data-tab=pnginfo]")
    page.set_input_files("#pnginfo-file", str(path))
    expect(page.locator("#pnginfo-text")).to_have_text(text)
    expect(page.locator("#pnginfo-fields")).to_contain_text("v1.10.1")  # A1111's keys kept
    page.click("#pnginfo-send")
    expect(page.locator("#form-txt2img")).to_be_visible()
    expect(page.locator("#prompt")).to_have_value("a handwritten two")
    expect(page.locator("#negative")).to_have_value("blurry")
    expect(page.locator("#sampler")).to_have_value("euler_ancestral")
    for sel, value in (("#steps", "5"), ("#guidance", "2.5"), ("#seed", "42")):
        expect(page.locator(sel)).to_have_value(value)
