"""Durable per-item results: one JSON line per utterance, flushed and fsynced as it is written.

A run folder holds ``results.jsonl`` (one row per item of the run's selection: decoded, or ``status: failed`` with
the reason, load-time failures included), ``summary.json``, ``config.yaml`` (resolved), ``run.json`` (code
version, package versions, the settings and the fingerprint of those that decide a row, the scoring protocol,
which is not among them), ``run.lock`` (held while a
process works in the folder) and, after a failure, ``failed.json``. Rows decoded earlier for items outside the
current selection (a smaller ``data.limit``) wait in ``unselected.jsonl`` and are reused when selected again.
Re-running into the same folder resumes: finished items are skipped, failed ones are retried, and the file is
compacted to one row per item.

- :class:`FolderLock`: an exclusive ``flock`` on ``run.lock``; the kernel drops it when the process dies (kill -9,
  scancel), so a stale lock never blocks; the holder's pid and host are written inside for the refusal message.
- :func:`read_rows` is the one reader of results files (runner, rescore, experiments), :func:`read_run` the one
  reader of a run folder (rescore, ``make figures``); neither runs, evaluates or unpickles anything it reads.
- :func:`identity` / :func:`fingerprint`: what changes a row (model, task and prompt, intervention, decoding, the
  data's identity), not what selects rows (``limit``, ``sample``, ``on_error``, shards) or how fast they come.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable

PACKAGES = ("torch", "transformers", "hydra-core", "jiwer", "sacrebleu", "numpy", "speech_redundancy")
LOCK_NAME = "run.lock"
UNSELECTED_NAME = "unselected.jsonl"
FAILED_NAME = "failed.json"  # left by a run that failed: the error line and the overrides
STATUSES = ("ok", "failed")


# ----------------------------------------------------------------------------- reading
_NUMBERS = ("tokens_in", "tokens_out", "seconds", "duration", "retention", "edits", "ref_words")
_TEXTS = ("task", "language", "target_language", "kind")


def row_problem(row: Any) -> str | None:
    """Why ``row`` is not a results row (None when it is): an object with an ``id`` (a non-empty string or an
    integer), a ``status`` of ok or failed, for ok rows a ``hypothesis`` string and a ``reference`` string (or list
    of strings), and the counts and labels the scorer reads of the right type when present (numbers: tokens_in,
    tokens_out, seconds, duration, retention, edits, ref_words; strings: task, language, target_language, kind)."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    missing = [k for k in ("id", "status") if k not in row]
    if not missing:
        uid = row["id"]
        if isinstance(uid, bool) or not isinstance(uid, (str, int)) or uid == "":
            return f"id must be a non-empty string, not {uid!r}"
        bad = [k for k in _NUMBERS if row.get(k) is not None
               and (isinstance(row[k], bool) or not isinstance(row[k], (int, float)))]
        bad += [k for k in _TEXTS if row.get(k) is not None and not isinstance(row[k], str)]
        if bad:
            return f"wrong type for {bad}"
    if row.get("status") == "ok":
        missing += [k for k in ("reference", "hypothesis") if k not in row]
    if missing:
        return f"missing {missing}"
    if row["status"] not in STATUSES:
        return f"status must be 'ok' or 'failed', not {row['status']!r}"
    if row["status"] == "ok":
        ref = row["reference"]
        if not isinstance(row["hypothesis"], str):
            return "hypothesis is not a string"
        if not (isinstance(ref, str) or (isinstance(ref, list) and all(isinstance(r, str) for r in ref))):
            return "reference is not a string (or list of strings)"
    return None


def has_id(row: Any) -> str | None:
    """The check of a plain keyed log (any object with an ``id``)."""
    return None if isinstance(row, dict) and "id" in row else "not an object with an 'id'"


MAX_LINE = 64 * 2**20  # bytes: a longer results line is reported and skipped, never read into memory whole


