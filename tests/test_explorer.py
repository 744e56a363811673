"""The sweep explorer in a real headless browser: Debian's chromium driven by chromedriver over the
W3C WebDriver HTTP protocol (urllib only). Every cell is a solid colour of its own, so the pixel at the
centre of the shown image in a screenshot says which cell the page shows.

Without chromium and chromedriver these tests skip, except under CI (CI=true), where they fail.
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from slideredit.evaluation import Sweep, SweepCell, read_sweep, write_sweep
from slideredit.explorer import page_data, write_explorer

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1200,900", "--force-device-scale-factor=1"]
KEYS = {"left": "\ue012", "up": "\ue013", "right": "\ue014", "down": "\ue015"}


def colour_of(index: int) -> tuple[int, int, int]:
    """Distinct, far-apart solid colours, one per cell (index 0..35)."""
    return (40 + 36 * (index % 6), 40 + 36 * (index // 6 % 6), 200 - 30 * (index % 4))


SOURCE_COLOUR = (10, 10, 10)


def make_sweep(folder: Path, grid: list[tuple[float, ...]], method: str, subprompts: list[str] | None = None,
               prompt: str = "make the square red",
               model: str = "tiny/kontext") -> dict[tuple[float, ...], tuple[int, int, int]]:
    """A sweep folder of 8x8 solid-colour PNGs; returns each cell's colour by alphas."""
    (folder / "cells").mkdir(parents=True)
    Image.new("RGB", (8, 8), SOURCE_COLOUR).save(folder / "source.png")
    cells, colours = [], {}
    for index, alphas in enumerate(grid):
        name = "cells/" + "_".join(f"{a:+.2f}" for a in alphas) + ".png"  # '+' in names, as infer.py writes
        Image.new("RGB", (8, 8), colour_of(index)).save(folder / name)
        cells.append(SweepCell(tuple(alphas), name))
        colours[tuple(alphas)] = colour_of(index)
    write_sweep(folder, Sweep("source.png", prompt, subprompts, 0, method, model, 4, 2.5, cells))
    return colours


# ---------------------------------------------------------------------------------------------------
# A WebDriver client in a few lines
# ---------------------------------------------------------------------------------------------------

