"""The chat tab in headless Chromium: type a prompt, watch the answer stream in with its routing message,
the probability plot and the live residency plot. Saves a screenshot to test-artifacts/.

Needs ``chromium`` and ``chromedriver`` (Debian: ``apt-get install chromium chromium-driver``) and selenium.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.test_app import app_server  # noqa: F401  (the session's launched app)

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(
        not (CHROMIUM and DRIVER),
        reason="headless Chromium is not installed (apt-get install chromium chromium-driver; .ci/run installs it)",
    ),
]


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="coe-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1400,1100",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_chat_streams_an_answer_with_routing_message_and_plots(browser, app_server):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 120)
    browser.get(app_server.url)
    prompt = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#coe-prompt textarea")))

    # a short answer keeps the test quick: set max new tokens through the slider's number box
    browser.find_element(
        By.XPATH,
        "//button[.//span[contains(., 'Controls')]] | //*[contains(@class,'label-wrap')]"
        "[.//span[contains(., 'Controls')]]",
    ).click()
    tokens = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#coe-max-tokens input[type=number]")))
    tokens.send_keys(Keys.CONTROL, "a")
    tokens.send_keys("12", Keys.TAB)

    prompt.send_keys("Write a short poem about the sea", Keys.ENTER)
    send = browser.find_element(By.CSS_SELECTOR, "#coe-send")
    wait.until(lambda d: "writing" in d.find_element(By.CSS_SELECTOR, "#coe-chatbot").text)
    # the turn has ended when the Send button is enabled again and the stats line is written
    wait.until(lambda d: send.is_enabled() and "tokens" in d.find_element(By.CSS_SELECTOR, "#coe-turn-stats").text)

    chat = browser.find_element(By.CSS_SELECTOR, "#coe-chatbot").text
    assert "→" in chat and "writing" in chat  # the routing message: category (p) -> expert
    assert "Write a short poem about the sea" in chat
    stats = browser.find_element(By.CSS_SELECTOR, "#coe-turn-stats").text
    assert "logged as turn #" in stats
    prob = browser.find_element(By.CSS_SELECTOR, "#coe-prob-plot")
    assert prob.find_elements(By.CSS_SELECTOR, ".js-plotly-plot") and "fallback threshold" in prob.text
    residency = browser.find_element(By.CSS_SELECTOR, "#coe-residency-plot")
    assert residency.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")
    assert "cpu (executes)" in residency.text or "gpu (executes)" in residency.text
    timeline = browser.find_element(By.CSS_SELECTOR, "#coe-timeline-plot")
    assert "tokens/s" in timeline.text and "prefill" in timeline.text

    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "app-chat.png"))