def file_problem(path: Path) -> str | None:
    """Why the file at ``path`` (which exists) is not read: a symbolic link, or not a regular file (a FIFO, a
    device such as /dev/zero, a folder): ``results.jsonl is a FIFO, not a regular file; not read``."""
    if path.is_symlink():
        return f"{path}: is a symbolic link (to {os.readlink(path)}), not a file the project wrote; not read"
    kind = file_kind(path)
    return None if kind == "file" else f"{path}: is {kind}, not a regular file; not read"


def file_kind(path: Path) -> str:
    """``file``, ``a folder``, ``a FIFO``, ``a character device``... what ``path`` is (stat follows links)."""
    import stat

    mode = path.stat().st_mode
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _lines(f) -> Iterable[bytes | None]:
    """The lines of a binary file, each at most :data:`MAX_LINE` bytes (None stands for a longer one, skipped)."""
    while True:
        raw = f.readline(MAX_LINE + 1)
        if not raw:
            return
        if len(raw) > MAX_LINE and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):  # the rest of the long line, a piece at a time
                raw = f.readline(MAX_LINE)
            yield None
            continue
        yield raw


def read_rows(path: str | Path, check: Callable[[Any], str | None] = row_problem) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of a JSONL results file, and one ``file:line: malformed result line skipped: reason`` per line that is
    not UTF-8, not JSON, longer than :data:`MAX_LINE` or fails ``check`` (default: a results row,
    :func:`row_problem`). A missing file reads as empty; a symbolic link or something that is not a regular file
    (a FIFO, /dev/zero) is not read and is one problem (:func:`file_problem`)."""
    path = Path(path)
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    if not path.exists() and not path.is_symlink():
        return rows, problems
    why = file_problem(path) if path.exists() else f"{path}: is a broken symbolic link; not read"
    if why:
        return rows, [why]
    with path.open("rb") as f:
        for i, raw in enumerate(_lines(f), 1):
            if raw is None:
                problems.append(f"{path}:{i}: malformed result line skipped: longer than {MAX_LINE} bytes")
                continue
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problem = f"not UTF-8 ({e.reason} at byte {e.start})"
            else:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    problem = f"not JSON ({e.msg})"
                except (ValueError, RecursionError) as e:  # a number too long to convert, nesting too deep
                    problem = f"not JSON ({type(e).__name__}: {str(e)[:80]})"
                else:
                    problem = check(row)
            if problem:
                problems.append(f"{path}:{i}: malformed result line skipped: {problem}")
                continue
            rows.append(row)
    return rows, problems


def latest_by_id(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One row per id: the last one written wins (a retried failure replaces the failure)."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        out[str(row["id"])] = row
    return out


def read_json(path: str | Path, what: type = dict) -> tuple[Any, str | None]:
    """(the JSON object in ``path``, None), or (None, ``<path>: why``) when it is missing, a link, not a regular
    file, larger than :data:`MAX_LINE`, not UTF-8, not JSON or not a ``what``. Never raises."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None, f"{path}: missing"
    why = file_problem(path) if path.exists() else f"{path}: is a broken symbolic link; not read"
    if why:
        return None, why
    try:
        with path.open("rb") as f:
            blob = f.read(MAX_LINE + 1)
        if len(blob) > MAX_LINE:
            return None, f"{path}: larger than {MAX_LINE} bytes; not read"
        obj = json.loads(blob.decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None, f"{path}: unreadable ({type(e).__name__}: {str(e)[:120]})"
    if not isinstance(obj, what):
        return None, f"{path}: expected a JSON {what.__name__}, got {type(obj).__name__}"
    return obj, None


@dataclass
class RunFolder:
    """What a run folder says, read by :func:`read_run` (the one reader of ``make figures``, rescore and resume
    checks): its ``run.json`` (None when unreadable), one row per id (the last one written wins), every problem met
    as one line, whether it finished (``summary.json`` present) and who works in it now (``run.lock`` held)."""

    path: Path
    meta: dict[str, Any] | None
    rows: list[dict[str, Any]]
    problems: list[str]
    finished: bool
    in_use: str | None

    @property
    def settings(self) -> dict[str, Any] | None:
        s = (self.meta or {}).get("settings")
        return s if isinstance(s, dict) else None

    @property
    def protocol(self) -> str:
        return str((self.meta or {}).get("protocol") or "paper")

    def warnings(self) -> list[str]:
        """One line each for a folder in use and one that has not finished: its numbers are not final."""
        out = []
        if self.in_use:
            out.append(f"{self.path}: in use by {self.in_use} (run.lock held): rows may still be added")
        if not self.finished:
            out.append(f"{self.path}: no summary.json (the job failed or has not finished): the rows found are used "
                       "as they are and the numbers marked unfinished")
        return out


def read_run(folder: str | Path) -> RunFolder:
    """Read a run folder without writing to it (see :class:`RunFolder`); nothing in it is executed or unpickled."""
    folder = Path(folder)
    meta, problem = read_json(folder / "run.json")
    problems = [problem] if problem else []
    if meta is not None and not isinstance(meta.get("settings"), dict):
        problems.append(f"{folder / 'run.json'}: no settings object")
    rows, bad = read_rows(folder / "results.jsonl")
    summary = folder / "summary.json"
    return RunFolder(path=folder, meta=meta, rows=list(latest_by_id(rows).values()), problems=problems + bad,
                     finished=summary.is_file() and not summary.is_symlink(), in_use=lock_holder(folder))


def lock_holder(folder: str | Path) -> str | None:
    """Who holds ``<folder>/run.lock`` (``pid N on HOST since T``), or None when nobody does. The probe takes a
    shared lock for an instant; :meth:`FolderLock.acquire` retries briefly, so a run starting meanwhile is not
    refused."""
    path = Path(folder) / LOCK_NAME
    if path.is_symlink() or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(fd)
    except OSError:
        return None
    finally:
        os.close(fd)  # drops the shared lock if it was taken
    return None


def _holder(fd: int) -> str:
    try:
        who = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace").strip())
        return f"pid {who['pid']} on {who['host']} since {who['since']}"
    except (ValueError, KeyError, TypeError, OSError):
        return "another process"


# ----------------------------------------------------------------------------- the folder lock
class FolderBusy(RuntimeError):
    """Another live process holds the run folder; the message names its pid and host."""


class FolderLock:
    """Exclusive lock on a run folder: ``flock`` on ``<folder>/run.lock``, released by the kernel when the holder
    exits or dies (so a lock left by a killed process is never stale). Two processes, or two opens in one process,
    cannot both hold it. Usable as a context manager; ``acquire`` raises :class:`FolderBusy` naming the holder and
    ``OSError`` when the folder cannot be written."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            for attempt in range(5):  # a reader's probe (lock_holder) holds a shared lock for an instant
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if attempt == 4:
                        raise
                    time.sleep(0.05)
        except BlockingIOError:
            who = _holder(fd)
            os.close(fd)
            raise FolderBusy(f"{self.folder} is in use by {who}; wait for it to finish or choose another "
                             "run_name=... (hydra.run.dir=...)") from None
        except BaseException:
            os.close(fd)
            raise
        stamp = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "since": time.strftime("%Y-%m-%d %H:%M:%S")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, (stamp + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock; the file stays (removing it would race)
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ----------------------------------------------------------------------------- the results log
class ResultsLog:
    """Append-only, crash-safe JSONL log of per-item results.

    ``keep``: the ids of the run's selection. Rows of other ids are moved to ``unselected.jsonl`` at once (ok
    rows only; a failure outside the selection is dropped), and rows found there for selected ids come back, so
    ``results.jsonl`` always holds the selection's rows and nothing else. ``check``: which lines count as rows
    (default any object with an ``id``; the runner passes :func:`row_problem`).
    """

    def __init__(self, path: Path, keep: Iterable[str] | None = None, check: Callable[[Any], str | None] = has_id):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.unselected_path = self.path.with_name(UNSELECTED_NAME)
        spare, spare_problems = read_rows(self.unselected_path, check) if keep is not None else ([], [])
        rows, self.problems = read_rows(self.path, check)
        self.problems += spare_problems
        self.rows = latest_by_id([*spare, *rows])
        self.keep = None if keep is None else [str(i) for i in keep]
        if self.keep is not None:
            self._compact()
        self._repair_tail()
        self._f = self.path.open("a", encoding="utf-8")

    def _compact(self) -> None:
        """Write the selected rows to ``results.jsonl`` and the other ok rows to ``unselected.jsonl``."""
        keep = set(self.keep)
        spare = [r for i, r in self.rows.items() if i not in keep and r.get("status") == "ok"]
        self.rows = {i: r for i, r in self.rows.items() if i in keep}
        if spare:
            write_jsonl(self.unselected_path, spare)
        elif self.unselected_path.exists():
            self.unselected_path.unlink()
        write_jsonl(self.path, (self.rows[i] for i in self.keep if i in self.rows))

    def _repair_tail(self) -> None:
        # A crash mid-write can leave a last line without a newline; start the next row on a fresh line.
        if self.path.exists() and self.path.stat().st_size:
            with self.path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    with self.path.open("ab") as g:
                        g.write(b"\n")

    def done(self, utt_id: str) -> bool:
        row = self.rows.get(utt_id)
        return row is not None and row.get("status") == "ok"

    def append(self, row: dict[str, Any]) -> None:
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.rows[str(row["id"])] = row

    def close(self, order: list[str] | None = None) -> None:
        """Close and compact the file to one row per id (in ``order``, else the selection's order), atomically."""
        self._f.close()
        order = order if order is not None else self.keep
        ids = list(self.rows) if order is None else [i for i in order if i in self.rows]
        listed = set(ids)
        ids += [i for i in self.rows if i not in listed]
        write_jsonl(self.path, (self.rows[i] for i in ids))


# ----------------------------------------------------------------------------- atomic writes
def _tmp_name(path: Path) -> Path:
    """A temporary name of this process (two processes writing one file never share it)."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with tmp.open("w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    def write(f):
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    _atomic_write(path, write)


def write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n"))


# ----------------------------------------------------------------------------- what decides a row
# Keys that choose which items a run evaluates, where files go or how fast rows come, never what a row holds.
SELECTION_KEYS = {
    "data": ("limit", "sample", "seed", "buckets", "on_error", "shard_index", "shard_count", "audio_dir"),
    "model": ("num_threads", "batch_size", "dap_layer_deep"),  # dap_layer_deep: reaches rows through the points
}


def _drop_none(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _drop_none(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [_drop_none(v) for v in x]
    return x


def identity(settings: dict[str, Any]) -> dict[str, Any]:
    """The part of a run's settings that changes its rows: everything but :data:`SELECTION_KEYS` (unset keys
    are left out, so a preset gaining a key set to null keeps its fingerprint)."""
    out = dict(settings)
    for node, keys in SELECTION_KEYS.items():
        if isinstance(out.get(node), dict):
            out[node] = {k: v for k, v in out[node].items() if k not in keys}
    return _drop_none(out)


def digest(obj: Any) -> str:
    """Stable 16-hex-digit hash of a JSON-able object."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def fingerprint(settings: dict[str, Any]) -> str:
    """Stable hash of the settings that decide a run's per-item results (:func:`identity`)."""
    return digest(identity(settings))


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every dotted key whose value differs (``(unset)`` for a missing one)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            key = f"{prefix}{k}"
            if k not in old or k not in new:
                out.append(f"{key}: {old.get(k, '(unset)')!s} -> {new.get(k, '(unset)')!s}")
            else:
                out += differences(old[k], new[k], key + ".")
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in differences(a, b, f"{prefix}{i}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old} -> {new}"]


def environment() -> dict[str, Any]:
    """Code version and package versions, recorded in every run folder."""
    root = Path(__file__).resolve().parents[2]
    commit = None
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"code_version": commit, "python": sys.version.split()[0], "platform": platform.platform(),
            "packages": versions}
