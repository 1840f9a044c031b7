"""Benchmark: the dashboard server (`exp see`) on a big results directory.

    python tests/bench/bench_dashboard.py [--quick] [--dirs 10000] [--log-mb 1024] [--rows 1000000]
                                          [--poll-seconds 20] [--clients 50]

One server, `python exp.py see DIR --no-browser --port 0` started as a
subprocess, serves everything below; the client is http.client with
keep-alive connections, and a request's latency runs from sending it to the
last byte of the answer (the JSON is parsed afterwards, to check it).

The directory is generated in a temporary directory with exp's real layout
(`<name>_<YYYY-MM-DD__HH-MM-SS>/metadata.json`, `terminal_logs/run_0001.log`,
`metrics/run_0001.csv`, metadata with the fields exp writes; names, tags,
params and statuses vary, a tenth sit in a subfolder, a few metadata files
are corrupt), plus one experiment with a big log and one with a big metrics
CSV.  The files were just written, so they are in the page cache: "cold"
below means a new server process with an empty index, not a cold disk.

1. --dirs experiments: GET /api/experiments with a filter (name regex,
   status, a tag) sorted by `-metric:loss`, first page.  First request on the
   new server (it builds its index) <= 3 s; then repeated requests back to
   back (the index re-checks its mtimes every 0.5 s, so some of them pay for
   that) median and p95 <= 100 ms.  Printed for reference: /api/health (the
   HTTP floor) and the unfiltered listing.
2. GET /api/log?tail=200 of a --log-mb log (real text lines written in full:
   a 1 MiB block of lines repeated, then distinct lines at the end; no sparse
   file): median <= 20 ms.
3. A --rows metrics CSV: the first read in chunks until eof (time printed),
   then, a few times, 3 rows appended and GET /api/metrics with
   offset=next_offset&file_id=...: median <= 20 ms.
4. The server's peak RSS (VmHWM of /proc/PID/status), read after each phase:
   <= 80 MB through all of it.
5. --clients threads poll every second for --poll-seconds, each tick GET
   /api/state, /api/experiments?limit=50 and /api/log?tail=200 (of a running
   experiment when there is one), while `python exp.py run` runs short
   experiments (4 at a time, each writing 40 metric rows over 2 s) in the same
   directory: every answer 200 and valid JSON, p99 latency <= 200 ms.  Before
   it, one client's sequential latency of each polled endpoint is printed, so
   the work the polling asks of the server per second can be compared to the
   one second it has (its Python runs one thread at a time).

Baselines measured in the same run: /api/health over a keep-alive connection
and over a new connection per request (the HTTP floor); the same work done
in this process by exp.Dashboard without HTTP (listing, log tail, metrics,
state), so the server's share shows; and the idle peak RSS of `python -m exp
see` with exp's bytecode cached (`python exp.py see` compiles the file at
start, then runs on as an import of it, which compiles it again unless its
bytecode is cached: the first compile's peak stays in VmHWM).

Needs about --log-mb MiB + 0.5 GiB of free disk in the temp directory (checked
first).  The clients run in this process: on a small machine they compete for
the CPU with the server, the scheduler and its experiments.
"""
import argparse
import http.client
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXP_PY = os.path.join(ROOT, "exp.py")
sys.path.insert(0, ROOT)

import exp  # noqa: E402

MODELS = ["resnet18", "resnet50", "vit_small", "vit_base", "bert_base", "gpt2_small", "mlp", "convnext", "unet",
          "lstm"]
TAGS = ["baseline", "ablation", "sweep", "long", "debug", "augment", "fp16", "multi_gpu"]
FILTER = {"name": "^(resnet|vit)", "status": "finished", "tags": "baseline", "sort": "-metric:loss", "limit": "50"}
T0 = 1_767_225_600  # 2026-01-01T00:00:00Z: created_at of the first generated experiment


# ---------------------------------------------------------------- generation


def iso(t):
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(t))


def stamp(t):
    return time.strftime("%Y-%m-%d__%H-%M-%S", time.gmtime(t))


