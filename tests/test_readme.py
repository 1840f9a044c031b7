"""Every shell command in README.md is run here (or, for the test command, by CI)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")

#: The README's install and test commands: CI (.ci/run) runs them; running the tests here would recurse.
INSTALL_COMMAND = 'pip install -e ".[test]"'
TEST_COMMAND = "python -m pytest tests"


def readme_commands():
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    cmds = []
    for block in blocks:
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                cmds.append(line)
    return cmds


EXPECTED = [
    INSTALL_COMMAND,  # first: on Python < 3.11 reading TOML needs tomli, which this installs
    "python exp.py run examples/config.toml",
    TEST_COMMAND,
    "python examples/run_exp.py",
    "python examples/train.py --steps 5",
    "EXP_STANDALONE=1 python examples/train.py --steps 5",
    "python exp.py run examples/config.toml --dry-run",
    "python exp.py ls examples/results",
    "python exp.py ls examples/results --json --status finished",
    "python exp.py --help",
    "pip install -e .",
    "exp --help",
    "python exp.py see ./results",
]


def test_readme_lists_exactly_the_commands_tested_here():
    # A command added to the README without a check here fails this test.
    assert readme_commands() == EXPECTED


def test_setup_commands_come_first():
    setup = README.split("## Set up", 1)[1].split("##", 1)[0]
    assert re.findall(r"```bash\n(.*?)```", setup, flags=re.S)[0].splitlines() == EXPECTED[:3]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert '-m pip install -q --disable-pip-version-check -e ".[test]"' in ci
    assert '-m pytest tests' in ci
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'test = \[[^\]]*"pytest', pyproject)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A copy of the files a user gets, so the commands cannot litter the repository."""
    dest = tmp_path_factory.mktemp("checkout")
    for name in ("exp.py", "exp_ui.html", "README.md", "LICENSE", "pyproject.toml"):
        shutil.copy(ROOT / name, dest / name)
    shutil.copytree(ROOT / "examples", dest / "examples",
                    ignore=shutil.ignore_patterns("results", "__pycache__"))
    return dest


def sh(cmd, cwd, env=None, timeout=120):
    full_env = dict(os.environ)
    for k in ("EXPERIMENT_WORK_DIR", "EXPERIMENT_RUN_ID", "EXPERIMENT_NAME", "EXP_STANDALONE"):
        full_env.pop(k, None)
    full_env.update(env or {})
    return subprocess.run(cmd, shell=True, cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def as_python(cmd):
    """The README says `python`; run it with the interpreter under test."""
    return re.sub(r"(^|\s)python(?=\s)", r"\1" + sys.executable, cmd, count=1)


def test_readme_commands_in_order(checkout):
    py_cmds = [c for c in EXPECTED if "python " in c and c != TEST_COMMAND and " see " not in c]
    outputs = {}
    for cmd in py_cmds:
        r = sh(as_python(cmd), checkout)
        assert r.returncode == 0, f"{cmd!r} exited {r.returncode}\n{r.stdout}\n{r.stderr}"
        outputs[cmd] = r.stdout

    batch = outputs["python exp.py run examples/config.toml"]
    assert "succeeded first time:    3" in batch
    assert "succeeded after retries: 1 (flaky x2)" in batch
    assert "failed:                  0" in batch
    assert "exit code 0, status finished" in outputs["python examples/run_exp.py"]
    assert "done: run_0001" in outputs["python examples/train.py --steps 5"]
    standalone = sorted((checkout / "results").iterdir())
    assert len(standalone) == 2 and all(p.name.startswith("train_2") for p in standalone)
    for p in standalone:
        meta = json.loads((p / "metadata.json").read_text())
        assert meta["status"] == "finished"
        assert (p / "metrics" / "run_0001.csv").read_text().count("\n") == 6  # header + 5 rows

    plan = outputs["python exp.py run examples/config.toml --dry-run"].splitlines()
    assert plan[1].split()[:3] == ["1", "baseline", "10"]
    assert [ln.split()[1] for ln in plan[2:5]] == ["lr_sweep", "lr_sweep", "flaky"]

    listing = outputs["python exp.py ls examples/results"]
    assert sorted(ln.split()[0] for ln in listing.splitlines()[1:]) == [
        "baseline", "flaky", "lr_sweep", "lr_sweep", "single"]
    rows = json.loads(outputs["python exp.py ls examples/results --json --status finished"])
    assert len(rows) == 5 and {r["status"] for r in rows} == {"finished"}
    assert all("loss" in r["last_metrics"] for r in rows)
    assert "usage: exp" in outputs["python exp.py --help"]

    # The dashboard over what the commands above left in ./results (it serves until Ctrl-C).
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    see = subprocess.Popen(as_python("python exp.py see ./results").split() + ["--port", "0"], cwd=checkout,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = see.stdout.readline().rsplit(" ", 1)[-1].strip()
        assert url.startswith("http://127.0.0.1:"), url
        with urllib.request.urlopen(url + "api/experiments", timeout=30) as r:
            listed = json.loads(r.read())
        assert listed["total"] == 2 and {i["name"] for i in listed["items"]} == {"train"}
        with urllib.request.urlopen(url, timeout=30) as r:
            assert b"<script>" in r.read()
    finally:
        see.send_signal(signal.SIGINT)
        out, err = see.communicate(timeout=30)
    assert see.returncode == 0 and "Traceback" not in err, err


def test_pip_install_gives_the_exp_command(checkout, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    bin_dir = env_dir / "bin"
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "VIRTUAL_ENV": str(env_dir),
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    r = sh("pip install -q -e .", checkout, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    r = sh("exp --help", checkout, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: exp")
    r = sh("exp --version", checkout, env=env)
    assert r.stdout.strip() == f"exp {_version()}"


def test_a_regular_install_ships_the_page(checkout, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(checkout)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([str(py), "-c", "import exp; print(exp.__file__); print(exp.find_page())"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    module, page = r.stdout.split()
    assert "site-packages" in module and os.path.isfile(page), r.stdout + r.stderr
    assert Path(page).read_bytes() == (ROOT / "exp_ui.html").read_bytes()


def test_an_install_under_another_prefix_finds_the_page(checkout, tmp_path):
    # `pip install --user` (or --prefix) puts exp.py in <prefix>/lib/pythonX.Y/site-packages and the
    # page in <prefix>/share/exp: neither sys.prefix nor sys.base_prefix, and the page was not found.
    prefix = tmp_path / "pfx"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                        "--prefix", str(prefix), str(checkout)], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    (module,) = prefix.rglob("site-packages/exp.py")
    env = dict(os.environ, PYTHONPATH=str(module.parent))
    r = subprocess.run([sys.executable, "-c", "import exp; print(exp.__file__); print(exp.find_page())"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    found_module, page = r.stdout.split()
    assert found_module == str(module), r.stdout + r.stderr
    assert page == str(prefix / "share" / "exp" / "exp_ui.html")
    assert Path(page).read_bytes() == (ROOT / "exp_ui.html").read_bytes()


def _version():
    return re.search(r'^__version__ = "(.+)"', (ROOT / "exp.py").read_text(), re.M).group(1)


def test_python_dash_m_exp_works(tmp_path):
    # The README names `python -m exp` as the faster way to start the CLI.
    r = subprocess.run([sys.executable, "-m", "exp", "--version"], cwd=tmp_path, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"exp {_version()}"
    assert "python -m exp" in README
