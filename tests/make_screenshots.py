#!/usr/bin/env python3
"""Make the dashboard screenshots that README.md shows (docs/*.png).

    python tests/make_screenshots.py [--keep] [--dark]

Not a test: a script for whoever changes the page.  It needs Chromium and chromedriver on PATH
(Debian: ``apt-get install chromium chromium-driver``) and ``pip install selenium``.

What it does, in a temporary directory (removed at the end unless --keep):

1. writes a small training script that logs a noisy, decaying loss and a rising accuracy with
   ``exp.load_experiment()`` / ``upd_row`` / ``save_row``, and a batch file of plausible ML
   experiments (an lr sweep, a run that diverges, one that runs out of memory, one that fails
   on its first attempt and is retried, long runs and a queue behind them);
2. puts a stand-in ``nvidia-smi`` on PATH (four busy GPUs), so the GPU panel has something to
   show on a machine without GPUs;
3. starts the scheduler (``python exp.py run cfg.toml``) and ``exp.DashboardServer`` over the
   results directory, waits until some experiments have finished, failed, are running and are
   queued;
4. drives a headless Chromium (1280x800, light theme) through the page's URL-hash deep links
   and saves docs/dashboard.png, docs/chart.png, docs/compare.png and docs/query.png;
5. shuts the scheduler down (``python exp.py shutdown DIR --now``), closes the server and the
   browser and removes the temporary directory.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
EXP_PY = os.path.join(ROOT, "exp.py")
WIDTH, HEIGHT = 1280, 800

TRAIN_PY = r'''
"""A stand-in trainer: noisy, decaying loss and rising accuracy, logged with exp."""
import argparse, math, os, random, sys, time

import exp

p = argparse.ArgumentParser()
p.add_argument("--model", default="resnet50")
p.add_argument("--lr", type=float, default=0.1)
p.add_argument("--bs", type=int, default=256)
p.add_argument("--steps", type=int, default=300)
p.add_argument("--warmup", type=int, default=20)
p.add_argument("--sleep", type=float, default=0.02)
p.add_argument("--seq", type=int, default=0)
p.add_argument("--oom-at", type=int, default=0)
p.add_argument("--flaky", action="store_true")
a = p.parse_args()

e = exp.load_experiment()
rng = random.Random(hash((a.model, a.lr, a.bs, a.seq)) & 0xffff)
GREEN, RED, BOLD, DIM, RESET = "\x1b[32m", "\x1b[31m", "\x1b[1m", "\x1b[90m", "\x1b[0m"

print(f"{BOLD}==> {a.model}{RESET} lr={a.lr} bs={a.bs} steps={a.steps} warmup={a.warmup}"
      f" on cuda:{os.environ.get('CUDA_VISIBLE_DEVICES', '0')}", flush=True)
print(f"{DIM}loading dataset ... 128,000 train / 5,000 val images{RESET}", flush=True)

if a.flaky:  # the first attempt dies while setting up the process group
    marker = os.path.join(e.work_dir, ".attempted")
    if not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(1.0)
        print("Traceback (most recent call last):", file=sys.stderr)
        print('  File "train.py", line 88, in <module>', file=sys.stderr)
        print("    dist.init_process_group('nccl')", file=sys.stderr)
        print("RuntimeError: NCCL error in: ProcessGroupNCCL.cpp:1191, unhandled system error",
              file=sys.stderr, flush=True)
        sys.exit(1)

# how the curve behaves: the learning rate sets the speed; too far from ~0.1 (x model scale) is worse
scale = {"resnet50": 1.0, "resnet18": 1.0, "resnet101": 1.0, "vit_small": 0.01, "vit_base": 0.01,
         "bert_base": 0.001, "gpt2_small": 0.006}.get(a.model, 1.0)
rel = a.lr / (0.1 * scale)
init = {"bert_base": 7.5, "gpt2_small": 10.8}.get(a.model, 4.6)
floor = {"resnet18": 0.95, "resnet101": 0.62, "vit_small": 0.85, "vit_base": 0.7,
         "bert_base": 1.9, "gpt2_small": 3.1}.get(a.model, 0.72) * (1 + 0.35 * abs(math.log10(max(rel, 1e-6))))
speed = {"vit_small": 0.55, "vit_base": 0.5, "resnet18": 1.15}.get(a.model, 1.0)
rate = (2.0 + 3.0 * min(rel, 1.5)) * speed
throughput = {"resnet18": 2900, "resnet50": 1150, "resnet101": 690, "vit_small": 1650, "vit_base": 830,
              "bert_base": 410, "gpt2_small": 96}.get(a.model, 1000) * (0.97 + 0.06 * rng.random())
top_acc = max(0.2, 0.96 - 0.5 * floor / init)
diverge = rel > 5
loss_ema = init
for step in range(1, a.steps + 1):
    frac = step / a.steps
    prog = 1 - math.exp(-rate * frac)
    if diverge and step > 40:
        loss = init * math.exp((step - 40) / 12.0) * (1 + 0.2 * rng.gauss(0, 1))
    else:
        loss = (floor + (init - floor) * (1 - prog)) * math.exp(0.07 * rng.gauss(0, 1))
    if not math.isfinite(loss) or loss > 1e4:
        print(f"\n{RED}step {step}: loss is nan, stopping{RESET}", flush=True)
        print("Traceback (most recent call last):", file=sys.stderr)
        print('  File "train.py", line 131, in train_step', file=sys.stderr)
        print("    raise FloatingPointError(f'loss is nan at step {step}')", file=sys.stderr)
        print(f"FloatingPointError: loss is nan at step {step}", file=sys.stderr, flush=True)
        sys.exit(1)
    if a.oom_at and step >= a.oom_at:
        print("Traceback (most recent call last):", file=sys.stderr)
        print('  File "train.py", line 117, in <module>', file=sys.stderr)
        print("    loss.backward()", file=sys.stderr)
        print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 3.00 GiB. GPU 0 has a total "
              "capacity of 79.10 GiB of which 1.21 GiB is free.", file=sys.stderr, flush=True)
        sys.exit(1)
    acc = max(0.0, min(1.0, top_acc * prog ** 1.4 + 0.012 * rng.gauss(0, 1)))
    grad_norm = (0.35 + 2.5 * (1 - prog) * min(1.0, 4 * step / max(1, a.warmup)) * (rel ** 0.5)) \
        * math.exp(0.15 * rng.gauss(0, 1))
    if diverge and step > 40:
        acc, grad_norm = 0.002 * rng.random(), grad_norm * math.exp((step - 40) / 10.0)
    loss_ema = 0.9 * loss_ema + 0.1 * loss
    e.upd_row(step=step, loss=round(loss, 5), acc=round(acc, 5), grad_norm=round(grad_norm, 4),
              samples_per_s=round(throughput * math.exp(0.025 * rng.gauss(0, 1)), 1))
    e.save_row()
    if step % 10 == 0:
        bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
        print(f"\r[{bar}] step {step}/{a.steps} loss {loss_ema:.4f}", end="", flush=True)
    if step % 100 == 0:
        print(f"\n{GREEN}eval{RESET} step {step}: acc {acc:.4f} loss {loss_ema:.4f}", flush=True)
    time.sleep(a.sleep)
print(f"\n{BOLD}{GREEN}done{RESET}: final loss {loss_ema:.4f}, acc {acc:.4f}", flush=True)
'''

# Prints what `nvidia-smi --query-gpu=index,uuid,memory.used,memory.total,utilization.gpu
# --format=csv,noheader,nounits` would on a box with four busy H100s.
FAKE_NVIDIA_SMI = """#!/bin/sh
cat <<'EOF'
0, GPU-6a1f0c52-9e0b-4c1e-8f3a-1b2c3d4e5f60, 71342, 81559, 98
1, GPU-0b7d2e41-3c5a-4f7e-9d1b-2c3d4e5f6071, 70918, 81559, 97
2, GPU-9c3e1a27-5b4d-4e8f-a2c3-3d4e5f607182, 38204, 81559, 86
3, GPU-2d5f3b18-7c6e-4f90-b3d4-4e5f60718293, 52677, 81559, 91
EOF
"""


def batch_toml(base: str, train: str) -> str:
    """Quick runs first (priority 10/9: they finish or fail), then three long ones that keep running,
    then a queue that waits behind them.  Parameters come from one-point sweeps, as in real use."""
    t = f"{sys.executable} {os.path.basename(train)}"  # runs in the config file's directory
    quick = "--steps 300 --sleep 0.025"
    long = "--steps 4000 --sleep 0.05"

    def one(name, model, tags, desc, lr, bs, extra="", prio=0, gpus="gpus = 1", more=""):
        return textwrap.dedent(f'''
            [[experiments]]
            name = "{name}"
            command = "{t} --model {model} --lr {{lr}} --bs {{bs}} {extra}"
            tags = {json.dumps(tags)}
            description = "{desc}"
            priority = {prio}
            {gpus}
            {more}
            [experiments.sweep]
            lr = {json.dumps(lr if isinstance(lr, list) else [lr])}
            bs = [{bs}]
            ''')

    return "".join([
        textwrap.dedent(f'''\
            [scheduler]
            base_experiment_dir = "{base}"
            max_concurrent_experiments = 3
            auto_restart_on_error = true
            gpus = [0, 1, 2, 3]
            kill_timeout = 3
            '''),
        one("resnet50_lr{lr}", "resnet50", ["imagenet", "lr-sweep"],
            "ResNet-50 on ImageNet-100, cosine schedule: learning-rate sweep", [1.0, 0.1, 0.03, 0.01], 256,
            quick, 10),
        one("resnet18_baseline", "resnet18", ["imagenet", "baseline"],
            "ResNet-18 reference run, same recipe as the ResNet-50 sweep", 0.1, 256, quick, 10),
        one("vit_small_warmup", "vit_small", ["imagenet", "warmup"],
            "ViT-S/16 with a long linear warmup", 0.001, 512, "--warmup 60 " + quick, 10),
        one("bert_base_seq128", "bert_base", ["nlp", "mlm"],
            "BERT-base masked-LM pretraining, sequence length 128", 0.0001, 256, "--seq 128 " + quick, 9),
        one("bert_base_seq512", "bert_base", ["nlp", "mlm"],
            "BERT-base masked-LM pretraining, sequence length 512", 0.0001, 64, "--seq 512 --oom-at 45 " + quick, 9),
        one("gpt2_small_lr6e-4", "gpt2_small", ["nlp", "ddp"],
            "GPT-2 small on OpenWebText, 2-GPU DDP", 0.0006, 32, "--flaky " + long, 5,
            "gpu_ids = [0, 1]", "max_retries = 2"),
        one("vit_base_patch16", "vit_base", ["imagenet", "vit"],
            "ViT-B/16 from scratch, AdamW, 300 epochs", 0.001, 512, "--warmup 200 " + long, 5, "gpu_ids = [2]"),
        one("resnet101_mixup", "resnet101", ["imagenet", "mixup"],
            "ResNet-101 with mixup (alpha 0.2) and label smoothing", 0.1, 256, long, 5, "gpu_ids = [3]"),
        one("efficientnet_b0", "resnet18", ["imagenet", "autoaug"],
            "EfficientNet-B0 with AutoAugment", 0.05, 384, long),
        one("convnext_tiny", "resnet50", ["imagenet"],
            "ConvNeXt-T, AdamW, layer scale", 0.004, 256, long),
        one("vit_base_finetune", "vit_base", ["imagenet", "finetune"],
            "fine-tune the ViT-B/16 checkpoint at 384 px", 0.0001, 128, long, -1, "gpus = 1",
            'depends_on = ["vit_base_patch16"]'),
    ])


def api(server, path: str, **params):
    url = server.url.rstrip("/") + path + ("?" + urllib.parse.urlencode(params, doseq=True) if params else "")
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read().decode())


def wait_for(pred, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def steps_of(server, exp_id: str) -> int:
    """The last logged step of an experiment's current run (0 when none yet)."""
    offset, file_id, last = 0, "", 0
    try:
        while True:
            m = api(server, "/api/metrics", id=exp_id, offset=offset, file_id=file_id)
            steps = [v for v in (m.get("columns") or {}).get("step") or [] if isinstance(v, (int, float))]
            if steps:
                last = int(steps[-1])
            if m.get("eof", True) or m.get("next_offset", 0) <= offset:
                return last
            offset, file_id = m["next_offset"], m.get("file_id", "")
    except Exception:  # noqa: BLE001 - not there yet
        return last


