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
    python exp.py see ./results               # the web dashboard (exp_ui.html + a JSON API)

Data flow::

    config.toml --parse_config--> BatchConfig --expand_jobs--> [Job ...]
                                                                  |
          Scheduler main thread: plan_next() picks jobs for free slots
                                                                  |
    pool thread: Experiment(...) --ExperimentDir.create--> <base>/<name>_<YYYY-MM-DD__HH-MM-SS>/
         |                                      metadata.json  (status running, before the command)
         | Experiment.start(): LocalBackend.start(Launch) -> Popen(new session)
         v
    child process --stdout+stderr--> terminal_logs/run_NNNN.log
         |                          (foreground run(): followed to the console)
         | import exp; load_experiment(); upd_row(); save_row()
         v
    MetricsWriter --append under flock--> metrics/run_NNNN.csv
         |
    pool thread: RunHandle.wait() --> ExperimentDir.record_end() --> metadata.json
         |
    Scheduler --StateFile.write--> <base>/.exp_state/scheduler_state.json
         |
    exp ls: scan(base) --> ExperimentDir.summary() dicts
    exp see: ExperimentIndex (the same dicts, kept by mtimes) --> Dashboard --> DashboardServer

*Platform* is the one section that touches locks, process groups, pidfds and
``/proc``.  *Files* holds the one atomic writer (temp file, checked write,
fsync, ``os.replace``) and the one backward tail reader.  *Store* is the only
code that knows the directory layout: experiment directories, ``scan`` and
the state file; ``summary()`` is what ``ls --json`` prints.  *Backend* starts
commands and stops process groups behind a small public surface
(``start``/``wait``/``poll``/``terminate``), so a cluster backend can take
the local one's place.  *Experiment* is the user-facing class over a store
directory and a backend.  The *Scheduler* plans in pure functions and
executes with one main thread (planning, commands, the state file) and a pool
thread per running experiment that makes its directory, starts its command
(in dispatch order), waits for it and records its end.  The *Dashboard*
serves the store's readers over HTTP: pure readers, a ``Dashboard`` that
checks every id and path, and a thin handler.

Each run's command runs under a tiny ``sh`` supervisor that leads its
process group and records the end itself if exp is gone, so a scheduler
killed with ``kill -9`` loses nothing: the next one adopts what still runs.
A running scheduler owns its base directory (an flock in ``.exp_state/``)
and takes commands (``exp kill``, ``retry``, ``shutdown``, a second ``run``)
as files in ``.exp_state/commands/``.

Sections (``grep -n '^# ====' exp.py``): constants, exceptions, utilities,
platform, files, metrics CSV, store, backend, experiment and runs, inside a
training script, config, GPUs, planning, scheduler, listing, dashboard, CLI.
"""
from __future__ import annotations

import os
import sys
import threading
import time

try:  # POSIX only; Windows has no flock and exp does not run commands there
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    import re
    import subprocess
    import weakref
    from typing import Any, Callable, Iterable, Iterator, Mapping

__version__ = "0.2.0"

__all__ = [
    # the user API
    "Experiment", "RunHandle", "load_experiment", "terminate_runs", "MetricsWriter", "METRICS_HEADER_MAX_BYTES", "read_metrics",
    # batches
    "BatchConfig", "SchedulerSettings", "parse_duration", "ExperimentSpec", "Field", "SCHEDULER_FIELDS", "EXPERIMENT_FIELDS",
    "SCHEDULER_DEFAULTS", "EXPERIMENT_DEFAULTS", "load_config", "parse_config", "config_reference",
    "sweep_points", "format_params", "param_text", "SWEEP_MAX_POINTS", "SWEEP_FORMAT_MAX_WIDTH", "BATCH_MAX_EXPERIMENTS",
    "Scheduler", "Job", "expand_jobs", "plan_next", "GpuPlan", "check_dependencies",
    "detect_gpus", "parse_nvidia_smi", "visible_gpus", "gpu_pool", "check_gpu_requests", "NVIDIA_SMI_QUERY", "next_wakeup", "format_plan", "job_key", "finished_before", "NOT_RETRIED_EXIT_CODES",
    # the store and the backend
    "ExperimentDir", "StateFile", "task_as_recorded", "scan", "covered_by_scan", "LAST_TEXT_MAX_CHARS", "remove_unstarted_dirs", "metadata_problem", "upgrade_metadata", "normalize_fields", "normalize_state_item", "STATE_GROUPS", "STATE_ITEM_TYPES",
    "iso_from_old_timestamp", "check_experiment_path", "base_dir_problem", "find_resume_dir", "Launch", "LocalBackend", "LocalRun",
    "EXIT_UNKNOWN",
    "signal_name", "failure_cause", "end_reason", "oom_killed", "CAUSE_TAIL_BYTES",
    # files and platform
    "write_atomic", "write_atomic_locked", "write_json_atomic", "write_all", "append_checked", "append_line", "keep_aside", "read_tail",
    "read_tail_span",
    "tail_lines", "read_json", "read_json_file", "dumps_json", "FileLock", "require_posix", "signal_group",
    "group_alive", "process_alive", "time_from_ticks", "session_leaders_running", "group_members", "exited_within",
    "stop_groups",
    # metrics CSV
    "format_metric", "parse_metric", "parse_metrics_csv", "last_metrics_row", "last_metrics_values", "metric_column",
    # listing and the CLI
    "list_experiments", "filter_experiments", "parse_columns", "metric_value", "default_columns", "has_metric",
    "sort_rows", "build_listing", "group_rows", "sort_groups", "format_listing", "METRIC_MODES",
    "LS_DEFAULT_METRIC_COLUMNS", "LS_FIELDS", "LS_GROUP_FIELDS", "LS_TEXT_CELL_CHARS", "LS_LEAD_COLUMNS",
    "LS_GROUP_LEAD_COLUMNS", "main",
    # small helpers
    "PathText", "format_duration", "run_id_str", "parse_gpu_ids", "redact_env", "add_conda_no_capture", "now_iso",
    "clean_line", "json_safe", "git_info", "git_code_diff", "read_code_diff", "code_diff_text", "redact_diff",
    # the dashboard (exp see)
    "DashboardServer", "Dashboard", "DashboardError", "ExperimentIndex", "query_experiments", "read_log_chunk",
    "read_log_tail", "read_metrics_chunk", "metrics_stats", "lower_is_better", "file_kind", "resolve_inside",
    "redact_secrets", "redact_command", "secret_name", "system_info", "find_page", "dashboard_summary", "DASHBOARD_PORT", "DASHBOARD_PAGE", "DASHBOARD_INDEX_TTL", "DASHBOARD_MAX_BODY",
    "PREVIEW_MAX_BYTES", "LOG_CHUNK_DEFAULT", "LOG_CHUNK_MAX", "LOG_HEADER_MAX_BYTES", "log_header_spans",
    "LOG_TAIL_MAX_LINES", "METRICS_CHUNK_DEFAULT",
    "FILE_TREE_MAX", "COMPARE_MAX", "DASHBOARD_FULL_RESCAN", "IndexSnapshot",
    # Lark/Feishu: settings, client, outbox sender, notifications
    "LarkError", "LarkClient", "LarkSync", "Notifier", "notify", "post_webhook", "parse_lark_url", "check_lark_config",
    "merge_lark_layers", "lark_settings", "lark_missing", "lark_public", "lark_base_url", "lark_sign", "lark_value",
    "lark_date_ms", "lark_pending", "check_notify", "notification_card", "run_card", "batch_card", "log_cause",
    "LARK_DOMAINS", "LARK_BATCH_MAX", "LARK_LINGER", "LARK_HTTP_TIMEOUT", "LARK_ATTEMPTS", "LARK_UPLOAD_MAX",
    "LARK_TOKEN_MARGIN", "LARK_READ_ONLY_TYPES", "LARK_TOKEN_CODES", "LARK_RETRY_CODES", "LARK_OPTIONS",
    "WEBHOOK_PER_SECOND", "WEBHOOK_PER_MINUTE", "WEBHOOK_RATE_LIMITED", "WEBHOOK_RETRIES",
    "WEBHOOK_MAX_BYTES", "NOTIFY_EVENTS", "WEBHOOK_ENV",
    "WEBHOOK_SECRET_ENV", "LARK_DIR", "LARK_OUTBOX_EXT", "LARK_CURSOR_EXT", "LARK_CELL_CODES", "LARK_PERMANENT_CODES",
    # the Slurm backend
    "SlurmBackend", "SlurmRun", "slurm_script", "slurm_stats", "make_backend", "SLURM_OPTIONS", "SLURM_POLL_MIN",
    "SLURM_POLL_MAX", "SLURM_ENDED", "SLURM_OUTCOMES", "SLURM_TAG_PREFIX", "SLURM_GONE", "SBATCH_TIMEOUT",
    "SLURM_DIR", "SLURM_SCRIPT_EXT",
    # errors
    "ExpError", "ConfigError", "NoExperimentContext", "UnsupportedPlatformError", "StorageError", "MetadataError",
    "SchedulerBusyError",
    "MetricError", "UnavailableError",
    # values and tunables
    "STATUSES", "PENDING", "RUNNING", "FINISHED", "ERROR", "KILLED", "UNREADABLE", "SCHEDULER_INDICATORS",
    "SCHEDULER_RUNNING", "SCHEDULER_AWAITING_SHUTDOWN", "SCHEDULER_STOPPED", "RESUME_SKIP_REASON", "FIELD_ALIASES",
    "DEFAULT_BASE_DIR", "TIMESTAMP_FORMAT", "DEFAULT_KILL_GRACE", "LOG_MARK", "FOLLOW_INTERVAL",
    "PRIORITY_LIMIT", "PRIORITY_EXPECTED", "priority_ok", "name_pattern", "NAME_FILTER_MAX_CHARS",
    "NAME_FILTER_MAX_REPEATS", "NAME_FILTER_NAME_CHARS", "NAME_FILTER_SECONDS",
    "PID_RECORD_DELAY", "STANDALONE_ENV", "TAIL_MAX_BYTES", "METADATA_MAX_BYTES", "METADATA_MAX_DEPTH", "EXIT_SAVE_TIMEOUT",
    "REPORT_LINE_WIDTH",
    "LAST_VALUES_MAX_ROWS", "LAST_VALUES_MAX_BYTES",
    "STATE_WRITE_INTERVAL", "STATE_WRITE_SHARE", "STATE_WRITE_MAX_INTERVAL", "COMMAND_POLL_INTERVAL",
    "OWNER_LOCK_FILE", "COMMANDS_DIR", "COMMAND_EXT", "RESULT_EXT",
    "METADATA_FILE", "LOGS_DIR", "METRICS_DIR", "CODE_DIFF_FILE", "CODE_DIFF_MAX_BYTES", "STATE_DIR", "STATE_FILE", "LOG_EXT",
    "METRICS_EXT", "EXIT_STATUS_TEXT", "supervised_command", "read_exit_status",
    "exit_code_of_status", "record_end_command", "record_orphan_end", "RECORD_END_VERB",
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
#: Priorities go from -PRIORITY_LIMIT to PRIORITY_LIMIT: enough to order any batch, and exact as a
#: JavaScript number in the dashboard (a 10**23 became "1e+23" there).
PRIORITY_LIMIT = 10**9
PRIORITY_EXPECTED = f"an integer from {-PRIORITY_LIMIT} to {PRIORITY_LIMIT}"
#: How often a foreground run looks for new output in its log.  The child
#: writes to the file directly; 50 ms feels live and costs nothing measurable.
FOLLOW_INTERVAL = 0.05
#: A batch run's pid goes into metadata.json once it has run this long; one
#: that ends sooner gets its start and end in two writes with the pid in its
#: runs entry.  Every rewrite makes a file and drops one, which is what costs
#: on a busy disk when a batch holds hundreds of commands that end at once.
PID_RECORD_DELAY = 0.05
#: Environment variable that makes ``load_experiment()`` create a standalone
#: experiment when the script was not launched by exp.
STANDALONE_ENV = "EXP_STANDALONE"
#: The hidden command a run's supervisor calls to record its end when exp is gone.
RECORD_END_VERB = "_record-end"
#: How much of a file the tail reader reads at most (bounded memory on a 1 GiB log).
TAIL_MAX_BYTES = 8 << 20
#: How far up a metrics CSV :func:`last_metrics_values` looks for a column's last value
#: (``ls`` and the dashboard read it for every experiment, so a column last logged long
#: ago must not make them read whole files).
LAST_VALUES_MAX_ROWS = 2048
LAST_VALUES_MAX_BYTES = 512 << 10
#: metadata.json larger than this is not read (a runaway file must not eat memory).
METADATA_MAX_BYTES = 64 << 20
#: How long the exit handler waits for another thread inside save_row() before it gives up
#: saving the values upd_row() took after the last save_row() (and says so).
EXIT_SAVE_TIMEOUT = 5.0
#: Failure reports cut a child's line to this many characters.
REPORT_LINE_WIDTH = 200

# The directory layout, named once.  Only the Store section joins these.
METADATA_FILE = "metadata.json"
LOGS_DIR = "terminal_logs"
METRICS_DIR = "metrics"
#: ``git diff HEAD`` of a dirty work tree, saved in the experiment directory when a run starts.
CODE_DIFF_FILE = "code.diff"
CODE_DIFF_MAX_BYTES = 1 << 20
#: Batch scripts a cluster backend submitted, per run (``slurm/run_0001.sbatch``).
SLURM_DIR = "slurm"
SLURM_SCRIPT_EXT = ".sbatch"
#: Lark sync, per run: the outbox of rows to send (JSON lines) and its cursor.
LARK_DIR = "lark"
LARK_OUTBOX_EXT = ".outbox.jsonl"
LARK_CURSOR_EXT = ".cursor.json"
STATE_DIR = ".exp_state"
STATE_FILE = "scheduler_state.json"
#: In STATE_DIR: the lock a running scheduler holds, and the command files sent to it.
OWNER_LOCK_FILE = "scheduler.lock"
COMMANDS_DIR = "commands"
COMMAND_EXT = ".json"
RESULT_EXT = ".result.json"
LOG_EXT = ".log"
#: What a run's supervisor writes after LOG_MARK at the end of the log: ``[exp] exit status 3``.
EXIT_STATUS_TEXT = "exit status"
METRICS_EXT = ".csv"
#: How many experiments of one name one second's timestamp takes (``_2`` ... ``_9999``); more
#: wait for the next second, so that the suffix stays within what names leave room for.
_SAME_SECOND_MAX = 9999
#: ``_YYYY-MM-DD__HH-MM-SS`` plus ``_NNNN`` for a second experiment in the same second.
_DIR_SUFFIX_BYTES = len(f"_2025-01-01__00-00-00_{_SAME_SECOND_MAX}")
#: Longest directory entry on Linux and macOS file systems (NAME_MAX).
_NAME_MAX = 255
#: Longest path the kernel takes (PATH_MAX on Linux; macOS has 1024).
_PATH_MAX = 1024 if sys.platform == "darwin" else 4096

PENDING, RUNNING, FINISHED, ERROR, KILLED = "pending", "running", "finished", "error", "killed"
#: Experiment and run statuses, as written to metadata.json.
STATUSES = {
    PENDING: "created, not started yet",
    RUNNING: "the command is running",
    FINISHED: "the command exited with status 0",
    ERROR: "the command exited with a non-zero status or could not start",
    KILLED: "stopped by exp (Ctrl-C, terminate, scheduler shutdown)",
}
#: What ``exp ls`` shows for a directory whose metadata.json cannot be read.
UNREADABLE = "unreadable"

SCHEDULER_RUNNING, SCHEDULER_AWAITING_SHUTDOWN, SCHEDULER_STOPPED = "running", "awaiting_shutdown", "stopped"
#: ``summary.status_indicator`` values of the state file.
SCHEDULER_INDICATORS = {
    SCHEDULER_RUNNING: "launching and waiting for experiments",
    SCHEDULER_AWAITING_SHUTDOWN: "every experiment is done; lingering until Ctrl-C (linger_when_idle)",
    SCHEDULER_STOPPED: "the scheduler has exited",
}

#: Older spellings of record fields, read as the current one (the earlier
#: project and exp 0.1's state file).  Only the current names are written.
FIELD_ALIASES = {
    "return_code": "exit_code",
    "returncode": "exit_code",
    "completed_at": "ended_at",
    "end_time": "ended_at",
    "start_time": "started_at",
}


class _LazyRe:
    """A module-level regular expression compiled at its first use: ``import exp``
    imports no ``re`` (with its ``enum``, about 5 ms) and compiles nothing.
    Flags go inline (``(?i)``).

    The first use rebinds the module's name for it to the compiled pattern, so
    later uses cost what they cost on a pattern (a metrics reader matches each
    cell); a reference taken before still works.  Threads that get there at once
    each compile it, harmlessly.
    """

    def __init__(self, pattern: Any) -> None:
        self._pattern = pattern

    def __getattr__(self, name: str) -> Any:  # only for what the instance does not have yet
        if name.startswith("_"):  # copy and pickle ask for dunders, maybe before _pattern is set
            raise AttributeError(name)
        import re

        compiled = re.compile(self._pattern)
        for attr in ("match", "fullmatch", "search", "sub", "subn", "split", "findall", "finditer",
                     "pattern", "flags", "groups", "groupindex"):
            setattr(self, attr, getattr(compiled, attr))
        module = globals()
        for key in [k for k, v in module.items() if v is self]:
            module[key] = compiled
        return getattr(compiled, name)


_RUN_ID_RE = _LazyRe(r"run_(\d+)\Z")
# Environment variable names whose values never go into metadata or state files.
_SECRET_KEY_RE = _LazyRe(r"(?i)SECRET|TOKEN|PASS|PWD|CREDENTIAL|KEY|PRIVATE|AUTH|COOKIE|SESSION|(^|_)PAT$")

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


class MetricError(ExpError, TypeError):
    """A metric value that cannot go into a CSV cell; the message names the key."""


class UnavailableError(ExpError, NotImplementedError):
    """A feature this version of exp does not have yet."""


class StorageError(ExpError, OSError):
    """A file exp writes could not be written in full (a full disk, an I/O error), or one it
    reads could not be read (not a regular file, an I/O error).

    Nothing half-written is left behind: the old file stays as it was.
    ``errno`` is the underlying error's.
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        OSError.__init__(self, message)
        self.errno = errno  # type: ignore[misc]

    def __str__(self) -> str:
        return str(self.args[0])


class MetadataError(ExpError):
    """A JSON file exp keeps cannot be read (not JSON, not an object, not a file): an
    experiment's metadata.json, the scheduler's state file, or one :func:`read_json` was given.

    ``path`` is the file; ``kept_at`` is where the unreadable file was moved
    aside when exp had to write a new one (else None).
    """

    def __init__(self, message: str, path: str, kept_at: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.kept_at = kept_at


class SchedulerBusyError(ExpError):
    """Another scheduler owns the base directory: :meth:`Scheduler.run` does not start a second one.

    ``exp run`` then adds its experiments to that scheduler's queue instead.
    """


class _UnreadableJson(MetadataError, ValueError):
    """What :func:`read_json_file` and :func:`read_json` raise: also a ValueError, as they raised before."""


# ============================================================================
# Utilities (pure helpers first, then small lookups)
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


class PathText(str):
    """A path as exp's API gives it: a ``str``, which also does what the earlier project's
    ``pathlib.Path`` did, so scripts written for either run: ``/`` joins (giving a
    ``pathlib.Path``) and Path's attributes are there (``.parent``, ``.name``,
    ``.exists()``, ``.mkdir()``, ``.glob()``, ...).  Where str and Path share a
    name (``replace``, ``split``...), it is str's."""

    __slots__ = ()

    def __truediv__(self, other: Any) -> Any:
        import pathlib

        return pathlib.Path(self) / other

    def __rtruediv__(self, other: Any) -> Any:
        import pathlib

        return pathlib.Path(other) / str(self)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # protocols (copy, pickle, fspath) are str's
            raise AttributeError(name)
        import pathlib

        return getattr(pathlib.Path(self), name)


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
    ids: list[int] | None = None
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        parts = [p.strip() for p in text.split(",")]
        if all(p.isdigit() for p in parts):
            ids = [int(p) for p in parts]
    elif isinstance(value, (list, tuple)) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        ids = list(value)
    if ids is None:
        raise ConfigError(f'{where}: expected a list of integers or "0,1", got {value!r}')
    twice = sorted({g for g in ids if ids.count(g) > 1})
    if twice:  # CUDA_VISIBLE_DEVICES=1,1 is no second GPU
        raise ConfigError(f"{where}: GPU {', '.join(map(str, twice))} is listed more than once in {value!r}")
    return ids


def redact_env(env: Mapping[str, Any] | None) -> dict[str, Any]:
    """Copy ``env`` with the values of secret-looking names replaced by ``"***"``."""
    if not env:
        return {}
    return {k: ("***" if _SECRET_KEY_RE.search(k) and v is not None else v) for k, v in env.items()}


def add_conda_no_capture(command: str) -> str:
    """Give ``conda run`` ``--no-capture-output`` so its output streams live.

    Without it conda buffers everything the child prints until it exits.
    """
    import re

    if "--no-capture-output" in command or "--live-stream" in command:
        return command
    return re.sub(r"(?<![\w.-])(conda\s+run)(?=\s)", r"\1 --no-capture-output", command, count=1)


_NOW_ISO: list[tuple[int, int, str]] = [(-1, 0, "")]


def now_iso() -> str:
    """The local time as ISO 8601 with its UTC offset, to the second."""
    # time, not datetime: importing datetime costs more than this whole function.
    # localtime() without an argument reads a coarser clock than time.time()
    # and can lag it across a second boundary; pass the time explicitly.
    # A batch asks several times per experiment: the text is made once a second.
    sec, zone = int(time.time()), time.timezone  # (time.tzset() changes the zone)
    cached = _NOW_ISO[0]  # read and replaced whole: threads share it
    if cached[0] == sec and cached[1] == zone:
        return cached[2]
    text = _iso_at(sec)
    _NOW_ISO[0] = (sec, zone, text)
    return text


def _epoch(iso: str | None) -> float:
    """An ISO 8601 time as seconds since the epoch (one written without an offset is local time),
    so that times written with different offsets (a container on UTC, a laptop on local time)
    sort as the instants they are; -inf for none or unreadable."""
    if not iso:
        return float("-inf")
    from datetime import datetime

    try:
        return datetime.fromisoformat(iso).timestamp()
    except (ValueError, OverflowError, OSError):
        return float("-inf")


def _iso_at(sec: int) -> str:
    """:func:`now_iso`'s text for the time ``sec`` (seconds since the epoch)."""
    lt = time.localtime(sec)
    off = lt.tm_gmtoff or 0
    sign = "-" if off < 0 else "+"
    off = abs(off)
    tz = f"{sign}{off // 3600:02d}:{off % 3600 // 60:02d}" + (f":{off % 60:02d}" if off % 60 else "")
    return time.strftime("%Y-%m-%dT%H:%M:%S", lt) + tz


# Escape sequences and every other control character but tab: what a child
# prints may colour, move the cursor, switch character sets or retitle the
# terminal, and none of that belongs in exp's own report lines.  In order: CSI;
# OSC, DCS, SOS, PM and APC with their strings; ESC with intermediates (``ESC ( 0``);
# any other ESC pair (``ESC c``); the same as 8-bit C1 controls.
_ESCAPE_RE = _LazyRe(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[\]PX^_][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[ -/]+[0-~]?|\x1b[0-~]?"
    r"|\x9b[0-?]*[ -/]*[@-~]|[\x90\x98\x9d\x9e\x9f][^\x07\x1b\x9c]*[\x07\x9c]?")
_CONTROL_CHARS = r"\x00-\x08\x0a-\x1f\x7f-\x9f"
_CONTROL_RE = _LazyRe(f"[{_CONTROL_CHARS}]")
# Also invisible in a report, and able to reorder what follows them (bidirectional
# overrides and isolates) or to break its line (line and paragraph separators).
_REPORT_CONTROL_RE = _LazyRe(f"[{_CONTROL_CHARS}\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


#: Names (dict keys, ``--options``, ``NAME=`` assignments, header names) whose values are never shown,
#: matched in :func:`secret_name`'s spelling: lower case, words joined by ``_``.  ``token`` counts as a
#: word or a word's end (``hf_token``, ``accesstoken``), not in ``max_tokens``, ``tokenizer`` or
#: ``token_ids``, which ML scripts take as ordinary parameters; ``key``, ``pat`` and ``pass`` end a name.
_SECRET_NAME_RE = _LazyRe(
    r"secret|passw|passphrase|pwd|credential|cookie|bearer|session|api_?key|access_?key|private_?key"
    r"|token(?![a-z]|_ids?(?:_|$))|^tokens$|(?:^|_)(?:api|access|auth|refresh|id|bearer)_?tokens"
    r"|(?:^|_)auth(?!ors?(?:_|$))|(?:^|_)(?:key|pat|pass)$")
_NAME_WORD_BREAK_RE = _LazyRe(r"(?<=[a-z0-9])(?=[A-Z])|[^A-Za-z0-9]+")


def secret_name(name: str) -> bool:
    """Whether ``name`` names a secret: ``api_key``, ``--openai-key``, ``dbPass``, ``HF_TOKEN``, ``Authorization``.

    One rule for the keys of metadata and the names on a command line (the
    environment's variable names have the broader :data:`_SECRET_KEY_RE`).
    """
    return bool(_SECRET_NAME_RE.search(_NAME_WORD_BREAK_RE.sub("_", name).lower()))


# A command line's words as the shell splits them: blanks and operators end a word outside quotes.
_SHELL_BREAKS = " \t\n;&|()<>"
# After "Authorization:" the scheme is kept and the credentials after it hidden.
_AUTH_SCHEMES = ("bearer", "basic", "token", "digest", "negotiate")
_OPTION_WORD_RE = _LazyRe(r"(-{1,2}[A-Za-z0-9][\w.-]*)(=?)")
_ASSIGN_WORD_RE = _LazyRe(r"([+~]*[A-Za-z_][\w.-]*)=")
_HEADER_WORD_RE = _LazyRe(r"(?s)\s*([A-Za-z][\w-]*)\s*:(?!//)\s*(\S*)\s*(.*)")
_URL_PASSWORD_RE = _LazyRe(r"(://[^\s/:@'\"]*:)([^\s/@'\"]+)(?=@)")


def _shell_words(command: str) -> list[tuple[int, int]]:
    """(start, end) of each word of a shell command line: quotes and backslashes keep a word
    together, blanks and ``; & | ( ) < >`` end it; an unclosed quote runs to the end."""
    words: list[tuple[int, int]] = []
    i, n, start = 0, len(command), -1
    while i < n:
        c = command[i]
        if c in _SHELL_BREAKS:
            if start >= 0:
                words.append((start, i))
                start = -1
            i += 1
            continue
        if start < 0:
            start = i
        if c == "\\":
            i += 2
        elif c == "'":
            j = command.find("'", i + 1)
            i = n if j < 0 else j + 1
        elif c == '"':
            j = i + 1
            while j < n and command[j] != '"':
                j += 2 if command[j] == "\\" else 1
            i = j + 1
        else:
            i += 1
    if start >= 0:
        words.append((start, n))
    return words


def _unquote(word: str) -> str:
    """A word as the program gets it (quotes and backslashes removed)."""
    import shlex

    try:
        return " ".join(shlex.split(word))
    except ValueError:  # an unclosed quote
        return word.replace("\\", "").replace('"', "").replace("'", "")


def _redact_word(word: str) -> tuple[str, int]:
    """(the word as shown, what the next word is: 0 a word like any, 1 a value to hide, 2 credentials after
    ``Authorization:``, which may start with a scheme to keep)."""
    m = _OPTION_WORD_RE.match(word)
    if m and secret_name(m.group(1).lstrip("-")):  # --token VALUE, --token=VALUE
        if m.group(2):
            return (m.group(0) + "***" if m.end() < len(word) else word), 0
        return word, 1 if m.end() == len(word) else 0
    m = _ASSIGN_WORD_RE.match(word)
    if m and secret_name(m.group(1).lstrip("+~")):  # HF_TOKEN=VALUE, model.api_key="VALUE"
        return m.group(0) + "***", 0
    text = _unquote(word)
    quote = word[0] if word[0] in "'\"" and word[-1:] == word[0] else ""
    m = _ASSIGN_WORD_RE.match(text) if quote else None
    if m and secret_name(m.group(1).lstrip("+~")):  # "HF_TOKEN=VALUE"
        return f"{quote}{m.group(0)}***{quote}", 0
    m = _HEADER_WORD_RE.fullmatch(text)
    if m and secret_name(m.group(1)):  # "Authorization: Bearer VALUE", "X-Api-Key: VALUE"
        if not m.group(2):
            return word, 2
        scheme = m.group(2) + " " if m.group(2).lower() in _AUTH_SCHEMES and m.group(3) else ""
        return f"{quote}{m.group(1)}: {scheme}***{quote}", 0
    if text.lower() == "bearer":
        return word, 1
    return _URL_PASSWORD_RE.sub(r"\1***", word), 0


def redact_command(command: str) -> str:
    """``command`` as written, but the values of secret-named arguments as ``***``.

    Hidden, quoted or not (the words are split as the shell splits them):
    the value of ``NAME=value`` and of ``--name value`` / ``--name=value`` /
    ``-name value`` when :func:`secret_name` says ``NAME`` names a secret;
    a header's value such as ``"Authorization: Bearer VALUE"`` (the scheme
    stays); the word after ``Bearer``; a password in a URL
    (``https://user:***@host``).  The rest of the text is kept as it is.
    """
    out: list[str] = []
    done = 0
    pending = 0  # what the next word is, as _redact_word said
    for a, b in _shell_words(command):
        if pending and any(c in _SHELL_BREAKS[3:] for c in command[done:a]):
            pending = 0  # a value never lies past ; & | ...
        word = command[a:b]
        if pending == 2 and _unquote(word).lower() in _AUTH_SCHEMES:
            shown, pending = word, 1
        elif pending and not (pending == 1 and word.startswith("--") and len(word) > 2):
            shown, pending = "***", 0
        else:
            shown, pending = _redact_word(word)
        out.append(command[done:a] + shown)
        done = b
    out.append(command[done:])
    return "".join(out)


def clean_line(text: str, width: int = REPORT_LINE_WIDTH) -> str:
    """``text`` safe to echo on a terminal: escapes and control characters removed, cut to ``width``."""
    text = _REPORT_CONTROL_RE.sub("", _ESCAPE_RE.sub("", text)).replace("\t", "    ")
    if len(text) > width:
        text = text[: width - 1] + "\u2026"
    return text


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def priority_ok(v: Any) -> bool:
    """Whether ``v`` is a priority: an integer (not a bool) within +-:data:`PRIORITY_LIMIT`."""
    return _is_int(v) and -PRIORITY_LIMIT <= v <= PRIORITY_LIMIT


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats (``nan``, ``inf``) as the strings ``"nan"``, ``"inf"``, ``"-inf"``.

    JSON has no NaN or Infinity; ``ls --json`` and the dashboard emit strict JSON.
    """
    t = type(value)
    if t is float or (t is not bool and isinstance(value, float)):  # numpy's float64 too
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return value
    if t is dict:
        return {str(k): json_safe(v) for k, v in value.items()}
    if t is list or t is tuple:
        return [json_safe(v) for v in value]
    return value


_STRICT_ENCODER: Any = None


def _dumps_strict(obj: Any) -> str:
    """Compact strict JSON of ``obj``, non-finite floats as strings (see :func:`json_safe`).

    ``json_safe`` walks the whole value in Python: it runs only when the C
    encoder finds a NaN or an infinity, which is rare.
    """
    global _STRICT_ENCODER
    if _STRICT_ENCODER is None:
        _STRICT_ENCODER = _json().JSONEncoder(ensure_ascii=False, allow_nan=False, default=str)
    try:
        return _STRICT_ENCODER.encode(obj)  # type: ignore[no-any-return]
    except ValueError:
        return _STRICT_ENCODER.encode(json_safe(obj))  # type: ignore[no-any-return]


def _json():
    # json costs a couple of ms at import; `import exp` in a training script
    # should not pay for it before it writes any metadata.
    import json

    return json


_ENCODER: Any = None
_ENCODE_STR: Any = None
_ENCODED_KEYS: dict[Any, str] = {}


def dumps_json(obj: Any) -> str:
    """Strict JSON for files people read: one top-level key per line, one list item per line.

    Values are encoded by the C encoder (``indent`` would force the much slower
    pure-Python one; metadata is rewritten on every status change).  NaN and
    infinities (a sweep over ``nan``, a float param) are written as the strings
    ``"nan"``, ``"inf"``, ``"-inf"`` (see :func:`json_safe`): JSON has no such
    numbers, and a metadata.json exp wrote must read back strictly.
    """
    try:
        return _dumps_lines(obj)
    except ValueError:
        return _dumps_lines(json_safe(obj))


def _dumps_lines(obj: Any) -> str:
    global _ENCODER, _ENCODE_STR
    if _ENCODER is None:
        json = _json()
        _ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, default=str)
        _ENCODE_STR = json.encoder.encode_basestring  # what encode() does with a str, minus the call
    enc, enc_str, keys = _ENCODER.encode, _ENCODE_STR, _ENCODED_KEYS
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
            text = enc_str(v)
        elif t is bool:
            text = "true" if v else "false"
        elif t is int:
            text = int.__repr__(v)
        elif t is float and v - v == 0:  # finite (the encoder writes NaN/Infinity for the others)
            text = float.__repr__(v)
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            text = "[\n    " + ",\n    ".join(enc(x) for x in v) + "\n  ]"
        else:
            text = enc(v)
        key = keys.get(k) if type(k) is str else None
        if key is None:
            key = enc_str(k if type(k) is str else str(k))
            if type(k) is str and len(keys) < 512:  # metadata's own keys, not every key a user wrote
                keys[k] = key
        lines.append(f"  {key}: {text}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def normalize_fields(record: dict[str, Any]) -> dict[str, Any]:
    """Read older field spellings (:data:`FIELD_ALIASES`) as the current ones, in place."""
    for old, new in FIELD_ALIASES.items():
        if old in record:
            value = record.pop(old)
            record.setdefault(new, value)
    return record


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
    except Exception:  # noqa: BLE001 - git missing, timeout, odd output: no git info
        info = None
    _GIT_CACHE[cwd] = (time.monotonic(), info)
    return info


_DIFF_CACHE: dict[str, tuple[float, bytes | None]] = {}
_DIFF_CUT_NOTE = "# exp: cut at {} bytes; the diff is longer\n"
_DIFF_UNTRACKED = "# exp: untracked files (not in the diff above):\n"
_DIFF_REDACTED_NOTE = "# exp: {} value(s) named like secrets are shown as ***\n"
# `name = "value"`, `"name": 'value'`, `name: value`, `NAME=value` in a line of a diff.
_TEXT_ASSIGN_RE = _LazyRe(r"""(?P<name>[A-Za-z_][\w.-]*)(?P<sep>["']?[ \t]*[:=][ \t]*)"""
                          r"""(?:(?P<q>["'])(?P<qval>[^"'\n]+)(?P=q)|(?P<val>[^\s"',;}\]#]+))""")
# A Lark/Feishu bot's webhook: its id is the credential.
_HOOK_URL_RE = _LazyRe(r"(/open-apis/bot/v2/hook/)[\w-]+")
#: Files whose unquoted values are values (a config), not code: their ``name: value`` is redacted too.
_CONFIG_SUFFIXES = (".toml", ".yaml", ".yml", ".env", ".ini", ".cfg", ".conf", ".properties", ".json")


def redact_diff(diff: str) -> tuple[str, int]:
    """``diff`` (``git diff`` text) with the values of secret-named settings as ``***``, and how many.

    A quoted value of a name :func:`secret_name` calls a secret (``app_secret =
    "..."`` in a TOML, ``api_key="..."`` in code), an unquoted one in a config
    file or of an upper-case name (``HF_TOKEN=...``), a URL's password and a
    Lark bot's webhook id.  Code is otherwise left as it is, so the diff still
    says what changed.
    """
    count = 0
    config = False

    def assign(m: Any) -> str:
        nonlocal count
        name, val = m.group("name"), m.group("qval") or m.group("val")
        if not secret_name(name) or val == "***" or (m.group("val") and not (config or name.isupper())):
            return m.group(0)
        count += 1
        q = m.group("q") or ""
        return f"{name}{m.group('sep')}{q}***{q}"

    out = []
    for line in diff.splitlines(keepends=True):
        if line.startswith("+++ "):
            config = line.rstrip().lower().endswith(_CONFIG_SUFFIXES)
        elif line[:1] in "+- " and not line.startswith("--- "):
            new = _TEXT_ASSIGN_RE.sub(assign, line)
            new, n = _HOOK_URL_RE.subn(r"\1***", new)
            new, k = _URL_PASSWORD_RE.subn(r"\1***", new)
            count += n + k
            line = new
        out.append(line)
    return "".join(out), count


def git_code_diff(cwd: str, max_bytes: int = CODE_DIFF_MAX_BYTES) -> bytes | None:
    """What :data:`CODE_DIFF_FILE` holds for a dirty work tree: ``git diff HEAD``, cut at ``max_bytes``
    (with a note saying so), then the untracked files by name.  None when clean, not in git, or git fails.

    Kept a few seconds per cwd, like :func:`git_info`.  Never raises.
    """
    hit = _DIFF_CACHE.get(cwd)
    if hit and time.monotonic() - hit[0] < _GIT_CACHE_SECONDS:
        return hit[1]
    out: bytes | None = None
    try:
        import subprocess

        proc = subprocess.Popen(["git", "diff", "HEAD", "--no-color", "--no-ext-diff"], cwd=cwd,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        assert proc.stdout is not None
        with proc.stdout:
            diff = proc.stdout.read(max_bytes + 1)
            cut = len(diff) > max_bytes
        if cut:
            proc.kill()  # a huge diff (data files under git): what was read is enough
        proc.wait(timeout=30)
        if cut or proc.returncode == 0:
            untracked = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "-z"], cwd=cwd,
                                       capture_output=True, timeout=30, stdin=subprocess.DEVNULL).stdout
            names = [n.decode("utf-8", "replace") for n in untracked.split(b"\0") if n][:1000]
            if diff or names:
                if cut:
                    diff = diff[:max_bytes]
                    diff = diff[:diff.rfind(b"\n") + 1] + _DIFF_CUT_NOTE.format(max_bytes).encode()
                # Secrets in the changed files (a config's app_secret) never reach the disk.
                text, hidden = redact_diff(diff.decode("utf-8", "surrogateescape"))
                diff = text.encode("utf-8", "surrogateescape")
                if hidden:
                    diff += _DIFF_REDACTED_NOTE.format(hidden).encode()
                if names:
                    diff += (_DIFF_UNTRACKED + "".join(f"#   {clean_line(n)}\n" for n in names)).encode("utf-8")
                out = diff
    except Exception:  # noqa: BLE001 - no git, a timeout: no code.diff, the run goes on
        out = None
    _DIFF_CACHE[cwd] = (time.monotonic(), out)
    return out


def code_diff_text(path: str, max_bytes: int = CODE_DIFF_MAX_BYTES, errors: str = "replace") -> tuple[str, bool]:
    """A code.diff file's text as it may be shown, values named like secrets as ``***`` (one saved before
    exp redacted them holds them), and whether the file is longer than was read; OSError if unreadable."""
    limit = max_bytes + 64 * 1024  # the notes after the diff
    with _open_regular(path, "rb") as f:
        data = f.read(limit)
    return redact_diff(data.decode("utf-8", errors))[0], len(data) >= limit


def read_code_diff(work_dir: str, max_bytes: int = CODE_DIFF_MAX_BYTES) -> dict[str, Any]:
    """An experiment's :data:`CODE_DIFF_FILE` as ``{text, truncated, untracked}`` (text None: there is none)."""
    try:
        text, longer = code_diff_text(os.path.join(work_dir, CODE_DIFF_FILE), max_bytes)
    except OSError:
        return {"text": None, "truncated": False, "untracked": []}
    untracked: list[str] = []
    head, sep, tail = text.partition(_DIFF_UNTRACKED)
    if sep:
        untracked = [ln[4:] for ln in tail.splitlines() if ln.startswith("#   ")]
        text = head
    truncated = "# exp: cut at " in text[-200:] or longer
    return {"text": text, "truncated": truncated, "untracked": untracked}


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


# ============================================================================
# Platform: locks, process groups, pidfd, /proc
# ============================================================================


def require_posix() -> None:
    """Raise :class:`UnsupportedPlatformError` where commands cannot be run (Windows)."""
    if os.name == "nt" or fcntl is None:
        raise UnsupportedPlatformError(
            "exp runs commands in their own POSIX process group so it can stop them and "
            "their children; Windows has no equivalent, so running commands is not supported "
            "there (the earlier project had the same limit). Use WSL, or Linux/macOS"
        )


#: Objects that hold a descriptor with a lock on it, told right after a fork (in the child).
_FORK_HOLDERS: Any = None


def _hold_across_fork(obj: Any) -> None:
    """Have ``obj._forked()`` called in every child forked from now on, right after the fork.

    A child that kept an inherited descriptor would keep the parent's flock
    alive through it: were the parent killed while holding it, every writer
    of that file (the child first) would wait for ever.  So the child closes
    it before anything else runs; closing one of two descriptors of an open
    file leaves the parent's lock as it was.
    """
    global _FORK_HOLDERS
    if _FORK_HOLDERS is None:
        import weakref

        _FORK_HOLDERS = weakref.WeakSet()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_close_inherited_locks)
    _FORK_HOLDERS.add(obj)


def _close_inherited_locks() -> None:
    try:
        holders = list(_FORK_HOLDERS or ())
    except RuntimeError:  # forked while another thread changed the set: its state is not to be trusted
        holders = []
    for obj in holders:
        try:
            obj._forked()
        except Exception:  # noqa: BLE001 - never fail a fork; the lazy check drops what was missed
            pass


def _close_quietly(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


class FileLock:
    """An exclusive ``flock`` on a file or directory, plus a thread lock (flock is per open file).

    It stays open between uses until :meth:`close`, saving an open per use.
    Locking a directory creates no file, which matters when every file
    creation costs a journal write.  A forked child closes the descriptor it
    inherited (:func:`_hold_across_fork`) and opens its own: an inherited one
    shares the parent's lock, so both would believe they hold it.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._tlock = threading.Lock()
        self._fd: int | None = None
        self._pid = os.getpid()

    def __enter__(self) -> FileLock:
        if self._pid != os.getpid():  # a forked child: nothing inherited is ours
            self._tlock, self._fd, self._pid = threading.Lock(), None, os.getpid()
        self._tlock.acquire()
        if fcntl is None:  # Windows: no flock (and no opening a directory); threads only
            return self
        try:
            if self._fd is None:
                flags = os.O_RDONLY if os.path.isdir(self.path) else os.O_RDWR | os.O_CREAT
                self._fd = os.open(self.path, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
                _hold_across_fork(self)
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

    def _forked(self) -> None:
        fd, self._fd = self._fd, None
        self._tlock, self._pid = threading.Lock(), os.getpid()
        _close_quietly(fd)

    def close(self) -> None:
        if self._pid != os.getpid():
            self._fd = None
            return
        with self._tlock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to a process group; False when the group is gone."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # a member changed uid; nothing more we may do
        return False


def _live_member(pid: int, pgid: int) -> bool:
    """Whether ``pid`` runs (not a zombie) in process group ``pgid``, from /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X")


# Last known live members of each group watched, so a check reads one or two
# /proc entries; all of /proc is scanned only when those have all gone.
_GROUP_MEMBERS: dict[int, list[int]] = {}


def group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is in the group.

    ``killpg(pgid, 0)`` alone also succeeds for zombies that nobody has reaped
    yet (in containers PID 1 often never reaps), so on Linux /proc is read:
    first the members seen last time, and all of /proc only once they are gone.
    """
    if not signal_group(pgid, 0):
        _GROUP_MEMBERS.pop(pgid, None)
        return False
    known = _GROUP_MEMBERS.get(pgid) or [pgid]
    if any(_live_member(pid, pgid) for pid in known):
        return True
    members = group_members(pgid)
    if members is None:  # macOS: no /proc; trust killpg
        return True
    if members:
        _GROUP_MEMBERS[pgid] = members
    else:
        _GROUP_MEMBERS.pop(pgid, None)
    return bool(members)


def group_members(pgid: int) -> list[int] | None:
    """The live processes of a group, from a scan of /proc (None where there is no /proc).

    They are also remembered (see :func:`group_alive`), so that after the
    group has gone a reason can still be looked up for its members (the OOM
    killer names the process it killed, not its group).
    """
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    members = [int(p) for p in entries if p.isdigit() and _live_member(int(p), pgid)]
    if members:
        _GROUP_MEMBERS[pgid] = sorted(set(_GROUP_MEMBERS.get(pgid, [])) | set(members))
    return members


#: Whether /proc describes processes (Linux): where not (macOS), pids are asked with kill -0.
_HAS_PROC = os.path.isdir("/proc/self/cwd")


def time_from_ticks(start_ticks: int) -> float | None:
    """When a process started, in seconds since the epoch, from its /proc start time (clock ticks
    since boot): to the tick, where a recorded ``started_at`` has only the second.  None without /proc."""
    try:
        with open("/proc/uptime", "rb") as f:
            uptime = float(f.read().split()[0])
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - uptime + start_ticks / hz


def _proc_start_ticks(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (/proc), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def process_alive(pid: int, start_ticks: int | None = None, started_by: float | None = None) -> bool:
    """Whether process ``pid`` of this machine still runs and is the one meant.

    ``start_ticks``: its /proc start time, which must be the same; else
    ``started_by`` (seconds since the epoch): it must have started no later
    (a later process given the same pid is not it).  A process we may not
    signal (another user's) counts as alive; so does a zombie not yet reaped.
    """
    if _HAS_PROC:
        ticks = _proc_start_ticks(pid)
        if ticks is None:
            return False
        if start_ticks is not None:
            return ticks == start_ticks
        at = time_from_ticks(ticks) if started_by is not None else None
        return at is None or started_by is None or at <= started_by
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True


def session_leaders_running(needle: bytes) -> list[int] | None:
    """Pids of session leaders whose command line contains ``needle`` (a scan of /proc; None without it)."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    found = []
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if needle not in f.read():
                    continue
            if os.getsid(int(name)) == int(name):
                found.append(int(name))
        except OSError:  # gone meanwhile, or not ours to look at
            continue
    return found


def exited_within(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Whether ``proc`` ends within ``timeout`` seconds (it is not reaped here).

    Popen.wait(timeout) sleeps in growing steps, which would notice a command
    of a few milliseconds late; a pidfd (Linux 5.3+) wakes at the exit itself.
    """
    import select

    if proc.returncode is not None:  # reaped already: its pid may belong to another process now
        return True
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


class _InterruptOnSignals:
    """Within it, SIGTERM (kill, systemd, a cluster) raises KeyboardInterrupt as Ctrl-C does, and so
    does SIGINT, also where it came in ignored: a shell without job control starts a background job
    with SIGINT ignored, and Python then never raises KeyboardInterrupt.  ``keep_sigint_handler``
    leaves a SIGINT handler the program set itself (a library call inside a user's script).
    Main thread only (elsewhere it does nothing); the old handlers come back on exit."""

    def __init__(self, keep_sigint_handler: bool = False) -> None:
        self.keep_sigint_handler = keep_sigint_handler
        self._old: dict[int, Any] = {}

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    def __enter__(self) -> _InterruptOnSignals:
        import signal

        if threading.current_thread() is threading.main_thread():
            self._old[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._raise)
            if not self.keep_sigint_handler or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
                self._old[signal.SIGINT] = signal.signal(signal.SIGINT, self._raise)
        return self

    def __exit__(self, *exc: Any) -> None:
        import signal

        for sig, handler in self._old.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._old.clear()


#: After SIGKILL, how long to wait for a group to go before giving up on it
#: (a process stuck in the kernel, state D, outlives any signal).
_KILL_WAIT = 10.0


def stop_groups(pgids: Iterable[int], grace: float, idle: Callable[[float], bool] | None = None) -> list[int]:
    """SIGTERM every group, SIGKILL what is left after ``grace`` seconds, wait for them to go.

    The grace period covers every process of a group, not only its leader: a
    training script under ``sh -c`` may still be saving a checkpoint after the
    shell has gone.  ``idle(seconds)`` is called between checks (default:
    sleep); it returning True ends the grace period at once (a second Ctrl-C).
    Returns the groups still alive at the end (normally none).
    """
    def sleep(t: float) -> bool:
        time.sleep(t)
        return False

    wait = idle or sleep
    groups = [g for g in pgids if signal_group(g, 15)]
    deadline = time.monotonic() + max(0.0, grace)
    killed_at: float | None = None
    while True:
        groups = [g for g in groups if group_alive(g)]
        if not groups:
            return []
        now = time.monotonic()
        if killed_at is None and now >= deadline:
            killed_at = now
        if killed_at is not None:
            for g in groups:
                signal_group(g, 9)
            if now - killed_at > _KILL_WAIT:
                return groups
        if wait(0.02) and killed_at is None:
            killed_at = time.monotonic()


_DEVNULL: list[int] = []


def _devnull() -> int:
    """One /dev/null descriptor for every child's stdin, opened once."""
    if not _DEVNULL:
        _DEVNULL.append(os.open(os.devnull, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)))
    return _DEVNULL[0]


# ============================================================================
# Files: the one atomic writer, checked appends, the one tail reader
# ============================================================================


def _storage_error(path: str, e: OSError, what: str = "write") -> StorageError:
    import errno as errno_mod

    reason = e.strerror or str(e)
    hint = " (the disk is full: free some space and exp can write again)" if e.errno in (
        errno_mod.ENOSPC, errno_mod.EDQUOT) else ""
    return StorageError(f"could not {what} {path}: {reason}{hint}", e.errno)


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may write less; a full disk raises)."""
    n = os.write(fd, data)
    if n == len(data):  # the usual case: one call, no copies
        return
    view = memoryview(data)[n:]
    while view:
        n = os.write(fd, view)
        if n <= 0:  # pragma: no cover - POSIX raises ENOSPC instead of writing 0
            import errno as errno_mod

            raise OSError(errno_mod.ENOSPC, os.strerror(errno_mod.ENOSPC))
        view = view[n:]


def write_atomic(path: str | os.PathLike[str], data: bytes, *, sync: bool = True) -> os.stat_result:
    """Replace ``path`` with ``data`` so readers see the old file or the new one, never half.

    A temp file in the same directory gets all of ``data`` (checked), is
    fsynced (``sync``) and renamed over ``path``.  On any error the temp file
    is removed, ``path`` is untouched, and :class:`StorageError` says why.
    Returns the new file's stat.
    """
    _, st = _write_and_replace(os.fspath(path), data, sync=sync, hold=False)
    return st


def write_atomic_locked(path: str | os.PathLike[str], data: bytes) -> int:
    """:func:`write_atomic` (no fsync) for files that writers lock with ``flock``:
    return the new file open (read-write, append), its exclusive lock taken.

    The lock is taken on the temp file, before the rename makes it ``path``: a
    writer that opens ``path`` just after blocks until the caller unlocks,
    and the caller's descriptor is certainly the file it wrote.  (Reopening
    after the rename cannot tell: another writer may have replaced the file
    and its freed inode number gone to a newer one.)
    """
    fd, _ = _write_and_replace(os.fspath(path), data, sync=False, hold=True)
    assert fd is not None
    return fd


def _write_and_replace(path: str, data: bytes, *, sync: bool, hold: bool) -> tuple[int | None, os.stat_result]:
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    flags = os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    flags |= os.O_RDWR | os.O_APPEND if hold else os.O_WRONLY
    fd: int | None = None
    try:
        fd = os.open(tmp, flags, 0o644)
        write_all(fd, data)
        if sync:
            os.fsync(fd)
        if hold and fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # nobody else has the temp file open: never waits
        st = os.fstat(fd)
        if not hold or fcntl is None:  # Windows cannot rename an open file (nor flock it)
            os.close(fd)
            fd = None
        os.replace(tmp, path)
        if hold and fd is None:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | getattr(os, "O_CLOEXEC", 0))
    except BaseException as e:
        if fd is not None:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and not isinstance(e, StorageError):
            raise _storage_error(path, e) from e
        raise
    return fd, st


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, sync: bool = True) -> os.stat_result:
    """:func:`write_atomic` of ``obj`` as JSON (one top-level key per line)."""
    return write_atomic(path, dumps_json(obj).encode("utf-8"), sync=sync)


def append_checked(fd: int, data: bytes, size_before: int | None = None, path: str = "") -> None:
    """Append ``data`` to an ``O_APPEND`` descriptor, all or nothing.

    A write cut short (a full disk) is undone by truncating the file back to
    ``size_before`` (default: its size now), then :class:`StorageError` is raised.
    """
    if size_before is None:
        size_before = os.fstat(fd).st_size
    try:
        write_all(fd, data)
    except OSError as e:
        try:
            os.ftruncate(fd, size_before)
        except OSError:
            pass
        raise _storage_error(path or f"descriptor {fd}", e) from e


def keep_aside(path: str, label: str = "unreadable") -> str:
    """Rename ``path`` to ``<path>.<label>-<YYYYmmdd-HHMMSS>[-N]`` (never over another file); return the new path.

    For a file exp cannot read and is about to write afresh: the old bytes
    stay for the user to look at, and the message can say where.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    n = 0
    while True:
        kept = f"{path}.{label}-{stamp}" + (f"-{n}" if n else "")
        if not os.path.lexists(kept):
            break
        n += 1
    os.rename(path, kept)
    return kept


def append_line(path: str, text: str) -> None:
    """Append one line to a file (created if missing), all or nothing; raise StorageError."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as e:
        raise _storage_error(path, e) from e
    try:
        append_checked(fd, text.encode("utf-8") + b"\n", path=path)
    finally:
        os.close(fd)


def read_tail(path: str, lines: int, max_bytes: int | None = None) -> bytes:
    """The bytes of the last ``lines`` lines of a file, read backwards from its end.

    Reads block by block from the end until it has ``lines`` line breaks (a
    last line without one counts as a line) or ``max_bytes``, so memory stays
    bounded on a 1 GiB log.  A missing file reads as ``b""``.
    """
    return read_tail_span(path, lines, max_bytes)[0]


def _open_regular_fd(path: str) -> tuple[int, os.stat_result]:
    """A descriptor for reading ``path`` and its stat; OSError for anything but a regular file (a FIFO would block)."""
    import stat

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StorageError(f"could not read {path}: it is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_tail_span(path: str, lines: int, max_bytes: int | None = None) -> tuple[bytes, int]:
    """:func:`read_tail`, and the file offset where those bytes end (the size it had when read)."""
    if max_bytes is None:
        max_bytes = TAIL_MAX_BYTES  # read at call time, so the tunable can be changed
    if lines <= 0:
        return b"", 0
    try:
        fd, st = _open_regular_fd(path)
    except OSError:
        return b"", 0
    try:
        return _read_tail_fd(fd, st.st_size, lines, max_bytes), st.st_size
    finally:
        os.close(fd)


def _read_tail_fd(fd: int, end: int, lines: int, max_bytes: int) -> bytes:
    """:func:`read_tail` of an open regular file whose size is ``end``."""
    if end == 0 or lines <= 0:
        return b""
    # A final line break ends the last line; it does not start another.
    want = lines + (1 if os.pread(fd, 1, end - 1) == b"\n" else 0)
    chunks: list[bytes] = []
    pos, found, got = end, 0, 0
    block = 65536
    while pos > 0 and got < max_bytes:
        n = min(block, pos, max_bytes - got)
        pos -= n
        chunk = os.pread(fd, n, pos)
        chunks.append(chunk)
        got += len(chunk)
        found += chunk.count(b"\n")
        if found >= want:
            break
        block = min(block * 2, 1 << 20)
    data = b"".join(reversed(chunks))
    if found >= want:
        # Drop everything before the line break that starts the wanted lines (the
        # want-th from the end: rsplit finds it in C, where a loop of rfind would not).
        data = data[len(data.rsplit(b"\n", want)[0]) + 1:]
    elif pos > 0:
        # max_bytes reached inside a line: start at the next whole line, if any.
        first = data.find(b"\n")
        data = data[first + 1:] if 0 <= first < len(data) - 1 else data
    return data


def tail_lines(path: str, n: int = 10, max_bytes: int | None = None, skip_prefix: str | None = None) -> list[str]:
    """The last ``n`` lines of a text file, without those starting with ``skip_prefix``.

    A ``\\r``-updated progress line keeps its last frame; trailing blank lines
    are dropped.  Reads backwards from the end (see :func:`read_tail`).
    """
    want = n
    while True:
        data = read_tail(path, want, max_bytes)
        text = data.decode("utf-8", "replace").replace("\r\n", "\n")
        lines = [ln.rsplit("\r", 1)[-1] for ln in text.split("\n")]
        if lines and lines[-1] == "":
            lines.pop()
        kept = [ln for ln in lines if not (skip_prefix and ln.startswith(skip_prefix))]
        while kept and not kept[-1].strip():
            kept.pop()
        # Skipped or blank lines can leave fewer than n: read a little further back.
        if len(kept) >= n or len(lines) < want or want >= 16 * n + 64:
            return kept[-n:] if n else []
        want *= 4


def _open_regular(path: str, *args: Any, **kwargs: Any) -> Any:
    """``open(path, ...)`` for reading that refuses anything but a regular file (a FIFO would block)."""
    fd = _open_regular_fd(path)[0]
    try:
        return open(fd, *args, **kwargs)
    except BaseException:
        os.close(fd)
        raise


#: metadata.json nested deeper than this is unreadable (exp writes 3 levels; Python <= 3.12 parses ~1000).
METADATA_MAX_DEPTH = 200


def _nested_deeper(value: dict[str, Any], limit: int) -> bool:
    """Whether ``value`` holds containers more than ``limit`` levels deep (iteratively: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > limit:
            return True
        for x in (v.values() if isinstance(v, dict) else v):
            if isinstance(x, (dict, list)):
                stack.append((x, depth + 1))
    return False


def read_json_file(path: str, max_bytes: int | None = None, finite: bool = False) -> Any:
    """Parse a JSON file exp wrote; for anything else a MetadataError that is also a ValueError,
    whose message is the short reason.

    Refuses what is not a regular file (a FIFO would block), files over
    ``max_bytes``, bytes that are not UTF-8 and nesting too deep to parse;
    with ``finite``, also ``NaN``/``Infinity`` (which JSON does not have,
    though Python writes them) and numbers too large for a double (``1e999``).
    FileNotFoundError passes through.
    """
    import stat

    if max_bytes is None:
        max_bytes = METADATA_MAX_BYTES
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _UnreadableJson("not a regular file", path)
        if st.st_size > max_bytes:
            raise _UnreadableJson(f"{st.st_size} bytes, more than the {max_bytes} exp reads", path)
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    try:
        text = b"".join(chunks).decode("utf-8")
        if finite:
            return _finite_decoder().decode(text)
        return _json().loads(text)
    except UnicodeDecodeError:
        raise _UnreadableJson("not UTF-8 text", path) from None
    except RecursionError:
        raise _UnreadableJson("nested too deeply", path) from None
    except ValueError as e:  # not JSON; with ``finite``, NaN or 1e999
        raise _UnreadableJson(str(e), path) from None


_FINITE_DECODER: list[Any] = []


def _finite_decoder() -> Any:
    # One decoder, made once: json.loads with hooks would build a decoder and its scanner per call.
    if not _FINITE_DECODER:
        _FINITE_DECODER.append(_json().JSONDecoder(parse_constant=_no_json_constant, parse_float=_finite_float))
    return _FINITE_DECODER[0]


def _no_json_constant(name: str) -> Any:
    raise ValueError(f"it holds {name}, which is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value - value != 0:
        raise ValueError(f"it holds the number {text[:40]}, too large for a double")
    return value


def read_json(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON file exp wrote; MetadataError (a ValueError too) saying why when it cannot be read as one.

    FileNotFoundError passes through.  See :func:`read_json_file`.
    """
    path = os.fspath(path)
    try:
        return read_json_file(path)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise _UnreadableJson(f"{path} cannot be read ({why})", path) from None


# ============================================================================
# Metrics CSV
# ============================================================================
#
# One CSV per run.  Rows usually keep their columns, so the common case must
# cost one append whatever the file's length; a new column means rewriting the
# file with the union header, atomically.  Writers in several processes (say,
# DataLoader workers or torchrun ranks) coordinate with flock on the CSV
# itself: a writer that rewrites the file holds the lock on the old inode while
# it replaces it, and the new file is locked before it appears
# (:func:`write_atomic_locked`); a writer that then gets the old inode's lock
# sees ``st_nlink == 0`` on its descriptor and reopens the path.

_NEEDS_QUOTE_RE = _LazyRe(r'[,"\r\n]')
_QUOTE_CHARS_RE = _LazyRe(r'["\r\n]')
# Canonical numbers only: "007", "+5" or "1_000" stay strings, as written.
_INT_RE = _LazyRe(r"-?(?:0|[1-9]\d*)\Z")
_FLOAT_RE = _LazyRe(r"-?(?:(?:0|[1-9]\d*)(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|nan|inf)\Z")
_CSV_LIMIT_RAISED: list[bool] = []


def _csv_module():
    import csv

    if not _CSV_LIMIT_RAISED:
        # A string metric (a generated sample, a config dump) may exceed the
        # csv module's 128 KiB default field limit; reading must not fail on it.
        limit = sys.maxsize
        while True:
            try:
                csv.field_size_limit(limit)
                break
            except OverflowError:  # pragma: no cover - a C long narrower than Py_ssize_t
                limit //= 2
        _CSV_LIMIT_RAISED.append(True)
    return csv


#: Python's csv module reads a NUL character from 3.11 on; before, it raises "line contains NUL".
_CSV_READS_NUL = sys.version_info >= (3, 11)
# Before 3.11 each NUL is hidden from the csv module as this noncharacter and "0"
# (and the noncharacter itself, should a cell hold one, as it and "1"), then put
# back in every cell: a cell reads exactly as on 3.11.
_NUL_STAND_IN = "\ufdd0"


def _whole_lines(lines: Iterable[str]) -> Iterator[str]:
    """The lines of whole CSV records among ``lines`` (of a file opened with ``newline=""``): a last
    record that a writer is still writing, or was killed writing, holds no value yet.  It is torn
    where its last line has no line break, or its quoted cell is still open at the end."""
    held: list[str] = []
    in_quotes = False
    for line in lines:
        if line[-1:] not in ("\n", "\r"):
            return
        if '"' in line and line.count('"') % 2:
            in_quotes = not in_quotes
        if in_quotes:
            held.append(line)
            continue
        if held:
            yield from held
            held.clear()
        yield line


def _csv_reader(lines: Iterable[str], strict: bool = False) -> Iterator[list[str]]:
    """``csv.reader(lines)`` that reads NUL characters on every Python version.

    exp writes none, but a file may hold some: written by another tool, by
    exp before it refused them, or the zeros a crash can leave at a file's end.
    """
    csv = _csv_module()
    if _CSV_READS_NUL:
        return csv.reader(lines, strict=strict)
    return _nul_restored(csv.reader(_nul_hidden(lines), strict=strict))


def _nul_hidden(lines: Iterable[str]) -> Iterator[str]:
    h = _NUL_STAND_IN
    for line in lines:
        if "\0" in line or h in line:
            line = line.replace(h, h + "1").replace("\0", h + "0")
        yield line


def _nul_restored(records: Iterator[list[str]]) -> Iterator[list[str]]:
    h = _NUL_STAND_IN
    for rec in records:
        if any(h in c for c in rec):
            # Only "h0" and "h1" hold an h: first put back the NULs, then the h's.
            rec = [c.replace(h + "0", "\0").replace(h + "1", h) if h in c else c for c in rec]
        yield rec


def _csv_cell(text: str) -> str:
    if _NEEDS_QUOTE_RE.search(text):
        return '"' + text.replace('"', '""') + '"'
    return text


def format_metric(key: str, value: Any) -> str:
    """Turn one metric value into its CSV text (unquoted).

    int, float (``nan``, ``inf``, ``-inf``), bool, str, None (empty),
    datetime/date (ISO 8601) and any object with ``.item()`` (torch/numpy
    scalars) are accepted; anything else
    raises MetricError (a TypeError) naming the key.
    """
    t = type(value)
    if t is float:
        return repr(value)  # repr gives 'nan', 'inf', '-inf' too
    if t is int:
        try:
            return int.__repr__(value)
        except ValueError:  # more digits than Python >= 3.11 converts (sys.set_int_max_str_digits)
            digits = int(value.bit_length() * 0.30103) + 1
            raise MetricError(f"metric {key!r}: an int of about {digits} digits, more than Python turns into text "
                              f"(sys.get_int_max_str_digits() is {sys.get_int_max_str_digits()}); log a float or "
                              "math.log10() of it, or raise the limit with sys.set_int_max_str_digits()") from None
    if t is str:
        if "\0" in value:
            raise _nul_error(key)
        if not value.isascii():
            _check_utf8(value, f"metric {key!r}: the string")
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, int):
        return format_metric(key, int(value))
    if isinstance(value, float):
        return format_metric(key, float(value))
    if isinstance(value, str):
        return format_metric(key, str(value))
    if hasattr(value, "isoformat") and type(value).__module__ == "datetime":  # datetime, date, time
        return str(value.isoformat())
    item = getattr(value, "item", None)
    if callable(item):
        try:
            scalar = item()
        except Exception as e:  # e.g. a tensor with more than one element
            raise MetricError(
                f"metric {key!r}: {type(value).__name__}.item() failed ({e}); "
                "pass a single number, e.g. loss.mean().item()"
            ) from None
        if hasattr(scalar, "item") and not isinstance(scalar, (int, float, str, bool)):
            raise MetricError(f"metric {key!r}: .item() returned {type(scalar).__name__}, not a number")
        return format_metric(key, scalar)
    raise MetricError(
        f"metric {key!r}: cannot store a value of type {type(value).__name__}; "
        "use int, float, bool, str, None or a scalar with .item()"
    )


def _check_metric_name(key: Any) -> str:
    """A metric name, as it can head a CSV column; ConfigError (a ValueError) if it cannot."""
    if not isinstance(key, str):
        raise ConfigError(f"a metric name must be a string, got {type(key).__name__} {key!r}")
    if not key:
        raise ConfigError("a metric name cannot be empty")
    if "\n" in key or "\r" in key:
        raise ConfigError(f"metric name {key!r} cannot contain a line break")
    if "\0" in key:
        raise ConfigError(f"metric name {key!r} cannot contain a NUL character")
    if not key.isascii():
        _check_utf8(key, f"metric name {key!r}", ConfigError)
    return key


def _check_utf8(text: str, what: str, error: type[Exception] | None = None) -> None:
    """MetricError (or ``error``) when ``text`` cannot be written as UTF-8: it holds a lone surrogate,
    as text decoded with errors="surrogateescape" (a file name from os.listdir of bytes) can."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise (error or MetricError)(
            f"{what} holds {text[e.start]!r} at position {e.start}, a lone surrogate that UTF-8 cannot "
            "encode (text decoded with errors='surrogateescape', e.g. a file name): decode it with "
            "errors='replace', or pass os.fsencode(text).decode('utf-8', 'replace')") from None


def _nul_error(key: str) -> MetricError:
    # Python's csv module before 3.11 cannot read a NUL ("line contains NUL"), nor can
    # many other CSV tools: no NUL goes into a metrics file.
    return MetricError(f"metric {key!r}: the string holds a NUL character ('\\x00'), which a CSV file "
                       "cannot carry portably; remove it first, e.g. text.replace('\\x00', '')")


def parse_metric(text: str) -> Any:
    """Inverse of :func:`format_metric`: ``""`` -> None, numbers -> int/float, True/False -> bool.

    Cells in plain decimal notation come back as numbers (a CSV cell does not
    say whether it held a string: ``"1.10"`` reads as ``1.1``); a string such
    as ``"007"``, ``"+5"`` or ``"1_000"`` stays the string it was.
    """
    if text == "":
        return None
    if _INT_RE.match(text):
        try:
            return int(text)
        except ValueError:  # more digits than int() converts (Python >= 3.11): keep it as written
            return text
    if _FLOAT_RE.match(text):
        return float(text)
    if text == "True":
        return True
    if text == "False":
        return False
    return text


def parse_metrics_csv(text: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Parse a metrics CSV into (header, rows).

    A torn last record (a writer killed mid-row: no final line break, or an
    unclosed quoted cell) is skipped, and so is any row whose field count
    does not match the header.
    """
    header, records = _csv_records(text)
    return header, [{k: parse_metric(v) for k, v in zip(header, rec)} for rec in records]


def _csv_records(text: str) -> tuple[list[str], list[list[str]]]:
    """(header, records) of CSV text; drops a torn last record and rows of the wrong width."""
    import io

    if not text:
        return [], []
    records = list(_csv_reader(io.StringIO(text, newline="")))
    torn = not text.endswith("\n") or text.count('"') % 2 == 1
    if torn and records:
        records.pop()
    if not records:
        return [], []
    n = len(records[0])
    return records[0], [r for r in records[1:] if len(r) == n]


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a metrics CSV written by exp; a missing file reads as no rows.

    StorageError when it cannot be read (not a regular file, no permission, an I/O error).
    """
    path = os.fspath(path)
    try:
        # errors="replace": a torn last line can end inside a UTF-8 character
        with _open_regular(path, encoding="utf-8", errors="replace", newline="") as f:
            text = f.read()
    except FileNotFoundError:
        return []
    except StorageError:
        raise
    except OSError as e:
        raise _storage_error(path, e, "read") from None
    return parse_metrics_csv(text)[1]


def _count_quotes(fd: int, start: int, end: int) -> int:
    """The number of ``"`` bytes in ``[start, end)`` of a file, read in 1 MiB chunks."""
    n = 0
    while start < end:
        chunk = os.pread(fd, min(1 << 20, end - start), start)
        if not chunk:
            break
        n += chunk.count(b'"')
        start += len(chunk)
    return n


def _complete_csv_end(fd: int, size: int) -> int:
    """Offset just past the last complete CSV record of the first ``size`` bytes.

    A line break ends a record only outside quotes, which the parity of the
    quote characters before it tells; so this reads the file from its start.
    It runs only to repair a torn file, never per row.
    """
    quotes = last = pos = 0
    while pos < size:
        chunk = os.pread(fd, min(1 << 20, size - pos), pos)
        if not chunk:
            break
        if quotes % 2 == 0 and b'"' not in chunk:
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                last = pos + nl + 1
        else:
            start = 0
            while True:
                nl = chunk.find(b"\n", start)
                if nl < 0:
                    quotes += chunk.count(b'"', start)
                    break
                quotes += chunk.count(b'"', start, nl)
                if quotes % 2 == 0:
                    last = pos + nl + 1
                start = nl + 1
            pos += len(chunk)
            continue
        quotes += chunk.count(b'"')
        pos += len(chunk)
    return last


class MetricsWriter:
    """Append rows to one metrics CSV; thread-safe, process-safe and fork-safe.

    Columns keep first-seen order.  A row whose keys are all in the header is
    one ``write()`` of one line; a row with a new key rewrites the file with
    the union header (earlier rows blank in the new column) through
    :func:`write_atomic`.  Every row is on disk (in the OS cache) when
    :meth:`write_row` returns; a row that cannot be written in full (a full
    disk) is taken back and :class:`StorageError` raised, so the file never
    holds half a row.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._fd: int | None = None
        self._header: list[str] = []
        self._columns: set[str] = set()
        self._size = self._end = -1  # file size at lock time / after our last row

    def close(self) -> None:
        self._after_fork()
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

    def _after_fork(self) -> None:
        # A forked child (a DataLoader worker) shares the parent's open file
        # description, and with it the parent's flock: both would "hold" the
        # lock at once.  The child opens the file anew instead.  It closed the
        # inherited descriptor right after the fork (_forked); this catches a
        # fork that ran no at-fork hooks, where the descriptor's number may
        # have been reused since, so it is dropped, not closed.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._lock = threading.Lock()
            self._fd = None
            self._header, self._columns = [], set()

    def _forked(self) -> None:
        fd, self._fd = self._fd, None
        self._after_fork()
        _close_quietly(fd)

    def write_row(self, row: Mapping[str, Any]) -> None:
        """Write one row: values as :meth:`Experiment.upd_row` takes them, formatted the same way.

        A value of a type a CSV cannot hold raises :class:`MetricError` (a
        TypeError) naming the key, and a bad key :class:`ConfigError` (a
        ValueError), before anything is written.
        """
        cells = {}
        for key, value in row.items():
            _check_metric_name(key)
            cells[key] = format_metric(key, value)
        self._write(cells)

    def _write(self, row: Mapping[str, str]) -> None:
        """Write one row of already formatted (see :func:`format_metric`) values, keys checked."""
        if not row:
            return
        self._after_fork()
        with self._lock:
            try:
                fd = self._acquire()
            except OSError as e:
                raise _storage_error(self.path, e, "open") from e
            try:
                if self._columns.issuperset(row):
                    get = row.get
                    cells = [get(k, "") for k in self._header]
                    line = ",".join(cells)
                    # One scan per line; quote cell by cell only when a cell needs it (rare).
                    if line.count(",") != len(cells) - 1 or _QUOTE_CHARS_RE.search(line):
                        line = ",".join([_csv_cell(c) for c in cells])
                    data = (line or '""').encode("utf-8") + b"\n"
                    append_checked(fd, data, self._size, self.path)
                    self._end = self._size + len(data)
                else:
                    self._rewrite_with(row)
            finally:
                if self._fd is not None and fcntl is not None:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _acquire(self) -> int:
        """Open (or reopen) the file, take the flock, and make sure the header is current."""
        while True:
            opened = self._fd is None
            if self._fd is None:
                os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0),
                                   0o644)
                _hold_across_fork(self)
                self._header, self._columns = [], set()
            fd = self._fd
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            st = os.fstat(fd)
            if st.st_nlink == 0:  # another writer replaced the file: follow it
                if fcntl is not None:
                    # Unlock first: a forked child may share this open file, and
                    # then closing our descriptor would not release the lock.
                    fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
                self._fd = None
                continue
            if opened:
                _remove_dead_temps(self.path)
            size = st.st_size
            # Someone else wrote since our last row: if that writer died mid-row
            # (no final line break, or one inside a quoted cell: what it wrote
            # holds an odd number of quotes), reload, which cuts the torn tail.
            # One writer alone skips the reads.
            if self._header and size != self._end and size and (
                    not 0 <= self._end < size or os.pread(fd, 1, size - 1) != b"\n"
                    or _count_quotes(fd, self._end, size) % 2):
                self._header, self._columns = [], set()
            if not self._header and size:
                self._load_header(fd, size)
                size = os.fstat(fd).st_size
            self._size = self._end = size
            return fd

    def _load_header(self, fd: int, size: int) -> None:
        # Runs only when (re)opening: read the header and cut a torn tail left
        # by a writer that was killed mid-row, so the next row starts clean.
        tail_start = max(0, size - 65536)
        tail = os.pread(fd, size - tail_start, tail_start)
        last_line = tail[tail.rfind(b"\n", 0, len(tail) - 1) + 1:]
        head_line = _first_line(fd, size).decode("utf-8", "replace")
        # Torn: no final line break; or quotes near the end, where a line break
        # may lie inside a quoted cell (the last line can even look like a
        # whole row: cut after `""x"",\n` inside a cell of many such lines),
        # and only a scan from the start tells; or a last line that is not a
        # row of the header's width (cut after a line break inside a quoted
        # cell that opened before the tail).
        whole = tail_start == 0 or len(last_line) < len(tail)  # the last line starts inside the tail
        if (not tail.endswith(b"\n") or b'"' in tail
                or (whole and not _csv_records(head_line + "\n" + last_line.decode("utf-8", "replace"))[1])):
            new_size = _complete_csv_end(fd, size)
            if new_size != size:
                os.ftruncate(fd, new_size)
            size = new_size
        if not size:
            return
        # The cut left the header alone: a file whose header is torn is cut to nothing.
        header, _ = parse_metrics_csv(head_line + "\n")
        self._header, self._columns = header, set(header)

    def _rewrite_with(self, row: Mapping[str, str]) -> None:
        import io

        fd = self._fd
        assert fd is not None
        size = os.fstat(fd).st_size
        data = os.pread(fd, size, 0).decode("utf-8", "replace") if size else ""
        header, records = _csv_records(data)
        header = header or list(self._header)
        header = header + [k for k in row if k not in set(header)]
        head_bytes = len(",".join(map(_csv_cell, header)).encode("utf-8"))
        if head_bytes > METRICS_HEADER_MAX_BYTES:
            # The readers (exp ls, the dashboard) look for the header in the first MiB.
            raise MetricError(
                f"this row's new metric names would make the header of {self.path} {head_bytes:,} bytes "
                f"({len(header):,} columns), over the {METRICS_HEADER_MAX_BYTES:,}-byte limit; the row is not "
                "saved: log fewer distinct names (per-item values as rows, or a file of their own)")
        width = len(header)
        out = io.StringIO()
        # Cells are quoted as the appends quote them (_csv_cell): csv.writer before
        # Python 3.13 leaves a lone "\r" unquoted, which then reads as a line break.
        for rec in [header, *(r + [""] * (width - len(r)) for r in records), [row.get(k, "") for k in header]]:
            out.write(",".join(map(_csv_cell, rec)) if rec != [""] else '""')
            out.write("\n")
        # Not fsynced: a metrics rewrite is as durable as the appends around it.
        # We hold the new file's lock from before it replaces the old one, so a
        # writer that opens it now waits; the writers waiting on the old file
        # find it unlinked once we let go of it, and follow.
        new_fd = write_atomic_locked(self.path, out.getvalue().encode("utf-8"))
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        self._fd = new_fd  # unlocked by _write's finally
        self._header, self._columns = header, set(header)
        self._size = self._end = os.fstat(new_fd).st_size


#: The longest header (the line of metric names) a metrics CSV may have.
METRICS_HEADER_MAX_BYTES = 1 << 20


def _first_line(fd: int, size: int) -> bytes:
    """The first line of the file open at ``fd`` (``size`` bytes long), without its line break."""
    pos = 0
    parts = []
    while pos < size:
        chunk = os.pread(fd, min(size - pos, 1 << 20), pos)
        if not chunk:
            break
        nl = chunk.find(b"\n")
        if nl >= 0:
            parts.append(chunk[:nl])
            break
        parts.append(chunk)
        pos += len(chunk)
    return b"".join(parts)


def _remove_dead_temps(path: str) -> None:
    """Remove the temp files (``<path>.<pid>.<tid>.tmp``) that :func:`write_atomic` left for
    ``path`` (a metrics CSV, a metadata.json, the state file) in writers killed mid-write (``kill -9``).

    A temp file is removed only if its writer's pid is gone, so one being
    written now, or whose pid lives (reused, or a process on another host
    sharing the directory), stays.
    """
    directory, base = os.path.split(path)
    prefix = base + "."
    try:
        names = [n for n in os.listdir(directory or ".") if n.startswith(prefix) and n.endswith(".tmp")]
    except OSError:
        return
    me = os.getpid()
    for n in names:
        pid, dot, tid = n[len(prefix):-len(".tmp")].partition(".")
        if not (dot and pid.isdigit() and tid.isdigit()) or int(pid) == me or process_alive(int(pid)):
            continue
        try:
            os.unlink(os.path.join(directory, n))
        except OSError:
            pass


def _strict_records(text: str) -> list[list[str]] | None:
    """The records of CSV text that must be well-formed (None if not: say, it ends inside a quoted cell)."""
    import io

    csv = _csv_module()
    try:
        return list(_csv_reader(io.StringIO(text, newline=""), strict=True))
    except csv.Error:
        return None


def _strict_rows(text: str) -> list[dict[str, Any]] | None:
    """Rows of CSV text that must be well-formed (None if not: say, it ends inside a quoted cell)."""
    records = _strict_records(text)
    if records is None:
        return None
    if not records:
        return []
    header = records[0]
    return [_metric_row(header, r) for r in records[1:] if len(r) == len(header)]


def _metric_row(header: list[str], record: list[str]) -> dict[str, Any]:
    return {k: parse_metric(v) for k, v in zip(header, record)}


def last_metrics_row(path: str) -> dict[str, Any]:
    """The last complete row of a metrics CSV, reading only its header and its tail."""
    return _last_metrics(path, False)


def last_metrics_values(path: str) -> dict[str, Any]:
    """Each column's last logged value: its last non-empty cell, in header order.

    A metric logged less often than the others (a validation loss every N
    steps) is empty in most rows; its last value is further up.  A file of at
    most 64 KiB is read whole; of a bigger one only the tail: at most the
    last :data:`LAST_VALUES_MAX_ROWS` rows (and :data:`LAST_VALUES_MAX_BYTES`),
    so a column last logged before that (a value written once at step 0 of a
    long run) is left out.
    """
    return _last_metrics(path, True)


def _last_metrics(path: str, fill: bool) -> dict[str, Any]:
    # Plain descriptor reads: a listing asks this of thousands of files at once.
    try:
        fd, st = _open_regular_fd(path)
    except OSError:
        return {}
    try:
        head = os.pread(fd, 65536, 0)
        end = head.find(b"\n")
        if end < 0 and len(head) == 65536:  # a header of many columns: up to 1 MiB
            head = os.pread(fd, METRICS_HEADER_MAX_BYTES, 0)
            end = head.find(b"\n")
        if end < 0:
            return {}
        # Rows written since the fstat are not looked at; a header written since ends no row there.
        # (fill) A small file is all in ``head`` already: when the last two rows do not hold every
        # column, it is parsed whole at once rather than through wider and wider windows.
        whole = head[: st.st_size] if st.st_size <= len(head) else None
        return _last_row(fd, st.st_size, head[: end + 1].decode("utf-8", "replace"), fill, whole)
    finally:
        os.close(fd)


def _last_values(header: list[str], records: list[list[str]]) -> dict[str, Any]:
    """Each column's last non-empty cell among ``records`` (complete rows, oldest first), parsed."""
    found: dict[str, str] = {}
    if records:
        # The last row has most; each column it lacks is looked for on its own, further up.
        for k, v in zip(header, records[-1]):
            if v != "":
                found[k] = v
        for j, k in enumerate(header):
            if k not in found:
                cell = next((r[j] for r in reversed(records) if r[j] != ""), None)
                if cell is not None:
                    found[k] = cell
    return {k: parse_metric(found[k]) for k in header if k in found}


def _last_row(fd: int, size: int, header_line: str, fill: bool = False, whole_file: bytes | None = None
              ) -> dict[str, Any]:
    windows: tuple[int, ...] = (2, 16, 256, LAST_VALUES_MAX_ROWS) if fill else (2, 16, 256)
    if whole_file is not None and whole_file.count(b'"', 0, whole_file.rfind(b"\n") + 1) % 2:
        # The file's last line break is inside a quoted cell (torn there): its lines may look
        # like rows, which a window cannot tell; the whole (small) file parsed from its start can.
        # (With an even count, quote parity counted from the end is that from the start: exact.)
        windows = ()
    partial: dict[str, Any] = {}
    for n in windows:
        if whole_file is not None and n > 2:
            break  # read from the start below, from what the caller has
        tail = _read_tail_fd(fd, size, n, TAIL_MAX_BYTES if n <= 256 else LAST_VALUES_MAX_BYTES)
        if n == LAST_VALUES_MAX_ROWS and b'"' in tail and len(tail) < min(size, LAST_VALUES_MAX_BYTES):
            # Multi-line cells make lines more than rows: the last window is bounded by bytes alone.
            tail = _read_tail_fd(fd, size, 1 << 40, LAST_VALUES_MAX_BYTES)
        cut = tail.rfind(b"\n")
        if cut < 0:
            return partial
        body = tail[: cut + 1]  # what follows the last line break may be torn
        # The tail may start inside a quoted multi-line cell.  The body ends a
        # record (unless torn inside a quoted cell), so a line starts one when
        # the rest holds an even number of quotes; try those until the text
        # parses (strictly: not ending inside a quoted cell) into rows.
        if b'"' not in body:
            even = [0]  # no quoted cell: every line is a record, the first one too
        else:
            starts = [0]
            i = body.find(b"\n")
            while 0 <= i < cut:
                starts.append(i + 1)
                i = body.find(b"\n", i + 1)
            even, quotes, prev = [], 0, len(body)
            for s in reversed(starts):
                quotes += body.count(b'"', s, prev)
                prev = s
                if quotes % 2 == 0:
                    even.append(s)
        whole = len(tail) >= size  # the whole file, its own header line first
        failed = 0
        for s in reversed(even):
            # Each failed start parses the rest of the window: in the wide window of
            # fill mode, a few are enough (the read from the start below is exact).
            if n > 256 and failed >= 16:
                break
            chunk = body[s:].decode("utf-8", "replace")
            records = _strict_records(chunk if whole and s == 0 else header_line + chunk)
            if not records:
                failed += 1
                continue
            header = records[0]
            width = len(header)
            complete = [r for r in records[1:] if len(r) == width]
            if not complete:
                failed += 1
                continue
            if not fill:
                return _metric_row(header, complete[-1])
            found = _last_values(header, complete[-LAST_VALUES_MAX_ROWS:])  # rows, not lines
            # A wider window reads at most LAST_VALUES_MAX_BYTES: with long rows it may hold
            # fewer rows than the one before, whose values (the latest) are kept.
            partial = {k: partial[k] if k in partial else found[k] for k in header if k in partial or k in found}
            if len(partial) == len(header):
                return partial
            break  # a column empty in all these rows: look further up
        if len(tail) < n or whole:  # read the whole file already
            break
    if whole_file is not None:
        data = whole_file
    elif partial:  # (fill) some column was empty in every row read
        return partial
    else:
        # Not found near the end (a last cell of many lines, or a row torn inside
        # a quoted cell): read from the start, which tells exactly, if not too big.
        try:
            data = os.pread(fd, TAIL_MAX_BYTES + 1, 0)
        except OSError:
            return {}
    if len(data) > TAIL_MAX_BYTES:
        return {}
    header, records = _csv_records(data.decode("utf-8", "replace"))
    if fill:
        return _last_values(header, records)
    return _metric_row(header, records[-1]) if records else {}


def metric_column(path: str, key: str) -> list[Any]:
    """Every value of one column of a metrics CSV (streamed; memory grows with the rows, not the file)."""
    csv = _csv_module()
    try:
        f = _open_regular(path, encoding="utf-8", errors="replace", newline="")
    except OSError:
        return []
    with f:
        reader = _csv_reader(_whole_lines(f))
        try:
            header = next(reader)
        except (StopIteration, csv.Error):
            return []
        if key not in header:
            return []
        i, width = header.index(key), len(header)
        out = []
        try:
            for rec in reader:
                if len(rec) == width:
                    out.append(parse_metric(rec[i]))
        except csv.Error:  # a torn quoted cell at the very end
            pass
    return out


# ============================================================================
# Store: the directory layout, experiment directories, scan, the state file
# ============================================================================
#
# The only code that joins layout names.  Everything else asks an
# ExperimentDir for a path, a record or a summary.

_DIR_STAMP_RE = _LazyRe(r"_\d{4}-\d{2}-\d{2}__\d{2}-\d{2}-\d{2}(?:_\d+)?\Z")


def iso_from_old_timestamp(value: Any) -> str | None:
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


def upgrade_metadata(meta: dict[str, Any], fresh: Mapping[str, Any], run_ids: Iterable[str] = ()) -> dict[str, Any]:
    """Bring metadata of the earlier project (or an older exp) up to date, in place.

    Older field names are read as the current ones, missing fields come from
    ``fresh``, an old ``timestamp`` becomes ``created_at``, and a stored
    ``lark_config`` (it held secrets) is dropped.  Metadata with no ``runs``
    list (the earlier project kept none) gets one entry per run in
    ``run_ids`` (the runs whose files the directory holds), the last with
    the top-level status, exit code and times, which were that run's.
    """
    normalize_fields(meta)
    if not meta.get("created_at"):
        old = iso_from_old_timestamp(meta.get("timestamp"))
        if old:
            meta["created_at"] = old
    ids = list(run_ids)
    if not isinstance(meta.get("runs"), list) and ids:
        meta["runs"] = [{"id": rid} for rid in ids]
        meta["runs"][-1].update({k: meta.get(k) for k in ("status", "exit_code", "started_at", "ended_at")})
        meta.setdefault("current_run_id", ids[-1])
    for k, v in fresh.items():
        meta.setdefault(k, v)
    meta.pop("lark_config", None)
    return meta


#: The longest temp-file suffix :func:`write_atomic` adds: ``.<pid>.<thread id>.tmp``.
_TMP_SUFFIX_BYTES = len(f".{2**31 - 1}.{2**64 - 1}.tmp")
#: The longest path exp makes inside an experiment directory (a run number of five digits, a temp name).
_LONGEST_INSIDE = _TMP_SUFFIX_BYTES + max(len(os.fsencode(p)) for p in (
    METADATA_FILE, CODE_DIFF_FILE,
    *(os.path.join(sub, "run_99999" + ext) for sub, ext in (
        (LOGS_DIR, LOG_EXT), (METRICS_DIR, METRICS_EXT), (SLURM_DIR, SLURM_SCRIPT_EXT),
        (LARK_DIR, LARK_OUTBOX_EXT), (LARK_DIR, LARK_CURSOR_EXT)))))


def _fs_bytes(text: str, what: str) -> bytes:
    """``text`` as the operating system gets it (a file name, a command), or ConfigError
    when this process's encoding cannot hold it (non-ASCII under LC_ALL=C with PYTHONUTF8=0)."""
    try:
        return os.fsencode(text)
    except UnicodeEncodeError:
        raise ConfigError(
            f"{what} {text!r} cannot be passed to the system in this process's file-name encoding "
            f"({sys.getfilesystemencoding()}): set a UTF-8 locale (LANG=C.UTF-8) or PYTHONUTF8=1, "
            "or use only ASCII there") from None


def check_experiment_path(base_dir: str, name: str) -> None:
    """ConfigError when ``<base_dir>/<name>_<timestamp>/...`` could not be created (too long, or
    not expressible in the file-name encoding)."""
    name_bytes = len(_fs_bytes(name, "name"))
    if name_bytes + _DIR_SUFFIX_BYTES > _NAME_MAX:
        raise ConfigError(
            f"name {name[:40]!r}... is {name_bytes} bytes; with the timestamp the directory name would "
            f"pass the file system's {_NAME_MAX}-byte limit: use at most {_NAME_MAX - _DIR_SUFFIX_BYTES} bytes"
        )
    base = os.path.abspath(base_dir)
    _fs_bytes(base, "base_dir")
    top = os.path.join(base, f"{name}_2025-01-01__00-00-00_{_SAME_SECOND_MAX}")
    if len(os.fsencode(top)) + 1 + _LONGEST_INSIDE >= _PATH_MAX:
        raise ConfigError(
            f"the experiment directory for {name!r} under {base_dir[:60]}... would make paths longer than "
            f"the {_PATH_MAX}-byte limit; use a shorter base_dir or name"
        )


def base_dir_problem(base_dir: str) -> str | None:
    """Why experiment directories could never be made under ``base_dir`` (a file on its path, no
    permission to create it, a read-only file system), or None.  Checks only, creates nothing."""
    path = full = os.path.abspath(base_dir)
    try:
        _fs_bytes(full, "base_dir")
    except ConfigError as e:
        return str(e)
    while True:
        try:
            st = os.stat(path)
            break
        except (FileNotFoundError, NotADirectoryError):  # the latter: a file further up, found next
            parent = os.path.dirname(path)
            if parent == path:
                return None
            path = parent
        except OSError as e:  # a symlink loop, no permission to look
            return f"base directory {base_dir}: {e.strerror or e}; experiment directories cannot be made there"
    import stat

    if not stat.S_ISDIR(st.st_mode):
        where = "is" if path == full else f"is under {path}, which is"
        return f"base directory {base_dir} {where} a file, not a directory; choose another base directory"
    if not os.access(path, os.W_OK | os.X_OK):
        what = "create experiment directories in" if path == full else "create"
        return (f"base directory {base_dir}: no permission to {what} {path}, or it is on a read-only "
                "file system; choose another base directory")
    return None


# Why a run ended
#
# A reason from the exit status ("exit code N", "signal SIGKILL", and for a
# SIGKILL that exp did not send, whether the kernel's log shows the OOM killer
# behind it), and a one-line cause read from the end of the log.  Pure but for
# the kernel log, which is read only for such a SIGKILL.

#: How much of the end of a run's log :func:`failure_cause` reads.
CAUSE_TAIL_BYTES = 64 << 10
#: How much older than the run's start (by the clock on the kernel log) an OOM
#: kill of its pid may look: the kernel's clock is not NTP-slewed, so it
#: drifts from time.monotonic() by up to a few minutes over weeks of uptime.
_OOM_CLOCK_SLACK = 600.0

# Patterns (strings: re caches them when first used; importing exp compiles none).
_CUDA_OOM_PAT = r"CUDA out of memory|CUDA error: out of memory|(?<![\w.])(?:torch\.)?(?:cuda\.)?OutOfMemoryError\b"
# The "NCCL error in: ..." line of the exception first; else NCCL's own error names, or the watchdog's timeout.
_NCCL_PATS = (r"NCCL error\b.*", r"\bnccl(?:Unhandled\w*|Internal|System|Invalid\w*|Remote)Error\b.*"
              r"|Watchdog caught collective operation timeout\b.*")
_NAN_LOSS_PAT = (
    # "loss is nan", "Loss: NaN", "val_loss=inf", "loss: tensor(nan, ...)", "Loss became NaN"
    r"(?<![a-z])loss(?:es)?(?![a-z])[ \t]*(?:is|was|=|:|became|becomes|went to|of)?[ \t]*(?:tensor\()?"
    r"[-+]?(?:nan|inf(?:inity)?)(?![a-z])"
    # "nan loss", "non-finite loss", "NaN training loss" (not "grad_norm: inf  loss: 0.7")
    r"|(?<![a-z])(?:nan|inf|non-?finite|infinite)[ \t]+(?:\w+[ \t]+)?loss(?![ \t]*[:=])"
    # "loss is not finite"
    r"|(?<![a-z])loss\w*[ \t]+(?:is|was|became)[ \t]+(?:not finite|non-?finite|infinite)"
)
# What a shell prints when its child got SIGKILL: dash "Killed", bash
# "bash: line 1:  1234 Killed    python train.py", zsh "zsh: killed  python ...".
_KILLED_PAT = r"Killed|\S+: (?:line \d+: )?\s*\d+ Killed(?:\s.*)?|zsh: killed(?:\s.*)?"
_TRACEBACK_PAT = r"Traceback \(most recent call last\):"
# The final line of a traceback: "ValueError: bad lr", "pkg.mod.Error: ...", "KeyboardInterrupt".
_EXCEPTION_PAT = (r"[A-Za-z_][\w.]*"
                  r"(?::(?:\s.*)?|(?<=Error)|(?<=Exception)|(?<=Interrupt)|(?<=Exit)|(?<=Iteration)|(?<=Group))")
_OOM_KILL_PAT = r"\bKilled process (\d+)\b|\boom-kill:.*\bpid=(\d+)\b"


def signal_name(n: int) -> str:
    """``9`` -> ``"SIGKILL"``; a number the platform does not name stays a number (``"40"``)."""
    import signal

    try:
        return signal.Signals(n).name
    except ValueError:
        return str(n)


def _log_segments(text: str) -> list[str]:
    """The lines of a log as a terminal shows them: escapes removed, ``\\r`` rewrites split, exp's lines left out."""
    text = _ESCAPE_RE.sub("", text)
    return [seg for line in text.split("\n") for seg in line.split("\r")
            if seg.strip() and not seg.startswith(LOG_MARK)]


def failure_cause(text: str) -> str | None:
    """A one-line cause of a failure recognised in (the end of) a log, or None.

    First match by priority: ``"CUDA out of memory"``, the ``NCCL error ...``
    line, ``"NaN/inf loss"``, ``"Killed"`` (a shell's report of a SIGKILL),
    then a Python exception: the final line of the last ``Traceback`` block
    (``"ValueError: bad lr"``).  Reads the last :data:`CAUSE_TAIL_BYTES`
    characters; exp's own ``[exp]`` lines, escape sequences and progress
    bars' ``\\r`` rewrites are ignored; the result is cut to
    :data:`REPORT_LINE_WIDTH`.
    """
    import re

    segs = _log_segments(text[-CAUSE_TAIL_BYTES:])
    if any(re.search(_CUDA_OOM_PAT, s) for s in segs):
        return "CUDA out of memory"
    for pat in _NCCL_PATS:
        for s in reversed(segs):
            m = re.search(pat, s)
            if m:
                found = m.group(0).strip()
                return clean_line(found if found.startswith("NCCL error") else "NCCL error: " + found)
    if any(re.search(_NAN_LOSS_PAT, s, re.I) for s in segs):
        return "NaN/inf loss"
    if any(re.fullmatch(_KILLED_PAT, s.strip()) for s in segs):
        return "Killed"
    start = next((i for i in range(len(segs) - 1, -1, -1) if re.search(_TRACEBACK_PAT, segs[i])), None)
    if start is not None:
        for s in segs[start + 1:]:
            if not s[0].isspace() and re.fullmatch(_EXCEPTION_PAT, s.rstrip()):
                return clean_line(s.strip())
    return None


def _same_pid_namespace() -> bool:
    """Whether our pids are the kernel's (the kernel log names pids of the root namespace)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return len(line.split()) == 2
    except OSError:
        pass
    return True  # a kernel before 4.1 has no NSpid: no namespaces to tell apart


def _kernel_log() -> list[tuple[float | None, str]] | None:
    """The kernel's log as (seconds since boot or None, message); None when it cannot be read.

    /dev/kmsg, read without blocking (one record per read); else ``dmesg``
    with a short timeout.  Containers often refuse both.
    """
    import errno
    import re

    out: list[tuple[float | None, str]] = []
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        fd = -1
    if fd >= 0:
        readable = True
        try:
            for _ in range(1_000_000):  # a log written to as fast as it is read still ends
                try:
                    rec = os.read(fd, 16384)
                except OSError as e:
                    if e.errno == errno.EPIPE:  # overwritten while being read: on with the next one
                        continue
                    readable = e.errno == errno.EAGAIN  # the end; anything else (EPERM): not readable
                    break
                if not rec:
                    break
                head, _, msg = rec.partition(b";")
                fields = head.split(b",")
                ts = int(fields[2]) / 1e6 if len(fields) > 2 and fields[2].isdigit() else None
                out.append((ts, msg.decode("utf-8", "replace")))
        finally:
            os.close(fd)
        if readable:
            return out
    import shutil
    import subprocess

    exe = shutil.which("dmesg")
    if exe is None:
        return None
    try:
        proc = subprocess.run([exe], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, timeout=2)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    out = []
    for line in proc.stdout.decode("utf-8", "replace").splitlines():
        m = re.match(r"(?:<\d+>)?\[\s*(\d+(?:\.\d+)?)\]\s?", line)
        out.append((float(m.group(1)), line[m.end():]) if m else (None, line))
    return out


def oom_killed(pids: Iterable[int], since: float | None = None) -> bool | None:
    """Whether the kernel log says the OOM killer killed one of ``pids``; None when that cannot be known.

    ``since``: a ``time.monotonic()`` before which the kill cannot have
    happened (the run's start), so a pid used again is not mistaken.
    Linux only; None as well where our pids are not the kernel's (a
    container's pid namespace).
    """
    import re

    wanted = set(pids)
    if not wanted or not sys.platform.startswith("linux") or not _same_pid_namespace():
        return None
    log = _kernel_log()
    if log is None:
        return None
    for ts, msg in log:
        if since is not None and ts is not None and ts < since - _OOM_CLOCK_SLACK:
            continue
        m = re.search(_OOM_KILL_PAT, msg)
        if m and int(m.group(1) or m.group(2)) in wanted:
            return True
    return False


def end_reason(exit_code: int | None, signalled: bool = False, pid: int | None = None,
               since: float | None = None) -> str:
    """Why a command ended, from its exit status: ``"exit code N"`` or ``"signal SIGXXX"``.

    A negative ``exit_code`` is ``-signal`` (as Popen reports it).  A SIGKILL
    that exp did not send (``signalled`` false) is looked up in the kernel log
    (see :func:`oom_killed`, for ``pid`` and the members of its group that were
    seen): ``"signal SIGKILL (killed by the OOM killer)"`` when found, ``"...
    (killed by the OOM killer?)"`` when the log cannot be read.  A shell
    reports its child's SIGKILL as exit code 137: ``"exit code 137 (SIGKILL?)"``
    (the child's pid is not known then, so the kernel log is not searched;
    ``sh -c "python train.py"`` is such a shell wherever sh does not exec the
    command itself, as Debian's dash).
    """
    if exit_code is None or exit_code == EXIT_UNKNOWN:
        return "exit code unknown"
    if exit_code >= 0:
        return f"exit code {exit_code}" + (" (SIGKILL?)" if exit_code == 128 + 9 else "")
    sig = -exit_code
    reason = f"signal {signal_name(sig)}"
    if sig == 9 and not signalled:
        found = oom_killed({pid, *_GROUP_MEMBERS.get(pid, ())}, since) if pid is not None else None
        if found:
            reason += " (killed by the OOM killer)"
        elif found is None:
            reason += " (killed by the OOM killer?)"
    return reason



class ExperimentDir:
    """One experiment directory: its layout, its metadata.json, its runs' files.

    ``metadata.json`` is read-modify-written under an ``flock`` on the
    directory, so a run ending in one thread (or process) and another
    starting lose nothing; it is read afresh for every update (a stat cannot
    tell that another process replaced it: a freed inode number comes back,
    and a coarse clock gives the same mtime).  Every write goes through
    :func:`write_atomic`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self._lock: FileLock | None = None
        self._fresh = False  # made by this object and no run claimed yet

    def __repr__(self) -> str:
        return f"ExperimentDir({self.path!r})"

    def __getstate__(self) -> dict[str, Any]:
        # A copy in another process (pickled for a spawned worker) takes its own lock and reads afresh.
        return {"path": self.path, "_lock": None, "_fresh": False}

    # ------------------------------------------------------------------ layout

    @classmethod
    def create(cls, base_dir: str, name: str) -> tuple[ExperimentDir, str]:
        """Make ``<base_dir>/<name>_<timestamp>/`` with its subdirectories; return it and the timestamp.

        ``mkdir`` is the atomic claim: two processes creating the same name in
        the same second get ``_2``, ``_3``, ... and never share a directory.
        """
        # time.time(), not strftime's own clock: that may be the kernel's coarse one, a tick
        # behind the clock every other timestamp (datetime.now()) reads.
        stamp = time.strftime(TIMESTAMP_FORMAT, time.localtime(time.time()))
        n = 1
        while True:
            if n > _SAME_SECOND_MAX:  # names leave room for no longer suffix: take the next second
                while stamp == (now := time.strftime(TIMESTAMP_FORMAT, time.localtime(time.time()))):
                    time.sleep(0.05)
                stamp, n = now, 1
            ts = stamp if n == 1 else f"{stamp}_{n}"
            path = os.path.join(base_dir, f"{name}_{ts}")
            try:
                os.mkdir(path)
            except FileExistsError:
                n += 1
                continue
            except FileNotFoundError:
                os.makedirs(base_dir, exist_ok=True)
                continue
            os.mkdir(os.path.join(path, LOGS_DIR))
            os.mkdir(os.path.join(path, METRICS_DIR))
            d = cls(path)
            d._fresh = True
            return d, ts

    @staticmethod
    def find(base_dir: str, name: str, resume: Any) -> str:
        """The directory that ``resume`` (a timestamp or a path) names; ConfigError if none."""
        if not isinstance(resume, (str, os.PathLike)) or not os.fspath(resume).strip():
            raise ConfigError(
                f"resume must be a timestamp such as '2025-09-27__17-16-19' or a directory path, got {resume!r}")
        text = os.fspath(resume)
        candidates = []
        if os.sep in text or os.path.isdir(text):
            candidates.append(os.path.abspath(text))
        if os.sep not in text:  # a timestamp (a path joined to the name is no directory)
            candidates.append(os.path.join(base_dir, f"{name}_{text}"))
        for c in candidates:
            if os.path.isfile(os.path.join(c, METADATA_FILE)):
                held = ExperimentDir(c).recorded_name()
                if held != name:
                    # Resuming under another name would rename the experiment in metadata.json
                    # while its directory keeps the old one.
                    raise ConfigError(f"resume={text!r}: {c} holds experiment {held!r}, not {name!r}; "
                                      f"pass name={held!r} to resume it")
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

    def recorded_name(self) -> str:
        """The experiment's name: metadata.json's, else the directory's without its timestamp."""
        try:
            name = read_json(self.metadata_path).get("name")
        except (OSError, ValueError, ExpError, AttributeError):
            name = None
        return name if isinstance(name, str) and name else _name_from_dir(os.path.basename(self.path.rstrip(os.sep)))

    @staticmethod
    def is_experiment(path: str) -> bool:
        """Whether ``path`` holds a metadata.json entry (of any kind: a bad one is still shown),
        or cannot be looked into and is named like an experiment directory (``<name>_<timestamp>``)."""
        try:
            os.lstat(os.path.join(path, METADATA_FILE))
            return True
        except PermissionError:
            return bool(_DIR_STAMP_RE.search(os.path.basename(path.rstrip(os.sep))))
        except OSError:
            return False

    @staticmethod
    def looks_like_experiment(path: str) -> bool:
        """Whether ``path`` is an experiment directory by its layout: a metadata.json entry and a
        terminal_logs or metrics folder (a project's own metadata.json beside its results has neither)."""
        return ExperimentDir.is_experiment(path) and any(
            os.path.isdir(os.path.join(path, sub)) for sub in (LOGS_DIR, METRICS_DIR))

    def timestamp(self, name: str) -> str:
        """The ``<timestamp>`` part of the directory name."""
        base = os.path.basename(self.path.rstrip(os.sep))
        prefix = name + "_"
        return base[len(prefix):] if base.startswith(prefix) else base

    @property
    def metadata_path(self) -> str:
        return os.path.join(self.path, METADATA_FILE)

    def log_path(self, run_id: str) -> str:
        return os.path.join(self.path, LOGS_DIR, run_id + LOG_EXT)

    def metrics_path(self, run_id: str) -> str:
        return os.path.join(self.path, self.metrics_relpath(run_id))

    @staticmethod
    def metrics_relpath(run_id: str) -> str:
        """A run's metrics CSV, relative to its experiment directory."""
        return os.path.join(METRICS_DIR, run_id + METRICS_EXT)

    def slurm_script_path(self, run_id: str) -> str:
        """The batch script a run was submitted with (Slurm backend)."""
        return os.path.join(self.path, SLURM_DIR, run_id + SLURM_SCRIPT_EXT)

    def record_backend(self, run_id: str, record: Mapping[str, Any], *, sync: bool = True) -> None:
        """A run's record from a backend that is not local (a Slurm job id, its node and state), fsynced
        unless ``sync=False`` (a later state or node, which a crash may lose: the job id stays)."""
        def update(m: dict[str, Any]) -> None:
            for r in m.get("runs") or []:
                if isinstance(r, dict) and r.get("id") == run_id:
                    r["backend"] = dict(record)
            if m.get("current_run_id") == run_id and record.get("job_id"):
                m["job_id"] = record.get("job_id")

        self.update_metadata(update, sync=sync)

    def lark_outbox_path(self, run_id: str) -> str:
        """A run's rows waiting for (or already given to) Lark, one JSON object a line."""
        return os.path.join(self.path, LARK_DIR, run_id + LARK_OUTBOX_EXT)

    def lark_cursor_path(self, run_id: str) -> str:
        """How far a run's outbox has been sent, and the batch in flight."""
        return os.path.join(self.path, LARK_DIR, run_id + LARK_CURSOR_EXT)

    def lark_runs(self) -> list[str]:
        """Run ids that have a Lark outbox, oldest first."""
        try:
            names = os.listdir(os.path.join(self.path, LARK_DIR))
        except OSError:
            return []
        return sorted(n[: -len(LARK_OUTBOX_EXT)] for n in names
                      if n.endswith(LARK_OUTBOX_EXT) and _RUN_ID_RE.match(n[: -len(LARK_OUTBOX_EXT)]))

    def run_numbers(self) -> set[int]:
        nums = set()
        for sub, ext in ((LOGS_DIR, LOG_EXT), (METRICS_DIR, METRICS_EXT)):
            try:
                names = os.listdir(os.path.join(self.path, sub))
            except OSError:
                continue
            for fn in names:
                if fn.endswith(ext):
                    m = _RUN_ID_RE.match(fn[: -len(ext)])
                    if m:
                        nums.add(int(m.group(1)))
        return nums

    def runs(self) -> list[str]:
        """Run ids that have a log or a metrics file, oldest first."""
        return [f"run_{n:04d}" for n in sorted(self.run_numbers())]

    def claim_run(self, header: Callable[[str], str]) -> tuple[str, str]:
        """Create the next run's log exclusively and write ``header(run_id)`` into it.

        Returns (run id, log path).  Raises StorageError (nothing is left
        half-written) when the log cannot be made.
        """
        logs = os.path.join(self.path, LOGS_DIR)
        if not self._fresh:  # a run before this one may have been killed writing the metadata
            _remove_dead_temps(self.metadata_path)
        # A directory this object just made has no runs; O_EXCL below guards anyway.
        num = 1 if self._fresh else max(self.run_numbers(), default=0) + 1
        self._fresh = False
        while True:
            rid = f"run_{num:04d}"
            path = os.path.join(logs, rid + LOG_EXT)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | getattr(os, "O_CLOEXEC", 0),
                             0o644)
            except FileExistsError:
                num += 1
                continue
            except FileNotFoundError:  # a directory made by hand, or a subdirectory deleted
                try:
                    os.makedirs(logs, exist_ok=True)
                    os.makedirs(os.path.join(self.path, METRICS_DIR), exist_ok=True)
                except OSError as e:
                    raise _storage_error(logs, e, "create") from e
                continue
            except OSError as e:
                raise _storage_error(path, e, "create") from e
            try:
                append_checked(fd, header(rid).encode("utf-8"), 0, path)
            except BaseException:
                try:  # an empty log would stand for a run that never was
                    os.unlink(path)
                except OSError:
                    pass
                raise
            finally:
                os.close(fd)
            return rid, path

    # ------------------------------------------------------------------ metadata

    def read_metadata(self, finite: bool = False) -> dict[str, Any]:
        """metadata.json as a dict, older field names read as current ones.

        ConfigError when there is none (not an experiment directory);
        MetadataError when it is not a readable JSON object (with ``finite``,
        also when it holds NaN, Infinity or ``1e999``: see :func:`read_json_file`).
        """
        path = self.metadata_path
        try:
            meta = read_json_file(path, finite=finite)
        except FileNotFoundError:
            if os.path.islink(path):
                raise MetadataError(f"{path} is a symbolic link to {os.readlink(path)!r}, which does not exist; "
                                    "fix or remove the link", path) from None
            raise ConfigError(f"{self.path} is not an experiment directory: it has no {METADATA_FILE}") from None
        except ValueError as e:
            raise MetadataError(f"{path} cannot be read ({e}); fix or move the file", path) from None
        except OSError as e:
            raise MetadataError(f"{path} cannot be read ({e.strerror or e})", path) from None
        if not isinstance(meta, dict):
            raise MetadataError(f"{path} does not hold a JSON object; fix or move the file", path)
        if _nested_deeper(meta, METADATA_MAX_DEPTH):
            # Python <= 3.12 cannot parse much deeper; 3.13 can: the same file reads the same everywhere.
            raise MetadataError(f"{path} cannot be read (nested too deeply: over {METADATA_MAX_DEPTH} levels); "
                                "fix or move the file", path)
        return normalize_fields(meta)

    def run_entry(self, run_id: str) -> dict[str, Any] | None:
        """A run's entry in metadata.json's ``runs`` (None if there is none or the file cannot be read)."""
        meta, _ = self.try_read_metadata()
        runs = meta.get("runs") if meta else None
        if not isinstance(runs, list):
            return None
        return next((r for r in runs if isinstance(r, dict) and r.get("id") == run_id), None)

    def try_read_metadata(self, finite: bool = False) -> tuple[dict[str, Any] | None, str | None]:
        """(metadata, None), or (None, why it cannot be read); never raises."""
        try:
            return self.read_metadata(finite), None
        except ExpError as e:
            return None, str(e)

    def _lock_obj(self) -> FileLock:
        if self._lock is None:
            self._lock = FileLock(self.path)
        return self._lock

    def _store(self, meta: dict[str, Any], sync: bool = True) -> None:
        write_json_atomic(self.metadata_path, meta, sync=sync)

    def write_metadata(self, meta: dict[str, Any]) -> None:
        """Replace metadata.json with ``meta`` (under the directory's lock)."""
        with self._lock_obj():
            self._store(meta)

    def update_metadata(self, fn: Callable[[dict[str, Any]], None],
                        initial: Callable[[], dict[str, Any]] | None = None, *, sync: bool = True) -> dict[str, Any]:
        """Read metadata.json, apply ``fn`` to it, write it back, all under the lock.

        ``sync=False`` skips the fsync (see :meth:`record_start`).  A missing
        file starts from ``initial()`` (an experiment whose first write is
        its start).  An unreadable one is moved aside, a new one is
        written from ``initial()`` plus ``fn``, and :class:`MetadataError`
        says where the old one went (without ``initial`` nothing is written).
        """
        with self._lock_obj():
            path = self.metadata_path
            bad: str | None = None
            try:
                meta = self.read_metadata()
                problem = metadata_problem(meta)
                if problem:  # rewriting it would drop what the wrong field holds (say, the runs)
                    raise MetadataError(f"{problem}; fix or move the file", path)
            except ConfigError:  # none yet (read_metadata's "not an experiment directory")
                meta = initial() if initial is not None else {}
            except ExpError as e:
                if initial is None:
                    raise
                bad = str(e)
                meta = initial()
            try:
                kept = keep_aside(path) if bad is not None else None
            except OSError as e:  # a read-only file system, a directory not ours: nothing is written
                raise MetadataError(f"{path} could not be read ({bad}), nor moved aside to write a new one "
                                    f"({e.strerror or e}); nothing was written", path) from None
            fn(meta)
            self._store(meta, sync)
        if kept is not None:
            raise MetadataError(
                f"{path} could not be read ({bad}); it was kept as {kept} and a new {METADATA_FILE} was "
                "written from what this process knows: copy anything you need from the old file", path, kept)
        return meta

    def close(self) -> None:
        """Release the lock descriptor (no descriptor is held between runs)."""
        if self._lock is not None:
            self._lock.close()

    # ------------------------------------------------------------------ records

    def record_start(self, run_id: str, started_at: str, pid: int | None, fields: Mapping[str, Any],
                     initial: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
        """A run started: status running, a new ``runs`` entry; ``fields`` (name, command, ...) refreshed.

        Not fsynced: the start is a passing state that the end (fsynced)
        replaces, and a batch's main thread writes one per experiment, where
        an fsync each costs about a fifth of a short batch's time.  Still
        atomic: a reader sees the old file or the new one.
        """
        def update(m: dict[str, Any]) -> None:
            m.update(fields)
            m.pop("lark_config", None)  # the earlier project stored secrets there
            m.update(status=RUNNING, pid=pid, started_at=started_at, ended_at=None, exit_code=None,
                     duration=None, current_run_id=run_id, error=None, reason=None, cause=None)
            runs = m.get("runs")
            if not isinstance(runs, list):
                runs = m["runs"] = []
            runs.append({"id": run_id, "pid": pid, "started_at": started_at, "ended_at": None,
                         "exit_code": None, "status": RUNNING})

        return self.update_metadata(update, initial, sync=False)

    def write_code_diff(self, diff: bytes) -> None:
        """Save :data:`CODE_DIFF_FILE` (see :func:`git_code_diff`); StorageError on failure."""
        write_atomic(os.path.join(self.path, CODE_DIFF_FILE), diff, sync=False)

    def record_pid(self, run_id: str, pid: int, start_ticks: int | None = None) -> None:
        """The run's pid (and its start time, which tells a reused pid apart on adoption)."""
        def update(m: dict[str, Any]) -> None:
            if m.get("current_run_id") == run_id and m.get("status") == RUNNING:
                m["pid"] = pid
            for r in m.get("runs") or []:
                if isinstance(r, dict) and r.get("id") == run_id and r.get("pid") is None:
                    r["pid"] = pid
                    if start_ticks is not None:
                        r["start_ticks"] = start_ticks

        self.update_metadata(update, sync=False)  # passing state, like the start

    def record_end(self, run_id: str, *, exit_code: int | None, status: str, duration: float,
                   pid: int | None = None, error: str | None = None, reason: str | None = None,
                   signalled: bool = False, initial: Callable[[], dict[str, Any]] | None = None,
                   sync: bool = True, ended_at: str | None = None) -> str | None:
        """A run ended: its ``[exp] ended`` log line, then status, exit code, times and reason in metadata.

        ``sync=False`` leaves the fsync to the caller (:meth:`sync_metadata`),
        who can then do it after telling others that the run ended.
        ``ended_at``: when it ended (ISO 8601), if not now.

        ``reason`` says why when exp ended it ("timeout", "terminated by user");
        otherwise it is worked out by :func:`end_reason`.  ``signalled``: exp
        sent the group signals (so a SIGKILL was exp's, not the OOM killer's).
        A run that did not finish also gets the ``cause`` that
        :func:`failure_cause` finds at the end of its log (None when none).
        Returns the reason recorded.
        """
        ended = ended_at or now_iso()
        if reason is None:
            reason = error or end_reason(exit_code, signalled, pid, since=time.monotonic() - duration)
        cause = None
        if status != FINISHED:
            try:  # read before exp's own line goes in (it would be skipped anyway)
                cause = failure_cause(read_tail(self.log_path(run_id), 1 << 30, CAUSE_TAIL_BYTES)
                                      .decode("utf-8", "replace"))
            except Exception:  # noqa: BLE001 - a guess must never cost the record of the end
                cause = None
        if status == KILLED:
            what = f"killed (exit code {exit_code})"
        elif exit_code is not None and exit_code < 0 and exit_code != EXIT_UNKNOWN:
            what = f"ended by signal {signal_name(-exit_code)} ({status})"
        else:
            what = f"exit code {exit_code} ({status})"
        if error:
            what += f"; {error}"
        note = reason or ""  # what the reason adds: "timeout", or the "(killed by the OOM killer)" of a signal
        heads = [f"exit code {exit_code} ("]
        if exit_code is not None and exit_code < 0:
            heads.append(f"signal {signal_name(-exit_code)} (")
        for head in heads:
            if note.startswith(head) and note.endswith(")"):
                note = note[len(head):-1]
        if note and note not in what:
            what += f"; {note}"
        try:
            self.append_log(run_id, f"{ended} {run_id} ended: {what}, duration {format_duration(duration)}"
                            + (f"; cause: {cause}" if cause else ""))
        except OSError:
            pass  # the metadata below matters more than the log line

        def update(m: dict[str, Any]) -> None:
            m.update(status=status, exit_code=exit_code, pid=None, ended_at=ended, duration=duration,
                     reason=reason if status != FINISHED else None, cause=cause)
            if error:
                m["error"] = error
            runs = m.get("runs")
            if not isinstance(runs, list):
                runs = m["runs"] = []
            entry = next((r for r in runs if isinstance(r, dict) and r.get("id") == run_id), None)
            if entry is None:  # a metadata.json rewritten since the start: the run still gets its entry
                entry = {"id": run_id, "pid": pid, "started_at": None}
                runs.append(entry)
                m.setdefault("current_run_id", run_id)
                if m.get("current_run_id") is None:
                    m["current_run_id"] = run_id
            entry.update(ended_at=ended, exit_code=exit_code, status=status, duration=duration,
                         reason=reason if status != FINISHED else None, cause=cause)
            if entry.get("pid") is None and pid is not None:
                entry["pid"] = pid

        try:
            self.update_metadata(update, initial, sync=sync)
        finally:
            self.close()
        return reason if status != FINISHED else None

    def sync_metadata(self) -> None:
        """fsync metadata.json as it is now (after a ``sync=False`` write); StorageError on failure."""
        try:
            fd = os.open(self.metadata_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise _storage_error(self.metadata_path, e, "sync") from e

    # ------------------------------------------------------------------ runs' files

    def append_log(self, run_id: str, message: str) -> None:
        """Write an ``[exp]`` line into a run's log, on a line of its own."""
        path = self.log_path(run_id)
        text = f"{LOG_MARK} {message}"
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    text = "\n" + text  # the child's last line had no line break
            finally:
                os.close(fd)
        except OSError:
            pass
        append_line(path, text)

    def latest_run(self, meta: Mapping[str, Any] | None = None) -> str | None:
        """The current run's id (metadata.json's, or ``meta``'s when given; else the highest-numbered
        run's files'), or None before any."""
        if meta is None:
            meta = self.try_read_metadata()[0] or {}
        rid = meta.get("current_run_id")
        if isinstance(rid, str) and _RUN_ID_RE.match(rid):
            return rid
        nums = self.run_numbers()
        return f"run_{max(nums):04d}" if nums else None

    def tail_log(self, run_id: str | None = None, lines: int = 50) -> str:
        """The last ``lines`` lines of a run's log (the current run's by default), read backwards
        from its end; "" before any run."""
        rid = run_id or self.latest_run()
        return read_tail(self.log_path(rid), lines).decode("utf-8", "replace") if rid else ""

    def last_metrics(self, run_id: str | None = None) -> dict[str, Any]:
        """Each metric's last logged value in a run, the current one by default (see
        :func:`last_metrics_values`)."""
        rid = run_id or self.latest_run()
        return last_metrics_values(self.metrics_path(rid)) if rid else {}

    def ended_unrecorded(self, meta: Mapping[str, Any]) -> tuple[str, str | None] | None:
        """For metadata that says ``running``: the (status, reason) to show when the run's process,
        on this machine, is gone and nothing recorded its end; None while it may still run.

        That is a standalone script killed with SIGKILL (the OOM killer) or ``os._exit``, an end
        a full disk kept out of metadata.json, a machine that restarted.  The exit status a
        supervisor wrote at the end of the log says how it ended, when there is one.
        """
        rid, runs, pid = meta.get("current_run_id"), meta.get("runs"), meta.get("pid")
        if not isinstance(rid, str) or not _RUN_ID_RE.match(rid) or meta.get("hostname") != _hostname():
            return None
        entry = next((r for r in runs if isinstance(r, dict) and r.get("id") == rid), None) \
            if isinstance(runs, list) else None
        if not _is_int(pid) and entry is not None:
            pid = entry.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            return None  # not started yet, or a cluster job (its id, not a pid)
        ticks = entry.get("start_ticks") if entry is not None else None
        started_by = None
        if not _is_int(ticks):
            ticks = None
            started = meta.get("started_at")
            started_by = _epoch(started if isinstance(started, str) else None)
            if started_by == float("-inf"):
                return None
            started_by += 30  # started_at has the second only, and a batch's command starts just after it
        if process_alive(pid, ticks, started_by):
            return None
        status = read_exit_status(self.log_path(rid))
        if status is None:
            return ERROR, ("its process is gone and nothing recorded how it ended "
                           "(killed with SIGKILL, by the OOM killer, or the machine restarted?)")
        code = exit_code_of_status(status)
        if code == 0:
            return FINISHED, None
        return ERROR, (f"signal {signal_name(-code)}" if code < 0 else f"exit code {code}") \
            + " (its end was not recorded in metadata.json)"

    def summary(self, unreadable: str | None = None) -> dict[str, Any]:
        """What ``exp ls --json`` prints for this directory (and the dashboard serves).

        Never raises: metadata that cannot be read, is not strict JSON (NaN,
        ``1e999``) or has a field exp reads of the wrong type
        (:func:`metadata_problem`) gives ``status: "unreadable"`` and ``error``
        saying why (``unreadable`` gives that reason without reading anything).
        Non-finite metrics become ``"nan"``/``"inf"`` strings so the result is
        strict JSON.  A ``running`` experiment whose process is gone shows how
        it ended (see :meth:`ended_unrecorded`).
        """
        meta, why = self.try_read_metadata(finite=True) if unreadable is None else (None, unreadable)
        if meta is not None:
            problem = metadata_problem(meta)
            if problem:
                meta, why = None, f"{self.metadata_path}: {problem}; fix or move the file"
        m: dict[str, Any] = meta or {}

        def text(key: str) -> str | None:
            v = m.get(key)
            return v if isinstance(v, str) else None

        def number(key: str) -> float | int | None:
            v = m.get(key)
            return v if _is_num(v) and v == v and v not in (float("inf"), float("-inf")) else None

        rid = text("current_run_id")
        if rid is not None and not _RUN_ID_RE.match(rid):
            rid = None
        last = self.last_metrics(rid) if rid else {}
        runs, tags = m.get("runs"), m.get("tags")
        gpus = m.get("gpu_ids")
        params = m.get("params")
        code = m.get("exit_code")
        pid = m.get("pid")
        git = m.get("git")
        status, reason = (text("status") or None) if meta is not None else UNREADABLE, text("reason")
        if status == RUNNING:
            status, reason = self.ended_unrecorded(m) or (status, reason)
        return {
            "name": text("name") or _name_from_dir(os.path.basename(self.path)),
            "dir": os.path.basename(self.path),
            "work_dir": self.path,
            "status": status,
            "error": why if meta is None else text("error"),
            "tags": [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else [],
            "description": text("description"),
            "created_at": text("created_at") or iso_from_old_timestamp(m.get("timestamp")),
            "started_at": text("started_at"),
            "ended_at": text("ended_at"),
            "duration": number("duration"),
            "runs": len(runs) if isinstance(runs, list) else (1 if rid else 0),
            "current_run_id": rid,
            "exit_code": code if _is_int(code) else None,
            "pid": pid if _is_int(pid) else None,
            "gpu_ids": _lenient_gpu_ids(gpus),
            "hostname": text("hostname"),
            "params": json_safe({str(k): v for k, v in params.items() if isinstance(v, (str, int, float, bool))})
            if isinstance(params, dict) else {},
            "reason": reason,
            "cause": text("cause"),
            # Finite numbers as they are (v - v is 0 only for those), the others through json_safe.
            "last_metrics": {k: v if v - v == 0 else json_safe(v) for k, v in last.items() if _is_num(v)},
            # The others as written: text ("007" stays text; a long one cut) and true/false.
            "last_text": {k: v[:LAST_TEXT_MAX_CHARS - 1] + "…" if isinstance(v, str) and len(v) > LAST_TEXT_MAX_CHARS
                          else v for k, v in last.items() if isinstance(v, (str, bool))},
            "dirty": bool(isinstance(git, dict) and git.get("dirty") is True),
        }


#: The fields of metadata.json that exp reads back, by what each must hold when not null.
_METADATA_TEXT = ("name", "command", "status", "description", "hostname", "reason", "cause", "error",
                  "current_run_id")
#: Times: ISO text, or the seconds since the epoch the earlier project's start_time/end_time held.
_METADATA_TIMES = ("created_at", "started_at", "ended_at", "timestamp")


#: A summary's ``last_text`` values are cut to this many characters (the metrics file keeps them whole).
LAST_TEXT_MAX_CHARS = 200


def metadata_problem(meta: Mapping[str, Any]) -> str | None:
    """Which field of a parsed metadata.json holds the wrong type (exp never writes one), or None."""
    get = meta.get
    # Plain loops: this runs for every directory the dashboard lists.
    for key in _METADATA_TEXT:
        v = get(key)
        if v is not None and not isinstance(v, str):
            return _wrong_type(key, v, "text")
    for key in _METADATA_TIMES:
        v = get(key)
        if v is not None and not (isinstance(v, str) or _is_num(v)):
            return _wrong_type(key, v, "a time")
    v = get("duration")
    if v is not None and not _is_num(v):
        return _wrong_type("duration", v, "a number")
    for key in ("exit_code", "pid"):
        v = get(key)
        if v is not None and not _is_int(v):
            return _wrong_type(key, v, "a whole number")
    v = get("tags")
    if v is not None and not (isinstance(v, list) and all(isinstance(t, str) for t in v)):
        return _wrong_type("tags", v, "a list of text")
    v = get("runs")
    if v is not None and not (isinstance(v, list) and all(isinstance(r, dict) for r in v)):
        return _wrong_type("runs", v, "a list of objects")
    v = get("gpu_ids")
    if v is not None and _lenient_gpu_ids(v) is None:
        return _wrong_type("gpu_ids", v, "a list of GPU numbers")
    for key in ("params", "git"):
        v = get(key)
        if v is not None and not isinstance(v, dict):
            return _wrong_type(key, v, "an object")
    return None


def _wrong_type(key: str, value: Any, what: str) -> str:
    shown = repr(value)
    return f"its {key!r} is {shown[:40] + '...' if len(shown) > 40 else shown}, not {what}"


def _name_from_dir(dirname: str) -> str:
    return _DIR_STAMP_RE.sub("", dirname) or dirname


def scan(base_dir: str | os.PathLike[str], depth: int = 2) -> list[ExperimentDir]:
    """Experiment directories under ``base_dir``, and one level deeper (results in subfolders).

    A directory counts when it holds a ``metadata.json`` entry, readable or
    not, or cannot be looked into and is named like an experiment directory
    (its summary then says why it is unreadable).  Hidden entries
    (``.exp_state``) are skipped.  A symlink to a directory (``latest``)
    counts once: not at all when the scan reaches its target anyway, and
    two links to one place once.  Order: as listed.
    """
    out: list[ExperimentDir] = []
    base = os.fspath(base_dir)
    _scan_into(base, depth, out, (os.path.realpath(base), depth, set()))
    return out


def _scan_into(path: str, depth: int, out: list[ExperimentDir], top: tuple[str, int, set[str]]) -> None:
    try:
        it = os.scandir(path)
    except OSError:
        return
    links = []
    with it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            try:
                if not entry.is_dir():
                    continue
                if entry.is_symlink():
                    links.append(entry.path)
                    continue
            except OSError:
                continue
            _scan_one(entry.path, depth, out, top)
    # Links after the real directories, by name: which of two links to one place is listed
    # does not depend on the order the file system lists them in.
    for link in sorted(links):
        real = os.path.realpath(link)
        if not (covered_by_scan(real, top[0], top[1]) or real in top[2]):
            top[2].add(real)
            _scan_one(link, depth, out, top)


def _scan_one(path: str, depth: int, out: list[ExperimentDir], top: tuple[str, int, set[str]]) -> None:
    if ExperimentDir.is_experiment(path):
        out.append(ExperimentDir(path))
    elif depth > 1:
        _scan_into(path, depth - 1, out, top)


def covered_by_scan(real: str, base_real: str, depth: int = 2) -> bool:
    """Whether a scan of ``base_real`` (a real path) ``depth`` levels deep reaches the real path
    ``real`` without a symlink: then a symlink to it is the same experiment seen twice."""
    rel = os.path.relpath(real, base_real)
    if rel == os.curdir:
        return True  # a link back to the base itself
    parts = rel.split(os.sep)
    if parts[0] == os.pardir or len(parts) > depth or any(p.startswith(".") for p in parts):
        return False
    # Every directory on the way is a real one (islink: one lstat each, at most depth - 1).
    return not any(os.path.islink(os.path.join(base_real, *parts[:i])) for i in range(1, len(parts)))


def remove_unstarted_dirs(base_dir: str, names: Iterable[str], since: float) -> list[str]:
    """Remove the directories ``<name>_<timestamp>`` under ``base_dir`` made at or after ``since``
    (seconds since the epoch) that hold nothing but their own empty subdirectories: left by a
    process killed between making one and writing its metadata.json.  Returns their paths.
    """
    prefixes = tuple(f"{n}_" for n in set(names))
    removed: list[str] = []
    try:
        entries = [e for e in os.scandir(base_dir) if e.name.startswith(prefixes)]
    except OSError:
        return removed
    for e in entries:
        try:
            if not e.is_dir(follow_symlinks=False) or e.stat(follow_symlinks=False).st_mtime < since:
                continue
            inside = os.listdir(e.path)
            if not set(inside) <= {LOGS_DIR, METRICS_DIR} or any(os.listdir(os.path.join(e.path, d)) for d in inside):
                continue
            for d in inside:
                os.rmdir(os.path.join(e.path, d))
            os.rmdir(e.path)
            removed.append(e.path)
        except OSError:  # not empty after all (a process just wrote there), or not ours to remove
            continue
    return removed


#: The state file's task lists.
STATE_GROUPS = ("pending", "running", "finished", "errors")
#: The type each field of a state file's task has (a list: of that type); another value reads as None.
STATE_ITEM_TYPES: dict[str, Any] = {
    **dict.fromkeys(("name", "command", "status", "work_dir", "run_id", "created_at", "started_at", "ended_at",
                     "error", "reason", "config", "cwd", "base_dir", "description"), str),
    **dict.fromkeys(("id", "priority", "repeat", "repeats", "attempt", "exit_code", "pid", "max_retries",
                     "gpus"), int),
    **dict.fromkeys(("duration", "delay_seconds", "timeout"), float),
    **dict.fromkeys(("params", "environment", "job"), dict),
    **dict.fromkeys(("assigned_gpus", "gpu_ids", "deps"), [int]),
    **dict.fromkeys(("tags", "depends_on"), [str]),
}


def _has_type(value: Any, kind: Any) -> bool:
    if kind is int:
        return _is_int(value)
    if kind is float:
        return _is_num(value)
    if isinstance(kind, list):
        return isinstance(value, list) and all(_has_type(v, kind[0]) for v in value)
    return isinstance(value, kind)


def normalize_state_item(item: dict[str, Any]) -> dict[str, Any]:
    """A state file's task with current field names, and None for a known field of the wrong type."""
    normalize_fields(item)
    for key, kind in STATE_ITEM_TYPES.items():
        value = item.get(key)
        if value is not None and not _has_type(value, kind):
            item[key] = None
    return item


class StateFile:
    """``<base>/.exp_state/scheduler_state.json``: the scheduler's queue, for ``ls``, ``status`` and the dashboard."""

    def __init__(self, base_dir: str | os.PathLike[str]) -> None:
        self.base_dir = os.path.abspath(os.fspath(base_dir))
        self.path = os.path.join(self.base_dir, STATE_DIR, STATE_FILE)

    def write_text(self, text: str) -> None:
        """Replace the state file with ``text`` (JSON the caller built); StorageError on failure."""
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        except OSError as e:
            raise _storage_error(os.path.dirname(self.path), e, "create") from e
        write_atomic(self.path, text.encode("utf-8"))

    def read(self) -> dict[str, Any] | None:
        """The state as a dict (older field names read as current ones); None if there is none.

        Raises MetadataError when the file exists but is not a JSON object.
        """
        try:
            state = read_json_file(self.path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise MetadataError(f"{self.path} cannot be read ({e})", self.path) from None
        if not isinstance(state, dict):
            raise MetadataError(f"{self.path} does not hold a JSON object", self.path)
        # Whoever reads it (recovery, `exp status`, the dashboard) gets a queue of
        # task dicts whose known fields have their types or are None: a hand-edited
        # or damaged file must not crash a scheduler that is taking over.
        for key in STATE_GROUPS:
            items = state.get(key)
            state[key] = [normalize_state_item(i) for i in items if isinstance(i, dict)] \
                if isinstance(items, list) else []
        return state

    def set_aside(self) -> str | None:
        """Move an unreadable state file aside before a scheduler writes a new one; return where it went.

        None when there is nothing there or it cannot be moved.
        """
        try:
            return keep_aside(self.path)
        except OSError:
            return None

    # ------------------------------------------------------------------ ownership

    @property
    def lock_path(self) -> str:
        return os.path.join(self.base_dir, STATE_DIR, OWNER_LOCK_FILE)

    def acquire(self) -> int | None:
        """Take the base directory for this process: a descriptor holding its lock, or None if taken.

        The lock is an ``flock``, so the kernel releases it when the owner
        dies, however it dies; the owner closes the descriptor when it is done.
        """
        os.makedirs(os.path.dirname(self.lock_path), exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        before = time.time()
        # owned() takes a shared lock for an instant (a dashboard polls it): try for a
        # little while before concluding that another scheduler holds the directory.
        for attempt in range(20):
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if attempt == 19:
                    os.close(fd)
                    return None
                time.sleep(0.01)
        _remove_dead_temps(self.path)  # of an owner killed while writing the state
        # Commands still waiting were sent to an earlier owner that ended
        # before acting on them: answered, never acted on (a stale `shutdown`
        # would otherwise stop this scheduler before it starts anything).
        for cid, _ in self.pending_commands():
            try:
                # One posted since we took the lock is for us (an `exp run` joining at once).
                if os.stat(os.path.join(self.commands_dir, cid + COMMAND_EXT)).st_mtime >= before:
                    continue
                self.answer(cid, {"ok": False, "resend": True,
                                  "message": "not done: the scheduler it was sent to ended first; send it again"})
            except OSError:
                pass
        return fd

    def owned(self) -> bool:
        """Whether a live scheduler owns the base directory (its lock is held)."""
        if fcntl is None or not os.path.exists(self.lock_path):
            return False
        try:
            fd = os.open(self.lock_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)
        return False

    # ------------------------------------------------------------------ commands

    @property
    def commands_dir(self) -> str:
        return os.path.join(self.base_dir, STATE_DIR, COMMANDS_DIR)

    def post_command(self, action: str, **args: Any) -> str:
        """Write one command for the scheduler (atomically, a file of its own); return its id."""
        import uuid

        cid = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        os.makedirs(self.commands_dir, exist_ok=True)
        body = dict(args, id=cid, action=action, pid=os.getpid(), created_at=now_iso())
        # Not fsynced: a command is acted on at once, or not at all if the machine goes down.
        write_atomic(os.path.join(self.commands_dir, cid + COMMAND_EXT), _json().dumps(body).encode("utf-8"),
                     sync=False)
        return cid

    def send_command(self, action: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
        """Post a command and wait for the scheduler's answer.

        UnavailableError when no scheduler runs for this directory; ExpError
        when it does not answer within ``timeout`` (the command is withdrawn).
        """
        if not self.owned():
            raise UnavailableError(f"no scheduler is running for {self.base_dir}; start one with "
                                   "`exp run config.toml`")
        cid = self.post_command(action, **args)
        res = self.result(cid, timeout=timeout, alive=self.owned)
        if res is None:
            try:  # so that no later scheduler of this directory acts on it
                os.unlink(os.path.join(self.commands_dir, cid + COMMAND_EXT))
            except OSError:
                pass
            raise ExpError(f"the scheduler of {self.base_dir} did not answer (is it still running? see `exp status`)")
        return res

    def pending_commands(self) -> list[tuple[str, dict[str, Any] | None]]:
        """Commands not yet answered, oldest first: (id, body or None when unreadable)."""
        try:
            names = os.listdir(self.commands_dir)
        except OSError:
            return []
        out: list[tuple[str, dict[str, Any] | None]] = []
        for name in sorted(names):
            if not name.endswith(COMMAND_EXT) or name.endswith(RESULT_EXT):
                continue
            cid = name[: -len(COMMAND_EXT)]
            try:
                body = read_json_file(os.path.join(self.commands_dir, name), 1 << 20)
            except (OSError, ValueError):
                body = None
            out.append((cid, body if isinstance(body, dict) else None))
        return out

    def answer(self, cid: str, result: Mapping[str, Any]) -> None:
        """Write a command's result next to it, then remove the command (it is done)."""
        write_atomic(os.path.join(self.commands_dir, cid + RESULT_EXT),
                     _json().dumps(json_safe(dict(result)), ensure_ascii=False).encode("utf-8"), sync=False)
        try:
            os.unlink(os.path.join(self.commands_dir, cid + COMMAND_EXT))
        except OSError:
            pass

    def result(self, cid: str, timeout: float, alive: Callable[[], bool] | None = None) -> dict[str, Any] | None:
        """Wait up to ``timeout`` s for a command's result (None if none came); the result file is removed."""
        path = os.path.join(self.commands_dir, cid + RESULT_EXT)
        deadline = time.monotonic() + timeout
        gave_up = False
        while True:
            try:
                res = read_json_file(path, 16 << 20)
            except FileNotFoundError:
                res = None
            except (OSError, ValueError):
                res = None
            if isinstance(res, dict):
                try:
                    os.unlink(path)
                except OSError:
                    pass
                return res
            if gave_up:
                return None
            if time.monotonic() >= deadline or (alive is not None and not alive()):
                gave_up = True  # one more look: the answer may have come just before the scheduler exited
                continue
            time.sleep(0.01)

    def commands_mtime(self) -> int:
        try:
            return os.stat(self.commands_dir).st_mtime_ns
        except OSError:
            return 0


def task_as_recorded(item: Mapping[str, Any]) -> dict[str, Any]:
    """A task the state file lists as running, with the end its experiment has recorded since.

    A scheduler that was killed leaves its running tasks so in the state
    file; their supervisors record the ends in the experiments' metadata.
    A task whose run has no recorded end is returned as it is.
    """
    out = dict(item)
    wd, rid = item.get("work_dir"), item.get("run_id")
    if not (isinstance(wd, str) and wd and isinstance(rid, str) and rid):
        return out
    entry = ExperimentDir(wd).run_entry(rid)
    if not entry or not isinstance(entry.get("ended_at"), str):
        return out
    status = entry.get("status")
    out.update(status=status if isinstance(status, str) and status in STATUSES else ERROR,
               ended_at=entry["ended_at"], pid=None,
               exit_code=entry.get("exit_code") if _is_int(entry.get("exit_code")) else None,
               reason=entry.get("reason") if isinstance(entry.get("reason"), str) else None)
    return out


# ============================================================================
# Backend: starting commands and stopping them (local now; a cluster later)
# ============================================================================
#
# A backend takes a Launch and returns a run object with pid, poll, wait,
# exited_within, terminate and record; ``stop(runs, grace)`` stops many at
# once under one grace period.  Nothing above this section touches Popen or
# process groups.

#: What ``poll()`` of a run attached from its record returns once it has
#: ended: the exit status of a process that is not our child is not knowable.
EXIT_UNKNOWN = -255


class Launch:
    """What to start: a shell command, where, with which environment, output appended to which log.

    With ``supervise`` the command runs under a small supervisor (the shell
    that leads its process group) that writes ``[exp] exit status N`` at the
    end of the log when it ends, and, if the process that started it
    (``os.getpid()`` at start) is gone by then, runs ``recorder`` plus the
    status and the times it ended and started, so the end is recorded even
    when the scheduler was killed or a background run's parent exited.
    """

    __slots__ = ("command", "cwd", "env", "log_path", "name", "supervise", "recorder", "script_path", "tag",
                 "on_submit")

    def __init__(self, command: str, cwd: str, env: dict[bytes, bytes], log_path: str, name: str = "",
                 supervise: bool = False, recorder: list[str] | None = None, script_path: str | None = None,
                 tag: str | None = None, on_submit: Callable[[dict[str, Any]], Any] | None = None) -> None:
        self.command = command
        self.cwd = cwd
        self.env = env
        self.log_path = log_path
        self.name = name
        self.supervise = supervise
        self.recorder = recorder
        #: Where a backend that submits a script keeps it (Slurm), and what marks the submission
        #: (``<work_dir>:<run_id>``) so that one whose record was lost can be found.
        self.script_path = script_path
        self.tag = tag
        #: Called with the run's record as soon as it has one (before anything else can fail).
        self.on_submit = on_submit


def supervised_command(command: str, recorder: list[str] | None, manager_pid: int) -> str:
    """The ``sh -c`` text that runs ``command`` under exp's supervisor (see :class:`Launch`).

    The command runs in a subshell, so its ``exit`` or ``exec`` ends only
    that.  The supervisor catches TERM/INT/HUP with a no-op (reset again for
    the command: a trap, unlike an ignored signal, is not inherited), so a
    stop signalled to the whole group lets it outlive the command long enough
    to write the status.  A status of 128+N (the command died of signal N) is
    passed on by dying of the same signal, so the starter sees it as a signal.
    """
    import shlex

    lines = ["trap : TERM INT HUP", "(", command, ")", "rc=$?", f"printf '\\n{LOG_MARK} {EXIT_STATUS_TEXT} %s\\n' $rc"]
    if recorder:
        # Is exp still there to record the end?  Its /proc/PID/cwd resolves only while
        # it lives: not once it has exited (a zombie its parent has not reaped, which
        # `kill -0` still answers for), nor for a reused pid of another user.  One stat,
        # where reading /proc/PID/stat costs the shell a read() per byte.  Without /proc
        # (macOS), `kill -0`.  The end and start times go along: the recorder (a Python
        # start) takes a while to ask, and the metadata has the start only to the second.
        alive = (f"[ -d /proc/{manager_pid}/cwd ]" if _HAS_PROC else f"kill -0 {manager_pid} 2>/dev/null")
        lines.append(f'{alive} || {shlex.join(recorder)} $rc "$(date +%s.%N 2>/dev/null)" {time.time():.3f}')
    lines += ["trap - TERM INT HUP", 'if [ "$rc" -gt 128 ] && [ "$rc" -lt 160 ]; then kill -$((rc - 128)) $$; fi',
              "exit $rc"]
    return "\n".join(lines)


_EXIT_STATUS_RE = _LazyRe(rb"(?m)\[exp\] exit status (\d+)[ \t]*$")


def read_exit_status(log_path: str) -> int | None:
    """The exit status a run's supervisor wrote at the end of its log, or None (not ended, or no supervisor)."""
    found = _EXIT_STATUS_RE.findall(read_tail(log_path, 32, max_bytes=1 << 20))
    return int(found[-1]) if found else None


def exit_code_of_status(status: int) -> int:
    """A shell's exit status (as a supervisor writes it) as Popen reports a code: 128+N, a death by
    signal N, is -N."""
    return -(status - 128) if 128 < status < 160 else status


def record_end_command(work_dir: str, run_id: str) -> list[str]:
    """The command a supervisor runs (with the exit status appended) when exp is gone: records the end."""
    return [sys.executable, "-I", os.path.abspath(__file__), RECORD_END_VERB, work_dir, run_id]


def record_orphan_end(work_dir: str, run_id: str, status_code: int, ended: float | None = None,
                      started: float | None = None) -> None:
    """Record a run's end from its supervisor, exp having gone meanwhile (once: a recorded end stays).

    ``ended``, ``started``: when the command ended and started (seconds since
    the epoch); by default now, and the run's ``started_at`` (to the second).
    """
    d = ExperimentDir(work_dir)
    entry = d.run_entry(run_id)
    if entry is not None and entry.get("ended_at"):
        return  # exp recorded it after all
    if ended is None or not (ended == ended and abs(ended - time.time()) < 86400 * 365):
        ended = time.time()  # none given, or not a time this run can have ended at
    duration = 0.0
    started_at = entry.get("started_at") if entry else None
    t0 = _epoch(started_at if isinstance(started_at, str) else None)  # -inf: none written
    if started is not None and started == started and 0 <= ended - started < 86400 * 365:
        duration = round(ended - started, 3)
    elif t0 > float("-inf"):
        duration = round(max(0.0, ended - t0), 3)
    code = exit_code_of_status(status_code)
    d.record_end(run_id, exit_code=code, status=FINISHED if code == 0 else ERROR, duration=duration,
                 ended_at=_iso_at(int(ended)))


class LocalRun:
    """A command started by :class:`LocalBackend`: the leader of its own session and process group.

    ``proc`` is None for a run attached from its :meth:`record` by another
    process; such a run can be polled and stopped, but its exit code is
    :data:`EXIT_UNKNOWN`.
    """

    backend = "local"

    def __init__(self, proc: subprocess.Popen[bytes] | None, pid: int, start_ticks: int | None = None) -> None:
        self.proc = proc
        self.pid = pid
        self.pgid = pid  # start_new_session: the leader's pid is the group's id
        self.start_ticks = start_ticks

    def poll(self) -> int | None:
        """The exit code once the command has ended (and been reaped), else None."""
        if self.proc is not None:
            return self.proc.poll()
        if group_alive(self.pgid) and (self.start_ticks is None or _proc_start_ticks(self.pid) in (None, self.start_ticks)):
            return None
        return EXIT_UNKNOWN

    def exited_within(self, timeout: float) -> bool:
        """Whether the command ends within ``timeout`` seconds (woken at the exit itself on Linux)."""
        if self.proc is not None:
            return exited_within(self.proc, timeout)
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the command to end; ``subprocess.TimeoutExpired`` after ``timeout`` seconds."""
        if self.proc is not None:
            return self.proc.wait(timeout)
        if not self.exited_within(float("inf") if timeout is None else timeout):
            import subprocess

            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)  # type: ignore[arg-type]
        return EXIT_UNKNOWN

    def terminate(self, grace: float = DEFAULT_KILL_GRACE) -> None:
        """SIGTERM the whole process group, SIGKILL after ``grace`` seconds; returns when it is gone."""
        stop_groups([self.pgid], grace)

    def outcome(self) -> tuple[str, str | None] | None:
        """(status, reason) when the backend knows better than the exit code: never, for a local run."""
        return None

    def queued(self) -> float | None:
        """Seconds it waited before it ran (a cluster's queue): none, a local command runs at once."""
        return 0.0

    def record(self) -> dict[str, Any]:
        """What a later process needs to find this run again (see :meth:`LocalBackend.attach`)."""
        if self.start_ticks is None and self.proc is not None and self.proc.returncode is None:
            # Read once, here, not per start: our unreaped child's pid cannot be
            # reused yet, and with it a later attach tells a reused pid apart.
            self.start_ticks = _proc_start_ticks(self.pid)
        return {"backend": self.backend, "pid": self.pid, "pgid": self.pgid, "host": _hostname(),
                "start_ticks": self.start_ticks}

    def __repr__(self) -> str:
        return f"LocalRun(pid={self.pid})"


class LocalBackend:
    """Runs commands on this machine, each in a new session, output appended to its log."""

    name = "local"
    #: GPUs are this machine's: the scheduler hands them out (CUDA_VISIBLE_DEVICES).
    allocates_gpus = False

    def for_job(self, options: Mapping[str, Any] | None, gpus: int = 0, timeout: float | None = None) -> LocalBackend:
        """The backend for one experiment: the same (a local run has no per-job options)."""
        return self

    def find(self, tag: str, log_path: str | None = None) -> LocalRun | None:
        """The run started for ``tag`` (``<work_dir>:<run_id>``) if its pid was never recorded.

        A start records the pid only once the command has lasted a moment, so
        a scheduler killed just after a start leaves none: the run's
        supervisor is found by the recorder arguments in its command line.
        """
        import shlex

        work_dir, sep, rid = tag.rpartition(":")
        if not sep:
            return None
        needle = f" {RECORD_END_VERB} {shlex.quote(work_dir)} {shlex.quote(rid)} ".encode()
        for pid in session_leaders_running(needle) or []:
            return LocalRun(None, pid, _proc_start_ticks(pid))
        return None

    def start(self, launch: Launch) -> LocalRun:
        """Start ``launch.command`` with ``sh -c``; raise ExpError (with the cause) if it cannot start."""
        import subprocess

        require_posix()
        try:
            fd = os.open(launch.log_path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise _storage_error(launch.log_path, e, "open") from e
        command = launch.command
        if launch.supervise:
            command = supervised_command(command, launch.recorder, os.getpid())
        try:
            proc = subprocess.Popen(
                command,
                shell=True,
                cwd=launch.cwd,
                env=launch.env,
                stdin=_devnull(),
                stdout=fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        except Exception as e:  # cwd vanished, no /bin/sh, no memory, ...
            raise ExpError(f"could not start {launch.command!r} in {launch.cwd!r}: {type(e).__name__}: {e}") from e
        finally:
            os.close(fd)
        return LocalRun(proc, proc.pid, None)

    def attach(self, record: Mapping[str, Any]) -> LocalRun:
        """A run from its :meth:`LocalRun.record`, for a process that did not start it."""
        pid = record.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise ExpError(f"cannot attach to a local run without a pid: {dict(record)!r}")
        if record.get("host") not in (None, _hostname()):
            raise ExpError(f"run {pid} was started on {record.get('host')}, not on this machine ({_hostname()})")
        ticks = record.get("start_ticks")
        return LocalRun(None, pid, ticks if _is_int(ticks) else None)

    def stop(self, runs: Iterable[LocalRun], grace: float, idle: Callable[[float], bool] | None = None) -> list[int]:
        """Stop many runs under one grace period (see :func:`stop_groups`); return groups left alive."""
        return stop_groups([r.pgid for r in runs], grace, idle)

    def on_change(self, callback: Callable[[], None]) -> Callable[[], None]:
        """What a cluster backend calls when a job's state changes: a local run has none to tell."""
        return lambda: None

    def release(self, runs: Iterable[Any]) -> None:
        """Stop waiting for runs that go on without exp (see :meth:`SlurmBackend.release`): a local
        run's wait ends with the process, which the kernel always ends after a SIGKILL."""


# ---------------------------------------------------------------- Slurm
#
# Each run is one batch job: a script kept in the experiment directory (read
# it, resubmit it), submitted with ``sbatch --parsable`` under the run's own
# environment, its output appended to the run's log.  One poller thread asks
# Slurm about every job this process watches with one ``squeue`` per poll (the
# exit code of a job that ended: one ``scontrol show job`` for that job, once),
# backing off while nothing changes.

#: Keys of ``[scheduler.slurm]`` / ``[experiments.slurm]``: the sbatch option each becomes.
SLURM_OPTIONS = {"partition": "--partition", "account": "--account", "qos": "--qos", "time": "--time",
                 "mem": "--mem", "cpus_per_task": "--cpus-per-task", "constraint": "--constraint",
                 "extra": None}
#: Seconds between polls of Slurm: the first, and the longest after backing off.
SLURM_POLL_MIN, SLURM_POLL_MAX = 0.5, 5.0
#: exp's own state for a job Slurm no longer knows (purged, no accounting) whose log says nothing of its end.
SLURM_GONE = "GONE"
#: Job states after which a job does not run again.
SLURM_ENDED = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
                         "PREEMPTED", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED", SLURM_GONE})
#: A job that ended in one of these states: exp's status and reason (None: the exit code says).
SLURM_OUTCOMES: dict[str, tuple[str, str | None]] = {
    "COMPLETED": (FINISHED, None), "FAILED": (ERROR, None),
    "CANCELLED": (KILLED, "cancelled in Slurm"), "TIMEOUT": (ERROR, "timeout (Slurm time limit)"),
    "OUT_OF_MEMORY": (ERROR, "out of memory (Slurm)"), "NODE_FAIL": (ERROR, "node failure (Slurm)"),
    "PREEMPTED": (ERROR, "preempted (Slurm)"), "BOOT_FAIL": (ERROR, "node boot failure (Slurm)"),
    "DEADLINE": (ERROR, "deadline passed (Slurm)"), "SPECIAL_EXIT": (ERROR, "special exit (Slurm)"),
    "REVOKED": (ERROR, "revoked (Slurm)"),
    SLURM_GONE: (ERROR, "ended unseen: Slurm no longer knows the job, and its log has no exit status"),
}
#: Seconds sbatch may take to answer; after that the job is looked for by its comment.
SBATCH_TIMEOUT = 60.0
#: Marks a job exp submitted: ``--comment exp:<work_dir>:<run_id>`` finds it again after a crash.
SLURM_TAG_PREFIX = "exp:"


def _slurm_time(seconds: float) -> str:
    """``--time`` for a timeout in seconds: whole minutes, rounded up (Slurm's granularity)."""
    minutes = max(1, int(-(-seconds // 60)))
    return f"{minutes // 1440}-{minutes % 1440 // 60:02d}:{minutes % 60:02d}:00"


def slurm_script(launch: Launch, options: Mapping[str, Any], gpus: int = 0, timeout: float | None = None) -> str:
    """The batch script of a run: #SBATCH lines, then the command under a shell that notes its exit status.

    The command's environment is the one sbatch exports (the run's own,
    given to sbatch), so the script itself holds no variables (no secrets).
    """
    import re
    import shlex

    lines = ["#!/bin/sh"]
    # Values in double quotes, which sbatch's directive parser takes (a name or a path with a
    # space is an "invalid directive" unquoted).  One holding a double quote has no #SBATCH line:
    # SlurmBackend.start gives these as arguments too, and those win.
    for opt, val in (("--job-name", _slurm_safe(launch.name or "exp")),
                     ("--comment", _slurm_safe(SLURM_TAG_PREFIX + (launch.tag or ""))),
                     ("--output", _slurm_safe(launch.log_path or "")), ("--open-mode", "append"),
                     ("--chdir", _slurm_safe(launch.cwd or ""))):
        if val and '"' not in val:
            lines.append(f'#SBATCH {opt}="{val}"' if re.search(r"\s", val) else f"#SBATCH {opt}={val}")
    if gpus:
        lines.append(f"#SBATCH --gres=gpu:{int(gpus)}")
    if timeout and not options.get("time"):
        lines.append(f"#SBATCH --time={_slurm_time(timeout)}")
    for key, flag in SLURM_OPTIONS.items():
        value = options.get(key)
        if flag and value not in (None, ""):
            lines.append(f"#SBATCH {flag}={value}")
    for extra in options.get("extra") or []:
        lines.append(f"#SBATCH {extra}")
    mark = f"{LOG_MARK} {EXIT_STATUS_TEXT}"
    # A command killed by signal N (status 128+N) ends the job by the same signal, as the local
    # supervisor does: Slurm then reports the signal (ExitCode=0:N), not "exit code 137".
    lines += ["", f"sh -c {shlex.quote(launch.command)} </dev/null", "code=$?",
              f'echo "{mark} $code"',
              'if [ "$code" -gt 128 ] && [ "$code" -lt 160 ]; then kill -$((code - 128)) $$; fi',
              'exit "$code"', ""]
    return "\n".join(lines)


def _slurm_safe(text: str) -> str:
    # One #SBATCH line, no shell: only a line break (or NUL) could break out of it.
    import re

    return re.sub(r"[\r\n\0]", " ", text)


def _slurm_cmd(args: list[str], *, timeout: float = 30.0, env: Mapping[bytes, bytes] | None = None,
               cwd: str | None = None) -> Any:
    import subprocess

    _SLURM_POLLER.commands += 1
    # In a session of its own: a Ctrl-C at the terminal goes to exp, which decides, and not to an
    # sbatch half-way through a submission the controller may accept anyway.
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd,
                          stdin=subprocess.DEVNULL, start_new_session=True)


class _SlurmJob:
    __slots__ = ("state", "node", "exit_code", "seen", "submitted", "started", "log_path", "adopted", "released")

    def __init__(self, log_path: str | None = None, adopted: bool = False) -> None:
        self.log_path = log_path  # where the script writes its exit status (Slurm forgets jobs)
        #: Submitted by an earlier exp: its submission and start times are Slurm's (squeue's), not
        #: the moments this process saw them, so its time in the queue is not counted as run time.
        self.adopted = adopted
        self.released = False  # no longer waited for (exp exits while it goes on)
        self.submitted = time.monotonic()
        self.started: float | None = None  # when first seen running (or ended)
        self.state: str | None = None
        self.node: str | None = None
        self.exit_code: int | None = None
        self.seen = False  # squeue listed it at least once


class _SlurmPoller:
    """Polls Slurm for every job this process watches: one squeue per poll, from one thread."""

    def __init__(self) -> None:
        self.jobs: dict[str, _SlurmJob] = {}
        self.commands = 0  # Slurm commands run (sbatch, squeue, scontrol, sacct, scancel)
        self.polls = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._interval = SLURM_POLL_MIN
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (from the poller's thread) after a poll that saw a job's state or node
        change; returns the function that stops that."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    def watch(self, job_id: str, log_path: str | None = None, adopted: bool = False) -> _SlurmJob:
        with self._cond:
            job = self.jobs.setdefault(job_id, _SlurmJob(log_path, adopted))
            job.log_path = job.log_path or log_path
            self._interval = SLURM_POLL_MIN
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="exp-slurm-poll", daemon=True)
                self._thread.start()
            self._cond.notify_all()
            return job

    def kick(self) -> None:
        """Poll soon (after a submission or scancel)."""
        with self._cond:
            self._interval = SLURM_POLL_MIN
            self._cond.notify_all()

    def wait_end(self, job_id: str, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            job = self.jobs[job_id]
            while job.state not in SLURM_ENDED:
                left = None if deadline is None else deadline - time.monotonic()
                if (left is not None and left <= 0) or job.released:
                    return False
                self._cond.wait(left)
            return True

    def release(self, job_ids: Iterable[str]) -> None:
        """Stop waiting for these jobs: whoever waits for one gets "not ended" at once."""
        with self._cond:
            for jid in job_ids:
                if jid in self.jobs:
                    self.jobs[jid].released = True
            self._cond.notify_all()

    def _loop(self) -> None:
        last = 0.0
        while True:
            with self._cond:
                # Woken early (a submission, a scancel): still at most one poll per SLURM_POLL_MIN,
                # so a burst of submissions costs no extra squeue.
                while time.monotonic() - last < SLURM_POLL_MIN:
                    self._cond.wait(SLURM_POLL_MIN - (time.monotonic() - last))
                live = [j for j, s in self.jobs.items() if s.state not in SLURM_ENDED]
                if not live:
                    self._thread = None
                    return
            last = time.monotonic()
            changed = self._poll(live)
            if changed:
                for callback in list(self._listeners):
                    try:
                        callback()
                    except Exception:  # noqa: BLE001 - a listener's error must not stop the polling
                        pass
            with self._cond:
                self._interval = SLURM_POLL_MIN if changed else min(SLURM_POLL_MAX, self._interval * 1.5)
                self._cond.notify_all()
                self._cond.wait(self._interval)

    def _poll(self, ids: list[str]) -> bool:
        import subprocess

        self.polls += 1
        try:
            r = _slurm_cmd(["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i|%T|%N|%r|%V|%S"])
            # When it knows none of the ids (all purged after MinJobAge), squeue fails with
            # "Invalid job id specified": an answer, not a controller that is down.
            ok, out = r.returncode == 0 or _slurm_unknown_job(r.stderr), r.stdout
        except (OSError, subprocess.SubprocessError):
            ok, out = False, ""
        listed: dict[str, list[str]] = {}
        for line in out.splitlines():
            parts = [p.strip() for p in line.split("|")]
            if len(parts) >= 3:
                listed[parts[0]] = [parts[1].split()[0] if parts[1] else "", *parts[2:], "", ""]
        changed = False
        for jid in ids:
            job = self.jobs[jid]
            if jid in listed:
                state, node, _reason, submit_time, start_time = listed[jid][:5]
                job.seen = True
                if node and node not in ("(null)", "n/a") and node != job.node:
                    job.node, changed = node, True
                state = state.rstrip("+")
                if state not in ("PENDING", "CONFIGURING", "REQUEUED", "SUSPENDED", "") and job.started is None:
                    job.started = time.monotonic()
                    if job.adopted:  # when it was submitted and started, as Slurm says (to the second)
                        sub, sta = _slurm_epoch(submit_time), _slurm_epoch(start_time)
                        if sub is not None and sta is not None and sub <= sta <= time.time() + 1:
                            job.started = time.monotonic() - max(0.0, time.time() - sta)
                            job.submitted = job.started - (sta - sub)
                if state in SLURM_ENDED:
                    self._ended(jid, job, state)
                    changed = True
                elif state != job.state:
                    job.state, changed = state, True
            elif ok:
                # Not listed (MinJobAge passed, or a squeue that ignores -t all): ask scontrol, then sacct.
                if self._ended(jid, job, None):
                    changed = True
        return changed

    def _ended(self, jid: str, job: _SlurmJob, state: str | None) -> bool:
        """Fill in a job's end (state and exit code) from scontrol, else sacct, else the exit status its
        script wrote in the log (a job neither knows any more); False if unknown yet."""
        import re
        import subprocess

        code = None
        unknown = False  # scontrol says there is no such job (any more)
        try:
            r = _slurm_cmd(["scontrol", "-o", "show", "job", jid])
            unknown = r.returncode != 0 and _slurm_unknown_job(r.stderr)
            if r.returncode == 0:
                m = re.search(r"\bJobState=(\S+)", r.stdout)
                e = re.search(r"\bExitCode=(\d+):(\d+)", r.stdout)
                n = re.search(r"\bNodeList=(\S+)", r.stdout)
                if m:
                    state = state or m.group(1)
                if e:
                    code = int(e.group(1)) if int(e.group(2)) == 0 else -int(e.group(2))
                if n and n.group(1) not in ("(null)", ""):
                    job.node = n.group(1)
            elif state is None:
                r = _slurm_cmd(["sacct", "-n", "-P", "-X", "-j", jid, "-o", "State,ExitCode,NodeList"])
                if r.returncode == 0 and r.stdout.strip():
                    st, ec, node = (r.stdout.strip().splitlines()[0].split("|") + ["", "", ""])[:3]
                    state = st.split()[0] if st else None
                    a, _, b = ec.partition(":")
                    if a.isdigit():
                        code = int(a) if b in ("", "0") else -int(b) if b.isdigit() else int(a)
                    job.node = node or job.node
        except (OSError, subprocess.SubprocessError):
            pass
        if state is None and unknown:
            # Purged, and no accounting to ask: its script's last line says how it ended; with no
            # such line (killed before it, or it never ran) how is not known, only that it did.
            status = read_exit_status(job.log_path) if job.log_path else None
            if status is not None:
                state, code = ("COMPLETED" if status == 0 else "FAILED"), exit_code_of_status(status)
            else:
                state = SLURM_GONE
        if state is None or state.rstrip("+") not in SLURM_ENDED:
            return False
        state = state.rstrip("+")
        with self._cond:
            job.exit_code = code
            job.state = state
            if job.started is None:
                job.started = time.monotonic()
        return True


def _slurm_epoch(text: str) -> float | None:
    """Seconds since the epoch of a Slurm time (``2026-12-03T19:50:01``, local time); None for N/A."""
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))
    except (ValueError, OverflowError):
        return None


def _slurm_unknown_job(stderr: str | None) -> bool:
    """Whether a Slurm command's error says the job id is not (or no longer) known to the controller."""
    return "invalid job id" in (stderr or "").lower()


_SLURM_POLLER = _SlurmPoller()


class SlurmRun:
    """A run submitted by :class:`SlurmBackend`: a batch job, followed through the shared poller."""

    backend = "slurm"
    proc = None
    pid = None

    def __init__(self, job_id: str, log_path: str | None = None, adopted: bool = False) -> None:
        self.job_id = job_id
        self.log_path = log_path
        self._job = _SLURM_POLLER.watch(job_id, log_path, adopted)

    @property
    def state(self) -> str | None:
        return self._job.state

    @property
    def node(self) -> str | None:
        return self._job.node

    def _code(self) -> int:
        job = self._job
        if job.exit_code is not None:
            return job.exit_code
        # Slurm did not say (sacct absent, the job long gone): the script's own line in the log.
        status = read_exit_status(self.log_path) if self.log_path else None
        if status is not None:
            return exit_code_of_status(status)
        return 0 if job.state == "COMPLETED" else EXIT_UNKNOWN

    def poll(self) -> int | None:
        return self._code() if self._job.state in SLURM_ENDED else None

    def exited_within(self, timeout: float) -> bool:
        return _SLURM_POLLER.wait_end(self.job_id, timeout)

    def wait(self, timeout: float | None = None) -> int:
        import subprocess

        if not _SLURM_POLLER.wait_end(self.job_id, timeout):
            raise subprocess.TimeoutExpired(f"slurm job {self.job_id}", timeout)  # type: ignore[arg-type]
        return self._code()

    def queued(self) -> float | None:
        """Seconds the job waited in Slurm's queue before it ran; None while it still waits."""
        job = self._job
        return None if job.started is None else max(0.0, job.started - job.submitted)

    def outcome(self) -> tuple[str, str | None] | None:
        """(status, reason) as Slurm tells it, once the job has ended; None before."""
        if self._job.state not in SLURM_ENDED:
            return None
        status, reason = SLURM_OUTCOMES.get(self._job.state, (ERROR, self._job.state.lower()))
        if status == FINISHED and self._code() != 0:
            status = ERROR
        return status, reason

    def terminate(self, grace: float = DEFAULT_KILL_GRACE) -> None:
        SlurmBackend().stop([self], grace)

    def record(self) -> dict[str, Any]:
        return {"backend": self.backend, "job_id": self.job_id, "node": self._job.node, "state": self._job.state}

    def __repr__(self) -> str:
        return f"SlurmRun(job_id={self.job_id!r})"


class SlurmBackend:
    """Runs each command as a Slurm batch job (see the section's comment); the same surface as :class:`LocalBackend`."""

    name = "slurm"
    #: Slurm gives jobs their GPUs (``--gres``): the scheduler keeps no GPU pool of its own.
    allocates_gpus = True

    def __init__(self, options: Mapping[str, Any] | None = None, gpus: int = 0, timeout: float | None = None) -> None:
        self.options = dict(options or {})
        self.gpus = int(gpus or 0)
        self.timeout = timeout

    def for_job(self, options: Mapping[str, Any] | None, gpus: int = 0, timeout: float | None = None) -> SlurmBackend:
        """This backend with one experiment's options (``[experiments.slurm]`` over ``[scheduler.slurm]``)."""
        return SlurmBackend({**self.options, **(options or {})}, gpus, timeout)

    def start(self, launch: Launch) -> SlurmRun:
        """Write the batch script, submit it; ExpError naming Slurm's own message if it cannot be."""
        import re
        import subprocess

        if not launch.script_path:
            raise ExpError("a Slurm run needs a place for its batch script (Launch.script_path)")
        script = slurm_script(launch, self.options, self.gpus, self.timeout)
        try:
            os.makedirs(os.path.dirname(launch.script_path), exist_ok=True)
        except OSError as e:
            raise _storage_error(launch.script_path, e, "create the directory of") from e
        write_atomic(launch.script_path, script.encode("utf-8"), sync=False)
        env = dict(launch.env)
        if self.gpus:
            env.pop(b"CUDA_VISIBLE_DEVICES", None)  # Slurm sets it for the GPUs it gives
        # The identifying options again as arguments: a path with spaces would not survive an #SBATCH line.
        args = ["sbatch", "--parsable", f"--job-name={_slurm_safe(launch.name or 'exp')}",
                f"--comment={_slurm_safe(SLURM_TAG_PREFIX + (launch.tag or ''))}", f"--output={launch.log_path}",
                "--open-mode=append", f"--chdir={launch.cwd}", launch.script_path]
        try:
            r = _slurm_cmd(args, env=env, cwd=launch.cwd, timeout=SBATCH_TIMEOUT)
        except FileNotFoundError:
            raise ExpError("sbatch not found: this machine has no Slurm client. Run exp on a login node of "
                           'the cluster, or use [scheduler] backend = "local"') from None
        except subprocess.TimeoutExpired:
            r = None
        if r is None or r.returncode < 0:
            # sbatch cut short (no answer in 60 s, or a signal): the controller may have taken the
            # job all the same, and a job nobody watches must not run on: look for it by its tag.
            found = self.find(launch.tag or "", launch.log_path) if launch.tag else None
            if found is not None:
                if launch.on_submit is not None:
                    launch.on_submit(found.record())
                _SLURM_POLLER.kick()
                return found
            if r is None:
                raise ExpError(f"sbatch did not answer within {SBATCH_TIMEOUT:g} s and Slurm lists no such job; "
                               "is the Slurm controller up? (squeue says)")
        if r.returncode != 0:
            msg = " ".join((r.stderr or r.stdout).split())[:500] or f"exit status {r.returncode}"
            raise ExpError(f"Slurm refused the job ({msg}); see {launch.script_path}")
        job_id = r.stdout.strip().split(";")[0]
        if not job_id.isdigit() and not re.fullmatch(r"\d+(_\d+)?", job_id):
            raise ExpError(f"sbatch answered {r.stdout.strip()!r}, not a job id")
        run = SlurmRun(job_id, launch.log_path)
        if launch.on_submit is not None:
            launch.on_submit(run.record())
        _SLURM_POLLER.kick()
        return run

    def attach(self, record: Mapping[str, Any]) -> SlurmRun:
        """A run from its :meth:`SlurmRun.record` (a scheduler that restarted adopts its jobs by id)."""
        job_id = record.get("job_id")
        if not isinstance(job_id, str) or not job_id:
            raise ExpError(f"cannot attach to a Slurm run without a job id: {dict(record)!r}")
        return SlurmRun(job_id, record.get("log_path") if isinstance(record.get("log_path"), str) else None,
                        adopted=True)

    def find(self, tag: str, log_path: str | None = None) -> SlurmRun | None:
        """A job submitted for ``tag`` (``<work_dir>:<run_id>``) whose id was never written down (a crash)."""
        import subprocess

        try:
            r = _slurm_cmd(["squeue", "-h", "-t", "all", "-o", "%i|%k"])
        except (OSError, subprocess.SubprocessError):
            return None
        want = SLURM_TAG_PREFIX + tag
        for line in r.stdout.splitlines():
            jid, _, comment = line.partition("|")
            if comment.strip() == want:
                return SlurmRun(jid.strip(), log_path, adopted=True)
        return None

    def stop(self, runs: Iterable[Any], grace: float, idle: Callable[[float], bool] | None = None) -> list[int]:
        """``scancel`` the jobs (SIGTERM, then Slurm's KillWait), wait up to ``grace`` + 30 s for them to end."""
        import subprocess

        runs = [r for r in runs if isinstance(r, SlurmRun)]
        if not runs:
            return []
        try:
            _slurm_cmd(["scancel", *[r.job_id for r in runs]])
        except (OSError, subprocess.SubprocessError):
            pass
        _SLURM_POLLER.kick()
        deadline = time.monotonic() + grace + 30  # Slurm's own KillWait follows its SIGTERM
        killed = False
        while time.monotonic() < deadline:
            pending = [r for r in runs if r.poll() is None]
            if not pending:
                return []
            if idle is None:
                pending[0].exited_within(min(0.5, max(0.0, deadline - time.monotonic())))
            elif idle(0.1):
                if killed:  # a third: stop waiting for ends Slurm does not report
                    break
                killed = True  # a second Ctrl-C: now
                try:
                    _slurm_cmd(["scancel", "--signal=KILL", *[r.job_id for r in pending]])
                except (OSError, subprocess.SubprocessError):
                    pass
        return [int(r.job_id) for r in runs if r.poll() is None and r.job_id.isdigit()]

    def on_change(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (from another thread) when Slurm reports a watched job's state or node
        changed (PENDING to RUNNING, its node known); returns the function that stops that."""
        return _SLURM_POLLER.on_change(callback)

    def release(self, runs: Iterable[Any]) -> None:
        """Stop waiting for these jobs (exp exits while Slurm has not said they ended): their
        ``wait()`` raises TimeoutExpired at once, so nothing records an end that did not happen."""
        _SLURM_POLLER.release(r.job_id for r in runs if isinstance(r, SlurmRun))


def slurm_stats() -> dict[str, int]:
    """Slurm commands this process ran, and polls made (the benchmark reports them)."""
    return {"commands": _SLURM_POLLER.commands, "polls": _SLURM_POLLER.polls}


def make_backend(settings: SchedulerSettings) -> LocalBackend | SlurmBackend:
    """The backend ``[scheduler] backend`` names."""
    if settings.backend == "slurm":
        return SlurmBackend(settings.slurm)
    return LocalBackend()


# ============================================================================
# Experiment and runs
# ============================================================================


def _validate_name(name: Any) -> str:
    import re

    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"name must be a non-empty string such as 'resnet50_lr3e-4', got {name!r}")
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    if any(s in name for s in seps):
        raise ConfigError(
            f"name {name!r} cannot contain a path separator; it becomes a directory name. "
            "Use base_dir for the parent directory and e.g. '-' or '_' inside the name"
        )
    if name.startswith("."):
        raise ConfigError(
            f"name {name!r} starts with '.', which would make a hidden directory that `exp ls` and the "
            "dashboard skip; start it with a letter or a digit"
        )
    # Line and paragraph separators and bidi overrides too: they reorder or split what a terminal shows.
    bad = _REPORT_CONTROL_RE.search(name) or ("\t" in name and re.search("\t", name))
    if bad:
        raise ConfigError(
            f"name {name!r} contains the control character {bad.group()!r}; it becomes a directory name, "
            "so use letters, digits, '-', '_' or '.'"
        )
    if len(_fs_bytes(name, "name")) + _DIR_SUFFIX_BYTES > _NAME_MAX:
        raise ConfigError(
            f"name {name[:40]!r}... is {len(os.fsencode(name))} bytes long; it becomes a directory name with a "
            f"timestamp, which must fit in {_NAME_MAX} bytes: use at most {_NAME_MAX - _DIR_SUFFIX_BYTES} bytes"
        )
    return name


def _validate_command(command: Any) -> str:
    if isinstance(command, (list, tuple)) and command and all(isinstance(c, str) for c in command):
        import shlex

        command = shlex.join(command)
    if not isinstance(command, str) or not command.strip():
        raise ConfigError(
            f"command must be a non-empty shell command string such as 'python train.py', got {command!r}"
        )
    if "\0" in command:
        raise ConfigError(f"command cannot contain a NUL character, got {command!r}")
    _fs_bytes(command, "command")  # what `sh -c` gets
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


# Every Experiment of this process, for the fork handler; weak, so an unused one goes.  Made with
# the first Experiment, which also registers the exit handler (`import exp` stays cheap).
_EXPERIMENTS: weakref.WeakSet[Experiment] | None = None
# Experiments holding values that upd_row() took and no save_row() wrote yet (an ordered set):
# kept alive until then, so that the exit handler saves them.
_UNSAVED: dict[Experiment, None] = {}


def _save_unsaved_rows() -> None:
    """Exit handler: each experiment's values given to upd_row() and never saved become its last row."""
    for e in list(_UNSAVED):
        e._save_at_exit()


def _forget_rows_after_fork() -> None:
    """In a forked child (a DataLoader worker, a raw os.fork()): the parent's unsaved values stay
    the parent's (the child would write them into its own rows), and no lock is held."""
    global _STANDALONE_LOCK
    _STANDALONE_LOCK = threading.Lock()
    _UNSAVED.clear()
    for e in list(_EXPERIMENTS or ()):
        e._lock = threading.Lock()
        e._pending = {}


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_rows_after_fork)


def find_resume_dir(base_dir: str, name: str, resume: Any) -> str:
    """The directory that ``resume`` (a timestamp or a path) names; ConfigError if none."""
    return ExperimentDir.find(base_dir, name, resume)


def _lenient_gpu_ids(value: Any) -> list[int] | None:
    """gpu_ids read back from a metadata file: a bad value reads as unset, not an error."""
    try:
        return parse_gpu_ids(value)
    except ConfigError:
        return None


def _is_same_file(stream: Any, path: str) -> bool:
    """Whether a stream writes to the file at ``path`` (a run's stderr is its log)."""
    try:
        a, b = os.fstat(stream.fileno()), os.stat(path)
    except (OSError, ValueError, AttributeError):
        return False
    return (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)


def _stored_lark(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The secret-free Lark settings kept in metadata.json (``{}`` if none, or unreadable)."""
    stored = meta.get("lark")
    if not isinstance(stored, dict):
        return {}
    try:
        return merge_lark_layers({k: v for k, v in stored.items() if k != "app_secret"})
    except ConfigError:
        return {}


def _stored_env(meta: Mapping[str, Any]) -> dict[str, str | None]:
    """The environment an experiment ran with, less the redacted secrets."""
    stored = meta.get("environment")
    if not isinstance(stored, dict):
        return {}
    return {str(k): str(v) for k, v in stored.items() if v is not None and v != "***"}


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
        backend: what starts the command (default :class:`LocalBackend`).
        write_metadata: False leaves ``metadata.json`` to the first
            :meth:`start` (status ``running`` at once, still before the command
            runs): the scheduler saves a rewrite per experiment this way.

    The directory exists, and (by default) ``metadata.json`` with status
    ``pending``, as soon as the constructor returns.
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
        backend: LocalBackend | None = None,
        write_metadata: bool = True,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = _validate_name(name)
        self.command = _validate_command(command)
        try:  # relative paths and the default cwd need it
            if not all(p is not None and os.path.isabs(os.fspath(p)) for p in (cwd, base_dir)):
                os.getcwd()
        except FileNotFoundError:
            raise ConfigError("the current directory no longer exists (deleted since this process entered it): "
                              "change to an existing directory, or pass an absolute base_dir and cwd") from None
        tags_v = _validate_tags(tags)
        gpus_v = parse_gpu_ids(gpu_ids)
        if description is not None and not isinstance(description, str):
            raise ConfigError(f"description must be a string, got {type(description).__name__}")
        if cwd is not None:
            cwd = os.path.abspath(os.fspath(cwd))
            if not os.path.isdir(cwd):
                raise ConfigError(f"cwd {cwd!r} is not an existing directory; pass the directory to run the command in")
        self.env = _validate_env(env)
        import collections.abc  # Mapping is imported for type checking only

        if params is not None and not isinstance(params, collections.abc.Mapping):
            raise ConfigError(f"params must be a dict of names to values, got {type(params).__name__}")
        self.params: dict[str, Any] = dict(params or {})
        self.lark_config = lark_config
        # Checked now (a typo is a ConfigError before anything runs); only
        # its secret-free part is ever written (metadata.json "lark").
        self._lark: dict[str, Any] = merge_lark_layers(lark_config)
        self.backend = backend or LocalBackend()
        if base_dir is None:
            base_dir = DEFAULT_BASE_DIR
        self.base_dir = os.path.abspath(os.fspath(base_dir))
        self.status = PENDING
        self.current_run_id: str | None = None
        self._init_rows()

        if resume is not None:
            work_dir = ExperimentDir.find(self.base_dir, self.name, resume)
            self.dir = ExperimentDir(work_dir)
            meta = self.dir.read_metadata()
            self.timestamp = meta.get("timestamp_dir") or self.dir.timestamp(self.name)
            self.tags = tags_v if tags_v is not None else [t for t in meta.get("tags") or [] if isinstance(t, str)]
            self.gpu_ids = gpus_v if gpus_v is not None else _lenient_gpu_ids(meta.get("gpu_ids"))
            # The earlier project ran in the experiment directory when cwd was unset.
            self.cwd = cwd if cwd is not None else (meta.get("cwd") or work_dir)
            self.description = description if description is not None else meta.get("description")
            if params is None and isinstance(meta.get("params"), dict):
                self.params = dict(meta["params"])
            if env is None:  # keep the variables it ran with, except redacted secrets
                self.env = _stored_env(meta)
            if lark_config is None:
                self._lark = _stored_lark(meta)
            self.current_run_id = meta.get("current_run_id")
            self.repeat = meta["repeat"] if _is_int(meta.get("repeat")) else None
            self.created_at = (meta.get("created_at") or iso_from_old_timestamp(meta.get("timestamp"))
                               or now_iso())

            def update(m: dict[str, Any]) -> None:
                # Directories of the earlier project lack the newer fields, and
                # may hold its lark_config (secrets): fill in, and drop that.
                upgrade_metadata(m, self._initial_metadata(), self.dir.runs())
                m.update(self._static_fields())
                m.update(created_at=self.created_at, status=PENDING, pid=None)

            self._update(update)
        else:
            check_experiment_path(self.base_dir, self.name)
            self.tags = tags_v or []
            self.gpu_ids = gpus_v
            self.cwd = cwd if cwd is not None else os.getcwd()
            self.description = description
            self.created_at = now_iso()
            try:
                self.dir, self.timestamp = ExperimentDir.create(self.base_dir, self.name)
            except OSError as e:
                raise _storage_error(self.base_dir, e, "create an experiment directory in") from e
            if write_metadata:
                try:
                    self.dir.write_metadata(self._initial_metadata())
                except BaseException:
                    self.dir.close()
                    raise

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, work_dir: str | os.PathLike[str]) -> Experiment:
        """Rebuild an Experiment from its directory (reads ``metadata.json``)."""
        d = ExperimentDir(work_dir)
        meta = upgrade_metadata(d.read_metadata(), {})
        self = cls.__new__(cls)
        self.dir = d
        self.base_dir = os.path.dirname(d.path)
        name, command = meta.get("name"), meta.get("command")
        self.name = name if isinstance(name, str) else _name_from_dir(os.path.basename(d.path))
        self.command = command if isinstance(command, str) else ""
        self.tags = [t for t in meta.get("tags") or [] if isinstance(t, str)] if isinstance(meta.get("tags"), list) else []
        self.gpu_ids = _lenient_gpu_ids(meta.get("gpu_ids"))
        cwd = meta.get("cwd")
        self.cwd = cwd if isinstance(cwd, str) and cwd else d.path  # the earlier project ran in work_dir
        description = meta.get("description")
        self.description = description if isinstance(description, str) else None
        status = meta.get("status")
        self.status = status if isinstance(status, str) else PENDING
        rid = meta.get("current_run_id")
        self.current_run_id = rid if isinstance(rid, str) else None
        self.timestamp = meta.get("timestamp_dir") or d.timestamp(self.name)
        self.created_at = meta.get("created_at") or iso_from_old_timestamp(meta.get("timestamp"))
        self.env = _stored_env(meta)
        self.params = dict(meta["params"]) if isinstance(meta.get("params"), dict) else {}
        self.repeat = meta["repeat"] if _is_int(meta.get("repeat")) else None
        self.lark_config = None
        self._lark = _stored_lark(meta)
        self.backend = LocalBackend()
        self._init_rows()
        return self

    #: The earlier project's name for :meth:`load`.
    load_from_dir = load

    def __getstate__(self) -> dict[str, Any]:
        """For a copy in another process (a DataLoader worker started with spawn, whose Dataset
        holds the experiment): its own metrics writer, opened at its first row, and no pending values
        (rows are per process: this process saves its own)."""
        state = dict(self.__dict__)
        state.pop("_lock", None)
        state.update(_writer=None, _writer_run=None, _pending={}, _ok_keys=set())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_rows()

    def _init_rows(self) -> None:
        """The row being built and the CSV writer, which belong to this process: a forked child
        starts with none of them (:func:`_forget_rows_after_fork`)."""
        self._lock = threading.Lock()  # upd_row and save_row from several threads
        self._pending: dict[str, str] = {}
        self._ok_keys: set[str] = set()
        self._writer: MetricsWriter | None = None
        self._writer_run: str | None = None
        global _EXPERIMENTS
        if _EXPERIMENTS is None:
            import atexit
            import weakref

            _EXPERIMENTS = weakref.WeakSet()
            atexit.register(_save_unsaved_rows)
        _EXPERIMENTS.add(self)

    # ------------------------------------------------------------------ metadata

    #: Which repeat of a batch task this experiment is (1-based, as ``EXPERIMENT_REPEAT``); set
    #: by the scheduler and kept in metadata.json as ``repeat``; None outside a batch.
    repeat: int | None = None

    @property
    def work_dir(self) -> str:
        """The experiment's directory (a :class:`PathText`: a str that also joins with ``/``)."""
        return PathText(self.dir.path)

    @property
    def metadata_path(self) -> str:
        return PathText(self.dir.metadata_path)

    def read_metadata(self) -> dict[str, Any]:
        """The current contents of ``metadata.json`` (MetadataError if it cannot be read)."""
        return self.dir.read_metadata()

    def _static_fields(self) -> dict[str, Any]:
        fields = {
            "name": self.name,
            "command": self.command,
            "tags": self.tags,
            "description": self.description,
            "gpu_ids": self.gpu_ids,
            "cwd": self.cwd,
            "environment": redact_env(self.env),
            "params": self.params,
            "lark": lark_public(self._lark),
        }
        if self.repeat is not None:
            # Which seed this directory holds: recovery and --resume match repeats by it.
            fields["repeat"] = self.repeat
        return fields

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

    def _warn(self, message: str, kind: str = "warning") -> None:
        """Say something the user must know but that must not stop the run: stderr and the run's log."""
        if not (self.current_run_id and _is_same_file(sys.stderr, self.dir.log_path(self.current_run_id))):
            try:  # (a run's own stderr is that log)
                print(f"exp: {kind}: {message}", file=sys.stderr, flush=True)
            except (OSError, ValueError, AttributeError):  # stderr closed, or None
                pass
        if self.current_run_id:
            try:
                self.dir.append_log(self.current_run_id, f"{kind}: {message}")
            except OSError:
                pass

    def _update(self, fn: Callable[[dict[str, Any]], None]) -> None:
        try:
            self.dir.update_metadata(fn, self._initial_metadata)
        except MetadataError as e:  # kept aside and rewritten: say so, and go on
            self._warn(str(e))

    # ------------------------------------------------------------------ paths

    def log_path(self, run_id: int | str | None = None) -> str:
        """Path of a run's log (default: the current run), a :class:`PathText`."""
        return PathText(self.dir.log_path(run_id_str(run_id) if run_id is not None else self._require_run()))

    def metrics_file(self, run_id: int | str | None = None) -> str:
        """Path of a run's metrics CSV (default: the current run), a :class:`PathText`."""
        return PathText(self.dir.metrics_path(run_id_str(run_id) if run_id is not None else self._require_run()))

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
        return self.dir.runs()

    # Names the earlier project's users call.
    def get_log_file_path(self, run_id: str | None = None) -> str:
        return self.log_path(run_id)

    def get_metrics_file_path(self) -> str:
        return self.metrics_path

    def get_all_runs(self) -> list[str]:
        return self.runs()

    def read_log(self, run_id: int | str | None = None) -> str:
        """The whole text of a run's log ('' if it has none yet).  For the end only, use get_log_tail."""
        try:
            with open(self.log_path(run_id), encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def get_log_tail(self, lines: int = 50, run_id: int | str | None = None) -> str:
        """The last ``lines`` lines of a run's log, read from its end (cheap on a huge log)."""
        return self.dir.tail_log(run_id_str(run_id) if run_id is not None else self._require_run(), lines)

    def append_log(self, message: str, run_id: int | str | None = None) -> None:
        """Write an exp-marked line into a run's log."""
        self.dir.append_log(run_id_str(run_id) if run_id is not None else self._require_run(), message)

    # ------------------------------------------------------------------ metrics

    def upd_row(self, /, **metrics: Any) -> None:
        """Add values to the row being built; a later value for a key replaces the earlier.

        Raises MetricError (a TypeError, naming the key) for a value that cannot go in a CSV,
        and ConfigError (a ValueError) for an empty name or one with a line break.  A call
        that raises adds nothing, not even its valid values.
        """
        ok = self._ok_keys
        cells = {}
        for key, value in metrics.items():
            if key not in ok:
                _check_metric_name(key)
            cells[key] = format_metric(key, value)
        with self._lock:
            ok.update(cells)
            pending = self._pending
            if not pending:
                _UNSAVED[self] = None  # saved at exit if no save_row() comes
            pending.update(cells)

    def save_row(self, *, lark: bool = False, lark_config: Any = None) -> None:
        """Append the row built by :meth:`upd_row` to the current run's CSV.

        With nothing pending this does nothing and notes it in the run's log.
        A row that cannot be written (a full disk) raises :class:`StorageError`
        and stays pending, so the next ``save_row()`` writes it with any new
        values.

        ``lark=True`` also queues the row for the Lark/Feishu table of the
        experiment's ``lark_config`` (``lark_config`` here overrides it, key
        by key): it goes into the run's outbox on disk, and a background
        thread sends it; this call never waits on the network.  Settings that
        are incomplete are one warning in the run's log, and the rows wait in
        the outbox for ``exp lark-sync``.
        """
        rid = self._require_run()
        with self._lock:
            if not self._pending:
                try:
                    self.dir.append_log(rid, "warning: save_row() called with no values; call upd_row(...) first")
                except OSError:
                    pass
                return
            self._save_pending(rid, lark, lark_config)

    def _save_pending(self, rid: str, lark: bool = False, lark_config: Any = None) -> None:
        """save_row() with ``self._lock`` held and values pending."""
        writer = self._writer
        if self._writer_run != rid or writer is None:
            if writer is not None:
                writer.close()
            writer = self._writer = MetricsWriter(self.dir.metrics_path(rid))
            self._writer_run = rid
        if lark:
            settings = self._lark_settings(lark_config)  # a bad option: ConfigError, before anything is written
        row = self._pending
        try:
            writer._write(row)
        except MetricError:  # this row can never be written (see MetricsWriter): not kept to fail again
            self._pending = {}
            _UNSAVED.pop(self, None)
            raise
        self._pending = {}
        _UNSAVED.pop(self, None)
        if lark:
            self._lark_queue(rid, row, settings)

    def _save_at_exit(self) -> None:
        """At interpreter exit: values given to upd_row() after the last save_row() become a last row."""
        # A daemon thread stopped inside save_row() at exit would hold the lock for ever.
        if not self._lock.acquire(timeout=EXIT_SAVE_TIMEOUT):
            self._warn(f"the values given to upd_row() after the last save_row() were not saved at exit: another "
                       f"thread held experiment {self.name!r} for {EXIT_SAVE_TIMEOUT:g} s")
            return
        try:
            _UNSAVED.pop(self, None)
            if not self._pending:
                return
            keys = list(self._pending)
            names = ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
            what = f"the values given to upd_row() after the last save_row() ({names})"
            rid = self.current_run_id
            if not rid:
                self._warn(f"{what} were not saved at exit: experiment {self.name!r} has no run to save them in")
                return
            try:
                self._save_pending(rid)
            except Exception as e:  # noqa: BLE001 - said, never raised into the interpreter's exit
                self._warn(f"{what} could not be saved at exit: {e}")
                return
            self._warn(f"{what} were saved at exit as a last row of {rid} "
                       f"({self.dir.metrics_path(rid)}); call save_row() to save them yourself", kind="note")
        finally:
            self._lock.release()

    def _lark_settings(self, lark_config: Any) -> dict[str, Any]:
        key = None if lark_config is None else repr(lark_config)
        # A few kinds of call (save_row(lark=True) with and without its own lark_config) take turns.
        cache = self.__dict__.setdefault("_lark_cache", {})
        settings = cache.get(key)
        if settings is None:
            if len(cache) >= 8:
                cache.clear()
            settings = cache[key] = lark_settings(self._lark, lark_config)
        return settings

    def _lark_queue(self, rid: str, row: Mapping[str, str], settings: Mapping[str, Any]) -> None:
        """Put a saved row into the run's outbox and wake its sender; never raises for the network."""
        outbox = self.__dict__.get("_outbox")
        if outbox is None or outbox.path != self.dir.lark_outbox_path(rid):
            if outbox is not None:
                outbox.close()
            outbox = self._outbox = _Outbox(self.dir.lark_outbox_path(rid))
        queued = _lark_row(row)
        extra = settings.get("extra_fields") or {}
        if extra and extra != (self._lark_settings(None).get("extra_fields") or {}):
            # This call's own extra_fields (save_row(lark_config={"extra_fields": ...})) go with this
            # row, filled in now; the row's own values still win.
            queued = {**_fill_extra_fields(extra, self.name, rid, _hostname(), self.work_dir), **queued}
        try:
            outbox.append([queued])
        except OSError as e:
            self._warn_once(f"lark: row not queued for Lark ({e}); it is in the CSV")
            return
        missing = lark_missing(settings)
        if missing:
            self._warn_once(f"lark: settings lack {', '.join(missing)}, so rows are not sent; they are kept in "
                            f"{self.dir.lark_outbox_path(rid)}. To send them, {_LARK_HOWTO}, then run: "
                            f"python exp.py lark-sync {self.work_dir}")
            return
        try:
            sender = _lark_sender(self.dir, rid, settings, self.name, self._warn)
        except ExpError as e:
            self._warn_once(f"lark: {e}")
            return
        first = {k: v for k, v in sender.sync.settings.items() if k != "extra_fields"}
        if first != {k: v for k, v in settings.items() if k != "extra_fields"}:
            self._warn_once("lark: save_row(lark_config=...) changed settings other than extra_fields during the "
                            "run; they are not taken: one run's rows all go to the table, in the mode, its first "
                            "save_row(lark=True) named (a row's own extra_fields are taken)")
        sender.notify()

    def _warn_once(self, message: str) -> None:
        said = self.__dict__.setdefault("_warned", set())
        if message not in said:
            said.add(message)
            self._warn(message)

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
        KeyboardInterrupt.  Background: return a :class:`RunHandle` at once;
        a thread of this process records the run's end.
        """
        handle = self.start(extra_env)
        try:
            handle.record_pid()
        except OSError as e:  # the end still gets recorded; say why the pid is missing
            self._warn(f"could not record the pid of {handle.run_id}: {e}")
        threading.Thread(target=handle._watch, name=f"exp-watch-{handle.run_id}", daemon=True).start()
        if background:
            return handle
        # SIGTERM (timeout(1), docker stop, a cluster's scheduler) stops the run
        # the way Ctrl-C does, instead of leaving it orphaned and "running".
        with _InterruptOnSignals(keep_sigint_handler=True):
            return handle._follow(grace)

    def child_env(self, run_id: str, extra_env: Mapping[str, str | None] | None = None) -> dict[bytes, bytes]:
        """The environment a run's command gets (bytes, as Popen takes it on POSIX)."""
        updates: dict[str, str | None] = {STANDALONE_ENV: None}
        if self.gpu_ids:
            updates["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in self.gpu_ids)
            if "CUDA_DEVICE_ORDER" not in os.environ:
                # nvidia-smi numbers GPUs in PCI bus order; CUDA's default is fastest first,
                # which on a box of mixed GPUs would give a run another card than its ids.
                updates["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        updates.update(EXPERIMENT_WORK_DIR=self.work_dir, EXPERIMENT_NAME=self.name,
                       EXPERIMENT_RUN_ID=run_id, EXPERIMENT_REPEAT=str(self.repeat or 1), PYTHONUNBUFFERED="1")
        updates.update(self.env)
        # The app's credentials reach the command through its environment only.
        for key, names in _LARK_ENV.items():
            if self._lark.get(key):
                updates[names[0]] = str(self._lark[key])
        updates.update(_validate_env(extra_env, "extra_env"))
        # os.environ keeps the environment as bytes in ``_data``: copying that is
        # a plain dict copy, where dict(os.environ) decodes every variable, which
        # shows when a batch starts hundreds of short experiments.
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

    def start(self, extra_env: Mapping[str, str | None] | None = None, *,
              before_spawn: Callable[[], Any] | None = None) -> RunHandle:
        """Start the next run and return its handle, without waiting or following.

        ``before_spawn`` is called once the run's files are ready, just before
        the command is started (a scheduler starting several at once keeps
        their commands in dispatch order with it).

        ``metadata.json`` says ``running`` (this run, its id) before the
        command starts, so a command that reads it finds itself.  The pid is
        recorded by :meth:`RunHandle.record_pid` or, once the command has run
        :data:`PID_RECORD_DELAY` seconds, by :meth:`RunHandle.wait`.  Someone
        must call ``wait()`` for the end to be recorded (``run()`` does).
        A run that cannot start is recorded as an ``error`` and raises ExpError.
        """
        require_posix()
        env_extra = _validate_env(extra_env, "extra_env")
        command = add_conda_no_capture(self.command)
        started = now_iso()
        t0 = time.time()

        def header(rid: str) -> str:
            # metadata.json keeps the command as it ran; the log, which is shown and shared, hides its secrets.
            lines = [f"{started} {rid} of {self.name!r} starting", f"command: {redact_command(command)}",
                     f"cwd: {self.cwd}",
                     f"work_dir: {self.work_dir}"]
            if self.gpu_ids:
                lines.append("CUDA_VISIBLE_DEVICES=" + ",".join(str(g) for g in self.gpu_ids))
            return "".join(f"{LOG_MARK} {ln}\n" for ln in lines)

        try:
            rid, log_path = self.dir.claim_run(header)
        except Exception as e:
            self._record_unstartable(None, e)
            raise ExpError(f"could not start a run of {self.name!r} in {self.work_dir}: {e}") from e
        self.current_run_id = rid
        try:
            self._record_start(rid, started, None)
            launch = Launch(command, self.cwd, self.child_env(rid, env_extra), log_path, self.name,
                            supervise=True, recorder=record_end_command(self.work_dir, rid),
                            script_path=self.dir.slurm_script_path(rid), tag=f"{self.work_dir}:{rid}",
                            on_submit=lambda record: self.dir.record_backend(rid, record))
            if before_spawn is not None:
                before_spawn()
            run = self.backend.start(launch)
        except Exception as e:  # disk full, cwd vanished, no /bin/sh, no memory, ...
            err = e if isinstance(e, ExpError) else ExpError(
                f"could not start {command!r} in {self.cwd!r}: {type(e).__name__}: {e}")
            try:
                self.dir.append_log(rid, str(err))
            except OSError:
                pass
            self._record_unstartable(rid, err)
            if err is e:
                raise
            raise err from e
        return RunHandle(self, run, rid, log_path, started, t0)

    def _record_start(self, rid: str, started: str, pid: int | None) -> None:
        self.status = RUNNING
        fields = self._static_fields()
        git = git_info(self.cwd) if os.path.isdir(self.cwd) else None
        if git and git.get("dirty"):
            # What the code was, beyond the commit: the page's "what changed" shows it.
            diff = git_code_diff(self.cwd)
            if diff is not None:
                try:
                    self.dir.write_code_diff(diff)
                    git = dict(git, code_diff=CODE_DIFF_FILE)
                except StorageError as e:
                    self._warn(f"{CODE_DIFF_FILE} not saved: {e}")
        fields.update(exp_version=__version__, git=git)
        try:
            self.dir.record_start(rid, started, pid, fields, self._initial_metadata)
        except MetadataError as e:  # kept aside and rewritten: say so, and go on
            self._warn(str(e))

    def _record_end(self, rid: str, t0: float, code: int | None, status: str, pid: int | None = None,
                    reason: str | None = None, signalled: bool = False, sync: bool = True) -> str | None:
        """Record a run's end; return its reason (see :meth:`ExperimentDir.record_end`)."""
        self.status = status
        try:
            return self.dir.record_end(rid, exit_code=code, status=status, duration=round(time.time() - t0, 3),
                                       pid=pid, reason=reason, signalled=signalled, initial=self._initial_metadata,
                                       sync=sync)
        except MetadataError as e:
            self._warn(str(e))
            return reason
        finally:
            if self._lark.get("mode") == "summary":
                self._lark_summary_end(rid, status)
            elif not self.__dict__.get("_in_process"):
                self._lark_after_run(rid)

    def _lark_after_run(self, rid: str) -> None:
        """Rows a run left in its outbox (killed mid-sync): send them from here, or say how."""
        if not os.path.exists(self.dir.lark_outbox_path(rid)):
            return
        pending = lark_pending(self.dir, rid)
        if not pending:
            return
        settings = lark_settings(self._lark)
        hint = f"python exp.py lark-sync {self.work_dir}"
        if lark_missing(settings):
            self._warn(f"lark: {pending} row{'s' if pending != 1 else ''} of {rid} not sent to Lark; they are kept "
                       f"in {self.dir.lark_outbox_path(rid)}; send them with: {hint}")
            return
        wait = max(30.0, float(settings.get("flush_timeout", 10.0)))

        def send() -> None:
            try:
                _, left = LarkSync(self.dir, settings, warn=self._warn,
                                   context=self._lark_context()).drain([rid], time.time() + wait)
            except Exception as e:  # noqa: BLE001 - reported, never raised into the run's end
                left = lark_pending(self.dir, rid)
                self._warn(f"lark: {e}")
            if left:
                self._warn(f"lark: {left} row{'s' if left != 1 else ''} of {rid} not sent to Lark; they are kept in "
                           f"{self.dir.lark_outbox_path(rid)}; send them with: {hint}")

        _lark_in_background(send, f"exp-lark-after-{rid}", wait)

    def _lark_context(self) -> dict[str, Any]:
        """What ``{name}``, ``{host}`` and ``{cwd}`` in extra_fields become when this process sends a run's
        rows for it (the run's own process gave the same): the host the run ran on."""
        meta, _ = self.dir.try_read_metadata()
        host = (meta or {}).get("hostname")
        return {"name": self.name, "host": host if isinstance(host, str) and host else _hostname(), "cwd": self.cwd}

    def _lark_summary_end(self, rid: str, status: str) -> None:
        """Summary mode: the run's record gets its final status and duration, from a thread."""
        settings = lark_settings(self._lark)
        if lark_missing(settings):
            return

        def send() -> None:
            try:
                LarkSync(self.dir, settings, warn=self._warn, context=self._lark_context()).summary_update(rid, status)
            except Exception as e:  # noqa: BLE001 - reported, never raised into the run's end
                self._warn(f"lark: the summary record of {rid} was not updated: {e}")

        # In-process, this process is ending: no later exit handler would wait for the thread.
        _lark_in_background(send, f"exp-lark-end-{rid}", float(settings.get("flush_timeout", 10.0)),
                            join=bool(self.__dict__.get("_in_process")))

    def _record_unstartable(self, rid: str | None, e: BaseException) -> None:
        """A start failed: the metadata says so (status error), even if it was never written."""
        self.status = ERROR
        error = str(e) if isinstance(e, ExpError) and str(e).startswith("could not start") else (
            f"could not start: {type(e).__name__}: {e}")

        def update(m: dict[str, Any]) -> None:
            m.update(self._static_fields())
            m.update(status=ERROR, error=error, pid=None)

        try:
            if rid is None:
                self._update(update)
            else:
                self.dir.record_end(rid, exit_code=127, status=ERROR, duration=0.0, error=error,
                                    initial=self._initial_metadata)
        except (OSError, ExpError):
            pass  # the caller raises the start's own error
        finally:
            self.dir.close()

    def _start_in_process(self) -> None:
        """Make the calling process itself this experiment's current run (standalone mode)."""
        import atexit
        import shlex

        started = now_iso()
        t0 = time.time()
        command = shlex.join([sys.executable] + sys.argv)
        rid, _ = self.dir.claim_run(lambda rid: (
            f"{LOG_MARK} {started} standalone run {rid}: {redact_command(command)} (pid {os.getpid()}); "
            "its output is not captured here\n"))
        self.current_run_id = rid
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
            code = 0 if arg is None else (int(arg) if isinstance(arg, int) else 1)  # sys.exit(False) is 0
            state.update(code=code, status=FINISHED if code == 0 else ERROR)
            prev_exit(arg)

        sys.excepthook = hook
        sys.exit = exit_  # type: ignore[assignment]
        self._watch_sigterm(state)

        self._in_process = True
        owner = os.getpid()

        def finish() -> None:
            # A child forked by the script (os.fork(), a fork-started worker) runs the exit
            # handlers of its parent when it ends with sys.exit(): the run is the parent's.
            if os.getpid() != owner:
                return
            self._save_at_exit()  # before the end is recorded (exit handlers run last-registered first)
            try:
                self._record_end(rid, t0, state["code"], state["status"])
            except OSError as e:
                print(f"exp: warning: could not record the end of {rid} in {self.work_dir}: {e}", file=sys.stderr)

        atexit.register(finish)

    @staticmethod
    def _watch_sigterm(state: dict[str, Any]) -> None:
        """Standalone: SIGTERM (timeout(1), Slurm, a preemption) ends the script the way Ctrl-C
        does, so it unwinds (its ``finally`` blocks run) and the exit handler records ``killed``,
        where the default action would leave it ``running`` for ever.  The exit status is 143,
        as a shell reports a SIGTERM.  Only where the script has no SIGTERM handler of its own;
        a forked worker (a DataLoader's) still just dies of it."""
        import signal

        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return
        owner = os.getpid()

        def on_sigterm(signum: int, frame: Any) -> None:
            if os.getpid() != owner:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second one ends it at once
            state.update(code=128 + signal.SIGTERM, status=KILLED)
            raise SystemExit(128 + signal.SIGTERM)

        signal.signal(signal.SIGTERM, on_sigterm)

    def __repr__(self) -> str:
        return f"Experiment(name={self.name!r}, work_dir={self.work_dir!r}, status={self.status!r})"


class RunHandle:
    """A started run of an :class:`Experiment`: wait for it, poll it, stop it.

    The first :meth:`wait` (from any thread) reaps the command and records its
    end (status, exit code, duration) in metadata.json and the log; other
    waiters get the same result.  ``run(background=True)`` starts a thread
    that does this, so the end is recorded whether or not anyone waits.  If
    the managing process exits first the command goes on, and metadata keeps
    status ``running``.
    """

    def __init__(self, experiment: Experiment, run: LocalRun | SlurmRun, run_id: str, log_path: str,
                 started_at: str, t0: float) -> None:
        self.experiment = experiment
        self.run = run
        self.run_id = run_id
        self.log_path = log_path
        self.pid = run.pid
        self.started_at = started_at
        self.returncode: int | None = None
        self.status = RUNNING
        #: Why the end could not be written to metadata.json (a full disk), else None.
        self.record_error: BaseException | None = None
        self._t0 = t0
        self._sync_end = True
        self._stop_requested = False
        self._stop_reason: str | None = None
        self._stop_status = KILLED
        self._signalled = False  # exp sent (or will send) signals to the group
        #: Why the run ended, once it has: "exit code 3", "timeout", "signal SIGKILL", ...
        self.reason: str | None = None
        self._pid_recorded = False
        self._reaper = threading.Lock()
        self._done = threading.Event()

    def record_pid(self) -> None:
        """Write the run's pid into metadata.json now (once; later calls do nothing)."""
        if not self._pid_recorded:
            self._pid_recorded = True
            if self.pid is None:  # a batch job: its id was recorded at submission
                return
            ticks = self.run.record().get("start_ticks") if self.run.proc is not None else None
            self.experiment.dir.record_pid(self.run_id, self.pid, ticks)

    def poll(self) -> int | None:
        """The exit code if the run has ended (and its end been recorded), else None."""
        if self._done.is_set():
            return self.returncode
        if self.run.poll() is not None and self._reaper.acquire(blocking=False):
            try:
                if not self._done.is_set():
                    self._finish(self.run.wait())
            finally:
                self._reaper.release()
        return self.returncode if self._done.is_set() else None

    def wait(self, timeout: float | None = None, *, sync: bool = True) -> int:
        """Wait for the run to end and its end to be recorded; return the exit code
        (:data:`EXIT_UNKNOWN` for a run attached from its record whose status nobody wrote down).

        Raises ``subprocess.TimeoutExpired`` after ``timeout`` seconds, and
        :class:`StorageError` (after the exit code is known: see
        ``returncode``) when the end could not be written to metadata.json.
        ``sync=False``: the end is written but not fsynced; the caller calls
        :meth:`sync_end` (a scheduler, once it has moved on).
        """
        import subprocess

        self._sync_end = sync
        if not self._done.is_set():
            if not self._reaper.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
                raise subprocess.TimeoutExpired(self.experiment.command, timeout)  # type: ignore[arg-type]
            try:
                if not self._done.is_set():
                    self._reap(timeout)
            finally:
                self._reaper.release()
            if self.record_error is not None:
                raise self.record_error
        if not self._done.wait(timeout):
            raise subprocess.TimeoutExpired(self.experiment.command, timeout)  # type: ignore[arg-type]
        # None only for a run attached from its record (another process started it) that
        # ended with no status anyone wrote down: its supervisor was killed with it.
        return self.returncode if self.returncode is not None else EXIT_UNKNOWN

    def _reap(self, timeout: float | None) -> None:
        """Under the reaper lock: record the pid if the run lasts, wait for it, record its end."""
        if not self._pid_recorded:
            delay = PID_RECORD_DELAY if timeout is None else min(PID_RECORD_DELAY, timeout)
            if not self.run.exited_within(delay):
                try:
                    self.record_pid()
                except (OSError, ExpError):  # e.g. a full disk: the end still gets recorded
                    pass
                if self.run.proc is not None and self.pid is not None:
                    # Who is in the run's group (the command under its supervisor): if the
                    # OOM killer takes one of them, the kernel log names that pid.
                    group_members(self.pid)
        try:
            code: int | None = self.run.wait(timeout)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # TimeoutExpired goes to the caller; nothing else is expected
            import subprocess

            if isinstance(e, subprocess.TimeoutExpired):
                raise
            code = None
        self._finish(code)

    def _finish(self, code: int | None) -> None:
        if code == EXIT_UNKNOWN:  # an adopted run: its supervisor knows how it ended
            entry = self.experiment.dir.run_entry(self.run_id)
            if entry is not None and entry.get("ended_at"):  # and has recorded it (exp was gone then)
                ended = entry.get("exit_code")
                self.returncode = ended if _is_int(ended) else None
                if self._stop_requested:
                    # A stop this exp asked for (its supervisor, started by a
                    # scheduler now dead, recorded a plain end): recorded again
                    # below as exp's stop ("terminated by user", "timeout").
                    code = self.returncode
                else:
                    st = entry.get("status")
                    self.status = st if isinstance(st, str) and st in STATUSES else ERROR
                    self.reason = entry.get("reason") if isinstance(entry.get("reason"), str) else None
                    self.experiment.status = self.status
                    self._done.set()
                    return
            else:
                status_code = read_exit_status(self.log_path)
                code = None if status_code is None else exit_code_of_status(status_code)
        outcome = self.run.outcome()
        if self._stop_requested:
            status, reason = self._stop_status, self._stop_reason
        elif outcome is not None:  # what the cluster says: a time limit, out of memory, a node failure
            status, reason = outcome
        else:
            status, reason = (FINISHED if code == 0 else ERROR), None
        if outcome is not None:
            try:
                self.experiment.dir.record_backend(self.run_id, self.run.record())
            except (OSError, ExpError):
                pass
        try:
            self.reason = self.experiment._record_end(self.run_id, self._t0, code, status, self.pid, reason,
                                                      signalled=self._signalled, sync=self._sync_end)
        except Exception as e:  # noqa: BLE001 - a full disk: the run still ended
            self.record_error = e
            self.reason = reason
        finally:
            self.returncode, self.status = code, status
            self._done.set()

    def settle(self) -> None:
        """For an adopted run that has already ended: take the end its supervisor recorded, or record it."""
        if not self._done.is_set():
            self._finish(EXIT_UNKNOWN)

    def _watch(self) -> None:
        """The background thread of ``run()``: wait, and say so if the end cannot be recorded."""
        try:
            self.wait()
        except Exception as e:  # noqa: BLE001 - a daemon thread: no traceback, but not silent
            print(f"exp: warning: the end of {self.run_id} of {self.experiment.name!r} could not be "
                  f"recorded in {self.experiment.work_dir}: {e}", file=sys.stderr)

    def sync_end(self) -> None:
        """fsync the recorded end (after ``wait(sync=False)``); StorageError on failure."""
        self.experiment.dir.sync_metadata()

    def request_stop(self, reason: str = "terminated by user", status: str = KILLED) -> None:
        """Mark the run as stopped by exp: however it ends now, it is recorded with ``status`` and ``reason``.

        A timeout, say, is ``request_stop("timeout", ERROR)``; the first request wins.
        """
        if not self._stop_requested:
            self._stop_requested = True
            self._stop_reason, self._stop_status = reason, status
        self._signalled = True

    def terminate(self, grace: float = DEFAULT_KILL_GRACE) -> int:
        """Stop the command and everything it started; return its exit code.

        SIGTERM goes to the whole process group; whatever is still alive after
        ``grace`` seconds gets SIGKILL.  The run is recorded as ``killed``.
        """
        if self._done.is_set():
            return self.returncode  # type: ignore[return-value]
        terminate_runs([self], grace)
        return self.wait()

    def kill(self) -> int:
        """Stop at once: SIGTERM and, with no grace period, SIGKILL to the whole process group."""
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
        echo = [sys.stdout is not None]  # None: started with stdout closed (``>&-``)

        def emit(chunk: bytes) -> None:
            if not echo[0]:
                return
            try:
                if out is not None:
                    out.write(chunk)
                else:
                    sys.stdout.write(decoder.decode(chunk))
                sys.stdout.flush()
            except (OSError, ValueError, AttributeError):  # broken pipe, closed stream
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


def terminate_runs(handles: Iterable[RunHandle], grace: float = DEFAULT_KILL_GRACE,
                   idle: Callable[[float], bool] | None = None) -> list[int]:
    """Stop many runs under one grace period: SIGTERM now, SIGKILL to what is left after ``grace``.

    Each is recorded ``killed`` by whoever waits for it.  ``idle(seconds)`` is
    called while waiting (see :func:`stop_groups`).  Returns the process
    groups still alive at the end (normally none).
    """
    by_backend: dict[type, tuple[Any, list[Any]]] = {}
    for h in handles:
        h.request_stop()
        backend = h.experiment.backend
        # One call per kind of backend: a Slurm backend per experiment (its options) still cancels all at once.
        by_backend.setdefault(type(backend), (backend, []))[1].append(h.run)
    left: list[int] = []
    for backend, runs in by_backend.values():
        left += backend.stop(runs, grace, idle)
    return left


# ============================================================================
# Inside a training script
# ============================================================================


# The experiment that load_experiment(standalone=True) made this process (and a forked child) a run of.
_STANDALONE: list[Experiment] = []
_STANDALONE_LOCK = threading.Lock()


def load_experiment(standalone: bool = False) -> Experiment:
    """Return the Experiment (and run) that launched this process.

    The directory comes from ``EXPERIMENT_WORK_DIR`` and the run from
    ``EXPERIMENT_RUN_ID``; metadata.json is not trusted for the run, since a
    later run of the same directory may already have changed it.

    Outside exp this raises :class:`NoExperimentContext`, unless
    ``standalone=True`` (or ``EXP_STANDALONE=1``): then a fresh experiment
    named after the script is created under ``./results`` and this process
    becomes its first run, so ``python train.py`` still works while debugging.
    Later calls in the process (and in a child it forks) return that same
    Experiment object.
    """
    work_dir = os.environ.get("EXPERIMENT_WORK_DIR")
    if work_dir:
        if not ExperimentDir.is_experiment(work_dir):
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
        if e._lark.get("mode") == "summary" and e.current_run_id:
            # Summary mode: the run's record is created as the run starts, then updated by save_row(lark=True).
            settings = lark_settings(e._lark)
            if not lark_missing(settings):
                try:
                    _lark_sender(e.dir, e.current_run_id, settings, e.name, e._warn).notify()
                except ExpError as err:
                    e._warn(f"lark: {err}")
        return e
    flag = os.environ.get(STANDALONE_ENV, "").strip().lower()
    if standalone or flag in ("1", "true", "yes", "on"):
        import shlex

        with _STANDALONE_LOCK:
            if _STANDALONE:  # a notebook cell run again, a helper module: the same experiment and run
                return _STANDALONE[0]
            script = sys.argv[0] if sys.argv and sys.argv[0] not in ("", "-c", "-") else ""
            name = os.path.splitext(os.path.basename(script))[0] or "interactive"
            e = Experiment(name=name, command=shlex.join([sys.executable] + sys.argv), base_dir=DEFAULT_BASE_DIR)
            e._start_in_process()
            _STANDALONE.append(e)
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
# is launched unless the whole file is valid.  One table of fields per
# section drives validation, defaults, ``exp run --help`` and the README.


class Field:
    """One config key: its name, what it takes (a checker name), its default and a line of help."""

    __slots__ = ("name", "kind", "default", "help")

    def __init__(self, name: str, kind: str, default: Any, help: str) -> None:
        self.name = name
        self.kind = kind
        self.default = default
        self.help = help

    def __repr__(self) -> str:
        return f"Field({self.name!r}, {self.kind!r}, {self.default!r})"

    def default_text(self) -> str:
        """The default as TOML writes it (``false``, ``"./results"``, ``10``); "" when there is none."""
        v = self.default
        if v is None or v == [] or v == {}:
            return ""
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        return repr(v).replace("'", '"')


#: ``[scheduler]`` keys.
SCHEDULER_FIELDS: tuple[Field, ...] = (
    Field("base_experiment_dir", "path", DEFAULT_BASE_DIR, "where experiment directories and `.exp_state/` go"),
    Field("max_concurrent_experiments", "int>=1", 1, "how many run at once"),
    Field("check_interval", "seconds>0", 1.0,
          "seconds; only bounds how often exp looks for outside commands (dispatch is event-driven)"),
    Field("auto_restart_on_error", "bool", False, "retries happen only when true"),
    Field("linger_when_idle", "bool", False,
          "stay alive (status `awaiting_shutdown`) after the queue drains, until Ctrl-C"),
    Field("kill_timeout", "seconds>=0", DEFAULT_KILL_GRACE, "seconds between SIGTERM and SIGKILL on shutdown"),
    Field("lark_url", "lark_url", None, "a Lark/Feishu Base URL: where `save_row(lark=True)` sends rows"),
    Field("lark_config", "lark", None, "Lark/Feishu settings (a table or a URL); see *Lark/Feishu*"),
    Field("notify", "notify", None,
          '`{ lark_webhook = "https://…/open-apis/bot/v2/hook/…", secret = "…", on = ["error", "finished", "done"] }`: '
          "group-chat messages when an experiment ends and when the batch is done"),
    Field("backend", "backend", "local",
          '`"local"` (this machine) or `"slurm"` (each experiment is a batch job; see *Running on a Slurm cluster*)'),
    Field("slurm", "slurm", {},
          "`[scheduler.slurm]`: sbatch options for every experiment: `partition`, `account`, `qos`, `time`, `mem`, "
          '`cpus_per_task`, `constraint`, `extra = ["--exclusive"]`'),
    Field("gpus", "gpu_ids", None,
          "the GPU pool, e.g. `[0, 1, 2, 3]`; default: detected with `nvidia-smi` (within a set "
          "`CUDA_VISIBLE_DEVICES`), none without it"),
    Field("jobs_per_gpu", "int>=1", 1, "how many experiments may share one GPU"),
    Field("gpu_free_memory_mb", "mb", None,
          "a GPU where processes outside exp leave less than this many MB free counts as busy "
          "(checked before each launch)"),
)
#: ``[[experiments]]`` keys (``name`` and ``command`` are required).
EXPERIMENT_FIELDS: tuple[Field, ...] = (
    Field("name", "name", None, "required: the directory name prefix"),
    Field("command", "command", None, "required: a shell command"),
    Field("priority", "priority", 0,
          f"higher starts first; equal priorities keep file order; from {-PRIORITY_LIMIT} to {PRIORITY_LIMIT}"),
    Field("tags", "tags", [], "a list of strings, for search"),
    Field("description", "text", None, "free text, for search"),
    Field("gpu_ids", "gpu_ids", None, '`[0, 1]` or `"0,1"`; sets `CUDA_VISIBLE_DEVICES`'),
    Field("cwd", "path", None, "where the command runs (default: the config file's directory)"),
    Field("base_dir", "path", None, "parent directory for this experiment (default: `base_experiment_dir`)"),
    Field("environment", "env", {}, '`{ KEY = "VALUE" }` for the command'),
    Field("resume", "path", None, "continue an existing experiment (timestamp or path)"),
    Field("repeats", "int>=1", 1, "run as this many separate experiments (`EXPERIMENT_REPEAT` = 1, 2, ...)"),
    Field("max_retries", "int>=0", 0,
          "extra attempts when `auto_restart_on_error` (else a warning); each is a new run in the same "
          "directory; exit code 127 (command not found) is not retried"),
    Field("delay_seconds", "seconds>=0", 0.0, "wait this long before each attempt, without holding a slot"),
    Field("lark_url", "lark_url", None, "overrides `[scheduler] lark_url`"),
    Field("lark_config", "lark", None, "overrides `[scheduler] lark_config`, key by key"),
    Field("notify", "notify", None, "overrides `[scheduler] notify`, key by key"),
    Field("slurm", "slurm", {}, "`[experiments.slurm]`: overrides `[scheduler.slurm]` key by key"),
    Field("gpus", "int>=0", 0, "how many GPUs (any free ones of the pool); `gpu_ids` asks for exact ones"),
    Field("timeout", "duration", None,
          '`"2h"`, `"90m"`, `"30s"` or seconds: SIGTERM then SIGKILL after `kill_timeout`; ends `error` (timeout)'),
    Field("depends_on", "names", [],
          "names of experiments that must all finish successfully first (all repeats and sweep points)"),
    Field("sweep", "sweep", {},
          "`{ lr = [0.1, 0.01], bs = [32, 64] }`: one experiment per combination; `{lr}` in name, command, "
          "description, tags and environment values takes the value (`{{` is a brace)"),
)
#: Old names of the default tables, kept for code that reads them.
SCHEDULER_DEFAULTS: dict[str, Any] = {f.name: f.default for f in SCHEDULER_FIELDS}
EXPERIMENT_DEFAULTS: dict[str, Any] = {f.name: f.default for f in EXPERIMENT_FIELDS}


def _expect(cond: bool, expected: str, v: Any) -> None:
    if not cond:
        raise ConfigError(f"expected {expected}, got {v!r}")


class _Problems(ConfigError):
    """Several problems inside one value, each under a sub-key (or the value itself: None)."""

    def __init__(self, problems: list[tuple[str | None, str]]) -> None:
        super().__init__("; ".join(msg for _, msg in problems))
        self.problems = problems


def _check_text(v: Any) -> str:
    _expect(isinstance(v, str), "a string", v)
    return str(v)


def _check_path(v: Any) -> str:
    _expect(isinstance(v, str) and bool(v.strip()) and "\0" not in v, "a non-empty path string", v)
    return str(v)


def _check_int(v: Any, low: int | None = None) -> int:
    ok = _is_int(v) and (low is None or v >= low)
    _expect(ok, "an integer" if low is None else f"an integer >= {low}", v)
    return int(v)


def _check_priority(v: Any) -> int:
    _expect(priority_ok(v), PRIORITY_EXPECTED, v)
    return int(v)


def _check_seconds(v: Any, positive: bool) -> float:
    import math

    try:
        f = float(v) if _is_num(v) else float("nan")
    except OverflowError:
        f = float("nan")
    ok = math.isfinite(f) and (f > 0 if positive else f >= 0)
    _expect(ok, "a number of seconds " + ("> 0" if positive else ">= 0"), v)
    return f


def _check_env(v: Any) -> dict[str, str]:
    _expect(isinstance(v, dict), 'a table such as { KEY = "VALUE" }', v)
    env: dict[str, str] = {}
    problems: list[tuple[str | None, str]] = []
    for ek, ev in v.items():
        if not ek or "=" in ek or "\0" in ek:
            problems.append((None, f"{ek!r} is not a valid environment variable name"))
        elif isinstance(ev, (dict, list)) or "\0" in str(ev):
            problems.append((ek, f"expected a string, number or boolean value (no NUL), got {ev!r}"))
        else:
            env[ek] = ("true" if ev else "false") if isinstance(ev, bool) else str(ev)
    if problems:
        raise _Problems(problems)
    return env


def _check_lark(v: Any) -> Any:
    _expect(isinstance(v, (dict, str)), "a table or a URL string", v)
    check_lark_config(v)  # its _Problems name each bad key
    return v


def _check_lark_url(v: Any) -> str:
    _expect(isinstance(v, str), "a Base URL string", v)
    parse_lark_url(v)
    return str(v)


def _check_notify(v: Any) -> dict[str, Any]:
    return check_notify(v)


def _check_backend(v: Any) -> str:
    _expect(v in ("local", "slurm"), '"local" or "slurm"', v)
    return str(v)


def _check_slurm(v: Any) -> dict[str, Any]:
    import re

    _expect(isinstance(v, dict), 'a table such as { partition = "gpu", time = "1-00:00:00" }', v)
    problems: list[tuple[str | None, str]] = []
    out: dict[str, Any] = {}
    for key, val in v.items():
        if key not in SLURM_OPTIONS:
            problems.append((None, _unknown_key("", str(key), SLURM_OPTIONS)))
        elif key == "extra":
            if not (isinstance(val, list) and all(isinstance(x, str) and x.startswith("-") and "\n" not in x
                                                  for x in val)):
                problems.append((key, f'expected a list of sbatch options such as ["--exclusive"], got {val!r}'))
            else:
                out[key] = list(val)
        elif key == "cpus_per_task":
            if not (_is_int(val) and val >= 1):
                problems.append((key, f"expected an integer >= 1, got {val!r}"))
            else:
                out[key] = val
        elif not (isinstance(val, (str, int)) and not isinstance(val, bool) and str(val).strip()
                  and not re.search(r"[\s\0]", str(val))):
            problems.append((key, f"expected a value without spaces, such as \"gpu\", got {val!r}"))
        else:
            out[key] = str(val)
    if problems:
        raise _Problems(problems)
    return out


def _check_tags(v: Any) -> list[str]:
    _expect(isinstance(v, list) and all(isinstance(t, str) for t in v), 'a list of strings such as ["baseline"]', v)
    return list(v)


def _check_bool(v: Any) -> bool:
    _expect(isinstance(v, bool), "true or false", v)
    return bool(v)


def _check_gpu_ids(v: Any) -> list[int] | None:
    try:
        return parse_gpu_ids(v)
    except ConfigError as e:
        raise ConfigError(str(e).split(": ", 1)[1]) from None  # the key is named by the caller


def _check_required_text(check: Callable[[Any], str]) -> Callable[[Any], str]:
    def run(v: Any) -> str:
        _expect(isinstance(v, str) and bool(v.strip()), "a non-empty string", v)
        return check(v)

    return run


_DURATION_RE = _LazyRe(r"(\d+(?:\.\d*)?|\.\d+)\s*(h|m|s)")


def parse_duration(value: Any) -> float:
    """``"2h"``, ``"90m"``, ``"30s"``, ``"1h30m"`` or a number of seconds, as seconds (> 0, finite)."""
    import math
    import re

    seconds = -1.0
    try:
        if _is_num(value):
            seconds = float(value)
        elif isinstance(value, str):
            text = value.strip().lower()
            parts = _DURATION_RE.findall(text)
            if parts and _DURATION_RE.sub("", text).strip() == "":
                seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[unit] for n, unit in parts)
            elif re.fullmatch(r"\d+(?:\.\d*)?", text):
                seconds = float(text)
    except OverflowError:  # more digits than a float holds
        seconds = -1.0
    if seconds > 0 and math.isfinite(seconds):
        return seconds
    raise ConfigError(f'expected a duration such as "2h", "90m", "30s" or a number of seconds > 0, got {value!r}')


def _check_mb(v: Any) -> float:
    import math

    try:
        f = float(v) if _is_num(v) else float("nan")
    except OverflowError:
        f = float("nan")
    _expect(math.isfinite(f) and f >= 0, "a number of megabytes >= 0", v)
    return f


def _check_names(v: Any) -> list[str]:
    _expect(isinstance(v, list) and all(isinstance(t, str) and t.strip() for t in v),
            'a list of experiment names such as ["prep"]', v)
    return list(v)


def _check_sweep(v: Any) -> dict[str, list[Any]]:
    import re

    _expect(isinstance(v, dict), "a table of lists such as { lr = [0.1, 0.01] }", v)
    out: dict[str, list[Any]] = {}
    problems: list[tuple[str | None, str]] = []
    for k, vals in v.items():
        vals = vals if isinstance(vals, list) else [vals]
        if not vals:
            problems.append((k, "expected at least one value, got []"))
        elif not all(isinstance(x, (str, int, float, bool)) for x in vals):
            problems.append((k, f"expected strings, numbers or booleans, got {vals!r}"))
        elif not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            problems.append((None, f"{k!r} is not a usable placeholder name (letters, digits, _)"))
        else:
            out[k] = vals
    if problems:
        raise _Problems(problems)
    return out


#: What each Field.kind takes; each raises ConfigError("expected ..., got ...").
_CHECKERS: dict[str, Callable[[Any], Any]] = {
    "name": _check_required_text(_validate_name),
    "command": _check_required_text(_validate_command),
    "text": _check_text,
    "path": _check_path,
    "int": _check_int,
    "priority": _check_priority,
    "int>=0": lambda v: _check_int(v, 0),
    "int>=1": lambda v: _check_int(v, 1),
    "seconds>0": lambda v: _check_seconds(v, True),
    "seconds>=0": lambda v: _check_seconds(v, False),
    "bool": _check_bool,
    "tags": _check_tags,
    "gpu_ids": lambda v: _check_gpu_ids(v),
    "env": _check_env,
    "lark": _check_lark,
    "lark_url": _check_lark_url,
    "notify": _check_notify,
    "backend": _check_backend,
    "slurm": _check_slurm,
    "duration": parse_duration,
    "mb": _check_mb,
    "names": _check_names,
    "sweep": _check_sweep,
}


class SchedulerSettings:
    """The ``[scheduler]`` table after validation, every key set (defaults filled in)."""

    __slots__ = tuple(f.name for f in SCHEDULER_FIELDS)
    base_experiment_dir: str
    max_concurrent_experiments: int
    check_interval: float
    auto_restart_on_error: bool
    linger_when_idle: bool
    kill_timeout: float
    lark_url: str | None
    lark_config: dict[str, Any] | str | None
    notify: dict[str, Any] | None
    backend: str
    slurm: dict[str, Any]
    gpus: list[int] | None
    jobs_per_gpu: int
    gpu_free_memory_mb: float | None

    def __init__(self, values: Mapping[str, Any]) -> None:
        for f in SCHEDULER_FIELDS:
            setattr(self, f.name, values.get(f.name, f.default))

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in SCHEDULER_FIELDS}


class ExperimentSpec:
    """One ``[[experiments]]`` table after validation, paths made absolute."""

    __slots__ = tuple(f.name for f in EXPERIMENT_FIELDS) + ("index", "params", "template_name")
    index: int
    #: The sweep point's values (``{}`` without a sweep) and the name before ``{}`` were filled.
    params: dict[str, Any]
    template_name: str
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
    notify: dict[str, Any] | None
    slurm: dict[str, Any]
    gpus: int
    timeout: float | None
    depends_on: list[str]
    sweep: dict[str, list[Any]]

    def __init__(self, index: int, values: Mapping[str, Any], params: Mapping[str, Any] | None = None,
                 template_name: str | None = None) -> None:
        self.index = index
        self.params = dict(params or {})
        self.template_name = template_name or values.get("name") or ""
        for f in EXPERIMENT_FIELDS:
            default = f.default
            setattr(self, f.name, values.get(f.name, list(default) if isinstance(default, list) else
                                             dict(default) if isinstance(default, dict) else default))


class BatchConfig:
    """A validated batch file: scheduler settings, the experiments in file order, and warnings.

    ``warnings`` lists what is valid but probably not meant (say, retries
    that can never happen); ``exp run`` prints them.
    """

    def __init__(self, path: str, settings: SchedulerSettings, experiments: list[ExperimentSpec],
                 warnings: list[str] | None = None, scheduler_keys: Iterable[str] = ()) -> None:
        self.path = path
        self.scheduler = settings
        self.experiments = experiments
        self.warnings = list(warnings or [])
        #: The keys the file's [scheduler] table sets (the others are defaults).
        self.scheduler_keys = tuple(scheduler_keys)

    @property
    def settings(self) -> dict[str, Any]:
        return self.scheduler.as_dict()

    # The scheduler's settings, read often enough to deserve direct names.
    @property
    def base_experiment_dir(self) -> str:
        return self.scheduler.base_experiment_dir

    @property
    def max_concurrent_experiments(self) -> int:
        return self.scheduler.max_concurrent_experiments

    @property
    def auto_restart_on_error(self) -> bool:
        return self.scheduler.auto_restart_on_error

    @property
    def check_interval(self) -> float:
        return self.scheduler.check_interval

    @property
    def linger_when_idle(self) -> bool:
        return self.scheduler.linger_when_idle

    @property
    def kill_timeout(self) -> float:
        return self.scheduler.kill_timeout


def _unknown_key(where: str, key: str, known: Iterable[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (valid keys: {', '.join(sorted(known))})"
    return (f"{where}: " if where else "") + f"unknown key {key!r}{hint}"


def _resolve(base: str, path: str) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def _check_table(where: str, table: Mapping[str, Any], fields: tuple[Field, ...], errors: list[str]) -> dict[str, Any]:
    """The valid values of one table; a message in ``errors`` for each bad or unknown key."""
    by_name = {f.name: f for f in fields}
    values: dict[str, Any] = {}
    for key, v in table.items():
        f = by_name.get(key)
        if f is None:
            errors.append(_unknown_key(where, key, by_name))
            continue
        try:
            values[key] = _CHECKERS[f.kind](v)
        except _Problems as e:
            errors.extend(f"{where}.{key}{'.' + sub if sub else ''}: {msg}" for sub, msg in e.problems)
        except ConfigError as e:
            errors.append(f"{where}.{key}: {e}")
    return values


def config_reference() -> str:
    """The Markdown tables of every config key (the README's "Batch file reference" holds them)."""
    out = []
    for title, fields in (("`[scheduler]` key", SCHEDULER_FIELDS), ("`[[experiments]]` key", EXPERIMENT_FIELDS)):
        out.append(f"| {title} | default | meaning |")
        out.append("|---|---|---|")
        for f in fields:
            default = f.default_text()
            out.append(f"| `{f.name}` | {f'`{default}`' if default else ''} | {f.help} |")
        out.append("")
    return "\n".join(out)


#: The most experiments one ``[experiments.sweep]`` may expand to (before repeats).
SWEEP_MAX_POINTS = 100_000
#: The most experiments one batch file may make (sweep points times repeats, all tables):
#: a typo such as ``repeats = 100000000`` is a config error, not a scheduler filling memory.
BATCH_MAX_EXPERIMENTS = 100_000


def sweep_points(sweep: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of a sweep's lists as dicts, in the order written (the last key varies fastest)."""
    import itertools

    keys = list(sweep)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(sweep[k] for k in keys))]


def param_text(value: Any) -> str:
    """One sweep value as it is filled in and shown: TOML's ``true``/``false`` for booleans."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def format_params(params: Mapping[str, Any]) -> str:
    """``{"lr": 0.1, "bs": 32}`` -> ``"lr=0.1 bs=32"`` (for plans and listings)."""
    return " ".join(f"{k}={param_text(v)}" for k, v in params.items())


def _point_text(point: Mapping[str, Any]) -> str:
    # For error messages: a value with an escape sequence or a line break is shown escaped.
    text = _REPORT_CONTROL_RE.sub(lambda m: ascii(m.group())[1:-1], format_params(point))
    return text if len(text) <= 80 else text[:77] + "..."


_SWEEP_FORMATTER: Any = None
#: The widest width or precision a sweep placeholder's format may ask for (``{lr:.3e}``, ``{i:04d}``).
SWEEP_FORMAT_MAX_WIDTH = 1000
_DIGITS_RE = _LazyRe(r"\d+")


def _sweep_formatter() -> Any:
    """A ``string.Formatter`` (str.format rules) that writes booleans as TOML does."""
    global _SWEEP_FORMATTER
    if _SWEEP_FORMATTER is None:
        import string

        class SweepFormatter(string.Formatter):
            def format_field(self, value: Any, format_spec: str) -> Any:
                if isinstance(value, bool) and not format_spec:
                    return param_text(value)
                # {lr:999999999} would make a gigabyte of padding (or a MemoryError).
                widest = max(map(int, _DIGITS_RE.findall(format_spec)), default=0)
                if widest > SWEEP_FORMAT_MAX_WIDTH:
                    raise ValueError(f"the format {format_spec!r} asks for {widest} characters; at most "
                                     f"{SWEEP_FORMAT_MAX_WIDTH} are taken")
                return super().format_field(value, format_spec)

        _SWEEP_FORMATTER = SweepFormatter()
    return _SWEEP_FORMATTER


def _placeholder_problem(template: str, keys: list[str]) -> str | None:
    """Why ``template`` cannot be filled from a point with ``keys`` (None when it can)."""
    import re

    fmt = _sweep_formatter()

    def fields(text: str) -> list[str]:
        out = []
        for _, field, spec, _ in fmt.parse(text):
            if field is not None:
                out.append(field)
                if spec:
                    out.extend(fields(spec))
        return out

    try:
        found = fields(template)
    except ValueError as e:
        return f"{e}; write {{{{ and }}}} for a literal brace"
    for field in found:
        if field in keys:
            continue
        head = re.match(r"[^.\[]*", field).group()  # type: ignore[union-attr]
        if head in keys:
            return (f"placeholder {{{field}}} is not supported: use {{{head}}}, optionally with a format "
                    f"such as {{{head}:.0e}}")
        return f"placeholder {{{field}}} has no value in sweep (sweep keys: {', '.join(keys)})"
    return None


def _expand_sweep(where: str, index: int, values: dict[str, Any], errors: list[str]) -> list[ExperimentSpec]:
    """One ExperimentSpec per point of ``values["sweep"]``, placeholders filled; problems go to ``errors``."""
    import math

    sweep: dict[str, list[Any]] = values["sweep"]
    keys = list(sweep)
    n = math.prod(len(v) for v in sweep.values())
    if values.get("resume") and n > 1:
        errors.append(f"{where}: resume cannot be combined with a sweep of {n} points "
                      "(every point would resume the same directory)")
    if n > SWEEP_MAX_POINTS:
        errors.append(f"{where}.sweep: {n} combinations; at most {SWEEP_MAX_POINTS} are allowed")
        return []
    # Every text to fill, by where it is reported: name, command, description, tags[i], environment.KEY.
    templates: dict[str, str] = {}
    for key in ("name", "command", "description"):
        if isinstance(values.get(key), str):
            templates[key] = values[key]
    for j, tag in enumerate(values.get("tags") or []):
        templates[f"tags[{j}]"] = tag
    for ek, ev in (values.get("environment") or {}).items():
        templates[f"environment.{ek}"] = ev
    bad = False
    for at, template in templates.items():
        problem = _placeholder_problem(template, keys)
        if problem:
            errors.append(f"{where}.{at}: {problem}")
            bad = True
    if bad or "name" not in values or "command" not in values:
        return []

    fmt = _sweep_formatter()
    failed: set[str] = set()  # report the first failure of each field only, not one per point
    specs = []
    for point in sweep_points(sweep):
        filled: dict[str, str] = {}
        for at, template in templates.items():
            try:
                filled[at] = fmt.vformat(template, (), point)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
                if at not in failed:
                    failed.add(at)
                    errors.append(f"{where}.{at}: cannot fill {template!r} with {_point_text(point)}: {e}")
        if len(filled) < len(templates):
            continue
        ok = True
        for at in templates:
            try:
                if at == "name":
                    _validate_name(filled["name"])
                    check_experiment_path(values["base_dir"], filled["name"])
                elif at == "command":
                    _validate_command(filled["command"])
                elif at.startswith("environment.") and "\0" in filled[at]:
                    raise ConfigError(f"the filled value {filled[at]!r} contains a NUL character")
            except ConfigError as e:
                ok = False
                if at not in failed:
                    failed.add(at)
                    errors.append(f"{where}.{at} ({_point_text(point)}): {e}")
        if not ok:
            continue
        point_values = dict(values)
        point_values["name"], point_values["command"] = filled["name"], filled["command"]
        if "description" in filled:
            point_values["description"] = filled["description"]
        point_values["tags"] = [filled[f"tags[{j}]"] for j in range(len(values.get("tags") or []))]
        point_values["environment"] = {ek: filled[f"environment.{ek}"] for ek in values.get("environment") or {}}
        specs.append(ExperimentSpec(index, point_values, params=point, template_name=values["name"]))
    return specs


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
    warnings: list[str] = []
    for key in data:
        if key not in ("scheduler", "experiments"):
            errors.append(_unknown_key("top level", key, ("scheduler", "experiments")))

    raw_sched = data.get("scheduler", {})
    if not isinstance(raw_sched, dict):
        errors.append("scheduler: expected a [scheduler] table")
        raw_sched = {}
    sched_values = _check_table("scheduler", raw_sched, SCHEDULER_FIELDS, errors)
    sched_values["base_experiment_dir"] = _resolve(root, sched_values.get("base_experiment_dir", DEFAULT_BASE_DIR))
    settings = SchedulerSettings(sched_values)

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
        values = _check_table(where, table, EXPERIMENT_FIELDS, errors)
        for req in ("name", "command"):
            if req not in table:
                errors.append(f"{where}: missing required key {req!r}")
        if values.get("resume") and values.get("repeats", 1) > 1:
            errors.append(f"{where}: resume cannot be combined with repeats > 1 (every repeat needs its own directory)")
        if values.get("gpu_ids") and values.get("gpus") and values["gpus"] != len(values["gpu_ids"]):
            errors.append(f"{where}: gpus = {values['gpus']} but gpu_ids = {values['gpu_ids']} names "
                          f"{len(values['gpu_ids'])}: give gpu_ids for exact GPUs, or gpus for any free ones")
        if values.get("max_retries") and not settings.auto_restart_on_error:
            warnings.append(
                f"{where} ({values.get('name', '?')}): max_retries = {values['max_retries']} has no effect "
                "because [scheduler] auto_restart_on_error is false; set it to true to retry failures"
            )
        values["cwd"] = _resolve(root, values.get("cwd") or ".")
        resume = values.get("resume")
        if resume and (os.sep in resume or resume.startswith(("~", "."))):
            values["resume"] = _resolve(root, resume)  # a path, not a timestamp
        values["base_dir"] = _resolve(root, values["base_dir"]) if values.get("base_dir") else settings.base_experiment_dir
        if values.get("sweep"):
            # Tables without a sweep are left as written: no brace is special in them.
            specs.extend(_expand_sweep(where, i, values, errors))
            continue
        if "name" in values:
            try:
                check_experiment_path(values["base_dir"], values["name"])
            except ConfigError as e:
                errors.append(f"{where}.name: {e}")
        specs.append(ExperimentSpec(i, values))
    for base in dict.fromkeys([settings.base_experiment_dir] + [spec.base_dir for spec in specs]):
        problem = base_dir_problem(base)
        if problem and not any(e.endswith(problem) for e in errors):  # an experiment's check said it
            errors.append(problem)
    total = sum(spec.repeats for spec in specs)
    if total > BATCH_MAX_EXPERIMENTS:
        most = max(specs, key=lambda sp: sp.repeats)
        errors.append(f"the file makes {total} experiments (sweep points × repeats; experiments[{most.index}] "
                      f"({most.name or '?'}) has repeats = {most.repeats}); at most {BATCH_MAX_EXPERIMENTS} are allowed "
                      "in one batch: lower repeats or split the file")
    if settings.backend == "slurm":
        for spec in specs:
            if spec.gpu_ids:
                errors.append(f"experiments[{spec.index}] ({spec.name}): gpu_ids names GPUs of this machine; with "
                              'backend = "slurm" ask for a number of GPUs with gpus = N (Slurm picks them)')
    # A sweep's points share their table's depends_on: one message each, not one per point.
    # With other problems, a name may be unknown because its table had one: only cycles then.
    others = bool(errors)
    errors.extend(p for p in dict.fromkeys(check_dependencies(specs))
                  if not others or "no experiment is named" not in p)
    if errors:
        raise ConfigError(f"{source}: {len(errors)} problem{'s' if len(errors) > 1 else ''}:\n  " + "\n  ".join(errors))
    return BatchConfig(source, settings, specs, warnings, [k for k in raw_sched if k in sched_values])


def load_config(path: str | os.PathLike[str]) -> BatchConfig:
    """Read and validate a batch file; paths in it resolve against its directory.

    A config read from a pipe (``exp run <(make_config)``) has no directory of its own:
    its paths resolve against the current one.
    """
    path = os.path.abspath(os.fspath(path))
    root = os.path.dirname(path)
    try:
        with open(path, encoding="utf-8") as f:
            if not os.path.isfile(path):
                root = os.getcwd()
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory; pass the .toml file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    config = parse_config(text, path, root)
    # What parsing alone cannot see: directories must exist before anything starts.
    errors = []
    for spec in config.experiments:
        if not os.path.isdir(spec.cwd):
            errors.append(f"experiments[{spec.index}].cwd: {spec.cwd} is not an existing directory")
        if spec.resume:
            try:
                ExperimentDir.find(spec.base_dir, spec.name, spec.resume)
            except ConfigError as e:
                errors.append(f"experiments[{spec.index}].resume: {e}")
    errors = list(dict.fromkeys(errors))  # a sweep's points share their table's cwd
    if errors:
        raise ConfigError(f"{path}: {len(errors)} problem{'s' if len(errors) > 1 else ''}:\n  " + "\n  ".join(errors))
    return config


# ============================================================================
# GPUs: the pool, nvidia-smi
# ============================================================================

#: The query exp runs; its columns, in order.
NVIDIA_SMI_QUERY = ["nvidia-smi", "--query-gpu=index,uuid,memory.used,memory.total,utilization.gpu",
                    "--format=csv,noheader,nounits"]


def parse_nvidia_smi(text: str) -> list[dict[str, Any]]:
    """Rows of :data:`NVIDIA_SMI_QUERY`'s output: index, uuid, memory_used/memory_total (MB), utilization (%)."""
    gpus = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) < 5 or not cells[0].isdigit():
            continue

        def num(c: str) -> float | None:
            try:
                return float(c)
            except ValueError:  # "[N/A]", "[Not Supported]"
                return None

        gpus.append({"index": int(cells[0]), "uuid": cells[1], "memory_used": num(cells[2]),
                     "memory_total": num(cells[3]), "utilization": num(cells[4])})
    return gpus


def visible_gpus(gpus: list[dict[str, Any]], cuda_visible: str | None) -> list[dict[str, Any]]:
    """``gpus`` restricted to a ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs; unset: all; empty: none)."""
    if cuda_visible is None:
        return gpus
    wanted = [w.strip() for w in cuda_visible.split(",") if w.strip()]
    out: list[dict[str, Any]] = []
    for w in wanted:
        if w.startswith("-"):  # "-1": CUDA stops at the first invalid entry
            break
        match = [g for g in gpus if (w.isdigit() and g["index"] == int(w)) or (g["uuid"] and g["uuid"].startswith(w))]
        if not match:
            break
        out.extend(m for m in match if m not in out)
    return out


def detect_gpus(env: Mapping[str, str] | None = None) -> list[dict[str, Any]] | None:
    """The GPUs ``nvidia-smi`` reports, within ``CUDA_VISIBLE_DEVICES``; None without nvidia-smi."""
    import subprocess

    env = os.environ if env is None else env
    try:
        out = subprocess.run(NVIDIA_SMI_QUERY, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return visible_gpus(parse_nvidia_smi(out.stdout), env.get("CUDA_VISIBLE_DEVICES"))


def gpu_pool(settings: SchedulerSettings, detected: list[dict[str, Any]] | None | bool = False) -> list[int]:
    """The scheduler's GPU ids: ``[scheduler] gpus``, else what nvidia-smi reports (once), else none.

    None with ``backend = "slurm"``: Slurm hands out the cluster's GPUs.
    """
    if settings.backend == "slurm":
        return []
    if settings.gpus is not None:
        return list(settings.gpus)
    found = detect_gpus() if detected is False else detected
    return [g["index"] for g in found] if isinstance(found, list) else []


def check_gpu_requests(config: BatchConfig, pool: list[int], joining: bool = False) -> None:
    """ConfigError (exit 2) when an experiment asks for more GPUs than the pool has, or ids outside it.

    ``joining``: ``config`` joins a running scheduler, whose pool it is (its own
    ``[scheduler]`` does not apply).  With ``backend = "slurm"`` the cluster has
    the GPUs, not this machine: Slurm checks (at sbatch).
    """
    if config.scheduler.backend == "slurm":
        return
    problems = []
    if joining:
        where_pool = f"the running scheduler's pool {pool}" if pool else "the running scheduler's pool, which is empty"
        advice = ("a joining file's [scheduler] settings do not apply: change the pool with [scheduler] gpus = "
                  "[...] in the batch that started the scheduler, or wait for it to end")
    else:
        advice = "set [scheduler] gpus = [...] to the GPUs exp may use"
        if pool:
            where_pool = f"the pool {pool}"
        elif config.scheduler.gpus is not None:
            where_pool = "the pool, empty ([scheduler] gpus = [])"
        else:
            where_pool = "an empty pool (no [scheduler] gpus, and nvidia-smi found no GPUs)"
    for s in config.experiments:
        if s.gpu_ids:
            outside = [g for g in s.gpu_ids if g not in pool]
            if outside:
                problems.append(f"experiments[{s.index}] ({s.name}): gpu_ids {outside} are not in {where_pool}; "
                                + advice)
        elif s.gpus > len(pool):
            problems.append(f"experiments[{s.index}] ({s.name}): gpus = {s.gpus} is more than {where_pool} has")
    if problems:
        raise ConfigError(f"{config.path}: {len(problems)} problem{'s' if len(problems) > 1 else ''}:\n  "
                          + "\n  ".join(problems))


# ============================================================================
# Planning (pure): jobs, dispatch order, what starts next
# ============================================================================

#: Exit statuses that no retry can fix: the shell's "command not found".
NOT_RETRIED_EXIT_CODES = {127: "the command was not found"}


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
        self.ended_at: str | None = None
        self.exit_code: int | None = None
        self.work_dir: str | None = None
        self.run_id: str | None = None
        self.not_before = 0.0  # clock time before which it may not start (delay_seconds)
        self.t_started = 0.0
        self.duration: float | None = None
        self.experiment: Experiment | None = None
        self.handle: RunHandle | None = None
        self.error: str | None = None
        #: Why the last attempt ended ("exit code 3", "timeout", "dependency failed: prep", ...).
        self.reason: str | None = None
        #: Ids of the jobs that must finish successfully first (from depends_on).
        self.deps: list[int] = []
        #: GPUs given to the running attempt (planned by plan_next, held until it ends).
        self.gpus: list[int] = []
        #: Clock time at which the running attempt times out (None: no timeout).
        self.deadline: float | None = None
        #: A stop asked for while the attempt was still starting: (reason, status), applied once it has started.
        self.stop_request: tuple[str, str] | None = None
        #: Dispatch priority (the spec's, until `exp priority` changes it).
        self.priority = spec.priority
        #: The config file of a job a joining `exp run` added (None: the scheduler's own).
        self.config_path: str | None = None
        #: A cluster job's record (state, node) as last written to the state file and metadata.json.
        self.backend_seen: dict[str, Any] | None = None
        #: Whether the deadline has taken the attempt's wait in a cluster's queue into account.
        self.queue_counted = False

    @property
    def name(self) -> str:
        return self.spec.name

    def gpu_request(self) -> tuple[list[int] | None, int]:
        """(exact ids, or None) and how many GPUs this job needs."""
        if self.spec.gpu_ids:
            return list(self.spec.gpu_ids), len(self.spec.gpu_ids)
        return None, int(self.spec.gpus or 0)

    #: 1 + max_retries when the batch retries failures, else 1 (set by expand_jobs).
    max_attempts = 1

    def label(self) -> str:
        rep = f" #{self.repeat}/{self.spec.repeats}" if self.spec.repeats > 1 else ""
        return f"{self.spec.name}{rep}"

    def outcome(self) -> str:
        """How an ended attempt went, for people: "exit code 3", "killed", and any error."""
        if self.status == KILLED:
            what = "killed"
        elif self.reason and not self.reason.startswith("could not start"):
            what = self.reason  # "exit code 3", "timeout", "signal SIGKILL", "dependency failed: prep"
        else:
            what = "" if self.exit_code is None else f"exit code {self.exit_code}"
        return ", ".join(x for x in (what, self.error) if x)

    def summary_for_card(self) -> dict[str, Any]:
        """What a notification says of an ended attempt (see :func:`run_card`)."""
        log = self.handle.log_path if self.handle is not None else None
        tail = "\n".join(tail_lines(log, 15, max_bytes=65536, skip_prefix=LOG_MARK)) if log else ""
        metrics = {}
        if self.experiment is not None and self.run_id:
            metrics = self.experiment.dir.last_metrics(self.run_id)
        reason = self.reason if self.status == KILLED else (self.outcome() or self.reason)
        return {"name": self.label(), "status": self.status, "reason": reason,
                "duration": self.duration, "host": _hostname(), "gpus": list(self.gpus), "metrics": metrics,
                "log_tail": tail, "path": self.work_dir, "attempt": self.attempt, "attempts": self.max_attempts}

    def retryable(self) -> bool:
        """Whether another attempt could help: a failed run, attempts left, not "command not found"."""
        return (self.status == ERROR and self.attempt < self.max_attempts
                and self.exit_code not in NOT_RETRIED_EXIT_CODES)

    def to_state(self) -> dict[str, Any]:
        s = self.spec
        return {
            "id": self.id, "name": s.name, "command": s.command, "priority": self.priority,
            "tags": s.tags, "gpu_ids": s.gpu_ids, "cwd": s.cwd, "base_dir": s.base_dir,
            "environment": redact_env(s.environment), "description": s.description,
            "repeats": s.repeats, "repeat": self.repeat, "max_retries": s.max_retries,
            "delay_seconds": s.delay_seconds, "attempt": self.attempt, "status": self.status,
            "created_at": self.created_at, "started_at": self.started_at,
            "ended_at": self.ended_at, "exit_code": self.exit_code,
            "duration": self.duration, "work_dir": self.work_dir, "run_id": self.run_id,
            "pid": self.handle.pid if self.handle is not None and self.status == RUNNING else None,
            "error": self.error, "reason": self.reason, "params": s.params, "gpus": s.gpus,
            "assigned_gpus": self.gpus, "timeout": s.timeout, "depends_on": s.depends_on,
            "deps": self.deps, "config": self.config_path,
            # A cluster job: its id, node and state (Slurm), as last seen.
            "job": self.handle.run.record() if self.handle is not None and self.handle.pid is None else None,
        }


def expand_jobs(config: BatchConfig) -> list[Job]:
    """Jobs in dispatch order: priority high to low, file order among equals, repeats together.

    ``depends_on`` names become job ids: a name stands for every job of that
    name, or of that sweep's name template (all its points and repeats).
    """
    jobs: list[Job] = []
    retrying = bool(config.auto_restart_on_error)
    for spec in config.experiments:
        for r in range(1, spec.repeats + 1):
            job = Job(0, spec, r, len(jobs))
            job.max_attempts = 1 + (spec.max_retries if retrying else 0)
            jobs.append(job)
    jobs.sort(key=lambda j: (-j.priority, j.order))
    for i, j in enumerate(jobs, 1):
        j.id = i
    by_name: dict[str, list[int]] = {}
    for j in jobs:
        by_name.setdefault(j.spec.name, []).append(j.id)
        if j.spec.template_name != j.spec.name:
            by_name.setdefault(j.spec.template_name, []).append(j.id)
    for j in jobs:
        j.deps = sorted({i for n in j.spec.depends_on for i in by_name.get(n, []) if i != j.id})
    return jobs


def check_dependencies(specs: list[ExperimentSpec]) -> list[str]:
    """Problems with ``depends_on``: unknown names and cycles (an experiment waiting for itself)."""
    names: dict[str, set[int]] = {}
    for s in specs:
        for n in (s.name, s.template_name):
            if isinstance(n, str):  # a missing or wrong name is reported on its own
                names.setdefault(n, set()).add(s.index)
    problems = []
    edges: dict[int, set[int]] = {}
    for s in specs:
        for n in s.depends_on:
            if n not in names:
                import difflib

                close = difflib.get_close_matches(n, list(names), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"experiments[{s.index}].depends_on: no experiment is named {n!r}{hint}")
            else:
                edges.setdefault(s.index, set()).update(names[n])
    # A cycle among the tables (a sweep's points share their table's index).
    state: dict[int, int] = {}
    cycle: list[int] = []

    def visit(i: int, path: list[int]) -> bool:
        state[i] = 1
        for d in sorted(edges.get(i, ())):
            if state.get(d) == 1:
                cycle.extend(path[path.index(d):] + [d] if d in path else [i, d])
                return True
            if state.get(d) is None and visit(d, path + [d]):
                return True
        state[i] = 2
        return False

    label = {s.index: s.template_name for s in specs}
    for i in sorted(edges):
        if state.get(i) is None and visit(i, [i]):
            problems.append("depends_on: a cycle: " + " -> ".join(label[c] for c in cycle)
                            + "; no experiment of it could ever start")
            # Each cycle once: what that search had open is done, and the next search looks
            # for another.
            state.update((k, 2) for k, v in list(state.items()) if v == 1)
            cycle.clear()
    return problems


class GpuPlan:
    """How many more experiments each GPU of the pool takes now (pure bookkeeping).

    ``free[g]`` is ``jobs_per_gpu`` less the experiments on GPU ``g``;
    ``unusable`` are GPUs taken by processes outside exp (gpu_free_memory_mb).
    """

    def __init__(self, pool: list[int], jobs_per_gpu: int = 1, in_use: Mapping[int, int] | None = None,
                 unusable: Iterable[int] = ()) -> None:
        self.pool = list(pool)
        used = in_use or {}
        skip = set(unusable)
        self.free = {g: (0 if g in skip else max(0, jobs_per_gpu - used.get(g, 0))) for g in self.pool}


def job_key(name: Any, command: Any, params: Any, repeat: Any) -> tuple[Any, ...]:
    """What identifies a task across schedulers (recovery, ``--resume``): its name, command, sweep
    values (as metadata.json keeps them: NaN as "nan") and repeat."""
    def text(v: Any) -> str:
        return _json().dumps(json_safe(v), sort_keys=True, default=str)

    # A name, command or repeat of the wrong type (a damaged metadata.json or state file)
    # must still make a key, one that no task of a valid config has.
    return (*(v if v is None or type(v) in (str, int) else ("?", text(v)) for v in (name, command)),
            text(params or {}), repeat if repeat is None or type(repeat) is int else ("?", text(repeat)))


def finished_before(base_dir: str, jobs: list[Job], claimed: Iterable[str] = ()) -> dict[Job, str]:
    """``--resume``: the jobs that already finished successfully under ``base_dir``, each with its directory.

    An experiment directory counts for the job of the same name, command,
    sweep values and repeat (metadata.json's ``repeat``).  A directory that
    does not say its repeat (made by an older exp, or outside a batch) counts
    for the first job of that name, command and sweep values without a
    directory of its own repeat.  ``claimed`` directories are another job's already.
    """
    claimed = set(claimed)
    finished: dict[tuple[Any, ...], list[str]] = {}
    for d in scan(base_dir):
        if d.path in claimed:
            continue
        meta, _ = d.try_read_metadata()
        if meta and meta.get("status") == FINISHED:
            repeat = meta.get("repeat") if _is_int(meta.get("repeat")) else None
            key = job_key(meta.get("name"), meta.get("command"), meta.get("params"), repeat)
            finished.setdefault(key, []).append(d.path)
    out: dict[Job, str] = {}
    unmatched = []
    for job in jobs:
        key = job_key(job.spec.name, job.spec.command, job.spec.params, job.repeat)
        if finished.get(key):
            out[job] = finished[key].pop(0)
        else:
            unmatched.append(job)
    for job in unmatched:
        key = job_key(job.spec.name, job.spec.command, job.spec.params, None)
        if finished.get(key):
            out[job] = finished[key].pop(0)
    return out


def plan_next(queue: list[Job], running: int, limit: int, now: float, gpus: GpuPlan | None = None,
              succeeded: Iterable[int] = (), gpus_elsewhere: bool = False) -> list[Job]:
    """Which queued jobs to start now, in dispatch order, up to the free slots.

    A job waits while its delay runs, while a job it depends on has not
    succeeded, and while the GPUs it asks for are not free; only GPUs hold
    back the jobs behind it.  The rule: a job blocked on GPUs reserves the
    GPUs it waits for (its exact ids, or every free GPU when it asks for a
    number), and a job behind it may start only on GPUs outside that
    reservation.  So a lower-priority job never takes a GPU that a waiting
    higher-priority one could use, and priority still decides among the
    startable.  Each picked job gets ``job.gpus`` (least-loaded GPUs first).
    ``gpus_elsewhere``: a cluster gives jobs their GPUs; here a count of GPUs holds nothing back.
    """
    slots = limit - running
    if slots <= 0:
        return []
    # The scheduler's own set is used as it is: copying it at every plan would cost a batch of
    # thousands more than the planning itself.
    ok = succeeded if isinstance(succeeded, (set, frozenset)) else set(succeeded)
    free = dict(gpus.free) if gpus is not None else {}
    pool = gpus.pool if gpus is not None else []
    reserved: set[int] = set()
    picked = []
    for job in queue:
        if job.not_before > now or any(d not in ok for d in job.deps):
            continue
        exact, count = job.gpu_request()
        if exact is not None:
            fits = all(free.get(g, 0) > 0 and g not in reserved for g in exact)
            take = exact
            if not fits:
                reserved.update(exact)
        elif count and not gpus_elsewhere:
            avail = sorted((g for g in pool if free.get(g, 0) > 0 and g not in reserved), key=lambda g: -free[g])
            fits = len(avail) >= count
            take = avail[:count]
            if not fits:
                reserved.update(avail)
        else:
            fits, take = True, []
        if not fits:
            continue
        for g in take:
            free[g] -= 1
        job.gpus = sorted(take)
        picked.append(job)
        if len(picked) == slots:
            break
    return picked


def next_wakeup(queue: Iterable[Job], now: float, deadlines: Iterable[float] = ()) -> float | None:
    """Seconds until the earliest delayed job becomes startable or a running one times out (None if neither)."""
    waits = [j.not_before - now for j in queue if j.not_before > now] + [d - now for d in deadlines]
    return max(0.0, min(waits)) if waits else None


# ============================================================================
# Scheduler: execution, terminal, state file
# ============================================================================

#: Least time between two writes of the state file while experiments churn.
#: Transitions inside the window are coalesced into one write at its end, so
#: a small batch's file is never more than this stale.  Rewriting ~0.5 KB per experiment
#: on every transition would otherwise dominate batches of short commands.
STATE_WRITE_INTERVAL = 0.1
#: A big batch's state file takes longer to write (thousands of jobs: megabytes, fsynced):
#: the wait after a write is at least this many times what the write took, so the main
#: loop spends at most about a tenth of its time on the file whatever the batch's size ...
STATE_WRITE_SHARE = 10
#: ... and the file is never staler than this.
STATE_WRITE_MAX_INTERVAL = 2.0
#: How often a waiting scheduler looks for new command files (one stat of the
#: commands directory): commands are acted on within this, idle or not.
COMMAND_POLL_INTERVAL = 0.02


_SHORT_DIRS: dict[tuple[str, str], str] = {}


def _short_path(path: str | None, cwd: str | None = None) -> str:
    """``path`` relative to ``cwd`` (default: the current directory) when that is shorter."""
    if not path:
        return "-"
    # A batch names hundreds of directories under one base: relpath is worked out once per parent.
    head, tail = os.path.split(path)
    try:
        if cwd is None:
            cwd = os.getcwd()
        key = (cwd, head)
        rel_head = _SHORT_DIRS.get(key)
        if rel_head is None:
            rel_head = _SHORT_DIRS[key] = os.path.relpath(head, cwd) if head else ""
    except (OSError, ValueError):
        return path
    if rel_head == os.pardir or rel_head.startswith(os.pardir + os.sep):
        # Up first: the path may be the current directory or one above it ("." or "..", not "../name").
        rel = os.path.relpath(path, cwd)
    else:
        rel = os.path.join(rel_head, tail) if rel_head != "." else tail
    return rel if len(rel) < len(path) else path


class _Terminal:
    """Event lines plus, on a TTY, one live progress line kept below them."""

    def __init__(self, out: Any) -> None:
        self.out = out
        isatty = getattr(out, "isatty", None)
        # A dumb terminal (an editor's shell buffer) shows \r and escape sequences as text:
        # no colour, and no progress line redrawn in place.
        self.tty = bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"
        self.color = self.tty and not os.environ.get("NO_COLOR")
        self._bar = ""
        self._broken = out is None  # started with stdout closed (``>&-``)

    def _write(self, text: str) -> None:
        # A reader that went away (``exp run ... | head``) must not stop the
        # batch half-way through a launch: the terminal just goes quiet.
        if self._broken:
            return
        try:
            self.out.write(text)
            self.out.flush()
        except UnicodeEncodeError:
            # Text the output's encoding cannot hold (a name in Chinese, LC_ALL=C): this line
            # with escapes, and the output stays open for the next.
            try:
                enc = getattr(self.out, "encoding", None) or "ascii"
                self.out.write(text.encode(enc, "backslashreplace").decode(enc, "replace"))
                self.out.flush()
            except (OSError, ValueError, LookupError):
                self._broken = True
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


class _Ended(list):  # type: ignore[type-arg]
    """The ended jobs of a batch, counting the failed ones as they come and go.

    The progress line shows that count after every event; counting it there
    would walk every ended job each time, quadratic in a batch of thousands.
    Jobs enter and leave only through ``append`` and ``remove``, with their
    final status set.
    """

    failed = 0

    def append(self, job: Job) -> None:
        super().append(job)
        self.failed += job.status != FINISHED

    def remove(self, job: Job) -> None:
        super().remove(job)
        self.failed -= job.status != FINISHED


class Scheduler:
    """Run a batch: dispatch by priority under a concurrency limit, retry, report.

    The main thread makes each experiment's directory and starts its command;
    a thread of a ``ThreadPoolExecutor`` waits for the command (its
    :meth:`RunHandle.wait` records the end) and says so through a queue, so a
    finished experiment frees its slot and the next starts at once.  Only the
    main thread changes job state and writes the state file.

    Args:
        config: a validated :class:`BatchConfig`.
        out: where event lines go (a TTY also gets a live progress line).
        clock: monotonic clock; injectable for tests.
    """

    def __init__(self, config: BatchConfig, out: Any = None, clock: Callable[[], float] = time.monotonic,
                 gpus: list[int] | None = None, resume: bool = False) -> None:
        self.config = config
        #: Skip experiments that already finished successfully in the base directory (``run --resume``).
        self.resume = resume
        self.limit = int(config.max_concurrent_experiments)
        #: The GPU pool: ``gpus``, else [scheduler] gpus, else detected once, here.
        self.backend = make_backend(config.scheduler)
        if self.backend.allocates_gpus:  # the cluster gives each job its GPUs
            self.gpu_pool: list[int] = []
        else:
            self.gpu_pool = list(gpus) if gpus is not None else gpu_pool(config.scheduler)
            check_gpu_requests(config, self.gpu_pool)
        self.gpu_use: dict[int, int] = {g: 0 for g in self.gpu_pool}
        self.jobs = expand_jobs(config)
        self.queue: list[Job] = list(self.jobs)
        self.running: dict[int, Job] = {}
        self.done = _Ended()
        self.state = StateFile(config.base_experiment_dir)
        self.state_path = self.state.path
        self.term = _Terminal(out or sys.stdout)
        self._clock = clock
        self._events: Any = None
        self._status_indicator = SCHEDULER_RUNNING
        self._stopping = False
        self._started_at = now_iso()
        self._t0 = clock()
        self._state_cache: dict[int, str] = {}
        self._dirty = True
        self._next_state_write = 0.0
        self._state_unwritable = False
        self._draining = False  # shutdown: launch nothing more, exit when the running ones end
        self._last_id = max((j.id for j in self.jobs), default=0)
        self._succeeded: set[int] = set()  # ids that finished successfully (kept even after `exp rm`)
        self._last_spawn: threading.Event | None = None  # set once the last job launched has spawned its command
        self._replan = True
        self._commands_seen = -1
        self._owner_fd: int | None = None
        self._notifiers: dict[tuple[Any, Any], Notifier] = {}
        #: Runs of a dead scheduler's tasks that no task here stands for, and the GPUs they hold.
        self._orphans: list[tuple[LocalRun | SlurmRun, list[int], dict[str, Any]]] = []
        self._notify_cache: dict[int, tuple[ExperimentSpec, dict[str, Any]]] = {}
        #: What the event lines' paths are relative to (a getcwd per line would cost the main loop).
        try:
            self._cwd: str | None = os.getcwd()
        except OSError:  # the directory it was started in is gone: paths are shown whole
            self._cwd = None
        now = clock()
        for job in self.jobs:
            job.not_before = now + job.spec.delay_seconds
        #: Whether a queued job can ever wait for a delay (start or retry): if not, no wake-up
        #: is looked for in the queue, which a batch of thousands would walk after every event.
        self._may_delay = any(j.spec.delay_seconds for j in self.jobs)

    # ---------------------------------------------------------------- state

    def _job_json(self, job: Job) -> str:
        # Each job's JSON is rebuilt only when that job changed: the state file
        # is rewritten on every transition and must stay cheap for big batches.
        text = self._state_cache.get(job.id)
        if text is None:
            text = _dumps_strict(job.to_state())
            self._state_cache[job.id] = text
        return text

    def _touch(self, job: Job) -> None:
        self._state_cache.pop(job.id, None)

    def write_state(self) -> None:
        """Write ``<base>/.exp_state/scheduler_state.json`` atomically.

        If it cannot be written (a full disk), that is said once and the write
        is tried again later: the experiments matter more than the state file.
        """
        t0 = time.monotonic()
        if self._orphans:
            self._prune_orphans()
        groups: dict[str, list[Job]] = {"pending": list(self.queue), "running": list(self.running.values()),
                                        "finished": [], "errors": []}
        for job in self.done:
            groups["finished" if job.status == FINISHED else "errors"].append(job)
        summary = {
            "total": len(self.jobs), "pending": len(groups["pending"]), "running": len(groups["running"]),
            "finished": len(groups["finished"]), "errors": len(groups["errors"]),
            "status_indicator": self._status_indicator, "shutting_down": self._draining, "pid": os.getpid(),
            "host": _hostname(), "config_path": self.config.path,
            "max_concurrent_experiments": self.limit, "gpus": self.gpu_pool,
            "gpu_use": {str(g): n for g, n in self.gpu_use.items()},
            "started_at": self._started_at, "updated_at": now_iso(),
        }
        parts = []
        for key, jobs in groups.items():
            items = [self._job_json(j) for j in jobs]
            if key == "running":
                items += [_dumps_strict(dict(item, orphan=True)) for _, _, item in self._orphans]
            parts.append(f'"{key}": [' + ", ".join(items) + "]")
        parts.append('"summary": ' + _json().dumps(summary))
        text = "{" + ",\n".join(parts) + "}\n"
        self._dirty = False
        try:
            self.state.write_text(text)
        except OSError as e:
            self._dirty = True
            self._next_state_write = self._clock() + STATE_WRITE_INTERVAL
            if not self._state_unwritable:
                self._state_unwritable = True
                self.term.event(f"warning: cannot write the state file {_short_path(self.state_path)} ({e}); "
                                "the batch goes on and exp keeps trying")
            return
        spent = time.monotonic() - t0
        self._next_state_write = self._clock() + min(STATE_WRITE_MAX_INTERVAL,
                                                     max(STATE_WRITE_INTERVAL, STATE_WRITE_SHARE * spent))
        if self._state_unwritable:
            self._state_unwritable = False
            self.term.event(f"the state file {_short_path(self.state_path)} is written again")

    # ---------------------------------------------------------------- worker side

    def _start_and_wait(self, job: Job, prev: threading.Event | None = None,
                        spawned: threading.Event | None = None) -> tuple[str, Job, Any] | None:
        """In a pool thread: start an attempt (its directory, metadata, process), then wait for it.

        Starts run in the pool, not in the main loop, so that the file work of
        several starts overlaps; each command is started only after ``prev``
        (the job launched before) has started its own, then ``spawned`` is
        set.  ``("started", job, handle)`` is queued as soon
        as the command runs, then the end's event (see :meth:`_wait`), and the
        end is fsynced last.  Returns ``("unstartable", job, error)`` or None;
        never raises.
        """
        try:
            if job.experiment is None and job.work_dir and ExperimentDir.is_experiment(job.work_dir):
                # A task recovered after a crash as ended, now retried: the same directory.
                job.experiment = Experiment.load(job.work_dir)
                job.experiment.backend = self._backend_for(job)
            if job.experiment is None:
                # Its metadata.json is first written by the start, still before
                # the command runs: one rewrite less per experiment.
                s, top = job.spec, self.config.scheduler
                job.experiment = Experiment(
                    name=s.name, command=s.command, base_dir=s.base_dir, tags=s.tags, gpu_ids=s.gpu_ids,
                    cwd=s.cwd, resume=s.resume, description=s.description,
                    lark_config=merge_lark_layers(top.lark_url, top.lark_config, s.lark_url, s.lark_config),
                    env=s.environment, backend=self._backend_for(job), write_metadata=False,
                    params=s.params or None,
                )
            if job.gpus or job.spec.gpus:
                job.experiment.gpu_ids = list(job.gpus)  # CUDA_VISIBLE_DEVICES and metadata's gpu_ids
            job.experiment.repeat = job.repeat  # EXPERIMENT_REPEAT, and metadata's repeat
            extra: dict[str, str | None] = {}
            notify = self._notify_settings(job)
            if notify.get("lark_webhook"):  # for exp.notify() in the script; through the environment only
                extra[WEBHOOK_ENV] = notify["lark_webhook"]
                if notify.get("secret"):
                    extra[WEBHOOK_SECRET_ENV] = notify["secret"]
            handle = job.experiment.start(extra,
                                          before_spawn=None if prev is None else lambda: prev.wait(5.0))
        except Exception as e:  # noqa: BLE001 - e.g. cwd removed since validation, disk full
            return ("unstartable", job, e)
        finally:
            if spawned is not None:
                spawned.set()
        self._events.put(("started", job, handle))
        # The end is reported first and fsynced after, so the next experiment
        # starts without waiting for the disk (the pool has a thread to spare).
        self._events.put(self._wait(job, handle, sync=False))
        try:
            handle.sync_end()
        except OSError as e:
            self._events.put(("warning", job, f"the end of {job.label()} may not be on disk yet: {e}"))
        return None

    @staticmethod
    def _wait(job: Job, handle: RunHandle, sync: bool = True) -> tuple[str, Job, Any]:
        """In a pool thread: wait for a run (which records its end); never raises.

        Returns ``("exited", job, (exit code, error or None))``.
        """
        try:
            handle.wait(sync=sync)
            return ("exited", job, (handle.returncode, None))  # None: not knowable (see RunHandle.wait)
        except BaseException as e:  # noqa: BLE001 - e.g. disk full: the batch goes on, and says so
            return ("exited", job, (handle.returncode, f"its end could not be recorded: {e}"))

    # ---------------------------------------------------------------- main loop

    def run(self) -> int:
        """Run the whole batch; return the exit status (0 ok, 1 failures, 130 interrupted)."""
        import queue as queue_mod
        import signal
        from concurrent.futures import ThreadPoolExecutor

        require_posix()
        try:
            self._owner_fd = self.state.acquire()
        except OSError as e:  # no room for .exp_state/ (a file in the way, a full disk): run unowned
            self._owner_fd = -1
            self.term.event(f"warning: cannot take {_short_path(self.state.lock_path)} ({e}); queue commands "
                            "and a second `exp run` will not reach this scheduler")
        if self._owner_fd is None:
            raise SchedulerBusyError(
                f"another scheduler is running for {self.state.base_dir}; `exp run` with a config whose "
                "base_experiment_dir is that directory adds its experiments to that scheduler's queue, "
                "or `exp shutdown` it first")
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
            # A closed terminal or a dropped SSH connection (SIGHUP) does not end the batch:
            # it goes on quietly (`exp status`, `exp see`, `exp shutdown` reach it).  A handler,
            # not SIG_IGN, which the commands started later would inherit.
            if hasattr(signal, "SIGHUP"):
                old_handlers[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda signum, frame: None)
        interrupted = False
        # A thread per running experiment, and as many to spare for the fsyncs
        # that follow each end (see _start_and_wait).
        pool = ThreadPoolExecutor(max_workers=2 * self.limit, thread_name_prefix="exp-job")
        # A cluster job's state and node, as they change, go to the state file and metadata.json.
        unsubscribe = self.backend.on_change(lambda: self._events.put(("backend", None, None)))
        try:
            # Under our handlers: a Ctrl-C once the adopted runs are announced is a
            # shutdown (it stops them), not a KeyboardInterrupt out of the middle of this.
            self._recover()
            if self.resume:
                self._skip_finished()
            self.write_state()
            try:
                self._loop(pool)
            except KeyboardInterrupt:
                interrupted = self._status_indicator != SCHEDULER_AWAITING_SHUTDOWN
                self._shutdown()
            # Still under our handlers: a late Ctrl-C cannot skip these.
            self._status_indicator = SCHEDULER_STOPPED
            self.write_state()
            self._print_summary(interrupted)
            self._notify_done(interrupted)
        finally:
            unsubscribe()
            pool.shutdown(wait=False)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
            if self._owner_fd is not None and self._owner_fd >= 0:
                os.close(self._owner_fd)
            self._owner_fd = None
        if interrupted:
            return 130
        # After `exp shutdown`, what never started is not a failure.
        ran = [j for j in self.jobs if not (self._draining and j.status == PENDING)]
        return 0 if all(j.status == FINISHED and not j.error for j in ran) else 1

    def _loop(self, pool: Any) -> None:
        import queue as queue_mod

        for job in list(self.running.values()):  # adopted from a scheduler that died
            if job.handle is not None:
                fut = pool.submit(self._wait, job, job.handle)
                fut.add_done_callback(lambda f: self._events.put(f.result()))
        linger = bool(self.config.linger_when_idle)
        replan_every = float(self.config.check_interval)
        next_replan = next_commands = 0.0
        delay_due_at: float | None = None  # when the next delayed job becomes startable
        while True:
            now = self._clock()
            # Queue commands are looked for every COMMAND_POLL_INTERVAL, not after every event:
            # a batch of short experiments handles hundreds a second.
            if time.monotonic() >= next_commands:
                next_commands = time.monotonic() + COMMAND_POLL_INTERVAL
                mtime = self.state.commands_mtime()
                if mtime != self._commands_seen:
                    self._commands_seen = mtime
                    self._run_commands(pool)
                    # Tasks the commands queued (a retry, a joining config) are due from
                    # the clock's reading then, later than `now`: planned with the older
                    # reading, they would wait for the next check_interval.
                    now = self._clock()
            self._check_timeouts(now)
            # Plan after a change, when a delay ends, and every check_interval
            # (GPUs that others were using may be free again).  The end of a delay is
            # kept as a time, not looked for as "a job not yet due": a wake-up that came
            # late (a loaded machine) would find the job due and so no delay to end,
            # and it waited for the next check_interval.
            delay_ended = delay_due_at is not None and now >= delay_due_at
            if self._draining:
                delay_due_at = None  # nothing more starts
            elif self._replan or delay_ended or now >= next_replan:
                self._replan = False
                next_replan = now + replan_every
                for job in plan_next(self.queue, len(self.running), self.limit, now, self._gpu_plan(now),
                                     self._succeeded, gpus_elsewhere=self.backend.allocates_gpus):
                    self.queue.remove(job)
                    self._launch(pool, job)
                wait = next_wakeup(self.queue, now) if self._may_delay else None
                delay_due_at = None if wait is None else now + wait
            if not self.running and (self._draining or not self.queue):
                if not linger or self._draining:
                    # A last look: an `exp run` may have just sent experiments to join with.
                    if not self._draining and self.state.commands_mtime() != self._commands_seen:
                        self._commands_seen = self.state.commands_mtime()
                        self._run_commands(pool)
                        if self.queue:
                            continue
                    return
                if self._status_indicator != SCHEDULER_AWAITING_SHUTDOWN:
                    self._status_indicator = SCHEDULER_AWAITING_SHUTDOWN
                    self._dirty = True
                    self.term.clear_progress()
                    self.term.event("all experiments done; waiting (linger_when_idle); press Ctrl-C to exit")
            # One write covers every transition handled since the last one,
            # at most every STATE_WRITE_INTERVAL; a pending write bounds the wait.
            if self._dirty and self._clock() >= self._next_state_write:
                self.write_state()
            self._progress()
            timeout = next_wakeup((), now, [j.deadline for j in self.running.values() if j.deadline]
                                  + ([delay_due_at] if delay_due_at is not None else []))
            cap = 1.0 if self.term.tty else float(self.config.check_interval)
            timeout = cap if timeout is None else min(timeout, cap)
            if self._dirty:
                timeout = min(timeout, max(0.0, self._next_state_write - self._clock()))
            timeout = min(timeout, max(0.0, next_commands - time.monotonic()))
            try:
                ev = self._events.get(timeout=timeout)
            except queue_mod.Empty:  # a delay ended (delay_due_at says so), a command may have come, or a tick
                continue
            self._replan = True
            interrupt = False
            while True:
                if ev[0] == "signal":
                    interrupt = True
                else:
                    self._dispatch(ev)
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
        job.ended_at = None
        job.exit_code = None
        job.stop_request = None
        job.t_started = self._clock()
        job.deadline = job.t_started + job.spec.timeout if job.spec.timeout else None
        job.queue_counted = False
        self.running[job.id] = job
        self._touch(job)
        self._dirty = True
        for g in job.gpus:
            self.gpu_use[g] = self.gpu_use.get(g, 0) + 1
        # The files of several starts are made at once, their commands started in dispatch order.
        prev, self._last_spawn = self._last_spawn, threading.Event()
        pool.submit(self._start_and_wait, job, prev, self._last_spawn).add_done_callback(self._post_result)

    def _post_result(self, fut: Any) -> None:
        ev = fut.result()
        if ev is not None:
            self._events.put(ev)

    def _dispatch(self, ev: tuple[str, Job, Any]) -> None:
        if ev[0] == "started":
            self._started(ev[1], ev[2])
        elif ev[0] == "backend":
            self._backend_changed()
        elif ev[0] == "warning":
            self.term.event(f"warning: {ev[2]}")
        else:
            self._handle(ev)

    def _backend_changed(self) -> None:
        """Cluster jobs whose state or node changed: their tasks in the state file, and metadata.json's record."""
        for job in self.running.values():
            if job.handle is None or job.handle.pid is not None:  # a local run: nothing to tell
                continue
            record = job.handle.run.record()
            if record == job.backend_seen:
                continue
            job.backend_seen = record
            self._touch(job)
            self._dirty = True
            if job.experiment is not None and job.run_id:
                try:
                    # Not fsynced: the main loop goes on at once, and a crash loses only a state
                    # or node that the next poll gives again (the job id was fsynced at submission).
                    job.experiment.dir.record_backend(job.run_id, record, sync=False)
                except (OSError, ExpError) as e:
                    self.term.event(f"warning: {job.label()}: {e}")

    def _started(self, job: Job, handle: RunHandle) -> None:
        assert job.experiment is not None
        job.handle, job.run_id, job.work_dir = handle, handle.run_id, job.experiment.work_dir
        self._touch(job)
        self._dirty = True
        gpus = ",".join(map(str, job.gpus)) if job.gpus else "-"
        self.term.event(
            f"{self.term.paint('started ', '36')} {job.label()} (attempt {job.attempt}/{job.max_attempts}, "
            f"GPUs {gpus}) -> {_short_path(job.work_dir, self._cwd)}"
        )
        if job.stop_request is not None:  # killed or timed out while it was starting
            if self._stopping:  # the shutdown stops it with the others; the first reason wins
                handle.request_stop(*job.stop_request)
            else:
                self._stop_jobs([job], *job.stop_request)

    def _handle(self, ev: tuple[str, Job, Any]) -> None:
        kind, job, value = ev
        self.running.pop(job.id, None)
        for g in job.gpus:
            self.gpu_use[g] = max(0, self.gpu_use.get(g, 0) - 1)
        job.deadline = None
        job.ended_at = now_iso()
        job.duration = round(self._clock() - job.t_started, 3)
        if kind == "unstartable":
            job.status, job.exit_code = ERROR, None
            job.error = str(value) if isinstance(value, ExpError) else f"{type(value).__name__}: {value}"
            job.reason = job.error if job.error.startswith("could not start") else f"could not start: {job.error}"
            if job.experiment is not None:
                job.work_dir = job.experiment.work_dir
        else:
            assert job.handle is not None
            job.exit_code, job.error = value
            job.status = job.handle.status
            job.reason = job.handle.reason
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
                for line in tail_lines(log, 10, max_bytes=65536, skip_prefix=LOG_MARK):
                    self.term.plain(f"      {clean_line(line)}")
        # Its own config's auto_restart_on_error (a joining file's may differ) set its attempts.
        retry = kind == "exited" and not self._stopping and job.retryable()
        if retry:
            job.status = PENDING
            job.not_before = self._clock() + job.spec.delay_seconds
            job.handle = None
            self.queue.insert(0, job)
            self.term.event(
                f"{self.term.paint('retrying', '35')} {job.label()} (attempt {job.attempt + 1}/{job.max_attempts})"
            )
        else:
            if (job.status == ERROR and kind == "exited" and job.attempt < job.max_attempts
                    and job.exit_code in NOT_RETRIED_EXIT_CODES and not self._stopping):
                self.term.event(f"not retrying {job.label()}: exit code {job.exit_code} means "
                                f"{NOT_RETRIED_EXIT_CODES[job.exit_code]}, which another attempt cannot fix")
            self.done.append(job)
            if job.status == FINISHED:
                self._succeeded.add(job.id)
            else:
                self._fail_dependents(job)
            self._notify_end(job)
        self._dirty = True

    # ---------------------------------------------------------------- notifications

    def _backend_for(self, job: Job) -> Any:
        return self.backend.for_job(job.spec.slurm, job.spec.gpus, job.spec.timeout)

    def _notify_settings(self, job: Job) -> dict[str, Any]:
        # Per spec, once: a batch asks at each start and each end.
        key = id(job.spec)
        cached = self._notify_cache.get(key)
        if cached is None or cached[0] is not job.spec:
            cached = self._notify_cache[key] = (job.spec, _notify_settings(self.config.scheduler.notify,
                                                                            job.spec.notify))
        return cached[1]

    def _notifier(self, settings: Mapping[str, Any]) -> Notifier | None:
        url = settings.get("lark_webhook")
        if not url:
            return None
        key = (url, settings.get("secret"))
        if key not in self._notifiers:
            self._notifiers[key] = Notifier(url, settings.get("secret"),
                                            report=lambda m: self.term.event(f"warning: {m}"))
        return self._notifiers[key]

    def _notify_end(self, job: Job) -> None:
        """Queue the card of an experiment that ended, if its ``notify.on`` asks for it; never raises."""
        settings = self._notify_settings(job)
        event = "finished" if job.status == FINISHED else "error"
        notifier = self._notifier(settings)
        if notifier is None or event not in settings.get("on", NOTIFY_EVENTS):
            return
        try:
            notifier.send(run_card(job.summary_for_card()))
        except Exception as e:  # noqa: BLE001 - a notification never affects scheduling
            self.term.event(f"warning: notification for {job.label()} not built: {e}")

    def _notify_done(self, interrupted: bool) -> None:
        """One message when the whole batch has ended (``done``), then wait for the queues to empty."""
        by_key: dict[tuple[Any, Any], dict[str, Any]] = {}
        for job in self.jobs:
            st = self._notify_settings(job)
            if st.get("lark_webhook") and "done" in st.get("on", NOTIFY_EVENTS):
                by_key.setdefault((st["lark_webhook"], st.get("secret")), st)
        counts: dict[str, int] = {}
        for job in self.jobs:
            counts[job.status] = counts.get(job.status, 0) + 1
        failed = [j.label() for j in self.jobs if j.status in (ERROR, KILLED)]
        for st in by_key.values():
            notifier = self._notifier(st)
            if notifier is not None:
                # More cards than the bot's limits let through in time: the summary goes instead of them.
                dropped = notifier.drop_queued() if notifier.pending() > 40 else 0
                notifier.send(batch_card(self.config.path, counts, failed, interrupted,
                                         self._clock() - self._t0, _hostname(), dropped))
        deadline = time.monotonic() + 15.0
        for notifier in self._notifiers.values():
            notifier.close(timeout=max(0.0, deadline - time.monotonic()))

    # ---------------------------------------------------------------- crash recovery


    def _recover(self) -> None:
        """Take over from a scheduler of this base directory that died (its state was not "stopped").

        Tasks are matched by name, command, params and repeat.  What ended
        stays ended (nothing runs twice), what still runs (the same process:
        pid and start time) is adopted and waited for, what ended while no
        scheduler watched is recorded with the exit status its supervisor
        wrote, and what was pending runs, in its old directory if it had one.
        """
        try:
            prev = self.state.read()
        except MetadataError as e:
            # Its queue is lost to this scheduler, but its bytes are not: the next write would replace them.
            kept = self.state.set_aside()
            where = f"; it was kept as {_short_path(kept, self._cwd)}" if kept else ""
            self.term.event(f"warning: the previous state file cannot be read ({e}){where}; starting afresh")
            return
        summary = prev.get("summary") if prev else None
        if not prev or not isinstance(summary, dict):
            return
        # A scheduler that ended cleanly leaves nothing to take over but the orphans it kept (runs
        # of a scheduler that died before it, which no config of its had): adopted if this config
        # has them, else kept again, so that they never run twice at once.
        stopped = summary.get("status_indicator") == SCHEDULER_STOPPED
        items: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for group in ("running",) if stopped else ("running", "pending", "finished", "errors"):
            for it in prev.get(group) or []:
                if isinstance(it, dict) and (not stopped or it.get("orphan") is True):
                    items.setdefault(job_key(it.get("name"), it.get("command"), it.get("params"),
                                                   it.get("repeat")), []).append(it)
        if not items:
            return
        adopted = 0
        ended_meanwhile: list[Job] = []
        claimed = {str(it.get("work_dir")) for group in items.values() for it in group if it.get("work_dir")}
        since = str(summary.get("started_at") or "")
        made: dict[str, dict[tuple[Any, ...], list[tuple[ExperimentDir, str, Any]]]] = {}
        pairs = self._match(list(self.jobs), items)
        # Tasks a joining `exp run` added, with some not done: from their config files again.
        joined_paths = sorted({it["config"] for group in items.values() for it in group
                               if isinstance(it.get("config"), str) and it.get("status") in (PENDING, RUNNING)
                               and not stopped})
        for path in joined_paths:
            if path == self.config.path:
                continue
            try:
                joined = load_config(path)
            except ExpError as e:
                self.term.event(f"warning: tasks added from {_short_path(path, self._cwd)} are not recovered: {e}")
                continue
            matched = self._match(self._take_jobs(joined), items)
            pairs += matched
            self.term.event(f"recovered {len(matched)} task(s) added from {_short_path(path, self._cwd)}")
        for job, it in pairs:
            wd, rid, status = it.get("work_dir"), it.get("run_id"), it.get("status")
            attempt = it.get("attempt")
            job.attempt = attempt if isinstance(attempt, int) else 0
            job.work_dir, job.run_id = wd if isinstance(wd, str) else None, rid if isinstance(rid, str) else None
            if status in (FINISHED, ERROR, KILLED):
                self._mark_done(job, status, it.get("exit_code"), it.get("reason"), it)
                continue
            if job.work_dir is None and status in (PENDING, RUNNING):
                # Started just before the crash, before the state file said where: a
                # directory made since for this name, command, sweep values and repeat is this job's.
                found = self._started_unrecorded(job, claimed, since, made)
                if found is not None and found[1] is not None:
                    job.work_dir, job.run_id = found
                    if status == PENDING:  # the state file had not counted this attempt yet
                        job.attempt += 1
                    status = RUNNING
                else:
                    if found is not None:  # its directory was made, its command never started
                        job.work_dir = found[0]
                        status = PENDING
                    if it.get("status") == RUNNING:  # launched, but never ran: this attempt does not count
                        job.attempt = max(0, job.attempt - 1)
            if job.work_dir is not None:
                claimed.add(job.work_dir)
            if job.work_dir is None or not ExperimentDir.is_experiment(job.work_dir):
                continue  # never started: it waits in the queue as before
            job.experiment = Experiment.load(job.work_dir)
            job.experiment.backend = self._backend_for(job)
            if status != RUNNING or job.run_id is None:
                continue  # between attempts: the next one goes in the same directory
            entry = job.experiment.dir.run_entry(job.run_id) or {}
            if entry.get("ended_at"):  # its supervisor recorded the end while no scheduler watched
                self._mark_done(job, entry.get("status"), entry.get("exit_code"), entry.get("reason"), entry)
                ended_meanwhile.append(job)
                continue
            run: Any = None
            try:
                run = self._attach_recorded(job.experiment.dir, job.run_id, entry, it)
                if run is None:  # submitted, but the scheduler died before it wrote the job down
                    run = self.backend.find(f"{job.work_dir}:{job.run_id}", job.experiment.dir.log_path(job.run_id))
                    if run is not None:
                        job.experiment.dir.record_backend(job.run_id, run.record())
            except ExpError:
                run = None
            # Its duration and timeout count from its start, not from now (-inf: no start written).
            t0 = time.time()
            started = _epoch(str(entry.get("started_at")))
            if started != float("-inf"):
                t0 = min(t0, started)
            ticks = getattr(run, "start_ticks", None)  # a local run's, checked by attach
            if run is not None and run.pid is not None and isinstance(ticks, int):
                at = time_from_ticks(ticks)  # started_at has only the second
                if at is not None and -1.5 < at - t0 < 1.5:
                    t0 = at
            handle = RunHandle(job.experiment, run or LocalRun(None, 0), job.run_id,
                               job.experiment.dir.log_path(job.run_id), str(entry.get("started_at") or ""), t0)
            if run is not None and run.poll() is None:
                job.handle, job.status = handle, RUNNING
                job.started_at = entry.get("started_at") if isinstance(entry.get("started_at"), str) else None
                job.t_started = self._clock() - (time.time() - t0)
                job.deadline = job.t_started + job.spec.timeout if job.spec.timeout else None
                self.queue.remove(job)
                self.running[job.id] = job
                exact, _ = job.gpu_request()
                # A run started just before the crash has none in the state file yet; its
                # metadata.json says which it was given (CUDA_VISIBLE_DEVICES).
                job.gpus = [g for g in (it.get("assigned_gpus") or job.experiment.gpu_ids or exact or [])
                            if _is_int(g)]
                for g in job.gpus:
                    self.gpu_use[g] = self.gpu_use.get(g, 0) + 1
                adopted += 1
                what = f"pid {run.pid}" if run.pid is not None else f"job {run.record().get('job_id')}"
                self.term.event(f"adopted  {job.label()} ({what}, still running) -> {_short_path(job.work_dir)}")
            else:  # gone, and nothing recorded its end: the supervisor's status line, if any
                handle.settle()
                self._mark_done(job, handle.status, handle.returncode, handle.reason,
                                job.experiment.dir.run_entry(job.run_id))
                ended_meanwhile.append(job)
        # Directories made by the dead scheduler for a start it did not live to write down.
        t_since = _epoch(since) - 1  # started_at has the second only
        if t_since != float("-inf") and not stopped:
            for base in {os.path.abspath(j.spec.base_dir) for j in self.jobs}:
                for path in remove_unstarted_dirs(base, {j.spec.name for j in self.jobs}, t_since):
                    self.term.event(f"removed {_short_path(path, self._cwd)}: made just before the crash, "
                                    "empty (its experiment had not started)")
        lost = [it for group in items.values() for it in group if it.get("status") in (PENDING, RUNNING)]
        if lost:
            before = len(self._orphans)
            held = self._keep_orphans(lost)
            n_kept = len(self._orphans) - before
            names = ", ".join(f"{it.get('name')} ({it.get('status')})" for it in lost[:10])
            whose = "the scheduler before" if stopped else "the scheduler that died"
            self.term.event(
                f"warning: {len(lost)} task(s) of {whose} are in no config this one has: {names}"
                f"{', ...' if len(lost) > 10 else ''}; run their config again to queue what did not run"
                + (f" ({n_kept} still running: they go on, listed as running here, and a scheduler of their "
                   "config adopts them rather than start them again"
                   + (f"; GPUs {','.join(map(str, held))} stay taken until they end)" if held else ")")
                   if n_kept else ""))
        ended = len(ended_meanwhile)
        for job in ended_meanwhile:  # what the dead scheduler would have done at these ends
            if job.retryable():
                self.done.remove(job)
                job.status, job.handle = PENDING, None
                job.not_before = self._clock() + job.spec.delay_seconds
                self.queue.insert(0, job)
                self._touch(job)
                self.term.event(f"{self.term.paint('retrying', '35')} {job.label()} (attempt {job.attempt + 1}/"
                                f"{job.max_attempts}): it failed while no scheduler watched")
        # Dependents of what failed, then or meanwhile, never run.
        self._fail_dependents(*[job for job in self.done if job.status != FINISHED])
        if adopted or ended or any(j.status != PENDING for j in self.jobs):
            self.term.event(f"recovered the state of the scheduler that died (pid {summary.get('pid')}): "
                            f"{adopted} adopted, {ended} ended meanwhile, {len(self.done)} done, "
                            f"{len(self.queue)} to run")
        self._dirty = True

    def _keep_orphans(self, items: list[dict[str, Any]]) -> list[int]:
        """Runs still going that no task of this scheduler stands for (their config was edited, or is
        not this one): kept in this scheduler's state file as ``running`` (``"orphan": true``) until
        they end, so that ``exp status`` shows them and a later scheduler of their config adopts
        them instead of starting them a second time; their GPUs count as taken.  Returns those GPUs."""
        held: list[int] = []
        for it in items:
            wd, rid = it.get("work_dir"), it.get("run_id")
            if it.get("status") != RUNNING or not isinstance(wd, str) or not isinstance(rid, str):
                continue
            d = ExperimentDir(wd)
            entry = d.run_entry(rid) or {}
            if entry.get("ended_at"):
                continue
            try:
                run = self._attach_recorded(d, rid, entry, it)
            except ExpError:
                continue
            if run is not None and run.poll() is None:
                gpus = [] if self.backend.allocates_gpus else [g for g in it.get("assigned_gpus") or [] if _is_int(g)]
                self._orphans.append((run, gpus, {k: v for k, v in it.items() if k != "orphan"}))
                for g in gpus:
                    self.gpu_use[g] = self.gpu_use.get(g, 0) + 1
                held += gpus
        return held

    def _attach_recorded(self, d: ExperimentDir, rid: str, entry: Mapping[str, Any],
                         item: Mapping[str, Any]) -> LocalRun | SlurmRun | None:
        """The run ``rid`` of ``d`` by what was written down of it (``entry``, its record in
        metadata.json; ``item``, its task in an old state file): a cluster job by its id, a local
        one by its pid and start time; None when neither was written.  ExpError when it cannot be
        attached (a reused pid, another host's)."""
        record = entry.get("backend")
        if isinstance(record, dict) and record.get("backend") == self.backend.name:
            return self.backend.attach({**record, "log_path": d.log_path(rid)})
        pid = entry.get("pid") if _is_int(entry.get("pid")) else item.get("pid")
        if not _is_int(pid):
            return None
        return self.backend.attach({"pid": pid, "start_ticks": entry.get("start_ticks"),
                                    "host": (d.try_read_metadata()[0] or {}).get("hostname")})

    def _prune_orphans(self) -> None:
        """Forget the orphan runs that have ended (their supervisors recorded the ends): their GPUs are free."""
        for orphan in [o for o in self._orphans if o[0].poll() is not None]:
            self._orphans.remove(orphan)
            for gpu in orphan[1]:
                self.gpu_use[gpu] = max(0, self.gpu_use.get(gpu, 0) - 1)
            self._dirty = True

    def _match(self, jobs: list[Job], items: dict[tuple[Any, ...], list[dict[str, Any]]]
               ) -> list[tuple[Job, dict[str, Any]]]:
        """Each job with the old state file's task of the same name, command, params and repeat (taken
        from ``items``), in order."""
        out = []
        for job in jobs:
            key = job_key(job.spec.name, job.spec.command, job.spec.params, job.repeat)
            if items.get(key):
                out.append((job, items[key].pop(0)))
        return out

    def _started_unrecorded(self, job: Job, claimed: set[str], since: str,
                            made: dict[str, dict[tuple[Any, ...], list[tuple[ExperimentDir, str, Any]]]]
                            ) -> tuple[str, str | None] | None:
        """The directory and run of ``job`` if the dead scheduler started it but its state file did not
        say so yet: created since that scheduler started for this name, command and sweep values, with a run that
        has ended since (recorded, or its exit status in the log), has a pid or job id, or that the
        backend finds (a local supervisor by its command line, a Slurm job by its comment).
        Failing that, ``(directory, None)`` for one made for it whose command never started
        (the scheduler was killed in between): that run is recorded as such.

        ``made``: the directories created since, by base directory and task (filled here, one
        scan of each base directory for the whole recovery), each with the repeat its
        metadata.json names (None from an older exp: then any repeat's, in the order found).
        """
        key = job_key(job.spec.name, job.spec.command, job.spec.params, None)
        base = os.path.abspath(job.spec.base_dir)
        if base not in made:
            found: dict[tuple[Any, ...], list[tuple[ExperimentDir, str, Any]]] = {}
            made[base] = found
            for d in scan(base, depth=1):
                meta, _ = d.try_read_metadata()
                rid = meta.get("current_run_id") if meta else None
                if meta and isinstance(rid, str) and str(meta.get("created_at") or "") >= since:
                    found.setdefault(job_key(meta.get("name"), meta.get("command"), meta.get("params"), None),
                                     []).append((d, rid, meta.get("repeat")))
        candidates = made[base].get(key, [])
        unstarted: tuple[ExperimentDir, str] | None = None
        for d, rid, repeat in ([c for c in candidates if c[2] == job.repeat]
                               + [c for c in candidates if not _is_int(c[2])]):
            if d.path in claimed or not os.path.basename(d.path).startswith(job.spec.name + "_"):
                continue
            entry = d.run_entry(rid) or {}
            if entry.get("ended_at") or entry.get("pid") or entry.get("backend"):
                return d.path, rid
            run = self.backend.find(f"{d.path}:{rid}", d.log_path(rid))
            if run is not None:
                d.record_backend(rid, run.record())
                return d.path, rid
            if read_exit_status(d.log_path(rid)) is not None:  # ended, and its end is in the log
                return d.path, rid
            if unstarted is None:
                unstarted = (d, rid)
        if unstarted is not None:
            # Made and marked running, but its command was never started (the scheduler was
            # killed in between): that run is recorded as such, and the job's next attempt
            # goes in this directory instead of leaving it "running" for ever.
            d, rid = unstarted
            try:
                d.record_end(rid, exit_code=None, status=KILLED, duration=0.0,
                             reason="never started: the scheduler was killed while starting it")
            except (OSError, ExpError) as e:
                self.term.event(f"warning: could not record in {_short_path(d.path, self._cwd)} that "
                                f"{rid} never started: {e}")
            return d.path, None
        return None

    def _mark_done(self, job: Job, status: Any, code: Any, reason: Any,
                   times: Mapping[str, Any] | None = None) -> None:
        """``job`` ended before this scheduler: recorded as it ended (``times``: its started_at,
        ended_at and duration, from the old state file or the run's entry)."""
        job.status = status if isinstance(status, str) and status in STATUSES and status != RUNNING else ERROR
        job.exit_code = code if _is_int(code) else None
        job.reason = reason if isinstance(reason, str) else None
        if times is not None:
            for key in ("started_at", "ended_at"):
                if isinstance(times.get(key), str):
                    setattr(job, key, times[key])
            if _is_num(times.get("duration")):
                job.duration = times["duration"]
        if job in self.queue:
            self.queue.remove(job)
        self.done.append(job)
        if job.status == FINISHED:
            self._succeeded.add(job.id)
        self._touch(job)

    def _skip_finished(self, jobs: list[Job] | None = None) -> None:
        """``--resume``: tasks that already finished successfully here (same name, command, params) are done.

        ``jobs``: those to look at (default: the whole queue); for a joining ``exp run --resume``.
        """
        in_queue = {j.id for j in self.queue}
        queued = [j for j in (self.queue if jobs is None else jobs) if j.id in in_queue]
        # A directory a task of this batch already has (recovered after a crash) is not another one's.
        claimed = {os.path.abspath(j.work_dir) for j in self.jobs if j.work_dir}
        done = finished_before(self.config.base_experiment_dir, queued, claimed)
        for job, work_dir in done.items():
            job.work_dir = work_dir
            self._mark_done(job, FINISHED, 0, None)
            job.reason = RESUME_SKIP_REASON
        self.term.event(f"--resume: {len(done)} experiment(s) already finished here are skipped")

    # ---------------------------------------------------------------- commands

    def _run_commands(self, pool: Any) -> None:
        """Act on every command file waiting in ``.exp_state/commands/`` and answer each.

        The state file is rewritten before the answers go out, so whoever has
        an answer sees its effect in ``exp status`` at once.
        """
        answers = []
        for cid, body in self.state.pending_commands():
            try:
                result = self._command(body, pool) if body is not None else {
                    "ok": False, "message": "the command file could not be read"}
            except ConfigError as e:  # a joining config that is wrong: exit 2 there, as for any config error
                result = {"ok": False, "message": str(e), "config_error": True}
            except ExpError as e:
                result = {"ok": False, "message": str(e)}
            except Exception as e:  # noqa: BLE001 - a bad command must never stop the batch
                result = {"ok": False, "message": f"{type(e).__name__}: {e}"}
            answers.append((cid, result))
            self._replan = self._dirty = True
        if answers:
            self.write_state()
        for cid, result in answers:
            try:
                self.state.answer(cid, result)
            except OSError as e:
                self.term.event(f"warning: cannot answer command {cid} ({e})")
        # Where the file system's timestamps are coarse (one per clock tick,
        # or per second), a command written just after this listing can leave
        # the directory's mtime as it was: while the mtime is that recent,
        # the directory is listed again at the next poll.
        if abs(time.time_ns() - self.state.commands_mtime()) < 2_000_000_000:
            self._commands_seen = -1

    def _find(self, tasks: Iterable[Any]) -> tuple[list[tuple[str, list[Job]]], list[str]]:
        """What each task id or experiment name selects (a name: all its tasks), and the unknown ones."""
        found: list[tuple[str, list[Job]]] = []
        unknown: list[str] = []
        for t in tasks:
            text = str(t).strip()
            if text.isdigit():
                jobs = [j for j in self.jobs if j.id == int(text)]
            else:
                jobs = [j for j in self.jobs if text in (j.spec.name, j.spec.template_name)]
            if jobs:
                found.append((text, jobs))
            else:
                unknown.append(text)
        return found, unknown

    def _command(self, body: dict[str, Any], pool: Any) -> dict[str, Any]:
        action = body.get("action")
        tasks = body.get("tasks") or []
        if not isinstance(tasks, list):
            tasks = [tasks]
        if action == "add":
            return self._add(body)
        if action == "shutdown":
            self._draining = True
            now = bool(body.get("now"))
            running = list(self.running.values())
            if now and running:
                self._stop_jobs(running)
            self.term.event(f"shutdown requested{' (now)' if now else ''}: nothing more starts")
            what = "being stopped" if now else "finishing"
            return {"ok": True, "message": f"shutting down: {len(running)} running ({what}), "
                                           f"{len(self.queue)} pending will not start"}
        if action not in ("kill", "retry", "rm", "priority"):
            return {"ok": False, "message": f"unknown action {action!r}"}
        selected, unknown = self._find(tasks)
        jobs = list({id(j): j for _, group in selected for j in group}.values())
        lines = []
        refused_jobs: set[int] = set()  # tasks the action cannot apply to (each said why)
        if action == "priority":
            value = body.get("value")
            if not priority_ok(value):
                return {"ok": False, "message": f"priority must be {PRIORITY_EXPECTED}, got {value!r}"}
        for job in jobs:
            label = f"{job.id} {job.label()}"
            if action == "kill":
                if job.status == RUNNING:
                    self._stop_jobs([job])
                    lines.append(f"terminating {label}")
                elif job in self.queue:
                    self.queue.remove(job)
                    job.status, job.reason, job.ended_at = KILLED, "removed before it started", now_iso()
                    self.done.append(job)
                    self._fail_dependents(job)
                    lines.append(f"removed pending {label}")
                else:
                    lines.append(f"{label} is {job.status}; nothing to kill")
                    refused_jobs.add(job.id)
            elif action == "retry":
                if job in self.done and job.status in (ERROR, KILLED):
                    self.done.remove(job)
                    job.status, job.reason, job.error, job.handle = PENDING, None, None, None
                    job.not_before = self._clock()
                    job.max_attempts = max(job.max_attempts, job.attempt + 1)
                    self.queue.insert(0, job)
                    lines.append(f"queued {label} again (attempt {job.attempt + 1})")
                    # Its dependents that gave up because of it wait for it again.
                    for dep in [d for d in self.done if d.reason == f"dependency failed: {job.name}"]:
                        self.done.remove(dep)
                        dep.status, dep.reason = PENDING, None
                        self.queue.append(dep)
                        self._touch(dep)
                        lines.append(f"queued {dep.id} {dep.label()} again (it waits for {job.label()})")
                else:
                    lines.append(f"{label} is {job.status}; only failed or killed tasks can be retried")
                    refused_jobs.add(job.id)
            elif action == "rm":
                if job in self.queue:
                    self.queue.remove(job)
                    self._fail_dependents(job)  # they would wait for it for ever
                elif job in self.done:
                    self.done.remove(job)  # a success stays in _succeeded: its dependents may still start
                else:
                    lines.append(f"{label} is running; kill it first")
                    refused_jobs.add(job.id)
                    continue
                self.jobs.remove(job)
                self._state_cache.pop(job.id, None)
                lines.append(f"removed {label}")
            else:  # priority
                if job in self.queue:
                    job.priority = int(body["value"])
                    lines.append(f"priority of {label} is now {job.priority}")
                else:
                    lines.append(f"{label} is {job.status}; priority only changes pending tasks")
                    refused_jobs.add(job.id)
            self._touch(job)
        if action == "priority":
            # Dispatch order again: priority high to low, then the order the tasks came in.
            self.queue.sort(key=lambda j: (-j.priority, j.order))
        for t in unknown:
            known = ", ".join(f"{j.id} {j.label()}" for j in self.jobs[:20])
            lines.append(f"no task {t!r} (tasks: {known}{', ...' if len(self.jobs) > 20 else ''})")
        for line in lines:
            self.term.event(f"{action}: {line}")
        # The command fails (exit 1) for an unknown task, a task id the action cannot apply to, or a
        # name none of whose tasks it applies to: `kill rep` that stopped two repeats of three is done.
        refused = [text for text, group in selected if all(j.id in refused_jobs for j in group)]
        return {"ok": not unknown and not refused, "message": "\n".join(lines), "tasks": [j.id for j in jobs]}

    def _stop_jobs(self, jobs: list[Job], reason: str = "terminated by user", status: str = KILLED) -> None:
        """Stop runs (SIGTERM, SIGKILL after kill_timeout, in a thread); one still starting is stopped once started."""
        handles = []
        for job in jobs:
            if job.handle is None:
                job.stop_request = job.stop_request or (reason, status)
            else:
                job.handle.request_stop(reason, status)
                handles.append(job.handle)
        if handles:
            threading.Thread(target=terminate_runs, args=(handles, float(self.config.kill_timeout)),
                             name="exp-stop", daemon=True).start()

    def _add(self, body: dict[str, Any]) -> dict[str, Any]:
        """A second ``exp run`` on this base directory: its experiments join this queue."""
        path = body.get("config")
        if not isinstance(path, str):
            return {"ok": False, "message": "add: no config path"}
        if self._draining:  # its pending tasks were told they will not start; nor will new ones
            return {"ok": False, "message": f"the scheduler of {self.state.base_dir} is shutting down (exp shutdown); "
                                            "run this again once it has exited"}
        config = load_config(path)
        if not self.backend.allocates_gpus:
            check_gpu_requests(config, self.gpu_pool, joining=True)
        new = self._take_jobs(config)
        for w in config.warnings:
            self.term.event(f"warning: {w}")
        self.term.event(f"queued {len(new)} experiment(s) from {_short_path(path)}")
        if body.get("resume"):  # `exp run --resume` joining: what finished here before is done already
            self._skip_finished(new)
            new = [j for j in new if j.status == PENDING]
        return {"ok": True, "message": "\n".join(f"queued {j.id} {j.label()}" for j in new),
                "tasks": [j.id for j in new]}

    def _take_jobs(self, config: BatchConfig) -> list[Job]:
        """The jobs of a joining config, numbered after this batch's and queued."""
        new = expand_jobs(config)
        first = self._last_id  # ids are never reused, even after `exp rm`
        order0 = max((j.order for j in self.jobs), default=-1) + 1
        ids = {j.id: first + j.id for j in new}
        now = self._clock()
        self._last_id += len(new)
        for j in new:
            j.id = ids[j.id]
            j.order += order0
            j.deps = [ids[d] for d in j.deps]
            j.not_before = now + j.spec.delay_seconds
            j.config_path = config.path
            self._may_delay = self._may_delay or bool(j.spec.delay_seconds)
            self.jobs.append(j)
            self.queue.append(j)
        self.queue.sort(key=lambda j: (-j.priority, j.order))
        return new

    def _fail_dependents(self, *failed: Job) -> None:
        """Queued jobs that need one of ``failed`` (directly or not) end as errors without running.

        One pass over the queue and its dependency edges, however many failed
        (recovery hands over every failure of the dead scheduler at once).
        """
        waiting: dict[int, list[Job]] = {}
        for job in self.queue:
            for dep in job.deps:
                waiting.setdefault(dep, []).append(job)
        if not waiting:
            return
        cause: dict[int, str] = {}  # skipped job -> the name of the failure behind it
        todo = [(f.id, f.name) for f in failed]
        for dep, name in todo:  # breadth first (todo grows): the first failure names the cause
            for job in waiting.get(dep, ()):
                if job.id not in cause:
                    cause[job.id] = name
                    todo.append((job.id, name))
        if not cause:
            return
        skipped = [j for j in self.queue if j.id in cause]
        self.queue[:] = [j for j in self.queue if j.id not in cause]
        for job in skipped:
            job.status, job.ended_at = ERROR, now_iso()
            job.reason = f"dependency failed: {cause[job.id]}"
            self._touch(job)
            self.done.append(job)
            self.term.event(f"{self.term.paint('skipped ', '31')} {job.label()} ({job.reason})")

    def _check_timeouts(self, now: float) -> None:
        """Stop running jobs past their timeout: SIGTERM now, SIGKILL after kill_timeout (in a thread).

        A timeout counts the time a job runs: a wait in a cluster's queue is added to its deadline.
        """
        for job in list(self.running.values()):
            if job.deadline is not None and now >= job.deadline:
                if job.handle is not None and not job.queue_counted:
                    waited = job.handle.run.queued()
                    if waited is None:  # still in the cluster's queue
                        job.deadline = now + 1.0
                        continue
                    job.queue_counted = True
                    if waited > 0:
                        job.deadline = job.t_started + waited + float(job.spec.timeout or 0)
                        if now < job.deadline:
                            continue
                job.deadline = None
                self.term.event(f"{self.term.paint('timeout ', '33')} {job.label()} after "
                                f"{format_duration(job.spec.timeout)}; stopping it")
                self._stop_jobs([job], "timeout", ERROR)

    def _gpu_plan(self, now: float) -> GpuPlan | None:
        """Free GPU capacity now; with gpu_free_memory_mb, nvidia-smi is asked again (GPUs used by others)."""
        if not self.gpu_pool:
            return None
        self._prune_orphans()
        unusable: list[int] = []
        limit_mb = self.config.scheduler.gpu_free_memory_mb
        wants = any(j.gpu_request()[1] and j.not_before <= now for j in self.queue)
        if limit_mb is not None and wants and len(self.running) < self.limit:
            for g in detect_gpus() or []:
                used, total = g["memory_used"], g["memory_total"]
                # Only a GPU exp has nothing on: what is used there is someone else's.
                if (used is not None and total is not None and not self.gpu_use.get(g["index"])
                        and used > total - limit_mb):
                    unusable.append(g["index"])
        return GpuPlan(self.gpu_pool, self.config.scheduler.jobs_per_gpu, self.gpu_use, unusable)

    def _progress(self) -> None:
        if not self.term.tty:
            return
        done = len(self.done)
        failed = self.done.failed
        names = ", ".join(j.label() for j in self.running.values()) or "-"
        elapsed = format_duration(self._clock() - self._t0)
        self.term.progress(f"[{done}/{len(self.jobs)} done] running: {names} | failed: {failed} | {elapsed}")

    def _shutdown(self) -> None:
        """Stop launching; stop every running run (SIGKILL after kill_timeout); wait for all ends."""
        import queue as queue_mod

        self._stopping = True
        self.term.clear_progress()
        grace = float(self.config.kill_timeout)
        if self.running:
            self.term.event(f"interrupted: stopping {len(self.running)} running experiment(s) "
                            f"(SIGKILL after {format_duration(grace)}; Ctrl-C again to kill now)")

        asked = [0]  # Ctrl-C / SIGTERM since the first

        def pump(timeout: float) -> bool:
            """Handle ends while the groups go; True (kill now) on a second Ctrl-C or SIGTERM."""
            try:
                ev = self._events.get(timeout=timeout)
            except queue_mod.Empty:
                return False
            except KeyboardInterrupt:  # a second Ctrl-C with no handler installed
                asked[0] += 1
                return True
            if ev[0] == "signal":
                asked[0] += 1
                return True
            self._dispatch(ev)
            return False

        while any(job.handle is None for job in self.running.values()):  # let starts finish, then stop them
            if pump(0.05):
                break
        handles = [job.handle for job in self.running.values() if job.handle is not None]
        terminate_runs(handles, grace, pump)
        while self.running:  # the groups are gone; their ends are being recorded
            if asked[0] >= 2 or pump(0.05):
                # Asked a third time (a cluster that does not say a job ended): stop waiting.
                # The state file keeps them running, and `exp run` of this config adopts them.
                self.term.event(f"warning: not waiting any longer for the end of {len(self.running)} "
                                f"experiment(s) ({', '.join(j.label() for j in self.running.values())}); "
                                "the state file keeps them as running, and `exp run` of this config again "
                                "adopts them")
                self.backend.release([j.handle.run for j in self.running.values() if j.handle is not None])
                break

    def _print_summary(self, interrupted: bool) -> None:
        # Each experiment is counted on one line: one whose end could not be recorded has its own.
        skipped = [j for j in self.jobs if j.status == FINISHED and j.reason == RESUME_SKIP_REASON]
        first = [j for j in self.jobs if j.status == FINISHED and j.attempt == 1 and not j.error
                 and j.reason != RESUME_SKIP_REASON]
        retried = [j for j in self.jobs if j.status == FINISHED and j.attempt > 1 and not j.error]
        failed = [j for j in self.jobs if j.status in (ERROR, KILLED)]
        never = [j for j in self.jobs if j.status == PENDING]
        t = self.term
        t.plain()
        t.plain(f"summary: {len(self.jobs)} experiment(s) in {format_duration(self._clock() - self._t0)}"
                + (" (interrupted)" if interrupted else ""))
        if skipped:
            t.plain(f"  finished before (--resume), skipped: {len(skipped)}")
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


#: The reason given to a task that ``exp run --resume`` finds finished already.
RESUME_SKIP_REASON = "finished before (--resume)"


def format_plan(config: BatchConfig, resume: bool = False) -> str:
    """The dispatch plan of ``--dry-run``, one line per experiment (``resume``: of ``--resume``, which
    skips what already finished)."""
    rows: list[tuple[str, ...]] = [("#", "name", "priority", "command", "cwd", "GPUs", "dir base")]
    # A sweep's points show their values (only when the batch has a sweep).
    swept = any(s.params for s in config.experiments)
    if swept:
        rows[0] = rows[0][:2] + ("params",) + rows[0][2:]
    jobs = expand_jobs(config)
    skipped = finished_before(config.base_experiment_dir, jobs) if resume else {}
    for job in jobs:
        if job in skipped:
            continue
        s = job.spec
        gpus = ",".join(map(str, s.gpu_ids)) if s.gpu_ids else (f"any {s.gpus}" if s.gpus else "-")
        extra = []
        if s.timeout:
            extra.append(f"timeout {format_duration(s.timeout)}")
        if s.depends_on:
            extra.append("after " + ",".join(s.depends_on))
        if s.repeats > 1:
            extra.append(f"repeat {job.repeat}/{s.repeats}")
        if s.max_retries and config.auto_restart_on_error:
            extra.append(f"retries {s.max_retries}")
        if s.delay_seconds:
            extra.append(f"delay {s.delay_seconds:g}s")
        if s.resume:  # continues that directory instead of making one under "dir base"
            extra.append("resumes " + (_short_path(s.resume) if os.sep in s.resume else f"{s.name}_{s.resume}"))
        name = s.name + (f" ({', '.join(extra)})" if extra else "")
        row = (str(job.id), name, str(s.priority), s.command, _short_path(s.cwd), gpus, _short_path(s.base_dir))
        rows.append(row[:2] + (format_params(s.params) or "-",) + row[2:] if swept else row)
    done = (f"; --resume skips {len(skipped)} that finished before: "
            + ", ".join(f"{j.label()} ({_short_path(d)})" for j, d in list(skipped.items())[:10])
            + (", ..." if len(skipped) > 10 else "")) if skipped else ""
    return _table(rows) + (
        f"\n{len(rows) - 1} experiment(s), at most {config.max_concurrent_experiments} at a time{done}; "
        f"state: {_short_path(StateFile(config.base_experiment_dir).path)}"
    )


def _cells(text: str, encoding: str | None) -> int:
    """How many terminal columns ``text`` takes once printed: East Asian wide characters two,
    combining marks none, and what the output's encoding cannot hold as its ``\\uXXXX`` escape."""
    if text.isascii():
        return len(text)
    if encoding:
        try:
            text.encode(encoding)
        except UnicodeEncodeError:
            text = text.encode(encoding, "backslashreplace").decode(encoding, "replace")
        except LookupError:
            pass
    import unicodedata

    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
               for ch in text)


def _table(rows: list[tuple[str, ...]], right: Iterable[int] = ()) -> str:
    # Names and tags come from files anyone may have edited: no escapes reach the terminal.
    rows = [tuple(clean_line(c, 10_000) for c in r) for r in rows]
    enc = getattr(sys.stdout, "encoding", None)
    cells = [[_cells(c, enc) for c in r] for r in rows]
    widths = [max(r[i] for r in cells) for i in range(len(rows[0]))]
    right = set(right)

    def pad(c: str, n: int, w: int, to_right: bool) -> str:
        return " " * (w - n) + c if to_right else c + " " * (w - n)

    return "\n".join(
        "  ".join(pad(c, n, w, i in right and k > 0) for i, (c, n, w) in enumerate(zip(r, cr, widths))).rstrip()
        for k, (r, cr) in enumerate(zip(rows, cells))
    )


# ============================================================================
# Lark / Feishu: settings, the Open API client, the outbox sender, notifications
# ============================================================================
#
# Facts about the API (paths, envelopes, codes, limits) follow the vendor's
# documentation; where it is silent or contradicts itself, the safe choice is
# taken and the comment says so.  The training loop only ever appends a line
# to a run's outbox: a thread sends it, in batches, with retries, and a
# process that dies leaves the outbox for the next run or ``exp lark-sync``.
# Every batch carries a client_token recorded *before* it is sent, so a retry
# (or a later process) replays it instead of adding the rows twice.

LARK_DOMAINS = {"feishu": "https://open.feishu.cn", "lark": "https://open.larksuite.com"}
#: Records per batch_create.  Newer docs allow 1,000; older ones and the error text say 500.
LARK_BATCH_MAX = 500
#: After a first new row, a sender waits this long for more before it sends: fewer, larger requests.
LARK_LINGER = 0.5
#: Seconds one HTTP request may take before it counts as failed (and is retried).
LARK_HTTP_TIMEOUT = 30.0
#: Attempts of one request (retryable failures only) before the sender backs off for longer.
LARK_ATTEMPTS = 6
#: Bigger files need the chunked upload API; a larger attachment is dropped with a warning.
LARK_UPLOAD_MAX = 20 << 20
#: A cached tenant token is replaced this many seconds before it expires.
LARK_TOKEN_MARGIN = 300.0
#: Field types a record cannot write: lookup, formula, and the system fields.
LARK_READ_ONLY_TYPES = frozenset({19, 20, 1001, 1002, 1003, 1004, 1005})
#: Tokens rejected as missing, malformed, invalid or expired: fetch a new one and retry once.
LARK_TOKEN_CODES = frozenset({99991661, 99991663, 99991664, 99991671})
#: Codes worth retrying: rate limits, write conflicts, not ready, timeouts, the catch-all, upload "can retry",
#: a request "submitted repeatedly" (the docs say: retry later), a Base being copied, internal errors.
LARK_RETRY_CODES = frozenset({99991400, 1254290, 1254291, 1254607, 1255040, 1254002, 1061045, 1254608, 1254036,
                              1255001, 1255002, 1255003, 1255004, 1255005})
#: A record refused for one of its cells: the field types each code is about (None: it does not say).
_LARK_CELL_TYPES: dict[int, set[int] | None] = {
    1254060: {1}, 1254061: {2}, 1254062: {3}, 1254063: {4}, 1254064: {5}, 1254065: {7}, 1254066: {11},
    1254067: {18}, 1254068: {15}, 1254069: {17}, 1254072: {13}, 1254074: {21}, 1254130: {1},
    1254303: {17}, 1254106: {17}, 1254015: None}
LARK_CELL_CODES = frozenset(_LARK_CELL_TYPES)
#: Errors no retry fixes until someone acts: credentials, a missing Base or table, permissions.
LARK_PERMANENT_CODES = frozenset({10014, 10003, 99991543, 1254040, 1254041, 1254003, 1254004, 1254302, 1254304,
                                  1254301, 1254306, 99991672, 99991676, 99991662, 99991673})
#: Notifications: the bot's limits (per second, per minute) and its largest body.
WEBHOOK_PER_SECOND, WEBHOOK_PER_MINUTE = 5, 100
#: The bot's answer when it limits the rate anyway (our spacing is measured where we send, the
#: bot's where it receives); such a message, or one lost on the way, is tried again this many times.
WEBHOOK_RATE_LIMITED = 11232
WEBHOOK_RETRIES = 3
WEBHOOK_MAX_BYTES = 20 * 1024
#: When notifications are sent: a run that failed, one that finished, the end of the whole batch.
NOTIFY_EVENTS = ("error", "finished", "done")

_LARK_ENV = {"app_id": ("LARK_APP_ID", "FEISHU_APP_ID"), "app_secret": ("LARK_APP_SECRET", "FEISHU_APP_SECRET")}
WEBHOOK_ENV, WEBHOOK_SECRET_ENV = "LARK_WEBHOOK", "LARK_WEBHOOK_SECRET"


class LarkError(ExpError):
    """A Lark/Feishu API call failed; ``code`` is the API's code (or None), ``retryable`` says whether trying later may help."""

    def __init__(self, message: str, *, code: int | None = None, status: int | None = None,
                 retryable: bool = False, wait: float | None = None) -> None:
        super().__init__(message)
        self.code, self.status, self.retryable, self.wait = code, status, retryable, wait


def _lark_text(v: Any) -> str:
    _expect(isinstance(v, str) and bool(v.strip()), "a non-empty string", v)
    return str(v).strip()


def _lark_domain(v: Any) -> str:
    import re

    if isinstance(v, str) and v.strip().lower() in LARK_DOMAINS:
        return v.strip().lower()
    if isinstance(v, str) and re.match(r"https?://[^/\s]+/?\Z", v.strip()):
        return v.strip().rstrip("/")
    raise ConfigError(f'expected "feishu", "lark" or a base URL such as "https://open.feishu.cn", got {v!r}')


def _lark_seconds(v: Any) -> float:
    _expect(_is_num(v) and 0 <= v < float("inf"), "a number of seconds >= 0", v)
    return float(v)


def _lark_mode(v: Any) -> str:
    _expect(v in ("rows", "summary"), '"rows" or "summary"', v)
    return str(v)


def _lark_extra(v: Any) -> dict[str, Any]:
    _expect(isinstance(v, dict) and all(isinstance(k, str) and k.strip() for k in v)
            and all(isinstance(x, (str, int, float, bool)) for x in v.values()),
            'a table of field names to values, e.g. { project = "llm", run = "{run_id}" }', v)
    return dict(v)


#: Keys of ``lark_config``: what each takes, and a line of help (README table).
LARK_OPTIONS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "url": (_lark_text, "a Base URL (`…/base/<app_token>?table=…&view=…`) or a wiki URL (`…/wiki/<node>?table=…`)"),
    "app_id": (_lark_text, "the app's id (or `LARK_APP_ID` / `FEISHU_APP_ID`)"),
    "app_secret": (_lark_text, "the app's secret (or `LARK_APP_SECRET` / `FEISHU_APP_SECRET`); never written to disk"),
    "app_token": (_lark_text, "the Base's token (from the URL)"),
    "table_id": (_lark_text, "the table (`tbl…`, the URL's `table=`)"),
    "view_id": (_lark_text, "the view (`vew…`, the URL's `view=`); kept for reference"),
    "domain": (_lark_domain, '`"feishu"` (default), `"lark"`, or a base URL of the Open API (a proxy)'),
    "auto_create_fields": (_check_bool, "create a column the table lacks (number or text); default true"),
    "flush_timeout": (_lark_seconds, "seconds a process spends at exit sending what is left; default 10"),
    "mode": (_lark_mode, '`"rows"` (one record per row, default) or `"summary"` (one record per run, updated)'),
    "extra_fields": (_lark_extra, "fixed fields added to every record; `{name}`, `{run_id}`, `{host}` in a string are filled in"),
}


def parse_lark_url(url: str) -> dict[str, str]:
    """The table a Base or wiki URL names: ``app_token`` (or ``wiki_token``), ``table_id``, ``view_id``, ``domain``.

    ``https://x.feishu.cn/base/<app_token>?table=tbl…&view=vew…``, the same
    under ``/wiki/<node_token>`` (resolved to its Base later, over the API),
    and Lark's ``larksuite.com`` forms.  Any other host is taken as the API's
    own base URL (a proxy, or a test server).
    """
    from urllib.parse import parse_qs, urlsplit

    hint = ("expected a Base URL such as https://example.feishu.cn/base/<app_token>?table=<table_id> "
            "or a wiki URL https://example.feishu.cn/wiki/<node_token>?table=<table_id>")
    if not isinstance(url, str):
        raise ConfigError(f"Lark URL: {hint}, got {url!r}")
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"Lark URL {url!r}: {hint}")
    segs = [s for s in parts.path.split("/") if s]
    out: dict[str, str] = {}
    for kind, key in (("base", "app_token"), ("wiki", "wiki_token")):
        if kind in segs and segs.index(kind) + 1 < len(segs):
            out[key] = segs[segs.index(kind) + 1]
            break
    else:
        if any(s in segs for s in ("docx", "docs", "sheets")):
            raise ConfigError(f"Lark URL {url!r}: a Base inside a document or sheet has no token in its URL; "
                              "open the Base on its own (or its wiki page) and copy that URL")
        raise ConfigError(f"Lark URL {url!r}: {hint}")
    query = parse_qs(parts.query)
    for param, key in (("table", "table_id"), ("view", "view_id")):
        if query.get(param) and query[param][0].strip():
            out[key] = query[param][0].strip()
    host = parts.hostname.lower()
    if host.endswith(("larksuite.com", "larksuite.cn")):
        out["domain"] = "lark"
    elif host.endswith(("feishu.cn", "feishu.net", "larkoffice.com")):
        # larkoffice.com serves Feishu tenants too (the docs use it as an alias).
        out["domain"] = "feishu"
    else:
        out["domain"] = f"{parts.scheme}://{parts.netloc}"
    return out


def check_lark_config(value: Any, where: str = "lark_config") -> dict[str, Any]:
    """One layer of Lark settings (a dict or a URL string) checked; ConfigError names every bad key."""
    if isinstance(value, str):
        value = {"url": value}
    import collections.abc

    if not isinstance(value, collections.abc.Mapping):
        raise ConfigError(f"{where}: expected a table of settings or a Base URL string, got {type(value).__name__}")
    out: dict[str, Any] = {}
    problems: list[tuple[str | None, str]] = []
    for key, v in value.items():
        if key not in LARK_OPTIONS:
            problems.append((None, _unknown_key("", str(key), LARK_OPTIONS)))
            continue
        try:
            out[key] = LARK_OPTIONS[key][0](v)
        except ConfigError as e:
            problems.append((str(key), str(e)))
    if "url" in out:
        try:
            parse_lark_url(out["url"])
        except ConfigError as e:
            problems.append(("url", str(e)))
    if problems:
        err = _Problems(problems)
        err.args = ("; ".join(f"{where}.{k}: {m}" if k else f"{where}: {m}" for k, m in problems),)
        raise err
    return out


def merge_lark_layers(*layers: Any) -> dict[str, Any]:
    """Merge layers of ``lark_config`` (dicts, URL strings or None), later winning, in the config's own terms.

    A layer's ``url`` replaces the whole address (``url``, ``app_token``,
    ``table_id``, ``view_id``) of the layers before it; ``extra_fields``
    merge key by key.  Each layer is checked (ConfigError names bad keys).
    """
    out: dict[str, Any] = {}
    for layer in layers:
        if layer is None or layer == "" or layer == {}:
            continue
        checked = check_lark_config(layer)
        if "url" in checked:
            for k in ("url", "app_token", "table_id", "view_id"):
                out.pop(k, None)
        extra = checked.pop("extra_fields", None)
        out.update(checked)
        if extra is not None:
            out["extra_fields"] = {**out.get("extra_fields", {}), **extra}
    return out


def lark_settings(*layers: Any, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The settings a sync uses: layers merged (see :func:`merge_lark_layers`), the URL parsed.

    ``app_id``/``app_secret`` come from ``LARK_APP_ID``/``LARK_APP_SECRET``
    (or the ``FEISHU_`` names) unless a layer gives them.  Keys given beside a
    ``url`` override what the URL says (``domain`` pointing at a proxy, say).
    """
    env = os.environ if environ is None else environ
    merged = merge_lark_layers(*layers)
    out: dict[str, Any] = {}
    for key, names in _LARK_ENV.items():
        for name in names:
            if env.get(name, "").strip():
                out[key] = env[name].strip()
                break
    if "url" in merged:
        out.update(parse_lark_url(merged["url"]))
    out.update((k, v) for k, v in merged.items() if k != "url")
    if "app_token" in merged:
        out.pop("wiki_token", None)
    return out


def lark_missing(settings: Mapping[str, Any]) -> list[str]:
    """The settings a sync still needs (empty when it can run)."""
    missing = [k for k in ("app_id", "app_secret") if not settings.get(k)]
    if not settings.get("app_token") and not settings.get("wiki_token"):
        missing.append("app_token")
    if not settings.get("table_id"):
        missing.append("table_id")
    return missing


def lark_public(settings: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What of the settings may be written down: everything but the secret."""
    if not settings:
        return None
    return {k: v for k, v in settings.items() if k != "app_secret"}


def lark_base_url(domain: str | None) -> str:
    d = (domain or "feishu").strip()
    return LARK_DOMAINS.get(d.lower(), d).rstrip("/")


def lark_sign(timestamp: str, secret: str) -> str:
    """A bot webhook's signature: HMAC-SHA256 keyed by ``"<timestamp>\\n<secret>"`` over nothing, base64."""
    import base64
    import hashlib
    import hmac

    digest = hmac.new(f"{timestamp}\n{secret}".encode(), b"", hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


# ---------------------------------------------------------------- values and fields


def lark_date_ms(value: Any) -> int:
    """Epoch milliseconds from a datetime, an ISO 8601 string or a number (seconds, or ms if very large)."""
    from datetime import date, datetime

    if isinstance(value, bool):
        raise ValueError("a boolean is not a date")
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    if isinstance(value, date):
        return int(datetime(value.year, value.month, value.day).timestamp() * 1000)
    if isinstance(value, (int, float)):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("not a finite number")
        # Seconds and milliseconds since 1970 do not overlap before the year 5138.
        return int(value * 1000) if abs(value) < 1e11 else int(value)
    if isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        return int(datetime.fromisoformat(text).timestamp() * 1000)
    raise ValueError(f"{type(value).__name__} is not a date")


def lark_value(value: Any, field_type: int) -> Any:
    """``value`` as a field of ``field_type`` takes it (JSON-ready); ValueError says why it cannot.

    Attachments (type 17) are not handled here: they need an upload first.
    """
    import math
    import re

    if field_type == 1 or field_type == 3:  # text, single select
        if isinstance(value, float) and not math.isfinite(value):
            return repr(value)
        if isinstance(value, str) and len(value) > 100_000:
            raise ValueError("longer than the 100,000 characters a text cell holds")
        return value if isinstance(value, str) else ("True" if value is True else "False" if value is False
                                                        else format_metric("", value))
    if field_type == 2:  # number (also progress, currency, rating)
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, str):
            value = float(value.strip())
        if not isinstance(value, (int, float)):
            raise ValueError(f"{type(value).__name__} is not a number")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("a number field cannot hold nan or inf")
        return value
    if field_type == 4:  # multi select
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        return [lark_value(v, 1) for v in items]
    if field_type == 5:
        return lark_date_ms(value)
    if field_type == 7:  # checkbox
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on", "1.0"):
            return True
        if text in ("0", "false", "no", "off", "0.0", ""):
            return False
        raise ValueError("not true or false")
    if field_type == 13:  # phone
        phone = value if isinstance(value, str) else str(value) if _is_int(value) else None
        if phone is None or not re.fullmatch(r"\+?\d*", phone) or len(phone) > 64:
            raise ValueError("a phone field takes digits, optionally after +, at most 64")
        return phone
    if field_type == 15:  # URL: an object, a plain string is refused by the API
        if isinstance(value, dict) and isinstance(value.get("link"), str):
            return {"text": str(value.get("text") or value["link"]), "link": value["link"]}
        if isinstance(value, str) and re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", value.strip()):
            return {"text": value.strip(), "link": value.strip()}
        raise ValueError("a URL field takes a link such as https://...")
    if field_type in (11, 23):  # a person, a group chat: their ids
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        return [{"id": str(v)} for v in items]
    if field_type in (18, 21):  # links to other records: record ids
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        return [str(v) for v in items]
    if field_type == 22:  # location: "lng,lat"
        return str(value)
    raise ValueError(f"exp cannot write fields of type {field_type}")


def _fill_extra_fields(extra: Mapping[str, Any], name: str, run_id: str, host: str, work_dir: str) -> dict[str, Any]:
    """``extra_fields`` with ``{name}``, ``{run_id}``, ``{host}`` and ``{work_dir}`` in its texts filled in."""
    subst = {"{name}": name, "{run_id}": run_id, "{host}": host, "{work_dir}": work_dir}
    out = {}
    for k, v in extra.items():
        if isinstance(v, str):
            for pat, text in subst.items():
                v = v.replace(pat, text)
        out[k] = v
    return out


def _lark_row(text_or_row: Any) -> dict[str, Any]:
    """A row as the outbox keeps it: CSV texts become numbers and booleans again."""
    return {k: parse_metric(v) if isinstance(v, str) else v for k, v in text_or_row.items()}


# ---------------------------------------------------------------- the HTTP client

_LARK_TOKENS: dict[tuple[str, str], tuple[str, float]] = {}
_LARK_WIKI: dict[tuple[str, str], str] = {}
_LARK_CACHE_LOCK = threading.Lock()


class LarkClient:
    """The Open API over urllib: a cached tenant token, retries with backoff, JSON in and out.

    ``call`` returns a response's ``data`` or raises :class:`LarkError`
    (``retryable`` when the attempts ran out on a failure that may pass).
    """

    TOKEN_PATH = "/open-apis/auth/v3/tenant_access_token/internal"

    def __init__(self, domain: str | None, app_id: str, app_secret: str, *, timeout: float = LARK_HTTP_TIMEOUT,
                 attempts: int = LARK_ATTEMPTS, sleep: Callable[[float], Any] = time.sleep) -> None:
        self.base = lark_base_url(domain)
        self.app_id, self._secret = app_id, app_secret
        self.timeout, self.attempts, self.sleep = timeout, max(1, attempts), sleep
        self.requests = 0  # HTTP requests made, for reports and the benchmark

    def __repr__(self) -> str:  # never shows the secret
        return f"LarkClient({self.base!r}, app_id={self.app_id!r})"

    def _http(self, method: str, path: str, *, query: Mapping[str, str] | None = None, body: Any = None,
              raw: bytes | None = None, content_type: str | None = None,
              token: str | None = None) -> tuple[int, Any, dict[str, Any]]:
        """One request: (HTTP status, headers, JSON body).  Transport failures raise a retryable LarkError."""
        import http.client
        import json
        import urllib.error
        import urllib.parse
        import urllib.request

        url = self.base + path + ("?" + urllib.parse.urlencode(query) if query else "")
        headers = {"User-Agent": f"exp/{__version__}"}
        data = raw
        if body is not None:
            data = json.dumps(body, ensure_ascii=False, allow_nan=False).encode("utf-8")
            headers["Content-Type"] = "application/json; charset=utf-8"
        elif content_type:
            headers["Content-Type"] = content_type
        if token:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        self.requests += 1
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                status, hdrs, text = resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as e:
            status, hdrs = e.code, e.headers
            try:
                text = e.read()
            except (OSError, http.client.HTTPException):
                text = b""
        except (OSError, http.client.HTTPException, ValueError) as e:  # refused, reset, timed out, dropped
            reason = getattr(e, "reason", None) or e
            raise LarkError(f"Lark {method} {path}: {type(e).__name__}: {reason}", retryable=True) from None
        try:
            payload = json.loads(text.decode("utf-8")) if text else None
        except (UnicodeDecodeError, ValueError):
            payload = None
        if not isinstance(payload, dict):
            raise LarkError(f"Lark {method} {path}: HTTP {status} without a JSON answer", status=status,
                            retryable=status >= 500 or status == 429)
        return status, hdrs, payload

    def token(self, *, fresh: bool = False, tries: int | None = None) -> str:
        """The tenant access token, cached per app for the process and renewed before it expires.

        ``tries``: attempts at fetching it (default the client's); a call that needs one fetches it
        once per its own attempt, so that retries do not nest (6 x 6 requests with the network down).
        """
        key = (self.base, self.app_id)
        with _LARK_CACHE_LOCK:
            cached = _LARK_TOKENS.get(key)
            if fresh:
                _LARK_TOKENS.pop(key, None)
            elif cached and cached[1] - LARK_TOKEN_MARGIN > time.time():
                return cached[0]
        payload = self._retrying("POST", self.TOKEN_PATH, body={"app_id": self.app_id, "app_secret": self._secret},
                                 auth=False, tries=tries)
        tok, expire = payload.get("tenant_access_token"), payload.get("expire")
        if not isinstance(tok, str) or not tok:
            raise LarkError("Lark returned no tenant_access_token; check the domain setting")
        life = float(expire) if isinstance(expire, (int, float)) and not isinstance(expire, bool) else 7200.0
        with _LARK_CACHE_LOCK:
            _LARK_TOKENS[key] = (tok, time.time() + life)
        return tok

    def call(self, method: str, path: str, *, query: Mapping[str, str] | None = None, body: Any = None,
             raw: bytes | None = None, content_type: str | None = None) -> dict[str, Any]:
        """An authorised call; returns its ``data``."""
        payload = self._retrying(method, path, query=query, body=body, raw=raw, content_type=content_type, auth=True)
        data = payload.get("data")
        return data if isinstance(data, dict) else {}

    def _retrying(self, method: str, path: str, *, auth: bool, tries: int | None = None, **kw: Any) -> dict[str, Any]:
        import random

        refreshed = False
        attempt = 0
        limit = tries or self.attempts
        while True:
            try:
                token = self.token(tries=1) if auth else None
                status, headers, payload = self._http(method, path, token=token, **kw)
                code = payload.get("code", payload.get("StatusCode"))
                if code == 0:
                    return payload
                msg = str(payload.get("msg") or payload.get("StatusMessage") or "")[:300]
                if auth and code in LARK_TOKEN_CODES and not refreshed:
                    # Drop the cached token (a retry with it would fail again), fetch one, retry once.
                    refreshed = True
                    self.token(fresh=True, tries=1)
                    continue
                if not auth and code in (10014, 99991543, 10003):
                    raise LarkError(f"Lark rejected the app's credentials (code {code}: {msg}); check app_id and "
                                    "app_secret (LARK_APP_ID / LARK_APP_SECRET)", code=code, status=status)
                wait = None
                if status == 429 or code == 99991400:
                    try:
                        wait = float(headers.get("x-ogw-ratelimit-reset") or "")
                    except (TypeError, ValueError):
                        wait = None
                retry = code in LARK_RETRY_CODES or status >= 500 or status == 429
                raise LarkError(f"Lark {method} {path}: code {code}: {msg}" + (f" (HTTP {status})" if status != 200 else ""),
                                code=code if isinstance(code, int) else None, status=status, retryable=retry, wait=wait)
            except LarkError as e:
                if not e.retryable:
                    raise
                attempt += 1
                if attempt >= limit:
                    raise
                # Exponential backoff with full jitter; the rate limiter's own reset time when it gives one.
                delay = min(30.0, 0.5 * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                if e.wait is not None:
                    delay = max(0.0, min(e.wait, 120.0)) + random.uniform(0.0, 0.2)
                self.sleep(delay)

    # ---- the calls exp makes

    def app_token(self, settings: Mapping[str, Any]) -> str:
        """The Base's token: given, or looked up from a wiki node (cached for the process)."""
        if settings.get("app_token"):
            return str(settings["app_token"])
        node = str(settings["wiki_token"])
        key = (self.base, node)
        with _LARK_CACHE_LOCK:
            if key in _LARK_WIKI:
                return _LARK_WIKI[key]
        data = self.call("GET", "/open-apis/wiki/v2/spaces/get_node", query={"token": node})
        info = data.get("node") or {}
        if info.get("obj_type") != "bitable" or not info.get("obj_token"):
            raise LarkError(f"the wiki page {node} holds a {info.get('obj_type') or 'page'}, not a Base; "
                            "use the URL of a Base")
        with _LARK_CACHE_LOCK:
            _LARK_WIKI[key] = str(info["obj_token"])
        return _LARK_WIKI[key]

    def list_fields(self, app_token: str, table_id: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        page: str | None = None
        path = f"/open-apis/bitable/v1/apps/{app_token}/tables/{table_id}/fields"
        while True:
            query = {"page_size": "100"}
            if page:
                query["page_token"] = page
            data = self.call("GET", path, query=query)
            items.extend(i for i in data.get("items") or [] if isinstance(i, dict))
            page = data.get("page_token")
            if not data.get("has_more") or not page:
                return items

    def create_field(self, app_token: str, table_id: str, name: str, field_type: int) -> dict[str, Any]:
        data = self.call("POST", f"/open-apis/bitable/v1/apps/{app_token}/tables/{table_id}/fields",
                         body={"field_name": name, "type": field_type})
        return data.get("field") or {"field_name": name, "type": field_type}

    def batch_create(self, app_token: str, table_id: str, records: list[dict[str, Any]],
                     client_token: str) -> list[dict[str, Any]]:
        data = self.call("POST", f"/open-apis/bitable/v1/apps/{app_token}/tables/{table_id}/records/batch_create",
                         query={"client_token": client_token}, body={"records": records})
        return data.get("records") or []

    def create_record(self, app_token: str, table_id: str, fields: dict[str, Any], client_token: str) -> str:
        data = self.call("POST", f"/open-apis/bitable/v1/apps/{app_token}/tables/{table_id}/records",
                         query={"client_token": client_token}, body={"fields": fields})
        record = data.get("record") or {}
        rid = record.get("record_id") or record.get("id")
        if not rid:
            raise LarkError("Lark created a record but returned no record_id")
        return str(rid)

    def update_record(self, app_token: str, table_id: str, record_id: str, fields: dict[str, Any]) -> None:
        self.call("PUT", f"/open-apis/bitable/v1/apps/{app_token}/tables/{table_id}/records/{record_id}",
                  body={"fields": fields})

    def upload(self, app_token: str, path: str) -> str:
        """Upload a local file into the Base (upload_all, at most 20 MiB); its file_token."""
        import mimetypes
        import uuid
        import zlib

        with open(path, "rb") as f:
            content = f.read(LARK_UPLOAD_MAX + 1)
        if len(content) > LARK_UPLOAD_MAX:
            raise LarkError(f"{path} is larger than {LARK_UPLOAD_MAX >> 20} MiB, the most one upload takes")
        name = os.path.basename(path)[:250]
        kind = "bitable_image" if (mimetypes.guess_type(name)[0] or "").startswith("image/") else "bitable_file"
        boundary = uuid.uuid4().hex
        parts = []
        for key, val in (("file_name", name), ("parent_type", kind), ("parent_node", app_token),
                         ("size", str(len(content))), ("checksum", str(zlib.adler32(content)))):
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{val}\r\n'.encode())
        safe = name.replace('"', "_").replace("\r", "_").replace("\n", "_")
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{safe}"\r\n'
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + content + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        data = self.call("POST", "/open-apis/drive/v1/medias/upload_all", raw=b"".join(parts),
                         content_type=f"multipart/form-data; boundary={boundary}")
        tok = data.get("file_token")
        if not tok:
            raise LarkError("Lark accepted an upload but returned no file_token")
        return str(tok)


# ---------------------------------------------------------------- the outbox and its sender


class _Outbox:
    """Appends rows to one run's outbox through a descriptor kept open: one write() a row.

    A torn last line (a process killed mid-write) is cut when the file is
    opened.  Appends of whole lines through O_APPEND do not interleave, so
    forked DataLoader workers may share the outbox; a forked child opens its own.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._pid = os.getpid()

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags, 0o644)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd = os.open(self.path, flags, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                tail = _read_tail_fd(fd, size, 1, TAIL_MAX_BYTES)
                cut = tail.rfind(b"\n")
                os.ftruncate(fd, size - len(tail) + cut + 1 if cut >= 0 else 0)
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Append rows, all or nothing (StorageError on a full disk)."""
        import json

        data = "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":"), default=str) + "\n"
                       for r in rows).encode("utf-8")
        if self._pid != os.getpid():
            self._fd, self._pid = None, os.getpid()
        if self._fd is None:
            self._fd = self._open()
        append_checked(self._fd, data, None, self.path)

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None


def _read_outbox(path: str, offset: int, limit: int) -> tuple[list[dict[str, Any]], int, list[int]]:
    """Up to ``limit`` complete rows of an outbox from byte ``offset``: the rows, the offset after
    them, and the offset after each row."""
    import json

    rows: list[dict[str, Any]] = []
    ends: list[int] = []
    try:
        f = _open_regular(path, "rb")
    except FileNotFoundError:
        return rows, offset, ends
    with f:
        f.seek(offset)
        end = offset
        for line in f:
            if not line.endswith(b"\n") or len(rows) >= limit:
                break  # a torn last line is not a row (yet)
            end += len(line)
            try:
                row = json.loads(line)
            except ValueError:
                continue  # unreadable: skipped, never resent forever
            if isinstance(row, dict):
                rows.append(row)
                ends.append(end)
    return rows, end, ends


def lark_pending(exp_dir: ExperimentDir, run_id: str) -> int:
    """Rows of a run's outbox not yet confirmed by Lark."""
    cursor = _read_cursor(exp_dir, run_id)
    count = 0
    try:
        f = _open_regular(exp_dir.lark_outbox_path(run_id), "rb")
    except OSError:
        return 0
    with f:
        f.seek(int(cursor.get("offset") or 0))
        for line in f:
            count += line.endswith(b"\n")
    return count


def _read_cursor(exp_dir: ExperimentDir, run_id: str) -> dict[str, Any]:
    try:
        data = read_json(exp_dir.lark_cursor_path(run_id))
    except (OSError, ValueError, ExpError):
        return {}
    return data if isinstance(data, dict) else {}


class LarkSync:
    """Sends one experiment's outboxes to its table: the work of the sender thread and of ``lark-sync``.

    One sender at a time per experiment directory (a lock on its ``lark``
    folder), so a training process and ``exp lark-sync`` never send the same
    rows.  Warnings (a column dropped, a cell that cannot be converted) go to
    ``warn`` once each.
    """

    def __init__(self, exp_dir: ExperimentDir, settings: Mapping[str, Any], *,
                 warn: Callable[[str], Any] | None = None, client: LarkClient | None = None,
                 context: Mapping[str, Any] | None = None) -> None:
        self.dir = exp_dir
        self.settings = dict(settings)
        missing = lark_missing(self.settings)
        if missing:
            raise ConfigError(f"Lark settings lack {', '.join(missing)}: " + _LARK_HOWTO)
        self.client = client or LarkClient(self.settings.get("domain"), self.settings["app_id"],
                                           self.settings["app_secret"])
        self.table_id = str(self.settings["table_id"])
        self.mode = self.settings.get("mode", "rows")
        self.auto_create = self.settings.get("auto_create_fields", True)
        self.context = dict(context or {})
        self._warn_fn = warn or (lambda m: print(f"exp: warning: {m}", file=sys.stderr))
        self._warned: set[str] = set()
        self._fields: dict[str, dict[str, Any]] | None = None
        self._dropped: set[str] = set()
        self._app_token: str | None = None
        self._uploads: dict[str, str] = {}
        self._tlock: FileLock | None = None
        self.sent = 0
        os.makedirs(os.path.join(exp_dir.path, LARK_DIR), exist_ok=True)
        self._lock = FileLock(os.path.join(exp_dir.path, LARK_DIR))
        self._local = threading.local()

    def warn(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            self._warn_fn(f"lark: {message}")

    @property
    def app_token(self) -> str:
        if self._app_token is None:
            self._app_token = self.client.app_token(self.settings)
        return self._app_token

    # ---- fields

    def fields(self, refresh: bool = False) -> dict[str, dict[str, Any]]:
        if self._fields is None or refresh:
            self._fields = {str(f.get("field_name", "")): f
                            for f in self.client.list_fields(self.app_token, self.table_id)}
        return self._fields

    def _field_for(self, name: str, value: Any) -> dict[str, Any] | None:
        fields = self.fields()
        if name in fields:
            return fields[name]
        if name in self._dropped:
            return None
        if not self.auto_create:
            self._dropped.add(name)
            self.warn(f"the table has no column {name!r} and auto_create_fields is false: that column is not sent")
            return None
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        try:
            with self._table_lock():
                field = self.client.create_field(self.app_token, self.table_id, name, 2 if numeric else 1)
        except LarkError as e:
            if e.code == 1254014:  # created meanwhile by someone else
                fields = self.fields(refresh=True)
                if name in fields:
                    return fields[name]
            if e.retryable:
                raise
            self._dropped.add(name)
            self.warn(f"could not create column {name!r} ({e}): that column is not sent")
            return None
        fields[name] = field
        return field

    def record_fields(self, row: Mapping[str, Any], run_id: str) -> dict[str, Any]:
        """A row as a record's fields: names the table knows, values its field types take."""
        out: dict[str, Any] = {}
        cells = list(_fill_extra_fields(self.settings.get("extra_fields") or {}, str(self.context.get("name", "")),
                                        run_id, str(self.context.get("host", "")), self.dir.path).items())
        cells.extend(row.items())
        for key, value in cells:
            name = key.strip()  # the server strips field names
            if not name or value is None or value == "":
                continue
            field = self._field_for(name, value)
            if field is None:
                continue
            ftype = field.get("type")
            if ftype in LARK_READ_ONLY_TYPES:
                self.warn(f"column {name!r} is read-only (type {ftype}) in the table: not sent")
                continue
            try:
                if ftype == 17:
                    out[name] = self._attachments(value)
                else:
                    out[name] = lark_value(value, int(ftype or 1))
            except (ValueError, TypeError, OSError, LarkError) as e:
                if isinstance(e, LarkError) and e.retryable:
                    raise
                self.warn(f"{name}={str(value)[:80]!r} cannot go into a field of type {ftype} ({e}): that cell is not sent")
        return out

    def _attachments(self, value: Any) -> list[dict[str, str]]:
        out = []
        for item in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(item, dict) and item.get("file_token"):
                out.append({"file_token": str(item["file_token"])})
                continue
            path = os.path.expanduser(str(item))
            if not os.path.isabs(path) and self.context.get("cwd"):
                path = os.path.join(str(self.context["cwd"]), path)
            try:
                st = os.stat(path)
            except OSError:
                raise ValueError(f"{path} is not a file to attach") from None
            # The same file unchanged is uploaded once; rewritten (a plot saved each epoch), again.
            key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
            if key not in self._uploads:
                self._uploads[key] = self.client.upload(self.app_token, path)
            out.append({"file_token": self._uploads[key]})
        return out

    # ---- sending

    def runs_pending(self) -> list[str]:
        return [r for r in self.dir.lark_runs() if lark_pending(self.dir, r)]

    def pump(self, run_id: str) -> int:
        """Send one batch of a run's outbox (or the batch in flight); the rows confirmed (0: none left)."""
        with self._held():
            cursor = _read_cursor(self.dir, run_id)
            if self.mode == "summary":
                return self._pump_summary(run_id, cursor)
            batch = cursor.get("batch")
            if not isinstance(batch, dict):
                batch = self._new_batch(run_id, int(cursor.get("offset") or 0), LARK_BATCH_MAX)
                if batch is None:
                    return 0
                # Recorded before the request: a retry, or the next process after a kill,
                # sends the same records with the same token, and the server keeps one copy.
                cursor["batch"] = batch
                cursor["settings"] = self.public_settings()
                self._save_cursor(run_id, cursor, sync=True)
            while batch["records"]:
                try:
                    with self._table_lock():
                        self.client.batch_create(self.app_token, self.table_id, batch["records"], batch["token"])
                    break
                except LarkError as e:
                    if e.retryable:
                        raise
                    # Refused as a whole (a batch is all or nothing), so nothing was written.
                    if e.code in LARK_CELL_CODES:
                        batch = self._narrow(run_id, cursor, batch, e)  # find the row, leave out its bad cells
                        if batch is None:
                            return 0
                        continue
                    # Otherwise rebuild it from the rows, with fresh field names and types
                    # (a column deleted or retyped meanwhile).
                    cursor.pop("batch", None)
                    self._save_cursor(run_id, cursor)
                    self._fields = None
                    raise
            cursor.pop("batch", None)
            cursor["offset"] = batch["end"]
            cursor["rows"] = int(cursor.get("rows") or 0) + batch["rows"]
            self._save_cursor(run_id, cursor)
            self.sent += batch["rows"]
            return int(batch["rows"])

    def public_settings(self) -> dict[str, Any]:
        """Where this sync sends, without the secret, in lark_config's terms (kept in the cursor for lark-sync)."""
        out = {k: v for k, v in self.settings.items() if k in LARK_OPTIONS and k != "app_secret"}
        if self._app_token:
            out["app_token"] = self._app_token
        return out

    def _new_batch(self, run_id: str, offset: int, limit: int,
                   drop: Mapping[int, set[str]] | None = None) -> dict[str, Any] | None:
        import uuid

        rows, end, ends = _read_outbox(self.dir.lark_outbox_path(run_id), offset, limit)
        if not rows:
            return None
        records = []
        for i, r in enumerate(rows):
            fields = self.record_fields(r, run_id)
            for name in (drop or {}).get(i, ()):
                fields.pop(name, None)
            if fields:
                records.append({"fields": fields})
        return {"token": str(uuid.uuid4()), "start": offset, "end": end, "ends": ends, "rows": len(rows),
                "records": records}

    def _narrow(self, run_id: str, cursor: dict[str, Any], batch: dict[str, Any],
                error: LarkError) -> dict[str, Any] | None:
        """A batch refused for one bad cell: send its first half, down to the row itself; in that
        row, leave out the cells of the field types the error names (or the row, if it names none)."""
        start = int(batch.get("start", cursor.get("offset") or 0))
        n = int(batch["rows"])
        if n > 1:
            new = self._new_batch(run_id, start, max(1, n // 2))
        else:
            row = _read_outbox(self.dir.lark_outbox_path(run_id), start, 1)[0]
            types = _LARK_CELL_TYPES.get(error.code or 0)
            fields = batch["records"][0]["fields"] if batch["records"] else {}
            known = self.fields()
            bad = {k for k in fields if types is None or known.get(k, {}).get("type") in types}
            if not bad:  # none of its cells is of the type named: the row itself goes
                bad, types = set(fields), None
            for k in sorted(bad):
                self.warn(f"Lark refused {k}={str(fields[k])[:80]!r} ({error}): that cell is not sent")
            if types is None:
                self.warn(f"Lark refused a row ({error}): it is not sent; it stays in the CSV")
            new = self._new_batch(run_id, start, 1, {0: bad})
        cursor["batch"] = new
        if new is None:
            cursor.pop("batch", None)
        self._save_cursor(run_id, cursor, sync=True)
        return new

    def _table_lock(self) -> Any:
        """One write at a time to a table from this machine (the API asks for it: concurrent writes conflict)."""
        import contextlib
        import hashlib
        import tempfile

        if self._tlock is None:
            key = f"{self.client.base}|{self.app_token}|{self.table_id}".encode()
            uid = os.getuid() if hasattr(os, "getuid") else 0
            path = os.path.join(tempfile.gettempdir(), f"exp-lark-{uid}-{hashlib.sha1(key).hexdigest()[:16]}.lock")
            self._tlock = FileLock(path)
        lock = self._tlock

        @contextlib.contextmanager
        def held() -> Iterator[None]:
            try:
                lock.__enter__()
            except OSError:  # no lock to be had (a read-only /tmp): go on unserialised
                yield
                return
            try:
                yield
            finally:
                lock.__exit__()

        return held()

    def _save_cursor(self, run_id: str, cursor: dict[str, Any], sync: bool = False) -> None:
        write_json_atomic(self.dir.lark_cursor_path(run_id), cursor, sync=sync)

    def summary_fields(self, run_id: str, last: Mapping[str, Any], status: str | None = None) -> dict[str, Any]:
        """The run's record in summary mode: who and what it is, and each metric's last value."""
        meta: dict[str, Any] = {}
        try:
            meta = self.dir.read_metadata()
        except ExpError:
            pass
        run = next((r for r in meta.get("runs") or [] if isinstance(r, dict) and r.get("id") == run_id), {})
        row: dict[str, Any] = {"name": meta.get("name") or self.context.get("name"), "run": run_id,
                               "status": status or run.get("status") or RUNNING,
                               "tags": ", ".join(t for t in meta.get("tags") or [] if isinstance(t, str)) or None,
                               "host": meta.get("hostname"), "start": run.get("started_at")}
        if run.get("duration") is not None:
            row["duration"] = run["duration"]
        else:
            t0 = _epoch(run.get("started_at") if isinstance(run.get("started_at"), str) else None)
            if t0 > float("-inf"):
                row["duration"] = round(time.time() - t0, 1)
        params = meta.get("params")
        if isinstance(params, dict):
            row.update({str(k): v for k, v in params.items() if isinstance(v, (str, int, float, bool))})
        row.update(last)
        return self.record_fields(row, run_id)

    def _pump_summary(self, run_id: str, cursor: dict[str, Any], status: str | None = None) -> int:
        import uuid

        offset = int(cursor.get("offset") or 0)
        rows, end, _ = _read_outbox(self.dir.lark_outbox_path(run_id), offset, 100_000)
        if not rows and cursor.get("record_id") and status is None:
            return 0
        last = dict(cursor.get("last") or {})
        for r in rows:
            last.update({k: v for k, v in r.items() if v is not None and v != ""})
        fields = self.summary_fields(run_id, last, status)
        if not cursor.get("record_id"):
            # A create whose answer was lost is replayed with its token and the very body it had (Lark
            # answers a token with another body 1255006, and the record would never be made); the
            # fields as they are now then go in as an update.
            if not cursor.get("create_token"):
                cursor.update(create_token=str(uuid.uuid4()), create_fields=fields)
                self._save_cursor(run_id, cursor, sync=True)
            created = cursor.get("create_fields")
            if not isinstance(created, dict):  # a token an older exp saved alone
                created = fields
            with self._table_lock():
                cursor["record_id"] = self.client.create_record(self.app_token, self.table_id, created,
                                                                cursor["create_token"])
                cursor.pop("create_fields", None)
                if fields != created:
                    self._save_cursor(run_id, cursor)  # the record exists: never created twice
                    self.client.update_record(self.app_token, self.table_id, cursor["record_id"], fields)
        else:
            with self._table_lock():
                self.client.update_record(self.app_token, self.table_id, cursor["record_id"], fields)
        cursor.update(offset=end, rows=int(cursor.get("rows") or 0) + len(rows), last=last)
        self._save_cursor(run_id, cursor)
        self.sent += len(rows)
        return max(1, len(rows)) if rows else 0

    def summary_update(self, run_id: str, status: str | None = None) -> None:
        """Create or update a run's summary record now (the run's start, its end)."""
        with self._held():
            self._pump_summary(run_id, _read_cursor(self.dir, run_id), status or RUNNING)

    def drain(self, run_ids: Iterable[str] | None = None, deadline: float | None = None) -> tuple[int, int]:
        """Send until the outboxes are empty or ``deadline`` (time.time()) passes: (sent, left)."""
        sent = 0
        runs = list(run_ids) if run_ids is not None else self.dir.lark_runs()
        # The lock held throughout: a second sender (lark-sync, a parent after a kill) waits and
        # finds nothing left, instead of taking turns and each fetching a token and the fields.
        with self._held():
            for rid in runs:
                while deadline is None or time.time() < deadline:
                    n = self.pump(rid)
                    if not n:
                        break
                    sent += n
        return sent, sum(lark_pending(self.dir, r) for r in runs)

    def _held(self) -> Any:
        """The experiment's sender lock, re-entrant within a thread (drain holds it across pumps)."""
        import contextlib

        local = self._local

        @contextlib.contextmanager
        def held() -> Iterator[None]:
            if getattr(local, "depth", 0):
                local.depth += 1
                try:
                    yield
                finally:
                    local.depth -= 1
                return
            with self._lock:
                local.depth = 1
                try:
                    yield
                finally:
                    local.depth = 0

        return held()


_LARK_HOWTO = ("give them in lark_config (app_id, app_token, table_id, or a Base URL as `url`), and the secret "
               "in LARK_APP_SECRET (or FEISHU_APP_SECRET)")


class _LarkSender:
    """The background thread of a training process: sends its experiment's outboxes as rows come."""

    def __init__(self, sync: LarkSync, run_id: str, flush_timeout: float, warn: Callable[[str], Any]) -> None:
        self.sync, self.run_id, self.flush_timeout, self._warn = sync, run_id, flush_timeout, warn
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._stop = False
        self._blocked = False  # by an error no retry fixes: nothing to wait for at exit
        self._thread = threading.Thread(target=self._loop, name=f"exp-lark-{run_id}", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        self._idle.clear()
        self._wake.set()

    def _loop(self) -> None:
        failures = 0
        started = False
        said_permanent = False
        while True:
            self._wake.wait()
            if not self._stop:
                time.sleep(LARK_LINGER)  # let rows gather into one request
            self._wake.clear()
            try:
                if self.sync.mode == "summary" and not started:
                    self.sync.summary_update(self.run_id)
                started = True
                # Older runs' leftovers too (a run killed mid-sync), until they are sent.
                for rid in self.sync.runs_pending() + [self.run_id]:
                    while self.sync.pump(rid):
                        pass
                failures = 0
                self._idle.set()
            except Exception as e:  # noqa: BLE001 - a sender must never take the training down
                failures += 1
                # What no retry can fix (credentials refused, no such table): one warning, and no waiting
                # for it at exit; it is tried again every few minutes, in case it is fixed meanwhile.
                permanent = not isinstance(e, LarkError) or (not e.retryable and e.code in LARK_PERMANENT_CODES)
                what = e if isinstance(e, LarkError) else f"{type(e).__name__}: {e}"
                self._blocked = permanent
                if permanent and not said_permanent:
                    said_permanent = True
                    self._warn(f"lark: {what}; syncing waits for this to be fixed, trying again every few "
                               f"minutes; the rows stay in {self.sync.dir.lark_outbox_path(self.run_id)} (or run: "
                               f"python exp.py lark-sync {self.sync.dir.path})")
                elif failures == 1 and not permanent:
                    self._warn(f"lark: {what}; retrying")
                if permanent or (self._stop and failures >= 3):
                    self._idle.set()  # the flush at exit says what is left
                self._wake.set()
                time.sleep(300.0 if permanent else min(60.0, 2.0 ** failures))

    def flush(self, timeout: float | None = None) -> int:
        """Wait (at most ``timeout``, default ``flush_timeout``) until the outbox is sent; the rows left."""
        self._stop = True
        self._wake.set()
        limit = self.flush_timeout if timeout is None else timeout
        deadline = time.time() + limit
        while time.time() < deadline and self._thread.is_alive() and not self._blocked:
            if self._idle.wait(min(0.05, max(0.0, deadline - time.time()))) and not self._wake.is_set():
                break
        return sum(lark_pending(self.sync.dir, r) for r in self.sync.dir.lark_runs())


_LARK_SENDERS: dict[tuple[str, str], _LarkSender] = {}
_LARK_FINAL: list[tuple[threading.Thread, float]] = []


def _lark_in_background(target: Callable[[], Any], name: str, timeout: float, join: bool = False) -> None:
    """Run ``target`` on a daemon thread that the process waits for at exit (at most ``timeout``),
    or right away with ``join``."""
    t = threading.Thread(target=target, name=name, daemon=True)
    t.start()
    if join:
        t.join(timeout)
        return
    _LARK_FINAL.append((t, timeout))
    if len(_LARK_FINAL) == 1:
        import atexit

        atexit.register(_join_lark_final)


def _join_lark_final() -> None:
    for t, timeout in list(_LARK_FINAL):
        t.join(timeout)
_LARK_SENDERS_LOCK = threading.Lock()


def _lark_sender(exp_dir: ExperimentDir, run_id: str, settings: Mapping[str, Any], name: str,
                 warn: Callable[[str], Any]) -> _LarkSender:
    key = (exp_dir.path, run_id)
    with _LARK_SENDERS_LOCK:
        sender = _LARK_SENDERS.get(key)
        if sender is None:
            # Imported here, once: an import in the sender's thread would hold the
            # GIL in bursts while the training loop runs.
            import http.client  # noqa: F401
            import json  # noqa: F401
            import urllib.request  # noqa: F401
            import uuid  # noqa: F401

            sync = LarkSync(exp_dir, settings, warn=warn,
                            context={"name": name, "host": _hostname(), "cwd": os.getcwd()})
            sender = _LarkSender(sync, run_id, float(settings.get("flush_timeout", 10.0)), warn)
            if not _LARK_SENDERS:
                import atexit

                atexit.register(_flush_lark_senders)
            _LARK_SENDERS[key] = sender
    return sender


def _flush_lark_senders() -> None:
    """At exit: give each sender ``flush_timeout`` to finish, then say what is left and how to send it."""
    with _LARK_SENDERS_LOCK:
        senders = list(_LARK_SENDERS.values())
    for s in senders:
        left = s.flush()
        if left:
            s._warn(f"lark: {left} row{'s' if left != 1 else ''} not sent yet; they are kept in "
                    f"{os.path.dirname(s.sync.dir.lark_outbox_path(s.run_id))}; send them with: "
                    f"python exp.py lark-sync {s.sync.dir.path}")


# ---------------------------------------------------------------- notifications


def _notify_settings(*layers: Any, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Merge ``notify`` tables (later wins) over ``LARK_WEBHOOK``/``LARK_WEBHOOK_SECRET``."""
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {"on": list(NOTIFY_EVENTS)}
    if env.get(WEBHOOK_ENV, "").strip():
        out["lark_webhook"] = env[WEBHOOK_ENV].strip()
    if env.get(WEBHOOK_SECRET_ENV, "").strip():
        out["secret"] = env[WEBHOOK_SECRET_ENV].strip()
    for layer in layers:
        if layer:
            out.update(check_notify(layer))
    return out


def check_notify(v: Any) -> dict[str, Any]:
    """A ``notify`` table checked: ``lark_webhook`` (URL), ``secret``, ``on`` (a list of NOTIFY_EVENTS)."""
    import re

    if not isinstance(v, dict):
        raise ConfigError(f'expected a table such as {{ lark_webhook = "https://...", on = ["error"] }}, got {v!r}')
    problems: list[tuple[str | None, str]] = []
    out: dict[str, Any] = {}
    for key, val in v.items():
        if key == "lark_webhook":
            if not (isinstance(val, str) and re.match(r"https?://\S+\Z", val.strip())):
                problems.append((key, f"expected the bot's webhook URL (https://.../open-apis/bot/v2/hook/...), got {val!r}"))
            else:
                out[key] = val.strip()
        elif key == "secret":
            if not isinstance(val, str):
                problems.append((key, f"expected a string, got {type(val).__name__}"))
            else:
                out[key] = val
        elif key == "on":
            if not (isinstance(val, list) and all(x in NOTIFY_EVENTS for x in val)):
                problems.append((key, f"expected a list of {', '.join(map(repr, NOTIFY_EVENTS))}, got {val!r}"))
            else:
                out[key] = list(val)
        else:
            problems.append((None, _unknown_key("", str(key), ("lark_webhook", "secret", "on"))))
    if problems:
        raise _Problems(problems)
    return out


_NOTIFY_COLORS = {FINISHED: "green", ERROR: "red", KILLED: "orange", "done": "blue"}


def _trim_to(text: str, limit: int) -> str:
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return "…" + data[len(data) - limit + 3:].decode("utf-8", "ignore")


def notification_card(title: str, status: str, lines: list[tuple[str, str]], log_tail: str = "",
                      max_bytes: int = WEBHOOK_MAX_BYTES) -> dict[str, Any]:
    """An interactive card: a coloured title, ``key: value`` lines, the log's last lines; trimmed to fit.

    Everything is ``plain_text``: names, paths and log lines are shown as
    they are, never read as markup.
    """
    import json

    def build(tail: str, width: int) -> dict[str, Any]:
        body = "\n".join(f"{k}: {v[:width]}" for k, v in lines if v)
        elements: list[dict[str, Any]] = [{"tag": "div", "text": {"tag": "plain_text", "content": body}}]
        if tail:
            elements.append({"tag": "hr"})
            elements.append({"tag": "div", "text": {"tag": "plain_text", "content": tail}})
        return {"msg_type": "interactive", "card": {
            "config": {"wide_screen_mode": True},
            "header": {"title": {"tag": "plain_text", "content": title[:200]},
                       "template": _NOTIFY_COLORS.get(status, "grey")},
            "elements": elements}}

    # Room for the signature fields a signed message adds.
    budget = max_bytes - 200
    tail, width = log_tail, 2000
    while True:
        card = build(tail, width)
        size = len(json.dumps(card, ensure_ascii=False).encode("utf-8"))
        if size <= budget:
            return card
        if tail:
            tail = _trim_to(tail, max(0, len(tail.encode("utf-8")) - (size - budget) - 64))
            if len(tail) < 8:
                tail = ""
        elif width > 40:
            width //= 2
        else:
            return build("", 40)


class _WebhookWindow:
    """The bot's rate limits (:data:`WEBHOOK_PER_SECOND`, :data:`WEBHOOK_PER_MINUTE`) as a sliding window:
    :meth:`wait` returns when one more message may go."""

    def __init__(self) -> None:
        import collections

        self._sent: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()

    def wait(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                while self._sent and now - self._sent[0] > 60:
                    self._sent.popleft()
                recent = sum(1 for t in self._sent if now - t < 1.0)
                if len(self._sent) < WEBHOOK_PER_MINUTE and recent < WEBHOOK_PER_SECOND:
                    self._sent.append(now)
                    return
                if len(self._sent) >= WEBHOOK_PER_MINUTE:
                    pause = max(0.01, 60 - (now - self._sent[0]) + 0.01)
                else:
                    pause = max(0.01, 1.0 - (now - self._sent[-WEBHOOK_PER_SECOND]) + 0.01)
            time.sleep(pause)


def _post_within_limits(url: str, message: dict[str, Any], secret: str | None, window: _WebhookWindow,
                        timeout: float = 10.0, unreachable_again: bool = True,
                        failed: Callable[[LarkError], Any] | None = None) -> None:
    """:func:`post_webhook` within ``window``, tried again (up to :data:`WEBHOOK_RETRIES` times) when the
    bot limits it (code 11232) or (``unreachable_again``) cannot be reached; LarkError when it still fails."""
    for attempt in range(WEBHOOK_RETRIES + 1):
        window.wait()
        try:
            post_webhook(url, message, secret, timeout=timeout)
            return
        except LarkError as e:
            if failed is not None:
                failed(e)
            again = e.code == WEBHOOK_RATE_LIMITED or (e.retryable and unreachable_again)
            if again and attempt < WEBHOOK_RETRIES:
                time.sleep(1.0 + attempt)  # past the bot's one-second window, longer each time
                continue
            raise


#: The window of exp.notify() calls in this process.
_NOTIFY_WINDOW: list[_WebhookWindow] = []


class Notifier:
    """Sends bot messages from a queue on its own thread, within the bot's rate limits; never raises.

    Failures are reported through ``report`` (the scheduler's output).
    """

    def __init__(self, webhook: str, secret: str | None = None, *,
                 report: Callable[[str], Any] | None = None, timeout: float = 10.0) -> None:
        import queue

        self.webhook, self._secret, self.timeout = webhook, secret, timeout
        self.report = report or (lambda m: print(f"exp: {m}", file=sys.stderr))
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._window = _WebhookWindow()
        self._busy = False  # a message is being sent (taken from the queue, not yet sent or failed)
        self._last_error: str | None = None
        self.sent = self.failed = 0
        self._thread = threading.Thread(target=self._loop, name="exp-notify", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return "Notifier(<webhook>)"

    def send(self, message: dict[str, Any]) -> None:
        self._queue.put(message)

    def pending(self) -> int:
        return self._queue.qsize()

    def drop_queued(self) -> int:
        """Take back the messages not sent yet (a batch end that cannot wait for them); how many."""
        import queue

        dropped = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return dropped
            if item is None:
                self._queue.put(None)
                return dropped
            dropped += 1

    def close(self, timeout: float = 10.0) -> int:
        """Send what is queued (at most ``timeout`` seconds), then stop; the messages left unsent, each
        said (none is dropped without a word, the one being sent included)."""
        self._queue.put(None)
        self._thread.join(timeout)
        left = (self.drop_queued() + (1 if self._busy else 0)) if self._thread.is_alive() else 0
        if left:
            why = (f"the webhook still failed ({self._last_error})" if self._last_error
                   else "the bot's rate limit did not leave time")
            self.report(f"{left} notification(s) not sent within {timeout:g} s at the batch's end: {why}")
        return left

    def _loop(self) -> None:
        while True:
            message = self._queue.get()
            if message is None:
                return
            self._busy = True
            try:
                _post_within_limits(self.webhook, message, self._secret, self._window, self.timeout,
                                    failed=lambda e: setattr(self, "_last_error", str(e)))
                self.sent += 1
                self._last_error = None
            except Exception as e:  # noqa: BLE001 - the thread must go on for the next message
                self.failed += 1
                self._last_error = str(e)
                self.report(f"notification not sent: {e}")
            finally:
                self._busy = False


def post_webhook(url: str, message: dict[str, Any], secret: str | None = None, *, timeout: float = 10.0) -> None:
    """POST one message to a bot webhook, signed when ``secret`` is set; LarkError on failure."""
    import json
    import urllib.error
    import urllib.request

    body = dict(message)
    if secret:
        ts = str(int(time.time()))  # a string, as the official examples send it
        body.update(timestamp=ts, sign=lark_sign(ts, secret))
    data = json.dumps(body, ensure_ascii=False, allow_nan=False).encode("utf-8")
    import http.client

    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json; charset=utf-8"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            text = resp.read()
    except urllib.error.HTTPError as e:
        raise LarkError(f"webhook answered HTTP {e.code}", status=e.code) from None
    except OSError as e:  # refused, reset, timed out: trying again may help
        raise LarkError(f"webhook unreachable: {getattr(e, 'reason', None) or e}", retryable=True) from None
    except (ValueError, http.client.HTTPException) as e:  # a bad URL, an answer that is not HTTP
        raise LarkError(f"webhook unreachable: {e}") from None
    try:
        payload = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise LarkError("webhook answered without JSON") from None
    code = payload.get("code", payload.get("StatusCode")) if isinstance(payload, dict) else None
    if code != 0:
        msg = payload.get("msg") or payload.get("StatusMessage") if isinstance(payload, dict) else ""
        raise LarkError(f"webhook refused the message (code {code}: {msg})", code=code)


def notify(text: str, *, webhook: str | None = None, secret: str | None = None) -> bool:
    """Send a text message to the Lark/Feishu group bot; from a training script, say.

    The webhook comes from ``webhook`` or ``LARK_WEBHOOK`` (the scheduler sets
    it for its experiments when ``notify`` is configured), the signing secret
    from ``secret`` or ``LARK_WEBHOOK_SECRET``.  A failure, no webhook at all
    included, is a warning on stderr and False, never an exception: a
    notification never stops a training (one run outside a batch with
    ``notify``, say).  Calls keep within the bot's rate limits, and one the
    bot still limits (11232) is tried again up to 3 times; an unreachable
    webhook is not, so that the script does not wait on it.
    """
    url = webhook or os.environ.get(WEBHOOK_ENV, "").strip()
    if not url:
        print(f"exp: warning: notification not sent: no webhook; pass exp.notify(..., webhook=...) or set "
              f"{WEBHOOK_ENV} (in a batch: [scheduler] notify = {{ lark_webhook = ... }})", file=sys.stderr)
        return False
    if secret is None:
        secret = os.environ.get(WEBHOOK_SECRET_ENV) or None
    import json

    text, limit = str(text), WEBHOOK_MAX_BYTES - 200  # room for a signature
    message = {"msg_type": "text", "content": {"text": text}}
    while len(json.dumps(message, ensure_ascii=False).encode("utf-8")) > limit and text:
        over = len(json.dumps(message, ensure_ascii=False).encode("utf-8")) - limit
        text = text[: max(0, len(text) - max(over // 2, 16))].rstrip() + "…"  # escapes grow, so step again
        message = {"msg_type": "text", "content": {"text": text}}
    if not _NOTIFY_WINDOW:
        _NOTIFY_WINDOW.append(_WebhookWindow())
    try:
        # A training script waits for this call: a bot that limits it is waited for (it answers), one
        # that cannot be reached is not tried again.
        _post_within_limits(url, message, secret, _NOTIFY_WINDOW[0], unreachable_again=False)
        return True
    except LarkError as e:
        print(f"exp: warning: notification not sent: {e}", file=sys.stderr)
        return False


#: One line for a failure cause recognised in a log's last lines.
_LOG_CAUSES = (
    (r"CUDA out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED", "CUDA out of memory"),
    (r"NCCL (?:error|WARN)|ncclInternalError|ncclSystemError|NCCL communicator", "NCCL error"),
    (r"\bloss\b[^\n]{0,40}\bnan\b|\bnan\b[^\n]{0,20}\bloss\b|NaN loss|non-finite loss", "NaN loss"),
    (r"^\s*Killed\s*$|\bKilled\b", "Killed"),
)


def run_card(info: Mapping[str, Any]) -> dict[str, Any]:
    """The card of an experiment that ended: name, status and why, duration, host, GPUs, metrics, log, path."""
    status = str(info.get("status") or "")
    reason = str(info.get("reason") or "")
    cause = log_cause(str(info.get("log_tail") or "")) if status != FINISHED else None
    if cause and cause.lower() not in reason.lower():
        reason = f"{reason}; {cause}" if reason else cause
    word = {FINISHED: "finished", ERROR: "failed", KILLED: "killed"}.get(status, status)
    metrics = info.get("metrics") or {}
    lines = [("status", word + (f" ({reason})" if reason and status != FINISHED else "")),
             ("duration", format_duration(info.get("duration"))),
             ("host", str(info.get("host") or "")),
             ("GPUs", ",".join(map(str, info.get("gpus") or [])) or "none"),
             ("last values", ", ".join(f"{k}={v}" for k, v in list(metrics.items())[:20])),
             ("path", str(info.get("path") or ""))]
    if int(info.get("attempts") or 1) > 1:
        lines.insert(1, ("attempt", f"{info.get('attempt')}/{info.get('attempts')}"))
    return notification_card(f"{info.get('name')} {word}", status, lines, str(info.get("log_tail") or ""))


def batch_card(source: str, counts: Mapping[str, int], failed: list[str], interrupted: bool,
               seconds: float, host: str, dropped: int = 0) -> dict[str, Any]:
    """The one message at the end of a batch: how many finished, failed, were killed; which failed."""
    total = sum(counts.values())
    parts = [f"{counts[k]} {k}" for k in (FINISHED, ERROR, KILLED, PENDING) if counts.get(k)]
    lines = [("experiments", f"{total}: " + ", ".join(parts)), ("took", format_duration(seconds)),
             ("host", host), ("config", source)]
    if failed:
        lines.append(("failed", ", ".join(failed[:30]) + (f" and {len(failed) - 30} more" if len(failed) > 30 else "")))
    if dropped:
        lines.append(("not sent", f"{dropped} experiment card(s), over the bot's rate limit"))
    status = ERROR if failed or interrupted else "done"
    title = f"batch {'interrupted' if interrupted else 'done'}: {os.path.basename(source)}"
    return notification_card(title, status, lines)


def log_cause(tail: str) -> str | None:
    """A one-line cause recognised in a log's last lines (CUDA out of memory, NCCL error, NaN loss, Killed)."""
    import re

    for pattern, cause in _LOG_CAUSES:
        if re.search(pattern, tail, re.I | re.M):
            return cause
    return None


# ============================================================================
# Listing experiments (exp ls)
# ============================================================================

#: Metric modes of ``ls --columns NAME:MODE``; ``best`` is ``min`` for names
#: that look like a loss, an error or a latency, and ``max`` for anything else.
METRIC_MODES = ("last", "best", "min", "max")
#: Words anywhere in a name (``val_loss``, ``top1_error``), and abbreviations only as words of their
#: own (``val_ppl``, ``evalWER``, ``nll2``): as parts of longer words they are other things
#: (``answer_acc``, ``cancer_auc``, ``apple_score``).
_LOWER_IS_BETTER_RE = _LazyRe(r"loss|err|perplexity|latency|(?<![a-z])(?:ppl|nll|mse|mae|rmse|wer|cer)(?![a-z])")
_CAMEL_RE = _LazyRe(r"([a-z])([A-Z])")


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` is better (its name looks like a loss, an error, a latency)."""
    return bool(_LOWER_IS_BETTER_RE.search(_CAMEL_RE.sub(r"\1_\2", metric).lower()))

#: ``ls`` shows at most this many metric columns unless --columns names them.
LS_DEFAULT_METRIC_COLUMNS = 6
#: Sort keys of ``ls --sort`` besides metric names.
LS_FIELDS = ("name", "status", "started", "duration", "runs", "dir")


def list_experiments(base_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The :meth:`ExperimentDir.summary` of every experiment under ``base_dir`` (and one level down), newest first.

    ``base_dir`` may be one experiment's directory itself: that one is listed.
    A directory with a metadata.json but not an experiment's folders (a
    project's own file beside its ``results``) is scanned, and listed itself
    only when it holds no experiment.  StorageError when ``base_dir`` cannot be read.
    """
    base = os.fspath(base_dir)
    try:
        os.scandir(base).close()
    except OSError as e:
        raise StorageError(f"cannot list {base}: {e.strerror or e}") from None
    if ExperimentDir.looks_like_experiment(base):
        dirs = [ExperimentDir(base)]
    else:
        dirs = scan(base)
        if not dirs and ExperimentDir.is_experiment(base):
            dirs = [ExperimentDir(base)]
    rows = [d.summary() for d in dirs]
    rows.sort(key=lambda r: (_epoch(r["started_at"] or r["created_at"]), *_dir_order(r["work_dir"])), reverse=True)
    return rows


def _local_time_text(iso: str | None) -> str:
    """An ISO 8601 time as ``YYYY-MM-DD HH:MM:SS`` in this machine's time zone ("-" for none)."""
    t = _epoch(iso)
    if t == float("-inf"):
        return (iso or "-")[:19].replace("T", " ")
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _dir_order(work_dir: str) -> tuple[str, int]:
    """Same-second directories in the order they were made: ``x_<time>_10`` after ``x_<time>_9``."""
    stem, sep, n = work_dir.rpartition("_")
    if sep and n.isdigit() and len(n) < 8:
        return stem, int(n)
    return work_dir, 1


#: Longest name filter (``exp ls --name``, the dashboard's ``name=``), in characters.
NAME_FILTER_MAX_CHARS = 500
#: Most repetitions (``*``, ``+``, ``{m,n}``) one branch of a name filter may chain.  Python's ``re``
#: backtracks: ``.*.*.*.*x`` takes time like the name's length to the 5th power, and no budget can
#: stop a match once started, so what could run long is refused before it starts.
NAME_FILTER_MAX_REPEATS = 3
#: Names are matched up to this many characters (exp's own names are shorter: a directory name
#: holds them), which bounds what a match of an allowed pattern can cost.
NAME_FILTER_NAME_CHARS = 255
#: Seconds the dashboard spends on one list's name filter before it answers 400 instead.
NAME_FILTER_SECONDS = 2.0


def name_pattern(text: str) -> re.Pattern[str]:
    """``text`` compiled as a name filter; ExpError (with what to change) when it is invalid, or could be slow.

    Refused: nested repetition and repeated alternatives (``(a+)+``,
    ``(a|ab)*``: exponential time), more than
    :data:`NAME_FILTER_MAX_REPEATS` repetitions in a row (``.*.*.*.*x``:
    polynomial, but of a high degree) and backreferences.
    """
    import re

    try:  # Python's own parser of regular expressions (a private module, named so since 3.11)
        from re import _parser as sre_parse  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover - Python < 3.11
        import sre_parse
    if len(text) > NAME_FILTER_MAX_CHARS:
        raise ExpError(f"the name regular expression is longer than {NAME_FILTER_MAX_CHARS} characters")
    try:
        pattern = re.compile(text)
        tree = sre_parse.parse(text)
    except re.error as e:
        raise ExpError(f"invalid regular expression {text!r}: {e}") from None

    def degree(items: Any, repeated: bool) -> int:
        """How many repetitions the sequence ``items`` chains (the most of any of its branches)."""
        total = 0
        for op, av in items:
            kind = str(op)
            if kind in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                many = av[1] > 1
                inner = degree(av[2], repeated or many)
                if many and (repeated or inner):
                    raise ExpError(f"the name regular expression {text!r} repeats something that repeats, as in "
                                   "(a+)+ or (a|ab)*, which can take exponential time: write it without the "
                                   "nesting (a+, [ab]+)")
                total += inner + many
            elif kind == "BRANCH":
                if repeated:
                    raise ExpError(f"the name regular expression {text!r} repeats alternatives, as in (a|ab)*, "
                                   "which can take exponential time: use a character class ([ab]+) or no repetition")
                total += max(degree(b, repeated) for b in av[1])
            elif kind == "SUBPATTERN":
                total += degree(av[-1], repeated)
            elif kind in ("ASSERT", "ASSERT_NOT"):
                total += degree(av[1], repeated)
            elif kind == "ATOMIC_GROUP":
                total += degree(av, repeated)
            elif kind in ("GROUPREF", "GROUPREF_EXISTS"):
                raise ExpError(f"the name regular expression {text!r} has a backreference, which a name filter "
                               "does not take")
        return total

    n = degree(tree, False)  # SubPattern is a sequence of (op, argument)
    if n > NAME_FILTER_MAX_REPEATS:
        raise ExpError(f"the name regular expression {text!r} chains {n} repetitions (*, +, {{m,n}})"
                       f"; at most {NAME_FILTER_MAX_REPEATS} are taken, so that matching stays fast")
    return pattern


def filter_experiments(rows: list[dict[str, Any]], status: str | None = None, tag: str | None = None,
                       name: str | None = None) -> list[dict[str, Any]]:
    pattern = name_pattern(name) if name else None
    return [
        r for r in rows
        if (status is None or r["status"] == status)
        and (tag is None or tag in r["tags"])
        and (pattern is None or pattern.search(r["name"] or "", 0, NAME_FILTER_NAME_CHARS))
    ]


def parse_columns(spec: str, default: str = "last") -> list[tuple[str, str]]:
    """``"loss,acc:max"`` -> ``[("loss", default), ("acc", "max")]``; ConfigError naming a bad mode."""
    out = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, mode = part.rpartition(":") if ":" in part else (part, "", default)
        if mode not in METRIC_MODES:
            raise ConfigError(f"--columns {part!r}: the mode after ':' must be one of {', '.join(METRIC_MODES)} "
                              f"(a metric whose name has a ':' takes its mode too: {part}:{default})")
        if not name.strip():
            raise ConfigError(f"--columns {part!r}: name the metric before ':', e.g. loss:{mode}")
        out.append((name, mode))
    if not out:
        raise ConfigError(f"--columns {spec!r}: name at least one metric, e.g. --columns loss,acc:best")
    return out


def metric_value(row: Mapping[str, Any], key: str, mode: str = "last") -> Any:
    """One metric of a summary row: its last value, or its best/min/max over the current run.

    A metric logged as text or true/false (``last_text``) has its last value
    as written; ``best`` gives that too (text has no best), ``min``/``max`` None.
    """
    if mode == "last":
        v = row["last_metrics"].get(key)
        return (row.get("last_text") or {}).get(key) if v is None else v
    rid = row.get("current_run_id")
    if not rid:
        return None
    values = [v for v in metric_column(ExperimentDir(row["work_dir"]).metrics_path(rid), key)
              if _is_num(v) and v == v]
    if not values:
        return (row.get("last_text") or {}).get(key) if mode == "best" else None
    if mode == "best":
        mode = "min" if lower_is_better(key) else "max"
    return min(values) if mode == "min" else max(values)


#: The longest text metric ``exp ls`` shows in a cell (the rest is cut, ending in "…").
LS_TEXT_CELL_CHARS = 40


def _fmt_value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, str) and len(v) > LS_TEXT_CELL_CHARS:
        return v[:LS_TEXT_CELL_CHARS - 1] + "…"
    return str(v)


def _sort_key(value: Any) -> tuple[int, Any]:
    # Missing values sort last whichever the direction (NaN too: it has no place among numbers);
    # numbers before text.  A summary's non-finite metrics arrive as the strings json_safe made.
    if value is None or value == "" or value == "nan" or (isinstance(value, float) and value != value):
        return (2, 0)
    if _is_num(value):
        return (0, value)
    if value in ("inf", "-inf"):
        return (0, float(value))
    return (1, str(value))


def _sorted_missing_last(items: Iterable[Any], key: Callable[[Any], tuple[Any, ...]], desc: bool = False) -> list[Any]:
    """``items`` ordered by ``key`` (a :func:`_sort_key` tuple, more may follow), ``desc`` reversing it;
    those whose value is missing (rank 2) last whichever the direction, in the order given."""
    keyed = [(key(x), x) for x in items]
    present = [kx for kx in keyed if kx[0][0] != 2]
    present.sort(key=lambda kx: kx[0], reverse=desc)
    return [x for _, x in present] + [x for k, x in keyed if k[0] == 2]


def default_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every metric seen in the rows' last values, in first-seen order: numbers first, then text."""
    seen: dict[str, None] = {}
    for r in rows:
        for k in r["last_metrics"]:
            seen.setdefault(k, None)
    for r in rows:
        for k in r.get("last_text") or ():
            seen.setdefault(k, None)
    return list(seen)


def has_metric(rows: Iterable[Mapping[str, Any]], key: str) -> bool:
    """Whether some row has a last value (a number or text) for metric ``key``."""
    return any(key in r["last_metrics"] or key in (r.get("last_text") or ()) for r in rows)


def _reason_text(row: Mapping[str, Any]) -> str:
    """``"exit code 1: ValueError: bad lr"`` for a run that did not finish; ``""`` for one that did or runs."""
    if row.get("status") in (FINISHED, RUNNING, PENDING) or not (row.get("reason") or row.get("cause")):
        return ""
    return ": ".join(t for t in (row.get("reason"), row.get("cause")) if t)


#: The columns before the metrics in ``exp ls``'s table, and in its ``--group`` table.
LS_LEAD_COLUMNS = ("name", "status", "started", "duration", "runs")
LS_GROUP_LEAD_COLUMNS = ("name", "n", "status")


def _listing_dir(row: Mapping[str, Any], base_dir: str) -> str:
    """The ``dir`` column of ``exp ls``: the experiment's directory relative to the listed one."""
    try:
        return os.path.relpath(row["work_dir"], base_dir)
    except ValueError:
        return row["dir"]


def sort_rows(rows: list[dict[str, Any]], sort: str | None, desc: bool = False, base_dir: str = ".",
              mode: str = "last", value: Callable[[dict[str, Any]], Any] | None = None) -> list[dict[str, Any]]:
    """Summary rows in ``exp ls --sort`` order; rows without the value last whichever the direction.

    ``sort`` is a metric (its ``mode`` value, or what ``value(row)`` gives),
    else a sweep parameter, else one of :data:`LS_FIELDS`.
    """
    if not sort:
        return list(rows)
    metric = has_metric(rows, sort)
    get = value or (lambda r: metric_value(r, sort, mode))

    def key(r: dict[str, Any]) -> tuple[int, Any]:
        if metric or sort not in LS_FIELDS:
            v = get(r) if metric else None
            return _sort_key(v if v is not None else (r.get("params") or {}).get(sort))
        when = r["started_at"] or r["created_at"]
        return _sort_key({"started": _epoch(when) if when else None, "dir": _listing_dir(r, base_dir)}.get(sort, r.get(sort)))

    return _sorted_missing_last(rows, key, desc)


def _metric_label(key: str, mode: str) -> str:
    # A metric named like a column of the table (``dir``, ``status``) says which it is.
    if mode == "last" and key not in (*LS_LEAD_COLUMNS, "dir", "params", "reason"):
        return key
    return f"{key} ({mode})"


def build_listing(rows: list[dict[str, Any]], columns: list[tuple[str, str]], base_dir: str,
                  sort: str | None = None, desc: bool = False, group: bool = False,
                  sort_mode: str = "last") -> list[tuple[str, ...]]:
    """The table of ``exp ls``: a header row, then one row per experiment (or per name with ``group``).

    ``sort_mode`` is how a ``sort`` metric that is not one of ``columns`` is
    taken (``last``, or ``best`` under ``--best``).
    """
    labels = [_metric_label(k, m) for k, m in columns]
    if not group:
        # Each cell read once (``best`` reads the run's metrics file), the sort's too.
        values = {id(r): [metric_value(r, k, m) for k, m in columns] for r in rows}
        at = next((i for i, (k, _) in enumerate(columns) if k == sort), None)
        items = sort_rows(rows, sort, desc, base_dir, sort_mode,
                          None if at is None else (lambda r: values[id(r)][at]))
        # A params column (sweep values) only when some experiment shown has them.
        swept = any(r.get("params") for r in items)
        params_label = ("params",) if swept else ()
        # A reason column (why a run ended, and the cause seen in its log) only when some row has one; last,
        # as it is the longest.
        reasons = [_reason_text(r) for r in items]
        reason_label = ("reason",) if any(reasons) else ()
        table: list[tuple[str, ...]] = [(*LS_LEAD_COLUMNS, *labels, *params_label,
                                         "dir", *reason_label)]
        for r, why in zip(items, reasons):
            started = _local_time_text(r["started_at"] or r["created_at"])
            params = (format_params(r.get("params") or {}) or "-",) if swept else ()
            table.append(((r["name"] or "?") + (" *" if r.get("dirty") else ""), r["status"] or "?", started,
                          format_duration(r["duration"]), str(r["runs"]),
                          *map(_fmt_value, values[id(r)]), *params,
                          _listing_dir(r, base_dir), *((why or "-",) if reason_label else ())))
        return table

    groups = sort_groups(group_rows(rows, _group_columns(rows, columns, sort, sort_mode)), sort, desc)
    # The sweep point of each group, when some group has one (repeats of different points are apart).
    swept = any(g["params"] for g in groups)
    table = [(*LS_GROUP_LEAD_COLUMNS, *(f"{lbl} (mean ± std)" for lbl in labels), *(("params",) if swept else ()))]
    for g in groups:
        cells = []
        for k, _ in columns:
            st = g["metric_stats"][k]
            if st["mean"] is None:
                cells.append("-")
            else:
                cell = f"{st['mean']:.4g}" if st["std"] is None else f"{st['mean']:.4g} ± {st['std']:.2g}"
                # Over fewer than the group's members (some have no finite value: not logged, NaN,
                # diverged to inf): say how many, or a diverged repeat would look like a clean mean.
                cells.append(cell if st["n"] == g["n"] else f"{cell} ({st['n']} of {g['n']})")
        table.append((g["name"], str(g["n"]), _group_status_text(g), *cells,
                      *((format_params(g["params"]) or "-",) if swept else ())))
    return table


def _group_columns(rows: list[dict[str, Any]], columns: list[tuple[str, str]], sort: str | None,
                   sort_mode: str) -> list[tuple[str, str]]:
    """The metrics to group by: ``columns``, and the ``sort`` metric when it is not one of them."""
    if sort and not any(k == sort for k, _ in columns) and has_metric(rows, sort):
        return [*columns, (sort, sort_mode)]
    return list(columns)


def _group_status_text(group: Mapping[str, Any]) -> str:
    return ", ".join(f"{n} {s}" for s, n in group["statuses"].items())


def group_rows(rows: list[dict[str, Any]], columns: list[tuple[str, str]],
               values: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The repeats of each experiment together: rows grouped by name and sweep parameters.

    Each group is ``{name, params, n, statuses, started_at, duration,
    metric_stats: {key: {mean, std, n}}}``: ``started_at`` is its latest
    start, ``duration`` the mean of its members' durations; ``std`` is the
    sample standard deviation, None for a single value; values that are not
    finite numbers are left out.  Experiments of one name with different
    parameters (the points of a sweep) are different groups: averaging them
    together would mix what is being compared.
    """
    import statistics

    if values is None:
        values = [{f"{k}:{m}": metric_value(r, k, m) for k, m in columns} for r in rows]
    members: dict[tuple[str, str], list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    point: dict[tuple[str, str], dict[str, Any]] = {}
    dumps = _json().dumps
    for r, vals in zip(rows, values):
        params = r.get("params") or {}
        key = (r["name"] or "?", dumps(params, sort_keys=True))
        members.setdefault(key, []).append((r, vals))
        point.setdefault(key, params)

    def finite(xs: Iterable[Any]) -> list[Any]:
        return [x for x in xs if _is_num(x) and x == x and x not in (float("inf"), float("-inf"))]

    out = []
    for key, group in members.items():
        name = key[0]
        statuses: dict[str, int] = {}
        for r, _ in group:
            statuses[r["status"] or "?"] = statuses.get(r["status"] or "?", 0) + 1
        metrics: dict[str, dict[str, Any]] = {}
        for k, m in columns:
            nums = finite(vals[f"{k}:{m}"] for _, vals in group)
            mean: float | None = None
            std: float | None = None
            try:
                if nums:
                    mean = statistics.fmean(nums)
                if len(nums) > 1:
                    std = statistics.stdev(nums)
            except OverflowError:  # values beyond a float's range (a huge int, sums past 1.8e308)
                mean = std = None
            metrics[k] = {"mean": mean, "std": std, "n": len(nums)}
        starts = [r["started_at"] or r["created_at"] for r, _ in group if r["started_at"] or r["created_at"]]
        durations = finite(r["duration"] for r, _ in group)
        out.append({"name": name, "params": dict(point[key]), "n": len(group), "statuses": statuses,
                    "started_at": max(starts, key=_epoch) if starts else None,
                    "duration": statistics.fmean(durations) if durations else None,
                    "metric_stats": metrics})
    return out


#: Sort keys of ``exp ls --group --sort`` besides metrics and sweep parameters (a group has no one ``dir``).
LS_GROUP_FIELDS = ("name", "status", "started", "duration", "runs")


def sort_groups(groups: list[dict[str, Any]], sort: str | None, desc: bool = False) -> list[dict[str, Any]]:
    """:func:`group_rows`' groups in ``exp ls --group --sort`` order: by a metric's mean (of the
    metrics the groups were made with), a sweep parameter, or one of :data:`LS_GROUP_FIELDS`
    (``runs`` is the count, ``started`` the latest start, ``duration`` the mean); groups without
    the value last either way."""
    if not sort:
        return groups

    def gkey(g: dict[str, Any]) -> tuple[int, Any]:
        stats = g["metric_stats"].get(sort)
        if stats is not None:
            return _sort_key(stats["mean"])
        if sort in g["params"]:
            return _sort_key(g["params"][sort])
        if sort == "started":
            return _sort_key(_epoch(g["started_at"]) if g.get("started_at") else None)
        fields = {"name": g["name"], "runs": g["n"], "status": _group_status_text(g), "duration": g.get("duration")}
        return _sort_key(fields.get(sort))

    return _sorted_missing_last(groups, gkey, desc)


def format_listing(rows: list[dict[str, Any]], base_dir: str = ".", columns: list[tuple[str, str]] | None = None,
                   **kwargs: Any) -> str:
    """``exp ls``'s table as text (every metric column unless ``columns`` picks some)."""
    cols = columns if columns is not None else [(k, "last") for k in default_columns(rows)]
    return _table(build_listing(rows, cols, base_dir, **kwargs)) + ("" if kwargs.get("group") else _dirty_note(rows))


def _dirty_note(rows: list[dict[str, Any]]) -> str:
    """The footnote for the `` *`` that ``exp ls`` puts after a dirty experiment's name ("" if none)."""
    if not any(r.get("dirty") for r in rows):
        return ""
    return f"\n* started from a work tree with uncommitted changes (its {CODE_DIFF_FILE} holds the diff)"


# ============================================================================
# Dashboard (exp see): readers for the page, the experiment index, the server
# ============================================================================
#
# Three layers, so that each can be tested on its own:
#   * pure readers (read_log_chunk, read_metrics_chunk, preview_file, query_experiments,
#     compare_experiments, ...) that take paths and plain values and return JSON-able dicts;
#   * Dashboard: one base directory, the experiment index, and the mapping from an API
#     route's parameters to those readers (every id and path checked to stay inside DIR);
#   * DashboardServer and its handler: HTTP, tokens, Host/Origin checks, headers.  The
#     handler only parses a request and writes a response.

DASHBOARD_PORT = 6066
DASHBOARD_PAGE = "exp_ui.html"
#: Seconds an index snapshot is served before the directories' mtimes are checked again.
DASHBOARD_INDEX_TTL = 0.5
#: Seconds between full rescans, which also look at experiments that have ended.
DASHBOARD_FULL_RESCAN = 5.0
DASHBOARD_MAX_BODY = 1 << 20
PREVIEW_MAX_BYTES = 256 << 10
LOG_CHUNK_DEFAULT = 64 << 10
LOG_CHUNK_MAX = 4 << 20
#: How far into a log its opening ``[exp]`` lines are looked for, to hide the secrets of an old log's
#: command line (a shell takes a command of at most 128 KiB, so these lines are shorter than this).
LOG_HEADER_MAX_BYTES = 1 << 20
LOG_TAIL_MAX_LINES = 10000
METRICS_CHUNK_DEFAULT = 512 << 10
FILE_TREE_MAX = 2000
COMPARE_MAX = 50
_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
                ".webp": "image/webp", ".bmp": "image/bmp"}
_PARAM_FILTER_RE = _LazyRe(r"^\s*([^=<>!]+?)\s*(>=|<=|!=|=|>|<)\s*(.*?)\s*$")
_EXP_SORT_FIELDS = ("name", "status", "created_at", "started_at", "ended_at", "duration", "runs", "exit_code")


class DashboardError(ExpError):
    """A request the dashboard refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _not_found(what: str = "not found") -> DashboardError:
    return DashboardError(404, what)


def redact_secrets(value: Any) -> Any:
    """A copy of JSON-like ``value`` without secrets: ``lark_config`` dropped, secret-looking keys ``"***"``.

    ``environment`` is redacted by :func:`redact_env` (variable names); any
    other key that looks like a secret, at any depth, has its value hidden.
    """
    if isinstance(value, list):
        return [redact_secrets(v) for v in value]
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for k, v in value.items():
        key = str(k)
        if key == "lark_config":
            continue
        if key in ("environment", "env") and isinstance(v, dict):
            out[key] = redact_secrets(redact_env(v))
        elif v is not None and _secret_field(key):
            out[key] = "***"  # whatever it holds, a list or a table too
        elif key == "command" and isinstance(v, str):
            out[key] = redact_command(v)
        elif isinstance(v, (dict, list)):
            out[key] = redact_secrets(v)
        else:  # a scalar holds nothing more to hide
            out[key] = v
    return out


_SECRET_FIELDS: dict[str, bool] = {}


def _secret_field(key: str) -> bool:
    """Whether a key names a secret; remembered, since a listing asks of the same few keys thousands of times."""
    found = _SECRET_FIELDS.get(key)
    if found is None:
        found = secret_name(key)
        if len(_SECRET_FIELDS) < 4096:
            _SECRET_FIELDS[key] = found
    return found


def resolve_inside(root: str, rel: str) -> str | None:
    """``root/rel`` with every symlink resolved, if that stays inside ``root``; else None.

    ``root`` must already be a real path.  Refused outright: NUL, backslashes,
    absolute paths, ``~`` and any ``..`` component (whatever they would
    resolve to).  Decoding is the caller's: a still-encoded ``%2e%2e`` is just
    a name that does not exist.
    """
    if not isinstance(rel, str) or "\x00" in rel or "\\" in rel or rel.startswith(("/", "~")):
        return None
    if any(part == ".." for part in rel.split("/")):
        return None
    path = os.path.realpath(os.path.join(root, rel))
    if path != root and not path.startswith(root.rstrip(os.sep) + os.sep):
        return None
    return path


def _within(path: str, root: str) -> bool:
    """Whether ``path``, every symlink resolved, is ``root`` (a real path) or inside it."""
    real = os.path.realpath(path)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def _stays_inside(real_dir: str, rel: str) -> bool:
    """Whether ``real_dir/rel`` (``real_dir`` a real path) is read without a symlink leading out of it.

    One ``lstat`` per component; a full resolution only when one is a symlink.
    A missing file stays inside (there is nothing to read through it).
    """
    import stat

    path = real_dir
    for part in rel.split("/"):
        path = os.path.join(path, part)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return True
        except OSError:
            return False
        if stat.S_ISLNK(mode):
            return _within(path, real_dir)
    return True


def dashboard_summary(d: ExperimentDir, real: str | None = None, metadata_not_a_link: bool = False) -> dict[str, Any]:
    """:meth:`ExperimentDir.summary` as the dashboard serves it: secrets redacted, and nothing read
    through a symlink that leads out of the experiment directory (``real``: its real path, when known;
    ``metadata_not_a_link``: the caller has just seen that its metadata.json is no symlink)."""
    real = real or os.path.realpath(d.path)
    if not metadata_not_a_link and not _stays_inside(real, METADATA_FILE):
        return d.summary(unreadable=f"{METADATA_FILE} points outside the experiment directory; not read")
    row = d.summary()
    rid = row.get("current_run_id")
    if rid and (row["last_metrics"] or row["last_text"]) and not _stays_inside(real, d.metrics_relpath(rid)):
        row["last_metrics"], row["last_text"] = {}, {}
    row["params"] = redact_secrets(row["params"])
    return row


def _utf8_end(data: bytes) -> int:
    """The length of ``data`` without a UTF-8 character cut at its end."""
    n = len(data)
    for back in range(1, min(4, n) + 1):
        b = data[n - back]
        if b & 0xC0 == 0x80:  # a continuation byte: keep looking for the lead byte
            continue
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        return n - back if back < need else n
    return n


def _utf8_start(data: bytes) -> int:
    """How many continuation bytes ``data`` starts with (an offset inside a character; at most 3)."""
    i = 0
    while i < min(3, len(data)) and data[i] & 0xC0 == 0x80:
        i += 1
    return i


# The lines of a run's log that name its command (see Experiment.start and _start_in_process).
_LOG_COMMAND_LINE_RE = _LazyRe(r"(?s)(\[exp\] command: )(.*?)(\r?)|(\[exp\] \S+ standalone run run_\d+: )(.*)"
                               r"( \(pid \d+\); its output is not captured here\r?)")


def log_header_spans(fd: int, size: int) -> list[tuple[int, int, bytes]]:
    """(start, end, replacement) of each line of a log's opening ``[exp]`` lines whose command shows a secret.

    Older versions of exp wrote the command into the log as it was; what
    serves a log applies these, so the secrets in it never leave the machine.  Only
    the opening lines are exp's own (a child may print anything), and only
    the first :data:`LOG_HEADER_MAX_BYTES` are looked at: a log that does not
    start with ``[exp]`` costs one read of 64 KiB at most.
    """
    mark = LOG_MARK.encode() + b" "
    for limit in (65536, LOG_HEADER_MAX_BYTES):
        head = os.pread(fd, min(size, limit), 0)
        if not head.startswith(mark):
            return []
        spans: list[tuple[int, int, bytes]] = []
        pos, cut = 0, False
        while head.startswith(mark, pos):
            nl = head.find(b"\n", pos)
            end = len(head) if nl < 0 else nl
            line = head[pos:end].decode("utf-8", "replace")
            m = _LOG_COMMAND_LINE_RE.fullmatch(line)
            if m:
                shown = (m.group(1) + redact_command(m.group(2)) + m.group(3) if m.group(1) is not None
                         else m.group(4) + redact_command(m.group(5)) + m.group(6))
                if shown != line:
                    spans.append((pos, end, shown.encode("utf-8")))
            if nl < 0:
                cut = len(head) < size  # a line longer than what was read: read more, once
                break
            pos = nl + 1
        if not cut:
            break
    return spans


def _redact_log_range(fd: int, data: bytes, start: int, spans: list[tuple[int, int, bytes]]) -> tuple[bytes, int, int]:
    """``data`` (the file's bytes from ``start``) with :func:`log_header_spans` applied; also its file offsets.

    A range that begins or ends inside such a line is widened to the whole line,
    so that no part of a secret is ever served unredacted.
    """
    end = start + len(data)
    for s, e, _ in spans:
        if s < start < e:
            data, start = os.pread(fd, start - s, s) + data, s
        if s < end < e:
            data, end = data + os.pread(fd, e - end, end), e
    for s, e, shown in reversed(spans):
        if start <= s and e <= end:
            data = data[:s - start] + shown + data[e - start:]
    return data, start, end


def _header_redacted(path: str, data: bytes, start: int) -> tuple[bytes, int, int]:
    """:func:`_redact_log_range` for bytes already read from ``path``; cheap when they start past the header."""
    if start >= LOG_HEADER_MAX_BYTES:
        return data, start, start + len(data)
    try:
        fd, st = _open_regular_fd(path)
    except OSError:
        return data, start, start + len(data)
    try:
        return _redact_log_range(fd, data, start, log_header_spans(fd, st.st_size))
    finally:
        os.close(fd)


def read_log_chunk(path: str, offset: int = 0, max_bytes: int = LOG_CHUNK_DEFAULT) -> dict[str, Any]:
    """Bytes ``[offset, offset + max_bytes)`` of a log as text, never cut inside a UTF-8 character.

    For following a growing log: pass ``next_offset`` back.  An offset past
    the end (the log was rewritten) reads from 0 with ``reset``.  A missing
    log reads as empty.
    """
    max_bytes = max(4, min(int(max_bytes), LOG_CHUNK_MAX))  # 4: a whole UTF-8 character always fits
    try:
        f = _open_regular(path, "rb")
    except FileNotFoundError:
        return {"size": 0, "offset": 0, "next_offset": 0, "text": "", "eof": True, "reset": offset > 0}
    with f:
        size = os.fstat(f.fileno()).st_size
        reset = offset > size
        if reset or offset < 0:
            offset = 0
        data = os.pread(f.fileno(), min(max_bytes, size - offset), offset)
        skip = _utf8_start(data) if offset else 0
        end = _utf8_end(data)
        data, start, stop = data[skip:end], offset + skip, offset + end
        if start < LOG_HEADER_MAX_BYTES:
            data, start, stop = _redact_log_range(f.fileno(), data, start, log_header_spans(f.fileno(), size))
    return {"size": size, "offset": start, "next_offset": stop, "text": data.decode("utf-8", "replace"),
            "eof": stop >= size, "reset": reset}


def read_log_tail(path: str, lines: int) -> dict[str, Any]:
    """The last ``lines`` lines of a log (read backwards from the end), with the offset to follow from."""
    lines = max(1, min(int(lines), LOG_TAIL_MAX_LINES))
    data, end = read_tail_span(path, lines, max_bytes=TAIL_MAX_BYTES)
    cut = _utf8_end(data)
    start = end - len(data)
    skip = _utf8_start(data) if start else 0
    data, first, stop = _header_redacted(path, data[skip:cut], start + skip)
    return {"size": end, "offset": first, "next_offset": stop,
            "text": data.decode("utf-8", "replace"), "eof": True, "reset": False,
            "truncated_before": first > 0}


def _json_number(v: Any) -> Any:
    """A metric cell for JSON: finite numbers as they are, NaN and infinities as None, text as text."""
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return None
    return v


def _csv_safe_cut(data: bytes) -> int:
    """Where the last complete CSV record of ``data`` ends: after a line break outside quotes (0: none)."""
    quotes_before = data.count(b'"')
    end = len(data)
    for _ in range(64):
        i = data.rfind(b"\n", 0, end)
        if i < 0:
            return 0
        quotes_before -= data.count(b'"', i + 1, end)
        if quotes_before % 2 == 0:
            return i + 1
        end = i
    return 0


def read_metrics_chunk(path: str, offset: int = 0, file_id: str = "",
                       max_bytes: int = METRICS_CHUNK_DEFAULT) -> dict[str, Any]:
    """Rows of a metrics CSV from byte ``offset``, as columns; for following a growing file cheaply.

    ``file_id`` (from the previous answer) names the file and its header: when
    exp has rewritten the CSV with new columns, or replaced it, the ids differ
    and the answer starts again from the first row with ``reset``.  A torn
    last row (being written) is left for the next call.
    """
    import zlib

    empty = {"file_id": "", "reset": bool(offset), "names": [], "columns": {}, "rows": 0, "offset": 0,
             "next_offset": 0, "size": 0, "eof": True}
    try:
        f = _open_regular(path, "rb")
    except FileNotFoundError:
        return empty
    with f:
        st = os.fstat(f.fileno())
        head = f.readline(METRICS_HEADER_MAX_BYTES)
        if not head.endswith(b"\n"):
            return dict(empty, size=st.st_size, reset=False)
        fid = f"{st.st_ino:x}-{zlib.crc32(head):08x}"
        start = len(head)
        reset = bool(offset) and (file_id != fid or offset > st.st_size or offset < start)
        if reset or offset < start:
            offset = start
        max_bytes = max(1 << 16, min(int(max_bytes), 16 << 20))
        while True:
            data = os.pread(f.fileno(), min(max_bytes, st.st_size - offset), offset)
            cut = _csv_safe_cut(data)
            # A record longer than the window: widen it rather than never move on.
            if cut or offset + len(data) >= st.st_size or max_bytes >= 64 << 20:
                break
            max_bytes *= 4
    names: list[str] = next(_csv_reader([head.decode("utf-8", "replace").rstrip("\r\n")]), [])
    columns: dict[str, list[Any]] = {n: [] for n in names}
    rows = 0
    if cut:
        import io

        width = len(names)
        lists = [columns[n] for n in names]
        for rec in _csv_reader(io.StringIO(data[:cut].decode("utf-8", "replace"), newline="")):
            if len(rec) != width:
                continue
            rows += 1
            for lst, cell in zip(lists, rec):
                lst.append(_json_number(parse_metric(cell)))
    return {"file_id": fid, "reset": reset, "names": names, "columns": columns, "rows": rows, "offset": offset,
            "next_offset": offset + cut, "size": st.st_size, "eof": offset + len(data) >= st.st_size}


def metrics_stats(path: str) -> dict[str, dict[str, Any]]:
    """Per numeric column of a metrics CSV: final, min, max and count (one streamed pass).

    ``final`` is the last value logged, NaN and infinities included (a run
    that diverged ends in ``nan``, as ``exp ls`` shows it); ``min``, ``max``
    and ``count`` are of the finite values only (None and 0 when there is none).
    """
    try:
        f = _open_regular(path, encoding="utf-8", errors="replace", newline="")
    except OSError:
        return {}
    from math import isfinite

    stats: dict[str, dict[str, Any]] = {}
    with f:
        reader = _csv_reader(_whole_lines(f))
        try:
            header: list[str] = next(reader, [])
            for rec in reader:
                if len(rec) != len(header):
                    continue
                for name, cell in zip(header, rec):
                    v = parse_metric(cell)
                    if not _is_num(v):
                        continue
                    s = stats.get(name)
                    if s is None:
                        s = stats[name] = {"final": v, "min": None, "max": None, "count": 0}
                    s["final"] = v
                    if not isfinite(v):
                        continue
                    s["count"] += 1
                    if s["min"] is None or v < s["min"]:
                        s["min"] = v
                    if s["max"] is None or v > s["max"]:
                        s["max"] = v
        except _csv_module().Error:  # a torn quoted cell at the very end
            pass
    return stats


def file_kind(name: str, head: bytes) -> str:
    """``image``, ``binary``, ``csv``, ``json`` or ``text`` for a file's name and first bytes."""
    ext = os.path.splitext(name)[1].lower()
    if ext in _IMAGE_TYPES:
        return "image"
    sample = head[:8192]
    if b"\x00" in sample:
        return "binary"
    try:
        sample[:_utf8_end(sample)].decode("utf-8")
    except UnicodeDecodeError:
        return "binary"
    if ext in (".csv", ".tsv"):
        return "csv"
    if ext in (".json", ".jsonl"):
        return "json"
    return "text"


def _iso_ts(text: Any) -> float | None:
    """Seconds since the epoch of an ISO-8601 time (a naive one is local time), or None."""
    from datetime import datetime

    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.strip().replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _intern(v: Any) -> Any:
    return sys.intern(v) if type(v) is str and len(v) < 64 else v


class _Pairs:
    """A small read-only mapping for the index: a tuple of keys, shared by every entry with the
    same keys (a batch's experiments log the same metrics), and a tuple of values.  A dict per
    entry costs about three times the memory, and 10,000 entries keep two each."""

    __slots__ = ("_keys", "_values")
    _shared: dict[tuple[str, ...], tuple[str, ...]] = {}

    def __init__(self, mapping: Mapping[str, Any]) -> None:
        keys = tuple(mapping)
        self._keys = self._shared.setdefault(keys, keys)
        self._values = tuple(mapping.values())

    def get(self, key: str, default: Any = None) -> Any:
        keys = self._keys
        return self._values[keys.index(key)] if key in keys else default

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys:
            raise KeyError(key)
        return self._values[self._keys.index(key)]

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def keys(self) -> tuple[str, ...]:
        return self._keys

    def items(self) -> Iterator[tuple[str, Any]]:
        return zip(self._keys, self._values)


class _IndexEntry:
    """One experiment of the index, kept small (10,000 of them stay in memory): the fields that
    filters and sorts use, the rest of its summary as a tuple, repeated strings shared."""

    __slots__ = ("key", "id", "name", "status", "tags", "params", "metrics", "run", "created", "dirty",
                 "live", "rest", "work_dir")
    #: The summary's keys, in summary() order; all but the slots above are in ``rest``.
    KEYS: tuple[str, ...] = ()
    REST: tuple[str, ...] = ()

    def __init__(self, key: Any, row: dict[str, Any]) -> None:
        cls = type(self)
        if not cls.KEYS:
            cls.KEYS = tuple(row)
            cls.REST = tuple(k for k in row if k not in ("id", "name", "status", "tags", "params", "last_metrics",
                                                          "current_run_id", "dirty", "dir", "work_dir"))
        self.key = key
        self.id: str = row["id"]
        self.work_dir: str = row["work_dir"]
        self.name: str = _intern(row.get("name") or "")
        self.status: str | None = _intern(row.get("status"))
        # _intern, inlined: a first load makes 10,000 of these, with some 30 strings each.
        intern = sys.intern
        self.tags = tuple(intern(t) if len(t) < 64 else t for t in row["tags"])
        self.params = _Pairs({(intern(k) if len(k) < 64 else k): (intern(v) if type(v) is str and len(v) < 64 else v)
                              for k, v in row["params"].items()})
        self.metrics = _Pairs({(intern(k) if len(k) < 64 else k): v for k, v in row["last_metrics"].items()})
        self.run: str | None = _intern(row.get("current_run_id"))
        self.dirty = bool(row.get("dirty"))
        self.rest = tuple(intern(v) if type(v) is str and len(v) < 64 else v for v in map(row.get, cls.REST))
        self.created = _iso_ts(row.get("created_at")) or 0.0
        # What may change any moment: checked at every refresh (the rest at full ones).
        self.live = self.status not in (FINISHED, ERROR, KILLED)

    @property
    def text(self) -> str:
        """What a search looks in: the name and description, lower case (made when asked: kept, it
        would be another string per entry)."""
        return " ".join(t for t in (self.name, self.get("description")) if t).lower()

    def get(self, field: str) -> Any:
        """One field of the summary."""
        if field in ("id", "name", "status", "dirty"):
            return getattr(self, field)
        if field in self.REST:
            return self.rest[self.REST.index(field)]
        return self.row.get(field)

    @property
    def row(self) -> dict[str, Any]:
        """The summary dict (as :meth:`ExperimentDir.summary` made it, plus ``id``)."""
        values = dict(zip(self.REST, self.rest))
        values.update(id=self.id, name=self.name, status=self.status, tags=list(self.tags), params=dict(self.params),
                      last_metrics=dict(self.metrics), current_run_id=self.run, dirty=self.dirty,
                      dir=os.path.basename(self.work_dir), work_dir=self.work_dir)
        return {k: values[k] for k in self.KEYS if k in values}


class IndexSnapshot:
    """One state of an :class:`ExperimentIndex`: entries newest first, and what they hold in all.

    A new snapshot (a new ``version``) is made only when something changed, so
    answers computed from one can be cached by its version.
    """

    __slots__ = ("version", "entries", "statuses", "metric_names", "param_names", "tags")

    def __init__(self, version: int, entries: list[_IndexEntry]) -> None:
        self.version = version
        self.entries = entries
        self.statuses: dict[str, int] = {}
        metrics: set[str] = set()
        params: set[str] = set()
        tags: set[str] = set()
        for e in entries:
            st = e.status or "unknown"
            self.statuses[st] = self.statuses.get(st, 0) + 1
            metrics.update(e.metrics)
            params.update(e.params)
            tags.update(e.tags)
        self.metric_names, self.param_names, self.tags = sorted(metrics), sorted(params), sorted(tags)


class ExperimentIndex:
    """Summaries of every experiment under a base directory, kept current by mtimes.

    A refresh lists a directory again only when its mtime changed, and reads
    an experiment's metadata again only when its ``metadata.json`` changed (or,
    while it runs, its metrics file).  Refreshes come at most every ``ttl``
    seconds, whoever asks; they look at experiments that have not ended every
    time, and at the ended ones (which rarely change) every ``full_every``
    seconds.  A request that finds a refresh under way is answered from the
    snapshot before it instead of waiting.  Thread-safe.
    """

    def __init__(self, base_dir: str, ttl: float = DASHBOARD_INDEX_TTL,
                 full_every: float = DASHBOARD_FULL_RESCAN) -> None:
        self.root = os.path.realpath(base_dir)
        self.ttl = ttl
        self.full_every = full_every
        self._lock = threading.Lock()
        self._entries: dict[str, _IndexEntry] = {}
        self._listings: dict[str, tuple[int, list[str]]] = {}
        self._checked = -1e18
        self._full_at = -1e18
        self._snapshot: IndexSnapshot | None = None

    def snapshot(self) -> IndexSnapshot:
        snap = self._snapshot
        if snap is not None and time.monotonic() - self._checked < self.ttl:
            return snap
        if not self._lock.acquire(blocking=snap is None):
            assert snap is not None
            return snap  # another request is refreshing it
        try:
            now = time.monotonic()
            if self._snapshot is None or now - self._checked >= self.ttl:
                full = now - self._full_at >= self.full_every
                self._refresh(full)
                self._checked = time.monotonic()
                if full:
                    self._full_at = self._checked
            assert self._snapshot is not None
            return self._snapshot
        finally:
            self._lock.release()

    def entries(self) -> list[_IndexEntry]:
        return self.snapshot().entries

    def rows(self) -> list[dict[str, Any]]:
        return [e.row for e in self.entries()]

    def _subdirs(self, path: str) -> list[tuple[str, bool]]:
        """The visible subdirectories of ``path`` (name, is a symlink), re-listed only when its mtime changed."""
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            self._listings.pop(path, None)
            return []
        cached = self._listings.get(path)
        if cached is not None and cached[0] == mtime:
            return cached[1]  # type: ignore[return-value]
        names = []
        try:
            with os.scandir(path) as it:
                for entry in it:
                    if entry.name.startswith("."):
                        continue
                    try:
                        link = entry.is_symlink()
                        # A link inside the tree (``latest``) is an experiment listed anyway: once.
                        if entry.is_dir() and (not link or (_within(entry.path, self.root) and not covered_by_scan(
                                os.path.realpath(entry.path), self.root))):
                            names.append((entry.name, link))
                    except OSError:
                        continue
        except OSError:
            return []
        self._listings[path] = (mtime, names)  # type: ignore[assignment]
        return names

    def _refresh(self, full: bool) -> None:
        seen: dict[str, _IndexEntry] = {}
        changed = self._visit(self.root, "", 2, seen, full)
        if changed or self._snapshot is None or len(seen) != len(self._entries):
            self._entries = seen
            entries = sorted(seen.values(), key=lambda e: (e.created, *_dir_order(e.id)), reverse=True)
            self._snapshot = IndexSnapshot((self._snapshot.version + 1) if self._snapshot else 1, entries)

    def _visit(self, path: str, rel: str, depth: int, seen: dict[str, _IndexEntry], full: bool) -> bool:
        import stat

        changed = False
        for name, link in self._subdirs(path):
            sub = os.path.join(path, name)
            rid = f"{rel}{name}"
            old = self._entries.get(rid)
            if old is not None and not full and not old.live:
                seen[rid] = old
                continue
            meta_path = os.path.join(sub, METADATA_FILE)
            try:
                st = os.lstat(meta_path)
                plain = not stat.S_ISLNK(st.st_mode)
                if not plain:
                    st = os.stat(meta_path)
            except FileNotFoundError:
                if depth > 1:
                    changed = self._visit(sub, rid + "/", depth - 1, seen, full) or changed
                continue
            except OSError:
                st, plain = None, False  # unreadable: still an experiment; summary() says why
            meta_key = (st.st_ino, st.st_mtime_ns, st.st_size) if st is not None else None
            key: Any = meta_key
            run = old.run if old is not None else None
            if old is not None and old.status == RUNNING and run:
                # A running experiment's last metrics change without its metadata, and its
                # process can die without a word (then summary() says how it ended).
                key = (meta_key, _size_mtime(ExperimentDir(sub).metrics_path(run)),
                       _pid_alive(old.get("pid")))
            if old is not None and meta_key is not None and old.key == key:
                seen[rid] = old
                continue
            d = ExperimentDir(sub)
            row = dashboard_summary(d, real=os.path.realpath(sub) if link or rel else os.path.join(self.root, name),
                                    metadata_not_a_link=plain)
            row["id"] = rid
            run = row.get("current_run_id")
            key = ((meta_key, _size_mtime(d.metrics_path(run)), _pid_alive(row.get("pid")))
                   if row.get("status") == RUNNING and run else meta_key)
            seen[rid] = _IndexEntry(key, row)
            changed = True
        return changed


def _list_dir(path: str) -> list[dict[str, Any]]:
    """A directory's entries by name: ``{name, type (file, dir or link; links not followed), size, mtime}``."""
    out: list[dict[str, Any]] = []
    try:
        with os.scandir(path) as it:
            items = sorted(it, key=lambda e: e.name)
    except OSError:
        return out
    for e in items:
        try:
            st = e.stat(follow_symlinks=False)
            kind = "link" if e.is_symlink() else "dir" if e.is_dir(follow_symlinks=False) else "file"
        except OSError:
            continue
        out.append({"name": e.name, "type": kind, "size": st.st_size if kind == "file" else 0, "mtime": st.st_mtime})
    return out


def _pid_alive(pid: Any) -> bool:
    return isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 and process_alive(pid)


def _size_mtime(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _parse_param_filter(text: str) -> tuple[str, str, str]:
    m = _PARAM_FILTER_RE.match(text)
    if not m:
        raise DashboardError(400, f"bad param filter {text!r}: write KEY=VALUE, KEY!=VALUE, KEY>=NUMBER, ...")
    key, op, value = m.groups()
    if op in (">=", "<=", ">", "<"):
        try:
            float(value)
        except ValueError:
            raise DashboardError(400, f"bad param filter {text!r}: {op} needs a number") from None
    return key, op, value


def _param_matches(params: Mapping[str, Any] | _Pairs, key: str, op: str, value: str) -> bool:
    if key not in params:
        return op == "!="
    v = params[key]
    if op in ("=", "!="):
        text = json_safe(v) if not isinstance(v, str) else v
        if isinstance(v, bool):
            text = str(v).lower()
        equal = str(text) == value or (_is_num(v) and not isinstance(v, bool) and _num_equal(v, value))
        return equal if op == "=" else not equal
    if not _is_num(v) or isinstance(v, bool):
        return False
    x = float(value)
    return {">=": v >= x, "<=": v <= x, ">": v > x, "<": v < x}[op]


def _num_equal(v: float, text: str) -> bool:
    try:
        return float(text) == float(v)
    except ValueError:
        return False


def _one(query: Mapping[str, list[str]], key: str, default: str | None = None) -> str | None:
    values = query.get(key)
    return values[-1] if values else default


def _int_param(query: Mapping[str, list[str]], key: str, default: int, lo: int, hi: int) -> int:
    text = _one(query, key)
    if text is None or text == "":
        return default
    try:
        n = int(text)
    except ValueError:
        raise DashboardError(400, f"{key} must be an integer, got {text!r}") from None
    return max(lo, min(hi, n))


def _split_list(query: Mapping[str, list[str]], key: str) -> list[str]:
    return [t.strip() for v in query.get(key, []) for t in v.split(",") if t.strip()]


def query_experiments(entries: list[_IndexEntry] | IndexSnapshot, query: Mapping[str, list[str]]) -> dict[str, Any]:
    """Filter, sort and page the index for ``GET /api/experiments`` (see the README's dashboard section).

    ``entries`` newest first (as a snapshot keeps them).
    """
    snap = entries if isinstance(entries, IndexSnapshot) else IndexSnapshot(0, entries)
    entries = snap.entries
    name = _one(query, "name")
    try:
        pattern = name_pattern(name) if name else None
    except ExpError as e:
        raise DashboardError(400, str(e)) from None
    tags = _split_list(query, "tags") + _split_list(query, "tag")
    words = (_one(query, "q") or "").lower().split()
    statuses = set(_split_list(query, "status"))
    params = [_parse_param_filter(p) for p in query.get("param", []) if p.strip()]
    bounds = []
    for key in ("since", "until"):
        text = _one(query, key)
        if text:
            ts = _iso_ts(text)
            if ts is None:
                raise DashboardError(400, f"{key} must be an ISO date or time such as 2026-12-01T10:00, got {text!r}")
            bounds.append((key, ts))
    dirty = _one(query, "dirty") in ("1", "true", "yes")
    sort = _one(query, "sort") or "-created_at"
    offset = _int_param(query, "offset", 0, 0, 1 << 40)
    limit = _int_param(query, "limit", 50, 1, 1000)
    desc = sort.startswith("-")
    field = sort.lstrip("-+")
    if not (field in _EXP_SORT_FIELDS or field.startswith(("metric:", "param:"))):
        raise DashboardError(400, f"cannot sort by {field!r}: use one of {', '.join(_EXP_SORT_FIELDS)}, "
                                  "metric:NAME or param:NAME")

    kept: list[_IndexEntry] = []
    deadline = time.monotonic() + NAME_FILTER_SECONDS
    for i, ent in enumerate(entries):
        if statuses and (ent.status or "unknown") not in statuses:
            continue
        if pattern is not None:
            if not i & 63 and time.monotonic() > deadline:  # many names, each matched slowly
                raise DashboardError(400, f"the name regular expression {name!r} took over {NAME_FILTER_SECONDS:g} s "
                                          f"on {i} of {len(entries)} experiments: make it simpler")
            if not pattern.search(ent.name, 0, NAME_FILTER_NAME_CHARS):
                continue
        if tags and not all(t in ent.tags for t in tags):
            continue
        if words and not all(w in ent.text for w in words):
            continue
        if dirty and not ent.dirty:
            continue
        if params and not all(_param_matches(ent.params, k, op, v) for k, op, v in params):
            continue
        if bounds and not ent.created:
            continue  # no creation time: outside any time range
        if any((ent.created < ts) if key == "since" else (ent.created > ts) for key, ts in bounds):
            continue
        kept.append(ent)

    if field == "created_at":
        def value(e: _IndexEntry) -> Any:
            return e.created or None
    elif field.startswith("metric:"):
        mname = field[7:]

        def value(e: _IndexEntry) -> Any:
            return e.metrics.get(mname)
    elif field.startswith("param:"):
        pname = field[6:]

        def value(e: _IndexEntry) -> Any:
            return e.params.get(pname)
    else:
        def value(e: _IndexEntry) -> Any:
            return e.get(field)
    if field == "created_at" and desc:
        ordered = kept  # the index's own order (created, then id, newest first): nothing to sort
        missing_created = [e for e in kept if not e.created]
        if missing_created:
            ordered = [e for e in kept if e.created] + missing_created
    else:
        ordered = _sorted_missing_last(kept, lambda e: (*_sort_key(value(e)), e.id), desc)
    return {
        "total": len(ordered), "offset": offset, "limit": limit,
        "items": [e.row for e in ordered[offset:offset + limit]],
        "metric_names": snap.metric_names, "param_names": snap.param_names, "tags": snap.tags,
        "statuses": snap.statuses, "scanned": len(entries),
    }


def _state_job(job: Any, root: str) -> dict[str, Any] | None:
    """A job of the state file as the page gets it: no environment, secrets redacted, its experiment id."""
    if not isinstance(job, dict):
        return None
    out = {k: v for k, v in job.items() if k not in ("environment", "lark_config")}
    out = redact_secrets(out)
    wd = job.get("work_dir")
    exp_id = None
    if isinstance(wd, str) and wd:
        real = os.path.realpath(wd)
        if real.startswith(root.rstrip(os.sep) + os.sep) and ExperimentDir.is_experiment(real):
            exp_id = os.path.relpath(real, root).replace(os.sep, "/")
    out["exp_id"] = exp_id
    return json_safe(out)


def system_info(base_dir: str, gpus: list[dict[str, Any]] | None, running: list[dict[str, Any]]) -> dict[str, Any]:
    """Load, memory, disk of ``base_dir`` and the GPUs with the running tasks that hold each."""
    import shutil

    info: dict[str, Any] = {"hostname": _hostname(), "cpus": os.cpu_count()}
    try:
        info["load"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        info["load"] = None
    mem: dict[str, int] = {}
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                key, _, rest = line.partition(b":")
                if key in (b"MemTotal", b"MemAvailable"):
                    mem["total" if key == b"MemTotal" else "available"] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    info["memory"] = mem or None
    probe = base_dir
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        du = shutil.disk_usage(probe)
        info["disk"] = {"path": base_dir, "total": du.total, "free": du.free}
    except OSError:
        info["disk"] = None
    holders: dict[int, list[dict[str, Any]]] = {}
    for job in running:
        ids = job.get("assigned_gpus") or job.get("gpu_ids") or []
        for g in ids if isinstance(ids, list) else []:
            if _is_int(g):
                holders.setdefault(int(g), []).append(
                    {"task": job.get("id"), "name": job.get("name"), "exp_id": job.get("exp_id")})
    info["gpus"] = [dict(g, holders=holders.get(g["index"], [])) for g in gpus or []]
    info["gpu_error"] = None if gpus is not None else "nvidia-smi not found or failed"
    return info


class Dashboard:
    """The dashboard's API over one base directory: each ``api_*`` takes query values, returns a JSON-able dict.

    Every experiment id and file path is resolved (symlinks too) and must stay
    inside the base directory, else :class:`DashboardError` 404.
    """

    def __init__(self, base_dir: str | os.PathLike[str] = DEFAULT_BASE_DIR) -> None:
        self.base_dir = os.path.abspath(os.fspath(base_dir))
        self.root = os.path.realpath(self.base_dir)
        self.index = ExperimentIndex(self.root)
        self.state = StateFile(self.base_dir)
        self._gpus: tuple[float, list[dict[str, Any]] | None] | None = None
        self._gpu_lock = threading.Lock()
        # Answers that many polling pages ask for alike, until what they come from changes.
        self._encoded: dict[tuple[Any, ...], bytes] = {}
        self._state: tuple[Any, dict[str, Any]] | None = None
        self._state_json: tuple[Any, bytes] | None = None
        self._owned: tuple[float, Any, bool] | None = None

    # ------------------------------------------------------------------ lookups

    def experiment(self, exp_id: str | None) -> ExperimentDir:
        """The experiment directory named by ``exp_id`` (its path under the base directory)."""
        if not exp_id:
            raise DashboardError(400, "missing id: the experiment's directory relative to the base directory")
        path = resolve_inside(self.root, exp_id)
        if path is None or path == self.root or not ExperimentDir.is_experiment(path):
            raise _not_found()
        return ExperimentDir(path)

    def _exp_id(self, d: ExperimentDir) -> str:
        return os.path.relpath(d.path, self.root).replace(os.sep, "/")

    def _run(self, d: ExperimentDir, run_id: str | None) -> str:
        """A run of ``d`` named by ``run_id`` (default: its current run); 404 when it has no such run."""
        meta = self._meta(d)
        if run_id:
            listed = meta.get("runs")
            known = set(d.runs()) | {r.get("id") for r in (listed if isinstance(listed, list) else [])
                                     if isinstance(r, dict)}
            if not _RUN_ID_RE.match(run_id) or run_id not in known:
                raise _not_found()
            return run_id
        rid = d.latest_run(meta)
        if rid is None:
            raise _not_found("this experiment has no run yet")
        return rid

    @staticmethod
    def _meta(d: ExperimentDir) -> dict[str, Any]:
        """``d``'s metadata ({} when unreadable, or when it is a symlink leading out of ``d``)."""
        if not _within(d.metadata_path, os.path.realpath(d.path)):
            return {}
        return d.try_read_metadata()[0] or {}

    @staticmethod
    def _code_diff(d: ExperimentDir) -> dict[str, Any]:
        """:func:`read_code_diff`, unless code.diff is a symlink leading out of ``d``."""
        if not _within(os.path.join(d.path, CODE_DIFF_FILE), os.path.realpath(d.path)):
            return {"text": None, "truncated": False, "untracked": []}
        return read_code_diff(d.path)

    @staticmethod
    def _inside(d: ExperimentDir, path: str) -> str:
        """``path`` (one of ``d``'s own files, which may not exist yet) if it stays inside ``d``; else 404."""
        if not _within(path, os.path.realpath(d.path)):
            raise _not_found()
        return path

    def _file(self, d: ExperimentDir, rel: str | None) -> str:
        if not rel:
            raise DashboardError(400, "missing path")
        path = resolve_inside(os.path.realpath(d.path), rel)
        if path is None or not os.path.exists(path):
            raise _not_found()
        return path

    # ------------------------------------------------------------------ endpoints

    def get_json(self, path: str, q: Mapping[str, list[str]]) -> bytes:
        """The JSON answer to ``GET path?q`` (a route of :attr:`GET_ROUTES`).

        The answers every polling page asks for again and again (the state,
        the list) are encoded once per change and shared, not once per request.
        """
        if path == "/api/state":
            key = self._state_key()
            cached = self._state_json
            if cached is None or cached[0] != key:
                rest = {k: v for k, v in self.api_state(q).items() if k != "updated_at"}
                cached = self._state_json = (key, _encode_json(rest))
            # The time is the one field new in every answer: put in front of the shared rest.
            return b'{"updated_at": "' + now_iso().encode() + b'", ' + cached[1][1:]
        if path == "/api/experiments":
            snap = self.index.snapshot()
            key = self._query_key(snap, q)
            body = self._encoded.get(key)
            if body is None:
                body = _encode_json(self.api_experiments(q))
                if len(self._encoded) >= 64:
                    self._encoded.clear()
                self._encoded[key] = body
            return body
        return _encode_json(getattr(self, self.GET_ROUTES[path])(q))

    @staticmethod
    def _query_key(snap: IndexSnapshot, q: Mapping[str, list[str]]) -> tuple[Any, ...]:
        return (snap.version, tuple(sorted((k, tuple(v)) for k, v in q.items() if k != "token")))

    def _state_key(self) -> tuple[Any, ...]:
        return _size_mtime(self.state.path), os.path.isdir(self.root), self._alive()

    def _alive(self) -> bool:
        """StateFile.owned(), asked again only when the state file changed or half a second passed,
        however many pages poll (each asking takes the owner's lock for an instant)."""
        stat = _size_mtime(self.state.path)
        cached = self._owned
        if cached is None or cached[1] != stat or time.monotonic() - cached[0] > 0.5:
            cached = self._owned = (time.monotonic(), stat, self.state.owned())
        return cached[2]

    def api_health(self, q: Mapping[str, list[str]]) -> dict[str, Any]:
        return {"ok": True, "version": __version__, "base_dir": self.base_dir, "exists": os.path.isdir(self.root)}

    def api_state(self, q: Mapping[str, list[str]]) -> dict[str, Any]:
        # Rebuilt only when the state file changed; "alive" and the time are fresh on every call.
        key = _size_mtime(self.state.path), os.path.isdir(self.root)
        cached = self._state
        if cached is None or cached[0] != key:
            cached = self._state = (key, self._read_state())
        out = dict(cached[1], updated_at=now_iso())
        if out["scheduler"] is not None:
            out["scheduler"] = dict(out["scheduler"], alive=self._alive())
        return out

    def _read_state(self) -> dict[str, Any]:
        groups = STATE_GROUPS
        out: dict[str, Any] = {"base_dir": self.base_dir, "exists": os.path.isdir(self.root), "updated_at": None,
                               "scheduler": None, "state_error": None}
        try:
            state = self.state.read()
        except MetadataError as e:
            state, out["state_error"] = None, str(e)
        for g in groups:
            items = state.get(g) if state else None
            out[g] = [j for j in (_state_job(x, self.root) for x in (items if isinstance(items, list) else []))
                      if j is not None]
        out["counts"] = {g: len(out[g]) for g in groups}
        out["counts"]["total"] = sum(out["counts"].values())
        if state:
            summary: dict[str, Any] = state["summary"] if isinstance(state.get("summary"), dict) else {}
            keep = ("status_indicator", "shutting_down", "pid", "host", "config_path", "started_at", "updated_at",
                    "max_concurrent_experiments", "gpus", "gpu_use")
            out["scheduler"] = json_safe(redact_secrets({k: summary.get(k) for k in keep}))
        return out

    def api_experiments(self, q: Mapping[str, list[str]]) -> dict[str, Any]:
        return query_experiments(self.index.snapshot(), q)

    def api_experiment(self, q: Mapping[str, list[str]]) -> dict[str, Any]:
        d = self.experiment(_one(q, "id"))
        exp_id = self._exp_id(d)
        summary = dict(dashboard_summary(d), id=exp_id)
        meta = self._meta(d)
        why = summary["error"] if summary["status"] == UNREADABLE else None
        runs = []
        entries = (meta or {}).get("runs")
        by_id = {r.get("id"): r for r in entries if isinstance(r, dict)} if isinstance(entries, list) else {}
        for rid in sorted(set(d.runs()) | {k for k in by_id if isinstance(k, str) and _RUN_ID_RE.match(k)}):
            r = by_id.get(rid, {})
            item = {k: r.get(k) for k in ("status", "started_at", "ended_at", "exit_code", "duration", "reason")}
            for key, path in (("log", d.log_path(rid)), ("metrics", d.metrics_path(rid))):
                try:
                    size = os.stat(self._inside(d, path)).st_size
                    item[key], item[key + "_size"] = os.path.relpath(path, d.path).replace(os.sep, "/"), size
                except (OSError, DashboardError):
                    item[key], item[key + "_size"] = None, 0
            runs.append(dict(item, run_id=rid))
        files, truncated = self._tree(d.path)
        return {"id": exp_id, "summary": summary, "metadata": json_safe(redact_secrets(meta)) if meta else None,
                "metadata_error": why, "runs": runs, "files": files, "files_truncated": truncated,
                "code_diff": self._code_diff(d)["text"] is not None}

    @staticmethod
    def _tree(top: str) -> tuple[list[dict[str, Any]], bool]:
        """Files under an experiment directory, depth first, at most FILE_TREE_MAX (symlinks not followed)."""
        out: list[dict[str, Any]] = []

        def walk(path: str, rel: str) -> bool:
            for item in _list_dir(path):
                if len(out) >= FILE_TREE_MAX:
                    return False
                name = item.pop("name")
                out.append(dict(item, path=rel + name))
                if item["type"] == "dir" and not walk(os.path.join(path, name), rel + name + "/"):
                    return False
            return True

        complete = walk(top, "")
        return out, not complete

    def api_log(self, q: Mapping[str, list[str]]) -> dict[str, Any]:
        d = self.experiment(_one(q, "id"))
        rid = self._run(d, _one(q, "run"))
        path = self._inside(d, d.log_path(rid))
        if _one(q, "tail") is not None:
            out = read_log_tail(path, _int_param(q, "tail", 200, 1, LOG_TAIL_MAX_LINES))
        else:
            out = read_log_chunk(path, _int_param(q, "offset", 0, 0, 1 << 62),
                                 _int_param(q, "max_bytes", LOG_CHUNK_DEFAULT, 1, LOG_CHUNK_MAX))
        return dict(out, run_id=rid)

    def api_metrics(self, q: Mapping[str, list[str]]) -> dict[str, Any]:
        d = self.experiment(_one(q, "id"))
        rid = self._run(d, _one(q, "run"))
        out = read_metrics_chunk(self._inside(d, d.metrics_path(rid)), _int_param(q, "offset", 0, 0, 1 << 62), _one(q, "file_id") or "",
                                 _int_param(q, "max_bytes", METRICS_CHUNK_DEFAULT, 1, 16 << 20))
        return dict(out, run_id=rid)

    @staticmethod
    def _is_metadata(d: ExperimentDir, path: str) -> bool:
        # Any metadata.json* at any depth (a copy, one kept aside) is served redacted.
        return os.path.basename(path).startswith(METADATA_FILE)

    @staticmethod
    def _is_code_diff(path: str) -> bool:
        # One saved before exp redacted them may hold secrets: served as read_code_diff shows it.
        return os.path.basename(path).startswith(CODE_DIFF_FILE)

    @staticmethod
    def _code_diff_bytes(path: str) -> bytes:
        try:
            text, _ = code_diff_text(path, errors="surrogateescape")
        except OSError as e:
            raise DashboardError(404, f"cannot read it: {e.strerror or e}") from None
        return text.encode("utf-8", "surrogateescape")

    def _metadata_text(self, path: str) -> str:
        """A metadata file as served: redacted JSON, or nothing at all when it cannot be parsed (it may hold secrets)."""
        try:
            return dumps_json(json_safe(redact_secrets(read_json_file(path)))) + "\n"
        except (OSError, ValueError):
            return "(not shown: this metadata file cannot be parsed, and it may hold secrets)\n"

    def api_file(self, q: Mapping[str, list[str]]) -> dict[str, Any]:
        d = self.experiment(_one(q, "id"))
        rel = _one(q, "path")
        path = self._file(d, rel)
        from urllib.parse import urlencode

        st = os.stat(path)
        out: dict[str, Any] = {"path": rel, "size": st.st_size, "mtime": st.st_mtime, "text": None,
                               "truncated": False, "entries": None,
                               "raw_url": "/api/raw?" + urlencode({"id": self._exp_id(d), "path": rel})}
        if os.path.isdir(path):
            entries = [{k: e[k] for k in ("name", "type", "size")} for e in _list_dir(path)[:FILE_TREE_MAX]]
            return dict(out, type="dir", kind="dir", entries=entries, raw_url=None)
        if self._is_metadata(d, path):
            text = self._metadata_text(path)
            return dict(out, type="file", kind="json", text=text, size=len(text.encode()))
        if self._is_code_diff(path):
            data = self._code_diff_bytes(path)
            cut = data[:PREVIEW_MAX_BYTES]
            return dict(out, type="file", kind="text", text=cut[:_utf8_end(cut)].decode("utf-8", "replace"),
                        truncated=len(data) > PREVIEW_MAX_BYTES)
        try:
            with _open_regular(path, "rb") as f:
                data = f.read(PREVIEW_MAX_BYTES + 1)
                # Any file that starts as a run's log does (a copy too) has its command's secrets hidden.
                data = _redact_log_range(f.fileno(), data, 0, log_header_spans(f.fileno(), st.st_size))[0]
        except OSError as e:
            raise DashboardError(404, f"cannot read {rel}: {e.strerror or e}") from None
        kind = file_kind(path, data)
        out.update(type="file", kind=kind)
        if kind in ("text", "csv", "json"):
            cut = data[:PREVIEW_MAX_BYTES]
            out.update(text=cut[:_utf8_end(cut)].decode("utf-8", "replace"), truncated=len(data) > PREVIEW_MAX_BYTES)
        return out

    def raw_file(self, q: Mapping[str, list[str]]) -> tuple[str, str, bool, Any]:
        """(path, content type, as attachment, an open binary file or bytes) for ``GET /api/raw``."""
        d = self.experiment(_one(q, "id"))
        path = self._file(d, _one(q, "path"))
        if os.path.isdir(path):
            raise DashboardError(400, "a directory has no raw content; see /api/file")
        download = _one(q, "download") in ("1", "true", "yes")
        if self._is_metadata(d, path):
            return path, "application/json; charset=utf-8", download, self._metadata_text(path).encode("utf-8")
        if self._is_code_diff(path):
            return path, "text/plain; charset=utf-8", download, self._code_diff_bytes(path)
        ctype = _IMAGE_TYPES.get(os.path.splitext(path)[1].lower())
        try:
            f = _open_regular(path, "rb")
        except OSError as e:
            raise DashboardError(404, f"cannot read it: {e.strerror or e}") from None
        content: Any = f
        try:
            spans = log_header_spans(f.fileno(), os.fstat(f.fileno()).st_size)
        except OSError:
            spans = []
        if spans:  # a log's opening lines with secrets: those lines redacted, then the rest as it is
            head = _redact_log_range(f.fileno(), os.pread(f.fileno(), spans[-1][1], 0), 0, spans)[0]
            f.seek(spans[-1][1])
            content = (head, f)
        if ctype is None:
            return path, "application/octet-stream", True, content
        return path, ctype, download, content

    def _previous(self, d: ExperimentDir, row: Mapping[str, Any]) -> dict[str, Any] | None:
        """The newest experiment of the same name created before ``row`` (from the index)."""
        import re

        def order(created: float, exp_id: str) -> tuple[float, int]:
            # Times have whole seconds; the same name twice in a second is <stamp>_2, _3, ...
            m = re.search(r"_(\d+)$", exp_id)
            return created, int(m.group(1)) if m and _DIR_STAMP_RE.search(exp_id[:m.start()]) else 1

        mine = order(_iso_ts(row.get("created_at")) or 0.0, row["id"])
        best: tuple[tuple[float, int], _IndexEntry] | None = None
        for e in self.index.entries():
            if e.name == row["name"] and e.id != row["id"]:
                key = order(e.created, e.id)
                if key < mine and (best is None or key > best[0]):
                    best = (key, e)
        return best[1].row if best is not None else None

    def api_changes(self, q: Mapping[str, list[str]]) -> dict[str, Any]:
        d = self.experiment(_one(q, "id"))
        row = dict(dashboard_summary(d), id=self._exp_id(d))
        against = _one(q, "against")
        if against:
            other_dir: ExperimentDir | None = self.experiment(against)
        else:
            prev = self._previous(d, row)
            other_dir = ExperimentDir(prev["work_dir"]) if prev else None
        meta = self._meta(d)
        out: dict[str, Any] = {"id": row["id"], "against": None, "against_name": None, "params": [],
                               "command": None, "git": None, "metrics": []}
        other_meta: dict[str, Any] = {}
        other_row: dict[str, Any] = {}
        if other_dir is not None:
            other_row = dict(dashboard_summary(other_dir), id=self._exp_id(other_dir))
            other_meta = self._meta(other_dir)
            out["against"], out["against_name"] = other_row["id"], other_row["name"]
            a, b = other_row["params"], row["params"]
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k) or (k in a) != (k in b):
                    out["params"].append({"key": k, "before": a.get(k), "after": b.get(k)})
            if other_meta.get("command") != meta.get("command"):
                out["command"] = redact_secrets({"before": other_meta.get("command"), "after": meta.get("command")})
            ma, mb = other_row["last_metrics"], row["last_metrics"]
            for k in sorted(set(ma) | set(mb)):
                va, vb = ma.get(k), mb.get(k)
                delta = vb - va if _is_num(va) and _is_num(vb) else None
                out["metrics"].append({"name": k, "before": va, "after": vb, "delta": json_safe(delta),
                                       "lower_is_better": lower_is_better(k)})

        def git(m: Mapping[str, Any]) -> dict[str, Any] | None:
            g = m.get("git")
            return {k: g.get(k) for k in ("commit", "branch", "dirty")} if isinstance(g, dict) else None

        ga, gb = git(other_meta) if other_dir is not None else None, git(meta)
        out["git"] = {"before": ga, "after": gb,
                      "changed": bool(other_dir is not None and (ga or {}).get("commit") != (gb or {}).get("commit"))}
        diff = self._code_diff(d)
        out.update(code_diff=diff["text"], code_diff_truncated=diff["truncated"], untracked=diff["untracked"])
        return json_safe(out)

    def api_compare(self, q: Mapping[str, list[str]]) -> dict[str, Any]:
        ids = _split_list(q, "ids")
        if not ids:
            raise DashboardError(400, "ids: give the experiments to compare, comma-separated")
        if len(ids) > COMPARE_MAX:
            raise DashboardError(400, f"at most {COMPARE_MAX} experiments can be compared at once")
        # skip_missing=1 (the page's Compare): experiments not found are listed in
        # "missing" and the others compared; without it one unknown id is a 404.
        skip_missing = _one(q, "skip_missing") in ("1", "true")
        exps: list[dict[str, Any]] = []
        metrics: dict[str, dict[str, Any]] = {}
        params: list[dict[str, Any]] = []
        names: dict[str, None] = {}
        missing: list[dict[str, str]] = []
        for exp_id in ids:
            try:
                d = self.experiment(exp_id)
            except DashboardError as e:
                if not skip_missing or e.status != 404:
                    raise
                missing.append({"id": exp_id, "error": str(e)})
                continue
            row = dashboard_summary(d)
            p = row["params"]
            exps.append({"id": self._exp_id(d), "name": row["name"], "status": row["status"], "tags": row["tags"],
                         "params": p, "created_at": row["created_at"]})
            params.append(p)
            rid = row.get("current_run_id")
            path = d.metrics_path(rid) if rid else None
            stats = metrics_stats(path) if path and _within(path, os.path.realpath(d.path)) else {}
            for mname, s in stats.items():
                names.setdefault(mname, None)
                low = lower_is_better(mname)
                metrics.setdefault(mname, {})[exps[-1]["id"]] = dict(s, best=s["min"] if low else s["max"])
        keys = sorted({k for p in params for k in p})
        differing = [k for k in keys if len({_json().dumps(p.get(k), sort_keys=True, default=str) for p in params}) > 1]
        return json_safe({"experiments": exps, "param_keys": keys, "differing_params": differing,
                          "metrics": metrics, "metric_names": list(names),
                          "lower_is_better": {m: lower_is_better(m) for m in names}, "missing": missing})

    def _detected_gpus(self) -> list[dict[str, Any]] | None:
        with self._gpu_lock:  # nvidia-smi takes a while: once every few seconds, whoever asks
            if self._gpus is None or time.monotonic() - self._gpus[0] > 3.0:
                self._gpus = (time.monotonic(), detect_gpus())
            return self._gpus[1]

    def api_system(self, q: Mapping[str, list[str]]) -> dict[str, Any]:
        state = self.api_state(q)
        return json_safe(system_info(self.base_dir, self._detected_gpus(), state["running"]))

    def api_command(self, body: Any) -> tuple[int, dict[str, Any]]:
        if not isinstance(body, dict):
            raise DashboardError(400, "the body must be a JSON object such as {\"action\": \"kill\", \"tasks\": [3]}")
        action = body.get("action")
        # The page's words for the CLI's commands are accepted too.
        action = {"terminate": "kill", "remove": "rm"}.get(action, action) if isinstance(action, str) else action
        if action not in ("kill", "retry", "rm", "shutdown", "priority"):
            raise DashboardError(400, f"unknown action {action!r}: kill (or terminate), retry, rm (or remove), "
                                      "shutdown or priority")
        tasks = body.get("tasks", [body["task"]] if "task" in body else [])
        if not isinstance(tasks, list) or not all(isinstance(t, (int, str)) and not isinstance(t, bool)
                                                  for t in tasks):
            raise DashboardError(400, "tasks must be a list of task ids or names")
        if action != "shutdown" and not tasks:
            raise DashboardError(400, f"{action} needs tasks")
        args: dict[str, Any] = {"tasks": tasks}
        if action == "shutdown":
            args["now"] = bool(body.get("now"))
        if action == "priority":
            if not priority_ok(body.get("value")):
                raise DashboardError(400, f"priority needs a value that is {PRIORITY_EXPECTED}, "
                                          f"got {body.get('value')!r}")
            args["value"] = body["value"]
        try:
            return 200, self.state.send_command(action, **args)
        except UnavailableError as e:
            raise DashboardError(409, str(e)) from None

    GET_ROUTES = {"/api/health": "api_health", "/api/state": "api_state", "/api/experiments": "api_experiments",
                  "/api/experiment": "api_experiment", "/api/log": "api_log", "/api/metrics": "api_metrics",
                  "/api/file": "api_file", "/api/changes": "api_changes", "/api/compare": "api_compare",
                  "/api/system": "api_system"}


def _encode_json(obj: Any) -> bytes:
    return _json().dumps(obj, ensure_ascii=False, allow_nan=False, default=str).encode("utf-8")


def _content_security_policy(page: bytes) -> str:
    """The page's CSP: scripts only the page's own inline ones (by hash), nothing from elsewhere."""
    import base64
    import hashlib
    import re

    hashes = []
    for m in re.finditer(rb"<script>(.*?)</script>", page, re.S):
        digest = base64.b64encode(hashlib.sha256(m.group(1)).digest()).decode()
        hashes.append(f"'sha256-{digest}'")
    return ("default-src 'none'; script-src " + (" ".join(hashes) or "'none'") + "; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")


_MISSING_PAGE = b"""<!doctype html><meta charset="utf-8"><title>exp</title>
<p>exp_ui.html was not found next to exp.py, so there is no page to show. Copy exp_ui.html next to exp.py
(it comes with exp). The JSON API still works: <a href="/api/state">/api/state</a>,
<a href="/api/experiments">/api/experiments</a>.</p>
"""


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True  # "" is every interface, not loopback
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def _dashboard_handler() -> type:
    from http.server import BaseHTTPRequestHandler
    from urllib.parse import parse_qs, urlsplit

    class Handler(BaseHTTPRequestHandler):
        """Thin: checks the request (Host, token, POST rules), calls :class:`Dashboard`, writes JSON."""

        server_version = "exp-dashboard"
        # Headers and body go out in separate writes: without this, a kept-alive
        # connection waits ~40 ms per answer (Nagle's algorithm meets delayed ACKs).
        disable_nagle_algorithm = True
        timeout = 120  # a kept-alive connection idle this long is closed (its thread ends)

        def version_string(self) -> str:
            return self.server_version
        protocol_version = "HTTP/1.1"
        server: Any

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            if self.server.owner.verbose:
                super().log_message(format, *args)

        # -------------------------------------------------------------- replies

        def _headers(self, status: int, ctype: str, length: int, extra: Mapping[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(length))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("X-Frame-Options", "DENY")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()

        def _json(self, status: int, obj: Any) -> None:
            body = obj if isinstance(obj, bytes) else _encode_json(obj)
            self._headers(status, "application/json; charset=utf-8", len(body), {"Cache-Control": "no-store"})
            if self.command != "HEAD":
                self.wfile.write(body)

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            # http.server's own errors (a malformed request line, an unknown method) as JSON too.
            self.close_connection = True
            try:
                self._json(code, {"error": message or self.responses.get(code, ("error",))[0]})
            except OSError:
                pass

        # -------------------------------------------------------------- checks

        def _host_ok(self) -> bool:
            """No DNS rebinding: Host must be an IP address, localhost, or the name the server was bound to."""
            host = (self.headers.get("Host") or "").strip()
            if not host:
                return False
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            name = name.strip("[]").lower()
            return _is_ip(name) or name in self.server.owner.host_names

        def _token_ok(self, query: Mapping[str, list[str]]) -> bool:
            import hmac

            token = self.server.owner.token
            if not token:
                return True
            given = [query.get("token", [""])[-1], self.headers.get("X-Exp-Token") or ""]
            auth = self.headers.get("Authorization") or ""
            if auth.lower().startswith("bearer "):
                given.append(auth[7:].strip())
            for part in (self.headers.get("Cookie") or "").split(";"):
                k, _, v = part.strip().partition("=")
                if k == "exp_token":
                    given.append(v)
            return any(g and hmac.compare_digest(g.encode(), token.encode()) for g in given)

        def _origin_ok(self) -> bool:
            """The page's own origin, or the token in a header (which another site's page cannot set)."""
            origin = self.headers.get("Origin")
            if origin is None:
                token = self.server.owner.token
                given = self.headers.get("X-Exp-Token") or ""
                auth = self.headers.get("Authorization") or ""
                if auth.lower().startswith("bearer "):
                    given = given or auth[7:].strip()
                import hmac

                return bool(token and given and hmac.compare_digest(given.encode(), token.encode()))
            host = (self.headers.get("Host") or "").lower()
            return origin.lower() in (f"http://{host}", f"https://{host}")

        # -------------------------------------------------------------- methods

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self._serve()

        def do_HEAD(self) -> None:  # noqa: N802
            self._serve()

        def do_POST(self) -> None:  # noqa: N802
            self._serve()

        def do_PUT(self) -> None:  # noqa: N802
            self._refuse_method()

        do_DELETE = do_PATCH = do_OPTIONS = do_PUT  # noqa: N815

        def _refuse_method(self) -> None:
            self.close_connection = True
            self._json(405, {"error": f"{self.command} is not supported here"})

        def _serve(self) -> None:
            owner = self.server.owner
            try:
                if not self._host_ok():
                    self.close_connection = True
                    return self._json(403, {"error": "this Host is not allowed (open the dashboard by its IP "
                                                     "address or the name it was started with)"})
                parts = urlsplit(self.path)
                query = parse_qs(parts.query, keep_blank_values=True)
                if not self._token_ok(query):
                    self.close_connection = True
                    return self._json(401, {"error": "a token is needed: open the URL `exp see` printed "
                                                     "(it ends in ?token=...)"})
                path = parts.path
                if path.startswith("/api/") and self.headers.get("Sec-Fetch-Site") in ("cross-site", "same-site"):
                    # A page of another site making the browser call the API (a GET too can cost).
                    self.close_connection = True
                    return self._json(403, {"error": "cross-site request refused"})
                if self.command == "POST":
                    return self._post(path)
                if path in ("/", "/index.html"):
                    return self._page(query)
                if path == "/api/raw":
                    return self._raw(query)
                route = Dashboard.GET_ROUTES.get(path)
                if route is None:
                    return self._json(404, {"error": "not found"})
                self._json(200, owner.dashboard.get_json(path, query))
            except DashboardError as e:
                self._json(e.status, {"error": str(e)})
            except ExpError as e:
                self._json(400, {"error": str(e)})
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            except Exception as e:  # noqa: BLE001 - never a traceback to the client; the user sees it
                owner.report(f"{self.command} {self.path}: {type(e).__name__}: {e}")
                try:
                    self._json(500, {"error": f"internal error ({type(e).__name__}); see the terminal of `exp see`"})
                except OSError:
                    pass

        def _post(self, path: str) -> None:
            if path != "/api/command":
                self._drain()
                return self._json(404, {"error": "not found"})
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if ctype != "application/json":
                self.close_connection = True
                return self._json(403, {"error": "a command must be sent as application/json"})
            if not self._origin_ok():
                self.close_connection = True
                return self._json(403, {"error": "cross-site request refused"})
            try:
                length = int(self.headers.get("Content-Length") or "")
            except ValueError:
                self.close_connection = True
                return self._json(411, {"error": "Content-Length is required"})
            if length > DASHBOARD_MAX_BODY or length < 0:
                self.close_connection = True
                return self._json(413, {"error": f"the body is over {DASHBOARD_MAX_BODY} bytes"})
            raw = self.rfile.read(length)
            try:
                body = _json().loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                return self._json(400, {"error": f"the body is not JSON: {e}"})
            status, result = self.server.owner.dashboard.api_command(body)
            self._json(status, result)

        def _drain(self) -> None:
            try:
                length = int(self.headers.get("Content-Length") or "0")
            except ValueError:
                length = 0
            if 0 < length <= DASHBOARD_MAX_BODY:
                self.rfile.read(length)
            elif length:
                self.close_connection = True

        def _page(self, query: Mapping[str, list[str]]) -> None:
            owner = self.server.owner
            page, csp = owner.page()
            extra = {"Cache-Control": "no-store", "Content-Security-Policy": csp}
            token = query.get("token", [""])[-1]
            if owner.token and token:
                extra["Set-Cookie"] = f"exp_token={owner.token}; HttpOnly; SameSite=Strict; Path=/"
            self._headers(200, "text/html; charset=utf-8", len(page), extra)
            if self.command != "HEAD":
                self.wfile.write(page)

        def _raw(self, query: Mapping[str, list[str]]) -> None:
            path, ctype, attach, content = self.server.owner.dashboard.raw_file(query)
            from urllib.parse import quote

            extra = {"Cache-Control": "no-store", "Content-Security-Policy": "default-src 'none'; sandbox"}
            if attach:
                extra["Content-Disposition"] = f"attachment; filename*=UTF-8''{quote(os.path.basename(path))}"
            if isinstance(content, bytes):
                self._headers(200, ctype, len(content), extra)
                if self.command != "HEAD":
                    self.wfile.write(content)
                return
            head = b""
            if isinstance(content, tuple):  # bytes to send first, then the file from where it stands
                head, content = content
            with content as f:
                size = len(head) + os.fstat(f.fileno()).st_size - f.tell()
                self._headers(200, ctype, size, extra)
                if self.command != "HEAD":
                    self.wfile.write(head)
                left = size - len(head)
                while left > 0 and self.command != "HEAD":
                    chunk = f.read(min(1 << 20, left))
                    if not chunk:  # shrank meanwhile: the length promised cannot be kept
                        self.close_connection = True
                        break
                    self.wfile.write(chunk)
                    left -= len(chunk)

    return Handler


class DashboardServer:
    """``exp see``: the dashboard over HTTP for one base directory.

    ``port=0`` takes a free port; a busy one is skipped for the next free one.
    Off loopback a token is required (one is generated when not given) and
    then every request must carry it.  ``start()`` serves in a background
    thread, ``serve_forever()`` in this one; ``close()`` stops either.
    """

    def __init__(self, base_dir: str | os.PathLike[str] = DEFAULT_BASE_DIR, host: str = "127.0.0.1",
                 port: int = DASHBOARD_PORT, token: str | None = None, page_path: str | None = None,
                 verbose: bool = False) -> None:
        import secrets
        from http.server import ThreadingHTTPServer

        require_posix()
        if token is not None and (not token or any(c.isspace() or c in ";," for c in token)):
            raise ExpError("--token must be a non-empty string without spaces, ',' or ';'")
        self.dashboard = Dashboard(base_dir)
        self.host = host
        self.token = token if token is not None else (None if _is_loopback(host) else secrets.token_urlsafe(18))
        self.verbose = verbose
        self.page_path = page_path or find_page()
        self._page: tuple[Any, bytes, str] | None = None
        names = {"localhost", host.strip("[]").lower()}
        if not _is_loopback(host):
            import socket

            names.update({socket.gethostname().lower(), socket.getfqdn().lower()})
        self.host_names = names

        import socket

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 128
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
            # Kept-alive connections outlive serve_forever(): close() ends them too.
            connections: set[Any] = set()

            def process_request(self, request: Any, client_address: Any) -> None:
                self.connections.add(request)
                super().process_request(request, client_address)

            def shutdown_request(self, request: Any) -> None:
                self.connections.discard(request)
                super().shutdown_request(request)

            def close_connections(self) -> None:
                for conn in list(self.connections):
                    try:
                        conn.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        handler = _dashboard_handler()
        last: OSError | None = None
        for p in ([port] if port == 0 else range(port, min(port + 50, 65536))):
            try:
                self.httpd = Server((host.strip("[]"), p), handler)
                break
            except OSError as e:
                import errno

                if e.errno not in (errno.EADDRINUSE, errno.EACCES):
                    raise ExpError(f"cannot serve on {host}:{p}: {e.strerror or e}") from None
                last = e
        else:
            raise ExpError(f"ports {port}-{port + 49} on {host} are all taken ({last}); pick one with --port")
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.httpd.connections = set()  # one set per server, not per class
        self.port = self.httpd.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = self.host if self.host not in ("0.0.0.0", "::", "") else _hostname()
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        from urllib.parse import quote

        return f"http://{host}:{self.port}/" + (f"?token={quote(self.token)}" if self.token else "")

    def page(self) -> tuple[bytes, str]:
        """exp_ui.html and its CSP, re-read when the file changes (a note page when it is missing)."""
        try:
            st = os.stat(self.page_path)
            key: Any = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            key = None
        if self._page is None or self._page[0] != key:
            try:
                with open(self.page_path, "rb") as f:
                    data = f.read()
            except OSError:
                data, key = _MISSING_PAGE, None
            self._page = (key, data, _content_security_policy(data))
        return self._page[1], self._page[2]

    def report(self, text: str) -> None:
        print(f"exp see: {text}", file=sys.stderr, flush=True)

    def start(self) -> DashboardServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="exp-dashboard", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever(poll_interval=0.2)

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(5)
            self._thread = None
        self.httpd.server_close()
        self.httpd.close_connections()  # type: ignore[attr-defined]

    def __enter__(self) -> DashboardServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


def find_page() -> str:
    """Where exp_ui.html is: next to exp.py (a copy, a checkout), else where ``pip install`` puts it."""
    where = os.path.dirname(os.path.abspath(__file__))
    here = os.path.join(where, DASHBOARD_PAGE)
    if os.path.isfile(here):
        return here
    # Data files go to <prefix>/share/exp, where exp.py went to <prefix>/lib/pythonX.Y/site-packages:
    # a venv's or the system's prefix, ~/.local for `pip install --user`, any --prefix.
    prefixes = [os.path.dirname(os.path.dirname(os.path.dirname(where))), sys.prefix, sys.base_prefix]
    try:
        import site

        prefixes.append(site.getuserbase())
    except (ImportError, AttributeError):  # pragma: no cover - an embedded interpreter
        pass
    for prefix in prefixes:
        installed = os.path.join(prefix, "share", "exp", DASHBOARD_PAGE)
        if os.path.isfile(installed):
            return installed
    return here


def _wants_browser(host: str) -> bool:
    return _is_loopback(host) and (sys.platform == "darwin" or bool(os.environ.get("DISPLAY") or
                                                                     os.environ.get("WAYLAND_DISPLAY")))


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

    keys = "\n".join(
        f"  [{section}] {f.name}: {f.help.replace('`', '')}"
        + (f" (default {f.default_text()})" if f.default_text() else "")
        for section, fields in (("scheduler", SCHEDULER_FIELDS), ("[experiments]", EXPERIMENT_FIELDS))
        for f in fields
    )
    r = sub.add_parser("run", help="run a batch of experiments from a TOML file",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run the [[experiments]] of a TOML file. Relative paths in it "
                                   "resolve against the file's own directory.",
                       epilog="config keys:\n" + keys)
    r.add_argument("config", help="the batch file, e.g. config.toml")
    r.add_argument("--dry-run", action="store_true", help="print the plan and exit without running anything")
    r.add_argument("--resume", action="store_true",
                   help="skip experiments that already finished successfully in the base directory "
                        "(same name, command, sweep values and repeat), like GNU parallel --resume")
    r.add_argument("--again", action="store_true",
                   help="when the running scheduler of the base directory was started from this same file, "
                        "queue its experiments a second time (without it, that is refused)")
    r.add_argument("--wait", action="store_true",
                   help="when a scheduler already runs for the base directory (the experiments join its "
                        "queue), follow them to the end and exit as `run` would")
    r.set_defaults(func=_cmd_run)

    st = sub.add_parser("status", help="the scheduler of a directory and its queue")
    st.add_argument("dir", nargs="?", default=DEFAULT_BASE_DIR, help="base directory (default ./results)")
    st.add_argument("--json", action="store_true", help="print JSON: {scheduler: {...}, tasks: [...]}")
    st.set_defaults(func=_cmd_status)
    for name, help_text in (("kill", "terminate running tasks, or remove pending ones"),
                            ("retry", "queue failed or killed tasks again, first (a new run in the same directory)"),
                            ("rm", "drop pending tasks, or finished ones' records, from the queue")):
        c = sub.add_parser(name, help=help_text, description=help_text + ". TASK is a task id "
                           "(see `exp status`) or an experiment name (all its tasks).")
        c.add_argument("tasks", nargs="+", metavar="TASK")
        c.add_argument("--dir", default=DEFAULT_BASE_DIR, help="base directory (default ./results)")
        c.set_defaults(func=_cmd_control, action=name)
    sh = sub.add_parser("shutdown", help="stop launching; exit when the running tasks end")
    sh.add_argument("dir", nargs="?", default=DEFAULT_BASE_DIR, help="base directory (default ./results)")
    sh.add_argument("--now", action="store_true", help="terminate the running tasks too")
    sh.set_defaults(func=_cmd_control, action="shutdown", tasks=[])
    pr = sub.add_parser("priority", help="change the priority of pending tasks (higher starts first)")
    pr.add_argument("task", metavar="TASK")
    pr.add_argument("value", metavar="N", type=int)
    pr.add_argument("--dir", default=DEFAULT_BASE_DIR, help="base directory (default ./results)")
    pr.set_defaults(func=_cmd_control, action="priority")

    ls = sub.add_parser("ls", help="list experiments under a directory, newest first",
                        description="List experiments under DIR (and one level below it), newest first, with "
                                    "their metrics. A metric column shows the current run's last value, or "
                                    "with :best the best over the run (min for names containing 'loss', "
                                    "'err', 'ppl', 'perplexity', 'mse', 'mae', 'wer', 'cer' or 'latency', max "
                                    "otherwise; :min and :max choose).")
    ls.add_argument("dir", nargs="?", default=DEFAULT_BASE_DIR, help="base directory (default ./results)")
    ls.add_argument("--json", action="store_true",
                    help="print JSON for scripts: one summary object per experiment (strict JSON; "
                         "non-finite metrics as the strings \"nan\", \"inf\", \"-inf\")")
    ls.add_argument("--status", choices=sorted(STATUSES) + [UNREADABLE], help="only experiments with this status")
    ls.add_argument("--tag", help="only experiments with this tag")
    ls.add_argument("--name", metavar="REGEX", type=_regex, help="only names matching this regular expression")
    ls.add_argument("--columns", metavar="SPEC", help="metric columns, e.g. loss,acc:best,lr:last (default: all)")
    ls.add_argument("--best", action="store_true", help="show the best value of each metric instead of the last")
    ls.add_argument("--sort", metavar="KEY",
                    help=f"sort by a metric, a sweep parameter or one of {', '.join(LS_FIELDS)}")
    ls.add_argument("--desc", action="store_true", help="sort descending (missing values stay last)")
    ls.add_argument("--group", action="store_true",
                    help="one line per experiment name and sweep point (its repeats together): "
                         "count and mean ± std of each metric")
    ls.set_defaults(func=_cmd_ls)

    see = sub.add_parser("see", help="the web dashboard for a directory of experiments",
                         description="Serve the dashboard (exp_ui.html and a JSON API under /api/) for DIR. "
                                     "Off loopback every request needs a token (one is generated and printed "
                                     "in the URL when --token is not given).")
    see.add_argument("dir", nargs="?", default=DEFAULT_BASE_DIR, help="base directory (default ./results)")
    see.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface, with a token)")
    see.add_argument("--port", type=int, default=DASHBOARD_PORT,
                     help=f"port (default {DASHBOARD_PORT}; the next free one when taken; 0: any free port)")
    see.add_argument("--no-browser", action="store_true", help="do not open a browser")
    see.add_argument("--token", help="require this token on every request (default: none on loopback, "
                                     "a generated one elsewhere)")
    see.add_argument("--verbose", action="store_true", help="log every request to stderr")
    see.set_defaults(func=_cmd_see)

    lk = sub.add_parser("lark-sync", help="send the rows still waiting in Lark outboxes",
                        description="Send what save_row(lark=True) queued but could not send (a process that was "
                                    "killed, timed out at exit, or had no secret) for experiment directories, or "
                                    "every experiment under a results directory. The secret comes from "
                                    "LARK_APP_SECRET (or FEISHU_APP_SECRET); the table from each experiment's "
                                    "stored settings, or --url.")
    lk.add_argument("paths", nargs="+", metavar="PATH", help="an experiment directory or a results directory")
    lk.add_argument("--url", help="send to this Base URL instead of the stored table")
    lk.add_argument("--domain", help='"feishu", "lark" or the API\'s base URL (overrides the stored one)')
    lk.set_defaults(func=_cmd_lark_sync)
    return p


def _regex(text: str) -> str:
    import argparse

    try:
        name_pattern(text)
    except ExpError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _send(base: str, action: str, **body: Any) -> dict[str, Any]:
    """Post a command to the scheduler of ``base`` and wait for its answer (ExpError if none)."""
    return StateFile(base).send_command(action, **body)


def _base_dir_arg(path: str) -> str:
    """A base directory given on the command line: ConfigError for a file (a missing one may come)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{path} is not a directory; pass the base directory of your experiments")
    return path


def _cmd_control(args: Any) -> int:
    _base_dir_arg(args.dir)
    body: dict[str, Any] = {"tasks": list(getattr(args, "tasks", None) or [getattr(args, "task", None)])}
    if args.action == "priority":
        body["value"] = args.value
    if args.action == "shutdown":
        body["now"] = args.now
    res = _send(args.dir, args.action, **body)
    if res.get("message"):
        print(res["message"])
    return 0 if res.get("ok") else 1


def _elapsed(item: Mapping[str, Any]) -> str:
    from datetime import datetime

    start, end = item.get("started_at"), item.get("ended_at")
    duration = item.get("duration")
    if isinstance(end, str) and isinstance(duration, (int, float)) and not isinstance(duration, bool) \
            and 0 <= duration < float("inf"):
        return format_duration(duration)  # measured; the times are to the second only
    if not isinstance(start, str):
        return "-"
    try:
        t0 = datetime.fromisoformat(start)
        t1 = datetime.fromisoformat(end) if isinstance(end, str) else datetime.now(t0.tzinfo)
        return format_duration(max(0.0, (t1 - t0).total_seconds()))
    except (ValueError, TypeError):  # not a time, or one with a zone and one without
        return "-"


def _or_dash(value: Any) -> str:
    return "-" if value is None else str(value)


def _cmd_status(args: Any) -> int:
    state = StateFile(_base_dir_arg(args.dir))
    data = state.read() or {}
    raw_summary = data.get("summary")
    summary: dict[str, Any] = raw_summary if isinstance(raw_summary, dict) else {}
    alive = state.owned()
    tasks = []
    for group in ("running", "pending", "errors", "finished"):
        items = data.get(group)
        for item in items if isinstance(items, list) else []:  # a field of the wrong type shows as nothing
            if isinstance(item, dict):
                if group == "running" and not alive:  # its supervisor may have recorded the end since
                    item = task_as_recorded(item)
                tasks.append(dict(item, elapsed=_elapsed(item)))
    sched = {"alive": alive, "pid": summary.get("pid"), "host": summary.get("host"),
             "status_indicator": summary.get("status_indicator") if alive else SCHEDULER_STOPPED,
             "shutting_down": alive and summary.get("shutting_down") is True,
             "started_at": summary.get("started_at"), "updated_at": summary.get("updated_at"),
             "config_path": summary.get("config_path"), "gpus": summary.get("gpus"),
             "counts": {k: summary.get(k) for k in ("total", "pending", "running", "finished", "errors")}}
    if args.json:
        print(_json().dumps(json_safe({"scheduler": sched, "tasks": tasks}), indent=2, ensure_ascii=False,
                            allow_nan=False))
        return 0
    if not data and not alive:
        print(f"no scheduler has run for {state.base_dir}")
        return 0
    who = f"pid {_or_dash(sched['pid'])} on {_or_dash(sched['host'])}"
    shutting = "; shutting down: nothing more starts" if sched["shutting_down"] else ""
    print(f"scheduler: {who}, {'alive' if alive else 'not running'} ({sched['status_indicator']}{shutting}); "
          f"started {sched['started_at'] or '-'}")
    # Cluster jobs (Slurm) get a column of their own: job id, node and the cluster's state.
    jobs = any(isinstance(t.get("job"), dict) for t in tasks)
    rows: list[tuple[str, ...]] = [("id", "name", "status", "GPUs", "attempt", "elapsed", "reason")
                                   + (("job",) if jobs else ())]
    for t in tasks:
        gpus = t.get("assigned_gpus") or t.get("gpu_ids") or []
        gpus = gpus if isinstance(gpus, list) else []
        job = t.get("job") if isinstance(t.get("job"), dict) else {}
        where = (f"{job.get('job_id')}" + (f" on {job['node']}" if job.get("node") else "")
                 + (f" ({job['state']})" if job.get("state") else "")) if job else "-"
        rows.append((_or_dash(t.get("id")), _or_dash(t.get("name")), _or_dash(t.get("status")),
                     ",".join(map(str, gpus)) if gpus else "-", _or_dash(t.get("attempt")), t["elapsed"],
                     str(t.get("reason") or "-")) + ((where,) if jobs else ()))
    print(_table(rows))
    return 0


def _follow_tasks(base: str, ids: list[int]) -> int:
    """`run --wait` after joining: print each task's end; 0 when all finished, 1 otherwise."""
    state = StateFile(base)
    seen: set[int] = set()
    while True:
        data = state.read() or {}
        ended = {i["id"]: i for g in ("finished", "errors") for i in data.get(g) or [] if isinstance(i, dict)}
        for i in ids:
            if i in ended and i not in seen:
                seen.add(i)
                item = ended[i]
                print(f"{item.get('status'):8s} {i} {item.get('name')}"
                      + (f" ({item.get('reason')})" if item.get("status") != FINISHED else ""), flush=True)
        if seen.issuperset(ids):
            return 0 if all(ended[i].get("status") == FINISHED for i in ids) else 1
        if not state.owned():
            print(f"exp: error: the scheduler of {state.base_dir} stopped before every task ended", file=sys.stderr)
            return 1
        time.sleep(0.2)


def _reexec_as_import() -> None:
    """Run on as an import of this file when started as a script (``python exp.py see``).

    The parse tree of a script stays alive until its top level returns, which a
    dashboard's never does: about 25 MB for exp.py, held for the server's life.
    An import frees it as soon as the module is compiled (and can cache the
    bytecode).  The process stays the same (exec), with its interpreter options.
    """
    if __name__ != "__main__" or __spec__ is not None or os.name != "posix" or not sys.executable:
        return  # imported, run with -m, or where exec is no exec
    here = os.path.abspath(__file__)
    name = os.path.splitext(os.path.basename(here))[0]
    orig = list(getattr(sys, "orig_argv", None) or [])  # Python >= 3.10
    if not orig:
        try:
            with open("/proc/self/cmdline", "rb") as f:
                orig = [os.fsdecode(a) for a in f.read().split(b"\0")[:-1]]
        except OSError:
            return
    at = len(orig) - len(sys.argv)
    # A name the interpreter loaded at start (a copy called site.py) would import that module instead.
    if not name.isidentifier() or name in sys.modules or at < 1 or orig[at] != sys.argv[0]:
        return
    code = f"import sys; sys.path.insert(0, {os.path.dirname(here)!r}); import {name}; sys.exit({name}.main())"
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *orig[1:at], "-c", code, *sys.argv[1:]])
    except (OSError, ValueError):
        pass  # go on here, parse tree and all


def _tune_malloc() -> None:
    """glibc gives threads malloc arenas of their own (up to 8 per core); a server with a thread per
    client then keeps many mostly empty ones (about 10 MB for 50 clients).  Two are plenty.  And
    glibc raises its mmap threshold as big blocks are freed, after which the buffers of metrics
    chunks and answers (hundreds of KB each) stay in the heap once freed: a fixed threshold hands
    them back (about 1.5 MB less at the peak, measured by bench_dashboard).

    Only for ``exp see``'s own process: it changes malloc for the whole process.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-8, 2)  # M_ARENA_MAX; absent outside glibc (AttributeError)
        libc.mallopt(-3, 256 << 10)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)  # what compiling exp.py freed (no cached bytecode), kept by malloc till now
    except Exception:  # noqa: BLE001 - an optimisation only
        pass


def _cmd_see(args: Any) -> int:
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, got {args.port}")
    _base_dir_arg(args.dir)
    _reexec_as_import()
    _tune_malloc()
    server = DashboardServer(args.dir, host=args.host, port=args.port, token=args.token, verbose=args.verbose)
    base = server.dashboard.base_dir
    try:
        # Ctrl-C and SIGTERM stop it cleanly, as they stop `exp run`; from before the URL is
        # printed, since whoever reads it may stop the dashboard at once.
        with _InterruptOnSignals():
            if not os.path.isdir(base):
                print(f"note: {base} does not exist yet; the dashboard shows its experiments once some are "
                      "written there", file=sys.stderr)
            if not os.path.isfile(server.page_path):
                print(f"note: {server.page_path} is missing, so the page only says so; the JSON API under /api/ "
                      "works", file=sys.stderr)
            if args.port and server.port != args.port:
                print(f"note: port {args.port} is taken; using {server.port}", file=sys.stderr)
            print(f"exp dashboard for {base}: {server.url}", flush=True)
            print("press Ctrl-C to stop", flush=True)
            if not args.no_browser and _wants_browser(args.host):
                import webbrowser

                threading.Thread(target=webbrowser.open, args=(server.url,), daemon=True).start()
            server.serve_forever()
    except KeyboardInterrupt:
        print("\nexp see: stopped", flush=True)
    finally:
        server.close()
    return 0


def _cmd_run(args: Any) -> int:
    config = load_config(args.config)
    for w in config.warnings:
        print(f"exp: warning: {w}", file=sys.stderr)
    state = StateFile(config.base_experiment_dir)
    if not args.dry_run and state.owned():
        joined = _join_scheduler(config, args)  # a scheduler already owns the directory: join its queue
        if joined is not None:
            return joined
    pool = gpu_pool(config.scheduler)  # detected once, here
    check_gpu_requests(config, pool)
    if args.dry_run:
        print(format_plan(config, resume=args.resume))
        return 0
    for _ in range(3):
        try:
            return Scheduler(config, gpus=pool, resume=args.resume).run()
        except SchedulerBusyError:
            # Another `exp run` took the directory between our look and our start (both
            # started at once): join it as if it had been first, which it was.
            joined = _join_scheduler(config, args)
            if joined is not None:
                return joined
    return Scheduler(config, gpus=pool, resume=args.resume).run()


def _join_scheduler(config: BatchConfig, args: Any) -> int | None:
    """`exp run` where a scheduler already runs: add the config's experiments to its queue.

    None when that scheduler ended before it took them (it had just finished;
    another may have started since): the caller runs them itself, or joins again.
    """
    if not os.path.isfile(config.path):  # it reads the file itself, and /dev/fd/N is ours alone
        raise ConfigError(f"a scheduler already runs for {config.base_experiment_dir}, and it reads a joining "
                          f"config from its file; {config.path} is not one (a pipe?): save the config to a "
                          "file and pass that")
    if not getattr(args, "again", False):
        try:
            running = ((StateFile(config.base_experiment_dir).read() or {}).get("summary") or {})
        except ExpError:
            running = {}
        if running.get("config_path") == config.path:
            # Most likely "run it again to recover" while the scheduler is in fact alive.
            raise ExpError(f"the scheduler running for {config.base_experiment_dir} (pid {running.get('pid')}) "
                           f"was started from this same file: its experiments are queued or ran already "
                           "(`exp status` shows them); to queue them a second time, add --again")
    try:
        res = _send(config.base_experiment_dir, "add", config=config.path, resume=bool(args.resume))
    except ExpError:
        if StateFile(config.base_experiment_dir).owned():
            raise  # it runs, but does not answer
        return None
    if not res.get("ok"):
        if res.get("resend"):  # its scheduler ended first, and another has started since: try again
            return None
        if res.get("config_error"):  # what `exp run` says of any bad config: exit 2
            raise ConfigError(str(res.get("message", "")))
        print(res.get("message", ""))
        return 1
    ignored = [k for k in config.scheduler_keys if k not in ("base_experiment_dir", "auto_restart_on_error")]
    if ignored:
        print(f"exp: warning: {config.path}: its [scheduler] {', '.join(ignored)} "
              f"{'does' if len(ignored) == 1 else 'do'} not apply: the running scheduler keeps its own settings "
              "(this file's auto_restart_on_error and its experiments' own keys do apply to its tasks)", file=sys.stderr)
    if not args.wait:
        print(res.get("message", ""))
        print(f"added to the running scheduler of {config.base_experiment_dir}; see `exp status`")
        return 0
    # From before the lines saying what was queued, which whoever started it may answer with
    # Ctrl-C at once: it stops the waiting; the tasks go on in the scheduler.
    with _InterruptOnSignals():
        print(res.get("message", ""))
        print(f"added to the running scheduler of {config.base_experiment_dir}; waiting for its tasks to end "
              "(Ctrl-C stops waiting, not the tasks)", flush=True)
        return _follow_tasks(config.base_experiment_dir, list(res.get("tasks") or []))


def _cmd_lark_sync(args: Any) -> int:
    override: dict[str, Any] = {}
    if args.url:
        override["url"] = args.url
    if args.domain:
        override["domain"] = args.domain
    check_lark_config(override, "option")
    dirs: list[ExperimentDir] = []
    for path in args.paths:
        if ExperimentDir.is_experiment(path):
            dirs.append(ExperimentDir(path))
        elif os.path.isdir(path):
            dirs.extend(scan(path))
        else:
            raise ConfigError(f"{path} is not a directory; pass experiment directories or a results directory")
    failed = total = 0
    for d in dirs:
        runs = [r for r in d.lark_runs() if lark_pending(d, r)]
        if not runs:
            continue
        try:
            meta = d.read_metadata()
        except ExpError as e:
            print(f"exp: {d.path}: cannot read its metadata ({e}); skipped", file=sys.stderr)
            failed += 1
            continue
        name = meta.get("name") if isinstance(meta.get("name"), str) else os.path.basename(d.path)

        def warn(message: str, who: str = str(name)) -> None:
            print(f"exp: warning: {who}: {message}", file=sys.stderr)

        for rid in runs:
            # The table a run's rows were going to (save_row(lark_config=...) included), then --url.
            used = _read_cursor(d, rid).get("settings")
            settings = lark_settings(_stored_lark(meta), _stored_lark({"lark": used}), override)
            missing = lark_missing(settings)
            if missing:
                print(f"exp: {name} {rid}: not sent, the settings lack {', '.join(missing)}; {_LARK_HOWTO}",
                      file=sys.stderr)
                failed += 1
                continue
            sync = LarkSync(d, settings, warn=warn, context={"name": name, "host": meta.get("hostname") or "",
                                                              "cwd": meta.get("cwd") or d.path})
            try:
                sent, _ = sync.drain([rid])
            except LarkError as e:
                print(f"exp: {name} {rid}: {e}", file=sys.stderr)
                sent = 0
            left = lark_pending(d, rid)
            total += sent
            failed += bool(left)
            print(f"{name} {rid}: sent {sent} row{'s' if sent != 1 else ''}"
                  + (f", {left} left" if left else "") + f" ({d.path})")
    if not total and not failed:
        print("nothing to send: no rows are waiting in the given directories")
    return 1 if failed else 0


def _cmd_ls(args: Any) -> int:
    if not os.path.isdir(args.dir):
        raise ConfigError(f"{args.dir} is not a directory; pass the base directory of your experiments")
    everything = list_experiments(args.dir)
    rows = filter_experiments(everything, args.status, args.tag, args.name)
    default_mode = "best" if args.best else "last"
    if args.columns:
        columns = parse_columns(args.columns, default_mode)
    else:
        names = default_columns(rows)
        if len(names) > LS_DEFAULT_METRIC_COLUMNS and not args.json:
            hidden = names[LS_DEFAULT_METRIC_COLUMNS:]
            print(f"exp: {len(hidden)} more metric(s) not shown ({', '.join(hidden[:8])}"
                  f"{', ...' if len(hidden) > 8 else ''}); pick columns with --columns", file=sys.stderr)
            names = names[:LS_DEFAULT_METRIC_COLUMNS]
        columns = [(k, default_mode) for k in names]
    fields = LS_GROUP_FIELDS if args.group else LS_FIELDS
    if args.sort and args.sort not in fields and not has_metric(rows, args.sort) and not any(
            args.sort in (r.get("params") or {}) for r in rows):
        what = ("a group has no single directory" if args.sort in LS_FIELDS
                else f"no experiment listed has a metric or sweep parameter {args.sort!r}")
        print(f"exp: warning: {what}, so the order is unchanged (--sort also takes {', '.join(fields)})",
              file=sys.stderr)
    elif args.desc and not args.sort:
        print("exp: warning: --desc reverses --sort, and no --sort was given", file=sys.stderr)
    sort_mode = next((m for k, m in columns if k == args.sort), default_mode)
    if args.json:
        if (args.columns or args.best) and not args.group:
            print("exp: warning: --columns and --best choose the table's columns; --json prints each "
                  "experiment's whole summary (with --group, the groups' statistics of those columns)",
                  file=sys.stderr)
        out: Any = rows
        if args.group:
            out = sort_groups(group_rows(rows, _group_columns(rows, columns, args.sort, sort_mode)),
                              args.sort, args.desc)
        elif args.sort:
            out = sort_rows(rows, args.sort, args.desc, args.dir, sort_mode)
        print(_json().dumps(json_safe(out), indent=2, ensure_ascii=False, allow_nan=False))
        return 0
    if rows:
        table = build_listing(rows, columns, args.dir, sort=args.sort, desc=args.desc, group=args.group,
                              sort_mode=sort_mode)
        if args.columns:
            # A typo (--columns los) would otherwise be a column of "-" like a metric not logged yet.
            first = len(LS_GROUP_LEAD_COLUMNS if args.group else LS_LEAD_COLUMNS)
            # ("-" is also a group's mean of values all NaN or infinite, or of text: those are values.)
            empty = [k for i, (k, _) in enumerate(columns) if all(t[first + i] == "-" for t in table[1:])
                     and not has_metric(rows, k)]
            if empty:
                known = default_columns(rows)
                print(f"exp: warning: no experiment listed has a value for {', '.join(map(repr, empty))} "
                      f"(metrics seen: {', '.join(known[:12]) or 'none'}{', ...' if len(known) > 12 else ''})",
                      file=sys.stderr)
        print(_table(table) + ("" if args.group else _dirty_note(rows)))
    elif everything:
        used = [f"--{k} {getattr(args, k)}" for k in ("status", "tag", "name") if getattr(args, k)]
        print(f"no experiments under {args.dir} match {' '.join(used)} ({len(everything)} experiment(s) there)")
    else:
        print(f"no experiments under {args.dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status.

    Exit statuses: 0 success, 1 an experiment failed or another error,
    2 bad usage or configuration, 130 interrupted.
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [RECORD_END_VERB] and 4 <= len(argv) <= 6 and argv[3].lstrip("-").isdigit():
        # Then the end and start times (older supervisors give neither); a `date` without %N
        # prints "...N", which is no time.
        times: list[float | None] = []
        for text in argv[4:6]:
            try:
                times.append(float(text))
            except ValueError:
                times.append(None)
        times += [None] * (2 - len(times))
        try:
            record_orphan_end(argv[1], argv[2], int(argv[3]), times[0], times[1])
        except (ExpError, OSError) as e:
            print(f"exp: error: could not record the end of {argv[2]} in {argv[1]}: {e}", file=sys.stderr)
            return 1
        return 0
    _prepare_stdio()
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "cmd", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # the output's end: on a full disk (``exp ls > /dev/full``) it fails here
        return code
    except BrokenPipeError:
        # The reader went away (``exp ls | head -1``): not an error.
        _quiet_stdout()
        return 0
    except ConfigError as e:
        print(f"exp: error: {e}", file=sys.stderr)
        return 2
    except ExpError as e:
        print(f"exp: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # an I/O error exp did not expect
        import errno

        _quiet_stdout()
        # A full disk with no file named: a write to an open stream, and exp's own files say
        # StorageError; so the output (``exp ls > /dev/full``).
        output = e.filename is None and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        print(f"exp: error: {'could not write the output: ' if output else ''}{e.strerror or e}"
              + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _prepare_stdio() -> None:
    """Every command works whatever it was started with: closed standard descriptors
    (``>&-``, a daemon) get /dev/null, so a file exp opens never takes their place and a
    print goes nowhere instead of raising; and what the output's encoding cannot hold
    (a name in Chinese under LC_ALL=C, a lone "\\ud800" from a hand-edited metadata.json)
    is printed as a backslash escape, which inside a --json string is a valid JSON escape."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            try:
                # The lowest free descriptor: this one, the lower ones being open by now.
                os.open(os.devnull, os.O_RDWR)
            except OSError:
                pass
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None:
            setattr(sys, name, open(os.devnull, "w"))
            continue
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):
            pass


def _quiet_stdout() -> None:
    """When stdout can no longer be written, point it at /dev/null, so that the interpreter's
    final flush of what is still buffered stays quiet."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass


if __name__ == "__main__":
    sys.exit(main())