def metadata(name, created, status, tags, params, description, work_dir, duration):
    """metadata.json as exp leaves it after record_start / record_end (see _initial_metadata)."""
    started = iso(created + 1)
    ended = iso(created + 1 + duration) if status != "running" else None
    code = {"finished": 0, "error": 1, "killed": -15, "running": None}[status]
    reason = {"error": "exit code 1", "killed": "terminated by user"}.get(status)
    cause = "RuntimeError: CUDA out of memory" if status == "error" else None
    run = {"id": "run_0001", "pid": 40000 + int(created) % 20000, "started_at": started, "ended_at": ended,
           "exit_code": code, "status": status, "start_ticks": 1093689}
    if status != "running":
        run.update(duration=duration, reason=reason, cause=cause)
    return {
        "name": name, "command": f"python train.py --model {name} " + " ".join(f"--{k} {v}" for k, v in params.items()),
        "tags": tags, "description": description, "gpu_ids": [int(created) % 4], "cwd": "/home/user/project",
        "environment": {"WANDB_MODE": "offline"}, "params": params, "status": status, "exit_code": code,
        "pid": None if status != "running" else run["pid"], "hostname": "gpu-node-3", "user": "user",
        "timestamp": iso(created), "timestamp_dir": stamp(created), "created_at": iso(created), "started_at": started,
        "ended_at": ended, "duration": duration if status != "running" else None, "current_run_id": "run_0001",
        "runs": [run], "exp_version": "0.2.0", "python_version": "3.11.7",
        "python_executable": "/opt/conda/bin/python",
        "git": {"commit": f"{int(created) * 2654435761 % (1 << 40):010x}", "branch": "main",
                "dirty": int(created) % 7 == 0},
        "error": None, "reason": reason, "cause": cause,
    }


def make_experiment(base, rel_parent, name, created, meta, log_text, csv_text):
    d = os.path.join(base, rel_parent, f"{name}_{stamp(created)}")
    os.makedirs(d)
    os.mkdir(os.path.join(d, "terminal_logs"))
    os.mkdir(os.path.join(d, "metrics"))
    if isinstance(meta, dict):
        meta = dict(meta, work_dir=d)
        meta = json.dumps(meta, indent=2)
    with open(os.path.join(d, "metadata.json"), "w") as f:
        f.write(meta)
    if log_text is not None:
        with open(os.path.join(d, "terminal_logs", "run_0001.log"), "w") as f:
            f.write(log_text)
    if csv_text is not None:
        with open(os.path.join(d, "metrics", "run_0001.csv"), "w") as f:
            f.write(csv_text)
    return os.path.relpath(d, base).replace(os.sep, "/")


def generate_dirs(base, n, rng):
    """n experiments; returns how many match FILTER (computed here, to check the server's total)."""
    expected = 0
    for i in range(n):
        created = T0 + i * 61
        model = MODELS[rng.randrange(len(MODELS))]
        name = model if rng.random() < 0.7 else f"{model}_ft"
        tags = sorted(rng.sample(TAGS, rng.randrange(0, 4)))
        r = rng.random()
        status = "finished" if r < 0.78 else "error" if r < 0.90 else "killed" if r < 0.97 else "running"
        params = {"lr": rng.choice([0.1, 0.03, 0.01, 0.003, 0.001]), "batch_size": rng.choice([32, 64, 128, 256]),
                  "seed": rng.randrange(5), "optimizer": rng.choice(["adam", "sgd", "adamw"]),
                  "dropout": round(rng.random() * 0.5, 2)}
        rows = rng.randrange(5, 60)
        loss0 = 2.0 + rng.random()
        # A validation loss every 10 steps, empty in the rows between, as training scripts log it.
        lines = ["step,loss,acc,lr,val_loss"] + [
            f"{s},{loss0 / (s + 1)!r},{1 - 0.5 / (s + 1)!r},{params['lr']!r},"
            + (f"{1.1 * loss0 / (s + 1)!r}" if s % 10 == 0 else "") for s in range(rows)]
        csv_text = "\n".join(lines) + "\n"
        log = (f"[exp] {iso(created + 1)} run_0001 of '{name}' starting\n[exp] command: python train.py\n"
               + "".join(f"step {s} loss {loss0 / (s + 1):.4f}\n" for s in range(rows)))
        meta = metadata(name, created, status, tags, params, f"{model} on imagenet subset, run {i}",
                        None, round(30 + rng.random() * 3000, 3))
        if i % 2000 == 1999:
            meta = '{"name": "broken", "status": "fini'  # a corrupt metadata.json: shown as unreadable
        make_experiment(base, "archive" if i % 10 == 5 else "", name, created, meta, log, csv_text)
        if (isinstance(meta, dict) and status == "finished" and "baseline" in tags
                and name.startswith(("resnet", "vit"))):
            expected += 1
    return expected