def make_driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={WIDTH},{HEIGHT}", "--hide-scrollbars", "--force-device-scale-factor=1",
                "--disable-extensions", "--no-first-run", "--lang=en-US"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"),
                              options=opts)
    driver.set_page_load_timeout(30)
    # --window-size sets the outer window; make the viewport itself WIDTH x HEIGHT
    inner = driver.execute_script("return [window.innerWidth, window.innerHeight]")
    driver.set_window_size(WIDTH + (WIDTH - inner[0]), HEIGHT + (HEIGHT - inner[1]))
    return driver


def open_page(driver, server, hash_: str, dark: bool) -> None:
    """Load the page fresh at a deep link, in the chosen theme (the page keeps it in localStorage)."""
    url = server.url.rstrip("/") + "/"
    driver.get("about:blank")
    driver.get(url)
    driver.execute_script("localStorage.setItem('exp-theme', arguments[0])", "dark" if dark else "light")
    driver.get("about:blank")
    driver.get(url + hash_)
    wait_for(lambda: driver.execute_script("return document.readyState") == "complete", 20, "the page")


def shoot(driver, name: str) -> str:
    path = os.path.join(DOCS, name)
    driver.execute_script("document.activeElement && document.activeElement.blur && document.activeElement.blur()")
    driver.execute_script("for (const t of document.querySelectorAll('#toasts > *')) t.remove()")
    time.sleep(0.3)
    driver.save_screenshot(path)
    print(f"  wrote {os.path.relpath(path, ROOT)} ({os.path.getsize(path) // 1024} KB)")
    return path


