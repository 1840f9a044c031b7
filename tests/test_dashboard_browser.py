"""The page (exp_ui.html) in a real headless Chromium, against a live `exp see` and a live scheduler.

Needs Debian's `chromium` and `chromium-driver` and the `selenium` package (the test extra);
`.ci/run` installs them.  Where they cannot be had, these tests skip and say why.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from browser_helpers import BROWSER_SKIPS, js_errors, new_browser, until
from conftest import EXP_PY, child_env, exp_dirs, posix_only, read_meta, wait_for, write_batch
from test_gpus import FakeSmi

import exp

try:
    from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
except ImportError:  # pragma: no cover - said by BROWSER_SKIPS
    pass

pytestmark = [posix_only, *BROWSER_SKIPS]

XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def browser():
    driver = new_browser()
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A scheduler running a batch (one long experiment that logs and writes metrics, a quick one, a failing
    one, one named like an HTML injection) and `exp see` over its base directory."""
    tmp = tmp_path_factory.mktemp("ui")
    base = tmp / "results"
    train = tmp / "train.py"
    train.write_text(
        "import exp, sys, time\n"
        "e = exp.load_experiment()\n"
        "n = int(sys.argv[1])\n"
        "for i in range(n):\n"
        "    e.upd_row(step=i, loss=1.0 / (i + 1), acc=i / n); e.save_row()\n"
        "    print(f'line {i}', flush=True)\n"
        "    time.sleep(float(sys.argv[2]))\n")
    py = sys.executable
    cfg = write_batch(tmp / "cfg.toml", base, [
        {"name": "quick", "command": f"{py} {train} 30 0", "tags": ["fast"], "priority": 10},
        {"name": "broken", "command": "echo 'about to fail'; exit 3", "priority": 9},
        {"name": XSS, "command": f"{py} {train} 5 0", "priority": 8},
        {"name": "long", "command": f"{py} {train} 100000 0.2", "tags": ["slow"], "priority": 1, "gpus": 1},
        {"name": "victim", "command": f"{py} {train} 100000 0.2", "priority": 1, "gpus": 1},
        {"name": "waiting", "command": "true", "priority": 0, "depends_on": ["long"]},
    ], max_concurrent_experiments=3, gpus=[0, 1])
    sched = subprocess.Popen([py, EXP_PY, "run", str(cfg)], env=child_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    # The dashboard's GPU panel reads nvidia-smi: a fake one on PATH, two 16 GB GPUs in use.
    fake = FakeSmi(tmp, [(0, "GPU-0aaa", 9000, 16000, 87), (1, "GPU-1bbb", 4000, 16000, 42)])
    old_path = os.environ["PATH"]
    os.environ["PATH"] = f"{fake.bin}{os.pathsep}{old_path}"
    srv = exp.DashboardServer(base, port=0).start()
    try:
        wait_for(lambda: len(exp_dirs(base, "long")) == 1 and len(exp_dirs(base, "victim")) == 1, timeout=60,
                 what="the long experiments to start")
        yield {"base": base, "url": srv.url, "server": srv, "sched": sched}
    finally:
        os.environ["PATH"] = old_path
        srv.close()
        if sched.poll() is None:
            subprocess.run([py, EXP_PY, "shutdown", str(base), "--now"], env=child_env(), capture_output=True,
                           timeout=60)
            try:
                sched.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(sched.pid, 9)
                sched.wait()


def open_page(driver, url: str, fragment: str = "") -> None:
    driver.get(url + fragment)
    until(lambda: driver.execute_script("return document.readyState") == "complete", what="the page to load")


def count_of(driver, name: str) -> int:
    text = driver.find_element(By.ID, f"count-{name}").text.strip()
    return int(text) if text.isdigit() else -1


def task_rows(driver, listing: str) -> list:
    return driver.find_elements(By.CSS_SELECTOR, f"#list-{listing} [data-task]")


def row_named(driver, listing: str, name: str):
    try:
        for el in task_rows(driver, listing):
            if el.get_attribute("data-name") == name:
                return el
    except StaleElementReferenceException:  # the list was redrawn meanwhile: not there yet
        pass
    return None


def click_action(driver, listing: str, name: str, action: str) -> None:
    """Click a row's action button (again if the list was redrawn under it)."""
    def attempt() -> bool:
        try:
            row = row_named(driver, listing, name)
            if row is None:
                return False
            row.find_element(By.CSS_SELECTOR, f'button[data-action="{action}"]').click()
            return True
        except StaleElementReferenceException:
            return False

    until(attempt, timeout=20, what=f"{action} on {name} in {listing}")


def test_the_dashboard_lists_update_live_and_render_a_hostile_name_as_text(browser, live):
    open_page(browser, live["url"])
    until(lambda: row_named(browser, "running", "long") is not None, timeout=20, what="long in the running list")
    until(lambda: row_named(browser, "finished", "quick") is not None, timeout=30, what="quick to finish")
    until(lambda: row_named(browser, "errors", "broken") is not None, timeout=30, what="broken in errors")
    assert count_of(browser, "errors") >= 1 and count_of(browser, "running") >= 2
    until(lambda: row_named(browser, "finished", XSS) is not None, timeout=30, what="the hostile name")
    row = row_named(browser, "finished", XSS)
    assert XSS in row.text
    # Shown as text: no element was made from it, and nothing ran.
    assert browser.find_elements(By.CSS_SELECTOR, 'img[src="x"]') == []
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018 - raises when there is none
    broken = row_named(browser, "errors", "broken")
    assert "exit code 3" in broken.text
    assert browser.find_element(By.ID, "updated-at").text.strip()
    assert js_errors(browser) == []


def test_a_log_panel_follows_new_lines(browser, live):
    open_page(browser, live["url"])
    until(lambda: row_named(browser, "running", "long") is not None, timeout=20, what="long running")
    row_named(browser, "running", "long").find_element(By.CSS_SELECTOR, "button[data-open-log]").click()
    panel = until(lambda: browser.find_elements(By.CSS_SELECTOR, "#log-panels .log-panel"), timeout=10,
                     what="a log panel")[0]

    def last_step() -> int:
        lines = [ln for ln in panel.find_element(By.CSS_SELECTOR, ".log-text").text.splitlines()
                 if ln.startswith("line ")]
        return int(lines[-1].split()[1]) if lines else -1

    first = until(lambda: last_step() + 1, timeout=15, what="log lines") - 1
    until(lambda: last_step() >= first + 5, timeout=20, what="new log lines to arrive in the panel")
    # Follow mode keeps the newest line in view.
    at_bottom = browser.execute_script(
        "const t = arguments[0]; const s = t.closest('.log-scroll') || t;"
        "return s.scrollHeight - s.scrollTop - s.clientHeight < 40;",
        panel.find_element(By.CSS_SELECTOR, ".log-text"))
    assert at_bottom
    assert js_errors(browser) == []


def test_a_chart_draws_every_point_of_a_run(browser, live):
    quick = exp_dirs(live["base"], "quick")[0]
    until(lambda: read_meta(quick).get("status") == "finished", timeout=30, what="quick to finish")
    exp_id = quick.name
    open_page(browser, live["url"], f"#view=metrics&id={exp_id}")
    if not browser.find_elements(By.CSS_SELECTOR, "canvas.chart"):
        # Not opened by the link: open it from the row's button.
        open_page(browser, live["url"])
        until(lambda: row_named(browser, "finished", "quick") is not None, timeout=20, what="quick row")
        row_named(browser, "finished", "quick").find_element(By.CSS_SELECTOR, "button[data-open-metrics]").click()
    canvas = until(lambda: [c for c in browser.find_elements(By.CSS_SELECTOR, "canvas.chart")
                               if (c.get_attribute("data-points") or "0") != "0"], timeout=15,
                      what="a drawn chart")[0]
    series = int(canvas.get_attribute("data-series"))
    points = int(canvas.get_attribute("data-points"))
    assert series >= 1 and points == 30 * series, (series, points)
    # Something was actually painted.
    painted = browser.execute_script(
        "const c = arguments[0]; const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n;", canvas)
    assert painted > 100
    assert js_errors(browser) == []


def test_a_query_filters_the_table(browser, live):
    open_page(browser, live["url"], "#view=query")
    for el in browser.find_elements(By.CSS_SELECTOR, '[data-view="query"]')[:1]:
        el.click()
    name = until(lambda: browser.find_elements(By.ID, "q-name"), timeout=10, what="the query form")[0]
    name.clear()
    name.send_keys("^(long|quick)$")
    browser.find_element(By.ID, "q-submit").click()

    def shown():
        rows = browser.find_elements(By.CSS_SELECTOR, "#query-results tr[data-id]")
        return sorted(r.get_attribute("data-id").split("_20")[0] for r in rows)

    until(lambda: shown() == ["long", "quick"], timeout=10, what="the filtered rows")
    assert browser.find_element(By.ID, "query-total").text.strip().startswith("2")
    assert js_errors(browser) == []


def test_the_terminate_button_stops_a_running_experiment(browser, live):
    victim = exp_dirs(live["base"], "victim")[0]
    assert read_meta(victim)["status"] == "running"
    open_page(browser, live["url"])
    row = until(lambda: row_named(browser, "running", "victim"), timeout=20, what="victim running")
    row.find_element(By.CSS_SELECTOR, 'button[data-action="kill"]').click()
    ok = until(lambda: [b for b in browser.find_elements(By.ID, "confirm-ok") if b.is_displayed()], timeout=5,
                  what="the confirmation dialog")[0]
    ok.click()
    until(lambda: read_meta(victim).get("status") == "killed", timeout=30, what="victim to be killed")
    until(lambda: row_named(browser, "errors", "victim") is not None
             or row_named(browser, "finished", "victim") is not None, timeout=15, what="the list to show it ended")
    assert read_meta(exp_dirs(live["base"], "long")[0])["status"] == "running"  # only that one
    assert js_errors(browser) == []


def test_the_page_keeps_to_its_security_rules(live):
    page = open(os.path.join(os.path.dirname(EXP_PY), "exp_ui.html"), encoding="utf-8").read()
    import re

    assert len(re.findall(r"<script\b", page)) == 1 and "<script>" in page
    assert not re.search(r"\son[a-z]+\s*=", page.split("<script>")[0]), "inline event handler in the markup"
    script = page.split("<script>", 1)[1]
    for bad in ("innerHTML =", "innerHTML=", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                "new Function", "javascript:"):
        assert bad not in script.replace("innerHTML = ''", "").replace('innerHTML = ""', ""), bad
    # Nothing from elsewhere: it works offline.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "an external resource"
    assert not re.search(r"""(fetch|open)\(\s*["'`](https?:)?//""", script), "a request to elsewhere"


def test_the_gpu_panel_shows_use_memory_and_who_holds_each_gpu(browser, live):
    open_page(browser, live["url"])

    def panel_text():
        return browser.find_element(By.ID, "gpu-list").text

    until(lambda: "GPU 0" in panel_text() and "GPU 1" in panel_text(), timeout=20, what="two GPUs in the panel")
    text = panel_text()
    assert "87" in text and "42" in text  # utilisation
    assert "16" in text  # memory total (16000 MB)
    holders = {"long", "victim"}
    until(lambda: holders & set(panel_text().replace("held by", " ").split()), timeout=20,
             what="a running experiment named as a GPU's holder")
    assert js_errors(browser) == []


def test_retry_priority_and_shutdown_are_confirmed_and_reach_the_scheduler(browser, live):
    open_page(browser, live["url"])

    def confirm(value=None):
        def answer() -> bool:
            try:
                ok = [b for b in browser.find_elements(By.ID, "confirm-ok") if b.is_displayed()]
                if not ok:
                    return False
                if value is not None:
                    box = browser.find_element(By.ID, "confirm-input")
                    box.clear()
                    box.send_keys(str(value))
                ok[0].click()
                return True
            except StaleElementReferenceException:
                return False

        until(answer, timeout=5, what="the confirmation dialog")

    # Priority of the pending task (it waits for long, which runs for ever); one out of range is refused first.
    click_action(browser, "pending", "waiting", "priority")
    box = until(lambda: [b for b in browser.find_elements(By.ID, "confirm-input") if b.is_displayed()], timeout=5,
                what="the priority input")[0]
    box.clear()
    box.send_keys("99999999999999999999999")
    browser.find_element(By.ID, "confirm-ok").click()
    until(lambda: browser.find_element(By.ID, "confirm-error").text
          == "Enter a whole number from -1000000000 to 1000000000.", timeout=5, what="the range in the dialog")
    assert browser.find_element(By.ID, "confirm-ok").is_displayed()  # still open: nothing was sent
    confirm(7)
    state = lambda: json.loads(urllib.request.urlopen(live["url"] + "api/state", timeout=10).read())  # noqa: E731
    until(lambda: [j["priority"] for j in state()["pending"] if j["name"] == "waiting"] == [7], timeout=15,
             what="the new priority in the scheduler's state")
    # Retry of the failed one: it runs again (and fails again: exit 3).
    broken = exp_dirs(live["base"], "broken")[0]
    click_action(browser, "errors", "broken", "retry")
    confirm()
    until(lambda: len(read_meta(broken).get("runs") or []) == 2, timeout=20, what="a second run of broken")
    # Cancelling the dialog does nothing; confirming the shutdown stops the scheduler.
    browser.find_element(By.ID, "shutdown-btn").click()
    until(lambda: [b for b in browser.find_elements(By.ID, "confirm-cancel") if b.is_displayed()],
             timeout=5, what="the dialog")[0].click()
    time.sleep(0.5)
    assert live["sched"].poll() is None
    browser.find_element(By.ID, "shutdown-btn").click()
    confirm()
    # A plain shutdown lets the running ones finish, and the badge says it is under way.
    until(lambda: browser.find_element(By.ID, "scheduler-badge").text == "scheduler: shutting down", timeout=15,
          what="the badge to say the shutdown is under way")
    assert live["sched"].poll() is None
    # They run for ever, so stop them from the page too.
    for name in ("long", "victim"):
        if row_named(browser, "running", name) is not None:
            click_action(browser, "running", name, "kill")
            confirm()
    until(lambda: live["sched"].poll() is not None, timeout=40, what="the scheduler to exit")
    until(lambda: "not running" in browser.find_element(By.ID, "scheduler-badge").text, timeout=15,
             what="the badge to say the scheduler stopped")
    assert js_errors(browser) == []
