"""Sweeps: ``[experiments.sweep]`` expands to the cartesian product of its lists.

Parsing is tested on parse_config() directly (pure); one real batch runs a
2x2 sweep with repeats through ``python exp.py run``, and ``--dry-run`` and
``exp ls`` are checked through the CLI.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import exp  # noqa: E402
from conftest import child_env, py_cmd, read_meta, run_exp, write_script  # noqa: E402

PY = sys.executable
CLI_TIMEOUT = 60

posix_batch = pytest.mark.skipif(
    os.name != "posix" or not sys.platform.startswith(("linux", "darwin")),
    reason="the scheduler runs commands in POSIX process groups",
)


def parse(body: str, root=None) -> exp.BatchConfig:
    return exp.parse_config(textwrap.dedent(body), "sweep.toml", root=str(root or os.getcwd()))


def problems(body: str, root=None) -> list[str]:
    with pytest.raises(exp.ConfigError) as info:
        parse(body, root)
    lines = str(info.value).splitlines()
    assert re.fullmatch(r"sweep\.toml: \d+ problems?:", lines[0]), lines[0]
    return [ln.strip() for ln in lines[1:]]


def cli(*args, cwd, timeout=CLI_TIMEOUT) -> subprocess.CompletedProcess:
    return run_exp(*args, cwd=cwd, env=child_env(NO_COLOR="1"), timeout=timeout)


# ============================================================================
# Expansion (pure parse_config)
# ============================================================================


def test_cartesian_product_in_written_order_fills_every_field():
    cfg = parse("""
        [[experiments]]
        name = "cnn_lr{lr}_bs{bs}"
        command = "python train.py --lr {lr} --bs {bs}"
        description = "lr {lr}, batch {bs}"
        tags = ["sweep", "bs{bs}"]
        environment = { LR = "{lr}", FIXED = "x", N = 3 }
        priority = 4
        [experiments.sweep]
        lr = [0.1, 0.01, 0.001]
        bs = [32, 64]
    """)
    specs = cfg.experiments
    assert len(specs) == 6
    assert [s.params for s in specs] == [
        {"lr": lr, "bs": bs} for lr in (0.1, 0.01, 0.001) for bs in (32, 64)]  # the last key varies fastest
    assert [s.name for s in specs] == [
        "cnn_lr0.1_bs32", "cnn_lr0.1_bs64", "cnn_lr0.01_bs32", "cnn_lr0.01_bs64",
        "cnn_lr0.001_bs32", "cnn_lr0.001_bs64"]
    first = specs[0]
    assert first.command == "python train.py --lr 0.1 --bs 32"
    assert first.description == "lr 0.1, batch 32"
    assert first.tags == ["sweep", "bs32"]
    assert first.environment == {"LR": "0.1", "FIXED": "x", "N": "3"}
    assert specs[5].command == "python train.py --lr 0.001 --bs 64"
    assert specs[5].tags == ["sweep", "bs64"] and specs[5].environment["LR"] == "0.001"
    for s in specs:
        assert s.index == 0 and s.priority == 4
        assert s.template_name == "cnn_lr{lr}_bs{bs}"
    # Each point has its own lists: filling one does not change another.
    specs[0].tags.append("mine")
    assert specs[1].tags == ["sweep", "bs64"]


def test_repeats_multiply_points_into_jobs():
    cfg = parse("""
        [[experiments]]
        name = "m{a}{b}"
        command = "true"
        repeats = 3
        sweep = { a = [1, 2], b = ["x", "y"] }

        [[experiments]]
        name = "plain"
        command = "true"
    """)
    assert len(cfg.experiments) == 5
    jobs = exp.expand_jobs(cfg)
    assert len(jobs) == 4 * 3 + 1
    assert [j.label() for j in jobs[:4]] == ["m1x #1/3", "m1x #2/3", "m1x #3/3", "m1y #1/3"]
    assert jobs[-1].spec.name == "plain" and jobs[-1].spec.params == {}
    assert jobs[-1].spec.template_name == "plain"


def test_format_specs_conversions_booleans_and_literal_braces():
    cfg = parse("""
        [[experiments]]
        name = "r_lr{lr:.0e}_{opt!r}_{amp}"
        command = "echo {{literal}} ${{HOME}} {lr:.2f} {amp:d} {opt:>5} }}{{"
        sweep = { lr = [0.0003], opt = ["sgd"], amp = [true] }
    """)
    (s,) = cfg.experiments
    assert s.name == "r_lr3e-04_'sgd'_true"
    assert s.command == "echo {literal} ${HOME} 0.00 1   sgd }{"
    assert s.params == {"lr": 0.0003, "opt": "sgd", "amp": True}


def test_single_value_is_a_one_point_sweep():
    (s,) = parse("""
        [[experiments]]
        name = "one_{seed}"
        command = "run --seed {seed}"
        sweep = { seed = 7 }
    """).experiments
    assert (s.name, s.command, s.params) == ("one_7", "run --seed 7", {"seed": 7})


def test_tables_without_a_sweep_keep_their_braces():
    (s,) = parse("""
        [[experiments]]
        name = "plain"
        command = "echo ${HOME} {x} {"
        tags = ["{y}"]
        environment = { A = "{z}" }
        description = "{"
    """).experiments
    assert s.command == "echo ${HOME} {x} {"
    assert s.tags == ["{y}"] and s.environment == {"A": "{z}"} and s.description == "{"
    assert s.params == {}


def test_empty_sweep_table_is_no_sweep():
    (s,) = parse("""
        [[experiments]]
        name = "plain{x}"
        command = "echo {x}"
        sweep = {}
    """).experiments
    assert s.name == "plain{x}" and s.params == {}


def test_unused_key_is_recorded_and_equal_names_are_allowed():
    specs = parse("""
        [[experiments]]
        name = "same"
        command = "python train.py"
        sweep = { seed = [1, 2] }
    """).experiments
    assert [(s.name, s.command, s.params) for s in specs] == [
        ("same", "python train.py", {"seed": 1}), ("same", "python train.py", {"seed": 2})]


def test_sweep_of_strings_fills_names():
    specs = parse("""
        [[experiments]]
        name = "{model}-{size}"
        command = "train {model}"
        sweep = { model = ["resnet", "vit"], size = ["s"] }
    """).experiments
    assert [s.name for s in specs] == ["resnet-s", "vit-s"]


# ============================================================================
# Errors
# ============================================================================


def test_missing_placeholder_names_it_and_where():
    assert problems("""
        [[experiments]]
        name = "cnn_lr{lr}_bs{bs}"
        command = "python train.py --lr {lrr} --bs {bs}"
        sweep = { lr = [0.1], bs = [32] }
    """) == ["experiments[0].command: placeholder {lrr} has no value in sweep (sweep keys: lr, bs)"]


def test_missing_placeholders_in_every_field_are_all_reported():
    assert problems("""
        [[experiments]]
        name = "ok"
        command = "true"
        sweep = { lr = [0.1] }

        [[experiments]]
        name = "n{a}"
        command = "c{b}"
        description = "d{c}"
        tags = ["fine{lr}", "t{d}"]
        environment = { GOOD = "{lr}", BAD = "{e}" }
        sweep = { lr = [0.1] }
    """) == [
        "experiments[1].name: placeholder {a} has no value in sweep (sweep keys: lr)",
        "experiments[1].command: placeholder {b} has no value in sweep (sweep keys: lr)",
        "experiments[1].description: placeholder {c} has no value in sweep (sweep keys: lr)",
        "experiments[1].tags[1]: placeholder {d} has no value in sweep (sweep keys: lr)",
        "experiments[1].environment.BAD: placeholder {e} has no value in sweep (sweep keys: lr)",
    ]


def test_positional_attribute_and_unbalanced_placeholders():
    assert problems("""
        [[experiments]]
        name = "a{}"
        command = "x {lr.real}"
        description = "oops {"
        tags = ["}"]
        sweep = { lr = [0.1] }
    """) == [
        "experiments[0].name: placeholder {} has no value in sweep (sweep keys: lr)",
        "experiments[0].command: placeholder {lr.real} is not supported: use {lr}, optionally with a format "
        "such as {lr:.0e}",
        "experiments[0].description: Single '{' encountered in format string; write {{ and }} for a literal brace",
        "experiments[0].tags[0]: Single '}' encountered in format string; write {{ and }} for a literal brace",
    ]


def test_format_spec_that_does_not_fit_a_value():
    assert problems("""
        [[experiments]]
        name = "n{lr}"
        command = "x {lr:d}"
        sweep = { lr = [1, 0.5, 0.25] }
    """) == ["experiments[0].command: cannot fill 'x {lr:d}' with lr=0.5: "
             "Unknown format code 'd' for object of type 'float'"]


def test_filled_name_with_a_path_separator():
    assert problems("""
        [[experiments]]
        name = "run_{data}"
        command = "train {data}"
        sweep = { data = ["ok", "a/b", "c/d"] }
    """) == [
        "experiments[0].name (data=a/b): name 'run_a/b' cannot contain a path separator; it becomes a directory "
        "name. Use base_dir for the parent directory and e.g. '-' or '_' inside the name"]


def test_filled_name_too_long():
    out = problems(f"""
        [[experiments]]
        name = "n{{v}}"
        command = "true"
        sweep = {{ v = ["short", "{'x' * 300}"] }}
    """)
    assert len(out) == 1
    assert out[0].startswith("experiments[0].name (v=" + "x" * 75 + "...): name 'nxxx")
    assert out[0].endswith("is 301 bytes long; it becomes a directory name with a timestamp, which must fit in "
                           "255 bytes: use at most 229 bytes")


def test_resume_with_a_sweep_is_an_error():
    assert problems("""
        [[experiments]]
        name = "r{lr}"
        command = "true"
        resume = "2025-01-01__00-00-00"
        sweep = { lr = [0.1, 0.2] }
    """) == ["experiments[0]: resume cannot be combined with a sweep of 2 points "
             "(every point would resume the same directory)"]


def test_empty_list_and_bad_values_and_keys():
    assert problems("""
        [[experiments]]
        name = "r{lr}"
        command = "true"
        sweep = { lr = [] }

        [[experiments]]
        name = "s"
        command = "true"
        sweep = { lr = [[1]], "bad-key" = [1] }
    """) == [
        "experiments[0].sweep.lr: expected at least one value, got []",
        "experiments[1].sweep.lr: expected strings, numbers or booleans, got [[1]]",
        "experiments[1].sweep: 'bad-key' is not a usable placeholder name (letters, digits, _)",
    ]


def test_a_sweep_value_with_control_characters_is_shown_escaped_in_errors():
    # The message once carried the value's ESC byte to the terminal (clearing it), or its line break.
    found = problems("""
        [[experiments]]
        name = "s_{v}"
        command = "true"
        sweep = { v = ["\\u001b[2J"] }
    """)
    assert len(found) == 1 and "(v=\\x1b[2J)" in found[0] and "\x1b" not in found[0], found
    for names in ('"a\\u2028b"', '"a\\u202eb"'):  # a line separator, a right-to-left override
        found = problems(f'[[experiments]]\nname = {names}\ncommand = "true"\n')
        assert "contains the control character" in found[0], found


def test_too_many_points_is_an_error_not_a_hang():
    values = ", ".join(str(i) for i in range(100))
    assert problems(f"""
        [[experiments]]
        name = "big"
        command = "true"
        sweep = {{ a = [{values}], b = [{values}], c = [{values}] }}
    """) == [f"experiments[0].sweep: 1000000 combinations; at most {exp.SWEEP_MAX_POINTS} are allowed"]


def test_a_tables_depends_on_problem_is_reported_once_for_all_points():
    assert problems("""
        [[experiments]]
        name = "a{x}"
        command = "true"
        depends_on = ["zz"]
        sweep = { x = [1, 2, 3] }
    """) == ["experiments[0].depends_on: no experiment is named 'zz'"]


def test_load_config_reports_a_missing_cwd_once_for_all_points(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[experiments]]\nname = "n{a}"\ncommand = "true"\ncwd = "nope"\nsweep = { a = [1, 2, 3] }\n')
    with pytest.raises(exp.ConfigError) as info:
        exp.load_config(cfg)
    assert str(info.value) == (f"{cfg}: 1 problem:\n  experiments[0].cwd: {tmp_path / 'nope'} "
                               "is not an existing directory")


def test_format_params():
    assert exp.format_params({"lr": 0.1, "bs": 32, "amp": False, "opt": "adam"}) == "lr=0.1 bs=32 amp=false opt=adam"
    assert exp.format_params({}) == ""


# ============================================================================
# Through the CLI: dry run, a real batch, ls
# ============================================================================

ARGV_SCRIPT = """
    import json, os, sys
    out = os.path.join(os.environ["EXPERIMENT_WORK_DIR"], "argv.json")
    with open(out, "w") as f:
        json.dump({"argv": sys.argv[1:], "repeat": os.environ["EXPERIMENT_REPEAT"],
                   "LR": os.environ.get("LR"), "name": os.environ["EXPERIMENT_NAME"]}, f)
