"""Durable per-item results: one JSON line per utterance, flushed and fsynced as it is written.

A run folder holds ``results.jsonl`` (rows), ``summary.json``, ``config.yaml`` (resolved) and ``run.json``
(code version, package versions, the fingerprint of the settings that decide the results). Re-running into the same
folder resumes: finished utterances are skipped, failed ones are retried, and the file is compacted to one row per
utterance at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

PACKAGES = ("torch", "transformers", "hydra-core", "jiwer", "sacrebleu", "numpy", "speech_redundancy")


def read_rows(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Read a JSONL results file; malformed lines are reported as ``file:line: reason`` and skipped.
    A missing file reads as empty."""
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    if not path.exists():
        return rows, problems
    with path.open("rb") as f:
        for i, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
                if not isinstance(row, dict) or "id" not in row:
                    raise ValueError("not an object with an 'id'")
            except (UnicodeDecodeError, ValueError) as e:
                problems.append(f"{path}:{i}: malformed result line skipped ({e})")
                continue
            rows.append(row)
    return rows, problems


def latest_by_id(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One row per id: the last one written wins (a retried failure replaces the failure)."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        out[str(row["id"])] = row
    return out


class ResultsLog:
    """Append-only, crash-safe JSONL log of per-item results."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows, self.problems = read_rows(self.path)
        self.rows = latest_by_id(rows)
        self._repair_tail()
        self._f = self.path.open("a", encoding="utf-8")

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
        """Close and compact the file to one row per id (in ``order`` where given), atomically."""
        self._f.close()
        ids = list(self.rows) if order is None else [i for i in order if i in self.rows]
        listed = set(ids)
        ids += [i for i in self.rows if i not in listed]
        write_jsonl(self.path, (self.rows[i] for i in ids))


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def fingerprint(settings: dict[str, Any]) -> str:
    """Stable hash of the settings that decide a run's per-item results."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


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
