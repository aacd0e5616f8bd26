"""The HTML report in a real headless Chromium (Selenium + Debian's chromium and chromium-driver).

`.ci/run` installs them; the test skips, saying what is missing, where they are absent.
"""

from __future__ import annotations

import shutil

import pytest

from tests.test_eval_report import build_report

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), shutil.which("google-chrome"))
                 if p), None)
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("headless Chromium is absent: apt-get install chromium chromium-driver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # no driver download: a local path
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_report_page_loads_with_images_and_tables(browser, tmp_path):
    results, paths = build_report(tmp_path)
    browser.get(paths["html"].resolve().as_uri())
    assert browser.execute_script("return document.readyState") == "complete"
    assert browser.title == "genalign evaluation"
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]);")
    assert {src for src, _, _ in images} == {"grids/geneval_A.png", "grids/geneval_B.png", "grids/dense_pairs.png"}
    assert all(complete and width > 0 for _, complete, width in images), images
    tables = browser.execute_script(
        "return Array.from(document.querySelectorAll('table')).map(t => [t.previousElementSibling.textContent, "
        "t.querySelectorAll('tbody tr').length]);")
    titles = [title for title, _ in tables]
    assert len(tables) == 4 and all(rows > 0 for _, rows in tables)
    assert titles[1].startswith("GenEval-style") and titles[3].startswith("DenseAlignBench-style")
    cell = browser.execute_script("return document.querySelectorAll('table')[1].rows[1].cells[2].textContent")
    assert cell == "1.000"  # A's strict accuracy on the first category
    browser.save_screenshot(str(tmp_path / "report.png"))
