"""Spoken question answering sets, as Hugging Face datasets on disk (layouts: see :mod:`.hf`).

- VoiceBench (Chen et al., 2024; ``hlt-lab/voicebench``) ``sd-qa``: columns ``audio``, ``prompt`` (the question's
  text), ``reference`` (the answer); one split per accent, the paper uses ``usa`` (553 items).
- VoiceBench ``openbookqa``: columns ``audio``, ``prompt`` (question followed by its lettered options),
  ``reference`` (the key, ``A``-``D``); split ``test`` (455 items). Options are parsed from the prompt unless the
  table has ``choices`` / ``answerKey`` columns.
- SpeechTriviaQA (``TwinkStart/speech-triavia-qa``, synthetic speech): columns ``audio``, ``question``,
  ``answer`` (a string or a list of accepted aliases); split ``test`` (1,020 items in the paper).

Every record has task ``qa``, ``text`` = the reference answer, ``extra["question"]`` and ``extra["answer"]``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from speech_redundancy.data.corpora.common import CorpusError
from speech_redundancy.data.corpora.hf import column_names, find_tables, iter_hf
from speech_redundancy.data.records import Utterance

_OPTION = re.compile(r"^\s*\(?([A-E])[\.\):]\s+(.+?)\s*$")


def _require(root, split, config, columns: tuple[str, ...]) -> None:
    files = find_tables(root, split, config)
    have = column_names(files)
    missing = [c for c in columns if c not in have]
    if missing:
        raise CorpusError(f"{files[0]}: missing columns {missing}; expected {list(columns)}, found {have}")


def parse_choices(prompt: str) -> dict[str, str] | None:
    """``{"A": "...", ...}`` from option lines like ``A. text`` or ``(B) text``; None when there are none."""
    options = dict(m.groups() for line in prompt.splitlines() if (m := _OPTION.match(line)))
    return options or None


def _choices_from_columns(row: dict[str, Any]) -> dict[str, str] | None:
    c = row.get("choices")
    if isinstance(c, dict) and "label" in c and "text" in c:  # allenai/openbookqa layout
        return dict(zip(c["label"], c["text"]))
    if isinstance(c, list):
        return {chr(ord("A") + i): str(t) for i, t in enumerate(c)}
    return None


def _qa(uid: str, audio: Path, duration: float, question: str, answer: Any, source: str, **extra) -> Utterance:
    text = answer[0] if isinstance(answer, list) and answer else str(answer)
    return Utterance(uid, str(audio), str(text), duration, "en", "qa",
                     extra={"question": question, "answer": answer, "source": source, **extra})


def load_sdqa(root: str | Path, split: str = "usa", audio_dir=None, on_error: str = "raise", failures=None) -> list[Utterance]:
    """VoiceBench sd-qa, one accent ``split`` (``root``: the voicebench snapshot, its ``sd-qa`` folder, or a saved split)."""
    _require(root, split, "sd-qa", ("audio", "prompt", "reference"))
    return [
        _qa(uid, audio, dur, row["prompt"], row["reference"], f"voicebench/sd-qa/{split}")
        for uid, audio, dur, row in iter_hf(root, split, "sd-qa", id_prefix=f"sdqa-{split}-", audio_dir=audio_dir,
                                            on_error=on_error, failures=failures)
    ]


def load_openbookqa(root: str | Path, split: str = "test", audio_dir=None, on_error: str = "raise", failures=None) -> list[Utterance]:
    """VoiceBench openbookqa: multiple choice; ``extra["choices"]`` maps letters to options, ``answer`` is the key."""
    _require(root, split, "openbookqa", ("audio", "prompt"))
    utts = []
    for uid, audio, dur, row in iter_hf(root, split, "openbookqa", id_prefix="obqa-", audio_dir=audio_dir,
                                        on_error=on_error, failures=failures):
        key = row.get("reference", row.get("answerKey"))
        if key is None:
            raise CorpusError(f"{root}: openbookqa row {uid} has neither 'reference' nor 'answerKey'")
        choices = _choices_from_columns(row) or parse_choices(row["prompt"])
        utts.append(_qa(uid, audio, dur, row["prompt"], str(key).strip(), "voicebench/openbookqa", choices=choices))
    return utts


def load_trivia_qa(root: str | Path, split: str = "test", audio_dir=None, on_error: str = "raise", failures=None) -> list[Utterance]:
    """SpeechTriviaQA: open answers; ``extra["answer"]`` keeps every accepted alias, ``text`` the first."""
    _require(root, split, None, ("audio", "question", "answer"))
    return [
        _qa(uid, audio, dur, row["question"], row["answer"], "speech-triviaqa")
        for uid, audio, dur, row in iter_hf(root, split, None, id_prefix="trivia-", audio_dir=audio_dir,
                                            on_error=on_error, failures=failures)
    ]
