"""A headless Chromium driven by selenium, for pictures and browser checks of the pages lenses writes
(`scripts/grid_screenshot.py`, `tests/test_viz_browser.py`). `scripts/browser.sh` installs Chromium and
its driver from Debian's packages when they are missing."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class NoBrowser(RuntimeError):
    """No headless Chromium could be had here; the message says why."""


def chromium():
    """A selenium WebDriver of headless Chromium (raises `NoBrowser` naming what is missing)."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        done = subprocess.run(["bash", str(ROOT / "scripts" / "browser.sh")], capture_output=True, text=True)
        if done.returncode != 0:
            raise NoBrowser(f"no headless Chromium: {done.stderr.strip() or done.stdout.strip()}")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise NoBrowser("selenium is not installed: pip install -e '.[test]'") from None
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