class Browser:
    def __init__(self, url: str, session: str):
        self.base = f"{url}/session/{session}"

    def call(self, method: str, path: str, body: dict | None = None) -> object:
        request = urllib.request.Request(self.base + path, method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as err:
            raise AssertionError(f"WebDriver {method} {path}: {err.read().decode()[:500]}") from None

    def open(self, url: str) -> None:
        self.call("POST", "/url", {"url": url})

    def script(self, code: str, *args: object) -> object:
        return self.call("POST", "/execute/sync", {"script": code, "args": list(args)})

    def keys(self, *names: str) -> None:
        actions = [step for name in names for step in ({"type": "keyDown", "value": KEYS[name]},
                                                        {"type": "keyUp", "value": KEYS[name]})]
        self.call("POST", "/actions", {"actions": [{"type": "key", "id": "keyboard", "actions": actions}]})

    def pixel(self, css: str) -> tuple[int, int, int]:
        """The colour at the centre of an element, read from a screenshot once its image is decoded."""
        done = self.call("POST", "/execute/async", {"script": """
            const [css, callback] = arguments;
            const image = document.querySelector(css);
            image.decode().then(() => requestAnimationFrame(() => requestAnimationFrame(() => callback(true))),
                                error => callback(String(error)));""", "args": [css]})
        assert done is True, f"{css} did not load: {done}"
        x, y = self.script("const r = document.querySelector(arguments[0]).getBoundingClientRect();"
                           "return [r.left + r.width / 2, r.top + r.height / 2];", css)
        shot = Image.open(io.BytesIO(base64.b64decode(self.call("GET", "/screenshot")))).convert("RGB")
        return shot.getpixel((int(x), int(y)))

    def shown(self) -> tuple[tuple[int, int, int], list[str]]:
        """The colour of the shown cell and the alphas the URL fragment holds."""
        fragment = self.script("return location.hash;")
        return self.pixel("#cell"), fragment.removeprefix("#alphas=").split(",")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        message = ("the explorer tests need Debian's chromium and chromedriver (`apt-get install -y chromium "
                   f"chromium-driver`; .ci/run installs them): found chromium={chromium}, chromedriver={driver}")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    port = free_port()
    server = subprocess.Popen([driver, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):  # chromedriver listens within a second or two
            try:
                urllib.request.urlopen(url + "/status", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        profile = tmp_path_factory.mktemp("chromium-profile")
        options = {"binary": chromium, "args": [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]}
        request = urllib.request.Request(url + "/session", method="POST", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"capabilities": {"alwaysMatch": {
                                             "browserName": "chrome", "goog:chromeOptions": options}}}).encode())
        with urllib.request.urlopen(request, timeout=120) as response:
            session = json.loads(response.read())["value"]["sessionId"]
        browser = Browser(url, session)
        yield browser
        browser.call("DELETE", "")
    finally:
        server.terminate()
        server.wait(timeout=30)


# ---------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------

GRID = [(a, b) for a in (-1.0, 0.0, 1.0) for b in (-1.0, -0.5, 0.0, 0.5, 1.0)]


def test_sliders_show_the_cell_of_their_alphas(browser, tmp_path):
    colours = make_sweep(tmp_path, GRID, "stlora", ["make the square red", "make the circle larger"],
                         prompt="make the square red and make the circle larger")
    page = write_explorer(tmp_path)
    assert page == tmp_path / "index.html"
    browser.open(page.as_uri())
    assert browser.script("return document.getElementById('prompt').textContent;") == \
        "make the square red and make the circle larger"
    labels = browser.script("return [...document.querySelectorAll('.slider label')].map(l => l.textContent);")
    assert labels[0].startswith("slider 1: make the square red") and labels[1].startswith("slider 2: make the circle")
    assert browser.pixel("#source") == SOURCE_COLOUR
    assert browser.shown() == (colours[(0.0, 0.0)], ["0", "0"])  # opens on the base edit

    # Each slider moved by script to every swept position (the range input snaps to them).
    for first, a in enumerate((-1.0, 0.0, 1.0)):
        for second, b in enumerate((-1.0, -0.5, 0.0, 0.5, 1.0)):
            browser.script("""
                for (const [id, value] of [["slider-0", arguments[0]], ["slider-1", arguments[1]]]) {
                  const input = document.getElementById(id);
                  input.value = value;
                  input.dispatchEvent(new Event("input", {bubbles: true}));
                }""", first, second)
            colour, fragment = browser.shown()
            assert colour == colours[(a, b)], (a, b)
            assert [float(v) for v in fragment] == [a, b]


def test_keyboard_arrows_and_the_url_fragment(browser, tmp_path):
    colours = make_sweep(tmp_path, GRID, "stlora", ["make the square red", "make the circle larger"],
                         prompt="make the square red and make the circle larger")
    page = write_explorer(tmp_path)
    browser.open(page.as_uri() + "#alphas=0.5,-1")  # 0.5 is not swept for slider 1: the nearest is 0 (tie: lower)
    assert browser.shown() == (colours[(0.0, -1.0)], ["0", "-1"])
    browser.open(page.as_uri() + "#alphas=1,0.5")
    assert browser.shown() == (colours[(1.0, 0.5)], ["1", "0.5"])

    browser.script("document.getElementById('slider-1').focus();")  # the active slider is now the second
    browser.keys("left")
    assert browser.shown()[0] == colours[(1.0, 0.0)]
    browser.keys("left", "left", "left")  # stops at the end
    assert browser.shown()[0] == colours[(1.0, -1.0)]
    browser.keys("up", "left")  # the first slider becomes active, one step down
    assert browser.shown() == (colours[(0.0, -1.0)], ["0", "-1"])
    browser.keys("down", "right", "right")
    assert browser.shown()[0] == colours[(0.0, 0.0)]
    assert browser.script("return document.getElementById('slider-1').value;") == "2"


def test_one_slider_with_scores_and_a_sparse_sweep(browser, tmp_path):
    alphas = [1.0, -1.0, 0.0, 0.5]  # cells need not be in order
    colours = make_sweep(tmp_path / "g", [(a,) for a in alphas], "gstlora")
    scores = {"cells/+0.50.png": {"toy (make the square red)": 0.25, "dino": float("nan")}}
    page = write_explorer(tmp_path / "g", scores)
    browser.open(page.as_uri() + "#alphas=0.5")
    assert browser.shown() == (colours[(0.5,)], ["0.5"])
    rows = browser.script("return [...document.querySelectorAll('#scores tr')].map(r => r.innerText);")
    assert rows == ["toy (make the square red)\t0.2500", "dino\tn/a"]
    browser.keys("right")
    assert browser.shown() == (colours[(1.0,)], ["1"])
    assert browser.script("return document.querySelectorAll('#scores tr').length;") == 0  # no scores for this cell

    # eval.py's model mode: each slider alone. Moving slider 2 away from 0 while slider 1 is at -1 has
    # no exact cell: the page takes the nearest swept one, (0, b).
    star = [(-1.0, 0.0), (0.0, 0.0), (1.0, 0.0), (0.0, -1.0), (0.0, 1.0)]
    colours = make_sweep(tmp_path / "s", star, "stlora", ["a", "b"], prompt="a and b")
    browser.open(write_explorer(tmp_path / "s").as_uri() + "#alphas=-1,0")
    assert browser.shown()[0] == colours[(-1.0, 0.0)]
    browser.script("const i = document.getElementById('slider-1'); i.value = 2;"
                   "i.dispatchEvent(new Event('input', {bubbles: true}));")
    assert browser.shown() == (colours[(0.0, 1.0)], ["0", "1"])


def test_page_is_self_contained_and_checks_its_scores(tmp_path):
    make_sweep(tmp_path, [(-1.0,), (1.0,)], "gstlora", prompt="</script><b>bold</b>")
    html = write_explorer(tmp_path).read_text()
    assert "http://" not in html and "https://" not in html and "<link" not in html  # nothing fetched
    assert html.count("</script>") == 2 and "<\\/script>" in html  # the prompt cannot close the data block
    data = page_data(read_sweep(tmp_path))
    assert [s["alphas"] for s in data["sliders"]] == [[-1.0, 1.0]] and data["cells"][0]["image"] == "cells/-1.00.png"
    assert data["cells"][1]["image"] == "cells/%2B1.00.png"  # '+' quoted for the URL
    with pytest.raises(ValueError, match="not cells of the sweep"):
        write_explorer(tmp_path, {"cells/nope.png": {"clip": 1.0}})


def test_the_page_names_a_local_model_by_its_folder_name_only(tmp_path):
    """The page is made to be shared: it held the model's absolute path, a path of the maker's machine."""
    model = tmp_path / "models" / "toy-kontext"
    model.mkdir(parents=True)
    make_sweep(tmp_path / "sweep", [(-1.0,), (1.0,)], "gstlora", model=str(model))
    html = write_explorer(tmp_path / "sweep").read_text()
    assert str(tmp_path) not in html and page_data(read_sweep(tmp_path / "sweep"))["model"] == "toy-kontext"
    # an older sweep.json holding an absolute path, a model that did not move with the sweep, a hub id
    record = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    for recorded, shown in ((str(model), "toy-kontext"), ("../../gone/toy-kontext", "toy-kontext"),
                            ("black-forest-labs/FLUX.1-Kontext-dev", "black-forest-labs/FLUX.1-Kontext-dev")):
        (tmp_path / "sweep" / "sweep.json").write_text(json.dumps(record | {"model": recorded}))
        html = write_explorer(tmp_path / "sweep").read_text()
        assert str(tmp_path) not in html and page_data(read_sweep(tmp_path / "sweep"))["model"] == shown
