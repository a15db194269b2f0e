"""The studio page in a real browser: Playwright driving Debian's Chromium against a real server
(uvicorn in a thread, the shipped default model).

Skips, saying why, when /usr/bin/chromium or the `playwright` package is missing (.ci/run installs
Chromium; `playwright install` cannot download browsers offline, so the system one is used).
"""
import base64
import io
import os
import socket
import threading
import time
from urllib.parse import urlparse

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing (install Debian's chromium: apt-get install -y chromium)",
                allow_module_level=True)
try:
    from playwright.sync_api import sync_playwright
except ImportError:
    pytest.skip("the playwright package is missing (pip install playwright, in the test extra)",
                allow_module_level=True)
pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

from chorus.serve.app import create_app  # noqa: E402
from chorus.serve.engine import Engine, unique_models  # noqa: E402


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    engine = Engine(unique_models(["default"]), queue_size=4)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning",
                                        lifespan="on"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    t = time.time()
    while not srv.started:
        assert time.time() - t < 60 and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", engine
    srv.should_exit = True
    thread.join(15)


@pytest.fixture(scope="module")
def page(server):
    base, _ = server
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        except Exception as e:  # a Chromium that cannot start here is an environment problem, not the page's
            pytest.skip(f"Chromium at {CHROMIUM} does not start under Playwright: {str(e).splitlines()[0]}")
        pg = browser.new_page()
        pg.set_default_timeout(60_000)
        pg.hosts = set()
        pg.on("request", lambda req: pg.hosts.add(urlparse(req.url).netloc or urlparse(req.url).scheme))
        pg.goto(base + "/")
        pg.wait_for_selector("body[data-ready='1']")
        yield pg
        browser.close()


def wait_js(page, expr: str, timeout: float = 60.0):
    """Poll a JS expression until it is truthy (Playwright's wait_for_function evaluates strings with
    eval, which the page's Content-Security-Policy forbids; page.evaluate is not subject to it)."""
    t = time.time()
    while not page.evaluate(f"() => !!({expr})"):
        if time.time() - t > timeout:
            raise AssertionError(f"timed out waiting for {expr}")
        time.sleep(0.05)


def _text(page, sel):
    return page.eval_on_selector(sel, "e => e.textContent")


def test_generate_shows_progress_preview_and_result(page, server):
    page.fill("#prompt", "a red circle to the left of a blue square")
    page.fill("#steps", "40")
    page.click("#generate")
    wait_js(page, "document.getElementById('progress-text').textContent.startsWith('step')")
    wait_js(page, "document.getElementById('preview').src.startsWith('data:image/jpeg')")
    wait_js(page, "document.getElementById('result').src.startsWith('data:image/png')")
    assert _text(page, "#progress-text").startswith("done")
    assert page.eval_on_selector("#progress-bar", "e => e.value") == 1
    assert "Steps: 40, Sampler: DPM++ 2M" in _text(page, "#infotext")
    assert page.eval_on_selector_all("#gallery img", "els => els.length") >= 1
    size = page.eval_on_selector("#result", "e => [e.naturalWidth, e.naturalHeight]")
    assert size == [64, 64]
    # "reuse last" takes the seed of the image shown
    page.click("#seed-reuse")
    assert not page.is_checked("#seed-random")
    seed = int(page.input_value("#seed"))
    job = server[1].last_job
    assert seed == job.results[0].seed
    page.check("#seed-random")
    # nothing left the machine
    assert page.hosts <= {urlparse(server[0]).netloc, "data", "blob"}, page.hosts


def test_interrupt_a_job(page, server):
    page.fill("#prompt", "a long one")
    page.fill("#steps", "150")
    page.click("#generate")
    wait_js(page, "document.getElementById('progress-text').textContent.startsWith('step')")
    assert page.is_enabled("#interrupt")
    page.click("#interrupt")
    wait_js(page, "document.getElementById('progress-text').textContent.startsWith('interrupted')")
    assert server[1].last_job.state == "interrupted" and server[1].last_job.step < 150
    assert page.is_disabled("#interrupt")


def test_img2img_mode(page, server):
    png = server[1].gallery[0].png
    page.check("#mode-img2img")
    assert page.is_visible("#init-image") and page.is_visible("#strength")
    page.set_input_files("#init-image", files=[{"name": "init.png", "mimeType": "image/png", "buffer": png}])
    page.fill("#prompt", "a blue circle")
    page.fill("#steps", "4")
    page.fill("#strength", "0.5")
    before = len(server[1].gallery)
    page.click("#generate")
    wait_js(page, "document.getElementById('infotext').textContent.includes('Denoising strength: 0.5')")
    assert len(server[1].gallery) == before + 1 and server[1].last_job.request.kind == "img2img"
    page.check("#mode-txt2img")
    assert not page.is_visible("#strength")


def test_dropping_a_png_fills_the_form(page, server):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo
    from chorus.serve.engine import build_request
    engine = server[1]
    # a Chorus PNG, chosen in the drop zone's file input
    job = engine.submit(build_request(engine, prompt="drop me", negative="fuzzy", steps=3, guidance=4.5, seed=1234,
                                      sampler="Euler"))
    assert job.done.wait(60) and job.state == "done"
    page.set_input_files("#drop-file", files=[{"name": "chorus.png", "mimeType": "image/png",
                                               "buffer": job.results[0].png}])
    wait_js(page, "document.getElementById('prompt').value === 'drop me'")
    assert page.input_value("#negative") == "fuzzy"
    assert page.input_value("#seed") == "1234" and not page.is_checked("#seed-random")
    assert page.input_value("#steps") == "3" and float(page.input_value("#guidance")) == 4.5
    assert page.input_value("#sampler") == "euler"
    assert "Seed: 1234" in _text(page, "#drop-info")

    # an A1111 PNG, dropped on the zone as a real drop event
    info = PngInfo()
    info.add_text("parameters", "an a1111 cat\nNegative prompt: dog\nSteps: 7, Sampler: Euler a, CFG scale: 6, "
                                "Seed: 99, Size: 32x48, Model: v1-5")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG", pnginfo=info)
    b64 = base64.b64encode(buf.getvalue()).decode()
    page.evaluate("""(b64) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "a1111.png", {type: "image/png"}));
        const zone = document.getElementById("drop");
        zone.dispatchEvent(new DragEvent("dragover", {dataTransfer: dt, bubbles: true, cancelable: true}));
        zone.dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""", b64)
    wait_js(page, "document.getElementById('prompt').value === 'an a1111 cat'")
    assert page.input_value("#negative") == "dog" and page.input_value("#seed") == "99"
    assert page.input_value("#steps") == "7" and page.input_value("#sampler") == "euler_a"
    assert page.input_value("#width") == "32" and page.input_value("#height") == "48"
    assert "(parameters)" in _text(page, "#drop-info")


def test_a_bad_request_shows_an_error_and_the_page_keeps_working(page):
    page.fill("#prompt", "x")
    page.fill("#steps", "20")
    page.fill("#width", "70")
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    assert "width 70" in _text(page, "#error")
    page.fill("#width", "64")
    page.fill("#height", "64")
    page.fill("#steps", "2")
    page.click("#generate")
    wait_js(page, "document.getElementById('progress-text').textContent.startsWith('done')")
    assert page.is_hidden("#error")
