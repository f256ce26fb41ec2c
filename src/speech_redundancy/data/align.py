"""Word timings for a known transcript, offline: forced alignment with pocketsphinx 5.1.1 and its en-US model.

pocketsphinx aligns in two passes over the same audio (``set_align_text`` -> decode -> ``set_alignment`` ->
decode) and reports words with start and duration in 10 ms frames. The transcript is normalised first
(lower case, hyphens split, punctuation dropped; see :func:`normalize_words`).

Words missing from the pronunciation dictionary cannot be aligned. They are left out of the aligner's text and
then given the stretch between their aligned neighbours (split evenly), so every reference word still has a
window; :class:`Alignment` says which words were timed by the aligner (``aligned``) and which were not
(``oov``), and ``coverage`` is the fraction the aligner timed. Montreal Forced Aligner output (TextGrid) is
read elsewhere (``data/textgrid.py``); this module is the offline fallback used for the demo set.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np

from speech_redundancy.data.records import Word

SAMPLE_RATE = 16_000  # the en-US acoustic model's rate
FRAME_S = 0.01  # pocketsphinx frame shift
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'"})
_TOKEN = re.compile(r"[^\W_]+(?:'[^\W_]+)*")  # letters/digits (any script), inner apostrophes kept


class AlignmentError(RuntimeError):
    """The aligner found no path through the transcript; the message names the utterance."""


@dataclass
class Alignment:
    """Result of :func:`align`: one :class:`Word` per normalised reference word, in order."""

    words: list[Word]
    aligned: list[bool]  # True where pocketsphinx timed the word, False where it was interpolated (OOV)

    @property
    def oov(self) -> list[str]:
        """Reference words the dictionary lacks (timed by interpolation)."""
        return [w.word for w, ok in zip(self.words, self.aligned) if not ok]

    @property
    def coverage(self) -> float:
        """Fraction of reference words timed by the aligner."""
        return sum(self.aligned) / len(self.aligned) if self.aligned else 0.0


def normalize_words(text: str) -> list[str]:
    """Lower-case word tokens of ``text``: hyphens and dashes split words, other punctuation is dropped,
    apostrophes inside words are kept ("o'clock", "didn't"). Digits stay digits (the dictionary has no "10":
    write numbers as words)."""
    text = text.lower().translate(_APOSTROPHES)
    return _TOKEN.findall(text)


# Decoder settings tried in turn. With optional silences and fillers between words (the default) the first pass
# sometimes ends in no final state, e.g. after digital silence at the start of a clip; without them it usually
# succeeds, but pauses are then absorbed into the neighbouring words.
ATTEMPTS: tuple[dict, ...] = ({}, {"fsgusefiller": False})


def _new_decoder(**options):
    from pocketsphinx import Decoder  # optional dependency: pip install .[demo]

    return Decoder(lm=None, loglevel="FATAL", **options)


@functools.cache
def _dictionary():
    return _new_decoder()


def in_dictionary(word: str) -> bool:
    """Whether pocketsphinx's en-US dictionary has a pronunciation for the (normalised) word."""
    return _dictionary().lookup_word(word) is not None


def _to_pcm16(audio: np.ndarray, sample_rate: int) -> bytes:
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"audio must be mono (1-D), got shape {audio.shape}")
    if sample_rate != SAMPLE_RATE:
        import soxr

        audio = soxr.resample(audio, sample_rate, SAMPLE_RATE).astype(np.float32)
    return np.clip(np.round(audio * 32768.0), -32768, 32767).astype("<i2").tobytes()


def _decode(decoder, pcm: bytes) -> None:
    decoder.start_utt()
    decoder.process_raw(pcm, full_utt=True)
    decoder.end_utt()


def _align_once(options: dict, pcm: bytes, words: list[str], name: str) -> list[tuple[str, float, float]]:
    """(word, start s, end s) for each of ``words`` from one fresh decoder (its adaptive state, e.g. CMN,
    would otherwise carry over from the previous clip and make results depend on the order of clips)."""
    decoder = _new_decoder(**options)
    try:
        decoder.set_align_text(" ".join(words))
        _decode(decoder, pcm)
        decoder.set_alignment()
        _decode(decoder, pcm)
        result = decoder.get_alignment()
    except RuntimeError as e:
        raise AlignmentError(f"{name}: pocketsphinx could not align the transcript ({e})") from None
    if result is None:
        raise AlignmentError(f"{name}: pocketsphinx found no alignment for the transcript")
    timed = []
    for seg in result:
        token = re.sub(r"\(\d+\)$", "", seg.name)  # alternate pronunciations: "than(2)" -> "than"
        if token.startswith(("<", "[", "+")):  # <sil>, <s>, </s>, fillers
            continue
        timed.append((token, seg.start * FRAME_S, (seg.start + seg.duration) * FRAME_S))
    if [t for t, _, _ in timed] != words:
        raise AlignmentError(
            f"{name}: aligner returned {len(timed)} words for {len(words)} in the transcript "
            f"(first: {[t for t, _, _ in timed[:5]]})"
        )
    return timed


