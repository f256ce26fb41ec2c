"""Word timings from Montreal Forced Aligner TextGrids, checked against the transcript.

MFA writes one TextGrid per utterance with a ``words`` and a ``phones`` interval tier (speaker-prefixed,
``"<speaker> - words"``, when it aligned several speakers into one file). Silence is an interval with an
empty label. Both Praat text formats (long and short) are read; parsing is praatio's.

An utterance's alignment is the file ``<id>.TextGrid`` anywhere below the alignment folder: MFA's output mirrors
its input corpus, typically ``<align_root>/<speaker>/<id>.TextGrid``.
"""

from __future__ import annotations

import dataclasses
import unicodedata
from pathlib import Path
from typing import Iterable

from praatio.utilities import textgrid_io

from speech_redundancy.data.records import Utterance, Word

SILENCE = {"", "sil", "sp", "<eps>", "<sil>"}  # labels that are not words
UNKNOWN = "<unk>"  # MFA's label for a word it had no pronunciation for: matches any one word


class AlignmentError(ValueError):
    """A TextGrid that cannot be read or does not match its transcript; the message names the file."""


def read_textgrid(path: str | Path, tier: str = "words") -> list[Word]:
    """Words of the ``tier`` interval tier of a Praat TextGrid (long or short text format), silences dropped."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise AlignmentError(f"{path}: cannot read TextGrid ({e.strerror})") from None
    try:
        text = raw.decode("utf-16") if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise AlignmentError(f"{path}: TextGrid is neither UTF-8 nor UTF-16 text") from None
    try:
        tiers = textgrid_io.parseTextgridStr(text, includeEmptyIntervals=False)["tiers"]
    except Exception as e:  # praatio raises assorted errors on malformed files
        raise AlignmentError(f"{path}: not a Praat TextGrid ({type(e).__name__}: {e})") from None
    chosen = _pick_tier(tiers, tier)
    if chosen is None:
        names = [t["name"] for t in tiers]
        raise AlignmentError(f"{path}: no interval tier named {tier!r} (tiers: {names})")
    words = []
    for start, end, label in chosen["entries"]:
        label = label.strip()
        if label.lower() not in SILENCE:
            words.append(Word(label, round(float(start), 4), round(float(end), 4)))
    return words


def _pick_tier(tiers: list[dict], name: str) -> dict | None:
    intervals = [t for t in tiers if t["class"] == "IntervalTier"]
    for t in intervals:
        if t["name"] == name:
            return t
    for t in intervals:  # multi-speaker MFA output: "<speaker> - words"
        if t["name"].endswith(f" - {name}"):
            return t
    return None


def normalize_words(text: str) -> list[str]:
    """Lower-cased words with punctuation removed (apostrophes inside words kept)."""
    out = []
    for token in unicodedata.normalize("NFKC", text).lower().split():
        if token == UNKNOWN:
            out.append(token)
        elif not (token.startswith("<") and token.endswith(">")):  # other tags (<spoken_noise>) are not words
            token = "".join(c if c.isalnum() or c == "'" else " " for c in token)
            out += [w.strip("'") for w in token.split() if w.strip("'")]
    return out


def words_match(words: Iterable[str], transcript: str) -> bool:
    """Whether aligned words spell the transcript, ignoring case, punctuation and (for Chinese) segmentation."""
    got, want = normalize_words(" ".join(words)), normalize_words(transcript)
    if len(got) == len(want) and all(g == w or UNKNOWN in (g, w) for g, w in zip(got, want)):
        return True
    # Mandarin: MFA segments characters into words differently from the reference; compare characters.
    return UNKNOWN not in got and "".join(got) == "".join(want)


def check_words(words: list[Word], transcript: str, path: str | Path) -> list[Word]:
    """``words`` if they match ``transcript``; otherwise an :class:`AlignmentError` naming ``path``."""
    if not words_match((w.word for w in words), transcript):
        got = " ".join(w.word for w in words)
        raise AlignmentError(f"{path}: TextGrid words do not match the transcript: {got[:80]!r} vs {transcript[:80]!r}")
    return words


def index_textgrids(align_root: str | Path) -> dict[str, Path]:
    """``{utterance id: TextGrid path}`` for every ``<id>.TextGrid`` below ``align_root``, at any depth."""
    index: dict[str, Path] = {}
    for path in sorted(Path(align_root).rglob("*.[Tt]ext[Gg]rid")):
        if path.stem in index:
            raise AlignmentError(f"{path}: a second TextGrid for {path.stem} (first: {index[path.stem]})")
        index[path.stem] = path
    return index


def attach_alignments(
    utts: list[Utterance],
    align_root: str | Path,
    on_error: str = "raise",
    failures: list[dict] | None = None,
) -> list[Utterance]:
    """Copies of ``utts`` with ``words`` from their MFA TextGrids; utterances with no TextGrid keep ``words=None``.

    A TextGrid that is unreadable or does not match the transcript raises :class:`AlignmentError`, or with
    ``on_error="skip"`` leaves that utterance unaligned and is recorded in ``failures``.
    """
    root = Path(align_root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: alignment folder not found (expected MFA output <align_root>/<speaker>/<id>.TextGrid)")
    index = index_textgrids(root)
    out = []
    for u in utts:
        path = index.get(u.id)
        words = None
        if path is not None:
            try:
                words = check_words(read_textgrid(path), u.extra.get("transcript", u.text), path)
            except AlignmentError as e:
                if on_error != "skip":
                    raise
                if failures is not None:
                    failures.append({"id": u.id, "file": str(path), "error": str(e)})
        out.append(dataclasses.replace(u, words=words))
    return out


def coverage(utts: list[Utterance]) -> float:
    """Fraction of utterances that carry word timings."""
    return sum(u.words is not None for u in utts) / len(utts) if utts else 0.0
