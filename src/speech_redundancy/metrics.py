"""Task metrics: WER and clamped WER (cWER), BLEU, QA accuracy, and the decoding failures the paper reports.

All rates are fractions (0.0123 = 1.23 %); the run summary prints percentages.

WER is corpus-level: total edits / total reference units. cWER (paper §3.2) clamps each utterance's edits to
its reference length, cWER = Σ_i min(E_i, N_i) / Σ_i N_i, so one looping hypothesis can cost at most its own
reference length. For Mandarin (``zh``, also ``yue``, ``ja``) the units are characters: the ``wer`` key then
holds a character error rate and ``unit`` says ``"char"``. Normalisation: :mod:`speech_redundancy.normalize`.

Edge cases: an empty reference has N_i = 0 and E_i = the hypothesis length (all insertions); it adds E_i to WER,
nothing to cWER, and is counted in ``empty_refs``. An empty hypothesis is all deletions. With no reference unit
at all, the rates are NaN.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import jiwer

from speech_redundancy.normalize import CHAR_LANGUAGES, normalize, normalizer_id, strip_special_tokens, tokenize, unit

# ----------------------------------------------------------------------------------------------- WER and cWER


def _check_pairs(refs: Sequence[str], hyps: Sequence[str]) -> None:
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    for i, (r, h) in enumerate(zip(refs, hyps)):
        if not isinstance(r, str):
            raise TypeError(f"reference {i} is {type(r).__name__}, not str")
        if not isinstance(h, str):
            raise TypeError(f"hypothesis {i} is {type(h).__name__}, not str")


def _units(text: str, language: str, do_normalize: bool) -> list[str]:
    return tokenize(normalize(text, language) if do_normalize else text, language)


def _alignment_counts(refs: list[list[str]], hyps: list[list[str]]) -> list[dict[str, int]]:
    """Per pair: substitutions, deletions, insertions, hits, ref_words (jiwer alignment)."""
    counts = [dict(substitutions=0, deletions=0, insertions=0, hits=0, ref_words=len(r)) for r in refs]
    if not refs:
        return counts
    out = jiwer.process_words([" ".join(r) for r in refs], [" ".join(h) for h in hyps])
    key = {"substitute": "substitutions", "delete": "deletions", "equal": "hits"}
    for c, chunks in zip(counts, out.alignments):
        for ch in chunks:
            if ch.type == "insert":
                c["insertions"] += ch.hyp_end_idx - ch.hyp_start_idx
            else:
                c[key[ch.type]] += ch.ref_end_idx - ch.ref_start_idx
    return counts


def utterance_counts(refs: Sequence[str], hyps: Sequence[str], *, language: str = "en", normalize: bool = True) -> list[dict[str, int]]:
    """Per-utterance ``edits``, ``ref_words``, ``substitutions``, ``deletions``, ``insertions``, ``hits``."""
    _check_pairs(refs, hyps)
    r_units = [_units(r, language, normalize) for r in refs]
    h_units = [_units(h, language, normalize) for h in hyps]
    counts = _alignment_counts(r_units, h_units)
    for c in counts:
        c["edits"] = c["substitutions"] + c["deletions"] + c["insertions"]
    return counts


def utterance_edits(ref: str, hyp: str, language: str = "en", normalize: bool = True) -> tuple[int, int]:
    """(E_i, N_i): edit distance and reference length of one utterance, the numbers the runner stores."""
    c = utterance_counts([ref], [hyp], language=language, normalize=normalize)[0]
    return c["edits"], c["ref_words"]


def _rates(counts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    tot = dict(edits=0, clamped_edits=0, ref_words=0, n=0, empty_refs=0)
    sdi = dict(substitutions=0, deletions=0, insertions=0)
    have_sdi = True
    for c in counts:
        e, n = int(c["edits"]), int(c["ref_words"])
        tot["edits"] += e
        tot["clamped_edits"] += min(e, n)
        tot["ref_words"] += n
        tot["n"] += 1
        tot["empty_refs"] += n == 0
        if all(k in c for k in sdi):
            for k in sdi:
                sdi[k] += int(c[k])
        else:
            have_sdi = False
    denom = tot["ref_words"]
    out: dict[str, Any] = {
        "wer": tot["edits"] / denom if denom else math.nan,
        "cwer": tot["clamped_edits"] / denom if denom else math.nan,
        **tot,
    }
    if have_sdi:
        out.update(sdi)
    return out


def corpus_wer(refs: Sequence[str], hyps: Sequence[str], *, language: str = "en", normalize: bool = True) -> dict[str, Any]:
    """Corpus WER and cWER (fractions) with edit counts; for zh/yue/ja the ``wer`` key holds CER (``unit: char``)."""
    counts = utterance_counts(refs, hyps, language=language, normalize=normalize)
    out = _rates(counts)
    out["unit"] = unit(language)
    out["normalizer"] = normalizer_id(language) if normalize else "none"
    return out


def aggregate(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """WER/cWER from stored per-item ``edits`` and ``ref_words``; rows with ``status: failed`` are counted apart."""
    ok, n_failed = [], 0
    for i, row in enumerate(rows):
        if row.get("status", "ok") != "ok":
            n_failed += 1
            continue
        missing = [k for k in ("edits", "ref_words") if row.get(k) is None]
        if missing:
            raise ValueError(f"row {i} lacks {missing}")
        ok.append(row)
    out = _rates(ok)
    out["n_failed"] = n_failed
    return out


# ----------------------------------------------------------------------------------------------- BLEU


def bleu_tokenizer(target_lang: str) -> str:
    """sacrebleu tokenizer for a target language: ``zh`` for Chinese (en→zh), ``13a`` otherwise (zh→en)."""
    return "zh" if target_lang.lower().startswith("zh") else "13a"


def corpus_bleu(refs: Sequence[str], hyps: Sequence[str], target_lang: str) -> dict[str, Any]:
    """sacrebleu corpus BLEU (0-100, as sacrebleu reports it) with the tokenizer for ``target_lang``."""
    from sacrebleu.metrics import BLEU

    _check_pairs(refs, hyps)
    hyps = [strip_special_tokens(h, "en") for h in hyps]  # keeps spacing; only <|...|> tokens go
    bleu = BLEU(tokenize=bleu_tokenizer(target_lang))
    score = bleu.corpus_score(list(hyps), [list(refs)])
    return {"bleu": score.score, "signature": str(bleu.get_signature()), "tokenize": bleu_tokenizer(target_lang), "n": len(refs)}


# ----------------------------------------------------------------------------------------------- failures


@dataclass(frozen=True)
class LoopSettings:
    """When a hypothesis counts as a repetition loop.

    A stretch is periodic with period ``p`` when each unit equals the one ``p`` units before it; ``run`` is
    the number of such units in a row, so the stretch holds 1 + run / p copies of its first p units. A loop is a
    stretch with at least ``min_copies_unigram`` copies for p = 1 ("he he he he he"), ``min_copies`` copies for
    longer periods, where ``run`` reaching ``long_run`` units is always enough (a 10-word passage said twice in
    a row: "… the arid lines of the doctrines of the church and penetrating into the arid lines of …").
    Units are lower-cased words with punctuation removed, each CJK character a unit of its own; the character
    limits apply to text that is mostly CJK, whatever the task's language.
    """

    max_period_words: int = 20
    max_period_chars: int = 40
    min_copies_unigram: int = 5
    min_copies: int = 3
    long_run_words: int = 10
    long_run_chars: int = 15


LOOP = LoopSettings()
_CJK_CLASS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_CJK = re.compile(f"[{_CJK_CLASS}]")
_UNIT = re.compile(f"[{_CJK_CLASS}]|[^\\s{_CJK_CLASS}]+")
_LATIN_WORD = re.compile(r"[A-Za-z\u00c0-\u024f]+")


def _loop_units(text: str) -> list[str]:
    """Lower-cased words, with each CJK character a unit of its own; punctuation dropped."""
    text = strip_special_tokens(text).lower()
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    return _UNIT.findall(text)


def _longest_run(units: list[str], period: int) -> int:
    best = cur = 0
    for j in range(period, len(units)):
        cur = cur + 1 if units[j] == units[j - period] else 0
        best = max(best, cur)
    return best


def repetition_loop(text: str, language: str = "en", settings: LoopSettings = LOOP) -> bool:
    """True when ``text`` repeats a phrase over and over (thresholds: :class:`LoopSettings`)."""
    units = _loop_units(text)
    cjk, latin = script_units(text)
    # the script of the text decides (Chinese output in an English task is counted in characters)
    chars = cjk > latin or (cjk == latin and language in CHAR_LANGUAGES)
    max_period = settings.max_period_chars if chars else settings.max_period_words
    long_run = settings.long_run_chars if chars else settings.long_run_words
    for p in range(1, min(max_period, len(units) // 2) + 1):
        copies = settings.min_copies_unigram if p == 1 else settings.min_copies
        need = min((copies - 1) * p, long_run) if p > 1 else (copies - 1)
        if _longest_run(units, p) >= need:
            return True
    return False


def script_units(text: str) -> tuple[int, int]:
    """(CJK characters, Latin-script words) in ``text``: one unit each, about one word's worth."""
    text = strip_special_tokens(text)
    return len(_CJK.findall(text)), len(_LATIN_WORD.findall(text))


