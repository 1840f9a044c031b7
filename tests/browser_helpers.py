"""What the page's browser tests share: Debian's chromium driven by selenium, and the skips when they are missing."""
from __future__ import annotations

import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
from conftest import wait_for

try:
    from selenium import webdriver
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
except ImportError:  # pragma: no cover - said by the skip below
    webdriver = None

#: pytestmark entries of every browser test module.
BROWSER_SKIPS = [
    pytest.mark.skipif(webdriver is None, reason="selenium is not installed (pip install -e '.[test]')"),
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                       reason="no chromium/chromedriver on PATH (apt-get install chromium chromium-driver)"),
]


def new_browser(*extra_args: str, prefs: dict | None = None):
    """A headless Chromium at 1280x720 that keeps its console log; quit() it when done."""
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,720", "--disable-extensions", "--no-first-run", *extra_args):
        opts.add_argument(arg)
    if prefs:
        opts.add_experimental_option("prefs", prefs)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    return driver


def js_errors(driver, allow=()) -> list[str]:
    """SEVERE console entries, except the favicon and the messages that contain one of ``allow``."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"
            and "favicon" not in e["message"] and not any(a in e["message"] for a in allow)]


def until(predicate, timeout: float = 15.0, what: str = "condition"):
    """wait_for that treats an element replaced meanwhile (stale, gone) as 'not yet'."""
    def safe():
        try:
            return predicate()
        except (StaleElementReferenceException, NoSuchElementException):
            return None
    return wait_for(safe, timeout=timeout, interval=0.05, what=what)