def write_big_log(path, size):
    """`size` bytes of real text lines: a 1 MiB block of varied lines repeated, then distinct last lines."""
    block_lines = []
    i = 0
    while sum(map(len, block_lines)) < (1 << 20):
        block_lines.append(f"2026-01-01 00:00:{i % 60:02d} INFO train step {i} loss {1 / (i + 1):.6f} "
                           f"lr 0.001 throughput {1000 + i % 97} samples/s grad_norm {0.5 + (i % 13) / 10}\n")
        i += 1
    block = "".join(block_lines).encode()
    tail = "".join(f"final line {k}: epoch done, loss {1 / (k + 1):.6f}\n" for k in range(1000)).encode()
    with open(path, "wb") as f:
        written = 0
        while written + len(block) + len(tail) <= size:
            f.write(block)
            written += len(block)
        f.write(tail)
        written += len(tail)
    return written


def write_big_csv(path, rows):
    """A metrics CSV as exp writes it (floats by repr), `rows` rows."""
    with open(path, "w") as f:
        f.write("step,epoch,loss,acc,lr,time\n")
        chunk = 50_000
        for start in range(0, rows, chunk):
            f.write("".join(f"{s},{s // 5000},{2.5 / (s + 1)!r},{1 - 1 / (s + 2)!r},0.0003,{s * 0.0137!r}\n"
                            for s in range(start, min(rows, start + chunk))))
    return os.path.getsize(path)


def last_values_cost(csv_path, tmp):
    """Best-of-20 seconds of last_metrics_values on the big CSV, on a copy of its last 100k rows with one
    more column logged only at the first step (the look-up's worst case), and of last_metrics_row."""
    once = os.path.join(tmp, "once.csv")
    with open(csv_path, "rb") as src, open(once, "wb") as dst:
        lines = src.read().splitlines()
        dst.write(lines[0] + b",num_params\n" + lines[1] + b",1234567\n"
                  + b"".join(line + b",\n" for line in lines[2:100_001]))

    def best(fn, path):
        out = []
        for _ in range(20):
            t = time.perf_counter()
            fn(path)
            out.append(time.perf_counter() - t)
        return min(out)

    return {"full": best(exp.last_metrics_values, csv_path), "once": best(exp.last_metrics_values, once),
            "row": best(exp.last_metrics_row, csv_path)}


# ---------------------------------------------------------------- server and client


class Server:
    def __init__(self, base, tmp):
        self.errlog = open(os.path.join(tmp, "server.stderr"), "w+")
        t = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, EXP_PY, "see", base, "--no-browser", "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=self.errlog, text=True)
        line = self.proc.stdout.readline()
        self.start_s = time.perf_counter() - t
        url = line.rsplit(": ", 1)[-1].strip()
        if not url.startswith("http://"):
            self.close()
            sys.exit(f"exp see did not print its URL (got {line!r}); stderr: {self.stderr()}")
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        self.pid = self.proc.pid

    def status(self):
        """(VmHWM, VmRSS) in MB, CPU seconds (user + system) so far."""
        mem = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmHWM", "VmRSS"):
                    mem[k] = int(v.split()[0]) / 1024
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return mem["VmHWM"], mem["VmRSS"], cpu

    def stderr(self):
        self.errlog.flush()
        self.errlog.seek(0)
        return self.errlog.read()[-3000:]

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(2)  # SIGINT: exp see stops cleanly
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self.errlog.close()


