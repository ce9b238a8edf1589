"""search serve: the JSON endpoints, and the page in a real headless Chromium.

The browser test needs Debian's chromium and chromium-driver (``.ci/run`` installs them);
without them it is skipped with a message saying so, never passed silently.
"""

from __future__ import annotations

import io
import os
import shutil
import threading
from pathlib import Path

import pytest

from search.options import ServeOptions
from search.query import Searcher
from search.store import SearchIndex
from search.web import create_app, make_app_server
from tests.search.util import build_collection, index_options

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    from search.build import build_index

    root = tmp_path_factory.mktemp("search_web")
    folders = build_collection(root / "shards")
    return build_index(index_options(folders, root / "idx"))


@pytest.fixture(scope="module")
def client(index_dir):
    app = create_app(Searcher(SearchIndex(index_dir), device="cpu"), k=6)
    return app.test_client()


def test_endpoints_answer_queries_and_serve_images(client, index_dir):
    info = client.get("/api/info").get_json()
    assert info["count"] == 72 and info["index"] == "flat" and info["k"] == 6
    res = client.get("/api/text", query_string={"q": "a dense residential area"}).get_json()
    assert [r["rank"] for r in res["results"]] == list(range(1, 7))
    first = res["results"][0]
    img = client.get(first["image"])
    assert img.status_code == 200 and img.mimetype == "image/jpeg" and img.data[:2] == b"\xff\xd8"
    similar = client.get("/api/key", query_string={"key": first["uid"], "k": 3}).get_json()["results"]
    assert similar[0]["uid"] == first["uid"] and len(similar) == 3
    upload = client.post("/api/image", data={"image": (io.BytesIO(img.data), "mine.jpg")},
                         content_type="multipart/form-data").get_json()
    assert upload["results"][0]["uid"] == first["uid"]  # the uploaded copy of an indexed image finds it


def test_endpoints_answer_bad_input_with_one_message(client):
    cases = [
        (client.get("/api/text", query_string={"q": "  "}), 'empty query: type some words, e.g. "baseball field"'),
        (client.get("/api/key", query_string={"key": "zzz"}), "unknown key 'zzz'"),
        (client.get("/api/text", query_string={"q": "x", "k": "many"}), "k must be a whole number"),
        (client.post("/api/image", data={}, content_type="multipart/form-data"), "no image uploaded"),
        (client.post("/api/image", data={"image": (io.BytesIO(b"text"), "a.jpg")}, content_type="multipart/form-data"),
         "cannot read uploaded file a.jpg: not an image format"),
        (client.get("/img/99999"), "no row 99999 in this index"),
    ]
    for resp, message in cases:
        assert resp.status_code == 400 and resp.get_json()["error"].startswith(message), resp.get_json()


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium through Debian's chromedriver (selenium-manager is never asked to download)."""
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        pytest.skip(f"browser test needs {CHROMIUM} and {CHROMEDRIVER}: apt-get install chromium chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("browser test needs selenium (pip install -c constraints.txt '.[test]')")
    os.environ["SE_OFFLINE"] = "true"  # never let selenium-manager reach for the network
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900"]:
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "profile", ignore_errors=True)


def test_browser_types_a_query_sees_images_and_clicks_for_similar(index_dir, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    server, url = make_app_server(ServeOptions(index=str(index_dir), port=0, k=8, device="cpu"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        browser.get(url)
        wait = WebDriverWait(browser, 30)
        wait.until(lambda d: "72 images" in d.find_element(By.ID, "info").text)
        box = browser.find_element(By.ID, "q")
        box.send_keys("many planes are parked next to a long building", Keys.ENTER)
        loaded = "return [...document.querySelectorAll('#results img')].filter(i => i.complete && i.naturalWidth > 0).length"
        wait.until(lambda d: d.execute_script(loaded) == 8)
        assert browser.find_element(By.ID, "status").text.startswith("8 results for")
        cards = browser.find_elements(By.CSS_SELECTOR, "#results .card")
        scores = [float(c.find_element(By.CLASS_NAME, "score").text.split()[1]) for c in cards]
        assert scores == sorted(scores, reverse=True)
        clicked = cards[3].get_attribute("data-uid")
        cards[3].click()  # image -> image from a result
        wait.until(lambda d: d.find_element(By.ID, "status").text == f"8 results similar to {clicked}")
        wait.until(lambda d: d.execute_script(loaded) == 8)
        first = browser.find_elements(By.CSS_SELECTOR, "#results .card")[0]
        assert first.get_attribute("data-uid") == clicked and "1.000" in first.text
        box.clear()
        box.send_keys("   ", Keys.ENTER)  # the page shows the server's one-line error
        wait.until(lambda d: d.find_element(By.ID, "error").text.startswith("empty query"))
        browser.save_screenshot(str(tmp_path / "page.png"))
    finally:
        server.shutdown()
        server.server_close()
