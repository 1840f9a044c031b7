"""The page's features (exp_ui.html) in a real headless Chromium, over experiments written by real exp runs.

Complements test_dashboard_browser.py (lists, one following log, one chart, a query, terminate): several log
panels and their layouts, \\r progress frames and ANSI colours, follow mode against the user's scrolling, log
search and download, the chart's x axis / smoothing / log scale / zoom / overlays, compare, what changed (with a
code diff from a dirty git checkout), file previews, copy paths and CSV export, theme and deep links that
survive a reload, the disconnected state, a narrow window and the keyboard.

One browser and one set of experiments per module.  The live parts (a log that grows, a metrics file that
grows) are written by the test itself into a finished experiment's files, which is what a running command
does, so every step waits for something definite instead of racing a child process.

Needs Debian's `chromium` and `chromium-driver` and the `selenium` package; where they cannot be had, these
tests skip and say why.
"""
from __future__ import annotations

import csv
import io
import json
import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from urllib.parse import parse_qs, urlsplit

import pytest

from browser_helpers import BROWSER_SKIPS, js_errors, new_browser, until
from conftest import EXP_PY, ROOT, call_with_timeout, child_env, posix_only, wait_for, write_script

import exp

try:
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
except ImportError:  # pragma: no cover - said by BROWSER_SKIPS
    pass

pytestmark = [
    posix_only,
    *BROWSER_SKIPS,
    pytest.mark.skipif(os.environ.get("EXP_PAGE_TESTS_ONCE") == "1",
                       reason="CI runs the page's feature tests with its newest Python only (EXP_PAGE_TESTS_ONCE=1)"),
    pytest.mark.skipif(shutil.which("git") is None, reason="git is needed for the code-diff fixture"),
]

ROWS = 50  # metrics rows of each "curve" experiment
SCALES = (1.0, 2.0, 3.0)  # their loss scale, one per experiment (lr 0.1, 0.01, 0.001)

JOB = r'''
import math, sys, time
import exp

mode = sys.argv[1]
e = exp.load_experiment()
if mode == "curve":
    scale = float(sys.argv[2])
    for i in range(50):
        acc = min(i, 30) / 50 - max(0, i - 30) / 100     # best (max) 0.6 at row 30, final 0.41
        noisy = 1.0 + (0.6 if i % 2 else -0.6)           # a zigzag that smoothing flattens
        e.upd_row(step=i * 10, epoch=i // 10, loss=scale / (i + 1), acc=acc, noisy=noisy,
                  decay=10 ** (-i / 10))                  # a straight line on a log scale
        e.save_row()
elif mode == "live":
    for i in range(int(sys.argv[2])):
        e.upd_row(step=i, loss=(i % 17) / 17 + i / 100); e.save_row()
elif mode == "same":
    e.upd_row(step=0, loss=float(sys.argv[2])); e.save_row()
elif mode == "logdemo":
    print("start of the demo")
    sys.stdout.write("progress 10%\rprogress 50%\rprogress 100%\n")
    print("\x1b[31mred\x1b[0m plain \x1b[1;32mboldgreen\x1b[0m after")
    print("\x1b[?25lcursor-hidden\x1b[K tail")
    for i in range(120):
        print(f"filler {i}")
    print("the needle-xyz is here")
    for i in range(120, 240):
        print(f"filler {i}")
elif mode == "kv":                      # one row: name=number, name=True/False, or s:name=text
    for kv in sys.argv[2:]:
        k, v = kv.split("=", 1)
        if k.startswith("s:"):
            e.upd_row(**{k[2:]: v})
        else:
            e.upd_row(**{k: {"True": True, "False": False}[v] if v in ("True", "False") else float(v)})
    e.save_row()
elif mode == "lines":
    for i in range(int(sys.argv[2])):
        print(f"line {i}")
else:
    print("ready")
'''

RED = (192, 38, 45)  # --a1 of the light theme: SGR 31


# ---------------------------------------------------------------------------------------------- fixtures


