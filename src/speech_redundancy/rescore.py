"""Score a finished run again from its ``results.jsonl``, without running the model, and build the paper's
decoding-trajectory tables (Tables 9-10).

A results row::

    {"id": "1089-134686-0000", "task": "asr", "language": "en", "status": "ok",
     "reference": "...", "hypothesis": "...",
     # st: "target_language": "zh" (or task "st_en2zh"); qa: "question", "choices", "answer"
     # failed rows: "status": "failed", "error": "..."
     # trajectories: "layer", "operator", "budget" and/or "threshold", "loop", "language_switch"}

Rows are scored per (task, language, target language) with :func:`speech_redundancy.metrics.score`, the scorer
the run summary and the tables use; rows are read with :func:`speech_redundancy.results.read_rows`, the one reader.
Failed rows are counted, not scored. A line that is not UTF-8, not JSON, or lacks a required key is reported as
``file:line: reason`` and skipped (counted).
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from speech_redundancy.judge import Judge, OfflineJudge
from speech_redundancy.metrics import group_key, language_switch, repetition_loop, score
from speech_redundancy.normalize import CHAR_LANGUAGES
from speech_redundancy.results import read_rows, write_json


def score_group(task: str, language: str, target: str | None, rows: list[dict[str, Any]], judge: Judge | None = None,
                cache_path: Path | None = None, protocol: str = "paper") -> dict[str, Any]:
    """Metrics of one (task, language, target) group of rows (:func:`metrics.score`; QA judged, offline by default)."""
    if task not in ("asr", "st", "qa"):
        raise ValueError(f"cannot score task {task!r}; expected asr, st or qa")
    out: dict[str, Any] = {"task": task, "language": language}
    if task == "st":
        out["target_language"] = target
    out.update(score(rows, protocol, judge=(judge or OfflineJudge()) if task == "qa" else None,
                     judge_cache=cache_path))
    return out


def rescore(run_dir: str | Path, judge: Judge | None = None, *, cache: bool = True, quiet: bool = False) -> dict[str, Any]:
    """Score ``<run_dir>/results.jsonl`` again, write ``<run_dir>/rescored.json``, print a table, return the dict."""
    run_dir = Path(run_dir)
    path = run_dir / "results.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    rows, problems = read_rows(path)
    for p in problems:
        print(p, file=sys.stderr)
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[group_key(r)].append(r)
    cache_path = run_dir / "judge_cache.jsonl" if cache else None
    scored = {}
    for (task, lang, tgt), grp in sorted(groups.items(), key=lambda kv: str(kv[0])):
        name = f"{task}/{lang}" + (f"2{tgt}" if task == "st" else "")
        scored[name] = score_group(task, lang, tgt, grp, judge=judge, cache_path=cache_path)
    summary = {"run_dir": str(run_dir), "n_rows": len(rows), "n_malformed": len(problems), "malformed": problems, "groups": scored}
    write_json(run_dir / "rescored.json", _nan_to_none(summary))
    if not quiet:
        print(format_table(summary))
    return summary


def _nan_to_none(x: Any) -> Any:
    """NaN (a metric with nothing to score) as JSON null: json.dumps would write the invalid token NaN."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    return x


def _pct(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def format_table(summary: dict[str, Any]) -> str:
    """A small text table of a rescore summary (rates in %; BLEU as sacrebleu reports it)."""
    head = f"{'group':<12} {'n':>6} {'failed':>6} {'metric':<9} {'score':>8} {'cWER':>7} {'loop%':>6} {'switch%':>7} {'empty%':>6}"
    lines = [head, "-" * len(head)]
    for name, g in summary["groups"].items():
        if g["task"] == "asr":
            metric, value, cwer = ("CER%" if g.get("unit") == "char" else "WER%"), _pct(g.get("wer")), _pct(g.get("cwer"))
        elif g["task"] == "st":
            metric, value, cwer = "BLEU", "-" if g.get("bleu") is None else f"{g['bleu']:.2f}", "-"
        else:
            metric, value, cwer = "Acc%", _pct(g.get("accuracy")), "-"
        lines.append(
            f"{name:<12} {g['n']:>6} {g['n_failed']:>6} {metric:<9} {value:>8} {cwer:>7} "
            f"{_pct(g.get('loop_rate')):>6} {_pct(g.get('switch_rate')):>7} {_pct(g.get('empty_rate')):>6}"
        )
    if summary.get("n_malformed"):
        lines.append(f"({summary['n_malformed']} malformed lines skipped)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- trajectories


def _truncate(text: str, language: str, max_units: int) -> str:
    if language in CHAR_LANGUAGES:
        return text[:max_units]
    return " ".join(text.split()[:max_units])


def trajectory_table(
    rows: Iterable[dict[str, Any]],
    utt_id: str,
    *,
    max_words: int = 24,
    max_chars: int = 60,
    merge_identical: bool = True,
):
    """Paper Tables 9-10: one row per (operator, budget/threshold, layer) for one utterance.

    A looping hypothesis is cut to ``max_words`` words (``max_chars`` characters for Chinese) and marked
    ``… Looping``; ``loop`` and ``language_switch`` are taken from the rows, or detected when absent. With
    ``merge_identical``, consecutive layers with the same hypothesis share one row ("25 & 30").
    """
    import pandas as pd

    picked = [r for r in rows if str(r.get("id")) == str(utt_id)]
    if not picked:
        raise ValueError(f"no result rows for utterance {utt_id!r}")
    recs = []
    for r in picked:
        hyp = r.get("hypothesis") or ""
        lang = r.get("language", "en")
        switch = r.get("language_switch")
        if switch is None:
            switch = language_switch(hyp, r.get("target_language") or lang)
        out_lang = "zh" if (switch and lang not in CHAR_LANGUAGES) else lang
        loop = r.get("loop")
        if loop is None:
            loop = repetition_loop(hyp, out_lang)
        shown = hyp
        if loop:
            shown = _truncate(hyp, out_lang, max_chars if out_lang in CHAR_LANGUAGES else max_words) + " … Looping"
        recs.append(
            {
                "operator": r.get("operator", "none"),
                "budget": r.get("budget"),
                "threshold": r.get("threshold"),
                "layer": r.get("layer"),
                "hypothesis": shown,
                "loop": bool(loop),
                "language_switch": bool(switch),
            }
        )
    df = pd.DataFrame(recs)
    df = df.sort_values(["operator", "budget", "threshold", "layer"], na_position="first", kind="stable").reset_index(drop=True)
    df["layer"] = df["layer"].map(lambda x: "-" if x is None or (isinstance(x, float) and math.isnan(x)) else str(int(x)))
    if merge_identical and len(df) > 1:
        keep, labels = [], []
        for i, row in df.iterrows():
            prev = keep[-1] if keep else None
            if prev is not None and all(
                _same(df.at[prev, c], row[c]) for c in ("operator", "budget", "threshold", "hypothesis")
            ):
                labels[-1] = f"{labels[-1]} & {row['layer']}"
                continue
            keep.append(i)
            labels.append(row["layer"])
        df = df.loc[keep].copy()
        df["layer"] = labels
        df = df.reset_index(drop=True)
    return df


def _same(a: Any, b: Any) -> bool:
    na = a is None or (isinstance(a, float) and math.isnan(a))
    nb = b is None or (isinstance(b, float) and math.isnan(b))
    return (na and nb) or (not na and not nb and a == b)
