"""The one record every loader yields, and the project's JSONL manifest format.

A manifest line::

    {"id": "...", "audio": "clips/x.wav", "text": "reference", "duration": 3.2,
     "language": "en", "task": "asr", "words": [{"word": "hello", "start": 0.12, "end": 0.48}, ...]}

``audio`` is resolved relative to the manifest's folder. Optional keys: ``question``, ``choices``,
``answer`` (QA), ``translation`` and ``target_language`` (ST), ``source`` (provenance).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable


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
        d = dict(d)
        known = {"id", "audio", "text", "duration", "language", "task", "words"}
        missing = [k for k in ("id", "audio", "text") if k not in d]
        if missing:
            raise ValueError(f"manifest record lacks {missing}; required keys: id, audio, text")
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


def read_manifest(path: str | Path) -> list[Utterance]:
    """Read a JSONL manifest; a malformed line raises naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    out = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(Utterance.from_json(json.loads(line), root=path.parent))
            except (json.JSONDecodeError, ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{i}: bad manifest line ({e})") from None
    return out


def write_manifest(path: str | Path, utts: Iterable[Utterance]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for u in utts:
            f.write(json.dumps(u.to_json(root=path.parent), ensure_ascii=False) + "\n")
    tmp.replace(path)
