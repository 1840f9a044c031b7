# SPDX-License-Identifier: Apache-2.0
"""exp: a single-file experiment manager for machine-learning research.

exp wraps a training command, gives every experiment its own directory with
metadata, one log per run and one metrics CSV per run, and batches many
experiments from a TOML file.  It needs only the Python standard library
(plus ``tomli`` on Python < 3.11, imported only when a TOML file is read).

Python::

    import exp
    e = exp.Experiment(name="baseline", command="python train.py")
    e.run()                                   # streams the output, returns the exit code

    # inside train.py
    e = exp.load_experiment()
    e.upd_row(step=1, loss=0.25)
    e.save_row()

Command line::

    python exp.py run config.toml             # a batch of experiments
    python exp.py ls ./results                # what ran, how it ended

Data flow::

    Experiment(...) --mkdir--> <base>/<name>_<YYYY-MM-DD__HH-MM-SS>/metadata.json
         |
         | run(): Popen(shell, new session, stdout+stderr -> log file)
         v
    child process --writes--> terminal_logs/run_NNNN.log
         |                    (foreground: exp follows the file to the console)
         | import exp; load_experiment(); upd_row(); save_row()
         v
    MetricsWriter --append/rewrite under flock--> metrics/run_NNNN.csv

*Experiment* owns one directory.  Its metadata is rewritten atomically (temp
file + ``os.replace``) on every status change, so a reader never sees half a
file.  *run()* starts the command in its own process group with its output
going straight into the run's log file; nothing in the managing process sits
between the child and its output, so the child never blocks on a pipe.
*MetricsWriter* appends one line per row while the columns stay the same and
rewrites the file (atomically) only when a new column appears.

Sections (``grep -n '^# ====' exp.py``): constants, exceptions, utilities,
metrics CSV, experiment, runner, inside a training script, config (TOML),
scheduler model and planning, scheduler execution, listing, CLI.
"""
from __future__ import annotations

import os
import re
import sys
import threading
import time

try:  # POSIX only; Windows has no flock and exp does not run commands there
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    import subprocess
    from typing import Any, Callable, Iterable, Mapping

__version__ = "0.1.0"

__all__ = [
    "Experiment",
    "RunHandle",
    "load_experiment",
    "MetricsWriter",
    "read_metrics",
    "BatchConfig",
    "load_config",
    "parse_config",
    "Scheduler",
    "list_experiments",
    "main",
    "ExpError",
    "ConfigError",
    "NoExperimentContext",
    "UnsupportedPlatformError",
    "STATUSES",
    "__version__",
]

# ============================================================================
# Constants
# ============================================================================

#: Where experiments go when no base directory is given (the earlier project's default).
DEFAULT_BASE_DIR = "./results"
#: Directory suffix; local time, the earlier project's format (``resume`` takes it back).
TIMESTAMP_FORMAT = "%Y-%m-%d__%H-%M-%S"
#: Seconds between SIGTERM and SIGKILL when a run is stopped.  Long enough for a
#: training script to save a checkpoint on SIGTERM, short enough for Ctrl-C.
DEFAULT_KILL_GRACE = 10.0
#: Prefix of the lines exp itself writes into a run's log, so they stand out
#: from the child's output and can be filtered with ``grep -v``.
LOG_MARK = "[exp]"
#: How often a foreground run looks for new output in its log.  The child
#: writes to the file directly; 50 ms feels live and costs nothing measurable.
FOLLOW_INTERVAL = 0.05
#: A batch run's pid goes into metadata.json once it has run this long; one
#: that ends sooner gets its start and end in one write with the pid in its
#: runs entry.  Every rewrite makes a file and drops one, which is what costs
#: on a busy disk when a batch holds hundreds of commands that end at once.
PID_RECORD_DELAY = 0.05
#: Environment variable that makes ``load_experiment()`` create a standalone
#: experiment when the script was not launched by exp.
STANDALONE_ENV = "EXP_STANDALONE"

PENDING, RUNNING, FINISHED, ERROR, KILLED = "pending", "running", "finished", "error", "killed"
#: Experiment and run statuses, as written to metadata.json.
STATUSES = {
    PENDING: "created, not started yet",
    RUNNING: "the command is running",
    FINISHED: "the command exited with status 0",
    ERROR: "the command exited with a non-zero status or could not start",
    KILLED: "stopped by exp (Ctrl-C, terminate, scheduler shutdown)",
}

_RUN_ID_RE = re.compile(r"run_(\d+)\Z")
# Environment variable names whose values never go into metadata or state files.
_SECRET_KEY_RE = re.compile(r"SECRET|TOKEN|PASS|PWD|CREDENTIAL|KEY|PRIVATE|AUTH|COOKIE|SESSION|(^|_)PAT$", re.I)

# ============================================================================
# Exceptions
# ============================================================================


class ExpError(Exception):
    """Base class of every error exp raises on purpose."""


class ConfigError(ExpError, ValueError):
    """A bad argument or configuration value; the message says what to pass instead."""


class NoExperimentContext(ExpError, RuntimeError):
    """``load_experiment()`` was called outside a process launched by exp."""


class UnsupportedPlatformError(ExpError, NotImplementedError):
    """Running commands needs POSIX process groups (Linux, macOS)."""


# ============================================================================
# Utilities (pure helpers first, then small I/O helpers)
# ============================================================================


def format_duration(seconds: float | None) -> str:
    """Return a short human duration: ``0.4s``, ``12.0s``, ``3m05s``, ``2h03m``."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def run_id_str(run: int | str) -> str:
    """Normalise ``3``, ``"3"`` or ``"run_0003"`` to ``"run_0003"``."""
    if isinstance(run, bool):
        raise ConfigError(f"run id must be an int or 'run_NNNN', got {run!r}")
    if isinstance(run, int):
        num = run
    else:
        text = str(run).strip()
        m = _RUN_ID_RE.match(text)
        if m:
            num = int(m.group(1))
        elif text.isdigit():
            num = int(text)
        else:
            raise ConfigError(f"run id must be an int or 'run_NNNN', got {run!r}")
    if num < 1:
        raise ConfigError(f"run ids start at 1, got {run!r}")
    return f"run_{num:04d}"


def parse_gpu_ids(value: Any, where: str = "gpu_ids") -> list[int] | None:
    """Accept ``None``, ``[0, 1]`` or ``"0,1"``; return a list of ints or raise ConfigError."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        parts = [p.strip() for p in text.split(",")]
        if all(p.isdigit() for p in parts):
            return [int(p) for p in parts]
    elif isinstance(value, (list, tuple)) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        return list(value)
    raise ConfigError(f'{where}: expected a list of integers or "0,1", got {value!r}')


def redact_env(env: Mapping[str, Any] | None) -> dict[str, Any]:
    """Copy ``env`` with the values of secret-looking names replaced by ``"***"``."""
    if not env:
        return {}
    return {k: ("***" if _SECRET_KEY_RE.search(k) and v is not None else v) for k, v in env.items()}


def add_conda_no_capture(command: str) -> str:
    """Give ``conda run`` ``--no-capture-output`` so its output streams live.

    Without it conda buffers everything the child prints until it exits.
    """
    if "--no-capture-output" in command or "--live-stream" in command:
        return command
    return re.sub(r"(?<![\w.-])(conda\s+run)(?=\s)", r"\1 --no-capture-output", command, count=1)


def now_iso() -> str:
    """The local time as ISO 8601 with its UTC offset, to the second."""
    # time, not datetime: importing datetime costs more than this whole function.
    lt = time.localtime()
    off = lt.tm_gmtoff or 0
    sign = "-" if off < 0 else "+"
    off = abs(off)
    tz = f"{sign}{off // 3600:02d}:{off % 3600 // 60:02d}" + (f":{off % 60:02d}" if off % 60 else "")
    return time.strftime("%Y-%m-%dT%H:%M:%S", lt) + tz


def _json():
    # json costs a couple of ms at import; `import exp` in a training script
    # should not pay for it before it writes any metadata.
    import json

    return json


_ENCODER: Any = None


