"""Helpers every corpus loader shares: errors, cheap audio probing, text decoding, skip-or-raise."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, TypeVar

import soundfile as sf

from speech_redundancy.audio import AudioError, check_header, check_path
from speech_redundancy.data.textgrid import AlignmentError

T = TypeVar("T")
ON_ERROR = ("raise", "skip")


class CorpusError(ValueError):
    """A corpus file or item that does not fit the expected layout; the message names the file."""


ITEM_ERRORS = (CorpusError, AudioError, AlignmentError)


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    return on_error


def probe_duration(path: str | Path) -> float:
    """Duration in seconds from the file header (no decoding); :class:`AudioError` naming a missing, corrupt, empty
    or truncated file, or a directory."""
    path = Path(path)
    check_path(path)
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: audio file is empty (0 bytes)")
    try:
        info = sf.info(str(path))
    except Exception as e:  # LibsndfileError and friends
        raise AudioError(f"{path}: cannot read audio ({str(e).split(': ')[-1]})") from None
    check_header(path, info.extra_info)
    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioError(f"{path}: audio file is empty")
    return round(info.frames / info.samplerate, 4)


def read_text(path: str | Path, what: str = "transcript") -> str:
    """UTF-8 contents of a text file; :class:`CorpusError` naming the file when it is missing or not UTF-8."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorpusError(f"{path}: {what} file not found") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: {what} is not UTF-8 text (bad byte at offset {e.start})") from None


def guarded(fn: Callable[..., T], *args, key: dict, on_error: str, failures: list[dict] | None) -> T | None:
    """``fn(*args)``; on an item error, raise (``on_error="raise"``) or record ``{**key, "error"}`` and return None."""
    try:
        return fn(*args)
    except ITEM_ERRORS as e:
        if on_error != "skip":
            raise
        if failures is not None:
            failures.append({**key, "error": str(e)})
        return None


def missing_root(path: Path, corpus: str, layout: str) -> FileNotFoundError:
    """The one-line error for a corpus root that is not there or has the wrong layout."""
    return FileNotFoundError(f"{path}: {corpus} not found there; expected {layout}")


def iso_language(code: str) -> str:
    """``"zh-CN"`` -> ``"zh"``, ``"en"`` -> ``"en"``."""
    return code.split("-")[0].split("_")[0].lower()