def _run_aligner(pcm: bytes, words: list[str], name: str) -> list[tuple[str, float, float]]:
    """The first successful alignment over :data:`ATTEMPTS`; the last failure is raised."""
    for i, options in enumerate(ATTEMPTS):
        try:
            return _align_once(options, pcm, words, name)
        except AlignmentError:
            if i == len(ATTEMPTS) - 1:
                raise
    raise AssertionError("unreachable")


def _fill_gaps(times: list[tuple[float, float] | None], duration: float) -> list[tuple[float, float]]:
    """Give each run of untimed words an even share of the stretch between its timed neighbours."""
    out = list(times)
    i = 0
    while i < len(out):
        if out[i] is not None:
            i += 1
            continue
        j = i
        while j < len(out) and out[j] is None:
            j += 1
        lo = out[i - 1][1] if i > 0 else 0.0
        hi = out[j][0] if j < len(out) else duration
        hi = max(hi, lo)
        step = (hi - lo) / (j - i)
        for k in range(i, j):
            out[k] = (lo + (k - i) * step, lo + (k - i + 1) * step)
        i = j
    return out


def align(audio: np.ndarray, text: str, sample_rate: int = SAMPLE_RATE, name: str = "utterance") -> Alignment:
    """Align ``text`` to mono ``audio``; words the dictionary lacks are interpolated and flagged (see module doc)."""
    ref = normalize_words(text)
    if not ref:
        raise AlignmentError(f"{name}: transcript {text!r} has no words to align")
    pcm = _to_pcm16(audio, sample_rate)
    duration = len(pcm) / 2 / SAMPLE_RATE
    known = [in_dictionary(w) for w in ref]
    if not any(known):
        raise AlignmentError(f"{name}: no word of {text!r} is in the pocketsphinx dictionary")
    timed = iter(_run_aligner(pcm, [w for w, k in zip(ref, known) if k], name))
    times: list[tuple[float, float] | None] = []
    for k in known:
        if k:
            _, start, end = next(timed)
            times.append((start, min(end, duration)))
        else:
            times.append(None)
    spans = _fill_gaps(times, duration)
    return Alignment([Word(w, round(s, 3), round(e, 3)) for w, (s, e) in zip(ref, spans)], known)


def align_spans(audio: np.ndarray, spans: list[tuple[float, float, str]], sample_rate: int = SAMPLE_RATE,
                name: str = "utterance", on_failure: str = "raise") -> Alignment:
    """Align a clip whose transcript is known per time span ``(start s, end s, text)`` (e.g. STM turns).

    Each span is aligned on its own stretch of audio (conversational clips that fail as a whole often align
    turn by turn); word times are relative to the whole clip. Spans must be in order and not overlap. With
    ``on_failure="interpolate"`` a span the aligner cannot handle gets its words spread evenly over the span,
    flagged as not aligned; with "raise" it raises :class:`AlignmentError`.
    """
    if on_failure not in ("raise", "interpolate"):
        raise ValueError(f"on_failure={on_failure!r}; allowed: raise, interpolate")
    words: list[Word] = []
    aligned: list[bool] = []
    last_end = 0.0
    for i, (start, end, text) in enumerate(spans):
        if start < last_end - 1e-9 or end <= start:
            raise ValueError(f"{name}: span {i} ({start}, {end}) overlaps the previous one or is empty")
        last_end = end
        lo, hi = int(round(start * sample_rate)), int(round(end * sample_rate))
        try:
            part = align(audio[lo:hi], text, sample_rate, name=f"{name} span {i} ({start:.2f}-{end:.2f} s)")
        except AlignmentError:
            if on_failure == "raise":
                raise
            ref = normalize_words(text)
            part = Alignment([Word(w, s, e) for w, (s, e) in zip(ref, _fill_gaps([None] * len(ref), end - start))],
                             [False] * len(ref))
        words += [Word(w.word, round(w.start + start, 3), round(w.end + start, 3)) for w in part.words]
        aligned += part.aligned
    return Alignment(words, aligned)


def align_words(audio: np.ndarray, text: str, sample_rate: int = SAMPLE_RATE, name: str = "utterance") -> list[Word]:
    """Word timings (seconds, in order) of ``text`` in ``audio``; raises :class:`AlignmentError` naming ``name``."""
    return align(audio, text, sample_rate, name).words
