"""The web demo in a real browser: headless Chromium (Selenium + chromedriver) on 127.0.0.1.

Uploads a picture, runs two rounds (the second references the first through the "Reference instance
from round" checkboxes), checks that the overlays and the gallery appear, and saves a screenshot
(``<tmp>/web_demo.png``; also ``docs/web_demo.png`` when ``SEGLLM_SAVE_SCREENSHOT=1``). Skips, saying
why, where Chromium, chromedriver or Selenium are missing (``apt-get install chromium chromium-driver``,
``pip install 'segllm-jax[demo]'``).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio", reason="the web demo needs the `demo` extra: pip install 'segllm-jax[demo]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.browser,
              pytest.mark.filterwarnings("ignore:.*future.no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]


def _find(names: list[str], env: str) -> str | None:
    if os.environ.get(env):
        return os.environ[env] if Path(os.environ[env]).is_file() else None
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM = _find(["chromium", "chromium-browser", "google-chrome"], "SEGLLM_CHROMIUM")
CHROMEDRIVER = _find(["chromedriver"], "SEGLLM_CHROMEDRIVER")


@pytest.fixture
def browser(tmp_path):
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("headless Chromium and chromedriver are needed (apt-get install chromium chromium-driver, "
                    "or set SEGLLM_CHROMIUM / SEGLLM_CHROMEDRIVER)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}",
                 "--window-size=1280,1500"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log")),
                              options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _text(driver, css: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, css).text


def _wait_status(driver, wait, needle: str) -> str:
    wait.until(lambda d: needle in _text(d, "#segllm-status"), message=f"status never said {needle!r}")
    return _text(driver, "#segllm-status")


def _image_size(driver, css: str) -> tuple[int, int]:
    return tuple(driver.execute_script(
        "const i = document.querySelector(arguments[0]); return i && i.complete ? [i.naturalWidth, i.naturalHeight]"
        " : [0, 0];", css))


def _two_rounds(driver, served, picture: Path, first: str, second: str) -> tuple[str, Path]:
    """Upload ``picture``, ask ``first``, then ``second`` with round 1 ticked as its reference; checks the
    overlays, gallery, history and downloads along the way. Returns (this tab's session key, screenshot)."""
    wait = WebDriverWait(driver, 90, poll_frequency=0.2)
    width, height = Image.open(picture).size
    before = set(served.store.keys())
    driver.get(served.url)
    upload = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#segllm-image input[type=file]")))
    upload.send_keys(str(picture))
    _wait_status(driver, wait, f"Image loaded ({width}×{height})")
    (key,) = set(served.store.keys()) - before  # this tab's session

    query = driver.find_element(By.CSS_SELECTOR, "#segllm-query textarea")
    query.send_keys(first)
    driver.find_element(By.CSS_SELECTOR, "#segllm-send").click()
    status = _wait_status(driver, wait, "Round 1:")
    assert first.rstrip(".?")[-12:] in status
    wait.until(lambda d: _image_size(d, "#segllm-overlay img") == (width, height), message="round 1 overlay missing")

    # round 2 references round 1 through the checkbox
    box = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#segllm-refs input[type=checkbox]")))
    box.click()
    query = driver.find_element(By.CSS_SELECTOR, "#segllm-query textarea")
    assert query.get_attribute("value") == ""  # cleared after the round
    query.send_keys(second)
    driver.find_element(By.CSS_SELECTOR, "#segllm-send").click()
    status = _wait_status(driver, wait, "Round 2:")
    assert "references round 1" in status
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#segllm-gallery img")) >= 2,
               message="the gallery does not show both rounds")
    wait.until(lambda d: _image_size(d, "#segllm-overlay img") == (width, height), message="round 2 overlay missing")
    assert second.rstrip(".?")[-12:] in _text(driver, "#segllm-history")
    assert len(driver.find_elements(By.CSS_SELECTOR, "#segllm-masks a")) >= 2  # PNG downloads

    # the tab's server-side session holds exactly these two rounds
    user = served.store.get(key)
    assert [r.index for r in user.session.rounds] == [1, 2] and user.session.rounds[1].refs == (1,)

    time.sleep(0.5)  # let the last images paint
    shot = picture.with_name("web_demo.png")
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    return key, shot


def test_two_rounds_with_a_reference_in_chromium(browser, served, tmp_path):
    from segllm_jax.data.mrshapes import generate_scene

    picture = tmp_path / "shapes.png"
    Image.fromarray(generate_scene(np.random.default_rng(3), (160, 240)).image).save(picture)
    key, _ = _two_rounds(browser, served, picture, "Segment the largest shape.", "Segment the shape nearest to it.")
    driver = browser

    # closing the tab releases the session (Gradio's unload event)
    driver.get("about:blank")
    deadline = time.monotonic() + 30
    while key in served.store.keys() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert key not in served.store.keys(), "closing the tab did not release the session"


@pytest.mark.skipif(os.environ.get("SEGLLM_SAVE_SCREENSHOT") != "1",
                    reason="writes docs/web_demo.png from the shipped checkpoint; run with SEGLLM_SAVE_SCREENSHOT=1")
def test_screenshot_of_the_shipped_model(browser, tmp_path):
    """The README's web-demo picture: the trained tiny checkpoint on ``make demo``'s unseen scene, its first
    two questions (the second through the reference checkbox)."""
    from segllm_jax.apps.demo import SHIPPED_CHECKPOINT, demo_scene
    from segllm_jax.apps.web_demo import build_app, launch
    from segllm_jax.checkpoint import load

    from .conftest import Served, free_port

    _, scene, conversation = demo_scene(7)
    picture = tmp_path / "scene.png"
    Image.fromarray(scene.image).save(picture)
    app = build_app(load(SHIPPED_CHECKPOINT), examples=None, max_sessions=4, idle_timeout_s=600)
    _, url, _ = launch(app, host="127.0.0.1", port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        first, second = (r.question for r in conversation.rounds[:2])
        _, shot = _two_rounds(browser, Served(app, url.rstrip("/")), picture, first, second)
        shutil.copyfile(shot, REPO / "docs" / "web_demo.png")
    finally:
        app.close()