"""


def sweep_config(tmp_path: Path) -> Path:
    script = write_script(tmp_path, "argv.py", ARGV_SCRIPT)
    cfg = tmp_path / "sweep.toml"
    cfg.write_text(textwrap.dedent(f"""
        [scheduler]
        base_experiment_dir = "results"
        max_concurrent_experiments = 4

        [[experiments]]
        name = "cnn_lr{{lr}}_bs{{bs}}"
        command = '{py_cmd(script)} --lr {{lr}} --bs {{bs}} --lit "{{{{x}}}}"'
        tags = ["bs{{bs}}"]
        environment = {{ LR = "{{lr}}" }}
        repeats = 2
        [experiments.sweep]
        lr = [0.1, 0.01]
        bs = [32, 64]

        [[experiments]]
        name = "dup"
        command = "{PY} -c pass"
        sweep = {{ seed = [1, 2] }}
    """), encoding="utf-8")
    return cfg


@posix_batch
def test_dry_run_shows_the_expansion(tmp_path):
    cfg = sweep_config(tmp_path)
    r = cli("run", cfg, "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == ["#", "name", "params", "priority", "command", "cwd", "GPUs", "dir base"]
    rows = [re.split(r"\s{2,}", ln) for ln in lines[1:11]]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("1", "cnn_lr0.1_bs32 (repeat 1/2)", "lr=0.1 bs=32"),
        ("2", "cnn_lr0.1_bs32 (repeat 2/2)", "lr=0.1 bs=32"),
        ("3", "cnn_lr0.1_bs64 (repeat 1/2)", "lr=0.1 bs=64"),
        ("4", "cnn_lr0.1_bs64 (repeat 2/2)", "lr=0.1 bs=64"),
        ("5", "cnn_lr0.01_bs32 (repeat 1/2)", "lr=0.01 bs=32"),
        ("6", "cnn_lr0.01_bs32 (repeat 2/2)", "lr=0.01 bs=32"),
        ("7", "cnn_lr0.01_bs64 (repeat 1/2)", "lr=0.01 bs=64"),
        ("8", "cnn_lr0.01_bs64 (repeat 2/2)", "lr=0.01 bs=64"),
        ("9", "dup", "seed=1"),
        ("10", "dup", "seed=2"),
    ]
    assert rows[0][4].endswith('--lr 0.1 --bs 32 --lit "{x}"')
    assert rows[7][4].endswith('--lr 0.01 --bs 64 --lit "{x}"')
    assert lines[11].startswith("10 experiment(s), at most 4 at a time")
    assert not (tmp_path / "results").exists()


@posix_batch
def test_dry_run_of_a_bad_placeholder_exits_2(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[[experiments]]\nname = "n"\ncommand = "x {lrr}"\nsweep = { lr = [1], bs = [2] }\n')
    r = cli("run", cfg, "--dry-run", cwd=tmp_path)
    assert r.returncode == 2
    assert "experiments[0].command: placeholder {lrr} has no value in sweep (sweep keys: lr, bs)" in r.stderr
    assert "Traceback" not in r.stderr


@posix_batch
def test_batch_runs_every_point_and_repeat_and_ls_shows_params(tmp_path):
    cfg = sweep_config(tmp_path)
    r = cli("run", cfg, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout, r.stderr)
    base = tmp_path / "results"
    dirs = sorted(p for p in base.iterdir() if not p.name.startswith("."))
    assert len(dirs) == 10  # 2x2 points x 2 repeats, and two "dup" points in two directories

    seen = []
    for d in dirs:
        meta = read_meta(d)
        assert meta["status"] == "finished", meta
        if meta["name"] == "dup":
            seen.append(("dup", meta["params"]["seed"]))
            continue
        lr, bs = meta["params"]["lr"], meta["params"]["bs"]
        assert meta["params"] == {"lr": lr, "bs": bs}
        assert meta["name"] == f"cnn_lr{lr}_bs{bs}" and meta["tags"] == [f"bs{bs}"]
        got = json.loads((d / "argv.json").read_text())
        assert got["argv"] == ["--lr", str(lr), "--bs", str(bs), "--lit", "{x}"]
        assert got["LR"] == str(lr) and got["name"] == meta["name"]
        seen.append((lr, bs, got["repeat"]))
    assert sorted(seen, key=str) == sorted(
        [(lr, bs, rep) for lr in (0.1, 0.01) for bs in (32, 64) for rep in ("1", "2")]
        + [("dup", 1), ("dup", 2)], key=str)

    r = cli("ls", base, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    header = re.split(r"\s{2,}", lines[0])
    assert header == ["name", "status", "started", "duration", "runs", "params", "dir"]
    rows = [re.split(r"\s{2,}", ln) for ln in lines[1:]]
    assert len(rows) == 10
    for row in rows:
        name, params, d = row[0], row[5], row[6]
        meta = read_meta(base / d)
        assert name == meta["name"]
        assert params == " ".join(f"{k}={v}" for k, v in meta["params"].items())

    r = cli("ls", base, "--json", cwd=tmp_path)
    rows_json = json.loads(r.stdout)
    assert sorted((x["name"], json.dumps(x["params"], sort_keys=True)) for x in rows_json) == sorted(
        [(f"cnn_lr{lr}_bs{bs}", json.dumps({"bs": bs, "lr": lr}, sort_keys=True))
         for lr in (0.1, 0.01) for bs in (32, 64) for _ in (1, 2)]
        + [("dup", json.dumps({"seed": s})) for s in (1, 2)])

    # --sort by a sweep parameter: numbers in order, experiments without it last.
    r = cli("ls", base, "--sort", "lr", "--json", cwd=tmp_path)
    assert [x["params"].get("lr") for x in json.loads(r.stdout)] == [0.01] * 4 + [0.1] * 4 + [None] * 2
    r = cli("ls", base, "--sort", "bs", "--desc", cwd=tmp_path)
    assert [re.split(r"\s{2,}", ln)[5].split()[-1] for ln in r.stdout.splitlines()[1:9]] == ["bs=64"] * 4 + ["bs=32"] * 4

    # Only the experiments shown decide whether the column is there.
    r = cli("ls", base, "--name", "^nothing$", cwd=tmp_path)
    assert "params" not in r.stdout


def test_listing_without_params_has_no_params_column(tmp_path):
    rows = [{"name": "a", "status": "finished", "started_at": None, "created_at": "2025-01-01T00:00:00",
             "duration": None, "runs": 1, "work_dir": str(tmp_path / "a_x"), "dir": "a_x", "params": {},
             "last_metrics": {}, "current_run_id": None}]
    table = exp.build_listing(rows, [], str(tmp_path))
    assert table[0] == ("name", "status", "started", "duration", "runs", "dir")
    rows.append(dict(rows[0], name="b", work_dir=str(tmp_path / "b_x"), params={"lr": 0.5, "amp": True}))
    table = exp.build_listing(rows, [], str(tmp_path))
    assert table[0] == ("name", "status", "started", "duration", "runs", "params", "dir")
    assert [t[5] for t in table[1:]] == ["-", "lr=0.5 amp=true"]


@posix_batch
def test_ls_sort_by_param_with_failed_runs(tmp_path):
    # Experiments made through the API record params too; a failed one adds a reason column
    # after dir, which --json --sort must not mistake for the directory.
    base = tmp_path / "results"
    for lr, code in ((0.3, 0), (0.1, 3), (0.2, 0)):
        e = exp.Experiment(f"api_{lr}", f"exit {code}", base_dir=base, cwd=tmp_path, params={"lr": lr})
        assert e.run() == code
        assert read_meta(e.work_dir)["params"] == {"lr": lr}
    e = exp.Experiment("no_params", "true", base_dir=base, cwd=tmp_path)
    assert e.run() == 0 and read_meta(e.work_dir)["params"] == {}
    r = cli("ls", base, "--sort", "lr", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [x["name"] for x in json.loads(r.stdout)] == ["api_0.1", "api_0.2", "api_0.3", "no_params"]
    r = cli("ls", base, "--sort", "lr", "--desc", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    header, *rows = [re.split(r"\s{2,}", ln) for ln in r.stdout.splitlines()]
    assert header[5:7] == ["params", "dir"]
    assert [(row[0], row[5]) for row in rows] == [
        ("api_0.3", "lr=0.3"), ("api_0.2", "lr=0.2"), ("api_0.1", "lr=0.1"), ("no_params", "-")]


@pytest.mark.parametrize("field, template", [("name", "x{lr:99999999999}"), ("command", "echo {lr:999999999}"),
                                             ("command", "echo {lr:.5000f}")])
def test_a_placeholder_format_asking_for_a_huge_width_is_a_config_error(tmp_path, field, template):
    # {lr:999999999} made a gigabyte of padding (2 GB of memory, a 1 GB plan line); a longer number
    # a MemoryError traceback.
    values = {"name": "x", "command": "true", field: template}
    cfg = tmp_path / "s.toml"
    cfg.write_text(f'[[experiments]]\nname = "{values["name"]}"\ncommand = "{values["command"]}"\n'
                   "[experiments.sweep]\nlr = [1]\n")
    r = cli("run", cfg, "--dry-run", cwd=tmp_path)
    assert r.returncode == 2, (r.stdout[-500:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr and len(r.stderr) < 2000
    assert f"experiments[0].{field}: cannot fill" in r.stderr and "at most 1000 are taken" in r.stderr
    # Ordinary formats work.
    cfg.write_text('[[experiments]]\nname = "x{i:04d}"\ncommand = "echo {lr:.3e} {i:>8}"\n'
                   "[experiments.sweep]\nlr = [1]\ni = [3]\n")
    r = cli("run", cfg, "--dry-run", cwd=tmp_path)
    assert r.returncode == 0 and "x0003" in r.stdout and "echo 1.000e+00        3" in r.stdout, r.stdout
