"""Headless Chromium for the tests of a web page (the console): Debian's `chromium` driven
through its `chromedriver` by selenium, in a fresh empty profile, with every background
connection Chromium would make of its own switched off (this machine's network refuses them,
and a test must not depend on them). Selenium is blocking: `browser(tmp)` yields a `Browser`
whose calls async tests make through `asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1100",
)


def chromium_paths() -> tuple[str, str]:
    """The browser and its driver (scripts/setup.sh --system installs both)."""
    found = shutil.which("chromium"), shutil.which("chromedriver")
    assert found[0] and found[1], "chromium and chromedriver: run scripts/setup.sh --system"
    return found[0], found[1]


class Browser:
    """One headless Chromium window."""

    def __init__(self, driver: WebDriver) -> None:
        self.driver = driver

    def open(self, url: str) -> None:
        self.driver.get(url)

    def script(self, source: str, *args: Any) -> Any:
        """Run `source` (a function body; `arguments[i]` are `args`) in the page."""
        return self.driver.execute_script(source, *args)

    def screenshot(self, path: Path) -> Path:
        assert self.driver.save_screenshot(str(path)), f"no screenshot at {path}"
        return path


@contextlib.contextmanager
def browser(profile: Path) -> Iterator[Browser]:
    """Chromium with a new empty profile in `profile`; quit on exit."""
    binary, driver_path = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in FLAGS:
        options.add_argument(flag)
    profile.mkdir(parents=True, exist_ok=True)
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        yield Browser(driver)
    finally:
        driver.quit()
