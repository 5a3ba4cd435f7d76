"""End to end in a real browser: `distillery ui` as a subprocess, driven by Selenium in Debian's
headless Chromium (`apt-get install chromium chromium-driver`; .ci/run installs them).

The store has a version whose parent is another version (best v0001 <- samples v0002) and whose
rejects have three reasons. The test opens the index, clicks best v0001's node in the lineage
graph, then its parent, then its rejected rows, filters them by a reason and opens a record.
Screenshots go to $DISTILLERY_SCREENSHOTS (or the test's tmp_path).
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.ui_store import SCRIPT, shared_ui_store

CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="needs Debian's chromium and chromedriver: apt-get install -y chromium chromium-driver (.ci/run installs them)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return shared_ui_store(tmp_path_factory)


@pytest.fixture(scope="module")
def server(built, tmp_path_factory):
    """`distillery ui` on a free loopback port; yields its URL once it answers."""
    port = _free_port()
    log = tmp_path_factory.mktemp("ui-server") / "stderr.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "distillery.cli", "ui", "--store", built[0], "--port", str(port)],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        try:
            url = proc.stdout.readline().strip()
            assert url == f"http://127.0.0.1:{port}/", f"first line: {url!r}; stderr: {log.read_text()}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(url + "healthz", timeout=2) as response:
                        assert response.read() == b"ok"
                    break
                except OSError:
                    assert proc.poll() is None, f"distillery ui exited {proc.returncode}: {log.read_text()}"
                    assert time.monotonic() < deadline, f"distillery ui did not answer in 60 s: {log.read_text()}"
                    time.sleep(0.2)
            yield url.rstrip("/")
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the test extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000", "--lang=en-US"):
        options.add_argument(arg)
    # Debian's driver, never a download by selenium-manager
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


@pytest.fixture
def shots(tmp_path):
    folder = Path(os.environ.get("DISTILLERY_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _screenshot(driver, folder: Path, name: str) -> Path:
    """The whole page: the window grows to the page's height (at most 4000 px) for the shot."""
    height = driver.execute_script("return Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)")
    driver.set_window_size(1400, min(max(height + 120, 800), 4000))
    path = folder / f"{name}.png"
    assert driver.save_screenshot(str(path)), path
    driver.set_window_size(1400, 1000)
    return path


def _wait_for(driver, condition, what: str, timeout: float = 20):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d), message=what)


def _count(driver, element_id: str) -> int:
    from selenium.webdriver.common.by import By

    return int(driver.find_element(By.CSS_SELECTOR, f"#{element_id} strong").text)


def test_click_from_the_graph_to_a_version_its_parent_and_its_rejects(server, browser, built, shots):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    _, made = built
    best, parent = made["best/v0001"], made["samples/v0002"]
    started = time.monotonic()

    # the index: every version in the table, the lineage graph with a box per version
    browser.get(server + "/")
    assert browser.title == "Distillery lineage"
    versions = browser.find_elements(By.CSS_SELECTOR, "#datasets tbody tr")
    assert [(r.get_attribute("data-dataset"), r.get_attribute("data-version")) for r in versions] == [
        ("best", "v0001"), ("best-pairs", "v0001"), ("rm", "v0001"), ("samples", "v0002"), ("samples", "v0001"),
    ]
    nodes = {n.get_attribute("data-node") for n in browser.find_elements(By.CSS_SELECTOR, "svg#lineage g.node")}
    assert {f"version:{k}" for k in made} <= nodes
    assert any(n.startswith("model:") for n in nodes) and any(n.startswith("run:") for n in nodes)
    _screenshot(browser, shots, "01-index")

    # click best v0001's box in the graph
    browser.find_element(By.CSS_SELECTOR, 'svg#lineage a[data-node="version:best/v0001"]').click()
    _wait_for(browser, lambda d: d.current_url == server + "/d/best/v0001", "the version page")
    assert browser.find_element(By.ID, "title").text.startswith("best v0001")
    assert browser.find_element(By.ID, "kept-rows").text == f"kept rows ({best['counts']['published']})"
    assert browser.find_element(By.ID, "rejected-rows").text == f"rejected rows ({best['counts']['rejected']})"
    assert browser.find_element(By.CSS_SELECTOR, "svg#neighbourhood g.node.current").get_attribute("data-node") == "version:best/v0001"
    assert "Row accounting" in browser.find_element(By.ID, "card").text
    for img in browser.find_elements(By.CSS_SELECTOR, "#card img"):  # the card's plots loaded
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 0, img.get_attribute("src")
    _screenshot(browser, shots, "02-version")

    # its parent
    link = browser.find_element(By.CSS_SELECTOR, "#parents a.parent")
    assert link.text == "samples v0002"
    link.click()
    _wait_for(browser, lambda d: d.current_url == server + "/d/samples/v0002", "the parent's page")
    assert browser.find_element(By.ID, "title").text.startswith("samples v0002")
    assert browser.find_element(By.ID, "kept-rows").text == f"kept rows ({parent['counts']['published']})"
    assert "used as parent by: best v0001" in browser.find_element(By.ID, "downstream").text
    _screenshot(browser, shots, "03-parent")

    # back to best v0001, then its rejected rows
    browser.back()
    _wait_for(browser, lambda d: d.current_url == server + "/d/best/v0001", "back on the version page")
    browser.find_element(By.ID, "rejected-rows").click()
    _wait_for(browser, lambda d: d.current_url == server + "/d/best/v0001/rejects", "the rejects page")
    assert browser.find_element(By.ID, "title").text == "best v0001: rejected rows"
    assert _count(browser, "reject-count") == best["counts"]["rejected"]
    reasons = {a.get_attribute("data-reason"): a.text for a in browser.find_elements(By.CSS_SELECTOR, "#filters a.reason")}
    assert reasons == {"near_duplicate": "near_duplicate (3)", "too_short": "too_short (4)", "repetitive": "repetitive (1)"}
    assert len(browser.find_elements(By.CSS_SELECTOR, "#rejects tbody tr")) == best["counts"]["rejected"]
    _screenshot(browser, shots, "04-rejects")

    # filter by one reason; open a record that holds <script> text
    browser.find_element(By.CSS_SELECTOR, '#filters a.reason[data-reason="too_short"]').click()
    _wait_for(browser, lambda d: "reason=too_short" in d.current_url, "the filtered rejects")
    assert _count(browser, "reject-count") == 4
    cells = browser.find_elements(By.CSS_SELECTOR, "#rejects td.col-reason")
    assert [c.text for c in cells] == ["too_short"] * 4
    summary = browser.find_element(By.CSS_SELECTOR, "#rejects td.col-record details summary")
    summary.click()
    record = browser.find_element(By.CSS_SELECTOR, "#rejects td.col-record details[open] pre")
    assert SCRIPT in record.text  # shown as text ...
    assert browser.execute_script("return document.querySelectorAll('main script').length") == 0  # ... never as markup
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018 - the script never ran
    _screenshot(browser, shots, "05-rejects-too-short")

    # the kept rows, from the version page
    browser.get(server + "/d/best/v0001")
    browser.find_element(By.ID, "kept-rows").click()
    _wait_for(browser, lambda d: d.current_url == server + "/d/best/v0001/rows", "the kept rows")
    assert _count(browser, "row-count") == best["counts"]["published"]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#rows tbody tr")) == best["counts"]["published"]
    assert "<b>bold</b>" in browser.find_element(By.CSS_SELECTOR, "#rows tbody").text
    _screenshot(browser, shots, "06-kept-rows")
    print(f"\nbrowser walk: {time.monotonic() - started:.1f} s; screenshots in {shots}")
