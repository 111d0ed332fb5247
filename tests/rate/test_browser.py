"""End to end in headless Chromium: rate with the keyboard, kill the server mid-study,
check nothing submitted was lost, resume with the rater code, finish, export."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from siamdiff.rate.export import export_results
from siamdiff.rate.storage import all_answers
from siamdiff.rate.study import Study, build_study

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SRC = Path(__file__).resolve().parents[2] / "src"
# Set to a path to refresh the documentation screenshot (docs/rating-page.png).
SCREENSHOT_ENV = "SIAMDIFF_RATE_SCREENSHOT"

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
    reason="headless Chromium test needs /usr/bin/chromium and /usr/bin/chromedriver",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def server(study_root: Path, port: int) -> Iterator[subprocess.Popen]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "siamdiff.rate.server", str(study_root), "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the rating server did not start") from None
                time.sleep(0.1)
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=900,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_until_ready(driver) -> None:
    """Until the page takes a score (its image shown for MIN_VIEW_MS)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ready = "return arguments[0].dataset.ready === '1'"
    WebDriverWait(driver, 10).until(
        lambda d: d.execute_script(ready, d.find_element(By.ID, "answer"))
    )


def rate_current(driver, key_guess: str, score: int) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    heading = driver.find_element(By.TAG_NAME, "body").text
    wait_until_ready(driver)
    body = driver.find_element(By.TAG_NAME, "body")
    body.send_keys(key_guess)
    body.send_keys(str(score))
    WebDriverWait(driver, 10).until(lambda d: d.find_element(By.TAG_NAME, "body").text != heading)


def test_rate_kill_resume_finish(
    browser, synthetic_data: Path, phantom_data: Path, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    study: Study = build_study(
        synthetic_data,
        phantom_data,
        tmp_path / "study",
        per_source=3,
        repeats=1,
        seed=0,
        overlay=True,
    )
    total = len(study.sequence)
    scores = [1 + p % 5 for p in range(total)]
    half = total // 2
    port = free_port()
    with server(study.root, port) as process:
        browser.get(f"http://127.0.0.1:{port}/")
        browser.find_element(By.ID, "name").send_keys("Dr <b>Who</b>")
        browser.find_element(By.ID, "begin").click()
        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.ID, "answer"))
        assert browser.find_element(By.ID, "rater").text == "Dr <b>Who</b>"
        code = browser.find_element(By.ID, "rater-code").text
        image = browser.find_element(By.ID, "image")
        plain = image.get_attribute("src")
        browser.find_element(By.TAG_NAME, "body").send_keys("m")
        assert image.get_attribute("src").endswith("?overlay=1")
        # Loaded, not broken (a slow machine may still be fetching it).
        loaded = "return arguments[0].complete && arguments[0].naturalWidth"
        WebDriverWait(browser, 10).until(lambda d: d.execute_script(loaded, image))
        browser.find_element(By.TAG_NAME, "body").send_keys("m")
        assert image.get_attribute("src") == plain
        for position in range(half):
            if position == 1:
                browser.find_element(By.ID, "guess-synthetic").click()
                screenshot = Path(os.environ.get(SCREENSHOT_ENV, tmp_path / "page.png"))
                browser.save_screenshot(str(screenshot))
                assert screenshot.read_bytes().startswith(b"\x89PNG")
            rate_current(browser, "r", scores[position])
            assert f"Image {position + 2} of {total}" in browser.page_source
        process.send_signal(signal.SIGKILL)
        process.wait()
    saved = all_answers(study.root)
    assert [a.score for a in saved] == scores[:half]
    assert [a.guess for a in saved] == ["real"] * half

    with server(study.root, port):
        browser.get(f"http://127.0.0.1:{port}/")
        browser.find_element(By.ID, "code").send_keys(code)
        browser.find_element(By.ID, "resume").click()
        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.ID, "answer"))
        assert f"Image {half + 1} of {total}" in browser.page_source
        for position in range(half, total):
            rate_current(browser, "s", scores[position])
        assert browser.find_element(By.ID, "done").text.startswith("Thank you")
    saved = all_answers(study.root)
    assert [a.score for a in saved] == scores
    assert [a.position for a in saved] == list(range(total))
    summary = export_results(study.root)
    assert summary["raters"] == 1 and summary["overall"]["intra_rater"]["n"] == 1


def test_a_double_press_a_held_key_or_enter_on_a_guess_answers_once(
    browser, synthetic_data: Path, phantom_data: Path, tmp_path: Path
) -> None:
    """A second press landing on the next page, a key's auto-repeat, or Enter on a guess (the
    form's implicit submit) answered an image the rater never saw, or with score 1."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    def key_down(key: str, repeat: bool) -> None:
        browser.execute_cdp_cmd(
            "Input.dispatchKeyEvent",
            {"type": "keyDown", "key": key, "text": key, "autoRepeat": repeat},
        )

    study = build_study(synthetic_data, phantom_data, tmp_path / "study", per_source=3)
    port = free_port()
    with server(study.root, port):
        browser.get(f"http://127.0.0.1:{port}/")
        browser.find_element(By.ID, "name").send_keys("A")
        browser.find_element(By.ID, "begin").click()
        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.ID, "answer"))
        wait_until_ready(browser)
        browser.find_element(By.ID, "guess-real").click()
        browser.find_element(By.ID, "guess-real").send_keys(Keys.ENTER)
        time.sleep(0.5)
        assert "Image 1 of" in browser.page_source and not all_answers(study.root)
        key_down("4", repeat=False)
        WebDriverWait(browser, 10, poll_frequency=0.02).until(
            lambda d: "Image 2 of" in d.page_source
        )
        key_down("4", repeat=False)  # pressed again as the next image appears
        wait_until_ready(browser)
        key_down("2", repeat=False)  # then held down: the browser repeats it
        for _ in range(6):
            key_down("2", repeat=True)
            time.sleep(0.1)
        time.sleep(1.0)
    saved = all_answers(study.root)
    assert [(a.position, a.score, a.guess) for a in saved] == [(0, 4, "real"), (1, 2, None)]