def dumps_json(obj: Any) -> str:
    """JSON for files people read: one top-level key per line, one list item per line.

    Values are encoded by the C encoder (``indent`` would force the much slower
    pure-Python one; metadata is rewritten on every status change).
    """
    global _ENCODER
    if _ENCODER is None:
        _ENCODER = _json().JSONEncoder(ensure_ascii=False, default=str)
    enc = _ENCODER.encode
    if not isinstance(obj, dict):
        return enc(obj) + "\n"
    lines = []
    for k, v in obj.items():
        # Scalars directly: encode() of anything but a str sets up a whole
        # encoder per call, which is most of the cost of a metadata write.
        t = type(v)
        if v is None:
            text = "null"
        elif t is str:
            text = enc(v)
        elif t is bool:
            text = "true" if v else "false"
        elif t is int:
            text = int.__repr__(v)
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            text = "[\n    " + ",\n    ".join(enc(x) for x in v) + "\n  ]"
        else:
            text = enc(v)
        lines.append(f"  {enc(k if type(k) is str else str(k))}: {text}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> os.stat_result:
    """Write ``obj`` as JSON so that readers see the old file or the new one, never half.

    Returns the new file's stat.  No fsync: the guarantee wanted is "never
    torn", not "durable across a power cut", and an fsync per status change
    would cost milliseconds each.
    """
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, dumps_json(obj).encode("utf-8"))
        st = os.fstat(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return st


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as f:
        return _json().load(f)


class _FileLock:
    """An exclusive ``flock`` on a file or directory, plus a thread lock (flock is per open file).

    It stays open between uses until :meth:`close`, saving an open per use.
    Locking a directory creates no file, which matters when every file
    creation costs a journal write.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._tlock = threading.Lock()
        self._fd: int | None = None

    def __enter__(self) -> _FileLock:
        self._tlock.acquire()
        if fcntl is None:  # Windows: no flock (and no opening a directory); threads only
            return self
        try:
            if self._fd is None:
                flags = os.O_RDONLY if os.path.isdir(self.path) else os.O_RDWR | os.O_CREAT
                self._fd = os.open(self.path, flags, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._tlock.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if fcntl is not None and self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._tlock.release()

    def close(self) -> None:
        with self._tlock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __del__(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass


def _find_git_root(start: str) -> str | None:
    d = os.path.abspath(start)
    while True:
        if os.path.exists(os.path.join(d, ".git")):
            return d
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent


# Git information per cwd, kept for a few seconds: a batch of 200 experiments
# in one repository should not start 200 git processes.
_GIT_CACHE: dict[str, tuple[float, dict[str, Any] | None]] = {}
_GIT_CACHE_SECONDS = 5.0


def git_info(cwd: str) -> dict[str, Any] | None:
    """Commit, branch and dirtiness of the git work tree holding ``cwd``, or None.

    Never raises: no git, no repository, or a broken one all give None.
    """
    hit = _GIT_CACHE.get(cwd)
    if hit and time.monotonic() - hit[0] < _GIT_CACHE_SECONDS:
        return hit[1]
    info: dict[str, Any] | None = None
    if _find_git_root(cwd) is None:
        _GIT_CACHE[cwd] = (time.monotonic(), None)
        return None
    try:
        import subprocess

        out = subprocess.run(
            ["git", "status", "--porcelain=v2", "--branch", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, timeout=10,
        )
        if out.returncode == 0:
            info = {"commit": None, "branch": None, "dirty": False}
            for line in out.stdout.splitlines():
                if line.startswith("# branch.oid "):
                    oid = line.split(" ", 2)[2]
                    info["commit"] = None if oid == "(initial)" else oid
                elif line.startswith("# branch.head "):
                    head = line.split(" ", 2)[2]
                    info["branch"] = None if head == "(detached)" else head
                elif line and not line.startswith("#"):
                    info["dirty"] = True
    except (OSError, ValueError, Exception):  # git missing, timeout, odd output
        info = None
    _GIT_CACHE[cwd] = (time.monotonic(), info)
    return info


_USER: list[str | None] = []


_HOST: list[str] = []


def _hostname() -> str:
    if not _HOST:
        _HOST.append(os.uname().nodename if hasattr(os, "uname") else os.environ.get("COMPUTERNAME", ""))
    return _HOST[0]


def _user() -> str | None:
    if not _USER:
        # What getpass.getuser() does, without importing getpass (and termios).
        name = next((os.environ[k] for k in ("LOGNAME", "USER", "LNAME", "USERNAME") if os.environ.get(k)), None)
        if name is None:
            try:
                import pwd

                name = pwd.getpwuid(os.getuid()).pw_name
            except (ImportError, KeyError, AttributeError):  # Windows, or no passwd entry
                pass
        _USER.append(name)
    return _USER[0]


def _require_posix() -> None:
    if os.name == "nt" or fcntl is None:
        raise UnsupportedPlatformError(
            "exp runs commands in their own POSIX process group so it can stop them and "
            "their children; Windows has no equivalent, so running commands is not supported "
            "there (the earlier project had the same limit). Use WSL, or Linux/macOS"
        )


# ============================================================================
# Metrics CSV
# ============================================================================
#
# One CSV per run.  Rows usually keep their columns, so the common case must
# cost one append whatever the file's length; a new column means rewriting the
# file with the union header, atomically.  Writers in several processes (say,
# DataLoader workers or torchrun ranks) coordinate with flock on the CSV
# itself: a writer that rewrites the file holds the lock on the old inode while
# it replaces it, and a writer that then gets the lock sees ``st_nlink == 0``
# on its descriptor and reopens the path.

_NEEDS_QUOTE_RE = re.compile(r'[,"\r\n]')
_QUOTE_CHARS_RE = re.compile(r'["\r\n]')
_INT_RE = re.compile(r"[-+]?\d+\Z")
_FLOAT_RE = re.compile(r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|nan|inf)\Z")


def _csv_cell(text: str) -> str:
    if _NEEDS_QUOTE_RE.search(text):
        return '"' + text.replace('"', '""') + '"'
    return text


def format_metric(key: str, value: Any) -> str:
    """Turn one metric value into its CSV text (unquoted).

    int, float (``nan``, ``inf``, ``-inf``), bool, str, None (empty) and any
    object with ``.item()`` (torch/numpy scalars) are accepted; anything else
    raises TypeError naming the key.
    """
    t = type(value)
    if t is float:
        return repr(value)  # repr gives 'nan', 'inf', '-inf' too
    if t is int:
        return int.__repr__(value)
    if t is str:
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return format_metric(key, float(value))
    if isinstance(value, str):
        return str(value)
    item = getattr(value, "item", None)
    if callable(item):
        try:
            scalar = item()
        except Exception as e:  # e.g. a tensor with more than one element
            raise TypeError(
                f"metric {key!r}: {type(value).__name__}.item() failed ({e}); "
                "pass a single number, e.g. loss.mean().item()"
            ) from None
        if hasattr(scalar, "item") and not isinstance(scalar, (int, float, str, bool)):
            raise TypeError(f"metric {key!r}: .item() returned {type(scalar).__name__}, not a number")
        return format_metric(key, scalar)
    raise TypeError(
        f"metric {key!r}: cannot store a value of type {type(value).__name__}; "
        "use int, float, bool, str, None or a scalar with .item()"
    )


def parse_metric(text: str) -> Any:
    """Inverse of :func:`format_metric`: ``""`` -> None, numbers -> int/float, True/False -> bool."""
    if text == "":
        return None
    if _INT_RE.match(text):
        return int(text)
    if _FLOAT_RE.match(text):
        return float(text)
    if text == "True":
        return True
    if text == "False":
        return False
    return text


def parse_metrics_csv(text: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Parse a metrics CSV into (header, rows).

    A torn last line (a writer killed mid-row, no trailing newline) is skipped,
    and so is any row whose field count does not match the header.
    """
    header, records = _csv_records(text)
    return header, [{k: parse_metric(v) for k, v in zip(header, rec)} for rec in records]


def _csv_records(text: str) -> tuple[list[str], list[list[str]]]:
    """(header, records) of CSV text; drops a torn last line and rows of the wrong width."""
    import csv
    import io

    if not text:
        return [], []
    records = list(csv.reader(io.StringIO(text, newline="")))
    if not text.endswith("\n") and records:
        records.pop()
    if not records:
        return [], []
    n = len(records[0])
    return records[0], [r for r in records[1:] if len(r) == n]


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a metrics CSV written by exp; a missing file reads as no rows."""
    try:
        # errors="replace": a torn last line can end inside a UTF-8 character
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            text = f.read()
    except FileNotFoundError:
        return []
    return parse_metrics_csv(text)[1]


class MetricsWriter:
    """Append rows to one metrics CSV; thread-safe and process-safe.

    Columns keep first-seen order.  A row whose keys are all in the header is
    one ``write()`` of one line; a row with a new key rewrites the file with
    the union header (earlier rows blank in the new column) through a temp
    file and ``os.replace``.  Every row is on disk (in the OS cache) when
    :meth:`write_row` returns.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._header: list[str] = []
        self._columns: set[str] = set()
        self._size = self._end = -1  # file size at lock time / after our last row

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def header(self) -> list[str]:
        return list(self._header)

    def write_row(self, row: Mapping[str, str]) -> None:
        """Write one row of already formatted (see :func:`format_metric`) values."""
        if not row:
            return
        with self._lock:
            fd = self._acquire()
            try:
                if self._columns.issuperset(row):
                    get = row.get
                    cells = [get(k, "") for k in self._header]
                    line = ",".join(cells)
                    # One scan per line; quote cell by cell only when a cell needs it (rare).
                    if line.count(",") != len(cells) - 1 or _QUOTE_CHARS_RE.search(line):
                        line = ",".join([_csv_cell(c) for c in cells])
                    data = (line or '""').encode("utf-8") + b"\n"
                    os.write(fd, data)
                    self._end = self._size + len(data)
                else:
                    self._rewrite_with(row)
            finally:
                if self._fd is not None and fcntl is not None:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _acquire(self) -> int:
        """Open (or reopen) the file, take the flock, and make sure the header is current."""
        while True:
            if self._fd is None:
                os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
                self._header, self._columns = [], set()
            fd = self._fd
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            st = os.fstat(fd)
            if st.st_nlink == 0:  # another writer replaced the file: follow it
                os.close(fd)
                self._fd = None
                continue
            size = st.st_size
            # Someone else wrote since our last row: if that writer died mid-row,
            # reload, which cuts the torn tail.  (One writer alone skips the read.)
            if self._header and size != self._end and size and os.pread(fd, 1, size - 1) != b"\n":
                self._header, self._columns = [], set()
            if not self._header and size:
                self._load_header(fd, size)
                size = os.fstat(fd).st_size
            self._size = self._end = size
            return fd

    def _load_header(self, fd: int, size: int) -> None:
        # Runs only when (re)opening: read the header and cut a torn tail left
        # by a writer that was killed mid-line, so the next row starts clean.
        if os.pread(fd, 1, size - 1) != b"\n":
            tail_start = max(0, size - 65536)
            tail = os.pread(fd, size - tail_start, tail_start)
            cut = tail.rfind(b"\n")
            new_size = tail_start + cut + 1 if cut >= 0 else 0
            if cut < 0 and tail_start:
                new_size = size  # a single line longer than 64 KiB: leave it
            os.ftruncate(fd, new_size)
            size = new_size
        if not size:
            return
        head = os.pread(fd, min(size, 1 << 20), 0).decode("utf-8", "replace")
        header, _ = parse_metrics_csv(head.split("\n", 1)[0] + "\n")
        self._header, self._columns = header, set(header)

    def _rewrite_with(self, row: Mapping[str, str]) -> None:
        import csv
        import io

        fd = self._fd
        assert fd is not None
        size = os.fstat(fd).st_size
        data = os.pread(fd, size, 0).decode("utf-8", "replace") if size else ""
        header, records = _csv_records(data)
        header = header or list(self._header)
        header = header + [k for k in row if k not in set(header)]
        width = len(header)
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(header)
        for rec in records:
            w.writerow(rec + [""] * (width - len(rec)))
        w.writerow([row.get(k, "") for k in header])
        tmp = f"{self.path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(out.getvalue())
        os.replace(tmp, self.path)
        # Keep the lock on the old inode until we leave; switch to the new file.
        new_fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        self._fd = new_fd
        if fcntl is not None:
            fcntl.flock(new_fd, fcntl.LOCK_EX)  # released by write_row's finally
        self._header, self._columns = header, set(header)


# ============================================================================
# Experiment
# ============================================================================


def _validate_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"name must be a non-empty string such as 'resnet50_lr3e-4', got {name!r}")
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    if any(s in name for s in seps) or name in (".", "..") or "\0" in name:
        raise ConfigError(
            f"name {name!r} cannot contain a path separator; it becomes a directory name. "
            "Use base_dir for the parent directory and e.g. '-' or '_' inside the name"
        )
    return name


def _validate_command(command: Any) -> str:
    if isinstance(command, (list, tuple)) and command and all(isinstance(c, str) for c in command):
        import shlex

        return shlex.join(command)
    if not isinstance(command, str) or not command.strip():
        raise ConfigError(
            f"command must be a non-empty shell command string such as 'python train.py', got {command!r}"
        )
    if "\0" in command:
        raise ConfigError(f"command cannot contain a NUL character, got {command!r}")
    return command


def _validate_tags(tags: Any) -> list[str] | None:
    if tags is None:
        return None
    if isinstance(tags, str) or not isinstance(tags, (list, tuple)) or not all(
        isinstance(t, str) for t in tags
    ):
        raise ConfigError(f"tags must be a list of strings such as ['baseline', 'lr-sweep'], got {tags!r}")
    return list(tags)


def _validate_env(env: Any, where: str = "env") -> dict[str, str | None]:
    if env is None:
        return {}
    if not isinstance(env, dict):
        raise ConfigError(f"{where} must be a dict of variable names to strings, got {type(env).__name__}")
    out: dict[str, str | None] = {}
    for k, v in env.items():
        if not isinstance(k, str) or not k or "=" in k or "\0" in k:
            raise ConfigError(f"{where}: {k!r} is not a valid environment variable name")
        if v is not None and "\0" in str(v):
            raise ConfigError(f"{where}[{k!r}]: a value cannot contain a NUL character")
        out[k] = None if v is None else str(v)
    return out


def find_resume_dir(base_dir: str, name: str, resume: Any) -> str:
    """The directory that ``resume`` (a timestamp or a path) names; ConfigError if none."""
    if not isinstance(resume, (str, os.PathLike)) or not os.fspath(resume).strip():
        raise ConfigError(f"resume must be a timestamp such as '2025-09-27__17-16-19' or a directory path, got {resume!r}")
    text = os.fspath(resume)
    candidates = []
    if os.sep in text or os.path.isdir(text):
        candidates.append(os.path.abspath(text))
    candidates.append(os.path.join(base_dir, f"{name}_{text}"))
    for c in candidates:
        if os.path.isfile(os.path.join(c, "metadata.json")):
            return c
    try:
        prefix = name + "_"
        found = sorted(d[len(prefix):] for d in os.listdir(base_dir) if d.startswith(prefix))
    except OSError:
        found = []
    hint = f"existing timestamps for {name!r}: {', '.join(found[-5:])}" if found else (
        f"no experiment named {name!r} exists under {base_dir}"
    )
    raise ConfigError(
        f"resume={text!r}: no experiment directory at {' or '.join(candidates)}; "
        f"pass the timestamp part of an existing directory name or its path ({hint})"
    )


