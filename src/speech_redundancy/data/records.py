"""The one record every loader yields, and the project's JSONL manifest format.

A manifest line::

    {"id": "...", "audio": "clips/x.wav", "text": "reference", "duration": 3.2,
     "language": "en", "task": "asr", "words": [{"word": "hello", "start": 0.12, "end": 0.48}, ...]}

``audio`` is resolved relative to the manifest's folder. Optional keys: ``question``, ``choices``,
``answer`` (QA), ``translation`` and ``target_language`` (ST), ``source`` (provenance).

A line that is not UTF-8, not a JSON object, lacks a required key or has one of the wrong type (``id`` a
non-empty string, ``text`` a string or list of strings, ``audio`` a path string) is an error naming ``file:line``; with
``on_error="skip"`` only that line is left out (recorded by its ``id`` when it has one, else by ``file:line``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable


TASKS = ("asr", "st", "qa")


def split_task(task: str) -> tuple[str, str | None, str | None]:
    """The ``task`` field of a record or results row: ``"st_en2zh"`` -> ``("st", "en", "zh")``, plain ``"asr"`` ->
    ``("asr", None, None)``. Prompts and scoring both read it through this one parser."""
    base, _, pair = task.partition("_")
    if base == "st" and pair:
        src, sep, tgt = pair.partition("2")
        if not sep or not src or not tgt:
            raise ValueError(f"unknown task {task!r}; expected st_<src>2<tgt>, e.g. st_en2zh")
        return base, src, tgt
    if pair:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS} or st_<src>2<tgt>")
    return base, None, None


@dataclass
class Word:
    word: str
    start: float  # seconds
    end: float  # seconds


@dataclass
class Utterance:
    id: str
    audio: str  # path to the audio file (absolute once loaded from a manifest)
    text: str  # reference: transcript (asr), translation (st) or answer (qa)
    duration: float  # seconds
    language: str = "en"
    task: str = "asr"
    words: list[Word] | None = None  # word timings when aligned
    extra: dict[str, Any] = field(default_factory=dict)  # question, choices, source, ...

    def to_json(self, root: Path | None = None) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        if root is not None:
            try:
                d["audio"] = str(Path(self.audio).resolve().relative_to(root.resolve()))
            except ValueError:
                pass
        if d["words"] is None:
            del d["words"]
        d.update(extra)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], root: Path | None = None) -> "Utterance":
        if not isinstance(d, dict):
            raise ValueError(f"not a JSON object (got {type(d).__name__})")
        d = dict(d)
        known = {"id", "audio", "text", "duration", "language", "task", "words"}
        missing = [k for k in ("id", "audio", "text") if k not in d]
        if missing:
            raise ValueError(f"manifest record lacks {missing}; required keys: id, audio, text")
        uid, text, audio = d["id"], d["text"], d["audio"]
        if isinstance(uid, bool) or not isinstance(uid, (str, int)) or not str(uid).strip():
            raise ValueError(f"id must be a non-empty string, got {uid!r}")
        if not (isinstance(text, str) or (isinstance(text, list) and text and all(isinstance(t, str) for t in text))):
            raise ValueError(f"{uid}: text must be a string or a list of strings, got {text!r}"[:200])
        if not isinstance(audio, str) or not audio.strip():
            raise ValueError(f"{uid}: audio must be a path string, got {audio!r}"[:200])
        audio = Path(d["audio"])
        if root is not None and not audio.is_absolute():
            audio = root / audio
        words = d.get("words")
        return cls(
            id=str(d["id"]),
            audio=str(audio),
            text=d["text"],
            duration=float(d.get("duration", 0.0)),
            language=d.get("language", "en"),
            task=d.get("task", "asr"),
            words=[Word(w["word"], float(w["start"]), float(w["end"])) for w in words] if words is not None else None,
            extra={k: v for k, v in d.items() if k not in known},
        )


class ManifestError(ValueError):
    """A manifest line that cannot be read; the message names ``file:line``."""


def read_manifest(path: str | Path, on_error: str = "raise", failures: list[dict] | None = None) -> list[Utterance]:
    """Read a JSONL manifest; a malformed line raises :class:`ManifestError` naming the file and line, or with
    ``on_error="skip"`` is left out and recorded in ``failures`` as ``{"id" or "file": "<file>:<line>", "error"}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    out = []
    with path.open("rb") as f:
        for i, raw in enumerate(f, 1):
            record: Any = None
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
                if not line.strip():
                    continue
                record = json.loads(line)
                out.append(Utterance.from_json(record, root=path.parent))
            except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
                error = ManifestError(f"{path}:{i}: bad manifest line ({e})")
                if on_error != "skip":
                    raise error from None
                if failures is not None:
                    has_id = isinstance(record, dict) and isinstance(record.get("id"), (str, int)) \
                        and not isinstance(record["id"], bool) and str(record["id"]).strip() != ""
                    failures.append({"id": str(record["id"])} if has_id else {"file": f"{path}:{i}"})
                    failures[-1]["error"] = str(error)
    return out


def write_manifest(path: str | Path, utts: Iterable[Utterance]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: two writers never share it
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for u in utts:
                f.write(json.dumps(u.to_json(root=path.parent), ensure_ascii=False) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
