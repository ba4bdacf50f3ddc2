"""The annotation web tool in a real headless Chromium: click a photo, see the mask, accept it,
find it in the store. Skips when chromium / chromedriver / selenium are not installed
(`make setup` installs them)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.provenance import sha256_file
from sharding import Store, ingest

ROOT = Path(__file__).resolve().parents[1]


def _browser() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip(
            "chromium and chromedriver are not installed (Debian: apt-get install chromium "
            "chromium-driver; `make setup` does it as root): the browser test needs them"
        )
    pytest.importorskip("selenium", reason="selenium is not installed (`make setup`)")
    return chromium, driver


@dataclass
class Served:
    store: Store
    url: str  # http://127.0.0.1:PORT/
    proc: subprocess.Popen
    token: str | None  # what the printed address carries
    host: str  # the host the printed address names


@pytest.fixture
def server(request, tmp_path, parity_dir, demo_photos):
    """`sa-engine serve` with a free port over a one-photo store: on 127.0.0.1, or with the
    extra arguments a test gives (`indirect` parametrisation); reached through 127.0.0.1."""
    store = Store.create(tmp_path / "store")
    photo = next(p for p in demo_photos if p.name == "chelsea.jpg")
    ingest(str(photo), store)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "serve", str(store.root), "--port", "0",
         "--model", str(parity_dir / "config.json"),
         "--checkpoint", str(parity_dir / "sam_small.pth"), "--set", "annotate.time_limit_s=120",
         *getattr(request, "param", [])],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        match = re.search(r"http://([^:/]+):(\d+)/(\?token=([\w-]+))?", line)
        assert match, f"serve did not start: {line}{proc.stdout.read() if proc.poll() else ''}"
        yield Served(store, f"http://127.0.0.1:{match.group(2)}/", proc, match.group(4), match.group(1))
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_click_accept_saves_mask_in_store(server):
    chromium, driver_path = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    store, url = server.store, server.url
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1000,800"):  # fmt: skip
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        browser.get(url)
        wait = WebDriverWait(browser, 120)
        body = browser.find_element(By.TAG_NAME, "body")
        wait.until(lambda _: body.get_attribute("data-state") == "ready")
        overlay = browser.find_element(By.ID, "overlay")
        assert _painted(browser) == 0  # nothing drawn before the first click
        scale = overlay.size["width"] / 451  # chelsea.jpg is 451x300

        def click_at(x, y, right=False):
            chain = ActionChains(browser).move_to_element_with_offset(
                overlay, int(x * scale - overlay.size["width"] / 2),
                int(y * scale - overlay.size["height"] / 2),
            )  # fmt: skip
            (chain.context_click() if right else chain.click()).perform()
            wait.until(lambda _: body.get_attribute("data-state") == "ready")

        click_at(140, 130)  # the cat's head: a positive point
        wait.until(lambda _: int(body.get_attribute("data-mask-area") or 0) > 0)
        one_point = int(body.get_attribute("data-mask-area"))
        assert _painted(browser) > 1000  # the mask is drawn over the photo
        click_at(420, 30, right=True)  # a negative point in the background
        assert "2 clicks" in browser.find_element(By.ID, "mask-info").text
        body.send_keys("z")  # undo the negative point
        wait.until(lambda _: "1 clicks" in browser.find_element(By.ID, "mask-info").text)
        assert int(body.get_attribute("data-mask-area")) == one_point
        body.send_keys("\n")  # accept
        wait.until(lambda _: body.get_attribute("data-saved"))
        assert body.get_attribute("data-accepted") == "1"
        saved = int(body.get_attribute("data-saved"))
    finally:
        browser.quit()

    shard = store.shards()[0]
    record = store.done_record("assisted", 0, shard)
    assert record is not None and record["counts"]["annotations"] == 1
    assert record["meta"]["annotator"] == "person" and record["meta"]["complete"] is True
    row = store.read_annotations("assisted", 0, shard).to_pylist()[0]
    assert row["id"] == saved and row["area"] == one_point
    assert row["clicks"] == 1 and row["annotator"] == "person" and row["prefilled"] is False
    assert row["iou"] is None and 0 < row["seconds"] < 120
    assert row["point_coords"] == [[pytest.approx(140, abs=2), pytest.approx(130, abs=2)]]


@pytest.mark.parametrize("server", [["--host", "0.0.0.0"]], indirect=True)
def test_served_beyond_loopback_asks_every_request_for_its_token(server):
    """Bound beyond this machine the tool writes to the store only for who holds the printed
    address: without the token every request is refused; the page sets it as a cookie."""
    assert server.token and len(server.token) >= 32  # a random one, printed in the address
    assert server.host == socket.gethostname()  # bound to every interface: the machine's name

    def get(path, headers=None):
        req = urllib.request.Request(server.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=120) as reply:
                return reply.status, reply.headers, reply.read()
        except urllib.error.HTTPError as err:
            return err.code, err.headers, err.read()

    for path in ("", "api/next", f"api/next?token={server.token[:-1]}x"):
        status, _, body = get(path)
        assert status == 403 and b"asks for its token" in body
    req = urllib.request.Request(server.url + "api/finish", b'{"image_id": 1}', method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=120)
    assert refused.value.code == 403 and server.store.done_record("assisted", 0, "shard-000000") is None
    status, headers, _ = get(f"?token={server.token}")  # the printed address: the page
    assert status == 200
    cookie = headers["Set-Cookie"]
    assert f"sa_engine_token={server.token}" in cookie and "HttpOnly" in cookie
    status, _, body = get("api/next", {"Cookie": cookie.split(";")[0]})  # what the page sends
    assert status == 200 and json.loads(body)["image_id"] == 1


def _painted(browser) -> int:
    """Pixels of the overlay canvas that something was drawn on (alpha > 0)."""
    return browser.execute_script(
        "const c = document.getElementById('overlay');"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n;"
    )


def test_api_refuses_bad_clicks_and_resumes(server, parity_dir):
    """The JSON API names bad input; the session keeps a run record naming the weights, which a
    release's made_by finds; a restarted session finds the committed work."""
    from engine.gears.server import AnnotationSession
    from engine.model import build_sam
    from engine.predictor import SamPredictor

    store, url, proc = server.store, server.url, server.proc

    def post(path, body):
        req = urllib.request.Request(url + path.lstrip("/"), json.dumps(body).encode(), method="POST")
        try:
            with urllib.request.urlopen(req, timeout=120) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    with urllib.request.urlopen(url + "api/next", timeout=120) as reply:
        info = json.loads(reply.read())
    image_id = info["image_id"]
    assert (info["width"], info["height"]) == (451, 300)
    status, reply = post("api/click", {"image_id": image_id, "x": 900, "y": 10, "positive": True})
    assert status == 400 and "outside the 451x300 image" in reply["error"]
    status, reply = post("api/accept", {"image_id": image_id})
    assert status == 400 and "no mask to accept" in reply["error"]
    status, reply = post("api/click", {"image_id": 999, "x": 1, "y": 1, "positive": True})
    assert status == 400 and "not in" in reply["error"]
    status, reply = post("api/click", {"image_id": image_id, "x": 1, "positive": True})
    assert status == 400 and reply["error"] == "/api/click: the request body has no 'y'"
    status, reply = post("api/click", [image_id, 1, 1])
    assert status == 400 and "the request body must be a JSON object" in reply["error"]
    assert not (store.root / "runs" / "assisted").exists()  # nothing committed yet: no record
    status, reply = post("api/click", {"image_id": image_id, "x": 140, "y": 130, "positive": True})
    assert status == 200 and reply["area"] > 0
    status, reply = post("api/accept", {"image_id": image_id})
    assert status == 200 and reply["saved_id"]
    status, reply = post("api/finish", {"image_id": image_id})
    assert status == 200 and reply["image_id"] is None  # the only image is done
    (shard,) = store.shards()
    record = store.done_record("assisted", 0, shard)
    assert record["images"] == [image_id] and record["counts"]["annotations"] == 1

    (path,) = (store.root / "runs" / "assisted").glob("*-round-0.json")
    run = json.loads(path.read_text())
    assert run["state"] == "serving" and run["annotator"] == "person"
    assert (run["processed"], run["images"], run["accepted"]) == ([shard], 1, 1)
    weights = run["meta"]["model"]["weights"]
    assert weights["sha256"] == sha256_file(parity_dir / "sam_small.pth")
    assert run["meta"]["annotate"]["time_limit_s"] == 120 and run["versions"]["sa-engine"]
    (made_by,) = store.runs_that_made("assisted", 0, [shard])  # what a release's made_by lists
    assert made_by["run_record"] == f"runs/assisted/{path.name}" and made_by["shards"] == [shard]
    proc.terminate()  # SIGTERM stops the server as Ctrl-C does: the record says so
    assert proc.wait(timeout=20) == 0
    run = json.loads(path.read_text())
    assert run["state"] == "stopped" and run["finished_at"] >= run["started_at"]
    sam = build_sam(parity_dir / "config.json", checkpoint=parity_dir / "sam_small.pth")
    restarted = AnnotationSession(Store(store.root), SamPredictor(sam))
    assert restarted.next_image()["image_id"] is None  # resumes: nothing left to do


def test_mask_png_is_a_lossless_one_bit_picture_of_the_mask():
    import cv2
    import numpy as np

    from engine.gears.server import mask_png

    mask = np.zeros((1000, 1500), bool)
    mask[200:700, 300:1200] = True
    mask[450:460, 600:610] = False  # a hole
    png = mask_png(mask)
    assert png[25] == 0 and png[24] == 1  # IHDR: greyscale, 1 bit per pixel
    decoded = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert np.array_equal(decoded == 255, mask) and np.array_equal(decoded == 0, ~mask)