def language_switch(text: str, expected_language: str, threshold: float = 0.5) -> bool:
    """True when most of ``text`` is in the other script: CJK in an English answer, Latin in a Chinese one."""
    cjk, latin = script_units(text)
    if cjk + latin == 0:
        return False
    foreign = latin if expected_language in CHAR_LANGUAGES else cjk
    return foreign / (cjk + latin) > threshold


def is_empty(text: str) -> bool:
    """True when nothing but special tokens, punctuation and whitespace is left."""
    return not _loop_units(text)


def failure_rates(hyps: Sequence[str], language: str = "en") -> dict[str, Any]:
    """Share of hypotheses that loop, switch language or are empty (fractions), and their count ``n``."""
    for i, h in enumerate(hyps):
        if not isinstance(h, str):
            raise TypeError(f"hypothesis {i} is {type(h).__name__}, not str")
    n = len(hyps)
    if n == 0:
        return {"loop_rate": math.nan, "switch_rate": math.nan, "empty_rate": math.nan, "n": 0}
    return {
        "loop_rate": sum(repetition_loop(h, language) for h in hyps) / n,
        "switch_rate": sum(language_switch(h, language) for h in hyps) / n,
        "empty_rate": sum(is_empty(h) for h in hyps) / n,
        "n": n,
    }


# ----------------------------------------------------------------------------------------------- QA


def qa_accuracy(verdicts: Iterable[bool | None | dict[str, Any]]) -> dict[str, Any]:
    """Accuracy over judged items; a ``None`` verdict (judge failed) is counted in ``n_failed``, not scored."""
    correct = judged = failed = 0
    for i, v in enumerate(verdicts):
        if isinstance(v, dict):
            v = v.get("verdict")
        if v is None:
            failed += 1
        elif isinstance(v, bool):
            judged += 1
            correct += v
        else:
            raise TypeError(f"verdict {i} is {type(v).__name__}, not bool or None")
    return {
        "accuracy": correct / judged if judged else math.nan,
        "correct": correct,
        "n_judged": judged,
        "n_failed": failed,
        "n": judged + failed,
    }
