"""ldm serve in a real browser (headless Chromium through Playwright): type a prompt, click generate, check the images
that appear and the PNG behind the download link; then use a result as the init image, draw a mask on it and inpaint.
Skipped when Playwright or a Chromium is not available (Debian's chromium-headless-shell / chromium, or
`playwright install chromium`; LDM_CHROMIUM names another executable)."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import threading
import time

import pytest

pytestmark = pytest.mark.slow
playwright = pytest.importorskip("playwright.sync_api")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402
from tiny_parts import tiny_pipeline  # noqa: E402

from ldm.serve import Limits, create_app  # noqa: E402

CHROMIUMS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    app = create_app(tiny_pipeline(), "tiny", Limits(max_steps=20, max_images=4, max_size=64))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "the server did not start"
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    executable = os.environ.get("LDM_CHROMIUM") or next(filter(None, map(shutil.which, CHROMIUMS)), None)
    with playwright.sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        except Exception as e:  # noqa: BLE001 - no usable browser on this machine
            pytest.skip(f"no headless Chromium to drive ({type(e).__name__}: {str(e).splitlines()[0]})")
        yield b
        b.close()


def loaded_results(page) -> list[list[int]]:
    page.wait_for_function("[...document.querySelectorAll('#results img.result')]"
                           ".every(i => i.complete && i.naturalWidth > 0)", timeout=60_000)
    return page.eval_on_selector_all("#results img.result", "els => els.map(e => [e.naturalWidth, e.naturalHeight])")


def test_generate_then_inpaint_in_a_browser(browser, server):  # browser first: no server when it skips
    page = browser.new_page()
    page.goto(server)
    page.wait_for_function("document.querySelectorAll('#sampler option').length > 0")
    page.fill("#prompt", "a large red circle on the left")
    page.fill("#n", "2")
    page.fill("#steps", "4")
    page.click("#generate")
    page.wait_for_selector("#results img.result", timeout=60_000)
    assert loaded_results(page) == [[16, 16], [16, 16]]
    assert page.text_content("#status").startswith("done 4/4")
    params = json.loads(page.text_content("#params"))
    assert params["prompts"] == ["a large red circle on the left"] and params["steps"] == 4 and params["n"] == 2
    link = page.get_attribute("#results a >> nth=1", "href")
    png = Image.open(io.BytesIO(httpx.get(server + link).content))
    meta = json.loads(png.text["ldm"])
    assert meta["index"] == 1 and meta["request"]["steps"] == 4

    # inpainting round: use the first result, draw a stroke on it, repaint
    page.click("#results .use >> nth=0")
    page.select_option("#mode", "inpaint")
    box = page.locator("#mask-canvas").bounding_box()
    page.mouse.move(box["x"] + 30, box["y"] + 30)
    page.mouse.down()
    for k in range(8):
        page.mouse.move(box["x"] + 30 + 10 * k, box["y"] + 30 + 20 * k)
    page.mouse.up()
    page.fill("#prompt", "a small blue star")
    page.fill("#n", "1")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#params').textContent.includes('a small blue star')",
                           timeout=60_000)
    assert loaded_results(page) == [[16, 16]]
    assert page.text_content("#error") == ""
    params = json.loads(page.text_content("#params"))
    assert params["init_image"] == "(uploaded)" and len(params["mask_sha256"]) == 64 and params["strength"] == 1

    # a bad request shows the server's message on the page
    page.fill("#steps", "500")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#error').textContent.length > 0")
    assert "steps must be an integer in [1, 20]" in page.text_content("#error")