def _lenient_gpu_ids(value: Any) -> list[int] | None:
    """gpu_ids read back from a metadata file: a bad value reads as unset, not an error."""
    try:
        return parse_gpu_ids(value)
    except ConfigError:
        return None


def _iso_from_old_timestamp(value: Any) -> str | None:
    """The earlier project's ``timestamp`` (ISO, or the directory format) as ISO 8601."""
    if not isinstance(value, str) or not value:
        return None
    from datetime import datetime

    try:
        return datetime.fromisoformat(value).isoformat(timespec="seconds")
    except ValueError:
        pass
    try:
        return datetime.strptime(value, TIMESTAMP_FORMAT).astimezone().isoformat(timespec="seconds")
    except ValueError:
        return None


class Experiment:
    """One experiment: a directory, a command, and the runs of that command.

    Args:
        name: experiment name; the directory is ``<base_dir>/<name>_<timestamp>``.
        command: shell command (a list of arguments is joined with shlex).
        base_dir: parent directory of experiment directories, created if missing.
        tags: list of strings for searching and grouping.
        gpu_ids: list of ints (or ``"0,1"``); sets ``CUDA_VISIBLE_DEVICES``.
        cwd: where the command runs; defaults to the current directory at
            construction time (stored as an absolute path).
        resume: continue an existing experiment: its timestamp (as in the
            directory name) or a path to its directory.  The next run gets the
            next run number; tags, cwd, gpu_ids and description are kept unless
            given here.
        description: free text.
        lark_config: Lark/Feishu settings for ``save_row(lark=True)``; kept in
            memory only, never written to disk (it holds secrets).
        env: extra environment variables for the command; ``None`` removes one.

    The directory and ``metadata.json`` (status ``pending``) exist as soon as
    the constructor returns.
    """

    def __init__(
        self,
        name: str,
        command: str,
        base_dir: str | os.PathLike[str] = DEFAULT_BASE_DIR,
        tags: list[str] | None = None,
        gpu_ids: list[int] | str | None = None,
        cwd: str | os.PathLike[str] | None = None,
        resume: str | os.PathLike[str] | None = None,
        description: str | None = None,
        lark_config: dict[str, Any] | str | None = None,
        env: Mapping[str, str | None] | None = None,
        *,
        _defer_write: bool = False,
    ) -> None:
        self.name = _validate_name(name)
        self.command = _validate_command(command)
        tags_v = _validate_tags(tags)
        gpus_v = parse_gpu_ids(gpu_ids)
        if description is not None and not isinstance(description, str):
            raise ConfigError(f"description must be a string, got {type(description).__name__}")
        if cwd is not None:
            cwd = os.path.abspath(os.fspath(cwd))
            if not os.path.isdir(cwd):
                raise ConfigError(f"cwd {cwd!r} is not an existing directory; pass the directory to run the command in")
        self.env = _validate_env(env)
        self.lark_config = lark_config
        if base_dir is None:
            base_dir = DEFAULT_BASE_DIR
        self.base_dir = os.path.abspath(os.fspath(base_dir))
        self.status = PENDING
        self.current_run_id: str | None = None
        self._pending: dict[str, str] = {}
        self._ok_keys: set[str] = set()
        self._writer: MetricsWriter | None = None
        self._writer_run: str | None = None
        self._meta_lock_obj: _FileLock | None = None
        self._meta_cache: tuple[Any, dict[str, Any]] | None = None

        if resume is not None:
            work_dir = self._resolve_resume(resume)
            meta = self._read_metadata_at(work_dir)
            self.work_dir = work_dir
            self.timestamp = meta.get("timestamp_dir") or self._timestamp_from_dir(work_dir)
            self.tags = tags_v if tags_v is not None else list(meta.get("tags") or [])
            self.gpu_ids = gpus_v if gpus_v is not None else _lenient_gpu_ids(meta.get("gpu_ids"))
            # The earlier project ran in the experiment directory when cwd was unset.
            self.cwd = cwd if cwd is not None else (meta.get("cwd") or work_dir)
            self.description = description if description is not None else meta.get("description")
            if env is None:  # keep the variables it ran with, except redacted secrets
                stored = meta.get("environment")
                if isinstance(stored, dict):
                    self.env = {k: str(v) for k, v in stored.items() if v is not None and v != "***"}
            self.current_run_id = meta.get("current_run_id")
            self.created_at = meta.get("created_at") or _iso_from_old_timestamp(meta.get("timestamp")) or now_iso()

            def update(m: dict[str, Any]) -> None:
                # Directories of the earlier project lack the newer fields, and
                # may hold its lark_config (secrets): fill in, and drop that.
                for k, v in self._initial_metadata().items():
                    m.setdefault(k, v)
                m.update(self._static_fields())
                m.pop("lark_config", None)
                m["created_at"] = self.created_at
                m["status"] = PENDING
                m["pid"] = None

            self._update_metadata(update)
            self.status = PENDING
        else:
            self.tags = tags_v or []
            self.gpu_ids = gpus_v
            self.cwd = cwd if cwd is not None else os.getcwd()
            self.description = description
            self.work_dir, self.timestamp = self._make_dir()
            self._fresh = True
            self.created_at = now_iso()
            if _defer_write:
                # The scheduler starts it at once: the first write says
                # "running", still before the command starts (it reads it).
                self._unwritten = True
            else:
                self._write_metadata(self._initial_metadata())
    #: True while the directory was made by this object and has no run yet.
    _fresh = False
    #: True while metadata.json is yet to be written (a scheduler's experiment).
    _unwritten = False

    # ------------------------------------------------------------------ creation

    def _make_dir(self) -> tuple[str, str]:
        stamp = time.strftime(TIMESTAMP_FORMAT)
        n = 1
        while True:
            ts = stamp if n == 1 else f"{stamp}_{n}"
            path = os.path.join(self.base_dir, f"{self.name}_{ts}")
            try:
                # mkdir is the atomic claim: two processes creating the same
                # name in the same second get _2, _3, ... and never share.
                os.mkdir(path)
            except FileExistsError:
                n += 1
                continue
            except FileNotFoundError:
                os.makedirs(self.base_dir, exist_ok=True)
                continue
            os.mkdir(os.path.join(path, "terminal_logs"))
            os.mkdir(os.path.join(path, "metrics"))
            return path, ts

    def _timestamp_from_dir(self, work_dir: str) -> str:
        base = os.path.basename(work_dir.rstrip(os.sep))
        prefix = self.name + "_"
        return base[len(prefix):] if base.startswith(prefix) else base

    def _resolve_resume(self, resume: Any) -> str:
        return find_resume_dir(self.base_dir, self.name, resume)

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, work_dir: str | os.PathLike[str]) -> Experiment:
        """Rebuild an Experiment from its directory (reads ``metadata.json``)."""
        work_dir = os.path.abspath(os.fspath(work_dir))
        meta = cls._read_metadata_at(work_dir)
        self = cls.__new__(cls)
        self.work_dir = work_dir
        self.base_dir = os.path.dirname(work_dir)
        self.name = meta.get("name") or os.path.basename(work_dir)
        self.command = meta.get("command") or ""
        self.tags = list(meta.get("tags") or [])
        self.gpu_ids = _lenient_gpu_ids(meta.get("gpu_ids"))
        self.cwd = meta.get("cwd") or work_dir  # the earlier project ran in work_dir by default
        self.description = meta.get("description")
        self.status = meta.get("status") or PENDING
        self.current_run_id = meta.get("current_run_id")
        self.timestamp = meta.get("timestamp_dir") or self._timestamp_from_dir(work_dir)
        self.created_at = meta.get("created_at") or _iso_from_old_timestamp(meta.get("timestamp"))
        stored = meta.get("environment")
        self.env = ({k: str(v) for k, v in stored.items() if v is not None and v != "***"}
                    if isinstance(stored, dict) else {})
        self.lark_config = None
        self._pending = {}
        self._ok_keys = set()
        self._writer = None
        self._writer_run = None
        self._meta_lock_obj = None
        self._meta_cache = None
        return self

    #: The earlier project's name for :meth:`load`.
    load_from_dir = load

    @staticmethod
    def _read_metadata_at(work_dir: str) -> dict[str, Any]:
        path = os.path.join(work_dir, "metadata.json")
        try:
            meta = read_json(path)
        except FileNotFoundError:
            raise ConfigError(f"{work_dir} is not an experiment directory: it has no metadata.json") from None
        except ValueError as e:
            raise ExpError(f"{path} is not valid JSON ({e}); fix or remove the file") from None
        if not isinstance(meta, dict):
            raise ExpError(f"{path} does not hold a JSON object")
        return meta

    # ------------------------------------------------------------------ metadata

    @property
    def metadata_path(self) -> str:
        return os.path.join(self.work_dir, "metadata.json")

    def read_metadata(self) -> dict[str, Any]:
        """The current contents of ``metadata.json``."""
        return self._read_metadata_at(self.work_dir)

    def _static_fields(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "command": self.command,
            "tags": self.tags,
            "description": self.description,
            "gpu_ids": self.gpu_ids,
            "cwd": self.cwd,
            "environment": redact_env(self.env),
        }

    def _initial_metadata(self) -> dict[str, Any]:
        meta = self._static_fields()
        meta.update(
            status=PENDING,
            exit_code=None,
            pid=None,
            hostname=_hostname(),
            user=_user(),
            timestamp=self.created_at,  # the earlier project's field
            timestamp_dir=self.timestamp,
            created_at=self.created_at,
            started_at=None,
            ended_at=None,
            duration=None,
            current_run_id=None,
            runs=[],
            exp_version=__version__,
            python_version=sys.version.split()[0],
            python_executable=sys.executable,
            git=git_info(self.cwd) if os.path.isdir(self.cwd) else None,
        )
        return meta

    def _meta_lock(self) -> _FileLock:
        if self._meta_lock_obj is None:
            self._meta_lock_obj = _FileLock(self.work_dir)
        return self._meta_lock_obj

    def _write_metadata(self, meta: dict[str, Any]) -> None:
        with self._meta_lock():
            self._store_metadata(meta)

    def _store_metadata(self, meta: dict[str, Any]) -> None:
        st = write_json_atomic(self.metadata_path, meta)
        self._meta_cache = ((st.st_ino, st.st_mtime_ns, st.st_size), meta)
        self._unwritten = False

    def _update_metadata(self, fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        # Read-modify-write under a lock file, so a run finishing in one thread
        # and a run starting in another (or another process) lose nothing.  The
        # file is re-read only if someone else wrote it since we last did.
        with self._meta_lock():
            if self._unwritten:
                meta = self._initial_metadata()
            else:
                try:
                    st = os.stat(self.metadata_path)
                    cached = self._meta_cache
                    if cached and cached[0] == (st.st_ino, st.st_mtime_ns, st.st_size):
                        meta = cached[1]
                    else:
                        meta = read_json(self.metadata_path)
                except (OSError, ValueError):
                    meta = {}
            fn(meta)
            self._store_metadata(meta)
            return meta

    # ------------------------------------------------------------------ paths

    def _existing_run_numbers(self) -> set[int]:
        nums = set()
        for sub, ext in (("terminal_logs", ".log"), ("metrics", ".csv")):
            try:
                names = os.listdir(os.path.join(self.work_dir, sub))
            except FileNotFoundError:
                continue
            for fn in names:
                if fn.endswith(ext):
                    m = _RUN_ID_RE.match(fn[: -len(ext)])
                    if m:
                        nums.add(int(m.group(1)))
        return nums

    def log_path(self, run_id: int | str | None = None) -> str:
        """Path of a run's log (default: the current run)."""
        rid = run_id_str(run_id) if run_id is not None else self._require_run()
        return os.path.join(self.work_dir, "terminal_logs", f"{rid}.log")

    def metrics_file(self, run_id: int | str | None = None) -> str:
        """Path of a run's metrics CSV (default: the current run)."""
        rid = run_id_str(run_id) if run_id is not None else self._require_run()
        return os.path.join(self.work_dir, "metrics", f"{rid}.csv")

    @property
    def metrics_path(self) -> str:
        """Path of the current run's metrics CSV."""
        return self.metrics_file()

    def _require_run(self) -> str:
        if not self.current_run_id:
            raise ExpError(
                f"experiment {self.name!r} has no run yet: call run() first, or inside a "
                "training script use exp.load_experiment()"
            )
        return self.current_run_id

    def runs(self) -> list[str]:
        """Run ids that have a log or a metrics file, oldest first."""
        return [f"run_{n:04d}" for n in sorted(self._existing_run_numbers())]

    # Names the earlier project's users call.
    def get_log_file_path(self, run_id: str | None = None) -> str:
        return self.log_path(run_id)

    def get_metrics_file_path(self) -> str:
        return self.metrics_path

    def get_all_runs(self) -> list[str]:
        return self.runs()

    def read_log(self, run_id: int | str | None = None) -> str:
        """The whole text of a run's log ('' if it has none yet)."""
        try:
            with open(self.log_path(run_id), encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def get_log_tail(self, lines: int = 50, run_id: int | str | None = None) -> str:
        return "".join(self.read_log(run_id).splitlines(keepends=True)[-lines:])

    def append_log(self, message: str, run_id: int | str | None = None) -> None:
        """Write an exp-marked line into a run's log."""
        _log_line(self.log_path(run_id), message)

    # ------------------------------------------------------------------ metrics

    def upd_row(self, **metrics: Any) -> None:
        """Add values to the row being built; a later value for a key replaces the earlier.

        Raises TypeError (naming the key) for a value that cannot go in a CSV.
        """
        pending = self._pending
        ok = self._ok_keys
        for key, value in metrics.items():
            if key not in ok:
                if "\n" in key or "\r" in key:
                    raise ValueError(f"metric name {key!r} cannot contain a line break")
                ok.add(key)
            pending[key] = format_metric(key, value)

    def save_row(self, *, lark: bool = False, lark_config: Any = None) -> None:
        """Append the row built by :meth:`upd_row` to the current run's CSV.

        With nothing pending this does nothing and notes it in the run's log.
        ``lark=True`` (syncing to a Lark Bitable) is not available yet.
        """
        if lark:
            raise NotImplementedError(
                "save_row(lark=True): syncing metrics to Lark is not implemented in this version "
                "of exp; call save_row() without lark to write the CSV"
            )
        rid = self._require_run()
        if not self._pending:
            try:
                _log_line(self.log_path(rid), "warning: save_row() called with no values; call upd_row(...) first")
            except OSError:
                pass
            return
        if self._writer_run != rid or self._writer is None:
            if self._writer is not None:
                self._writer.close()
            self._writer = MetricsWriter(self.metrics_file(rid))
            self._writer_run = rid
        row, self._pending = self._pending, {}
        self._writer.write_row(row)

    def metrics(self, run_id: int | str | None = None) -> list[dict[str, Any]]:
        """Rows of a run's metrics CSV (default: current run), numbers parsed back."""
        return read_metrics(self.metrics_file(run_id))

    # ------------------------------------------------------------------ running

    def run(
        self,
        background: bool = False,
        extra_env: dict[str, str | None] | None = None,
        *,
        grace: float = DEFAULT_KILL_GRACE,
    ) -> int | RunHandle:
        """Start the next run of the command.

        Foreground (default): follow the output to the console and return the
        exit code.  Ctrl-C stops the command's whole process group (SIGTERM,
        SIGKILL after ``grace`` seconds), records ``killed`` and re-raises
        KeyboardInterrupt.  Background: return a :class:`RunHandle` at once.
        """
        handle = self._start(extra_env)
        if background:
            return handle
        import signal

        # SIGTERM (timeout(1), docker stop, a cluster's scheduler) stops the run
        # the way Ctrl-C does, instead of leaving it orphaned and "running".
        old = None
        if threading.current_thread() is threading.main_thread():
            def on_sigterm(signum: int, frame: Any) -> None:
                raise KeyboardInterrupt

            old = signal.signal(signal.SIGTERM, on_sigterm)
        try:
            return handle._follow(grace)
        finally:
            if old is not None:
                signal.signal(signal.SIGTERM, old)

    def _child_env(self, run_id: str, extra_env: Mapping[str, str | None] | None) -> dict[bytes, bytes]:
        updates: dict[str, str | None] = {STANDALONE_ENV: None}
        if self.gpu_ids:
            updates["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in self.gpu_ids)
        updates.update(EXPERIMENT_WORK_DIR=self.work_dir, EXPERIMENT_NAME=self.name,
                       EXPERIMENT_RUN_ID=run_id, PYTHONUNBUFFERED="1")
        updates.update(self.env)
        updates.update(_validate_env(extra_env, "extra_env"))
        # os.environ keeps the environment as bytes in ``_data``: copying that is
        # a plain dict copy, where dict(os.environ) decodes every variable, which
        # shows when a batch starts hundreds of short experiments.  Popen takes
        # a bytes environment on POSIX.
        raw = getattr(os.environ, "_data", None)
        if isinstance(raw, dict) and all(type(k) is bytes for k in list(raw)[:1]):
            env = dict(raw)
        else:  # pragma: no cover - another Python's os.environ
            env = {os.fsencode(k): os.fsencode(v) for k, v in os.environ.items()}
        enc = os.fsencode
        for k, v in updates.items():
            if v is None:
                env.pop(enc(k), None)
            else:
                env[enc(k)] = enc(v)
        return env

    def _claim_run(self) -> tuple[str, str, int]:
        """Create the next run's log file exclusively; return (run_id, path, fd)."""
        logs = os.path.join(self.work_dir, "terminal_logs")
        # A directory this object just made has no runs; O_EXCL below guards anyway.
        num = 1 if self._fresh else max(self._existing_run_numbers(), default=0) + 1
        self._fresh = False
        while True:
            rid = f"run_{num:04d}"
            path = os.path.join(logs, f"{rid}.log")
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
            except FileExistsError:
                num += 1
                continue
            except FileNotFoundError:  # a directory made by hand, or a subdirectory deleted
                os.makedirs(logs, exist_ok=True)
                os.makedirs(os.path.join(self.work_dir, "metrics"), exist_ok=True)
                continue
            return rid, path, fd

    def _start(self, extra_env: Mapping[str, str | None] | None, watch: bool = True,
               pid_later: bool = False) -> RunHandle:
        """Start the next run.  With ``pid_later`` the start is recorded before
        the command starts and the caller records the pid (the scheduler: see
        :data:`PID_RECORD_DELAY`); otherwise it is recorded after, with the pid.
        Either way metadata.json exists before the command can read it.
        """
        import subprocess

        _require_posix()
        env_extra = _validate_env(extra_env, "extra_env")
        rid, log_path, fd = self._claim_run()
        command = add_conda_no_capture(self.command)
        self.current_run_id = rid
        started = now_iso()
        t0 = time.time()
        lines = [
            f"{started} {rid} of {self.name!r} starting",
            f"command: {command}",
            f"cwd: {self.cwd}",
            f"work_dir: {self.work_dir}",
        ]
        if self.gpu_ids:
            lines.append("CUDA_VISIBLE_DEVICES=" + ",".join(str(g) for g in self.gpu_ids))
        try:
            os.write(fd, "".join(f"{LOG_MARK} {ln}\n" for ln in lines).encode("utf-8"))
            if pid_later:
                self._record_start(rid, started, None)
            try:
                proc = subprocess.Popen(
                    command,
                    shell=True,
                    cwd=self.cwd,
                    env=self._child_env(rid, env_extra),
                    stdin=_devnull(),
                    stdout=fd,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                )
            except Exception as e:
                # e.g. cwd vanished, no /bin/sh, no memory: the run ends at once as an error
                os.write(fd, f"{LOG_MARK} could not start: {e}\n".encode("utf-8"))
                if not pid_later:
                    self._record_start(rid, started, None)
                self._record_end(rid, started, t0, 127, ERROR, log_path)
                raise ExpError(f"could not start {command!r} in {self.cwd!r}: {e}") from e
        finally:
            os.close(fd)
        if not pid_later:
            self._record_start(rid, started, proc.pid)
        return RunHandle(self, proc, rid, log_path, started, t0, watch)

    def _record_start(self, rid: str, started: str, pid: int | None) -> None:
        self.status = RUNNING

        def update(m: dict[str, Any]) -> None:
            m.update(self._static_fields())
            m.pop("lark_config", None)  # the earlier project stored secrets there
            m.update(status=RUNNING, pid=pid, started_at=started, ended_at=None, exit_code=None,
                     duration=None, current_run_id=rid)
            m.setdefault("runs", [])
            m["runs"].append({"id": rid, "pid": pid, "started_at": started, "ended_at": None,
                              "exit_code": None, "status": RUNNING})
            m["exp_version"] = __version__
            m["git"] = git_info(self.cwd) if os.path.isdir(self.cwd) else None

        self._update_metadata(update)

    def _record_pid(self, rid: str, pid: int) -> None:
        def update(m: dict[str, Any]) -> None:
            if m.get("current_run_id") == rid and m.get("status") == RUNNING:
                m["pid"] = pid
            for r in m.get("runs") or []:
                if r.get("id") == rid and r.get("pid") is None:
                    r["pid"] = pid

        self._update_metadata(update)

    def _record_end(self, rid: str, started: str, t0: float, code: int | None, status: str, log_path: str,
                    pid: int | None = None) -> None:
        ended = now_iso()
        duration = round(time.time() - t0, 3)
        if status == KILLED:
            what = f"killed (exit code {code})"
        elif code is not None and code < 0:
            what = f"ended by signal {-code} ({status})"
        else:
            what = f"exit code {code} ({status})"
        try:
            _log_line(log_path, f"{ended} {rid} ended: {what}, duration {format_duration(duration)}")
        except OSError:
            pass
        self.status = status

        def update(m: dict[str, Any]) -> None:
            m.update(status=status, exit_code=code, pid=None, ended_at=ended, duration=duration)
            for r in m.get("runs") or []:
                if r.get("id") == rid:
                    r.update(ended_at=ended, exit_code=code, status=status, duration=duration)
                    if r.get("pid") is None and pid is not None:
                        r["pid"] = pid

        try:
            self._update_metadata(update)
        finally:
            self._meta_lock().close()  # no descriptor held between runs

    def _start_in_process(self) -> None:
        """Make the calling process itself this experiment's current run (standalone mode)."""
        import atexit
        import shlex

        rid, log_path, fd = self._claim_run()
        os.close(fd)
        started = now_iso()
        t0 = time.time()
        self.current_run_id = rid
        _log_line(log_path, f"{started} standalone run {rid}: {shlex.join([sys.executable] + sys.argv)} "
                  f"(pid {os.getpid()}); its output is not captured here")
        self._record_start(rid, started, os.getpid())
        # Exit handlers are not told the exit status, so it is caught where it
        # is decided: an uncaught exception, or a call of sys.exit().
        state: dict[str, Any] = {"code": 0, "status": FINISHED}
        prev_hook, prev_exit = sys.excepthook, sys.exit

        def hook(tp: Any, value: Any, tb: Any) -> None:
            if issubclass(tp, KeyboardInterrupt):
                state.update(code=130, status=KILLED)
            else:
                state.update(code=1, status=ERROR)
            prev_hook(tp, value, tb)

        def exit_(arg: Any = None) -> None:
            code = 0 if arg is None else (arg if isinstance(arg, int) else 1)
            state.update(code=code, status=FINISHED if code == 0 else ERROR)
            prev_exit(arg)

        sys.excepthook = hook
        sys.exit = exit_  # type: ignore[assignment]

        def finish() -> None:
            try:
                self._record_end(rid, started, t0, state["code"], state["status"], log_path)
            except OSError:
                pass

        atexit.register(finish)

    def __repr__(self) -> str:
        return f"Experiment(name={self.name!r}, work_dir={self.work_dir!r}, status={self.status!r})"


_DEVNULL: list[int] = []


def _devnull() -> int:
    """One /dev/null descriptor for every child's stdin, opened once."""
    if not _DEVNULL:
        _DEVNULL.append(os.open(os.devnull, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)))
    return _DEVNULL[0]


def _log_line(path: str, message: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{LOG_MARK} {message}\n".encode("utf-8"))
    finally:
        os.close(fd)


# ============================================================================
# Runner: one running command
# ============================================================================


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to a process group; False when the group is gone."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # a member changed uid; nothing more we may do
        return False


def _group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is in the group.

    ``killpg(pgid, 0)`` alone also succeeds for zombies that nobody has reaped
    yet (in containers PID 1 often never reaps), so on Linux /proc is read.
    """
    if not _signal_group(pgid, 0):
        return False
    try:
        pids = os.listdir("/proc")
    except OSError:  # macOS: no /proc; trust killpg
        return True
    for pid in pids:
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


def _exited_within(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Whether ``proc`` ends within ``timeout`` seconds (it is not reaped here).

    Popen.wait(timeout) sleeps in growing steps, which would notice a command
    of a few milliseconds late; a pidfd (Linux 5.3+) wakes at the exit itself.
    """
    import select

    try:
        fd = os.pidfd_open(proc.pid)  # type: ignore[attr-defined]
    except (AttributeError, OSError):  # not Linux, an old kernel, or no descriptors left
        import subprocess

        try:
            proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(timeout * 1000))
    finally:
        os.close(fd)


class RunHandle:
    """A run started with ``Experiment.run(background=True)``.

    A watcher thread waits for the command and records its end (status, exit
    code, duration) in metadata.json and the log, whether or not anyone calls
    :meth:`wait`.  If the managing process exits first the command goes on,
    and metadata keeps status ``running``.
    """

    def __init__(self, experiment: Experiment, proc: subprocess.Popen[bytes], run_id: str,
                 log_path: str, started_at: str, t0: float, watch: bool = True) -> None:
        self.experiment = experiment
        self.run_id = run_id
        self.log_path = log_path
        self.pid = proc.pid
        self.started_at = started_at
        self.returncode: int | None = None
        self.status = RUNNING
        self._proc = proc
        self._t0 = t0
        self._killed = False
        self._done = threading.Event()
        if watch:  # the scheduler's own worker thread calls _watch() instead
            threading.Thread(target=self._watch, name=f"exp-watch-{run_id}", daemon=True).start()

    def _watch(self) -> None:
        self._finish(self._proc.wait())

    def _finish(self, code: int | None) -> None:
        """Record the end of the run (``code``: its exit status) and release waiters."""
        status = KILLED if self._killed else (FINISHED if code == 0 else ERROR)
        try:
            self.experiment._record_end(self.run_id, self.started_at, self._t0, code, status, self.log_path,
                                        self.pid)
        finally:
            self.returncode, self.status = code, status
            self._done.set()

    def poll(self) -> int | None:
        """The exit code if the run has ended (and been recorded), else None."""
        return self.returncode if self._done.is_set() else None

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the run to end; raise ``subprocess.TimeoutExpired`` after ``timeout`` seconds."""
        if not self._done.wait(timeout):
            import subprocess

            raise subprocess.TimeoutExpired(self.experiment.command, timeout)  # type: ignore[arg-type]
        assert self.returncode is not None
        return self.returncode

    def terminate(self, grace: float = DEFAULT_KILL_GRACE) -> int:
        """Stop the command and everything it started; return its exit code.

        SIGTERM goes to the whole process group; whatever is still alive after
        ``grace`` seconds gets SIGKILL.  The run is recorded as ``killed``.
        """
        if self._done.is_set():
            return self.returncode  # type: ignore[return-value]
        self._killed = True
        pgid = self.pid  # the child leads its own session and group
        _signal_group(pgid, 15)
        deadline = time.monotonic() + max(0.0, grace)
        while time.monotonic() < deadline:
            if self._done.is_set() and not _group_alive(pgid):
                break
            time.sleep(0.02)
        _signal_group(pgid, 9)
        return self.wait()

    def kill(self) -> int:
        """Stop at once with SIGKILL to the whole process group."""
        return self.terminate(grace=0)

    def _follow(self, grace: float) -> int:
        """Copy the log to stdout until the run ends; the foreground half of run().

        If stdout goes away (``| head``, a closed terminal), copying stops but
        the run goes on and its end is still recorded.
        """
        import codecs

        out = getattr(sys.stdout, "buffer", None)
        # Without a byte stream (Jupyter), decode incrementally: a character
        # split across two chunks must not become two replacement characters.
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        echo = [True]

        def emit(chunk: bytes) -> None:
            if not echo[0]:
                return
            try:
                if out is not None:
                    out.write(chunk)
                else:
                    sys.stdout.write(decoder.decode(chunk))
                sys.stdout.flush()
            except (OSError, ValueError):  # broken pipe, closed stream
                echo[0] = False

        with open(self.log_path, "rb") as f:
            try:
                while True:
                    chunk = f.read(1 << 16)
                    if chunk:
                        emit(chunk)
                        continue
                    if self._done.is_set():
                        rest = f.read()
                        if rest:
                            emit(rest)
                        break
                    self._done.wait(FOLLOW_INTERVAL)
            except KeyboardInterrupt:
                try:
                    self.terminate(grace)
                except KeyboardInterrupt:  # a second Ctrl-C: no more waiting
                    self.kill()
                rest = f.read()
                if rest:
                    emit(rest)
                raise
        return self.wait()

    def __repr__(self) -> str:
        return f"RunHandle(run_id={self.run_id!r}, pid={self.pid}, status={self.status!r})"


# ============================================================================
# Inside a training script
# ============================================================================


def load_experiment(standalone: bool = False) -> Experiment:
    """Return the Experiment (and run) that launched this process.

    The directory comes from ``EXPERIMENT_WORK_DIR`` and the run from
    ``EXPERIMENT_RUN_ID``; metadata.json is not trusted for the run, since a
    later run of the same directory may already have changed it.

    Outside exp this raises :class:`NoExperimentContext`, unless
    ``standalone=True`` (or ``EXP_STANDALONE=1``): then a fresh experiment
    named after the script is created under ``./results`` and this process
    becomes its first run, so ``python train.py`` still works while debugging.
    """
    work_dir = os.environ.get("EXPERIMENT_WORK_DIR")
    if work_dir:
        if not os.path.isfile(os.path.join(work_dir, "metadata.json")):
            raise NoExperimentContext(
                f"EXPERIMENT_WORK_DIR={work_dir!r} has no metadata.json; it was set by hand or the "
                "directory was moved. Unset it, or launch the script with exp"
            )
        e = Experiment.load(work_dir)
        rid = os.environ.get("EXPERIMENT_RUN_ID")
        if rid:
            try:
                e.current_run_id = run_id_str(rid)
            except ConfigError:
                raise NoExperimentContext(f"EXPERIMENT_RUN_ID={rid!r} is not a run id like 'run_0001'") from None
        if "EXPERIMENT_NAME" in os.environ:
            e.name = os.environ["EXPERIMENT_NAME"]
        return e
    flag = os.environ.get(STANDALONE_ENV, "").strip().lower()
    if standalone or flag in ("1", "true", "yes", "on"):
        import shlex

        script = sys.argv[0] if sys.argv and sys.argv[0] not in ("", "-c", "-") else ""
        name = os.path.splitext(os.path.basename(script))[0] or "interactive"
        e = Experiment(name=name, command=shlex.join([sys.executable] + sys.argv), base_dir=DEFAULT_BASE_DIR)
        e._start_in_process()
        return e
    raise NoExperimentContext(
        "load_experiment() found no experiment: EXPERIMENT_WORK_DIR is not set, so this process "
        "was not launched by exp. Launch it with exp.Experiment(name=..., command=...).run() or "
        "'python exp.py run config.toml', or call load_experiment(standalone=True) "
        "(or set EXP_STANDALONE=1) to log into a fresh experiment under ./results"
    )


# ============================================================================
# Config: the batch TOML file (pure parsing and validation)
# ============================================================================
#
# parse_config() takes text and returns a BatchConfig or raises ConfigError
# listing *every* problem found, so a user fixes a file in one pass.  Nothing
# is launched unless the whole file is valid.

#: ``[scheduler]`` keys: name -> (expected type description, validator).
SCHEDULER_DEFAULTS: dict[str, Any] = {
    "base_experiment_dir": DEFAULT_BASE_DIR,
    "max_concurrent_experiments": 1,
    "check_interval": 1.0,
    "auto_restart_on_error": False,
    "linger_when_idle": False,
    "kill_timeout": DEFAULT_KILL_GRACE,
    "lark_url": None,
    "lark_config": None,
}
#: ``[[experiments]]`` keys and their defaults (name and command are required).
EXPERIMENT_DEFAULTS: dict[str, Any] = {
    "name": None,
    "command": None,
    "priority": 0,
    "tags": [],
    "description": None,
    "gpu_ids": None,
    "cwd": None,
    "base_dir": None,
    "environment": {},
    "resume": None,
    "repeats": 1,
    "max_retries": 0,
    "delay_seconds": 0.0,
    "lark_url": None,
    "lark_config": None,
}


class ExperimentSpec:
    """One ``[[experiments]]`` table after validation, paths made absolute."""

    __slots__ = tuple(EXPERIMENT_DEFAULTS) + ("index",)
    index: int
    name: str
    command: str
    priority: int
    tags: list[str]
    description: str | None
    gpu_ids: list[int] | None
    cwd: str
    base_dir: str
    environment: dict[str, str]
    resume: str | None
    repeats: int
    max_retries: int
    delay_seconds: float
    lark_url: str | None
    lark_config: dict[str, Any] | str | None

    def __init__(self, index: int, values: dict[str, Any]) -> None:
        self.index = index
        for k, v in EXPERIMENT_DEFAULTS.items():
            setattr(self, k, values.get(k, v))


class BatchConfig:
    """A validated batch file: scheduler settings and the experiments, in file order."""

    def __init__(self, path: str, settings: dict[str, Any], experiments: list[ExperimentSpec]) -> None:
        self.path = path
        self.settings = settings
        self.experiments = experiments

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["settings"][key]
        except KeyError:
            raise AttributeError(key) from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_value(where: str, key: str, v: Any, errors: list[str]) -> Any:
    """Validate one key's value; append a message to ``errors`` and return None when bad."""
    loc = f"{where}.{key}"

    def bad(expected: str) -> None:
        errors.append(f"{loc}: expected {expected}, got {v!r}")

    if key in ("name", "command"):
        if not isinstance(v, str) or not v.strip():
            return bad("a non-empty string")
        try:
            (_validate_name if key == "name" else _validate_command)(v)
        except ConfigError as e:
            errors.append(f"{loc}: {e}")
            return None
        return v
    if key in ("description", "cwd", "base_dir", "base_experiment_dir", "lark_url", "resume"):
        if not isinstance(v, str) or (key != "description" and not v.strip()):
            return bad("a string" if key == "description" else "a non-empty string")
        return v
    if key == "priority":
        return v if _is_int(v) else bad("an integer")
    if key in ("repeats", "max_concurrent_experiments"):
        if not _is_int(v) or v < 1:
            return bad("an integer >= 1")
        return v
    if key == "max_retries":
        if not _is_int(v) or v < 0:
            return bad("an integer >= 0")
        return v
    if key in ("delay_seconds", "kill_timeout"):
        if not _is_num(v) or v < 0:
            return bad("a number of seconds >= 0")
        return float(v)
    if key == "check_interval":
        if not _is_num(v) or v <= 0:
            return bad("a number of seconds > 0")
        return float(v)
    if key in ("auto_restart_on_error", "linger_when_idle"):
        return v if isinstance(v, bool) else bad("true or false")
    if key == "tags":
        if not isinstance(v, list) or not all(isinstance(t, str) for t in v):
            return bad('a list of strings such as ["baseline"]')
        return list(v)
    if key == "gpu_ids":
        try:
            return parse_gpu_ids(v, loc)
        except ConfigError as e:
            errors.append(str(e))
            return None
    if key == "environment":
        if not isinstance(v, dict):
            return bad('a table such as { KEY = "VALUE" }')
        env = {}
        for ek, ev in v.items():
            if not ek or "=" in ek or "\0" in ek:
                errors.append(f"{loc}: {ek!r} is not a valid environment variable name")
                continue
            if isinstance(ev, (dict, list)) or "\0" in str(ev):
                errors.append(f"{loc}.{ek}: expected a string, number or boolean value (no NUL), got {ev!r}")
                continue
            env[ek] = ("true" if ev else "false") if isinstance(ev, bool) else str(ev)
        return env
    if key == "lark_config":
        if not isinstance(v, (dict, str)):
            return bad("a table or a URL string")
        return v
    return v  # pragma: no cover - every known key is handled above


def _unknown_key(where: str, key: str, known: Iterable[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (valid keys: {', '.join(sorted(known))})"
    return f"{where}: unknown key {key!r}{hint}"


def _resolve(base: str, path: str) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def parse_config(text: str, source: str = "<config>", root: str | None = None) -> BatchConfig:
    """Parse and validate a batch TOML file.

    Relative paths (``base_experiment_dir``, ``base_dir``, ``cwd``) resolve
    against ``root`` (the config file's directory; default the current
    directory), and ``cwd`` defaults to ``root``.  Raises ConfigError naming
    every problem.
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.9/3.10 in CI
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError(
                "reading TOML on Python < 3.11 needs the 'tomli' package: pip install tomli"
            ) from None
    root = os.path.abspath(root or os.getcwd())
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: TOML syntax error: {e}") from None

    errors: list[str] = []
    for key in data:
        if key not in ("scheduler", "experiments"):
            errors.append(_unknown_key("top level", key, ("scheduler", "experiments")))

    raw_sched = data.get("scheduler", {})
    settings = dict(SCHEDULER_DEFAULTS)
    if not isinstance(raw_sched, dict):
        errors.append("scheduler: expected a [scheduler] table")
        raw_sched = {}
    for key, v in raw_sched.items():
        if key not in SCHEDULER_DEFAULTS:
            errors.append(_unknown_key("scheduler", key, SCHEDULER_DEFAULTS))
            continue
        checked = _check_value("scheduler", key, v, errors)
        if checked is not None:
            settings[key] = checked
    settings["base_experiment_dir"] = _resolve(root, settings["base_experiment_dir"])

    raw_exps = data.get("experiments")
    specs: list[ExperimentSpec] = []
    if raw_exps is None or raw_exps == []:
        errors.append(
            "no experiments: add at least one [[experiments]] table with a name and a command, e.g.\n"
            '  [[experiments]]\n  name = "baseline"\n  command = "python train.py"'
        )
        raw_exps = []
    elif not isinstance(raw_exps, list) or not all(isinstance(t, dict) for t in raw_exps):
        errors.append("experiments: expected an array of tables written as [[experiments]]")
        raw_exps = []
    for i, table in enumerate(raw_exps):
        where = f"experiments[{i}]"
        values: dict[str, Any] = {}
        for key, v in table.items():
            if key not in EXPERIMENT_DEFAULTS:
                errors.append(_unknown_key(where, key, EXPERIMENT_DEFAULTS))
                continue
            checked = _check_value(where, key, v, errors)
            if checked is not None:
                values[key] = checked
        for req in ("name", "command"):
            if req not in table:
                errors.append(f"{where}: missing required key {req!r}")
        if values.get("resume") and values.get("repeats", 1) > 1:
            errors.append(f"{where}: resume cannot be combined with repeats > 1 (every repeat needs its own directory)")
        values["cwd"] = _resolve(root, values.get("cwd") or ".")
        resume = values.get("resume")
        if resume and (os.sep in resume or resume.startswith(("~", "."))):
            values["resume"] = _resolve(root, resume)  # a path, not a timestamp
        values["base_dir"] = _resolve(root, values["base_dir"]) if values.get("base_dir") else settings["base_experiment_dir"]
        specs.append(ExperimentSpec(i, values))
    if errors:
        raise ConfigError(f"{source}: {len(errors)} problem{'s' if len(errors) > 1 else ''}:\n  " + "\n  ".join(errors))
    return BatchConfig(source, settings, specs)


def load_config(path: str | os.PathLike[str]) -> BatchConfig:
    """Read and validate a batch file; paths in it resolve against its directory."""
    path = os.path.abspath(os.fspath(path))
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory; pass the .toml file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    config = parse_config(text, path, os.path.dirname(path))
    # What parsing alone cannot see: directories must exist before anything starts.
    errors = []
    for spec in config.experiments:
        if not os.path.isdir(spec.cwd):
            errors.append(f"experiments[{spec.index}].cwd: {spec.cwd} is not an existing directory")
        if spec.resume:
            try:
                find_resume_dir(spec.base_dir, spec.name, spec.resume)
            except ConfigError as e:
                errors.append(f"experiments[{spec.index}].resume: {e}")
    if errors:
        raise ConfigError(f"{path}: {len(errors)} problem{'s' if len(errors) > 1 else ''}:\n  " + "\n  ".join(errors))
    return config


# ============================================================================
# Scheduler model and planning (pure)
# ============================================================================


class Job:
    """One experiment of a batch (a repeat is its own Job); attempts are its runs."""

    def __init__(self, job_id: int, spec: ExperimentSpec, repeat: int, order: int) -> None:
        self.id = job_id
        self.spec = spec
        self.repeat = repeat
        self.order = order
        self.attempt = 0
        self.status = PENDING
        self.created_at = now_iso()
        self.started_at: str | None = None
        self.completed_at: str | None = None
        self.return_code: int | None = None
        self.work_dir: str | None = None
        self.run_id: str | None = None
        self.not_before = 0.0  # clock time before which it may not start (delay_seconds)
        self.t_started = 0.0
        self.duration: float | None = None
        self.experiment: Experiment | None = None
        self.handle: RunHandle | None = None
        self.error: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    #: 1 + max_retries when the batch retries failures, else 1 (set by expand_jobs).
    max_attempts = 1

    def label(self) -> str:
        rep = f" #{self.repeat}/{self.spec.repeats}" if self.spec.repeats > 1 else ""
        return f"{self.spec.name}{rep}"

    def outcome(self) -> str:
        """How an ended attempt went, for people: "exit code 3", "killed", and any error."""
        if self.status == KILLED:
            what = "killed"
        else:
            what = "" if self.return_code is None else f"exit code {self.return_code}"
        return ", ".join(x for x in (what, self.error) if x)

    def to_state(self) -> dict[str, Any]:
        s = self.spec
        return {
            "id": self.id, "name": s.name, "command": s.command, "priority": s.priority,
            "tags": s.tags, "gpu_ids": s.gpu_ids, "cwd": s.cwd, "base_dir": s.base_dir,
            "environment": redact_env(s.environment), "description": s.description,
            "repeats": s.repeats, "repeat": self.repeat, "max_retries": s.max_retries,
            "delay_seconds": s.delay_seconds, "attempt": self.attempt, "status": self.status,
            "created_at": self.created_at, "started_at": self.started_at,
            "completed_at": self.completed_at, "return_code": self.return_code,
            "duration": self.duration, "work_dir": self.work_dir, "run_id": self.run_id,
            "pid": self.handle.pid if self.handle is not None and self.status == RUNNING else None,
            "error": self.error,
        }


def expand_jobs(config: BatchConfig) -> list[Job]:
    """Jobs in dispatch order: priority high to low, file order among equals, repeats together."""
    jobs: list[Job] = []
    retrying = bool(config.auto_restart_on_error)
    for spec in config.experiments:
        for r in range(1, spec.repeats + 1):
            job = Job(0, spec, r, len(jobs))
            job.max_attempts = 1 + (spec.max_retries if retrying else 0)
            jobs.append(job)
    jobs.sort(key=lambda j: (-j.spec.priority, j.order))
    for i, j in enumerate(jobs, 1):
        j.id = i
    return jobs


def plan_next(queue: list[Job], running: int, limit: int, now: float) -> list[Job]:
    """Which queued jobs to start now: the first ones whose delay is over, up to the free slots.

    ``queue`` is in dispatch order (retries go to its front); a job still in
    its delay does not hold back the jobs behind it.
    """
    free = limit - running
    if free <= 0:
        return []
    picked = []
    for job in queue:
        if job.not_before <= now:
            picked.append(job)
            if len(picked) == free:
                break
    return picked


def next_wakeup(queue: list[Job], now: float) -> float | None:
    """Seconds until the earliest delayed job becomes startable (None if none is waiting)."""
    waits = [j.not_before - now for j in queue if j.not_before > now]
    return max(0.0, min(waits)) if waits else None


# ============================================================================
# Scheduler: execution, terminal, state file
# ============================================================================

_STATE_DIR = ".exp_state"
_STATE_FILE = "scheduler_state.json"
#: Least time between two writes of the state file while experiments churn.
#: Transitions inside the window are coalesced into one write at its end, so
#: the file is never more than this stale.  Rewriting ~0.5 KB per experiment
#: on every transition would otherwise dominate batches of short commands.
STATE_WRITE_INTERVAL = 0.1


def _short_path(path: str | None) -> str:
    if not path:
        return "-"
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return rel if len(rel) < len(path) else path


def _tail_lines(path: str, n: int = 10, max_bytes: int = 65536, skip_prefix: str | None = None) -> list[str]:
    """The last ``n`` lines of a file (without those starting ``skip_prefix``), read from its end."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    text = data.decode("utf-8", "replace").replace("\r\n", "\n")
    lines = [ln.rsplit("\r", 1)[-1] for ln in text.split("\n")]  # a tqdm bar: keep its last frame
    if skip_prefix:
        lines = [ln for ln in lines if not ln.startswith(skip_prefix)]
    while lines and not lines[-1].strip():
        lines.pop()
    return lines[-n:]


class _Terminal:
    """Event lines plus, on a TTY, one live progress line kept below them."""

    def __init__(self, out: Any) -> None:
        self.out = out
        isatty = getattr(out, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.color = self.tty and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
        self._bar = ""
        self._broken = False

    def _write(self, text: str) -> None:
        # A reader that went away (``exp run ... | head``) must not stop the
        # batch half-way through a launch: the terminal just goes quiet.
        if self._broken:
            return
        try:
            self.out.write(text)
            self.out.flush()
        except (OSError, ValueError):
            self._broken = True

    def paint(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text

    def event(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        bar = self.tty and self._bar
        self._write(("\r\x1b[K" if bar else "") + f"[{stamp}] {text}\n" + (self._bar if bar else ""))

    def progress(self, text: str) -> None:
        if not self.tty:
            return
        try:
            width = os.get_terminal_size(self.out.fileno()).columns or 100  # 0: a pty nobody sized
        except (OSError, ValueError, AttributeError):
            width = 100
        self._bar = text[: max(10, width - 1)]
        self._write("\r\x1b[K" + self._bar)

    def clear_progress(self) -> None:
        if self.tty and self._bar:
            self._write("\r\x1b[K")
        self._bar = ""

    def plain(self, text: str = "") -> None:
        self.clear_progress()
        self._write(text + "\n")


class Scheduler:
    """Run a batch: dispatch by priority under a concurrency limit, retry, report.

    The main thread makes each experiment's directory and starts its command;
    a thread of a ``ThreadPoolExecutor`` waits for the command, records its
    end in the experiment's files and says so through a queue, so a finished
    experiment frees its slot and the next starts at once.  Only the main
    thread changes job state and writes the state file.

    Args:
        config: a validated :class:`BatchConfig`.
        out: where event lines go (a TTY also gets a live progress line).
        clock: monotonic clock; injectable for tests.
    """

    def __init__(self, config: BatchConfig, out: Any = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.limit = int(config.max_concurrent_experiments)
        self.jobs = expand_jobs(config)
        self.queue: list[Job] = list(self.jobs)
        self.running: dict[int, Job] = {}
        self.done: list[Job] = []
        self.state_path = os.path.join(config.base_experiment_dir, _STATE_DIR, _STATE_FILE)
        self.term = _Terminal(out or sys.stdout)
        self._clock = clock
        self._events: Any = None
        self._status_indicator = RUNNING
        self._stopping = False
        self._started_at = now_iso()
        self._t0 = clock()
        self._state_cache: dict[int, str] = {}
        self._dirty = True
        self._next_state_write = 0.0
        self._state_unwritable = False
        now = clock()
        for job in self.jobs:
            job.not_before = now + job.spec.delay_seconds

    # ---------------------------------------------------------------- state

    def _job_json(self, job: Job) -> str:
        # Each job's JSON is rebuilt only when that job changed: the state file
        # is rewritten on every transition and must stay cheap for big batches.
        text = self._state_cache.get(job.id)
        if text is None:
            text = _json().dumps(job.to_state(), ensure_ascii=False, default=str)
            self._state_cache[job.id] = text
        return text

    def _touch(self, job: Job) -> None:
        self._state_cache.pop(job.id, None)

    def write_state(self) -> None:
        """Write ``<base>/.exp_state/scheduler_state.json`` atomically.

        If it cannot be written (a full disk), that is said once and the write
        is tried again later: the experiments matter more than the state file.
        """
        groups: dict[str, list[Job]] = {"pending": list(self.queue), "running": list(self.running.values()),
                                        "finished": [], "errors": []}
        for job in self.done:
            groups["finished" if job.status == FINISHED else "errors"].append(job)
        summary = {
            "total": len(self.jobs), "pending": len(groups["pending"]), "running": len(groups["running"]),
            "finished": len(groups["finished"]), "errors": len(groups["errors"]),
            "status_indicator": self._status_indicator, "pid": os.getpid(),
            "host": _hostname(), "config_path": self.config.path,
            "max_concurrent_experiments": self.limit,
            "started_at": self._started_at, "updated_at": now_iso(),
        }
        parts = []
        for key, jobs in groups.items():
            parts.append(f'"{key}": [' + ", ".join(self._job_json(j) for j in jobs) + "]")
        parts.append('"summary": ' + _json().dumps(summary))
        text = "{" + ",\n".join(parts) + "}\n"
        self._dirty = False
        self._next_state_write = self._clock() + STATE_WRITE_INTERVAL
        tmp = f"{self.state_path}.{os.getpid()}.tmp"
        try:
            os.makedirs(os.path.dirname(self.state_path), exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, self.state_path)
        except OSError as e:
            self._dirty = True
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if not self._state_unwritable:
                self._state_unwritable = True
                self.term.event(f"warning: cannot write the state file {_short_path(self.state_path)} ({e}); "
                                "the batch goes on and exp keeps trying")
            return
        if self._state_unwritable:
            self._state_unwritable = False
            self.term.event(f"the state file {_short_path(self.state_path)} is written again")

    # ---------------------------------------------------------------- worker side

    @staticmethod
    def _wait(job: Job, handle: RunHandle) -> tuple[str, Job, Any]:
        """In a pool thread: wait for a run's command, record its end; never raises.

        A run still going after :data:`PID_RECORD_DELAY` gets its pid written
        first.  Returns ``("exited", job, (exit code, error or None))``.
        """
        try:
            if not _exited_within(handle._proc, PID_RECORD_DELAY):
                handle.experiment._record_pid(handle.run_id, handle.pid)
        except Exception:  # noqa: BLE001 - e.g. disk full: the end still gets recorded
            pass
        try:
            code: int | None = handle._proc.wait()
        except BaseException:  # noqa: BLE001 - not expected for our own child; still an end
            code = None
        try:
            handle._finish(code)
        except BaseException as e:  # noqa: BLE001 - e.g. disk full: the batch goes on, and says so
            return ("exited", job, (code, f"its end could not be recorded: {type(e).__name__}: {e}"))
        return ("exited", job, (code, None))

    # ---------------------------------------------------------------- main loop

    def run(self) -> int:
        """Run the whole batch; return the exit status (0 ok, 1 failures, 130 interrupted)."""
        import queue as queue_mod
        import signal
        from concurrent.futures import ThreadPoolExecutor

        _require_posix()
        self._events = queue_mod.SimpleQueue()
        on_main = threading.current_thread() is threading.main_thread()
        old_handlers: dict[Any, Any] = {}
        if on_main:
            # SIGTERM (from kill, systemd, a cluster) shuts down like Ctrl-C.
            # SIGINT too, explicitly: a shell starts background jobs with SIGINT
            # ignored, and then Python would never raise KeyboardInterrupt.
            # The handler only queues an event (SimpleQueue.put is safe in a
            # signal handler): an exception raised at an arbitrary line could
            # leave a job marked running with nothing left to report its end.
            def on_signal(signum: int, frame: Any) -> None:
                self._events.put(("signal", None, signum))

            for sig in (signal.SIGTERM, signal.SIGINT):
                old_handlers[sig] = signal.signal(sig, on_signal)
        interrupted = False
        pool = ThreadPoolExecutor(max_workers=self.limit, thread_name_prefix="exp-job")
        try:
            self.write_state()
            try:
                self._loop(pool)
            except KeyboardInterrupt:
                interrupted = self._status_indicator != "awaiting_shutdown"
                self._shutdown()
            # Still under our handlers: a late Ctrl-C cannot skip these.
            self._status_indicator = "stopped"
            self.write_state()
            self._print_summary(interrupted)
        finally:
            pool.shutdown(wait=False)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if interrupted:
            return 130
        return 0 if all(j.status == FINISHED and not j.error for j in self.jobs) else 1

    def _loop(self, pool: Any) -> None:
        import queue as queue_mod

        linger = bool(self.config.linger_when_idle)
        while True:
            now = self._clock()
            for job in plan_next(self.queue, len(self.running), self.limit, now):
                self.queue.remove(job)
                self._launch(pool, job)
            if not self.queue and not self.running:
                if not linger:
                    return
                if self._status_indicator != "awaiting_shutdown":
                    self._status_indicator = "awaiting_shutdown"
                    self._dirty = True
                    self.term.clear_progress()
                    self.term.event("all experiments done; waiting (linger_when_idle); press Ctrl-C to exit")
            # One write covers every transition handled since the last one,
            # at most every STATE_WRITE_INTERVAL; a pending write bounds the wait.
            if self._dirty and self._clock() >= self._next_state_write:
                self.write_state()
            self._progress()
            timeout = next_wakeup(self.queue, now)
            cap = 1.0 if self.term.tty else float(self.config.check_interval)
            timeout = cap if timeout is None else min(timeout, cap)
            if self._dirty:
                timeout = min(timeout, max(0.0, self._next_state_write - self._clock()))
            try:
                ev = self._events.get(timeout=timeout)
            except queue_mod.Empty:  # a delay ended or the progress line needs a tick
                continue
            interrupt = False
            while True:
                if ev[0] == "signal":
                    interrupt = True
                else:
                    self._handle(ev)
                try:
                    ev = self._events.get_nowait()
                except queue_mod.Empty:
                    break
            if interrupt:
                raise KeyboardInterrupt  # here, between events, where state is consistent

    def _launch(self, pool: Any, job: Job) -> None:
        job.attempt += 1
        job.status = RUNNING
        job.started_at = now_iso()
        job.completed_at = None
        job.return_code = None
        job.t_started = self._clock()
        self.running[job.id] = job
        self._dirty = True
        try:
            if job.experiment is None:
                # Its metadata.json is first written by the start, still before
                # the command runs: one rewrite less per experiment.
                s = job.spec
                job.experiment = Experiment(
                    name=s.name, command=s.command, base_dir=s.base_dir, tags=s.tags, gpu_ids=s.gpu_ids,
                    cwd=s.cwd, resume=s.resume, description=s.description,
                    lark_config=s.lark_config or s.lark_url, env=s.environment, _defer_write=True,
                )
            handle = job.experiment._start(None, watch=False, pid_later=True)
        except Exception as e:  # e.g. cwd removed since validation, disk full
            experiment = job.experiment
            if experiment is not None and experiment._unwritten:  # failed before its first write
                try:
                    experiment._update_metadata(lambda m: m.update(status=ERROR))
                except OSError:
                    pass
                finally:
                    experiment._meta_lock().close()
            self._handle(("unstartable", job, e))
            return
        job.handle, job.run_id, job.work_dir = handle, handle.run_id, job.experiment.work_dir
        self._touch(job)
        gpus = ",".join(map(str, job.spec.gpu_ids)) if job.spec.gpu_ids else "-"
        self.term.event(
            f"{self.term.paint('started ', '36')} {job.label()} (attempt {job.attempt}/{job.max_attempts}, "
            f"GPUs {gpus}) -> {_short_path(job.work_dir)}"
        )
        fut = pool.submit(self._wait, job, handle)
        fut.add_done_callback(lambda f: self._events.put(f.result()))

    def _handle(self, ev: tuple[str, Job, Any]) -> None:
        kind, job, value = ev
        self.running.pop(job.id, None)
        job.completed_at = now_iso()
        job.duration = round(self._clock() - job.t_started, 3)
        if kind == "unstartable":
            job.status, job.return_code, job.error = ERROR, None, f"{type(value).__name__}: {value}"
            if job.experiment is not None:
                job.work_dir = job.experiment.work_dir
        else:
            assert job.handle is not None
            job.return_code, job.error = value
            job.status = job.handle.status
        self._touch(job)
        dur = format_duration(job.duration)
        note = f" ({job.error})" if job.error and kind == "exited" else ""
        if job.status == FINISHED:
            self.term.event(f"{self.term.paint('finished', '32')} {job.label()} in {dur}{note}")
        elif job.status == KILLED:
            self.term.event(f"{self.term.paint('killed  ', '33')} {job.label()} after {dur}{note}")
        else:
            self.term.event(f"{self.term.paint('failed  ', '31')} {job.label()} ({job.outcome()}) after {dur}")
            log = job.handle.log_path if (job.handle is not None and kind == "exited") else None
            if log:
                for line in _tail_lines(log, 10, skip_prefix=LOG_MARK):
                    self.term.plain(f"      {line}")
        retry = (
            job.status == ERROR and not self._stopping and self.config.auto_restart_on_error
            and job.attempt < job.max_attempts and kind == "exited"
        )
        if retry:
            job.status = PENDING
            job.not_before = self._clock() + job.spec.delay_seconds
            job.handle = None
            self.queue.insert(0, job)
            self.term.event(
                f"{self.term.paint('retrying', '35')} {job.label()} (attempt {job.attempt + 1}/{job.max_attempts})"
            )
        else:
            self.done.append(job)
        self._dirty = True

    def _progress(self) -> None:
        if not self.term.tty:
            return
        done = len(self.done)
        failed = sum(1 for j in self.done if j.status != FINISHED)
        names = ", ".join(j.label() for j in self.running.values()) or "-"
        elapsed = format_duration(self._clock() - self._t0)
        self.term.progress(f"[{done}/{len(self.jobs)} done] running: {names} | failed: {failed} | {elapsed}")

    def _shutdown(self) -> None:
        """Stop launching; SIGTERM every running group, SIGKILL after kill_timeout; wait for all.

        The grace period covers the whole process group, not only its leader:
        a training script under ``sh -c`` or a launcher may still be saving a
        checkpoint after the shell itself has gone.
        """
        import queue as queue_mod

        self._stopping = True
        self.term.clear_progress()
        grace = float(self.config.kill_timeout)
        if self.running:
            self.term.event(f"interrupted: stopping {len(self.running)} running experiment(s) "
                            f"(SIGKILL after {format_duration(grace)}; Ctrl-C again to kill now)")
        groups = []
        for job in self.running.values():
            if job.handle is not None:
                job.handle._killed = True
                groups.append(job.handle.pid)
                _signal_group(job.handle.pid, 15)
        deadline = self._clock() + grace
        hard = False
        while True:
            groups = [g for g in groups if _group_alive(g)]
            if not self.running and not groups:
                break
            if not hard and self._clock() >= deadline:
                hard = True
            if hard:
                for g in groups:
                    _signal_group(g, 9)
            try:
                ev = self._events.get(timeout=0.05)
            except KeyboardInterrupt:  # a second Ctrl-C (no handler installed): no more waiting
                hard = True
                continue
            except queue_mod.Empty:
                continue
            if ev[0] == "signal":  # a second Ctrl-C or SIGTERM: no more waiting
                hard = True
                continue
            self._handle(ev)

    def _print_summary(self, interrupted: bool) -> None:
        first = [j for j in self.jobs if j.status == FINISHED and j.attempt == 1]
        retried = [j for j in self.jobs if j.status == FINISHED and j.attempt > 1]
        failed = [j for j in self.jobs if j.status in (ERROR, KILLED)]
        never = [j for j in self.jobs if j.status == PENDING]
        t = self.term
        t.plain()
        t.plain(f"summary: {len(self.jobs)} experiment(s) in {format_duration(self._clock() - self._t0)}"
                + (" (interrupted)" if interrupted else ""))
        t.plain(f"  succeeded first time:    {len(first)}")
        t.plain(f"  succeeded after retries: {len(retried)}"
                + (" (" + ", ".join(f"{j.label()} x{j.attempt}" for j in retried) + ")" if retried else ""))
        t.plain(f"  failed:                  {len(failed)}")
        for j in failed:
            t.plain(f"    {j.label()}: {j.outcome()}  {_short_path(j.work_dir)}")
        if never:
            t.plain(f"  not started:             {len(never)}")
        unrecorded = [j for j in self.jobs if j.status == FINISHED and j.error]
        if unrecorded:  # the command succeeded, but its metadata.json still says running
            t.plain(f"  succeeded, end not recorded: {len(unrecorded)}")
            for j in unrecorded:
                t.plain(f"    {j.label()}: {j.error}  {_short_path(j.work_dir)}")
        t.plain(f"  state: {_short_path(self.state_path)}")


def format_plan(config: BatchConfig) -> str:
    """The dispatch plan of ``--dry-run``, one line per experiment."""
    rows: list[tuple[str, ...]] = [("#", "name", "priority", "command", "cwd", "GPUs", "dir base")]
    for job in expand_jobs(config):
        s = job.spec
        gpus = ",".join(map(str, s.gpu_ids)) if s.gpu_ids else "-"
        extra = []
        if s.repeats > 1:
            extra.append(f"repeat {job.repeat}/{s.repeats}")
        if s.max_retries and config.auto_restart_on_error:
            extra.append(f"retries {s.max_retries}")
        if s.delay_seconds:
            extra.append(f"delay {s.delay_seconds:g}s")
        name = s.name + (f" ({', '.join(extra)})" if extra else "")
        rows.append((str(job.id), name, str(s.priority), s.command, _short_path(s.cwd), gpus, _short_path(s.base_dir)))
    return _table(rows) + (
        f"\n{len(rows) - 1} experiment(s), at most {config.max_concurrent_experiments} at a time; "
        f"state: {_short_path(os.path.join(config.base_experiment_dir, _STATE_DIR, _STATE_FILE))}"
    )


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# ============================================================================
# Listing experiments (exp ls)
# ============================================================================


def last_metrics_row(path: str) -> dict[str, Any]:
    """The last complete row of a metrics CSV, reading only its header and tail."""
    try:
        with open(path, "rb") as f:
            head = f.readline()
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(len(head), size - 65536))
            tail = f.read()
    except OSError:
        return {}
    lines = [ln for ln in tail.split(b"\n")[:-1] if ln]  # the part after the last \n may be torn
    if not head.endswith(b"\n") or not lines:
        return {}
    header, rows = parse_metrics_csv((head + lines[-1] + b"\n").decode("utf-8", "replace"))
    return rows[-1] if rows else {}


def list_experiments(base_dir: str) -> list[dict[str, Any]]:
    """Every experiment directory under ``base_dir``, newest first, with its last metrics."""
    out = []
    try:
        names = os.listdir(base_dir)
    except FileNotFoundError:
        return []
    for d in names:
        wd = os.path.join(base_dir, d)
        try:
            meta = read_json(os.path.join(wd, "metadata.json"))
        except (OSError, ValueError):
            continue
        if not isinstance(meta, dict):
            continue
        # Hand-edited or foreign metadata: every field is checked, none trusted.
        def text(key: str) -> str | None:
            v = meta.get(key)
            return v if isinstance(v, str) else None

        rid = text("current_run_id")
        last = last_metrics_row(os.path.join(wd, "metrics", f"{rid}.csv")) if rid and _RUN_ID_RE.match(rid) else {}
        metrics = {k: v for k, v in last.items() if _is_num(v)}
        runs, tags, duration = meta.get("runs"), meta.get("tags"), meta.get("duration")
        out.append({
            "name": text("name") or d, "status": text("status"),
            "tags": [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else [],
            "created_at": text("created_at") or _iso_from_old_timestamp(meta.get("timestamp")),
            "started_at": text("started_at"), "duration": duration if _is_num(duration) else None,
            "runs": len(runs) if isinstance(runs, list) else (1 if rid else 0),
            "current_run_id": rid, "exit_code": meta.get("exit_code"), "work_dir": wd,
            "last_metrics": metrics,
        })
    out.sort(key=lambda r: (r["started_at"] or r["created_at"] or "", r["work_dir"]), reverse=True)
    return out


def filter_experiments(rows: list[dict[str, Any]], status: str | None = None, tag: str | None = None,
                       name: str | None = None) -> list[dict[str, Any]]:
    pattern = re.compile(name) if name else None
    return [
        r for r in rows
        if (status is None or r["status"] == status)
        and (tag is None or tag in r["tags"])
        and (pattern is None or pattern.search(r["name"] or ""))
    ]


def format_listing(rows: list[dict[str, Any]]) -> str:
    table: list[tuple[str, ...]] = [("name", "status", "started", "duration", "runs", "last metrics")]
    for r in rows:
        started = (r["started_at"] or r["created_at"] or "-")[:19].replace("T", " ")
        shown = list(r["last_metrics"].items())[:4]
        metrics = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown)
        table.append((r["name"] or "?", r["status"] or "?", started, format_duration(r["duration"]),
                      str(r["runs"]), metrics or "-"))
    return _table(table)


# ============================================================================
# CLI
# ============================================================================


def _build_parser():  # type: ignore[no-untyped-def]
    import argparse

    p = argparse.ArgumentParser(
        prog="exp",
        description="exp: run, batch and inspect machine-learning experiments.",
        epilog="Python API: import exp; exp.Experiment(name=..., command=...).run()",
    )
    p.add_argument("--version", action="version", version=f"exp {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    r = sub.add_parser("run", help="run a batch of experiments from a TOML file",
                       description="Run the [[experiments]] of a TOML file. Relative paths in it "
                                   "resolve against the file's own directory.")
    r.add_argument("config", help="the batch file, e.g. config.toml")
    r.add_argument("--dry-run", action="store_true", help="print the plan and exit without running anything")
    r.set_defaults(func=_cmd_run)

    ls = sub.add_parser("ls", help="list experiments under a directory, newest first")
    ls.add_argument("dir", nargs="?", default=DEFAULT_BASE_DIR, help="base directory (default ./results)")
    ls.add_argument("--json", action="store_true", help="print JSON for scripts")
    ls.add_argument("--status", choices=sorted(STATUSES), help="only experiments with this status")
    ls.add_argument("--tag", help="only experiments with this tag")
    ls.add_argument("--name", metavar="REGEX", type=_regex, help="only names matching this regular expression")
    ls.set_defaults(func=_cmd_ls)
    return p


def _regex(text: str) -> str:
    import argparse

    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"invalid regular expression {text!r}: {e}") from None
    return text


def _cmd_run(args: Any) -> int:
    config = load_config(args.config)
    if args.dry_run:
        print(format_plan(config))
        return 0
    return Scheduler(config).run()


def _cmd_ls(args: Any) -> int:
    if not os.path.isdir(args.dir):
        raise ConfigError(f"{args.dir} is not a directory; pass the base directory of your experiments")
    rows = filter_experiments(list_experiments(args.dir), args.status, args.tag, args.name)
    if args.json:
        print(_json().dumps(rows, indent=2, ensure_ascii=False, default=str))
    elif rows:
        print(format_listing(rows))
    else:
        print(f"no experiments under {args.dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status.

    Exit statuses: 0 success, 1 an experiment failed or another error,
    2 bad usage or configuration, 130 interrupted.
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "cmd", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"exp: error: {e}", file=sys.stderr)
        return 2
    except ExpError as e:
        print(f"exp: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
