"""Task metrics: WER and clamped WER (cWER), BLEU, QA accuracy, and the decoding failures the paper reports.

All rates are fractions (0.0123 = 1.23 %); the run summary prints percentages.

WER is corpus-level: total edits / total reference units. cWER (paper §3.2) clamps each utterance's edits to
its reference length, cWER = Σ_i min(E_i, N_i) / Σ_i N_i, so one looping hypothesis can cost at most its own
reference length. What a unit is, and how texts are normalised, is the scoring ``protocol``'s
(:mod:`speech_redundancy.protocols`): under ``paper`` Mandarin (``zh``, also ``yue``, ``ja``) is scored on
characters, so the ``wer`` key then holds a character error rate and ``unit`` says ``"char"`` (``"mixed"``:
CJK characters and other-script words, as some harnesses count). Normalisers: :mod:`speech_redundancy.normalize`.

Edge cases: an empty reference has N_i = 0 and E_i = the hypothesis length (all insertions); in
:func:`corpus_wer` it adds E_i to WER, nothing to cWER, and is counted in ``empty_refs``; :func:`score` leaves it
out of both and counts it under ``paper`` (runs refuse such items at load); the harness protocols add its
insertions, as their Σ edits / Σ lengths do. An empty hypothesis is all deletions. With no reference unit at all,
the rates are NaN.

:func:`score` is the one scorer of results rows: the run summary (``runner``), ``rescore`` and the tables
(``experiments``) all call it. It recomputes every count from each row's reference and hypothesis under a named
scoring ``protocol`` (:data:`PROTOCOLS`): ``paper`` (default: Whisper English normaliser, Mandarin characters,
sacrebleu ``zh``/``13a``) or one harness's rules (``kimi_evalkit``, ``lmms_eval``, ``ultraeval``, ``audiobench``;
shared/FACTS.md §6), each a record in :data:`speech_redundancy.protocols.TABLE`. :func:`row_metrics` gives the
per-row numbers the runner stores (``protocol``, ``edits``, ``ref_words``).
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import jiwer

from speech_redundancy import protocols as P
from speech_redundancy import stats
from speech_redundancy.data.records import split_task
from speech_redundancy.normalize import CHAR_LANGUAGES, strip_special_tokens, tokenize

# ----------------------------------------------------------------------------------------------- WER and cWER


def _check_pairs(refs: Sequence[str], hyps: Sequence[str]) -> None:
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    for i, (r, h) in enumerate(zip(refs, hyps)):
        if not isinstance(r, str):
            raise TypeError(f"reference {i} is {type(r).__name__}, not str")
        if not isinstance(h, str):
            raise TypeError(f"hypothesis {i} is {type(h).__name__}, not str")


def _units(text: str, language: str, do_normalize: bool, protocol: str = "paper", hypothesis: bool = False) -> list[str]:
    if not do_normalize:
        return tokenize(text, language)
    return P.units(text, language, protocol, hypothesis=hypothesis)


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


def utterance_counts(refs: Sequence[str], hyps: Sequence[str], *, language: str = "en", normalize: bool = True,
                     protocol: str = "paper") -> list[dict[str, int]]:
    """Per-utterance ``edits``, ``ref_words``, ``substitutions``, ``deletions``, ``insertions``, ``hits`` in the
    units of ``protocol`` (``normalize=False``: the raw texts' words, or characters for zh/yue/ja)."""
    _check_pairs(refs, hyps)
    r_units = [_units(r, language, normalize, protocol) for r in refs]
    h_units = [_units(h, language, normalize, protocol, hypothesis=True) for h in hyps]
    counts = _alignment_counts(r_units, h_units)
    for c in counts:
        c["edits"] = c["substitutions"] + c["deletions"] + c["insertions"]
    return counts


def utterance_edits(ref: str, hyp: str, language: str = "en", normalize: bool = True,
                    protocol: str = "paper") -> tuple[int, int]:
    """(E_i, N_i): edit distance and reference length of one utterance, the numbers the runner stores."""
    c = utterance_counts([ref], [hyp], language=language, normalize=normalize, protocol=protocol)[0]
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


def corpus_wer(refs: Sequence[str], hyps: Sequence[str], *, language: str = "en", normalize: bool = True,
               protocol: str = "paper") -> dict[str, Any]:
    """Corpus WER and cWER (fractions) with edit counts in ``protocol``'s units (``unit``: word, char or mixed);
    every pair counts, an empty reference with its insertions (:func:`score` applies the protocol's rules for it)."""
    counts = utterance_counts(refs, hyps, language=language, normalize=normalize, protocol=protocol)
    out = _rates(counts)
    out["unit"] = P.unit_label(language, protocol) if normalize else ("char" if language in CHAR_LANGUAGES else "word")
    out["normalizer"] = P.normalizer_label(language, protocol) if normalize else "none"
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


def bleu_tokenizer(target_lang: str, protocol: str = "paper") -> str:
    """sacrebleu tokenizer for a target language; ``paper``: ``zh`` for Chinese (en→zh), ``13a`` otherwise (zh→en)."""
    return P.get(protocol).bleu_for(target_lang).tokenize


def corpus_bleu(refs: Sequence[str], hyps: Sequence[str], target_lang: str, protocol: str = "paper") -> dict[str, Any]:
    """sacrebleu corpus BLEU (0-100, as sacrebleu reports it) of the texts as ``protocol`` prepares them, with its
    tokenizer for ``target_lang``; ``n``: the pairs scored. A tokenizer that cannot run here is one ValueError."""
    from sacrebleu.metrics import BLEU

    _check_pairs(refs, hyps)
    refs, hyps, tokenize = P.bleu_inputs(list(refs), list(hyps), target_lang, protocol)
    why = P.tokenizer_problem(tokenize)
    if why:
        raise ValueError(f"protocol={P.get(protocol).name}: {why}")
    bleu = BLEU(tokenize=tokenize)
    score = bleu.corpus_score(hyps, [refs])
    return {"bleu": score.score, "signature": str(bleu.get_signature()), "tokenize": tokenize, "n": len(refs)}


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


# ----------------------------------------------------------------------------------------------- results rows

PROTOCOLS = P.NAMES  # named scoring protocols: paper, kimi_evalkit, lmms_eval, ultraeval, audiobench


def task_parts(task: str) -> tuple[str, str | None, str | None]:
    """A row's ``task`` field as scoring reads it (the records' own parser: scoring reads rows, never prompts)."""
    return split_task(task)


def group_key(row: dict[str, Any]) -> tuple[str, str, str | None]:
    """(task, source language, target language) of a results row: ``("st", "en", "zh")`` for en->zh translation
    (task ``st_en2zh``, or ``st`` with ``target_language``), ``("asr", "en", None)`` for English ASR; from the
    row's own ``task``, ``language`` and ``target_language`` fields."""
    base, src, tgt = task_parts(str(row.get("task") or "asr"))
    language = str(row.get("language") or "en")
    if base == "st":
        tgt = row.get("target_language") or tgt
        if tgt is None:
            tgt = "en" if language in CHAR_LANGUAGES else "zh"
    return base, src or language, tgt


def _output_language(row: dict[str, Any]) -> str:
    task, lang, tgt = group_key(row)
    return str(tgt) if task == "st" else lang


def _reference(row: dict[str, Any]) -> str:
    ref = row["reference"]
    return ref if isinstance(ref, str) else (ref[0] if ref else "")


def _asr_counts(rows: list[dict[str, Any]], protocol: str = "paper") -> list[dict[str, int]]:
    """Per-row edit counts, each row under its own language (one jiwer call per language)."""
    counts: list[dict[str, int] | None] = [None] * len(rows)
    by_lang: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_lang.setdefault(str(r.get("language") or "en"), []).append(i)
    for lang, idx in by_lang.items():
        got = utterance_counts([_reference(rows[i]) for i in idx], [rows[i]["hypothesis"] for i in idx], language=lang,
                               protocol=protocol)
        for i, c in zip(idx, got):
            counts[i] = c
    return counts  # type: ignore[return-value]


def row_metrics(row: dict[str, Any], protocol: str = "paper") -> dict[str, Any]:
    """The numbers a results row stores under ``protocol``: ``protocol``, and for ASR rows ``edits`` (E_i) and
    ``ref_words`` (N_i, in the protocol's units)."""
    out: dict[str, Any] = {"protocol": P.get(protocol).name}
    if group_key(row)[0] == "asr":
        out["edits"], out["ref_words"] = utterance_edits(_reference(row), row["hypothesis"],
                                                         language=str(row.get("language") or "en"), protocol=protocol)
    return out


def protocol_problem(protocol: str, rows: Iterable[dict[str, Any]]) -> str | None:
    """Why ``protocol`` cannot score ``rows`` here (a BLEU or WER tokenizer it needs is missing), or None."""
    langs, targets = set(), set()
    for r in rows:
        task, lang, tgt = group_key(r)
        if task == "asr":
            langs.add(lang)
        elif task == "st":
            targets.add(str(tgt))
    return P.problem(protocol, sorted(langs), sorted(targets))


def _same(values: set[str]) -> str | None:
    return next(iter(values)) if len(values) == 1 else ("mixed" if values else None)


def _pair(interval: tuple[float, float]) -> list[float]:
    return [float(interval[0]), float(interval[1])]


@dataclass
class Utterances:
    """What each scored utterance contributes, keyed by row ``id`` (the input of intervals and paired tests):
    ``asr``: id -> (edits, clamped edits, reference units); ``st``: target language -> id -> (reference,
    hypothesis); ``loop``: id -> 1.0 / 0.0 for every ok row; ``tokenize``: target -> sacrebleu tokenizer."""

    asr: dict[str, tuple[int, int, int]]
    st: dict[str, dict[str, tuple[str, str]]]
    loop: dict[str, float]
    tokenize: dict[str, str]


def utterances(rows: Iterable[dict[str, Any]], protocol: str = "paper") -> Utterances:
    """Per-utterance numbers of the ok rows under ``protocol``, keyed by id (the last row of an id wins)."""
    proto = P.get(protocol)
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    asr = [r for r in ok if group_key(r)[0] == "asr" and r["hypothesis"] not in proto.drop_hypotheses]
    out = Utterances({}, {}, {}, {})
    for r, c in zip(asr, _asr_counts(asr, proto.name)):
        if proto.empty_refs == "count" or c["ref_words"] > 0:
            out.asr[str(r.get("id"))] = (c["edits"], min(c["edits"], c["ref_words"]), c["ref_words"])
    for r in ok:
        if group_key(r)[0] == "st":
            tgt = str(group_key(r)[2])
            out.st.setdefault(tgt, {})[str(r.get("id"))] = (_reference(r), r["hypothesis"])
        out.loop[str(r.get("id"))] = float(repetition_loop(r["hypothesis"], _output_language(r)))
    for tgt in out.st:
        out.tokenize[tgt] = P.bleu_inputs([], [], tgt, proto.name)[2]
    return out


def score(rows: Iterable[dict[str, Any]], protocol: str = "paper", *, judge: Any = None,
          judge_cache: Any = None, bootstrap: stats.Bootstrap | None = None) -> dict[str, Any]:
    """Corpus numbers of results rows (rates as fractions; BLEU 0-100), each with its interval.

    Keys: ``n`` (rows), ``n_utterances`` (ok rows), ``n_failed``, ``failed`` (``[{id, error}]``); ASR rows:
    ``wer``, ``cwer``, ``edits``, ``ref_words``, ``substitutions``/``deletions``/``insertions``, ``unit``,
    ``normalizer``, ``empty_refs`` (ok rows whose reference is empty after normalisation: not scored) and
    ``by_kind`` when rows carry several ``kind``s; translation rows: ``bleu``, ``bleu_tokenize``,
    ``target_language`` (``bleu_by_target`` when several); QA rows with a ``judge``: ``accuracy``, ``correct``,
    ``n_judged``, ``n_judge_failed``, ``judge``, ``judge_errors``; every ok row: ``loop_rate``, ``switch_rate``,
    ``empty_rate``, ``retention`` (tokens out / tokens in over the rows that carry them), ``retention_mean``,
    ``seconds``. Failed rows are counted, never scored. ``protocol`` names the scoring rules
    (:mod:`speech_redundancy.protocols`); ASR rows it leaves out (kimi_evalkit: a hypothesis ``"null"``) are
    counted in ``n_dropped``.

    Intervals (:mod:`speech_redundancy.stats`, settings ``bootstrap``: resamples, seed, level; recorded under
    ``bootstrap``): ``wer_ci``, ``cwer_ci`` (also per kind), ``bleu_ci`` (``bleu_ci_by_target``), ``accuracy_ci``
    and ``loop_rate_ci``, each ``[low, high]`` in the unit of its number, from a bootstrap over utterances.
    """
    boot = bootstrap or stats.DEFAULT
    proto = P.get(protocol)
    rows = list(rows)
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    out: dict[str, Any] = {
        "protocol": proto.name, "n": len(rows), "n_utterances": len(ok), "n_failed": len(rows) - len(ok),
        "failed": [{"id": r.get("id"), "error": r.get("error")} for r in rows if r.get("status", "ok") != "ok"],
        "bootstrap": boot.describe(),
    }
    asr = [r for r in ok if group_key(r)[0] == "asr"]
    if asr:
        kept = [r for r in asr if r["hypothesis"] not in proto.drop_hypotheses]
        if proto.drop_hypotheses:
            out["n_dropped"] = len(asr) - len(kept)
        counts = _asr_counts(kept, proto.name)
        scored = [(r, c) for r, c in zip(kept, counts) if proto.empty_refs == "count" or c["ref_words"] > 0]
        out.update({k: v for k, v in _rates(c for _, c in scored).items() if k not in ("n", "empty_refs")})
        out.update(_wer_intervals([c for _, c in scored], boot))
        out["empty_refs"] = sum(c["ref_words"] == 0 for c in counts)
        langs = {str(r.get("language") or "en") for r in asr}
        out["unit"] = _same({P.unit_label(lang, proto.name) for lang in langs})
        out["normalizer"] = _same({P.normalizer_label(lang, proto.name) for lang in langs})
        kinds = sorted({str(r["kind"]) for r, _ in scored if r.get("kind")})
        if len(kinds) > 1:
            out["by_kind"] = {}
            for kind in kinds:
                mine = [c for r, c in scored if str(r.get("kind")) == kind]
                agg = _rates(mine)
                out["by_kind"][kind] = {**{k: agg[k] for k in ("wer", "cwer", "edits", "ref_words", "n")},
                                        **_wer_intervals(mine, boot)}
    st = [r for r in ok if group_key(r)[0] == "st"]
    if st:
        by_target: dict[str, list[dict[str, Any]]] = {}
        for r in st:
            by_target.setdefault(str(group_key(r)[2]), []).append(r)
        bleu, ci = {}, {}
        for tgt, rs in sorted(by_target.items()):
            refs, hyps = [_reference(r) for r in rs], [r["hypothesis"] for r in rs]
            bleu[tgt] = corpus_bleu(refs, hyps, tgt, proto.name)
            p_refs, p_hyps, tok = P.bleu_inputs(refs, hyps, tgt, proto.name)
            ci[tgt] = _pair(stats.bleu_interval(p_refs, p_hyps, tok, boot))
        if len(bleu) == 1:
            (tgt, b), = bleu.items()
            out.update(bleu=b["bleu"], bleu_ci=ci[tgt], bleu_signature=b["signature"], bleu_tokenize=b["tokenize"],
                       target_language=tgt)
        else:
            out["bleu_by_target"] = {tgt: b["bleu"] for tgt, b in bleu.items()}
            out["bleu_ci_by_target"] = ci
    qa = [r for r in ok if group_key(r)[0] == "qa"]
    if qa and judge is not None:
        from speech_redundancy.judge import judge_all

        verdicts = judge_all(qa, judge, cache_path=judge_cache)
        acc = qa_accuracy(v["verdict"] for v in verdicts)
        judged = [float(v["verdict"]) for v in verdicts if v["verdict"] is not None]
        out.update(accuracy=acc["accuracy"], accuracy_ci=_pair(stats.rate_interval(judged, None, boot)),
                   correct=acc["correct"], n_judged=acc["n_judged"],
                   n_judge_failed=acc["n_failed"], judge=judge.id,
                   judge_errors=sorted({v["error"] for v in verdicts if v["error"]})[:5])
    if ok:
        hyps = [(r["hypothesis"], _output_language(r)) for r in ok]
        loops = [float(repetition_loop(h, lang)) for h, lang in hyps]
        out["loop_rate"] = sum(loops) / len(ok)
        out["loop_rate_ci"] = _pair(stats.rate_interval(loops, None, boot))
        out["switch_rate"] = sum(language_switch(h, lang) for h, lang in hyps) / len(ok)
        out["empty_rate"] = sum(is_empty(h) for h, _ in hyps) / len(ok)
    else:
        out["loop_rate"] = out["switch_rate"] = out["empty_rate"] = None
    with_tokens = [r for r in ok if r.get("tokens_in")]
    tokens_in = sum(r["tokens_in"] for r in with_tokens)
    out["retention"] = sum(r.get("tokens_out") or 0 for r in with_tokens) / tokens_in if tokens_in else None
    out["retention_mean"] = (sum((r.get("tokens_out") or 0) / r["tokens_in"] for r in with_tokens) / len(with_tokens)
                             if with_tokens else None)
    out["seconds"] = sum(r.get("seconds") or 0.0 for r in ok)
    return out


def _wer_intervals(counts: list[dict[str, Any]], boot: stats.Bootstrap) -> dict[str, list[float]]:
    """``wer_ci`` / ``cwer_ci``: corpus WER and cWER resampled as summed (clamped) edits over summed reference units."""
    edits = [int(c["edits"]) for c in counts]
    words = [int(c["ref_words"]) for c in counts]
    clamped = [min(e, n) for e, n in zip(edits, words)]
    return {"wer_ci": _pair(stats.rate_interval(edits, words, boot)),
            "cwer_ci": _pair(stats.rate_interval(clamped, words, boot))}
