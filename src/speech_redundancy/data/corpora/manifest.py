"""The project's JSONL manifest (format: :mod:`speech_redundancy.data.records`), with every audio file probed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from speech_redundancy.data.corpora.common import check_on_error, guarded, probe_duration
from speech_redundancy.data.records import Utterance, read_manifest


def _checked(u: Utterance) -> Utterance:
    duration = probe_duration(u.audio)
    return u if u.duration > 0 else dataclasses.replace(u, duration=duration)


def load_manifest(path: str | Path, on_error: str = "raise", failures: list[dict] | None = None) -> list[Utterance]:
    """Records of a JSONL manifest; audio paths are relative to its folder; a missing duration is read from the file."""
    check_on_error(on_error)
    utts = []
    for u in read_manifest(path, on_error, failures):
        checked = guarded(_checked, u, key={"id": u.id}, on_error=on_error, failures=failures)
        if checked is not None:
            utts.append(checked)
    return utts
