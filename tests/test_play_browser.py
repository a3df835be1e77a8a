"""`genie play` in a real browser: Debian's headless Chromium, driven by Selenium through chromedriver, opens the
page, holds and taps action keys, undoes, and checks that frames arrived. CI installs the browser (.ci/run) and sets
GENIE_REQUIRE_BROWSER=1, so there a missing browser fails instead of skipping."""

from __future__ import annotations

import os
import shutil
import time

import pytest
from PIL import Image

from genie_core.play.server import PlayServer
from genie_core.play.session import PlayWorld

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    from selenium import webdriver
except ImportError:
    webdriver = None

if not (CHROMIUM and CHROMEDRIVER and webdriver):
    missing = "selenium (pip install -e '.[test]')" if webdriver is None else \
        "chromium and chromedriver (Debian: apt-get install chromium chromium-driver)"
    if os.environ.get("GENIE_REQUIRE_BROWSER"):
        raise RuntimeError(f"GENIE_REQUIRE_BROWSER is set but {missing} is not installed")
    pytest.skip(f"needs {missing}", allow_module_level=True)


@pytest.fixture()
def browser(tmp_path):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1200,800", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def wait_for(condition, timeout=60.0, what="the page"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_keys_play_the_world_in_the_browser(played_run, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    with PlayServer(PlayWorld.load(played_run)) as server:
        browser.get(server.url)
        frame = browser.find_element(By.ID, "frame")
        frames = lambda: int(frame.get_attribute("data-frames") or 0)  # noqa: E731 - frames in the session
        shown = lambda: int(frame.get_attribute("data-shown") or 0)  # noqa: E731 - frames the stream delivered
        wait_for(lambda: frames() == 1, what="the prompt frame")
        assert browser.find_element(By.ID, "run").text == played_run.name
        assert len(browser.find_elements(By.CSS_SELECTOR, "#actions button")) == 4
        assert len(browser.find_elements(By.CSS_SELECTOR, "#prompts img")) >= 1

        ActionChains(browser).send_keys("1").perform()  # a tap: one frame
        wait_for(lambda: frames() == 2, what="the frame of a tapped key")
        ActionChains(browser).key_down("2").perform()  # held: frames keep coming until it is released
        wait_for(lambda: frames() >= 5, what="frames while a key is held")
        ActionChains(browser).key_up("2").perform()
        time.sleep(0.5)
        settled = frames()
        time.sleep(1.0)
        assert frames() == settled, "no frame after the key was released"
        session = next(iter(server.sessions.values()))
        assert session.actions == [1] + [2] * (settled - 2)  # key N plays action N, as in the terminal

        before = shown()
        browser.find_element(By.ID, "undo").click()
        wait_for(lambda: frames() == settled - 1, what="undo")
        assert shown() == before + 1
        assert browser.find_element(By.ID, "error").text == ""
        assert "frames/s" in browser.find_element(By.ID, "status").text
        assert browser.execute_script("return document.getElementById('frame').naturalWidth") == 64

        ActionChains(browser).send_keys("4").perform()  # actions 0..3: not a key of this world, nothing happens
        time.sleep(0.5)
        assert frames() == settled - 1
        broken = tmp_path / "broken.png"
        broken.write_bytes(b"not an image")
        browser.find_element(By.ID, "upload").send_keys(str(broken))
        error = browser.find_element(By.ID, "error")
        wait_for(lambda: error.text, what="the error of a broken upload")
        assert error.text == "uploaded image: not an image (no image format recognised)"
        assert frames() == settled - 1 and len(server.sessions) == 1  # the session plays on

        good = tmp_path / "prompt.png"
        Image.new("RGB", (32, 48), (200, 40, 40)).save(good)
        browser.find_element(By.ID, "upload").send_keys(str(good))
        wait_for(lambda: frames() == 1 and not error.text, what="a session from an uploaded prompt")
        ActionChains(browser).send_keys("1").perform()
        wait_for(lambda: frames() == 2, what="a frame after the uploaded prompt")
        assert browser.get_screenshot_as_png().startswith(b"\x89PNG")


def test_the_printed_address_with_its_token_plays(played_run, browser):
    """With an access token, the printed address (…/?token=T) opens the page, and the page's own requests (the API,
    the event stream, prompt images) get through on the cookie it leaves."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    with PlayServer(PlayWorld.load(played_run), token="browser-token") as server:
        browser.get(server.url)
        frame = browser.find_element(By.ID, "frame")
        wait_for(lambda: int(frame.get_attribute("data-frames") or 0) == 1, what="the prompt frame")
        assert browser.current_url == server.url.split("?")[0]  # the token left the address bar
        ActionChains(browser).send_keys("2").perform()
        wait_for(lambda: int(frame.get_attribute("data-shown") or 0) >= 2, what="a streamed frame")
        assert browser.execute_script("return document.querySelector('#prompts img').naturalWidth") == 64
        browser.delete_all_cookies()
        browser.get(server.url.split("?")[0])
        assert "needs its access token" in browser.page_source
