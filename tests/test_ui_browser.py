"""Headless Chromium (Debian's `chromium` + playwright) drives ui/app.py against a tiny-cpu server.

Submits a prompt, waits for the image, saves a screenshot to out/test-artifacts/ui-browser.png,
and checks the image element shows a real picture and the plan panel lists the deployments.
Skipped where playwright or a chromium binary is missing (`apt-get install chromium`,
`pip install -e '.[browser]'`).
"""
import base64
import importlib.util
import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium binary", allow_module_level=True)
ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from trident_rs.serve.app import build_app  # noqa: E402
from trident_rs.devtools.local import free_port, private_serve  # noqa: E402


@pytest.fixture(scope="module")
def ui_url():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    demo = None
    with private_serve() as port:
        try:
            tiny = yaml.safe_load((ROOT / "deployments" / "tiny-cpu.yaml").read_text())["applications"][0]["args"]
            serve.run(build_app(tiny), name="tiny", route_prefix="/")
            spec = importlib.util.spec_from_file_location("trident_ui_app_browser", ROOT / "ui" / "app.py")
            ui = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(ui)
            demo = ui.build(f"http://127.0.0.1:{port}", refresh_s=1.0)
            uport = free_port()
            demo.queue().launch(server_name="127.0.0.1", server_port=uport, prevent_thread_lock=True)
            yield f"http://127.0.0.1:{uport}"
        finally:
            if demo is not None:
                demo.close()


def test_browser_generates_an_image_and_shows_the_plan(ui_url):
    from playwright.sync_api import sync_playwright

    artifacts = ROOT / "out" / "test-artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(ui_url, timeout=60_000)
            page.locator("#prompt textarea").fill("a red fox in the snow")
            page.locator("#size textarea, #size input").first.fill("64x64")
            page.locator("#steps input").fill("2")
            page.locator("#generate").click()
            img = page.locator("#result-image img")
            img.wait_for(state="visible", timeout=180_000)
            page.wait_for_function("document.querySelector('#result-image img').naturalWidth > 0", timeout=60_000)
            page.wait_for_function("document.querySelector('#plan-html').innerText.includes('decode-w1')",
                                   timeout=30_000)
            time.sleep(1.5)  # one more timer tick so the plots are drawn in the screenshot
            page.screenshot(path=str(artifacts / "ui-browser.png"), full_page=True)
            # the pixels the browser decoded, through a canvas
            data_url = page.evaluate("""() => { const i = document.querySelector('#result-image img');
                const c = document.createElement('canvas'); c.width = i.naturalWidth; c.height = i.naturalHeight;
                c.getContext('2d').drawImage(i, 0, 0); return c.toDataURL('image/png'); }""")
            pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"))
            panel = page.locator("#plan-html").inner_text()
            progress = page.locator("#progress").inner_text()
        finally:
            browser.close()
    assert pixels.shape == (64, 64, 3)
    assert pixels.std() > 1.0  # a picture, not a blank or constant frame
    for dep in ("encode-w1", "diffuse-w1", "decode-w1"):
        assert dep in panel
    assert "done" in progress
    assert (artifacts / "ui-browser.png").stat().st_size > 10_000