class Client:
    """One keep-alive connection; get() returns (status, body bytes, seconds to the last byte)."""

    def __init__(self, server, timeout=60):
        self.server, self.timeout = server, timeout
        self.conn = None

    def get(self, path, params=None):
        if params:
            path += "?" + urllib.parse.urlencode(params, doseq=True)
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.server.host, self.server.port, timeout=self.timeout)
        t = time.perf_counter()
        try:
            self.conn.request("GET", path)
            r = self.conn.getresponse()
            body = r.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        dt = time.perf_counter() - t
        if r.will_close:
            self.close()
        return r.status, body, dt

    def get_json(self, path, params=None):
        status, body, dt = self.get(path, params)
        if status != 200:
            raise RuntimeError(f"GET {path} {params}: HTTP {status}: {body[:500]!r}")
        return json.loads(body), dt

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def module_server_rss(base, tmp):
    """Idle VmHWM (MB) of `python -m exp see` with exp's bytecode cached, as the installed `exp` command runs:
    `python exp.py` compiles the whole file at every start, and the compiler's memory counts in the peak
    (its parse tree is freed: `exp see` re-executes itself as an import)."""
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONPYCACHEPREFIX=os.path.join(tmp, "pycache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-c", "import exp"], env=env, check=True)  # writes the cache
    proc = subprocess.Popen([sys.executable, "-m", "exp", "see", base, "--no-browser", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    try:
        proc.stdout.readline()
        with open(f"/proc/{proc.pid}/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM"))
    finally:
        proc.send_signal(2)
        proc.wait(10)
        proc.stdout.close()


def pct(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def ms(x):
    return f"{x * 1000:.1f} ms"


# ---------------------------------------------------------------- phases


def phase_listing(client, reps, expected, n_total):
    h = [client.get_json("/api/health")[1] for _ in range(20)]
    h_new = []  # a new connection per request: no reply waits behind an unacknowledged one (see the report)
    for _ in range(20):
        client.close()
        h_new.append(client.get_json("/api/health")[1])
    first, cold = client.get_json("/api/experiments", FILTER)
    assert first["scanned"] == n_total, f"the server sees {first['scanned']} experiments, {n_total} were written"
    assert first["total"] == expected, f"the filter kept {first['total']}, expected {expected}"
    losses = [it["last_metrics"].get("loss") for it in first["items"]]
    assert len(first["items"]) == min(50, expected) and losses == sorted(losses, reverse=True), "not sorted by -loss"
    assert all(it["status"] == "finished" and "baseline" in it["tags"] for it in first["items"])
    warm = [client.get_json("/api/experiments", FILTER)[1] for _ in range(reps)]
    plain = [client.get_json("/api/experiments", {"limit": "50"})[1] for _ in range(max(10, reps // 4))]
    return {"cold": cold, "warm": warm, "health": h, "health_new": h_new, "plain": plain, "total": first["total"],
            "scanned": first["scanned"]}


def inprocess_listing(base, reps):
    """The same work in this process, without HTTP: index build, a query on a fresh index (within its
    time-to-live: no mtime checks), the mtime re-check alone (what every 0.5 s costs), the JSON encoding."""
    d = exp.Dashboard(base)
    t = time.perf_counter()
    d.index.entries()
    build = time.perf_counter() - t
    q = {k: [v] for k, v in FILTER.items()}
    ttl, d.index.ttl = d.index.ttl, 1e9
    query, plain, enc = [], [], []
    for _ in range(reps):
        t = time.perf_counter()
        r = d.api_experiments(q)
        t1 = time.perf_counter()
        json.dumps(r, ensure_ascii=False, allow_nan=False, default=str).encode()
        enc.append(time.perf_counter() - t1)
        query.append(t1 - t)
    for _ in range(max(10, reps // 4)):
        t = time.perf_counter()
        d.api_experiments({"limit": ["50"]})
        plain.append(time.perf_counter() - t)
    d.index.ttl = 0
    refresh = []
    for _ in range(max(10, reps // 4)):
        d.index._checked = -1e18
        t = time.perf_counter()
        d.index.entries()
        refresh.append(time.perf_counter() - t)
    d.index.ttl = ttl
    return {"build": build, "query": query, "plain": plain, "refresh": refresh, "json": enc}


def phase_log(client, exp_id, size, reps, base):
    q = {"id": exp_id, "tail": "200"}
    r, _ = client.get_json("/api/log", q)
    assert r["size"] == size and r["truncated_before"] and r["text"].count("\n") == 200, "wrong tail"
    assert r["text"].endswith("final line 999: epoch done, loss 0.001000\n")
    lat = [client.get_json("/api/log", q)[1] for _ in range(reps)]
    d = exp.Dashboard(base)
    qq = {k: [v] for k, v in q.items()}
    work = []
    for _ in range(reps):
        t = time.perf_counter()
        json.dumps(d.api_log(qq), ensure_ascii=False).encode()
        work.append(time.perf_counter() - t)
    return lat, work


def phase_metrics(client, exp_id, csv_path, rows, reps, server, base):
    t = time.perf_counter()
    offset, file_id, got, chunks, peak = 0, "", 0, 0, []
    while True:
        r, _ = client.get_json("/api/metrics", {"id": exp_id, "offset": offset, "file_id": file_id})
        got += r["rows"]
        chunks += 1
        offset, file_id = r["next_offset"], r["file_id"]
        peak.append(server.status()[0])
        if r["eof"]:
            break
    first = time.perf_counter() - t
    assert got == rows, f"read {got} rows of {rows}"
    step = rows
    inc, work = [], []
    d = exp.Dashboard(base)
    with open(csv_path, "a") as f:
        for _ in range(reps):
            f.write("".join(f"{s},{s // 5000},{2.5 / (s + 1)!r},{1 - 1 / (s + 2)!r},0.0003,{s * 0.0137!r}\n"
                            for s in range(step, step + 3)))
            f.flush()
            step += 3
            q = {"id": exp_id, "offset": offset, "file_id": file_id}
            r, dt = client.get_json("/api/metrics", q)
            assert r["rows"] == 3 and not r["reset"] and r["columns"]["step"] == [step - 3, step - 2, step - 1], r
            t = time.perf_counter()  # the same request in this process, without HTTP
            json.dumps(d.api_metrics({k: [str(v)] for k, v in q.items()}), ensure_ascii=False).encode()
            work.append(time.perf_counter() - t)
            offset = r["next_offset"]
            inc.append(dt)
    return {"first": first, "chunks": chunks, "inc": inc, "work": work}


def write_batch(path, base, n):
    cmd = (f"{sys.executable} -c \"import exp,time; e=exp.load_experiment(); "
           "[ (e.upd_row(step=i, loss=1/(i+1)), e.save_row(), time.sleep(0.05)) for i in range(40)]\"")
    lines = ["[scheduler]", f"base_experiment_dir = {json.dumps(base)}", "max_concurrent_experiments = 4", ""]
    for i in range(n):
        lines += ["[[experiments]]", f'name = "live{i:02d}"', f"command = {json.dumps(cmd)}",
                  'tags = ["live"]', ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def phase_poll(server, base, tmp, clients, seconds, fallback_log_id):
    cfg = os.path.join(tmp, "live.toml")
    n_exp = max(8, 2 * seconds)
    write_batch(cfg, base, n_exp)
    env = dict(os.environ, PYTHONPATH=ROOT + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH")
                                              else ""))
    sched_out = open(os.path.join(tmp, "scheduler.out"), "w+")
    sched = subprocess.Popen([sys.executable, EXP_PY, "run", cfg], stdout=sched_out, stderr=subprocess.STDOUT,
                             env=env, cwd=tmp)
    state_path = os.path.join(base, ".exp_state", "scheduler_state.json")
    deadline = time.monotonic() + 15
    while not os.path.exists(state_path) and time.monotonic() < deadline and sched.poll() is None:
        time.sleep(0.05)

    results = []  # (endpoint, seconds, ok, why)
    lock = threading.Lock()
    late = [0]
    running_seen = [0]
    start = time.monotonic() + 0.5
    end = start + seconds

    def run_client(k):
        c = Client(server, timeout=30)
        rnd = random.Random(k)
        tick = start + rnd.random()
        mine = []
        while True:
            now = time.monotonic()
            if tick >= end:
                break
            if tick > now:
                time.sleep(tick - now)
            log_id = fallback_log_id
            for ep, params in (("state", None), ("experiments", {"limit": "50"}), ("log", None)):
                if ep == "log":
                    params = {"id": log_id, "tail": "200"}
                try:
                    status, body, dt = c.get("/api/" + ep, params)
                except Exception as e:  # noqa: BLE001 - every failure counts, none stops the client
                    mine.append((ep, None, False, f"{type(e).__name__}: {e}"))
                    continue
                ok, why = status == 200, f"HTTP {status}: {body[:200]!r}"
                try:
                    doc = json.loads(body)
                except ValueError as e:
                    ok, why = False, f"invalid JSON ({e}): {body[:200]!r}"
                else:
                    if ep == "state" and ok:
                        live = [j["exp_id"] for j in doc.get("running", []) if j.get("exp_id")]
                        if live:
                            log_id = rnd.choice(live)
                            with lock:
                                running_seen[0] += 1
                mine.append((ep, dt, ok, None if ok else why))
            tick += 1.0
            if tick < time.monotonic():  # fell behind: count it, and go on from now
                with lock:
                    late[0] += 1
                tick = time.monotonic()
        c.close()
        with lock:
            results.extend(mine)

    cpu0 = server.status()[2]
    me0 = os.times()
    t0 = time.monotonic()
    threads = [threading.Thread(target=run_client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    wall = time.monotonic() - t0
    cpu = server.status()[2] - cpu0
    me1 = os.times()
    clients_cpu = (me1.user - me0.user) + (me1.system - me0.system)
    load = os.getloadavg()[0]
    try:
        code = sched.wait(120)
    except subprocess.TimeoutExpired:
        sched.terminate()
        code = sched.wait()
    sched_out.seek(0)
    sched_text = sched_out.read()
    sched_out.close()
    return {"results": results, "late": late[0], "wall": wall, "cpu": cpu, "sched_code": code,
            "clients_cpu": clients_cpu, "load": load,
            "sched_tail": sched_text[-1500:], "n_exp": n_exp, "running_seen": running_seen[0]}


# ---------------------------------------------------------------- main


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2,000 dirs, a 100 MB log, 200k rows, 10 s of polling")
    p.add_argument("--dirs", type=int, default=10_000)
    p.add_argument("--log-mb", type=int, default=1024, help="MiB")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--poll-seconds", type=int, default=20)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--reps", type=int, default=100, help="requests per latency measurement")
    p.add_argument("--tmp", help="parent of the temporary directory (default: the system's)")
    args = p.parse_args()
    if args.quick:
        args.dirs, args.log_mb, args.rows, args.poll_seconds, args.reps = 2000, 100, 200_000, 10, 40

    print(f"machine: {os.cpu_count()} CPUs, load {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
          f"Python {sys.version.split()[0]} ({sys.platform})")
    try:
        rev = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    print(f"exp {exp.__version__} ({EXP_PY}{', ' + rev if rev else ''})")
    parent = args.tmp or tempfile.gettempdir()
    free = shutil.disk_usage(parent).free
    need = args.log_mb * (1 << 20) + args.rows * 80 + args.dirs * 40_000 + (300 << 20)
    print(f"disk: {free / (1 << 30):.1f} GiB free in {parent}, about {need / (1 << 30):.1f} GiB needed")
    if free < need:
        sys.exit(f"not enough free disk in {parent} for a {args.log_mb} MiB log and {args.dirs} directories "
                 f"({free / (1 << 30):.1f} GiB free, {need / (1 << 30):.1f} GiB needed): free some, pass --tmp "
                 "elsewhere, or a smaller --log-mb")

    tmp = tempfile.mkdtemp(prefix="exp-bench-dash-", dir=parent)
    server = None
    try:
        base = os.path.join(tmp, "results")
        os.mkdir(base)
        rng = random.Random(1)
        t = time.perf_counter()
        expected = generate_dirs(base, args.dirs, rng)
        gen_dirs = time.perf_counter() - t

        created = T0 + args.dirs * 61 + 100
        big = metadata("biglog", created, "finished", ["big"], {"lr": 0.1}, "a 1 GiB log", None, 86400.0)
        log_id = make_experiment(base, "", "biglog", created, big, None, "step,loss\n0,1.0\n")
        log_path = os.path.join(base, log_id, "terminal_logs", "run_0001.log")
        t = time.perf_counter()
        log_size = write_big_log(log_path, args.log_mb << 20)
        gen_log = time.perf_counter() - t

        created += 100
        big = metadata("bigcsv", created, "running", ["big"], {"lr": 0.1}, "a 1M-row metrics CSV", None, 0)
        csv_id = make_experiment(base, "", "bigcsv", created, big, "[exp] starting\n", None)
        csv_path = os.path.join(base, csv_id, "metrics", "run_0001.csv")
        t = time.perf_counter()
        csv_size = write_big_csv(csv_path, args.rows)
        gen_csv = time.perf_counter() - t
        os.sync()
        n_total = args.dirs + 2
        print(f"generated: {args.dirs} experiment dirs in {gen_dirs:.1f} s ({expected} match the filter); "
              f"log {log_size / (1 << 20):.0f} MiB of real text lines in {gen_log:.1f} s; "
              f"metrics CSV {args.rows} rows, {csv_size / (1 << 20):.0f} MiB in {gen_csv:.1f} s")

        server = Server(base, tmp)
        mem = [("started", server.status())]
        client = Client(server)
        print(f"server: pid {server.pid}, up in {ms(server.start_s)}, VmHWM {mem[0][1][0]:.1f} MB idle")

        # 1. listing
        lst = phase_listing(client, args.reps, expected, n_total)
        mem.append(("listing", server.status()))
        inproc = inprocess_listing(base, args.reps)
        lastv = last_values_cost(csv_path, tmp)
        # 2. log tail
        log_lat = phase_log(client, log_id, log_size, max(20, args.reps // 2), base)
        mem.append(("log tail", server.status()))
        # 3. metrics
        met = phase_metrics(client, csv_id, csv_path, args.rows, max(20, args.reps // 2), server, base)
        mem.append(("metrics", server.status()))
        client.close()
        # 5. polling, after one client's sequential latency of each polled endpoint
        seq = {}
        c = Client(server)
        for ep, params in (("state", None), ("experiments", {"limit": "50"}), ("log", {"id": log_id, "tail": "200"})):
            seq[ep] = statistics.median(c.get_json("/api/" + ep, params)[1] for _ in range(20))
        c.close()
        poll = phase_poll(server, base, tmp, args.clients, args.poll_seconds, log_id)
        mem.append(("polling", server.status()))
        d = exp.Dashboard(base)
        state_work = []
        for _ in range(20):
            t = time.perf_counter()
            json.dumps(d.api_state({}), ensure_ascii=False).encode()
            state_work.append(time.perf_counter() - t)
        idle_module = module_server_rss(base, tmp)
        if server.proc.poll() is not None:
            print(f"the server exited ({server.proc.returncode}): {server.stderr()}")
    finally:
        if server is not None:
            server.close()
        t = time.perf_counter()
        shutil.rmtree(tmp, ignore_errors=True)
        cleanup = time.perf_counter() - t

    # ------------------------------------------------------------ report
    med = statistics.median
    print(f"cleanup: {cleanup:.1f} s")
    print(f"0. HTTP floor, /api/health: keep-alive median {ms(med(lst['health']))}, a new connection per request "
          f"median {ms(med(lst['health_new']))}")
    if med(lst["health"]) > 0.02 > med(lst["health_new"]):
        print("   (keep-alive answers wait ~40 ms: the server writes the headers and the body in two sends, and "
              "the second waits, by Nagle's algorithm, for the client's delayed ACK of the first; "
              "TCP_NODELAY on the server's sockets, or one send per answer, removes it)")
    print(f"1. /api/experiments over {lst['scanned']} experiments, filter {FILTER} -> {lst['total']} kept:")
    warm_med, warm_p95 = med(lst["warm"]), pct(lst["warm"], 95)
    print(f"   first (new server, index built): {ms(lst['cold'])}")
    print(f"   warm, {len(lst['warm'])} back to back: median {ms(warm_med)}, p95 {ms(warm_p95)}, "
          f"max {ms(max(lst['warm']))}")
    print(f"   for reference: unfiltered ?limit=50 median {ms(med(lst['plain']))}, p95 {ms(pct(lst['plain'], 95))}")
    print(f"   a metric's last logged value (exp.last_metrics_values) of a {args.rows}-row CSV: {ms(lastv['full'])} "
          f"when every column is in the last rows, {ms(lastv['once'])} for a column logged only at the first step "
          f"(it looks {exp.LAST_VALUES_MAX_ROWS} rows up for it); the last row alone (last_metrics_row) "
          f"{ms(lastv['row'])}: per experiment per listing, once per change in the dashboard's index")
    print(f"   in-process, no HTTP: index build {ms(inproc['build'])}; filtered query (index fresh) median "
          f"{ms(med(inproc['query']))}, unfiltered {ms(med(inproc['plain']))}; JSON encoding "
          f"{ms(med(inproc['json']))}; the mtime re-check of the index (every {exp.DASHBOARD_INDEX_TTL} s, "
          f"under its lock) median {ms(med(inproc['refresh']))}")
    log_med = med(log_lat[0])
    print(f"2. /api/log tail=200 of a {log_size / (1 << 20):.0f} MiB log, {len(log_lat[0])} requests: "
          f"median {ms(log_med)}, p95 {ms(pct(log_lat[0], 95))}; in-process, no HTTP: median {ms(med(log_lat[1]))}")
    inc_med = med(met["inc"])
    print(f"3. /api/metrics of a {args.rows}-row CSV ({csv_size / (1 << 20):.0f} MiB): first read "
          f"{met['first']:.2f} s in {met['chunks']} chunks ({args.rows / met['first'] / 1000:.0f}k rows/s); "
          f"incremental (3 new rows), {len(met['inc'])} requests: median {ms(inc_med)}, p95 {ms(pct(met['inc'], 95))}; "
          f"in-process, no HTTP: median {ms(med(met['work']))}")
    print("4. server memory (VmHWM peak / VmRSS now, MB; CPU s so far) after each phase: "
          + "; ".join(f"{k} {s[0]:.1f}/{s[1]:.1f} ({s[2]:.1f} s)" for k, s in mem))
    print(f"   for reference: `python -m exp see` with exp's bytecode cached (as the installed `exp`) starts at "
          f"VmHWM {idle_module:.1f} MB; `python exp.py see` at {mem[0][1][0]:.1f} MB (compiles exp.py at start, and "
          f"again as the import it runs on as, unless the bytecode is cached)")
    hwm = max(s[0] for _, s in mem)
    res = poll["results"]
    lat = [r[1] for r in res if r[1] is not None]
    errors = [r for r in res if not r[2]]
    print(f"5. {args.clients} clients polling for {args.poll_seconds} s while `exp run` ran {poll['n_exp']} "
          f"experiments (exit code {poll['sched_code']}); {len(res)} requests in {poll['wall']:.1f} s "
          f"({len(res) / poll['wall']:.0f}/s of {args.clients * 3}/s asked; {poll['late']} ticks late), "
          f"{len(errors)} errors, {poll['running_seen']} state answers showed running experiments")
    print(f"   one client's sequential latency: state {ms(seq['state'])}, experiments?limit=50 "
          f"{ms(seq['experiments'])}, log tail {ms(seq['log'])}; in-process, /api/state takes "
          f"{ms(med(state_work))}")
    print(f"   server CPU during polling: {poll['cpu']:.1f} s in {poll['wall']:.1f} s "
          f"({poll['cpu'] / poll['wall'] * 100:.0f}% of one core; its Python runs one thread at a time); "
          f"the clients (this process) {poll['clients_cpu']:.1f} s; load average at the end {poll['load']:.2f} "
          f"on {os.cpu_count()} CPUs")
    for ep in ("state", "experiments", "log"):
        v = [r[1] for r in res if r[0] == ep and r[1] is not None]
        if v:
            print(f"   {ep:12s} n={len(v):5d}  p50 {ms(pct(v, 50))}  p90 {ms(pct(v, 90))}  p99 {ms(pct(v, 99))}  "
                  f"max {ms(max(v))}")
    for r in errors[:5]:
        print(f"   error: {r[0]}: {r[3]}")
    if poll["sched_code"] != 0:
        print(f"   the scheduler exited {poll['sched_code']}: {poll['sched_tail']}")
    p99 = pct(lat, 99) if lat else float("inf")
    print(f"   all requests: p50 {ms(pct(lat, 50))}, p99 {ms(p99)}")

    def target(text, ok, figure):
        print(f"target {text}: {'PASS' if ok else 'FAIL'} ({figure})")

    target("listing first load <= 3 s", lst["cold"] <= 3.0, f"{lst['cold']:.2f} s")
    target("listing warm median <= 100 ms", warm_med <= 0.1, ms(warm_med))
    target("listing warm p95 <= 100 ms", warm_p95 <= 0.1, ms(warm_p95))
    target("log tail 200 lines median <= 20 ms", log_med <= 0.02, ms(log_med))
    target("incremental metrics median <= 20 ms", inc_med <= 0.02, ms(inc_med))
    target("server peak RSS <= 80 MB", hwm <= 80, f"{hwm:.1f} MB")
    target("polling: no error", not errors and poll["sched_code"] == 0,
           f"{len(errors)} errors in {len(res)} requests, scheduler exit {poll['sched_code']}")
    target("polling p99 <= 200 ms", p99 <= 0.2, ms(p99))


if __name__ == "__main__":
    main()
