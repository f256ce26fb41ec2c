"""KeSpeech (Tang et al., 2021): Mandarin and eight subdialects; the ASR test set.

Layout (as released): ``<root>/Tasks/ASR/<split>/`` holds Kaldi-style lists, one line per utterance:
``wav.scp`` (``<utt-id> <audio path relative to <root>>``, e.g. ``Audio/<speaker>/phase1/<utt-id>.wav``),
``text`` (``<utt-id> <transcript>``), and optionally ``utt2subdialect`` and ``utt2spk``. ``root`` may also be
the ``<split>`` folder itself; relative audio paths are then tried against the corpus root three levels up and
against the list's own folder.
"""

from __future__ import annotations

import re
from pathlib import Path

from speech_redundancy.data.corpora.common import (
    CorpusError,
    check_on_error,
    guarded,
    missing_root,
    probe_duration,
    read_text,
)
from speech_redundancy.data.records import Utterance

LAYOUT = "<root>/Tasks/ASR/<split>/{wav.scp,text} with audio paths relative to <root>"
_TAG = re.compile(r"<[^>]*>")  # <SPOKEN_NOISE> and similar non-speech marks


def find_task_dir(root: str | Path, split: str) -> tuple[Path, Path]:
    """``(lists folder, corpus root)`` for ``split``."""
    root = Path(root)
    for corpus in (root, root / "KeSpeech"):
        if (corpus / "Tasks" / "ASR" / split / "wav.scp").is_file():
            return corpus / "Tasks" / "ASR" / split, corpus
    if (root / "wav.scp").is_file():
        corpus = root.parents[2] if root.parent.parent.name == "Tasks" else root
        return root, corpus
    raise missing_root(root, f"KeSpeech {split}", LAYOUT)


def read_kaldi_list(path: Path) -> dict[str, str]:
    """``{key: value}`` from a Kaldi ``<key> <value>`` list (UTF-8)."""
    out = {}
    for line in read_text(path, what="list").split("\n"):
        parts = line.strip().split(maxsplit=1)
        if not parts:
            continue
        out[parts[0]] = parts[1] if len(parts) > 1 else ""
    return out


def clean_transcript(text: str) -> str:
    """Transcript with non-speech tags removed and spaces collapsed."""
    return " ".join(_TAG.sub(" ", text).split())


def _resolve(rel: str, corpus: Path, lists: Path) -> Path:
    if rel.rstrip().endswith("|"):
        raise CorpusError(f"{lists / 'wav.scp'}: entry {rel!r} is a command; expected an audio file path")
    p = Path(rel)
    if p.is_absolute():
        return p
    for base in (corpus, lists):
        if (base / p).is_file():
            return base / p
    return corpus / p


def _utterance(uid: str, rel: str, lists: Path, corpus: Path, texts: dict, dialects: dict, speakers: dict) -> Utterance:
    if uid not in texts:
        raise CorpusError(f"{lists / 'text'}: no transcript for {uid}")
    audio = _resolve(rel, corpus, lists)
    extra = {"source": f"kespeech/{lists.name}"}
    if uid in dialects:
        extra["subdialect"] = dialects[uid]
    if uid in speakers:
        extra["speaker"] = speakers[uid]
    return Utterance(uid, str(audio), clean_transcript(texts[uid]), probe_duration(audio), "zh", "asr", extra=extra)


def load_kespeech(
    root: str | Path,
    split: str = "test",
    on_error: str = "raise",
    failures: list[dict] | None = None,
) -> list[Utterance]:
    """Every utterance listed in ``wav.scp`` of ``split``, in list order; language ``zh``, task ``asr``."""
    check_on_error(on_error)
    lists, corpus = find_task_dir(root, split)
    wavs = read_kaldi_list(lists / "wav.scp")
    texts = read_kaldi_list(lists / "text")
    optional = {name: read_kaldi_list(lists / name) if (lists / name).is_file() else {} for name in ("utt2subdialect", "utt2spk")}
    utts = []
    for uid, rel in wavs.items():
        u = guarded(_utterance, uid, rel, lists, corpus, texts, optional["utt2subdialect"], optional["utt2spk"],
                    key={"id": uid}, on_error=on_error, failures=failures)
        if u is not None:
            utts.append(u)
    return utts