def hover(driver, selector: str, fx: float, fy: float) -> None:
    """Move the mouse over the first element matching selector, at (fx, fy) of its size (for a read-out)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    el = driver.find_element(By.CSS_SELECTOR, selector)
    w, hgt = el.size["width"], el.size["height"]
    ActionChains(driver).move_to_element_with_offset(el, int((fx - 0.5) * w), int((fy - 0.5) * hgt)).perform()
    time.sleep(0.5)


def js_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and "favicon" not in e["message"]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (printed)")
    ap.add_argument("--dark", action="store_true", help="dark theme")
    args = ap.parse_args()

    sys.path.insert(0, ROOT)
    import exp

    os.makedirs(DOCS, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="exp-screens-")
    base = os.path.join(tmp, "results")
    bindir = os.path.join(tmp, "bin")
    os.makedirs(bindir)
    smi = os.path.join(bindir, "nvidia-smi")
    with open(smi, "w") as f:
        f.write(FAKE_NVIDIA_SMI)
    os.chmod(smi, 0o755)
    train = os.path.join(tmp, "train.py")
    with open(train, "w") as f:
        f.write(TRAIN_PY)
    cfg = os.path.join(tmp, "cfg.toml")
    with open(cfg, "w") as f:
        f.write(batch_toml(base, train))

    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    os.environ["PATH"] = env["PATH"]  # the in-process server asks nvidia-smi too
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)

    sched_log = open(os.path.join(tmp, "scheduler.out"), "wb")
    sched = server = driver = None
    try:
        print(f"demo batch in {tmp}")
        sched = subprocess.Popen([sys.executable, EXP_PY, "run", cfg], cwd=tmp, env=env, stdout=sched_log,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        server = exp.DashboardServer(base, port=0)
        server.start()
        print(f"dashboard at {server.url}")

        def ready():
            if sched.poll() is not None:
                raise RuntimeError(f"the scheduler exited early ({sched.returncode}); see {tmp}/scheduler.out")
            try:
                s = api(server, "/api/state")
            except Exception:  # noqa: BLE001 - not up yet
                return None
            c = s.get("counts") or {}
            running = s.get("running") or []
            ok = (c.get("finished", 0) >= 6 and c.get("errors", 0) >= 2 and len(running) >= 3
                  and all(j.get("exp_id") for j in running))
            return s if ok else None

        state = wait_for(ready, 240, "6 finished, 2 failed and 3 running experiments")
        running_ids = [j["exp_id"] for j in state["running"]]
        wait_for(lambda: all(steps_of(server, i) >= 220 for i in running_ids), 120, "the running curves")

        items = api(server, "/api/experiments", limit=200)["items"]
        by_name = {it["name"]: it["id"] for it in items}
        print("experiments:", ", ".join(sorted(by_name)))

        def ids(*names):
            return ",".join(urllib.parse.quote(by_name[n], safe="") for n in names)

        driver = make_driver()
        dark = args.dark

        # 1. dashboard
        open_page(driver, server, "#view=dashboard", dark)
        wait_for(lambda: driver.execute_script(
            "return document.querySelectorAll('#list-running [data-task]').length >= 3"
            " && document.querySelectorAll('#gpu-list .gpu').length >= 1"), 30, "the dashboard lists and GPUs")
        time.sleep(1.5)
        shoot(driver, "dashboard.png")

        # 2. metrics: three runs overlaid, smoothing on
        open_page(driver, server, "#view=metrics&m=" + ids("resnet50_lr0.1", "resnet18_baseline", "vit_small_warmup")
                  + "&metrics=loss,acc,grad_norm,samples_per_s&smooth=0.85", dark)
        wait_for(lambda: driver.execute_script(
            "const c = document.querySelectorAll('#view-metrics canvas.chart');"
            "return c.length >= 4 && Array.from(c).every(x => +x.dataset.series >= 3 && +x.dataset.points > 800)"),
            30, "the charts")
        time.sleep(1.0)
        hover(driver, "#view-metrics canvas.chart", 0.62, 0.45)
        shoot(driver, "chart.png")

        # 3. compare: the lr sweep
        open_page(driver, server, "#view=compare&ids=" + ids("resnet50_lr0.1", "resnet50_lr0.03", "resnet50_lr0.01"),
                  dark)
        wait_for(lambda: driver.execute_script(
            "return document.querySelectorAll('#compare-table tbody tr').length > 5"
            " && Array.from(document.querySelectorAll('#compare-charts canvas.chart'))"
            "      .some(x => +x.dataset.series >= 3)"), 30, "the comparison")
        time.sleep(1.0)
        shoot(driver, "compare.png")

        # 4. query: a filter applied, sorted by accuracy
        open_page(driver, server, "#view=query&tags=imagenet&sort=" + urllib.parse.quote("-metric:acc", safe=""),
                  dark)
        wait_for(lambda: driver.execute_script(
            "return document.querySelectorAll('#query-results tbody tr[data-id]').length >= 5"), 30, "the query results")
        for n in ("resnet50_lr0.1", "resnet50_lr0.03", "resnet50_lr0.01"):  # what compare.png shows
            driver.execute_script(
                "for (const tr of document.querySelectorAll('#query-results tbody tr[data-id]'))"
                "  if (tr.dataset.id === arguments[0]) tr.querySelector('input.row-select').click();", by_name[n])
        time.sleep(1.0)
        shoot(driver, "query.png")

        errs = js_errors(driver)
        if errs:
            print("JS errors on the page:\n  " + "\n  ".join(errs), file=sys.stderr)
            return 1
        return 0
    finally:
        if driver is not None:
            driver.quit()
        if sched is not None:
            if sched.poll() is None:
                subprocess.run([sys.executable, EXP_PY, "shutdown", base, "--now"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
                try:
                    sched.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    sched.terminate()
                    sched.wait(timeout=10)
        if server is not None:
            server.close()
        sched_log.close()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