def png_2x2() -> bytes:
    """A valid 2x2 RGB PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + b"\xff\x00\x00" * 2 for _ in range(2))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Experiments written by real exp runs, and `exp see` (in-process) over them."""
    tmp = tmp_path_factory.mktemp("page")
    base = tmp / "results"
    work = tmp / "work"  # not a git checkout: no code.diff for the plain experiments
    work.mkdir()
    job = write_script(tmp, "job.py", JOB)
    py = sys.executable
    env = {"PYTHONPATH": ROOT, "PYTHONDONTWRITEBYTECODE": "1"}

    def run(name, *args, cwd=work, **kw):
        e = exp.Experiment(name=name, command=f"{py} {job} " + " ".join(map(str, args)), base_dir=base, cwd=cwd,
                           env=env, **kw)
        assert e.run() == 0, name
        return e.dir.path

    ids = {}
    ids["curves"] = [os.path.basename(run("curve", "curve", s, params={"lr": lr, "bs": 32}, tags=["sweep"]))
                     for s, lr in zip(SCALES, (0.1, 0.01, 0.001))]
    logdemo = run("logdemo", "logdemo", tags=["demo"])
    ids["logdemo"] = os.path.basename(logdemo)
    ids["follow"] = os.path.basename(run("follow", "lines", 300))
    ids["chunks"] = os.path.basename(run("chunks", "ready"))
    ids["live"] = os.path.basename(run("live", "live", 100))

    # Files to preview, next to the experiment's own.
    d = pathlib.Path(logdemo)
    (d / "notes.txt").write_text("hello notes\nsecond line\n", encoding="utf-8")
    (d / "table.csv").write_text('a,b\n1,x\n2,"y, z"\n', encoding="utf-8")
    (d / "data.json").write_text('{"b":[1,2],"a":{"c":true}}', encoding="utf-8")
    (d / "pic.png").write_bytes(png_2x2())
    (d / "blob.bin").write_bytes(bytes(range(256)) * 4)

    # "What changed": two runs of the same name from a dirty git checkout, with other params and command.
    repo = tmp / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    (repo / "train.py").write_text("lr = 0.1\nepochs = 3\n", encoding="utf-8")
    subprocess.run([*git, "add", "train.py"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=repo, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, check=True, capture_output=True,
                          text=True).stdout.strip()
    (repo / "train.py").write_text("lr = 0.1\nepochs = 4\n", encoding="utf-8")
    exp._GIT_CACHE.clear()
    exp._DIFF_CACHE.clear()
    same1 = run("same", "same", 0.5, cwd=repo, params={"lr": 0.1, "bs": 32})
    (repo / "train.py").write_text("lr = 0.2\nepochs = 4\n", encoding="utf-8")
    exp._GIT_CACHE.clear()
    exp._DIFF_CACHE.clear()
    same2 = run("same", "same", 0.25, cwd=repo, params={"lr": 0.2, "bs": 32, "wd": 0.01})
    exp._GIT_CACHE.clear()
    exp._DIFF_CACHE.clear()
    assert os.path.isfile(os.path.join(same2, "code.diff")), "exp saved no code.diff for a dirty checkout"
    ids["same"] = [os.path.basename(same1), os.path.basename(same2)]

    srv = exp.DashboardServer(base, port=0).start()
    try:
        yield {"base": base, "url": srv.url, "ids": ids, "head": head, "run": run,
               "work": {k: base / v for k, v in ids.items() if isinstance(v, str)}}  # experiment directories
    finally:
        srv.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    downloads = tmp_path_factory.mktemp("downloads")
    driver = new_browser("--force-device-scale-factor=1", prefs={
        "download.default_directory": str(downloads), "download.prompt_for_download": False})
    yield driver
    driver.quit()


@pytest.fixture(autouse=True)
def _fresh_console(browser):
    """Each test judges only its own console messages, in a window of the usual size."""
    browser.get_log("browser")
    yield
    try:
        size = browser.get_window_size()
        if (size["width"], size["height"]) != (1280, 720):
            browser.set_window_size(1280, 720)
    except WebDriverException:
        pass


# ----------------------------------------------------------------------------------------------- helpers


def open_page(driver, url: str, fragment: str = "") -> None:
    """A full load of the page (not just a hash change of the page already shown)."""
    driver.get("about:blank")
    driver.get(url + fragment)
    wait_for(lambda: driver.execute_script("return document.readyState") == "complete", what="the page to load")


def visible(driver, css: str) -> list:
    return [e for e in driver.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()]


def press(driver, el) -> None:
    """Click like a user who first scrolls the control to the middle of the window (clear of the sticky bar)."""
    driver.execute_script("arguments[0].scrollIntoView({block: 'center', inline: 'nearest'})", el)
    el.click()


def view_shown(driver, name: str) -> bool:
    return driver.execute_script("const s = document.getElementById('view-' + arguments[0]);"
                                 "return !!s && !s.hidden;", name)


def panel(driver, exp_id: str):
    found = [p for p in driver.find_elements(By.CSS_SELECTOR, "#log-panels .log-panel")
             if p.get_attribute("data-id") == exp_id]
    return found[0] if found else None


def log_lines(driver, exp_id: str) -> list[str]:
    """The text of each line element of a panel (one child of .log-text per line)."""
    p = panel(driver, exp_id)
    if p is None:
        return []
    return driver.execute_script("return Array.from(arguments[0].querySelector('.log-text').children)"
                                 ".map((d) => d.textContent);", p)


def append(path, text: str) -> None:
    """What a running command does: append bytes to its log or metrics file."""
    with open(path, "ab") as f:
        f.write(text.encode())


def chart(driver, metric: str, root: str = "#view-metrics"):
    for box in driver.find_elements(By.CSS_SELECTOR, f"{root} .chart-box"):
        if box.get_attribute("data-metric") == metric:
            return box
    return None


def canvas_of(box):
    return box.find_element(By.CSS_SELECTOR, "canvas.chart")


def drawn(driver, metric: str, points: int, series: int = 1, root: str = "#view-metrics"):
    """The chart of ``metric`` once it has drawn exactly ``points`` points in ``series`` series."""
    def ready():
        box = chart(driver, metric, root)
        if box is None:
            return None
        c = canvas_of(box)
        if c.get_attribute("data-points") == str(points) and c.get_attribute("data-series") == str(series):
            return box
        return None
    return until(ready, timeout=20, what=f"the {metric} chart with {points} points in {series} series")


PIXELS_JS = """
const c = arguments[0], rgb = arguments[1];
const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let hash = 2166136261 >>> 0, painted = 0, faint = 0, strong = 0;
const dpr = c.width / (c.clientWidth || c.width);
const ys = [];  // rows of the series' strong pixels in the middle column of the plot (60 px left, 10 px right)
const mid = Math.round((60 + (c.clientWidth - 70) / 2) * dpr);
for (let i = 0; i < d.length; i += 4) {
  hash = Math.imul(hash ^ d[i] ^ (d[i + 1] << 8) ^ (d[i + 2] << 16) ^ (d[i + 3] << 24), 16777619) >>> 0;
  if (!d[i + 3]) continue;
  painted++;
  if (rgb && Math.abs(d[i] - rgb[0]) + Math.abs(d[i + 1] - rgb[1]) + Math.abs(d[i + 2] - rgb[2]) < 60) {
    if (d[i + 3] >= 200) {
      strong++;
      const p = i / 4;
      if (Math.abs(p % c.width - mid) <= 1) ys.push(Math.floor(p / c.width));
    }
    else if (d[i + 3] >= 25 && d[i + 3] <= 110) faint++;
  }
}
ys.sort((a, b) => a - b);
return {hash, painted, faint, strong, midY: ys.length ? ys[ys.length >> 1] / c.height : null, w: c.width, h: c.height};
"""
SERIES0 = (0x2f, 0x6f, 0xde)  # the first colour of the page's palette


def pixels(driver, canvas, rgb=SERIES0) -> dict:
    return driver.execute_script(PIXELS_JS, canvas, list(rgb) if rgb else None)


def settled_pixels(driver, canvas, rgb=SERIES0) -> dict:
    """Pixels once two reads a frame apart agree (the page draws in requestAnimationFrame)."""
    last = {}

    def same():
        driver.execute_async_script("requestAnimationFrame(() => requestAnimationFrame(arguments[0]));")
        now = pixels(driver, canvas, rgb)
        ok = now["hash"] == last.get("hash")
        last.update(now)
        return ok
    until(same, timeout=10, what="the chart to settle")
    return dict(last)


def hover_tip(driver, box, frac: float) -> str:
    """Move the mouse over the plot at ``frac`` of its width; the tooltip's text."""
    c = canvas_of(box)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", c)
    w, hgt = c.size["width"], c.size["height"]
    x = 60 + (w - 70) * frac  # the page's plot area: 60 px on the left, 10 on the right
    ActionChains(driver).move_to_element_with_offset(c, int(x - w / 2), int(-hgt / 4)).perform()
    tip = box.find_element(By.CSS_SELECTOR, ".chart-tip")
    until(lambda: tip.is_displayed() and tip.text.strip(), timeout=5, what="the chart's tooltip")
    return tip.text


def query_rows(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "#query-results tbody tr[data-id]")


def run_query(driver, name_re: str) -> list[str]:
    box = until(lambda: visible(driver, "#q-name"), what="the query form")[0]
    box.clear()
    box.send_keys(name_re)
    driver.find_element(By.ID, "q-submit").click()
    return until(lambda: [r.get_attribute("data-id") for r in query_rows(driver)]
                 if all(r.get_attribute("data-id").startswith(name_re.strip("^$")) for r in query_rows(driver))
                 and query_rows(driver) else None, what=f"the rows of {name_re}")


# ------------------------------------------------------------------------------------------------- logs


def test_several_log_panels_at_once_and_the_column_layouts(browser, data):
    ids = [data["ids"]["logdemo"], data["ids"]["follow"], data["ids"]["chunks"]]
    open_page(browser, data["url"], "#view=logs")
    until(lambda: view_shown(browser, "logs"), what="the logs view")
    box = browser.find_element(By.ID, "log-open-id")
    for i in ids:  # opened one after the other with the page's own "Open log" box
        box.send_keys(i)
        browser.find_element(By.ID, "log-open-btn").click()
        until(lambda i=i: panel(browser, i), what=f"the panel of {i}")
    until(lambda: all(any(ln.strip() for ln in log_lines(browser, i)) for i in ids), what="all three logs")
    assert [p.get_attribute("data-id") for p in browser.find_elements(By.CSS_SELECTOR, "#log-panels .log-panel")] == ids

    def layout():
        return browser.execute_script("""
            const box = document.getElementById('log-panels');
            const cols = getComputedStyle(box).gridTemplateColumns.split(' ').filter(Boolean).length;
            const ps = Array.from(box.querySelectorAll('.log-panel')).map((p) => p.getBoundingClientRect());
            return {cols, width: box.clientWidth, widths: ps.map((r) => r.width),
                    tops: ps.map((r) => Math.round(r.top))};
        """)

    for n in (1, 4, 2):
        press(browser, browser.find_element(By.CSS_SELECTOR, f'[data-cols="{n}"]'))
        lay = until(lambda n=n: (lambda l: l if l["cols"] == n else None)(layout()), timeout=5,
                    what=f"a {n}-column grid")
        for w in lay["widths"]:  # each panel takes one column of the grid
            assert abs(w - (lay["width"] - 12 * (n - 1)) / n) < 3, (n, lay)
        per_row = min(n, len(ids))
        assert len(set(lay["tops"][:per_row])) == 1, ("panels of one row side by side", n, lay)
        if n < len(ids):
            assert lay["tops"][n] > lay["tops"][0], ("the next row below", n, lay)
        assert browser.find_element(By.CSS_SELECTOR, f'[data-cols="{n}"]').get_attribute("aria-pressed") == "true"
    # The open panels and the layout are in the URL: a reload brings them back.
    press(browser, browser.find_element(By.CSS_SELECTOR, '[data-cols="4"]'))
    until(lambda: "cols=4" in browser.execute_script("return location.hash"), timeout=5, what="cols in the hash")
    browser.refresh()
    until(lambda: [p.get_attribute("data-id") for p in browser.find_elements(By.CSS_SELECTOR, "#log-panels .log-panel")]
          == ids, what="the panels after a reload")
    assert until(lambda: layout()["cols"] == 4, timeout=5, what="the 4-column layout after a reload")
    # Closing one closes just that one.
    press(browser, panel(browser, ids[1]).find_element(By.CSS_SELECTOR, ".log-close"))
    until(lambda: panel(browser, ids[1]) is None, timeout=5, what="the closed panel to go")
    assert panel(browser, ids[0]) is not None and panel(browser, ids[2]) is not None
    assert js_errors(browser) == []


def test_progress_frames_collapse_and_ansi_colours_render(browser, data):
    lid = data["ids"]["logdemo"]
    open_page(browser, data["url"], f"#view=logs&logs={lid}")
    lines = until(lambda: (lambda ls: ls if any("filler 239" in x for x in ls) else None)(log_lines(browser, lid)),
                  what="the demo log")
    # "progress 10%\rprogress 50%\rprogress 100%" shows as its last frame only.
    assert [x for x in lines if "progress" in x] == ["progress 100%"]
    assert "red plain boldgreen after" in lines
    assert "cursor-hidden tail" in lines  # other escape sequences are stripped
    text = panel(browser, lid).find_element(By.CSS_SELECTOR, ".log-text")
    raw = browser.execute_script("return arguments[0].textContent", text)
    assert "\x1b" not in raw and "[31m" not in raw and "[0m" not in raw and "\r" not in raw
    red = browser.execute_script("""
        const spans = Array.from(arguments[0].querySelectorAll('span')).filter((s) => s.textContent === 'red');
        return spans.map((s) => ({cls: s.className, color: getComputedStyle(s).color,
                                  plain: getComputedStyle(s.parentElement).color}));""", text)
    assert len(red) == 1, red
    assert red[0]["color"] == "rgb(%d, %d, %d)" % RED and red[0]["color"] != red[0]["plain"], red
    bold = browser.execute_script("""
        const s = Array.from(arguments[0].querySelectorAll('span')).find((s) => s.textContent === 'boldgreen');
        return s ? {weight: getComputedStyle(s).fontWeight, color: getComputedStyle(s).color} : null;""", text)
    assert bold and int(bold["weight"]) >= 600 and bold["color"] != red[0]["plain"], bold
    # "plain" after the reset has no colour of its own.
    plain_styled = browser.execute_script("""
        return Array.from(arguments[0].querySelectorAll('span')).filter((s) => s.textContent.includes('plain')).length;
    """, text)
    assert plain_styled == 0
    assert js_errors(browser) == []


def test_progress_frames_split_across_chunks_while_following(browser, data):
    cid = data["ids"]["chunks"]
    log = data["work"]["chunks"] / "terminal_logs" / "run_0001.log"
    open_page(browser, data["url"], f"#view=logs&logs={cid}")
    until(lambda: "ready" in log_lines(browser, cid), what="the chunks log")

    def frames():
        return [x for x in log_lines(browser, cid) if x.startswith("step ")]

    append(log, "step 1/3\r")
    until(lambda: frames() == ["step 1/3"], what="the first frame")
    append(log, "step 2/3\r")
    until(lambda: frames() == ["step 2/3"], what="the second frame to replace the first")
    # The last frame ends the line; the next chunk ends in the middle of a frame.
    append(log, "step 3/3\ndone\ndl 10%\rdl 2")
    until(lambda: "dl 2" in log_lines(browser, cid), what="the line after the frames and a cut frame")
    assert frames() == ["step 3/3"]
    assert "done" in log_lines(browser, cid) and "dl 10%" not in log_lines(browser, cid)
    append(log, "0%\rdl 30%\nend\n")
    until(lambda: "end" in log_lines(browser, cid), what="the rest of the cut frame")
    lines = log_lines(browser, cid)
    assert [x for x in lines if x.startswith("dl ")] == ["dl 30%"], lines
    assert lines[-2:] == ["dl 30%", "end"]
    assert js_errors(browser) == []


def test_follow_mode_yields_to_the_users_scrolling(browser, data):
    fid = data["ids"]["follow"]
    log = data["work"]["follow"] / "terminal_logs" / "run_0001.log"
    open_page(browser, data["url"], f"#view=logs&logs={fid}")
    until(lambda: "line 299" in log_lines(browser, fid), what="the follow log")
    p = panel(browser, fid)
    text = p.find_element(By.CSS_SELECTOR, ".log-text")
    follow = p.find_element(By.CSS_SELECTOR, ".log-follow")

    def gap():  # pixels below the visible part
        return browser.execute_script(
            "const t = arguments[0]; return t.scrollHeight - t.scrollTop - t.clientHeight;", text)

    assert follow.is_selected()
    until(lambda: gap() < 24, timeout=5, what="the panel to start at the end")
    # The user scrolls up (mouse wheel): follow turns off and new lines leave the view alone.
    ActionChains(browser).scroll_from_origin(ScrollOrigin.from_element(text), 0, -1500).perform()
    until(lambda: not follow.is_selected(), timeout=5, what="follow to turn off when scrolled up")
    top = browser.execute_script("return arguments[0].scrollTop", text)
    assert gap() > 200
    append(log, "".join(f"extra {i}\n" for i in range(30)))
    until(lambda: "extra 29" in log_lines(browser, fid), what="the new lines")
    assert abs(browser.execute_script("return arguments[0].scrollTop", text) - top) < 2, "the view was yanked down"
    assert not follow.is_selected()
    # Back at the end, following resumes.
    ActionChains(browser).scroll_from_origin(ScrollOrigin.from_element(text), 0, 100000).perform()
    until(lambda: follow.is_selected(), timeout=5, what="follow to resume at the end")
    append(log, "".join(f"more {i}\n" for i in range(30)))
    until(lambda: "more 29" in log_lines(browser, fid), what="more lines")
    until(lambda: gap() < 24, timeout=5, what="the panel to follow the new lines")
    assert js_errors(browser) == []


def test_log_search_highlights_and_filters_and_the_download_link(browser, data):
    lid = data["ids"]["logdemo"]
    open_page(browser, data["url"], f"#view=logs&logs={lid}")
    until(lambda: any("filler 239" in x for x in log_lines(browser, lid)), what="the demo log")
    p = panel(browser, lid)
    p.find_element(By.CSS_SELECTOR, ".log-search").send_keys("NEEDLE-xyz")
    marks = until(lambda: p.find_elements(By.CSS_SELECTOR, ".log-text mark"), timeout=5, what="a highlighted match")
    assert [m.text for m in marks] == ["needle-xyz"]  # case-insensitive, the log's own spelling
    assert marks[0].find_element(By.XPATH, "./ancestor::div[1]").text == "the needle-xyz is here"
    assert "1 matching line" in p.find_element(By.CSS_SELECTOR, ".log-info").text
    p.find_element(By.CSS_SELECTOR, ".log-filter").click()
    shown = until(lambda: (lambda v: v if len(v) == 1 else None)(browser.execute_script(
        "return Array.from(arguments[0].querySelector('.log-text').children)"
        ".filter((d) => d.offsetParent !== null).map((d) => d.textContent);", p)), timeout=5,
        what="only the matching line")
    assert shown == ["the needle-xyz is here"]
    href = p.find_element(By.CSS_SELECTOR, "a.log-download").get_attribute("href")
    u = urlsplit(href)
    q = parse_qs(u.query)
    assert u.path == "/api/raw" and q["id"] == [lid] and q["path"] == ["terminal_logs/run_0001.log"] \
        and q["download"] == ["1"], href
    assert js_errors(browser) == []


# ----------------------------------------------------------------------------------------------- charts


def test_chart_x_axis_smoothing_and_log_scale(browser, data):
    cid = data["ids"]["curves"][0]
    open_page(browser, data["url"], f"#view=metrics&m={cid}")
    box = drawn(browser, "loss", ROWS)
    # x = step (0, 10, ... 490): the right end of the plot reads a step near 490.
    tip = hover_tip(browser, box, 0.98)
    assert tip.startswith("step = "), tip
    assert int(float(tip.split("\n")[0].split("= ")[1])) >= 450, tip
    before = settled_pixels(browser, canvas_of(box))
    xsel = browser.find_element(By.CSS_SELECTOR, "#view-metrics select.x-pick")
    xsel.find_element(By.CSS_SELECTOR, 'option[value="epoch"]').click()
    until(lambda: browser.execute_script("return arguments[0].value", xsel) == "epoch", timeout=5, what="x = epoch")
    tip = hover_tip(browser, box, 0.98)
    assert tip.startswith("epoch = "), tip
    assert float(tip.split("\n")[0].split("= ")[1]) <= 4, tip
    after = settled_pixels(browser, canvas_of(box))
    assert after["hash"] != before["hash"], "choosing another x column did not redraw the chart"
    assert canvas_of(box).get_attribute("data-points") == str(ROWS)
    xsel.find_element(By.CSS_SELECTOR, 'option[value="step"]').click()
    until(lambda: browser.execute_script("return arguments[0].value", xsel) == "step", timeout=5, what="x = step")

    # Smoothing: the zigzag gets a smooth line over a faint copy of the raw one.
    noisy = drawn(browser, "noisy", ROWS)
    raw = settled_pixels(browser, canvas_of(noisy))
    slider = browser.find_element(By.CSS_SELECTOR, "#view-metrics input.smooth")
    press(browser, slider)
    slider.send_keys(Keys.END)  # the keyboard's way to the maximum (0.99)
    until(lambda: float(browser.execute_script("return arguments[0].value", slider)) > 0.9, timeout=5,
          what="the smoothing slider to move")
    until(lambda: settled_pixels(browser, canvas_of(noisy))["hash"] != raw["hash"], timeout=5,
          what="the smoothed chart")
    smooth = settled_pixels(browser, canvas_of(noisy))
    assert canvas_of(noisy).get_attribute("data-points") == str(ROWS)
    assert canvas_of(noisy).get_attribute("data-series") == "1"
    # Unsmoothed, the zigzag is drawn at full strength (faint pixels are only its anti-aliased edges).  Smoothed,
    # most of the series' pixels are faint: the raw zigzag is still drawn behind the short, strong smooth line.
    assert raw["faint"] < raw["strong"], raw
    assert smooth["faint"] > 4 * smooth["strong"] and smooth["faint"] > raw["faint"], (raw, smooth)
    assert smooth["strong"] < raw["strong"] / 3, (raw, smooth)
    assert "(raw " in hover_tip(browser, noisy, 0.5)  # the tooltip shows both values
    slider.send_keys(Keys.HOME)
    until(lambda: settled_pixels(browser, canvas_of(noisy))["hash"] == raw["hash"], timeout=5,
          what="smoothing 0 to give back the raw drawing")

    # Log scale: 10^(-i/10) hugs the bottom on a linear axis and is a diagonal on a log axis.
    decay = drawn(browser, "decay", ROWS)
    lin = settled_pixels(browser, canvas_of(decay))
    press(browser, browser.find_element(By.CSS_SELECTOR, "#view-metrics input.log-scale"))
    until(lambda: settled_pixels(browser, canvas_of(decay))["hash"] != lin["hash"], timeout=5,
          what="the log-scale drawing")
    log = settled_pixels(browser, canvas_of(decay))
    assert lin["midY"] is not None and log["midY"] is not None, (lin, log)
    assert lin["midY"] > 0.8, lin          # linear: the middle of the x range is near the bottom
    assert 0.3 < log["midY"] < 0.7, log    # log: it is half way down
    # The options are in the URL.
    h = until(lambda: (lambda x: x if "logy=1" in x else None)(browser.execute_script("return location.hash")),
              timeout=5, what="the log scale in the URL")
    assert f"m={cid}" in h, h
    assert js_errors(browser) == []


def test_zoom_survives_a_live_update_and_double_click_resets_it(browser, data):
    lid = data["ids"]["live"]
    csv_path = data["work"]["live"] / "metrics" / "run_0001.csv"
    header = csv_path.read_text(encoding="utf-8").splitlines()[0].split(",")
    assert header == ["step", "loss"], header
    open_page(browser, data["url"], f"#view=metrics&m={lid}")
    box = drawn(browser, "loss", 100)
    c = canvas_of(box)
    full = settled_pixels(browser, c)
    reset = box.find_element(By.XPATH, ".//button[normalize-space()='reset zoom']")
    assert not reset.is_displayed()
    w = c.size["width"]
    a, b = 60 + (w - 70) * 0.2, 60 + (w - 70) * 0.5  # steps ~20..50
    ActionChains(browser).move_to_element_with_offset(c, int(a - w / 2), 0).click_and_hold() \
        .move_by_offset(int(b - a) // 2, 0).move_by_offset(int(b - a) - int(b - a) // 2, 0).release().perform()
    until(lambda: reset.is_displayed(), timeout=5, what="the zoom (its reset button)")
    zoomed = settled_pixels(browser, c)
    assert zoomed["hash"] != full["hash"], "the drag did not zoom"
    # New rows arrive (outside the zoomed range): the chart takes them and keeps the zoom.
    append(csv_path, "".join(f"{i},{(i % 17) / 17 + i / 100}\n" for i in range(100, 140)))
    until(lambda: c.get_attribute("data-points") == "140", timeout=20, what="the live update")
    ActionChains(browser).move_to_element_with_offset(c, 0, -c.size["height"] // 2 + 2).perform()
    after = settled_pixels(browser, c)
    assert reset.is_displayed(), "a live update reset the zoom"
    assert after["hash"] == zoomed["hash"], "a live update changed the zoomed drawing (the range moved)"
    # Double-click: the whole range again, with the new rows.
    ActionChains(browser).double_click(c).perform()
    until(lambda: not reset.is_displayed(), timeout=5, what="the zoom to reset")
    unzoomed = settled_pixels(browser, c)
    assert unzoomed["hash"] not in (zoomed["hash"], full["hash"]), "the reset view is not the whole, grown range"
    assert js_errors(browser) == []


def test_several_experiments_overlaid(browser, data):
    ids = data["ids"]["curves"]
    open_page(browser, data["url"], "#view=metrics&m=" + ",".join(ids[:2]))
    box = drawn(browser, "loss", 2 * ROWS, series=2)
    legend = box.find_element(By.CSS_SELECTOR, ".chart-legend").text
    assert legend.count("curve") == 2, legend  # same name: told apart by their timestamps
    # A third one added with the page's own "add experiment id" box.
    inp = browser.find_element(By.CSS_SELECTOR, '#view-metrics input[placeholder="add experiment id"]')
    inp.send_keys(ids[2])
    inp.send_keys(Keys.ENTER)
    box = drawn(browser, "loss", 3 * ROWS, series=3)
    chips = [s.get_attribute("data-id") for s in browser.find_elements(By.CSS_SELECTOR, "#view-metrics .src-chip")]
    assert chips == ids
    # Removing one leaves two.
    browser.find_elements(By.CSS_SELECTOR, "#view-metrics .src-chip")[0].find_element(By.CSS_SELECTOR, "button").click()
    drawn(browser, "loss", 2 * ROWS, series=2)
    assert js_errors(browser) == []


# ------------------------------------------------------------------------------------ query, compare, export


def test_compare_selected_experiments(browser, data):
    ids = data["ids"]["curves"]
    open_page(browser, data["url"], "#view=query")
    assert sorted(run_query(browser, "^curve$")) == sorted(ids)
    for r in query_rows(browser):
        r.find_element(By.CSS_SELECTOR, "input.row-select").click()
    until(lambda: "3 selected" in browser.find_element(By.ID, "query-selected").text, timeout=5, what="3 selected")
    browser.find_element(By.ID, "compare-btn").click()
    until(lambda: view_shown(browser, "compare"), timeout=5, what="the compare view")
    table = browser.find_element(By.ID, "compare-table")

    def row(attr, value):
        for tr in table.find_elements(By.CSS_SELECTOR, f"tbody tr[data-{attr}]"):
            if tr.get_attribute(f"data-{attr}") == value:
                return tr
        return None

    lr = until(lambda: row("param", "lr"), what="the params in the compare table")
    order = [a.get_attribute("title") for a in table.find_elements(By.CSS_SELECTOR, "thead th a")]
    assert sorted(order) == sorted(ids)
    by_id = {i: (s, lr_) for i, s, lr_ in zip(ids, SCALES, (0.1, 0.01, 0.001))}
    assert "diff" in lr.get_attribute("class").split()
    assert [td.text for td in lr.find_elements(By.TAG_NAME, "td")] == [str(by_id[i][1]) for i in order]
    bs = row("param", "bs")
    assert "diff" not in bs.get_attribute("class").split()
    assert [td.text for td in bs.find_elements(By.TAG_NAME, "td")] == ["32"] * 3
    # Final and best of each metric.
    loss_rows = [tr for tr in table.find_elements(By.CSS_SELECTOR, "tbody tr[data-metric]")
                 if tr.get_attribute("data-metric") == "loss"]
    acc_rows = [tr for tr in table.find_elements(By.CSS_SELECTOR, "tbody tr[data-metric]")
                if tr.get_attribute("data-metric") == "acc"]
    assert len(loss_rows) == 2 and len(acc_rows) == 2
    final, best = ({tr.find_element(By.TAG_NAME, "th").text.split(" ")[2]: tr for tr in loss_rows}[k]
                   for k in ("final", "best"))
    expect = [f"{by_id[i][0] / ROWS:g}" for i in order]
    assert [td.text for td in final.find_elements(By.TAG_NAME, "td")] == expect
    assert [td.text for td in best.find_elements(By.TAG_NAME, "td")] == expect  # loss: min, the last row here
    assert "diff" in final.get_attribute("class").split()
    acc = {tr.find_element(By.TAG_NAME, "th").text.split(" ")[2]: tr for tr in acc_rows}
    assert [td.text for td in acc["final"].find_elements(By.TAG_NAME, "td")] == ["0.41"] * 3
    assert [td.text for td in acc["best"].find_elements(By.TAG_NAME, "td")] == ["0.6"] * 3  # acc: max, not the last
    assert "diff" not in acc["final"].get_attribute("class").split()
    # The best of the three is marked.
    best_cells = [td.text for td in final.find_elements(By.CSS_SELECTOR, "td.best")]
    assert best_cells == [f"{min(SCALES) / ROWS:g}"]
    # The overlaid chart below has one series per experiment.
    drawn(browser, "loss", 3 * ROWS, series=3, root="#compare-charts")
    assert js_errors(browser) == []


def test_copy_paths_and_export_csv_of_the_selected_rows(browser, data):
    ids = data["ids"]["curves"]
    open_page(browser, data["url"], "#view=query")
    run_query(browser, "^curve$")
    chosen = []
    for r in query_rows(browser)[:2]:
        r.find_element(By.CSS_SELECTOR, "input.row-select").click()
        chosen.append(r.get_attribute("data-id"))
    until(lambda: "2 selected" in browser.find_element(By.ID, "query-selected").text, timeout=5, what="2 selected")
    # Catch what leaves the page: the clipboard (or its textarea fallback) and the CSV blob.
    browser.execute_script("""
        window.__copied = null; window.__blobs = []; window.__downloads = [];
        const clip = {writeText: async (t) => { window.__copied = t; }};
        try { Object.defineProperty(navigator, 'clipboard', {value: clip, configurable: true}); } catch (e) {}
        const exec = document.execCommand.bind(document);
        document.execCommand = (cmd, ...rest) => {
            if (cmd !== 'copy') return exec(cmd, ...rest);
            const a = document.activeElement;
            window.__copied = a && 'value' in a ? a.value : String(getSelection());
            return true;
        };
        const create = URL.createObjectURL.bind(URL);
        URL.createObjectURL = (b) => { window.__blobs.push(b); return create(b); };
        HTMLAnchorElement.prototype.click = function () { window.__downloads.push(this.getAttribute('download')); };
    """)
    browser.find_element(By.ID, "copy-paths").click()
    copied = until(lambda: browser.execute_script("return window.__copied"), timeout=5, what="the copied paths")
    assert copied.split("\n") == [str(data["base"] / i) for i in chosen]
    browser.find_element(By.ID, "export-csv").click()
    text = until(lambda: browser.execute_async_script(
        "const done = arguments[0]; const b = window.__blobs[0]; if (!b) { done(null); return; }"
        "b.text().then((t) => done({text: t, type: b.type}));"), timeout=5, what="the exported CSV blob")
    assert text["type"].startswith("text/csv"), text["type"]
    assert browser.execute_script("return window.__downloads") == ["experiments.csv"]
    rows = list(csv.DictReader(io.StringIO(text["text"])))
    assert [r["id"] for r in rows] == chosen
    expect = {i: (s, lr) for i, s, lr in zip(ids, SCALES, (0.1, 0.01, 0.001))}
    for r in rows:
        assert r["name"] == "curve" and r["status"] == "finished" and r["tags"] == "sweep"
        assert float(r["param:lr"]) == expect[r["id"]][1] and r["param:bs"] == "32"
        assert float(r["metric:loss"]) == pytest.approx(expect[r["id"]][0] / ROWS)
        assert r["work_dir"] == str(data["base"] / r["id"])
    assert js_errors(browser) == []


# -------------------------------------------------------------------------------- experiment detail view


def test_what_changed_since_the_previous_experiment_of_the_same_name(browser, data):
    first, second = data["ids"]["same"]
    open_page(browser, data["url"], f"#view=exp&id={second}")
    box = browser.find_element(By.ID, "exp-changes")
    until(lambda: box.find_elements(By.CSS_SELECTOR, "pre.diff span.add"), what="the changes and the code diff")
    assert first in box.text  # compared with the earlier "same"
    params = {tr.find_elements(By.TAG_NAME, "td")[0].text: [td.text for td in tr.find_elements(By.TAG_NAME, "td")[1:]]
              for tr in box.find_elements(By.CSS_SELECTOR, "table.changes-params tbody tr")}
    assert params == {"lr": ["0.1", "0.2"], "wd": ["—", "0.01"]}, params
    assert all("diff" in tr.get_attribute("class").split()
               for tr in box.find_elements(By.CSS_SELECTOR, "table.changes-params tbody tr"))
    command = [s.text for s in box.find_elements(By.CSS_SELECTOR, "pre.diff")[0].find_elements(By.TAG_NAME, "span")]
    assert command[0].startswith("- ") and command[0].endswith("same 0.5"), command
    assert command[1].startswith("+ ") and command[1].endswith("same 0.25"), command
    metric = [tr for tr in box.find_elements(By.CSS_SELECTOR, "table tbody tr")
              if tr.find_elements(By.TAG_NAME, "td") and tr.find_elements(By.TAG_NAME, "td")[0].text == "loss"]
    assert len(metric) == 1
    cells = metric[0].find_elements(By.TAG_NAME, "td")
    assert [c.text for c in cells] == ["loss", "0.5", "0.25", "-0.25"]
    assert "delta-better" in cells[3].get_attribute("class").split()  # lower loss is better
    # Both ran on the same commit, with uncommitted changes.
    git = [b for b in box.find_elements(By.CSS_SELECTOR, ".changes-block")
           if b.find_element(By.TAG_NAME, "h3").text == "Git"]
    assert len(git) == 1 and data["head"][:12] in git[0].text and "dirty" in git[0].text, git and git[0].text
    # The code diff, with coloured + and - lines.
    diff = box.find_elements(By.CSS_SELECTOR, "pre.diff")[-1]
    adds = [s.text for s in diff.find_elements(By.CSS_SELECTOR, "span.add")]
    dels = [s.text for s in diff.find_elements(By.CSS_SELECTOR, "span.del")]
    assert "+lr = 0.2" in adds and "+epochs = 4" in adds, adds
    assert "-lr = 0.1" in dels and "-epochs = 3" in dels, dels
    assert any(s.text.startswith("@@") for s in diff.find_elements(By.CSS_SELECTOR, "span.hunk"))
    colours = browser.execute_script("""
        const d = arguments[0];
        const c = (sel) => getComputedStyle(d.querySelector(sel)).backgroundColor;
        return [c('span.add'), c('span.del'), getComputedStyle(d).backgroundColor];""", diff)
    assert len(set(colours)) == 3, colours
    # The first "same" has nothing before it; its own diff has only the epochs change.
    open_page(browser, data["url"], f"#view=exp&id={first}")
    box = browser.find_element(By.ID, "exp-changes")
    until(lambda: box.find_elements(By.CSS_SELECTOR, "pre.diff span.add"), what="the first one's changes")
    assert "No earlier experiment" in box.text
    adds = [s.text for s in box.find_elements(By.CSS_SELECTOR, "pre.diff span.add")]
    assert "+epochs = 4" in adds and "+lr = 0.2" not in adds, adds
    assert js_errors(browser) == []


def test_file_tree_and_previews(browser, data):
    lid = data["ids"]["logdemo"]
    open_page(browser, data["url"], f"#view=exp&id={lid}")
    tree = browser.find_element(By.ID, "exp-files")
    preview = browser.find_element(By.ID, "file-preview")

    def show(path):
        b = until(lambda: [x for x in tree.find_elements(By.CSS_SELECTOR, "button.file")
                           if x.get_attribute("data-path") == path], what=f"{path} in the file tree")[0]
        b.click()
        until(lambda: browser.find_element(By.ID, "preview-title").text == path
              and "loading" not in preview.text, timeout=10, what=f"the preview of {path}")
        return preview

    paths = until(lambda: {b.get_attribute("data-path") for b in tree.find_elements(By.CSS_SELECTOR, "button.file")}
                  >= {"notes.txt", "metadata.json"} and
                  {b.get_attribute("data-path") for b in tree.find_elements(By.CSS_SELECTOR, "button.file")},
                  what="the file tree")
    assert {"notes.txt", "table.csv", "data.json", "pic.png", "blob.bin", "terminal_logs/run_0001.log"} <= paths, paths
    assert show("notes.txt").find_element(By.TAG_NAME, "pre").text == "hello notes\nsecond line"
    table = show("table.csv").find_element(By.CSS_SELECTOR, "table")
    assert [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")] == ["a", "b"]
    assert [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in table.find_elements(By.CSS_SELECTOR, "tbody tr")] == [["1", "x"], ["2", "y, z"]]
    pre = show("data.json").find_element(By.TAG_NAME, "pre")
    assert browser.execute_script("return arguments[0].textContent", pre) == \
        json.dumps({"b": [1, 2], "a": {"c": True}}, indent=2)
    img = show("pic.png").find_element(By.TAG_NAME, "img")
    src = urlsplit(img.get_attribute("src"))
    assert src.path == "/api/raw" and parse_qs(src.query)["path"] == ["pic.png"] \
        and parse_qs(src.query)["id"] == [lid], img.get_attribute("src")
    until(lambda: browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) == 2,
          timeout=5, what="the image to load")
    assert "binary" in show("blob.bin").text.lower()
    assert not show("blob.bin").find_elements(By.TAG_NAME, "pre")
    dl = browser.find_element(By.ID, "preview-download")
    q = parse_qs(urlsplit(dl.get_attribute("href")).query)
    assert q["path"] == ["blob.bin"] and q["download"] == ["1"]
    # The log file's preview renders its colours, not its escapes.
    log = show("terminal_logs/run_0001.log")
    raw = browser.execute_script("return arguments[0].textContent", log)
    assert "red plain boldgreen after" in raw and "\x1b" not in raw and "progress 10%" not in raw
    assert log.find_elements(By.CSS_SELECTOR, "span.af1")
    # The file shown is in the URL: a reload shows it again.
    browser.refresh()
    until(lambda: browser.find_element(By.ID, "preview-title").text == "terminal_logs/run_0001.log"
          and "boldgreen" in browser.find_element(By.ID, "file-preview").text, what="the preview after a reload")
    assert js_errors(browser) == []


# ------------------------------------------------------------------------------- theme, deep links, keyboard


def test_the_theme_is_remembered_across_a_reload(browser, data):
    open_page(browser, data["url"])
    try:
        browser.execute_script("localStorage.removeItem('exp-theme')")
        browser.refresh()
        theme = lambda: browser.execute_script("return document.documentElement.dataset.theme")  # noqa: E731
        bg = lambda: browser.execute_script("return getComputedStyle(document.body).backgroundColor")  # noqa: E731
        until(lambda: theme() in ("light", "dark"), timeout=5, what="a theme")
        first, first_bg = theme(), bg()
        browser.find_element(By.ID, "theme-toggle").click()
        other = "dark" if first == "light" else "light"
        until(lambda: theme() == other, timeout=5, what="the theme to switch")
        assert bg() != first_bg
        assert browser.execute_script("return localStorage.getItem('exp-theme')") == other
        browser.refresh()
        until(lambda: browser.execute_script("return document.readyState") == "complete", what="the reload")
        assert theme() == other and bg() != first_bg
        assert browser.find_element(By.ID, "theme-toggle").get_attribute("aria-pressed") == str(other == "dark").lower()
        assert js_errors(browser) == []
    finally:
        browser.execute_script("localStorage.removeItem('exp-theme')")


def test_a_deep_link_with_view_and_filters_survives_a_reload(browser, data):
    ids = data["ids"]["curves"]
    open_page(browser, data["url"])
    browser.find_element(By.CSS_SELECTOR, 'nav [data-view="query"]').click()
    until(lambda: view_shown(browser, "query"), timeout=5, what="the query view")
    browser.find_element(By.ID, "q-tags").send_keys("sweep")
    browser.find_element(By.CSS_SELECTOR, '#q-status option[value="finished"]').click()
    assert sorted(run_query(browser, "^curve$")) == sorted(ids)
    h = until(lambda: (lambda x: x if "name=" in x else None)(browser.execute_script("return location.hash")),
              timeout=5, what="the filters in the URL")
    assert "view=query" in h and "status=finished" in h and "tags=sweep" in h, h
    # A reload (same URL) ...
    browser.refresh()
    until(lambda: view_shown(browser, "query"), what="the query view after a reload")
    assert browser.find_element(By.ID, "q-name").get_attribute("value") == "^curve$"
    assert browser.find_element(By.ID, "q-tags").get_attribute("value") == "sweep"
    assert browser.execute_script("return document.getElementById('q-status').value") == "finished"
    until(lambda: sorted(r.get_attribute("data-id") for r in query_rows(browser)) == sorted(ids),
          what="the filtered rows after a reload")
    assert browser.find_element(By.ID, "query-total").text.strip() == "3"
    # ... and the same link opened afresh, in another page load.
    open_page(browser, data["url"], h)
    until(lambda: sorted(r.get_attribute("data-id") for r in query_rows(browser)) == sorted(ids),
          what="the filtered rows from the link")
    # A link with a filter that matches other rows shows those.
    open_page(browser, data["url"], "#view=query&name=%5Elogdemo%24")
    until(lambda: [r.get_attribute("data-id") for r in query_rows(browser)] == [data["ids"]["logdemo"]],
          what="the logdemo row from a link")
    assert browser.find_element(By.ID, "q-name").get_attribute("value") == "^logdemo$"
    assert js_errors(browser) == []


def test_keyboard_reaches_and_activates_the_nav(browser, data):
    open_page(browser, data["url"])
    until(lambda: view_shown(browser, "dashboard"), timeout=5, what="the dashboard")
    body = browser.find_element(By.TAG_NAME, "body")
    body.click()
    active = lambda: browser.execute_script(  # noqa: E731
        "const a = document.activeElement; return a && a.getAttribute('data-view');")
    for _ in range(12):
        ActionChains(browser).send_keys(Keys.TAB).perform()
        if active() == "query":
            break
    assert active() == "query", "Tab did not reach the Query button"
    outline = browser.execute_script("const s = getComputedStyle(document.activeElement);"
                                     "return [s.outlineStyle, parseFloat(s.outlineWidth)];")
    assert outline[0] != "none" and outline[1] > 0, f"no visible focus: {outline}"
    ActionChains(browser).send_keys(Keys.ENTER).perform()
    until(lambda: view_shown(browser, "query") and not view_shown(browser, "dashboard"), timeout=5,
          what="Enter to open the query view")
    assert browser.find_element(By.CSS_SELECTOR, 'nav [data-view="query"]').get_attribute("aria-current") == "page"
    ActionChains(browser).send_keys(Keys.TAB, Keys.TAB, Keys.ENTER).perform()  # Compare, then Logs
    until(lambda: view_shown(browser, "logs"), timeout=5, what="Enter on the Logs button")
    assert js_errors(browser) == []


WIDE_JS = """
const out = [];
for (const e of document.querySelectorAll('body *')) {
  const r = e.getBoundingClientRect();
  let clipped = false;
  for (let a = e.parentElement; a && a !== document.body; a = a.parentElement)
    if (['auto', 'scroll', 'hidden'].includes(getComputedStyle(a).overflowX)) { clipped = true; break; }
  if (!clipped && r.width && r.right > innerWidth + 1)
    out.push(e.tagName.toLowerCase() + (e.id ? '#' + e.id : '')
             + (e.className ? '.' + String(e.className).split(' ').join('.') : '') + ' right=' + Math.round(r.right));
}
return out.slice(0, 6);
"""


def test_a_narrow_window_has_no_horizontal_overflow(browser, data):
    lid, cid = data["ids"]["logdemo"], data["ids"]["curves"][0]
    browser.set_window_size(420, 800)
    until(lambda: browser.execute_script("return innerWidth") <= 420, timeout=5, what="the narrow window")
    overflow = "return [document.documentElement.scrollWidth, innerWidth];"
    checks = [("", "dashboard"), ("#view=query", "query"), (f"#view=logs&logs={lid}", "logs"),
              (f"#view=metrics&m={cid}", "metrics"), (f"#view=exp&id={lid}", "exp")]
    wide = {}
    for frag, view in checks:
        open_page(browser, data["url"], frag)
        until(lambda view=view: view_shown(browser, view), what=f"the {view} view")
        if view == "query":
            until(lambda: query_rows(browser), what="query rows")
        elif view == "logs":
            until(lambda: any("filler" in x for x in log_lines(browser, lid)), what="the log")
        elif view == "metrics":
            drawn(browser, "loss", ROWS)
        elif view == "exp":
            until(lambda: browser.find_elements(By.CSS_SELECTOR, "#exp-files button.file")
                  and len(browser.find_elements(By.CSS_SELECTOR, "#exp-against option")) > 1
                  and "loading" not in browser.find_element(By.ID, "exp-changes").text, what="the files and changes")
        sw, iw = browser.execute_script(overflow)
        if sw > iw + 1:
            wide[view] = (sw, iw, browser.execute_script(WIDE_JS))
    assert not wide, f"horizontal page overflow at 420 px (scrollWidth, innerWidth, elements past the edge): {wide}"
    # The nav still works: every button is on screen and clickable.
    open_page(browser, data["url"])
    for name in ("query", "compare", "logs", "metrics", "dashboard"):
        b = browser.find_element(By.CSS_SELECTOR, f'nav [data-view="{name}"]')
        r = browser.execute_script("const r = arguments[0].getBoundingClientRect();"
                                   "return [r.left, r.right, r.width];", b)
        assert b.is_displayed() and r[0] >= 0 and r[1] <= 421 and r[2] > 0, (name, r)
        b.click()
        until(lambda name=name: view_shown(browser, name), timeout=5, what=f"the {name} view on a narrow window")
    assert js_errors(browser) == []


# --------------------------------------------------------------------------------------- the disconnection

NETWORK_ERRORS = ("net::ERR_CONNECTION_REFUSED", "net::ERR_EMPTY_RESPONSE", "net::ERR_CONNECTION_RESET",
                  "net::ERR_CONNECTION_CLOSED", "Failed to fetch")


def conn_state(driver) -> tuple[str, bool]:
    el = driver.find_element(By.ID, "conn")
    return el.text.strip(), "down" in (el.get_attribute("class") or "").split()


def see_process(base, port: int = 0):
    """`exp see BASE --port PORT` in a child process: (process, its port)."""
    proc = subprocess.Popen([sys.executable, EXP_PY, "see", str(base), "--port", str(port), "--no-browser"],
                            env=child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

    def read_port():
        for line in proc.stdout:
            m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            if m:
                return int(m.group(1))
        return None

    try:
        found = call_with_timeout(read_port, 20, "exp see to start")
    except BaseException:
        stop(proc)
        raise
    if found is None:
        stop(proc)
        pytest.fail("exp see printed no address")
    return proc, found


def stop(proc) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    proc.stdout.close()


def test_a_lost_server_shows_disconnected_and_a_new_one_reconnects(browser, data):
    """`exp see` stops (Ctrl-C, a crash) while the page is open, then is started again on the same port."""
    proc, port = see_process(data["base"])
    proc2 = None
    try:
        open_page(browser, f"http://127.0.0.1:{port}/")
        until(lambda: browser.find_element(By.ID, "updated-at").text.strip(), what="the first state")
        assert conn_state(browser) == ("connected", False)
        stop(proc)
        until(lambda: conn_state(browser) == ("disconnected", True), timeout=15, what="#conn to say disconnected")
        proc2, port2 = see_process(data["base"], port)
        assert port2 == port
        until(lambda: conn_state(browser) == ("connected", False), timeout=40, what="#conn to say connected again")
        before = browser.find_element(By.ID, "updated-at").text
        until(lambda: browser.find_element(By.ID, "updated-at").text != before, timeout=15,
              what="the dashboard to update again")
        assert js_errors(browser, allow=NETWORK_ERRORS) == []
    finally:
        browser.get("about:blank")
        for p in (proc, proc2):
            if p is not None:
                stop(p)


def test_an_in_process_server_closed_and_reopened_on_its_port(browser, data):
    """The same with exp.DashboardServer: close() must cut the page off too (keep-alive connections included)."""
    srv = exp.DashboardServer(data["base"], port=0).start()
    port = srv.port
    srv2 = None
    try:
        open_page(browser, srv.url)
        until(lambda: browser.find_element(By.ID, "updated-at").text.strip(), what="the first state")
        assert conn_state(browser) == ("connected", False)
        srv.close()
        until(lambda: conn_state(browser) == ("disconnected", True), timeout=15,
              what="#conn to say disconnected after DashboardServer.close()")
        srv2 = exp.DashboardServer(data["base"], port=port).start()
        assert srv2.port == port
        until(lambda: conn_state(browser) == ("connected", False), timeout=40, what="#conn to say connected again")
        assert js_errors(browser, allow=NETWORK_ERRORS) == []
    finally:
        browser.get("about:blank")
        srv.close()
        if srv2 is not None:
            srv2.close()


def test_a_hidden_tab_polls_much_less_and_a_shown_one_at_once(browser, data):
    open_page(browser, data["url"])
    until(lambda: browser.find_elements(By.CSS_SELECTOR, "#list-finished [data-task], #count-finished"),
          what="the dashboard")
    browser.execute_script("""
        window.__stateCalls = 0;
        const real = window.fetch;
        window.fetch = function (u, o) {
          if (String(u).includes('/api/state')) window.__stateCalls++;
          return real.apply(this, arguments);
        };
        window.__hidden = false;
        Object.defineProperty(document, 'visibilityState', {configurable: true, get: () => window.__hidden ? 'hidden' : 'visible'});
    """)
    time.sleep(4)
    visible_calls = browser.execute_script("return window.__stateCalls")
    browser.execute_script("window.__hidden = true; window.__stateCalls = 0;"
                           "document.dispatchEvent(new Event('visibilitychange'));")
    time.sleep(6)
    hidden_calls = browser.execute_script("return window.__stateCalls")
    assert visible_calls >= 3 and hidden_calls <= 2, (visible_calls, hidden_calls)
    browser.execute_script("window.__hidden = false; window.__stateCalls = 0;"
                           "document.dispatchEvent(new Event('visibilitychange'));")
    until(lambda: browser.execute_script("return window.__stateCalls") >= 1, timeout=3,
          what="a poll as soon as the tab is shown again")
    assert js_errors(browser) == []


# ------------------------------------------------------------------------- sparse metrics, the time axis

SPARSE_JOB = r'''
import sys, time
import exp

e = exp.load_experiment()
for i in range(100):
    e.upd_row(step=i, loss=1.0 / (i + 1))
    if i % 10 == 9:                       # a validation loss every 10 steps, a row every step
        e.upd_row(val_loss=2.0 - i / 100)
    if i == 99:
        e.upd_row(test_acc=0.75)          # one value, at the end
    if sys.argv[1] == "timed":
        e.upd_row(wall_time=1000.0 + i)
    e.save_row()
'''


@pytest.fixture(scope="module")
def sparse(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sparse")
    base = tmp / "results"
    job = write_script(tmp, "sparse.py", SPARSE_JOB)
    ids = {}
    for mode in ("plain", "timed"):
        e = exp.Experiment(name=mode, command=f"{sys.executable} {job} {mode}", base_dir=base, cwd=tmp,
                           env={"PYTHONPATH": ROOT, "PYTHONDONTWRITEBYTECODE": "1"})
        assert e.run() == 0, mode
        ids[mode] = os.path.basename(e.dir.path)
    rows = (base / ids["plain"] / "metrics" / "run_0001.csv").read_text().splitlines()
    assert rows[0].split(",")[:3] == ["step", "loss", "val_loss"] and rows[1].endswith(",,"), rows[:3]
    srv = exp.DashboardServer(base, port=0).start()
    try:
        yield {"url": srv.url, "ids": ids}
    finally:
        srv.close()


def test_a_metric_logged_every_n_rows_is_drawn_as_a_line_and_a_single_value_as_a_point(browser, sparse):
    open_page(browser, sparse["url"], f"#view=metrics&m={sparse['ids']['plain']}")
    loss = settled_pixels(browser, canvas_of(drawn(browser, "loss", 100)))
    val = settled_pixels(browser, canvas_of(drawn(browser, "val_loss", 10)))
    # The 10 values are joined into one line across the plot, as dense as the loss's line is.
    assert val["midY"] is not None and val["strong"] > loss["strong"] / 3, (val, loss)
    one = settled_pixels(browser, canvas_of(drawn(browser, "test_acc", 1)))
    assert one["strong"] >= 4, one  # its one point is marked
    assert js_errors(browser) == []


def test_the_wall_clock_x_axis_is_offered_only_with_a_time_column(browser, sparse):
    def options():
        sel = until(lambda: visible(browser, "#view-metrics select.x-pick"), what="the x axis choice")[0]
        return {o.get_attribute("value"): o.text for o in sel.find_elements(By.TAG_NAME, "option")}

    open_page(browser, sparse["url"], f"#view=metrics&m={sparse['ids']['timed']}")
    drawn(browser, "val_loss", 10)
    assert options().get("time") == "time (wall clock)", options()
    open_page(browser, sparse["url"], f"#view=metrics&m={sparse['ids']['plain']}")
    drawn(browser, "val_loss", 10)
    assert "time" not in options() and {"step", "index"} <= set(options()), options()
    # An old link that asks for it says what it gets instead.
    open_page(browser, sparse["url"], f"#view=metrics&m={sparse['ids']['plain']}&x=time")
    drawn(browser, "val_loss", 10)
    assert options().get("time") == "time (no time column: row index)", options()
    assert js_errors(browser) == []


# ------------------------------------------------------------------------------------------------ query


def test_a_failed_query_leaves_no_stale_results_behind(browser, data):
    open_page(browser, data["url"], "#view=query")
    assert sorted(run_query(browser, "^curve")) == sorted(data["ids"]["curves"])
    assert browser.find_element(By.ID, "query-total").text == "3"
    param = browser.find_element(By.ID, "q-param")
    param.clear()
    param.send_keys("lr>=0.5 opt=adam")  # two filters without a comma: the server refuses it (400)
    browser.find_element(By.ID, "q-submit").click()
    error = until(lambda: browser.find_element(By.ID, "query-error").text.strip(), timeout=15, what="the error")
    assert "lr" in error, error
    # The table no longer shows the previous filter's rows as if they were this one's.
    until(lambda: not query_rows(browser), timeout=5, what="the stale rows to go")
    assert browser.find_element(By.ID, "query-total").text == "–"
    assert "the filter above failed" in browser.find_element(By.ID, "query-results").text
    # Fixed, the filter applies again.
    param.clear()
    param.send_keys("lr>=0.05")
    browser.find_element(By.ID, "q-submit").click()
    until(lambda: [r.get_attribute("data-id") for r in query_rows(browser)] == [data["ids"]["curves"][0]],
          timeout=15, what="the fixed filter's row")
    assert browser.find_element(By.ID, "query-error").text == ""
    assert browser.find_element(By.ID, "query-total").text == "1"
    assert js_errors(browser, allow=("400",)) == []


# ------------------------------------------------------------------- views that follow the experiments


GONE = "nosuch_2020-01-01__00-00-00"  # an id no experiment has (a mistyped or an old link)


def table_rows(root, width: int) -> dict:
    """The body rows of the tables under ``root`` that have ``width`` cells, by their first cell's text."""
    rows = {}
    for tr in root.find_elements(By.CSS_SELECTOR, "table tbody tr"):
        tds = tr.find_elements(By.TAG_NAME, "td")
        if len(tds) == width:
            rows[tds[0].text] = tds
    return rows


def chip(driver, root: str, exp_id: str):
    for c in driver.find_elements(By.CSS_SELECTOR, f"{root} .src-chip"):
        if c.get_attribute("data-id") == exp_id:
            return c
    return None


def test_charts_go_on_beside_an_experiment_that_is_not_found_or_deleted(browser, data):
    """One unknown id on the charts, or one deleted while charted, is marked on its chip; the others draw on."""
    a = os.path.basename(data["run"]("beside", "live", 20))
    b = os.path.basename(data["run"]("beside", "live", 20))
    open_page(browser, data["url"], f"#view=metrics&m={a},{b},{GONE}")
    drawn(browser, "loss", 40, series=2)
    until(lambda: "not found" in chip(browser, "#view-metrics", GONE).text, what="the unknown id marked")
    assert "src-error" in chip(browser, "#view-metrics", GONE).get_attribute("class").split()
    assert "src-error" not in chip(browser, "#view-metrics", a).get_attribute("class").split()
    # b deleted while on the charts: a's new rows still come in, and b's chip says it is gone.
    shutil.rmtree(data["base"] / b)
    append(data["base"] / a / "metrics" / "run_0001.csv", "20,0.5\n21,0.25\n")
    drawn(browser, "loss", 42, series=2)  # b's curve stays as it was drawn
    until(lambda: "not found" in chip(browser, "#view-metrics", b).text, timeout=30, what="the deleted one marked")
    assert js_errors(browser, allow=("404",)) == []


def test_compare_names_an_unknown_experiment_and_its_table_follows_the_runs(browser, data):
    a = os.path.basename(data["run"]("cmpfollow", "live", 10))
    open_page(browser, data["url"], f"#view=compare&ids={a},{GONE}")
    note = browser.find_element(By.ID, "compare-note")
    until(lambda: "not found: " + GONE in note.text, what="the note naming the unknown id")
    assert note.text.startswith("1 experiments"), note.text
    table = browser.find_element(By.ID, "compare-table")
    assert [x.get_attribute("title") for x in table.find_elements(By.CSS_SELECTOR, "thead th a")] == [a]

    def final_loss():
        for tr in table.find_elements(By.CSS_SELECTOR, "tbody tr[data-metric]"):
            if tr.get_attribute("data-metric") == "loss" and " final" in tr.find_element(By.TAG_NAME, "th").text:
                return tr.find_element(By.TAG_NAME, "td").text
        return None

    assert until(final_loss, what="the final loss") == "0.61941"  # row 9: 9/17 + 0.09
    drawn(browser, "loss", 10, root="#compare-charts")
    until(lambda: "not found" in chip(browser, "#compare-charts", GONE).text, what="the unknown id's chip")
    # The run goes on: the table follows without a reload, as the chart does.
    append(data["base"] / a / "metrics" / "run_0001.csv", "10,5.0\n")
    until(lambda: final_loss() == "5", timeout=20, what="the new final value in the table")
    drawn(browser, "loss", 11, root="#compare-charts")
    assert js_errors(browser, allow=("404",)) == []


def test_the_query_table_follows_new_experiments_and_their_status(browser, data):
    open_page(browser, data["url"], "#view=query")
    first = os.path.basename(data["run"]("qfollow", "kv", "loss=1"))
    assert run_query(browser, "^qfollow$") == [first]
    # A new one, and a change of status, show up without pressing Search.
    second = os.path.basename(data["run"]("qfollow", "kv", "loss=2"))
    until(lambda: sorted(r.get_attribute("data-id") for r in query_rows(browser)) == sorted([first, second]),
          timeout=30, what="the new experiment in the table")
    meta_path = data["base"] / first / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["status"] = "killed"
    meta_path.write_text(json.dumps(meta))

    def status_of(exp_id):
        for r in query_rows(browser):
            if r.get_attribute("data-id") == exp_id:
                return r.find_elements(By.TAG_NAME, "td")[2].text
        return None

    until(lambda: status_of(first) == "killed", timeout=30, what="the new status in the table")
    assert browser.find_element(By.ID, "query-total").text == "2"
    assert js_errors(browser) == []


def test_a_param_filter_with_not_equal_after_a_comma(browser, data):
    open_page(browser, data["url"], "#view=query")
    ids = data["ids"]["curves"]  # lr 0.1, 0.01, 0.001, all bs 32
    run_query(browser, "^curve$")
    param = browser.find_element(By.ID, "q-param")
    for text in ("bs=32, lr!=0.1", "lr!=0.1, bs=32"):
        param.clear()
        param.send_keys(text)
        browser.find_element(By.ID, "q-submit").click()
        until(lambda: sorted(r.get_attribute("data-id") for r in query_rows(browser)) == sorted(ids[1:]),
              timeout=15, what=f"the rows of {text}")
        assert browser.find_element(By.ID, "query-error").text == ""
    param.clear()
    browser.find_element(By.ID, "q-submit").click()
    assert js_errors(browser) == []


def test_a_log_panel_of_a_deleted_experiment_says_so(browser, data):
    gone = os.path.basename(data["run"]("logsgone", "lines", 5))
    open_page(browser, data["url"], f"#view=logs&logs={gone}")
    until(lambda: "line 4" in log_lines(browser, gone), what="the log")
    status = panel(browser, gone).find_element(By.CSS_SELECTOR, ".log-info span")
    assert "finished" in status.text, status.text
    shutil.rmtree(data["base"] / gone)
    until(lambda: status.text == "experiment not found", timeout=30, what="the panel to say it is gone")
    assert js_errors(browser, allow=("404",)) == []


def test_what_changed_colours_deltas_by_the_rule_ls_uses(browser, data):
    """answer_acc is no "wer", cerebras_score no "cer", and val_nll is lower-is-better (as `ls --best` has it)."""
    data["run"]("qa", "kv", "answer_acc=0.5", "val_nll=2", "cerebras_score=1", "train_loss=3")
    second = os.path.basename(data["run"]("qa", "kv", "answer_acc=0.9", "val_nll=1", "cerebras_score=2",
                                          "train_loss=4"))

    def listed():
        with urllib.request.urlopen(data["url"] + "api/experiments?name=%5Eqa%24", timeout=10) as r:
            return json.load(r)["total"] == 2
    wait_for(listed, timeout=15, what="the dashboard's index to list both")  # "previous" is looked up there
    open_page(browser, data["url"], f"#view=exp&id={second}")
    box = browser.find_element(By.ID, "exp-changes")

    def deltas():
        rows = table_rows(box, 4)
        return {k: tds[3].get_attribute("class").split() for k, tds in rows.items()} if len(rows) >= 4 else None

    got = until(deltas, what="the metric deltas")
    assert "delta-better" in got["answer_acc"] and "delta-better" in got["val_nll"], got
    assert "delta-better" in got["cerebras_score"] and "delta-worse" in got["train_loss"], got
    assert js_errors(browser) == []


def test_a_time_column_is_offered_once_on_the_x_axis(browser, data):
    tid = os.path.basename(data["run"]("timecol", "kv", "time=100", "loss=1"))
    open_page(browser, data["url"], f"#view=metrics&m={tid}")
    drawn(browser, "loss", 1)
    sel = until(lambda: visible(browser, "#view-metrics select.x-pick"), what="the x axis choice")[0]
    values = [o.get_attribute("value") for o in sel.find_elements(By.TAG_NAME, "option")]
    assert values.count("time") == 1 and len(values) == len(set(values)), values
    assert js_errors(browser) == []


def test_text_and_true_false_metrics_are_shown_in_query_and_on_the_experiment_page(browser, data):
    tid = os.path.basename(data["run"]("texty", "kv", "loss=0.5", "s:phase=007", "done=True"))
    open_page(browser, data["url"], "#view=query")
    assert run_query(browser, "^texty$") == [tid]
    heads = [th.text.replace(" ▲", "").replace(" ▼", "")
             for th in browser.find_elements(By.CSS_SELECTOR, "#query-results thead th")]
    cells = [td.text for td in query_rows(browser)[0].find_elements(By.TAG_NAME, "td")]
    row = dict(zip(heads, cells))
    assert row.get("loss") == "0.5" and row.get("phase") == "007" and row.get("done") == "True", row
    open_page(browser, data["url"], f"#view=exp&id={tid}")
    info = browser.find_element(By.ID, "exp-info")

    def last():
        rows = {k: tds[1].text for k, tds in table_rows(info, 2).items()}
        return rows if "phase" in rows else None

    assert until(last, what="the metrics table") == {"loss": "0.5", "phase": "007", "done": "True"}
    assert js_errors(browser) == []
